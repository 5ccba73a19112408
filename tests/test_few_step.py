"""Few-step sampling: `lcm` against diffusers' LCMScheduler, `t2v-turbo` (with the T2V-Turbo LoRA's guidance
embedding) against a reference loop written from the published math on diffusers' UNet."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from vidfusion import LCMScheduler, TextToVideoPipeline

from .test_parity import assert_latents_close

BASE = dict(prompt="a cat is surfing", num_frames=3, height=32, width=32)
GUIDANCE_DIM = 256


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    p = TextToVideoPipeline.from_pretrained(tiny_checkpoint)
    p.set_progress_bar_config(disable=True)
    return p


def run_reference_lcm(reference, steps, guidance, **extra):
    from diffusers import LCMScheduler as DiffusersLCM

    original = reference.scheduler
    reference.scheduler = DiffusersLCM.from_config(original.config, **extra)
    try:
        return reference(generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                         guidance_scale=guidance, output_type="latent", **BASE).frames
    finally:
        reference.scheduler = original


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers(reference, pipe, steps):
    expected = run_reference_lcm(reference, steps, 9.0)
    got = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, sampler="lcm",
               guidance_scale=9.0, output_type="latent", **BASE).frames
    assert_latents_close(expected, got)


def test_mcm_scheduler_object_with_timestep_scaling_and_no_cfg(reference, pipe):
    expected = run_reference_lcm(reference, 4, 1.0, timestep_scaling=4.0)
    original = pipe.scheduler
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=4.0)
    try:  # 4 steps is the lcm default
        got = pipe(generator=torch.Generator().manual_seed(0), guidance_scale=1.0, output_type="latent",
                   **BASE).frames
    finally:
        pipe.scheduler = original
    assert_latents_close(expected, got)
    frames = pipe(generator=torch.Generator().manual_seed(0), sampler="lcm", num_inference_steps=2, **BASE).frames
    assert frames.shape == (1, 3, 32, 32, 3) and np.isfinite(frames).all()


@pytest.mark.parametrize("sampler, scaling", [("lcm", 10.0), ("mcm", 4.0)])
def test_lcm_and_mcm_default_to_4_steps_without_cfg(reference, pipe, sampler, scaling):
    """Catches lcm / mcm run with classifier-free guidance at 9 by default (two UNet passes a step, over-saturated):
    MCM's demo runs them at guidance 1, one pass a step; the defaults are what every entry point reports."""
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        out = pipe(generator=torch.Generator().manual_seed(0), sampler=sampler, output_type="latent", **BASE)
    finally:
        hook.remove()
    assert calls == [1, 1, 1, 1]
    assert_latents_close(run_reference_lcm(reference, 4, 1.0, timestep_scaling=scaling), out.frames)
    assert (out.settings["sampler"], out.settings["num_inference_steps"], out.settings["guidance_scale"]) == (
        sampler, 4, 1.0)
    assert pipe.generation_defaults(sampler) == (sampler, 4, 1.0)
    assert pipe.sampler_defaults()[sampler] == (4, 1.0) and pipe.sampler_defaults()[""] == (50, 9.0)


# ---- T2V-Turbo ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def turbo(tiny_checkpoint, tmp_path_factory):
    """A T2V-Turbo-style unet_lora.pt for the tiny UNet: a cloneofsimo list over every Linear / Conv2d / Conv3d of
    diffusers' UNet3DConditionModel(time_cond_proj_dim=256), in its registration order, and that merged UNet."""
    from diffusers import UNet3DConditionModel

    base = UNet3DConditionModel.from_pretrained(str(tiny_checkpoint), subfolder="unet")
    unet = UNet3DConditionModel.from_config(base.config, time_cond_proj_dim=GUIDANCE_DIM)
    missing, unexpected = unet.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
    g = torch.Generator().manual_seed(11)
    flat = []
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.zero_()  # its base weight is not published: zero
        for name, module in unet.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
                w = module.weight
                rank = 4
                down = torch.randn((rank, *w.shape[1:]), generator=g) * 0.2 / w[0].numel() ** 0.5
                up = torch.randn((w.shape[0], rank, *([1] * (w.dim() - 2))), generator=g) * 0.2 / rank**0.5
                if name == "time_embedding.cond_proj":
                    up = up * 20  # make the guidance embedding matter
                w += up.flatten(1).mm(down.flatten(1)).view(w.shape)
                flat += [up, down]
    path = tmp_path_factory.mktemp("turbo") / "unet_lora.pt"
    torch.save(flat, path)
    return path, unet.eval()


