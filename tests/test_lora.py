"""LoRA adapters in every published format: the video equals diffusers' video from a UNet (and text encoder) whose
weights were merged by that format's own rule, written here independently of vidfusion.lora.apply."""

from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vidfusion import TextToVideoPipeline
from vidfusion.lora.apply import LoraError

from .test_parity import assert_latents_close

BASE = dict(prompt="a cat is surfing", num_frames=3, height=32, width=32, num_inference_steps=3, sampler="ddim")
# a mix of every layer kind: spatial/temporal attention, feed-forward, transformer_in, temporal Conv3d, resnet Conv2d,
# time embedding, downsampler / upsampler convs
UNET_MODULES = [
    "transformer_in.proj_in",
    "transformer_in.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.0.temp_attentions.0.proj_out",
    "down_blocks.0.temp_convs.0.conv1.2",
    "down_blocks.1.temp_convs.0.conv4.3",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.downsamplers.0.conv",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.temp_attentions.1.transformer_blocks.0.attn2.to_q",
    "time_embedding.linear_1",
]
TEXT_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = TextToVideoPipeline.from_pretrained(tiny_checkpoint)
    p.set_progress_bar_config(disable=True)
    yield p
    p.unload_lora_weights()


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "pipe" in request.fixturenames:
        request.getfixturevalue("pipe").unload_lora_weights()


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    from diffusers import TextToVideoSDPipeline

    p = TextToVideoSDPipeline.from_pretrained(str(tiny_checkpoint))
    p.set_progress_bar_config(disable=True)
    return p


def _weight(ref, path: str) -> torch.nn.Parameter:
    component, name = path.split(".", 1)
    model = ref.unet if component == "unet" else ref.text_encoder
    if component == "text_encoder" and not any(n.startswith("text_model.") for n, _ in model.named_modules()):
        name = name.removeprefix("text_model.")
    return model.get_submodule(name).weight


@contextlib.contextmanager
def merged(ref, deltas: dict[str, torch.Tensor]):
    """diffusers' models with `deltas` added to their weights, restored afterwards."""
    saved = {}
    with torch.no_grad():
        for path, delta in deltas.items():
            w = _weight(ref, path)
            saved[path] = w.detach().clone()
            w += delta.reshape(w.shape)
    try:
        yield ref
    finally:
        with torch.no_grad():
            for path, original in saved.items():
                _weight(ref, path).copy_(original)


