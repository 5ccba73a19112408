"""Creative controls: FreeU, noise prior, long/looping videos, prompt travel, FreeInit, callbacks, batches."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from vidfusion.pipelines.long_video import frame_windows, keyframe_weights
from vidfusion.sampling.noise import free_init_filter, initial_noise

from .test_parity import assert_latents_close, run_reference

BASE = dict(prompt="a cat is surfing", num_frames=3, height=32, width=32, num_inference_steps=3)
FREEU = (0.9, 0.2, 1.2, 1.4)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m"])
def test_freeu_matches_diffusers_enable_freeu(reference, ours, sampler):
    reference.enable_freeu(*FREEU)
    try:
        ref = run_reference(reference, sampler, output_type="latent", **BASE)
    finally:
        reference.disable_freeu()
    got = ours(**BASE, sampler=sampler, freeu=FREEU, generator=gen(), output_type="latent").frames
    plain = ours(**BASE, sampler=sampler, generator=gen(), output_type="latent").frames
    assert_latents_close(ref, got)
    assert (got - plain).abs().max() > 1e-3  # FreeU did something
    ours.enable_freeu(*FREEU)
    try:
        assert torch.equal(ours(**BASE, sampler=sampler, generator=gen(), output_type="latent").frames, got)
    finally:
        ours.disable_freeu()


def test_videofusion_noise_prior_statistics():
    shape = (2, 4, 16, 32, 32)
    for ratio in (0.0, 0.3, 0.8):
        noise = initial_noise(shape, gen(1), "cpu", torch.float32, "videofusion", ratio)
        assert abs(noise.var().item() - 1) < 0.03 and abs(noise.mean().item()) < 0.02  # unit variance kept
        flat = noise.permute(0, 2, 1, 3, 4).reshape(2, 16, -1)  # correlation between frames of a video = ratio
        corr = np.mean([np.corrcoef(flat[b].numpy())[np.triu_indices(16, 1)].mean() for b in range(2)])
        assert abs(corr - ratio) < 0.03, (ratio, corr)
    iid = initial_noise(shape, gen(1), "cpu", torch.float32)
    assert torch.equal(initial_noise(shape, gen(1), "cpu", torch.float32, "videofusion", 0.0), iid)
    with pytest.raises(ValueError, match="base_noise_ratio"):
        initial_noise(shape, gen(1), "cpu", torch.float32, "videofusion", 1.5)
    with pytest.raises(ValueError, match="noise_prior"):
        initial_noise(shape, gen(1), "cpu", torch.float32, "gaussian")


def _first_unet_inputs(pipe, **kwargs) -> list[torch.Tensor]:
    """The latents (B, C, F, h, w) of every UNet call (the conditional half under CFG), and the call's output."""
    inputs = []

    def keep(module, args):
        x = args[0]
        inputs.append(x[x.shape[0] // 2:] if x.shape[0] > 1 else x)

    hook = pipe.unet.register_forward_pre_hook(keep)
    try:
        out = pipe(generator=gen(), output_type="latent", **kwargs).frames
    finally:
        hook.remove()
    return inputs, out


def _frame_correlation(x: torch.Tensor) -> float:
    flat = x[0].permute(1, 0, 2, 3).reshape(x.shape[2], -1).double().numpy()  # (F, C*h*w)
    return float(np.corrcoef(flat)[np.triu_indices(x.shape[2], 1)].mean())


def test_noise_prior_through_the_pipeline(ours):
    """Catches a prior that never reaches the sampler: the latents the UNet first sees have inter-frame correlation
    lambda (base_noise_ratio), the plain prior ~0."""
    args = dict(prompt="a cat", num_frames=16, height=128, width=128, num_inference_steps=1, sampler="ddim")
    prior, _ = _first_unet_inputs(ours, noise_prior="videofusion", base_noise_ratio=0.5, **args)
    plain, _ = _first_unet_inputs(ours, **args)
    assert abs(_frame_correlation(prior[0]) - 0.5) < 0.05 and abs(_frame_correlation(plain[0])) < 0.05
    with pytest.raises(ValueError, match="base_noise_ratio"):
        ours(**BASE, noise_prior="videofusion", base_noise_ratio=-0.1)


def test_windows_cover_every_frame():
    assert frame_windows(16, 16, 4, False) is None
    wins = frame_windows(40, 16, 4, False)
    assert wins[0] == list(range(16)) and wins[-1] == list(range(24, 40)) and all(len(w) == 16 for w in wins)
    assert set().union(*map(set, wins)) == set(range(40))
    loop = frame_windows(40, 16, 8, True)
    assert [0, 39] == sorted({0, 39} & set(next(w for w in loop if 39 in w and 0 in w)))  # wraps around
    short = frame_windows(8, 16, 2, True, call=1)
    assert short == [[(2 + j) % 8 for j in range(8)]]


def test_long_video_runs_the_unet_on_windows_only(ours):
    seen = []
    hook = ours.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
    try:
        out = ours("a long walk", num_frames=40, height=16, width=16, num_inference_steps=2, window_size=8,
                   window_stride=4, generator=gen(), output_type="latent").frames
    finally:
        hook.remove()
    assert out.shape[2] == 40 and max(seen) == 8 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="window_stride"):
        ours("x", num_frames=20, window_size=8, window_stride=9)
    with pytest.raises(ValueError, match="window_size"):
        ours("x", num_frames=20, window_size=1)
    with pytest.raises(ValueError, match="larger than num_frames"):
        ours("x", num_frames=8, window_size=16)


def _unet_frames(pipe, **kwargs):
    """Frames of every UNet call of one generation, and its latents."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
    try:
        out = pipe(generator=gen(), output_type="latent", **kwargs).frames
    finally:
        hook.remove()
    return seen, out


def test_clips_up_to_24_frames_run_at_once_like_diffusers(ours, reference):
    """Catches a fixed 16-frame default window: Zeroscope's 24-frame clips ran three overlapping windows (twice the
    UNet work) and gave another video than diffusers'."""
    args = dict(prompt="a boat", num_frames=24, height=16, width=16, num_inference_steps=2)
    seen, got = _unet_frames(ours, **args)
    assert set(seen) == {24}, seen  # one call per CFG step over all 24 frames, no windows
    ref = reference(generator=gen(), output_type="latent", **args).frames
    assert ((torch.as_tensor(ref) - got).abs().max() / torch.as_tensor(ref).abs().max()).item() < 1e-4