def w_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The upstream pipeline's guidance embedding: sin then cos of w*1000 at 10000^(-i/(half-1))."""
    w = w * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def turbo_reference(unet, reference, steps, guidance, seed=0):
    """T2V-Turbo (MS) sampling from the math: timesteps origin[::-skip][:n], LCM boundary scalings with
    sigma_data 0.5 and timestep scaling 10, fresh noise after every step but the last, the last denoised sample."""
    ids = reference.tokenizer(BASE["prompt"], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    text = reference.text_encoder(ids)[0]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    origin = np.arange(1, 51) * 20 - 1
    timesteps = origin[::-(50 // steps)][:steps]
    g = torch.Generator().manual_seed(seed)
    frames, h = BASE["num_frames"], BASE["height"] // reference.vae_scale_factor
    x = torch.randn((1, 4, frames, h, h), generator=g)
    cond = w_embedding(torch.tensor([guidance]), GUIDANCE_DIM)
    for i, t in enumerate(timesteps):
        with torch.no_grad():
            eps = unet(x, torch.tensor([t]), encoder_hidden_states=text, timestep_cond=cond).sample
        a = alphas_cumprod[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        scaled = t * 10.0
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
        denoised = c_out * x0 + c_skip * x
        if i == len(timesteps) - 1:
            return denoised
        a_next = alphas_cumprod[timesteps[i + 1]]
        noise = torch.randn((frames, 4, h, h), generator=g).permute(1, 0, 2, 3)[None]  # drawn per frame
        x = a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise


def test_turbo_timesteps():
    from vidfusion.sampling.schedules import SAMPLER_OPTIONS, consistency_timesteps

    assert consistency_timesteps(SAMPLER_OPTIONS["t2v-turbo"], 4, "t2v-turbo").tolist() == [999, 759, 519, 279]
    for n in range(1, 9):
        assert len(consistency_timesteps(SAMPLER_OPTIONS["t2v-turbo"], n, "t2v-turbo")) == n


@pytest.mark.parametrize("steps,guidance", [(4, 7.5), (1, 7.5), (3, 4.0), (8, 12.0)])
def test_t2v_turbo_matches_the_reference_loop(pipe, reference, turbo, steps, guidance):
    path, unet = turbo
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    name = pipe.load_lora_weights(path)
    try:
        assert name == "unet_lora" and pipe.unet.guidance_embedding_dim == GUIDANCE_DIM
        expected = turbo_reference(unet, reference, steps, guidance)
        got = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, guidance_scale=guidance,
                   sampler="t2v-turbo", output_type="latent", **BASE).frames
        assert_latents_close(expected, got)
    finally:
        pipe.unload_lora_weights()
    assert pipe.unet.time_embedding.cond_proj is None and pipe.unet.guidance_embedding_dim is None
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_turbo_defaults_one_pass_per_step(pipe, reference, turbo):
    path, unet = turbo
    pipe.load_lora_weights(path)
    calls = []
    original_forward = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original_forward(sample, *args, **kwargs)

    pipe.unet.forward = counting
    try:  # sampler, 4 steps and guidance 7.5 are the defaults once the T2V-Turbo LoRA is loaded
        got = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **BASE).frames
    finally:
        del pipe.unet.forward
        pipe.unload_lora_weights()
    assert calls == [1, 1, 1, 1]  # no classifier-free guidance batch
    assert_latents_close(turbo_reference(unet, reference, 4, 7.5), got)


def test_t2v_turbo_without_its_lora_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match="T2V-Turbo.*load_lora_weights"):
        pipe(sampler="t2v-turbo", **BASE)
    with pytest.raises(ValueError, match="at most 50 steps"):
        pipe(sampler="lcm", num_inference_steps=51, **BASE)


# ---- --turbo through the hub cache (offline), CLI and service ------------------------------------------------

def offline_hub_cache(root, lora_path):
    """An HF hub cache holding jiachenli-ucsb/T2V-Turbo-MS/unet_lora.pt, as huggingface_hub lays it out."""
    commit = "0" * 40
    repo = root / "models--jiachenli-ucsb--T2V-Turbo-MS"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "unet_lora.pt").write_bytes(lora_path.read_bytes())
    return {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}


