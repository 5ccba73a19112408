"""Original ModelScope files: UNet names both ways (checked against the published key patterns), and the
restricted checkpoint reader on a Lightning-style VAE file whose pickle names a class that must never run."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from vidfusion.checkpoints.original_format import (
    ConversionError,
    read_checkpoint,
    state_dict_of,
    unet_to_diffusers,
    unet_to_original,
)
from vidfusion.models.config import FULL_UNET, UNetConfig
from vidfusion.models.unet3d import UNet3D

# original name -> diffusers name for the published 1.7B config (input_blocks 3*i + j + 1, downsamplers at
# 3*(i+1), output_blocks 3*i + j, upsamplers at output_blocks.{3*i + 2}.{1 if i == 0 else 3}, the resnet renames)
PUBLISHED = {
    "time_embed.0.weight": "time_embedding.linear_1.weight",
    "time_embed.2.bias": "time_embedding.linear_2.bias",
    "input_blocks.0.0.weight": "conv_in.weight",
    "input_blocks.0.1.proj_in.weight": "transformer_in.proj_in.weight",
    "input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
    "input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1.weight",
    "input_blocks.2.0.emb_layers.1.weight": "down_blocks.0.resnets.1.time_emb_proj.weight",
    "input_blocks.2.0.out_layers.3.bias": "down_blocks.0.resnets.1.conv2.bias",
    "input_blocks.1.0.temopral_conv.conv1.0.weight": "down_blocks.0.temp_convs.0.conv1.0.weight",
    "input_blocks.2.0.temopral_conv.conv4.3.weight": "down_blocks.0.temp_convs.1.conv4.3.weight",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "input_blocks.2.2.proj_out.weight": "down_blocks.0.temp_attentions.1.proj_out.weight",
    "input_blocks.3.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
    "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
    "input_blocks.11.0.out_layers.0.weight": "down_blocks.3.resnets.1.norm2.weight",
    "middle_block.0.in_layers.0.weight": "mid_block.resnets.0.norm1.weight",
    "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
    "middle_block.2.transformer_blocks.0.ff.net.2.weight":
        "mid_block.temp_attentions.0.transformer_blocks.0.ff.net.2.weight",
    "middle_block.3.temopral_conv.conv4.3.bias": "mid_block.temp_convs.1.conv4.3.bias",
    "output_blocks.0.0.skip_connection.weight": "up_blocks.0.resnets.0.conv_shortcut.weight",
    "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "output_blocks.5.3.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
    "output_blocks.8.3.conv.weight": "up_blocks.2.upsamplers.0.conv.weight",
    "output_blocks.11.2.norm.weight": "up_blocks.3.temp_attentions.2.norm.weight",
    "out.0.weight": "conv_norm_out.weight",
    "out.2.bias": "conv_out.bias",
}


def full_unet_state():
    with torch.device("meta"):
        return UNet3D(FULL_UNET).state_dict()


def test_published_names_both_ways():
    state = full_unet_state()
    original = unet_to_original(state, FULL_UNET)
    from vidfusion.checkpoints.naming import unet_name_to_diffusers, unet_name_to_original

    for orig, diffusers in PUBLISHED.items():  # each published name maps to its partner (catches a swapped pair)
        assert diffusers in state and orig in original, (orig, diffusers)
        assert unet_name_to_original(diffusers, FULL_UNET) == orig
        assert unet_name_to_diffusers(orig, FULL_UNET) == diffusers
    assert original["input_blocks.0.1.proj_in.weight"].shape == (512, 320, 1)  # Conv1d in the original
    assert original["input_blocks.2.2.proj_out.weight"].shape == (320, 320, 1)
    assert original["input_blocks.1.1.proj_in.weight"].dim() == 2  # spatial ones stay Linear
    assert all(k.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out."))
               for k in original)
    back = unet_to_diffusers(original, FULL_UNET)
    assert back.keys() == state.keys() and all(back[k].shape == state[k].shape for k in state)


def test_tiny_unet_round_trip_through_a_pth_file(tiny_checkpoint, tmp_path):
    from vidfusion.checkpoints.loading import read_json, read_weights

    cfg = UNetConfig.from_dict(read_json(tiny_checkpoint / "unet" / "config.json"))
    state = read_weights(tiny_checkpoint / "unet", None)
    original = unet_to_original(state, cfg)
    torch.save(original, tmp_path / "text2video_pytorch_model.pth")
    back = unet_to_diffusers(state_dict_of(read_checkpoint(tmp_path / "text2video_pytorch_model.pth"), "unet"), cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ConversionError, match="not part of the original UNet.*bogus.weight"):
        unet_to_diffusers({**original, "bogus.weight": torch.zeros(1)}, cfg)


class MarkerCallback:
    """Stands for pytorch_lightning's ModelCheckpoint: instantiating it would write a marker file."""

    def __init__(self, marker):
        with open(marker, "w") as f:
            f.write("instantiated")

    def __reduce__(self):
        return (MarkerCallback, (self.marker,))