def test_long_clips_window_at_the_checkpoint_training_length(tiny_checkpoint, tmp_path):
    """ModelScope trained on 16 frames, Zeroscope v2 on 24: a 32-frame clip runs windows of that length (catches one
    window size for every checkpoint); the diffusers-named class keeps all frames at once."""
    from vidfusion import TextToVideoPipeline, TextToVideoSDPipeline
    from vidfusion.checkpoints.loading import training_frames

    assert training_frames("cerspense/zeroscope_v2_576w", tmp_path) == 24
    assert training_frames("/models/original", tmp_path / "zs2_XL") == 24
    assert training_frames("damo-vilab/text-to-video-ms-1.7b", tmp_path) == 16
    zeroscope = tmp_path / "zeroscope_v2_576w"
    zeroscope.symlink_to(tiny_checkpoint)
    args = dict(prompt="a boat", num_frames=32, height=16, width=16, num_inference_steps=1)
    for cls, folder, window in ((TextToVideoPipeline, tiny_checkpoint, 16), (TextToVideoPipeline, zeroscope, 24),
                                (TextToVideoSDPipeline, zeroscope, 32)):
        pipe = cls.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        assert max(_unet_frames(pipe, **args)[0]) == window, (cls, folder)
    assert max(_unet_frames(pipe, window_size=8, **args)[0]) == 8  # overridable


