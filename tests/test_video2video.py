"""Video-to-video against diffusers' VideoToVideoSDPipeline, inputs, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vidfusion import DiffusionPipeline, TextToVideoPipeline, VideoToVideoPipeline, VideoToVideoSDPipeline
from vidfusion.media.video_io import export_to_video

from .test_parity import SCHEDULERS, assert_latents_close

VIDEO = np.random.default_rng(0).random((4, 32, 48, 3)).astype(np.float32)  # (F, H, W, 3) in [0, 1]
SAMPLERS = [s for s in SCHEDULERS if s != "pndm"]


@pytest.fixture(scope="module")
def reference_v2v(reference):
    from diffusers import VideoToVideoSDPipeline as Reference

    pipe = Reference(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours_v2v(ours):
    return VideoToVideoPipeline.from_pipe(ours)


def run_reference(pipe, sampler, **kwargs):
    import diffusers

    original = pipe.scheduler
    cls_name, extra = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **extra)
    try:
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_latents_match_diffusers(reference_v2v, ours_v2v, sampler):
    kwargs = dict(prompt="a cat in the style of van gogh", video=VIDEO, strength=0.6, num_inference_steps=5,
                  output_type="latent")
    ref = run_reference(reference_v2v, sampler, **kwargs)
    got = ours_v2v(generator=torch.Generator().manual_seed(0), sampler=sampler, **kwargs).frames
    assert_latents_close(ref, got)


def test_frames_match_diffusers(reference_v2v, ours_v2v):
    kwargs = dict(prompt="a dog", video=VIDEO, strength=0.8, num_inference_steps=4, negative_prompt="blurry")
    ref = run_reference(reference_v2v, "ddim", **kwargs)
    got = ours_v2v(generator=torch.Generator().manual_seed(0), sampler="ddim", **kwargs).frames
    assert got.shape == ref.shape == (1, 4, 32, 48, 3)
    assert np.abs(ref - got).max() < 1e-3


def test_from_pipe_shares_the_weights(ours, ours_v2v):
    assert ours_v2v.unet is ours.unet and ours_v2v.vae is ours.vae and ours_v2v.text_encoder is ours.text_encoder


def test_inputs_file_pil_tensor_and_resize(ours_v2v, tmp_path):
    path = export_to_video(VIDEO, tmp_path / "in.mp4", fps=8)
    kwargs = dict(prompt="a dog", strength=0.5, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    from_file = ours_v2v(video=path, **kwargs).frames
    assert from_file.shape == (1, 4, 32, 48, 3)
    from PIL import Image

    pil = [Image.fromarray((f * 255).round().astype(np.uint8)) for f in VIDEO]
    assert ours_v2v(video=pil, **kwargs).frames.shape == (1, 4, 32, 48, 3)
    tensor = torch.from_numpy(VIDEO).permute(0, 3, 1, 2)  # (F, 3, H, W) as output_type="pt"
    kwargs["generator"] = torch.Generator().manual_seed(0)
    a = ours_v2v(video=tensor, **kwargs).frames
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert np.allclose(a, ours_v2v(video=VIDEO, **kwargs).frames, atol=1e-6)
    big = ours_v2v(video=VIDEO, width=64, height=48, **kwargs).frames  # resized first (the upscale recipe)
    assert big.shape == (1, 4, 48, 64, 3)


def test_strength_zero_returns_the_encoded_video(ours_v2v, reference):
    """Catches a strength-0 run that denoises anyway or drops the input: the latents are diffusers' VAE posterior
    sample of the video (same generator), scaled."""
    out = ours_v2v("x", video=VIDEO, strength=0.0, num_inference_steps=3, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).frames
    frames = torch.from_numpy(VIDEO).permute(0, 3, 1, 2) * 2 - 1  # (F, 3, H, W) in [-1, 1]
    with torch.no_grad():
        dist = reference.vae.encode(frames).latent_dist
    expected = dist.sample(generator=torch.Generator().manual_seed(0)) * reference.vae.config.scaling_factor
    assert_latents_close(expected.permute(1, 0, 2, 3)[None], out)  # (1, C, F, h, w)


@pytest.mark.parametrize("sampler, expected", [("lcm", [499, 259]), ("mcm", [499, 259])])
def test_few_step_samplers_start_at_their_first_timestep_below_strength(ours_v2v, sampler, expected):
    """Catches the few-step samplers refused for video-to-video (or started from noise): at strength 0.6 a 4-step
    LCM run (999, 759, 499, 259) starts at 499, one UNet pass a step (no CFG)."""
    seen = []
    hook = ours_v2v.unet.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[0], int(args[1]))))
    try:
        out = ours_v2v("a dog", video=VIDEO, strength=0.6, sampler=sampler,
                       generator=torch.Generator().manual_seed(0)).frames
    finally:
        hook.remove()
    assert seen == [(1, t) for t in expected] and out.shape == (1, 4, 32, 48, 3)


def test_consistency_start_state_is_diffusers_add_noise():
    from diffusers import LCMScheduler

    from vidfusion.sampling.samplers import first_step, start_state
    from vidfusion.sampling.schedules import NoiseSchedule, sampler_options

    x0, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    for sampler, timesteps in (("lcm", [999, 759, 499, 259]), ("t2v-turbo", [999, 759, 519, 279])):
        schedule = NoiseSchedule.create(sampler_options(sampler, {}), 4)
        reference = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        for start, t in enumerate(timesteps):
            expected = reference.add_noise(x0, noise, torch.tensor([t]))
            assert torch.allclose(start_state(sampler, schedule, x0, noise, start), expected, atol=1e-6)
        assert [first_step(sampler, schedule, s) for s in (0.0, 0.2, 0.3, 0.6, 0.76, 1.0)] == [4, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(video=VIDEO, strength=1.5), "strength"),
    (dict(video=VIDEO, strength=-0.1), "strength"),
    (dict(), "input video"),
    (dict(video="/nonexistent/clip.mp4"), "does not exist"),
    (dict(video=np.zeros((4, 30, 48, 3), np.float32)), "multiples of 8"),
    (dict(video=np.zeros((4, 32, 48), np.float32)), "video array"),
    (dict(video=VIDEO, sampler="pndm"), "pndm"),
    (dict(video=VIDEO, num_frames=7), "num_frames"),
])
def test_bad_inputs(ours_v2v, kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ours_v2v("x", num_inference_steps=2, **kwargs)


def test_unreadable_video_file(ours_v2v, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        ours_v2v("x", video=bad)


def test_diffusion_pipeline_picks_the_class_from_model_index(tiny_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "v2v"
    shutil.copytree(tiny_checkpoint, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "VideoToVideoSDPipeline"}))
    assert type(DiffusionPipeline.from_pretrained(folder)) is VideoToVideoSDPipeline
    assert type(DiffusionPipeline.from_pretrained(tiny_checkpoint)) is not VideoToVideoSDPipeline
    assert isinstance(VideoToVideoPipeline.from_pretrained(folder), TextToVideoPipeline)