def test_lightning_vae_checkpoint_without_running_pickled_code(tmp_path):
    marker = tmp_path / "marker"
    callback = MarkerCallback.__new__(MarkerCallback)
    callback.marker = str(marker)
    weights = {"first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
               "first_stage_model.decoder.conv_out.bias": torch.randn(3).half(),
               "loss.logvar": torch.zeros(())}
    checkpoint = {"epoch": np.int64(7), "global_step": 1000, "callbacks": {"ModelCheckpoint": callback},
                  "state_dict": weights, "lr_schedulers": [], "hparams": {"lr": np.float64(4.5e-6)}}
    torch.save(checkpoint, tmp_path / "VQGAN_autoencoder.pth")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "VQGAN_autoencoder.pth", weights_only=True)  # why a reader of our own is needed
    obj = read_checkpoint(tmp_path / "VQGAN_autoencoder.pth")
    assert not marker.exists()  # the class was never instantiated
    assert type(obj["callbacks"]["ModelCheckpoint"]).__module__.startswith("inert.")
    state = state_dict_of(obj, "VQGAN_autoencoder.pth", prefix="first_stage_model.")
    assert set(state) == {"encoder.conv_in.weight", "decoder.conv_out.bias"}
    assert torch.equal(state["encoder.conv_in.weight"], weights["first_stage_model.encoder.conv_in.weight"])
    assert state["decoder.conv_out.bias"].dtype == torch.float16