def random_factors(ref, paths, rank=4, seed=0):
    """{path: (up, down)} in the standard layout: up (out, r[, 1...]), down (r, in, *kernel)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in paths:
        w = _weight(ref, path)
        kernel = tuple(w.shape[2:])
        down = torch.randn((rank, w.shape[1], *kernel), generator=g) * 0.3 / (w[0].numel() ** 0.5)
        up = torch.randn((w.shape[0], rank, *([1] * len(kernel))), generator=g) * 0.3 / rank**0.5
        factors[path] = (up, down)
    return factors


def standard_delta(up, down, scale=1.0):
    return scale * (up.flatten(1) @ down.flatten(1))


def ours_video(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(0), **{**BASE, **kwargs}).frames


def ref_video(ref, **kwargs):
    from diffusers import DDIMScheduler

    args = {**BASE, **kwargs}
    args.pop("sampler")
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    return ref(generator=torch.Generator().manual_seed(0), **args).frames


def assert_same_video(pipe, ref, deltas, **kwargs):
    with merged(ref, deltas):
        assert_latents_close(ref_video(ref, output_type="latent", **kwargs), ours_video(pipe, output_type="latent",
                                                                                        **kwargs))
        expected = ref_video(ref, **kwargs)
    got = ours_video(pipe, **kwargs)
    assert np.abs(expected - got).max() < 1e-3
    return got


@pytest.fixture
def base_latents(pipe):
    pipe.unload_lora_weights()
    return ours_video(pipe, output_type="latent")


def test_diffusers_format_with_alpha_and_text_encoder(pipe, ref, base_latents, tmp_path):
    factors = random_factors(ref, [f"unet.{m}" for m in UNET_MODULES] + [f"text_encoder.{m}" for m in TEXT_MODULES])
    state, deltas = {}, {}
    for i, (path, (up, down)) in enumerate(factors.items()):
        state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = down, up
        alpha = 8.0 if i % 2 else None  # optional alpha: scale alpha / rank
        if alpha is not None:
            state[f"{path}.alpha"] = torch.tensor(alpha)
        deltas[path] = standard_delta(up, down, (alpha / 4) if alpha else 1.0)
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors")
    name = pipe.load_lora_weights(tmp_path)
    assert name == "pytorch_lora_weights" and pipe.get_active_adapters() == [name]
    assert_same_video(pipe, ref, deltas)
    changed = ours_video(pipe, output_type="latent")
    # the adapter changes the video: 50x the parity tolerance
    assert (changed - base_latents).abs().max() > 5e-3 * base_latents.abs().max()
    pipe.unload_lora_weights()


def test_diffusers_format_without_prefix(pipe, ref, tmp_path):
    factors = random_factors(ref, [f"unet.{m}" for m in UNET_MODULES[:4]], seed=1)
    state = {}
    for path, (up, down) in factors.items():
        state[path.removeprefix("unet.") + ".lora_A.weight"] = down
        state[path.removeprefix("unet.") + ".lora_B.weight"] = up
    save_file(state, tmp_path / "lora.safetensors")
    pipe.load_lora_weights(tmp_path / "lora.safetensors", scale=0.7)
    assert_same_video(pipe, ref, {p: standard_delta(u, d, 0.7) for p, (u, d) in factors.items()})
    pipe.unload_lora_weights()


def test_peft_adapter_folder_with_patterns(pipe, ref, tiny_checkpoint, tmp_path):
    """A PEFT adapter folder written by peft itself on diffusers' UNet; the reference merge is peft's own."""
    from diffusers import UNet3DConditionModel
    from peft import LoraConfig, get_peft_model

    unet = UNet3DConditionModel.from_pretrained(str(tiny_checkpoint), subfolder="unet")
    targets = r".*(to_q|to_v|proj_in|temp_convs\.\d+\.conv1\.2|resnets\.\d+\.conv1)$"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                        rank_pattern={"to_q": 2}, alpha_pattern={"to_v": 16}, init_lora_weights=False)
    # (rank_pattern / alpha_pattern as peft resolves them: the merged weights below are peft's own)
    peft_unet = get_peft_model(unet, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_unet.save_pretrained(tmp_path / "mcm-like")
    assert (tmp_path / "mcm-like" / "adapter_config.json").is_file()
    merged_unet = peft_unet.merge_and_unload()
    expected = {n: t for n, t in merged_unet.state_dict().items()}
    deltas = {f"unet.{n[:-len('.weight')]}": expected[n] - t for n, t in ref.unet.state_dict().items()
              if n.endswith(".weight") and not torch.equal(expected[n], t)}
    assert len(deltas) > 20
    pipe.load_lora_weights(tmp_path / "mcm-like")
    assert_same_video(pipe, ref, deltas)
    pipe.unload_lora_weights()


def test_kohya_including_temporal_layers_and_text_encoder(pipe, ref, tmp_path):
    paths = [f"unet.{m}" for m in UNET_MODULES] + [f"text_encoder.{m}" for m in TEXT_MODULES]
    factors = random_factors(ref, paths, seed=4)
    state, deltas = {}, {}
    for path, (up, down) in factors.items():
        component, name = path.split(".", 1)
        key = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(2.0)
        deltas[path] = standard_delta(up, down, 2.0 / 4)
    assert "lora_unet_transformer_in_proj_in.lora_down.weight" in state
    assert "lora_unet_down_blocks_0_temp_convs_0_conv1_2.lora_up.weight" in state
    save_file(state, tmp_path / "kohya.safetensors")
    pipe.load_lora_weights(tmp_path / "kohya.safetensors")
    assert_same_video(pipe, ref, deltas)
    pipe.unload_lora_weights()


def diffusers_layers(unet, ancestor: str | None):
    """diffusers' registration order of Linear / Conv2d / Conv3d under ancestor classes (cloneofsimo's walk)."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)
    if ancestor is None:
        return [(n, m) for n, m in unet.named_modules() if isinstance(m, kinds)]
    found = []
    for root_name, root in unet.named_modules():
        if type(root).__name__ == ancestor:
            found += [(f"{root_name}.{n}", m) for n, m in root.named_modules() if isinstance(m, kinds)]
    return found