def test_windowed_batch_equals_one_call_per_video(ours):
    """Catches FreeNoise's rescheduling drawing every video's permutations from generator[0]: videos after the first
    got the first one's shuffles, so a batch of 3 at 2x the window differed from three single calls."""
    args = dict(num_frames=16, height=16, width=16, num_inference_steps=2, window_size=8, output_type="latent")
    batch = ours(["a red car", "a blue boat"], num_videos_per_prompt=2, generator=[gen(s) for s in range(4)],
                 **args).frames
    prompts = ["a red car", "a red car", "a blue boat", "a blue boat"]
    for i, prompt in enumerate(prompts):
        single = ours(prompt, generator=gen(i), **args).frames
        assert torch.allclose(batch[i:i + 1], single, atol=1e-5, rtol=1e-4), i


RSS_SCRIPT = """
import resource, sys, torch
from vidfusion import TextToVideoPipeline
pipe = TextToVideoPipeline.from_pretrained(sys.argv[1]); pipe.set_progress_bar_config(disable=True)
pipe("warm up", num_frames=8, height=64, width=64, num_inference_steps=1, output_type="latent")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pipe("long", num_frames=int(sys.argv[2]), height=64, width=64, num_inference_steps=1, window_size=8, window_stride=4,
     output_type="latent")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_long_video_peak_memory_is_flat_in_num_frames(tiny_checkpoint):
    growth = {}
    for frames in (32, 96):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tiny_checkpoint), str(frames)],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        growth[frames] = float(out.stdout.strip().splitlines()[-1])
    # measured: windows 24 -> 34 MB; whole-clip UNet calls (window_size=200) 232 -> 751 MB
    assert growth[96] < growth[32] + 40, growth


def test_loop_makes_the_last_frame_flow_into_the_first(ours):
    frames = ours("waves", num_frames=12, height=32, width=32, num_inference_steps=4, window_size=6,
                  window_stride=2, loop=True, generator=gen(3)).frames[0]
    steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    seam = np.abs(frames[0] - frames[-1]).mean()
    assert seam <= 1.5 * steps.mean(), (seam, steps)


def test_prompt_travel(ours):
    single = ours({0: "a red car"}, **{k: v for k, v in BASE.items() if k != "prompt"}, generator=gen(),
                  output_type="latent").frames
    plain = ours("a red car", **{k: v for k, v in BASE.items() if k != "prompt"}, generator=gen(),
                 output_type="latent").frames
    assert_latents_close(plain, single)  # one keyframe == the plain prompt
    contexts = []
    hook = ours.unet.register_forward_pre_hook(lambda m, args: contexts.append(args[2]))
    try:
        ours({0: "a red car", 2: "a blue boat"}, **{k: v for k, v in BASE.items() if k != "prompt"},
             generator=gen(), output_type="latent")
    finally:
        hook.remove()
    # the text each frame sees: the keyframe prompts' embeddings at the keyframes, their mean half-way (frame 1)
    per_frame = contexts[0][3:]  # (F, 77, D): the conditional half under CFG
    red, blue = (ours.encode_prompt([p], None, False) [0] for p in ("a red car", "a blue boat"))
    assert torch.allclose(per_frame[0], red, atol=1e-6) and torch.allclose(per_frame[2], blue, atol=1e-6)
    assert torch.allclose(per_frame[1], (red + blue) / 2, atol=1e-6)
    w = keyframe_weights([0, 4, 8], 10)
    assert torch.allclose(w.sum(1), torch.ones(10)) and w[2].tolist() == [0.5, 0.5, 0] and w[9].tolist() == [0, 0, 1]
    for bad in ({5: "x"}, {-1: "x"}, {}, {0: 3}):
        with pytest.raises(ValueError, match="keyframe"):
            ours(bad, num_frames=3)


def test_free_init(ours):
    assert free_init_filter((4, 8, 8), "ideal").max() == 1
    for kind in ("gaussian", "butterworth", "ideal"):
        mask = free_init_filter((8, 16, 16), kind, 0.25, 0.25)
        assert mask.shape == (8, 16, 16) and mask[4, 8, 8] == 1 and mask[0, 0, 0] < 0.5  # low pass, centred
    # FreeInit's defining property (the paper; diffusers' _apply_freq_filter): the second pass starts from the
    # first pass's result diffused back to t=T, keeping its low frequencies (an ideal filter makes it exact)
    steps, results = [], []
    # (even sizes: the published mask is then symmetric, so taking the real part after the inverse FFT is exact)
    inputs, _ = _first_unet_inputs(ours, **{**BASE, "num_frames": 4}, sampler="ddim", free_init_iterations=2,
                                   free_init_filter="ideal",
                                   callback=lambda i, t, x: (steps.append(i), results.append(x.clone())))
    assert steps == list(range(6))
    from vidfusion.sampling.schedules import alphas_cumprod

    a_t = alphas_cumprod(ours.scheduler.options)[-1]
    start_noise, restart = inputs[0], inputs[3]  # DDIM's first input is the noise itself (init sigma 1)
    diffused = a_t.sqrt() * results[2] + (1 - a_t).sqrt() * start_noise
    mask = free_init_filter(tuple(start_noise.shape[2:]), "ideal", 0.25, 0.25)
    assert 0 < mask.sum() < mask.numel()

    def low(x):
        dims = (-3, -2, -1)
        return torch.fft.fftshift(torch.fft.fftn(x.double(), dim=dims), dim=dims) * mask

    assert (low(restart) - low(diffused)).abs().max() < 1e-4 * low(diffused).abs().max()
    assert (restart - diffused).abs().max() > 0.1  # the high frequencies are fresh noise
    with pytest.raises(ValueError, match="free_init_filter"):
        ours(**BASE, free_init_iterations=2, free_init_filter="box")


def test_callback_on_step_end_replaces_latents_and_stops(ours):
    calls = []

    def zero_then_stop(pipe, step, timestep, state):
        calls.append((step, int(timestep)))
        if step == 0:
            return {"latents": torch.zeros_like(state["latents"])}
        return {"stop": True}

    out = ours(**BASE, sampler="ddim", generator=gen(), callback_on_step_end=zero_then_stop,
               output_type="latent").frames
    assert [c[0] for c in calls] == [0, 1]  # stopped after step 1 of 3
    # after zeroing, DDIM's next step starts from zeros: the result differs from an untouched 2-step-stop run
    untouched = ours(**BASE, sampler="ddim", generator=gen(), output_type="latent",
                     callback_on_step_end=lambda p, s, t, st: {"stop": True} if s == 1 else None).frames
    assert not torch.allclose(out, untouched)
    first_step = []
    full = ours(**BASE, generator=gen(), output_type="latent",
                callback_on_step_end=lambda p, s, t, st: first_step.append(st["latents"].clone()) if s == 0 else None)
    stopped = ours(**BASE, generator=gen(), output_type="latent",
                   callback_on_step_end=lambda p, s, t, st: p.interrupt()).frames
    assert torch.equal(stopped, first_step[0]) and not torch.equal(stopped, full.frames)  # what it had after step 0
    # an interrupt that lands just before a call starts (a cancel racing the start) is not lost: that call stops
    # after its first step; the call after it runs in full
    ours.interrupt()
    assert torch.equal(ours(**BASE, generator=gen(), output_type="latent").frames, first_step[0])
    assert torch.equal(ours(**BASE, generator=gen(), output_type="latent").frames, full.frames)
    frames = ours(**BASE, generator=gen(), callback_on_step_end=lambda p, s, t, st: p.interrupt()).frames
    assert np.abs(frames - ours.decode_latents(first_step[0]).permute(0, 1, 3, 4, 2).numpy() / 2 - 0.5).max() < 1e-5
    with pytest.raises(ValueError, match="shape"):
        ours(**BASE, callback_on_step_end=lambda p, s, t, st: {"latents": torch.zeros(1)})


def test_preview_is_uint8_frames(ours):
    latents = torch.randn(2, 4, 3, 8, 8)
    preview = ours.preview(latents)
    assert preview.shape == (2, 3, 8, 8, 3) and preview.dtype == np.uint8
    with pytest.raises(ValueError, match="preview"):
        ours.preview(torch.randn(4, 8, 8))


def test_batches_equal_videos_made_one_by_one(ours):
    args = {k: v for k, v in BASE.items() if k != "prompt"}
    batch = ours(["a fox", "a dog"], num_videos_per_prompt=2, generator=[gen(i) for i in range(4)],
                 output_type="latent", **args).frames
    assert batch.shape[0] == 4
    for i, prompt in enumerate(["a fox", "a fox", "a dog", "a dog"]):
        one = ours(prompt, generator=gen(i), output_type="latent", **args).frames
        assert_latents_close(one, batch[i:i + 1])
    with pytest.raises(ValueError, match="generators"):
        ours(["a fox", "a dog"], num_videos_per_prompt=2, generator=[gen(0)] * 3, **args)
    with pytest.raises(ValueError, match="num_videos_per_prompt"):
        ours("a fox", num_videos_per_prompt=0, **args)


def test_one_negative_prompt_for_every_prompt(ours):
    args = {k: v for k, v in BASE.items() if k != "prompt"}
    both = ours(["a fox", "a dog"], "blurry", generator=[gen(0), gen(1)], output_type="latent", **args).frames
    listed = ours(["a fox", "a dog"], ["blurry", "blurry"], generator=[gen(0), gen(1)], output_type="latent",
                  **args).frames
    assert torch.equal(both, listed)
    travel = ours({0: "a fox", 2: "a dog"}, "blurry", generator=gen(), output_type="latent", **args).frames
    assert travel.shape == (1, 4, 3, 16, 16)
    with pytest.raises(ValueError, match="entries"):
        ours(["a fox", "a dog"], ["blurry"], **args)


def test_guidance_interval_runs_cfg_only_inside_it(ours):
    """Kynkaanniemi et al. 2024: classifier-free guidance only for sigma in [lo, hi]; outside, one UNet pass on the
    conditional batch. Catches guidance applied everywhere (2 passes each step) or an interval that changes the
    guided steps: an interval covering every step gives today's video bit for bit, one covering none the
    unguided video (guidance 1)."""
    args = dict(prompt="a cat", num_frames=3, height=16, width=16, num_inference_steps=6, sampler="dpmpp-2m")
    calls = []
    hook = ours.unet.register_forward_pre_hook(lambda m, a: calls.append((a[0].shape[0], float(a[1]))))
    try:
        out = ours(generator=gen(), output_type="latent", guidance_interval=(1.0, 10.0), **args).frames
    finally:
        hook.remove()
    from vidfusion.sampling.schedules import NoiseSchedule, sampler_options

    schedule = NoiseSchedule.create(sampler_options("dpmpp-2m", dict(ours.scheduler.config)), 6)
    inside = [1.0 <= schedule.sigma_at(t) <= 10.0 for _, t in calls]
    assert 0 < sum(inside) < len(calls)  # the interval splits this schedule
    assert [b for b, _ in calls] == [2 if i else 1 for i in inside]
    plain = ours(generator=gen(), output_type="latent", **args).frames
    everywhere = ours(generator=gen(), output_type="latent", guidance_interval=(0.0, 1e9), **args).frames
    assert torch.equal(everywhere, plain) and not torch.equal(out, plain)
    nowhere = ours(generator=gen(), output_type="latent", guidance_interval=(1e8, 1e9), **args).frames
    unguided = ours(generator=gen(), output_type="latent", guidance_scale=1.0, **args).frames
    assert torch.allclose(nowhere, unguided, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="guidance_interval"):
        ours(guidance_interval=(5.0, 1.0), **args)