def test_bad_files(tmp_path):
    torch.save({"a": torch.zeros(1000)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cut.pth"):
        read_checkpoint(tmp_path / "cut.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="not a state dict"):
        state_dict_of(read_checkpoint(tmp_path / "list.pth"), "list.pth")
    with pytest.raises(ConversionError, match="missing file"):
        read_checkpoint(tmp_path / "nope.pth")


def test_vae_names_both_ways_and_decode_parity(tiny_checkpoint, tmp_path):
    from diffusers import AutoencoderKL as DiffusersVAE

    from vidfusion.checkpoints.loading import build_strict, read_json, read_weights
    from vidfusion.checkpoints.original_format import vae_config_from, vae_to_diffusers, vae_to_original
    from vidfusion.models.config import VAEConfig
    from vidfusion.models.vae import AutoencoderKL

    cfg = VAEConfig.from_dict(read_json(tiny_checkpoint / "vae" / "config.json"))
    state = read_weights(tiny_checkpoint / "vae", None)
    original = vae_to_original(state, cfg)
    # the LDM names (2 levels here): decoder.up counts from the lowest resolution, diffusers' up_blocks from the top
    for orig, diffusers in {"encoder.down.0.block.0.norm1.weight": "encoder.down_blocks.0.resnets.0.norm1.weight",
                            "encoder.down.0.downsample.conv.weight": "encoder.down_blocks.0.downsamplers.0.conv.weight",
                            "encoder.down.1.block.0.nin_shortcut.weight":
                                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                            "encoder.mid.attn_1.norm.weight": "encoder.mid_block.attentions.0.group_norm.weight",
                            "encoder.mid.attn_1.proj_out.bias": "encoder.mid_block.attentions.0.to_out.0.bias",
                            "encoder.norm_out.weight": "encoder.conv_norm_out.weight",
                            "decoder.mid.block_2.conv1.weight": "decoder.mid_block.resnets.1.conv1.weight",
                            "decoder.up.1.block.1.conv2.weight": "decoder.up_blocks.0.resnets.1.conv2.weight",
                            "decoder.up.1.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
                            "decoder.up.0.block.0.nin_shortcut.bias":
                                "decoder.up_blocks.1.resnets.0.conv_shortcut.bias",
                            "quant_conv.weight": "quant_conv.weight"}.items():
        assert orig in original and torch.equal(original[orig], state[diffusers]), orig
    assert original["decoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)  # 1x1 convs in the original
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in original.items()}}, tmp_path / "vae.pth")
    back = vae_to_diffusers(state_dict_of(read_checkpoint(tmp_path / "vae.pth"), "vae.pth", "first_stage_model."))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    derived = vae_config_from(back)
    assert (derived.block_out_channels, derived.layers_per_block, derived.latent_channels) == (
        cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels)
    derived = VAEConfig(**{**derived.__dict__, "norm_num_groups": cfg.norm_num_groups})  # the tiny one uses 8
    ours = build_strict(lambda: AutoencoderKL(derived), back, torch.float32, "vae")
    reference = DiffusersVAE.from_pretrained(str(tiny_checkpoint), subfolder="vae")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours.decode(z), reference.decode(z).sample, atol=1e-4)