@pytest.mark.parametrize("ancestor,target", [("Transformer2DModel", "spatial"),
                                             ("TransformerTemporalModel", "temporal")])
def test_cloneofsimo_lists_motiondirector(pipe, ref, tmp_path, ancestor, target):
    layers = diffusers_layers(ref.unet, ancestor)
    factors = random_factors(ref, [f"unet.{n}" for n, _ in layers], seed=5)
    flat = [t for up, down in factors.values() for t in (up, down)]
    torch.save(flat, tmp_path / f"{target}.pt")
    pipe.load_lora_weights(tmp_path / f"{target}.pt", target=target)
    assert_same_video(pipe, ref, {p: standard_delta(u, d) for p, (u, d) in factors.items()})
    pipe.unload_lora_weights()
    # without target= the layers are found from the list's length: the same video (catches a wrong guess, which
    # would put the factors on other layers or refuse the file)
    pipe.load_lora_weights(tmp_path / f"{target}.pt")
    assert_same_video(pipe, ref, {p: standard_delta(u, d) for p, (u, d) in factors.items()})
    pipe.unload_lora_weights()


def test_stable_lora(pipe, ref, tmp_path):
    """sd-webui-text2video's format: original ModelScope names, loralib layouts, Conv3d deltas averaged."""
    from vidfusion.checkpoints.naming import unet_name_to_original

    g = torch.Generator().manual_seed(6)
    picks = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.temp_attentions.0.proj_in",
             "mid_block.temp_attentions.0.transformer_blocks.0.ff.net.2", "transformer_in.proj_out",
             "down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.1.conv2", "down_blocks.0.temp_convs.0.conv2.3",
             "up_blocks.0.upsamplers.0.conv", "down_blocks.0.downsamplers.0.conv",
             "up_blocks.0.resnets.1.time_emb_proj"]
    state, deltas, rank = {}, {}, 2
    for name in picks:
        w = _weight(ref, f"unet.{name}")
        original = unet_name_to_original(name, pipe.unet.config)
        assert original is not None and original != name
        out, inp = w.shape[:2]
        k = w.shape[2] if w.dim() > 2 else 1
        lora_a = torch.randn(rank * k, inp * k, generator=g) * 0.1
        lora_b = torch.randn(out * k, rank * k, generator=g) * 0.1
        product = lora_b @ lora_a
        if w.dim() == 5:  # Conv3d (3, 1, 1)
            delta = product.view(out, inp, k, k, 1).mean(dim=-2, keepdim=True)
        else:
            delta = product.view(w.shape)
        if "proj_in" in name and "temp" in name:  # saved from the original Conv1d (C, C, 1): trailing 1s
            lora_a, lora_b = lora_a[..., None], lora_b[..., None]
        state[f"{original}.lora_A"], state[f"{original}.lora_B"] = lora_a, lora_b
        deltas[f"unet.{name}"] = delta
    assert "input_blocks.1.0.temopral_conv.conv2.3.lora_A" in state
    save_file(state, tmp_path / "stable.safetensors", metadata={"stable_lora_text_to_video": "v1", "lora_name": "x"})
    pipe.load_lora_weights(tmp_path / "stable.safetensors")
    assert_same_video(pipe, ref, deltas)
    pipe.unload_lora_weights()