def test_cli_turbo_and_lora(tiny_checkpoint, turbo, tmp_path):
    env = offline_hub_cache(tmp_path / "hub", turbo[0])
    out = tmp_path / "t.mp4"
    cmd = [sys.executable, "-m", "vidfusion", "generate", "a cat", "--model", str(tiny_checkpoint), "--frames",
           "3", "--height", "32", "--width", "32", "--seed", "0", "--out", str(out), "--turbo"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4/4" in result.stderr  # 4 steps by default
    with av.open(str(out)) as c:
        assert len(list(c.decode(video=0))) == 3
    # --lora with a weight next to it; a LoRA that does not exist: one line, exit 2
    result = subprocess.run(cmd[:-1] + ["--lora", f"{turbo[0]}:0.5", "--sampler", "t2v-turbo", "--steps", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2/2" in result.stderr
    result = subprocess.run(cmd[:-1] + ["--lora", str(tmp_path / "nope.safetensors")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_turbo_defaults(tiny_checkpoint, turbo, tmp_path, monkeypatch):
    from .serve_helpers import Server, wait_for

    for key, value in offline_hub_cache(tmp_path / "hub", turbo[0]).items():
        monkeypatch.setenv(key, value)
    server = Server(tiny_checkpoint, tmp_path / "data", "--turbo").start()
    try:
        with server.client() as client:
            assert 'value="4"' in client.get("/").text  # the page's default steps
            job = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 2, "height": 32, "width": 32,
                                                  "seed": 1}).json()
            assert job["params"]["num_inference_steps"] == 4 and job["params"]["guidance_scale"] == 7.5
            done = wait_for(client, job["id"])
            assert done["status"] == "succeeded", done
    finally:
        server.stop()


def test_convert_fuses_the_turbo_lora_into_a_checkpoint(tiny_checkpoint, turbo, tmp_path, pipe):
    """`vidfusion convert SRC DST --lora X --fuse`: the written checkpoint is the merged model (the same video as
    loading the LoRA at run time, no merging at start), T2V-Turbo's guidance embedding kept (time_cond_proj_dim),
    so it samples with t2v-turbo by default; LoRAs without fuse are refused."""
    from vidfusion import convert

    path, _ = turbo
    out = convert(tiny_checkpoint, tmp_path / "fused", to="diffusers", loras=[(str(path), 1.0)], fuse=True)
    fused = TextToVideoPipeline.from_pretrained(out)
    fused.set_progress_bar_config(disable=True)
    assert fused.unet.guidance_embedding_dim is not None and fused.generation_defaults()[0] == "t2v-turbo"
    pipe.load_lora_weights(path)
    try:
        expected = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **BASE).frames
    finally:
        pipe.unload_lora_weights()
    got = fused(generator=torch.Generator().manual_seed(0), output_type="latent", **BASE).frames
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="fuse"):
        convert(tiny_checkpoint, tmp_path / "other", loras=[(str(path), 1.0)])