def test_openclip_text_tower_both_ways():
    """An OpenCLIP-named text tower (one block more than used, visual weights, projection) written here from the
    published layout: resblocks.N.{ln_1, attn.in_proj_weight/bias (q; k; v), attn.out_proj, ln_2, mlp.c_fc,
    mlp.c_proj}, token_embedding, positional_embedding, ln_final."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from vidfusion.checkpoints.original_format import clip_to_openclip, clip_to_transformers

    torch.manual_seed(0)
    full = CLIPTextModel(CLIPTextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                        num_hidden_layers=3, max_position_embeddings=77, hidden_act="gelu")).eval()
    t = {k.removeprefix("text_model."): v for k, v in full.state_dict().items() if "position_ids" not in k}
    openclip = {"token_embedding.weight": t["embeddings.token_embedding.weight"],
                "positional_embedding": t["embeddings.position_embedding.weight"],
                "ln_final.weight": t["final_layer_norm.weight"], "ln_final.bias": t["final_layer_norm.bias"],
                "text_projection": torch.randn(64, 32), "logit_scale": torch.tensor(4.6),
                "visual.conv1.weight": torch.randn(8, 3, 4, 4), "attn_mask": torch.zeros(77, 77)}
    for i in range(3):
        p, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for ours_name, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                                  ("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                                  ("mlp.fc2", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                openclip[f"{b}{theirs}.{kind}"] = t[f"{p}{ours_name}.{kind}"]
        openclip[f"{b}attn.in_proj_weight"] = torch.cat([t[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
        openclip[f"{b}attn.in_proj_bias"] = torch.cat([t[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"])
    converted, config = clip_to_transformers(openclip)
    assert config["num_hidden_layers"] == 2 and config["projection_dim"] == 32 and config["hidden_act"] == "gelu"
    config["num_attention_heads"] = 1  # width 64 -> one 64-wide head, as OpenCLIP
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    model_state = {k.removeprefix("text_model."): k for k in model.state_dict() if "position_ids" not in k}
    assert set(model_state) == set(converted)
    model.load_state_dict({model_state[k]: v for k, v in converted.items()}, strict=False)
    ids = torch.randint(0, 300, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the penultimate block, then ln_final
        hidden = full(ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(full, "text_model", full).final_layer_norm(hidden)
        assert torch.allclose(model(ids)[0], expected, atol=1e-5)
    back = clip_to_openclip(converted, extra=openclip)
    assert back.keys() == openclip.keys() and all(torch.equal(back[k], openclip[k]) for k in openclip)
    with pytest.raises(ConversionError, match="not part of an OpenCLIP text tower.*mystery"):
        clip_to_transformers({**openclip, "mystery.weight": torch.zeros(1)})


# ---- an original folder loads and gives diffusers' video ------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny diffusers checkpoint with the original code's fixed choices (GroupNorm 32, OpenCLIP-width heads, the
    CLIP BPE tokenizer padding with 0), and the same model as an original ModelScope folder."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from vidfusion.checkpoints.original_format import (
        clip_to_openclip,
        clip_tokenizer,
        unet_to_original,
        vae_to_original,
    )
    from vidfusion.checkpoints.random_checkpoint import PUBLISHED_SCHEDULER

    from .conftest import _randomize

    root = tmp_path_factory.mktemp("original")
    torch.manual_seed(0)
    unet = UNet3DConditionModel(sample_size=8, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu"))
    for i, m in enumerate((unet, vae, text)):
        _randomize(m, i)
    tokenizer = clip_tokenizer(root / "tok")
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                 scheduler=DDIMScheduler.from_config(PUBLISHED_SCHEDULER))
    pipe.save_pretrained(str(root / "diffusers"))
    (root / "diffusers" / "scheduler" / "scheduler_config.json").write_text(json.dumps(PUBLISHED_SCHEDULER))

    original = root / "original"
    original.mkdir()
    cfg = UNetConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in unet.config.items()
                        if k in UNetConfig.__dataclass_fields__})
    torch.save(unet_to_original(unet.state_dict(), cfg), original / "text2video_pytorch_model.pth")
    from vidfusion.models.config import VAEConfig

    vae_cfg = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    lightning = {"epoch": np.int64(3), "state_dict": {f"first_stage_model.{k}": v for k, v in
                                                      vae_to_original(vae.state_dict(), vae_cfg).items()}}
    torch.save(lightning, original / "VQGAN_autoencoder.pth")
    extra = {f"transformer.resblocks.2.{k}": torch.randn(s) for k, s in
             (("ln_1.weight", (64,)), ("attn.in_proj_weight", (192, 64)), ("mlp.c_fc.weight", (128, 64)))}
    extra.update({"text_projection": torch.randn(64, 32), "visual.proj": torch.randn(16, 32)})
    torch.save(clip_to_openclip(text.state_dict(), extra), original / "open_clip_pytorch_model.bin")
    (original / "configuration.json").write_text(json.dumps({"framework": "pytorch", "task": "text-to-video-synthesis",
        "model": {"type": "latent-text-to-video-synthesis",
                  "model_args": {"ckpt_clip": "open_clip_pytorch_model.bin",
                                 "ckpt_unet": "text2video_pytorch_model.pth",
                                 "ckpt_autoencoder": "VQGAN_autoencoder.pth", "max_frames": 16, "tiny_gpu": 1},
                  "model_cfg": {"unet_in_dim": 4, "unet_dim": 32, "unet_y_dim": 768, "unet_context_dim": 64,
                                "unet_out_dim": 4, "unet_dim_mult": [1, 2], "unet_num_heads": 8, "unet_head_dim": 8,
                                "unet_res_blocks": 1, "unet_attn_scales": [1], "unet_dropout": 0.1,
                                "temporal_attention": "True", "num_timesteps": 1000, "mean_type": "eps"}}}))
    return root / "diffusers", original


def test_original_folder_gives_the_diffusers_video(folders):
    from diffusers import TextToVideoSDPipeline

    from vidfusion import DiffusionPipeline, TextToVideoPipeline

    diffusers_folder, original = folders
    reference = TextToVideoSDPipeline.from_pretrained(str(diffusers_folder))
    reference.set_progress_bar_config(disable=True)
    ours = TextToVideoPipeline.from_pretrained(original)
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat is surfing", num_frames=3, height=32, width=32, num_inference_steps=3)
    expected = reference(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).frames
    got = ours(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).frames
    rel = ((expected - got).abs().max() / expected.abs().max()).item()
    assert rel < 1e-4, rel
    assert type(DiffusionPipeline.from_pretrained(original)).__name__ == "TextToVideoSDPipeline"


def test_missing_parts_come_from_arguments(folders, tmp_path):
    import shutil

    from vidfusion import TextToVideoPipeline
    from vidfusion.checkpoints.loading import CheckpointError

    diffusers_folder, original = folders
    zs2 = tmp_path / "zs2_576w"  # Zeroscope ships UNet + CLIP only
    shutil.copytree(original, zs2)
    (zs2 / "VQGAN_autoencoder.pth").unlink()
    with pytest.raises(CheckpointError, match=r"no VAE file .*ckpt_autoencoder.*pass it with vae= \(CLI: --vae\)"):
        TextToVideoPipeline.from_pretrained(zs2)
    for source in (original / "VQGAN_autoencoder.pth", original, diffusers_folder):
        pipe = TextToVideoPipeline.from_pretrained(zs2, vae=source)
        assert pipe.vae.config.block_out_channels == (32, 64)
    pipe = TextToVideoPipeline.from_pretrained(zs2, vae=original, text_encoder=diffusers_folder)
    assert pipe.text_encoder.config.num_hidden_layers == 2
    config = json_edit(zs2 / "configuration.json", lambda c: c["model"]["model_cfg"].pop("unet_dim"))
    with pytest.raises(CheckpointError, match="model_cfg lacks unet_dim"):
        TextToVideoPipeline.from_pretrained(zs2, vae=original)
    assert config


def json_edit(path, change):
    import json

    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    return config


def test_convert_both_ways(folders, tmp_path):
    import subprocess
    import sys

    from diffusers import TextToVideoSDPipeline

    from vidfusion import TextToVideoPipeline, convert

    _, original = folders
    to_diffusers = convert(original, tmp_path / "as-diffusers")
    assert sorted(p.name for p in to_diffusers.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                              "tokenizer", "unet", "vae"]
    kwargs = dict(prompt="a cat is surfing", num_frames=3, height=32, width=32, num_inference_steps=3,
                  output_type="latent")
    reference = TextToVideoSDPipeline.from_pretrained(str(to_diffusers))  # diffusers' own loader reads it
    reference.set_progress_bar_config(disable=True)
    ours = TextToVideoPipeline.from_pretrained(original)
    ours.set_progress_bar_config(disable=True)
    expected = reference(generator=torch.Generator().manual_seed(0), **kwargs).frames
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert ((expected - got).abs().max() / expected.abs().max()).item() < 1e-4

    result = subprocess.run([sys.executable, "-m", "vidfusion", "convert", str(to_diffusers),
                             str(tmp_path / "back"), "--clip", str(original)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    back = tmp_path / "back"
    for name, prefix in (("text2video_pytorch_model.pth", ""), ("VQGAN_autoencoder.pth", "first_stage_model."),
                         ("open_clip_pytorch_model.bin", "")):
        a = state_dict_of(read_checkpoint(original / name), name, prefix)
        b = state_dict_of(read_checkpoint(back / name), name, prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # identical tensors
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(to_diffusers, back)
    with pytest.warns(UserWarning, match="holds zeros for that block"):
        convert(to_diffusers, back, overwrite=True, dtype="float16")
    assert read_checkpoint(back / "text2video_pytorch_model.pth")["out.2.weight"].dtype == torch.float16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    from vidfusion.media.fileio import current_umask

    mask = current_umask()  # published with the umask's permissions, not mkdtemp's / save_file's owner-only ones
    assert os.stat(to_diffusers).st_mode & 0o777 == 0o777 & ~mask
    for path in (to_diffusers / "unet" / "diffusion_pytorch_model.safetensors", back / "VQGAN_autoencoder.pth"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, path
    result = subprocess.run([sys.executable, "-m", "vidfusion", "convert", str(tmp_path / "nope"),
                             str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_init_random_tiny_original_converts_both_ways_to_the_same_video(tmp_path):
    """What init-random makes, convert takes: `--preset tiny-original` -> original files -> diffusers, as the CLI
    (subprocesses); all three load to the same weights and the same latents. Catches the plain tiny preset's
    refusal being the only route, a text tower that lost its last layer without --clip (the reader drops the last
    block, which the writer left out), and a tokenizer that changed on the way (an original folder implies CLIP's)."""
    import subprocess
    import sys

    from vidfusion import TextToVideoPipeline

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vidfusion", *args], capture_output=True, text=True, timeout=300)

    assert cli("init-random", str(tmp_path / "tiny"), "--preset", "tiny-original").returncode == 0
    assert cli("convert", str(tmp_path / "tiny"), str(tmp_path / "orig")).returncode == 0
    result = cli("convert", str(tmp_path / "orig"), str(tmp_path / "back"))
    assert result.returncode == 0 and "Writing" not in result.stderr, result.stderr  # no transformers progress bar
    latents = []
    for name in ("tiny", "orig", "back"):
        pipe = TextToVideoPipeline.from_pretrained(tmp_path / name)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.text_encoder.config.num_hidden_layers == 2 and pipe.tokenizer.pad_token == "!"
        latents.append(pipe("a cat on the beach", num_frames=2, height=32, width=32, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0), output_type="latent").frames)
    assert torch.equal(latents[0], latents[1]) and torch.equal(latents[0], latents[2])
    plain = cli("init-random", str(tmp_path / "plain"))
    refused = cli("convert", str(tmp_path / "plain"), str(tmp_path / "plain-orig"))
    assert plain.returncode == 0 and refused.returncode == 2 and "--preset tiny-original" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "plain-orig").exists()