def test_several_adapters_weights_fuse_and_exact_unload(pipe, ref, tmp_path):
    original = {k: v.clone() for k, v in {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}.items()}
    fa = random_factors(ref, [f"unet.{m}" for m in UNET_MODULES[:8]], seed=7)
    fb = random_factors(ref, [f"unet.{m}" for m in UNET_MODULES[4:]], seed=8)
    for name, factors in (("a", fa), ("b", fb)):
        save_file({f"unet.{p[5:]}.lora_{r}.weight": t for p, (up, down) in factors.items()
                   for r, t in (("A", down), ("B", up))}, tmp_path / f"{name}.safetensors")
        assert pipe.load_lora_weights(tmp_path / f"{name}.safetensors", adapter_name=name) == name
    assert pipe.get_active_adapters() == ["a", "b"]
    pipe.set_adapters(["a", "b"], [0.5, 1.5])

    def combined(wa, wb):
        deltas = {}
        for factors, w in ((fa, wa), (fb, wb)):
            for p, (u, d) in factors.items():
                deltas[p] = deltas.get(p, 0) + standard_delta(u, d, w)
        return deltas

    assert_same_video(pipe, ref, combined(0.5, 1.5))
    pipe.fuse_lora(adapter_names=["a"], lora_scale=0.5)  # a fixed at 0.25, b still switchable
    pipe.set_adapters(["b"], 2.0)
    assert_same_video(pipe, ref, combined(0.25, 2.0))
    with pytest.raises(ValueError, match="fused"):
        pipe.set_adapters(["a"])
    pipe.unfuse_lora()
    pipe.set_adapters("a")
    assert_same_video(pipe, ref, combined(1.0, 0.0))
    with pytest.raises(ValueError, match="unknown adapter"):
        pipe.set_adapters(["nope"])
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(tmp_path / "a.safetensors", adapter_name="a")
    pipe.unload_lora_weights()
    restored = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)  # bit for bit
    assert pipe.get_active_adapters() == []


def test_lora_in_half_precision_restores_exactly(tiny_checkpoint, tmp_path):
    pipe = TextToVideoPipeline.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    state = {"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.randn(2, 32, 3, 3),
             "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": torch.randn(32, 2, 1, 1)}
    save_file(state, tmp_path / "l.safetensors")
    pipe.load_lora_weights(tmp_path / "l.safetensors")
    w = pipe.unet.down_blocks[0].resnets[0].conv1.weight
    assert w.dtype == torch.bfloat16 and w.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(w, before["down_blocks.0.resnets.0.conv1.weight"])
    pipe.unload_lora_weights()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


# ---- errors -------------------------------------------------------------------------------------------------

def test_sd15_lora_is_refused_naming_the_format_and_keys(pipe, tmp_path):
    # an image LoRA: kohya names that exist in an SD 1.5 UNet, with its shapes (320 channels, 768-d text)
    state = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
             torch.zeros(4, 768),
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4),
             "lora_unet_down_blocks_0_attentions_1_proj_in.lora_down.weight": torch.zeros(4, 320, 1, 1),
             "lora_unet_down_blocks_0_attentions_1_proj_in.lora_up.weight": torch.zeros(320, 4, 1, 1)}
    save_file(state, tmp_path / "sd15.safetensors")
    with pytest.raises(LoraError, match=r"kohya LoRA.*down_blocks_0_attentions_1_proj_in|kohya LoRA.*attn2_to_k"):
        pipe.load_lora_weights(tmp_path / "sd15.safetensors")
    assert pipe.get_active_adapters() == []