def test_a_converted_folder_that_loads_back_differently_is_not_published(tmp_path, monkeypatch):
    """convert loads what it wrote before reporting success: a rule table that swaps two VAE tensors (same shape),
    or a VAE config with another latent scale (same weights), is an error naming them (a fault of convert: exit 1,
    not an input mistake), and DST is never created."""
    from vidfusion import convert
    from vidfusion.checkpoints.random_checkpoint import write_random_checkpoint
    from vidfusion.pipelines import convert as convert_module

    source = write_random_checkpoint(tmp_path / "tiny", preset="tiny-original")
    real = convert_module.vae_to_original

    def swapped(state, config):
        out = real(state, config)
        a, b = "decoder.mid.block_1.conv1.weight", "decoder.mid.block_1.conv2.weight"
        out[a], out[b] = out[b], out[a]
        return out

    monkeypatch.setattr(convert_module, "vae_to_original", swapped)
    with pytest.raises(convert_module.ConvertedFolderError, match="vae loads back with other weights"):
        convert(source, tmp_path / "orig")
    assert not (tmp_path / "orig").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    real_config = convert_module.config_json

    def other_scale(config, cls):  # the same weights, another latent scale: only the configs can tell
        out = real_config(config, cls)
        return {**out, "scaling_factor": 0.5} if cls == "AutoencoderKL" else out

    monkeypatch.setattr(convert_module, "config_json", other_scale)
    with pytest.raises(convert_module.ConvertedFolderError, match="vae loads back with another configuration"):
        convert(source, tmp_path / "again", to="diffusers")
    assert not (tmp_path / "again").exists()