def test_partial_match_and_bad_shapes(pipe, ref, tmp_path):
    (up, down), = random_factors(ref, ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]).values()
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up,
               "unet.not_a_module.lora_A.weight": down.clone(), "unet.not_a_module.lora_B.weight": up.clone()},
              tmp_path / "partial.safetensors")
    with pytest.raises(LoraError, match=r"diffusers LoRA: 1 of 2 modules match no layer.*not_a_module"):
        pipe.load_lora_weights(tmp_path / "partial.safetensors")
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 1, 1), "unet.conv_in.lora_B.weight": torch.zeros(32, 2,
                                                                                                                1, 1)},
              tmp_path / "shape.safetensors")
    with pytest.raises(LoraError, match=r"shapes do not fit.*unet.conv_in"):
        pipe.load_lora_weights(tmp_path / "shape.safetensors")
    torch.save([torch.zeros(3, 2), torch.zeros(2, 5)] * 3, tmp_path / "list.pt")
    with pytest.raises(LoraError, match="fits no target"):
        pipe.load_lora_weights(tmp_path / "list.pt")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(LoraError, match="no LoRA format recognised.*foo.weight"):
        pipe.load_lora_weights(tmp_path / "other.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    with pytest.raises(LoraError, match="cannot read LoRA file"):
        pipe.load_lora_weights(tmp_path / "cut.safetensors")
    with pytest.raises(LoraError, match="does not exist"):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")
    assert pipe.get_active_adapters() == []


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_pickled_code_is_never_executed(pipe, tmp_path):
    marker = tmp_path / "marker"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump([_Exploit(str(marker)), torch.zeros(1)], f)
    with pytest.raises(LoraError, match="never executed"):
        pipe.load_lora_weights(tmp_path / "evil.pt")
    assert not marker.exists()


def test_peft_config_alpha_and_rank_patterns_scale(pipe, ref, tmp_path):
    """rank_pattern / alpha_pattern / use_rslora from adapter_config.json, with keys as peft saves them."""
    paths = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", "down_blocks.0.temp_convs.0.conv1.2"]
    factors = random_factors(ref, [f"unet.{p}" for p in paths], seed=9)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({f"base_model.model.{p[5:]}.lora_{r}.weight": t for p, (up, down) in factors.items()
               for r, t in (("A", down), ("B", up))}, folder / "adapter_model.safetensors")
    # alpha / r, and with rsLoRA alpha / sqrt(r) (catches use_rslora ignored: the scales would stay 2, 0.5, 2)
    for rslora, scales in ((False, [2.0, 0.5, 2.0]), (True, [4.0, 1.0, 4.0])):
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {}, "alpha_pattern": {"attn1.to_v": 2},
            "use_rslora": rslora}))
        pipe.load_lora_weights(folder)
        assert_same_video(pipe, ref, {p: standard_delta(u, d, s) for (p, (u, d)), s in zip(factors.items(), scales)})
        pipe.unload_lora_weights()


def test_cross_attention_kwargs_scale_is_set_adapters_for_one_call(pipe, ref, tmp_path):
    """diffusers' cross_attention_kwargs={"scale": s}: the same video as set_adapters with the weights times s (and
    as diffusers with the LoRA merged at s), the weights back afterwards; other keys are an error naming the one
    supported. Catches a scale that is ignored, or one that sticks after the call."""
    factors = random_factors(ref, [f"unet.{m}" for m in UNET_MODULES[:6]], seed=11)
    save_file({f"unet.{p[5:]}.lora_{r}.weight": t for p, (up, down) in factors.items()
               for r, t in (("A", down), ("B", up))}, tmp_path / "s.safetensors")
    name = pipe.load_lora_weights(tmp_path / "s.safetensors", scale=0.8)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    scaled = ours_video(pipe, output_type="latent", cross_attention_kwargs={"scale": 0.5})
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the 0.8 weights are back
    pipe.set_adapters(name, 0.4)
    assert torch.equal(scaled, ours_video(pipe, output_type="latent"))
    assert_same_video(pipe, ref, {p: standard_delta(u, d, 0.4) for p, (u, d) in factors.items()})
    with pytest.raises(ValueError, match="supported: scale"):
        ours_video(pipe, cross_attention_kwargs={"attention_op": None})
    pipe.unload_lora_weights()
