"""Step caching (step_cache.py): DeepCache and Faster Diffusion's encoder propagation against references written
from the papers on diffusers' own UNet3DConditionModel — its modules wrapped to return their output of the last
full step, as DeepCache's published helper does — with the same random weights, sampler and seed."""

from __future__ import annotations

import pytest
import torch

from vidfusion.sampling.step_cache import FASTER_DIFFUSION_KEYS_50, CacheSettings, full_steps

from .test_parity import assert_latents_close

BASE = dict(prompt="a cat is surfing", num_frames=3, height=32, width=32, output_type="latent")


class ModuleCache:
    """DeepCache's helper, for diffusers' UNet3D: `skipped(step) -> bool` per wrapped module; a skipped module
    returns what it returned at the last step it ran."""

    def __init__(self, unet, full: set[int]):
        self.unet, self.full, self.step, self.originals, self.outputs = unet, full, -1, {}, {}
        self.calls: dict[str, int] = {}
        forward = unet.forward

        def counted(*args, **kwargs):
            self.step += 1
            return forward(*args, **kwargs)

        self.originals["unet"] = (unet, forward)
        unet.forward = counted

    def wrap(self, name: str, module, skipped_when_cached: bool) -> None:
        forward = module.forward

        def wrapped(*args, **kwargs):
            if skipped_when_cached and self.step not in self.full:
                return self.outputs[name]
            self.calls[name] = self.calls.get(name, 0) + 1
            self.outputs[name] = forward(*args, **kwargs)
            return self.outputs[name]

        self.originals[name] = (module, forward)
        module.forward = wrapped

    def restore(self) -> None:
        for module, forward in self.originals.values():
            module.forward = forward


def layer_modules(block, i: int) -> list:
    mods = [block.resnets[i], block.temp_convs[i]]
    if hasattr(block, "attentions"):
        mods += [block.attentions[i], block.temp_attentions[i]]
    return mods


def deepcache_reference(unet, full: set[int], branch: int) -> ModuleCache:
    """DeepCache with skip branch `branch` (skip 0 = transformer_in's output): down layers making a skip deeper than
    `branch`, the mid block and up layers consuming such skips (and their upsamplers) return their cached output."""
    cache = ModuleCache(unet, full)
    skip = 0
    for b, block in enumerate(unet.down_blocks):
        for i in range(len(block.resnets)):
            skip += 1
            for j, module in enumerate(layer_modules(block, i)):
                cache.wrap(f"down{b}.{i}.{j}", module, skip > branch)
        if block.downsamplers:
            skip += 1
            cache.wrap(f"down{b}.ds", block.downsamplers[0], skip > branch)
    cache.wrap("mid", unet.mid_block, True)
    for b, block in enumerate(unet.up_blocks):
        for i in range(len(block.resnets)):
            for j, module in enumerate(layer_modules(block, i)):
                cache.wrap(f"up{b}.{i}.{j}", module, skip > branch)
            consumed = skip
            skip -= 1
        if block.upsamplers:
            cache.wrap(f"up{b}.us", block.upsamplers[0], consumed > branch)
    return cache


def faster_diffusion_reference(unet, full: set[int]) -> ModuleCache:
    """Encoder propagation: conv_in, transformer_in, every down block and the mid block return the key step's
    output; the decoder runs at every step."""
    cache = ModuleCache(unet, full)
    cache.wrap("conv_in", unet.conv_in, True)
    cache.wrap("transformer_in", unet.transformer_in, True)
    for b, block in enumerate(unet.down_blocks):
        cache.wrap(f"down{b}", block, True)
    cache.wrap("mid", unet.mid_block, True)
    for b, block in enumerate(unet.up_blocks):
        cache.wrap(f"up{b}", block, False)
    return cache


def reference_latents(reference, make_cache, steps: int, **kwargs):
    from diffusers import DDIMScheduler

    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    cache = make_cache(reference.unet)
    try:
        out = reference(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, **BASE, **kwargs)
    finally:
        cache.restore()
    return out.frames, cache


def ours_latents(ours, steps: int, **kwargs):
    return ours(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, sampler="ddim", **BASE,
                **kwargs).frames


@pytest.mark.parametrize("branch", [0, 1, 3])
def test_deepcache_equals_the_reference_loop(ours, reference, branch):
    """Interval 3: full steps 0, 3, 6, ...; in between only the shallow path. A cache that kept the wrong
    feature (an off-by-one branch, the upsampler's input instead of its output, stale shallow skips) or refreshed
    on the wrong steps fails the parity; the run also differs from the uncached one (the cache is used)."""
    steps = 10
    full = full_steps(CacheSettings("deepcache", 3, branch), steps)
    assert full == {0, 3, 6, 9}
    expected, cache = reference_latents(reference, lambda u: deepcache_reference(u, full, branch), steps)
    got = ours_latents(ours, steps, cache="deepcache", cache_interval=3, cache_branch=branch)
    assert_latents_close(expected, got)
    plain = ours_latents(ours, steps)
    # the uncached run is outside the parity tolerance (1e-4): it could not pass for the cached one
    assert (plain - got).abs().max() > 3e-4 * plain.abs().max()
    assert cache.calls["mid"] == len(full)


def test_faster_diffusion_equals_the_reference_loop(ours, reference):
    """50 steps: the encoder runs at the published key steps only, the decoder at every step."""
    full = full_steps(CacheSettings("faster-diffusion"), 50)
    assert full == set(FASTER_DIFFUSION_KEYS_50)
    expected, cache = reference_latents(reference, lambda u: faster_diffusion_reference(u, full), 50)
    got = ours_latents(ours, 50, cache="faster-diffusion")
    assert_latents_close(expected, got)
    assert cache.calls["down0"] == 9 and cache.calls["up0"] == 50


def test_interval_1_is_todays_video_and_cached_steps_skip_the_deep_blocks(ours, monkeypatch):
    """cache_interval=1 is bit-identical to no cache. With interval 3 the mid block runs at the full steps only
    and the deepest up block never on cached steps (a cache that computed everything and threw it away, or skipped
    nothing, fails the counts)."""
    plain = ours_latents(ours, 6)
    assert torch.equal(ours_latents(ours, 6, cache="deepcache", cache_interval=1), plain)
    calls = {"mid": 0, "up0": 0, "down_last": 0}
    for name, module in (("mid", ours.unet.mid_block), ("up0", ours.unet.up_blocks[0].resnets[0]),
                         ("down_last", ours.unet.down_blocks[-1].resnets[0])):
        forward = module.forward

        def counted(*args, _name=name, _forward=forward, **kwargs):
            calls[_name] += 1
            return _forward(*args, **kwargs)

        monkeypatch.setattr(module, "forward", counted)
    ours_latents(ours, 6, cache="deepcache", cache_interval=3, cache_branch=0)
    assert calls == {"mid": 2, "up0": 2, "down_last": 2}  # steps 0 and 3 only
    for key in calls:
        calls[key] = 0
    ours_latents(ours, 6, cache="faster-diffusion")
    assert calls["mid"] == calls["down_last"] == len(full_steps(CacheSettings("faster-diffusion"), 6))
    assert calls["up0"] == 6


def test_cache_errors_and_recorded_settings(ours):
    with pytest.raises(ValueError, match="few-step sampler lcm"):
        ours("x", sampler="lcm", cache="deepcache", num_frames=2, height=32, width=32)
    with pytest.raises(ValueError, match="cache_branch must be an integer in 0..3"):
        ours("x", cache="deepcache", cache_branch=4, num_frames=2, height=32, width=32)
    with pytest.raises(ValueError, match="cache must be one of deepcache, faster-diffusion"):
        ours("x", cache="tgate", num_frames=2, height=32, width=32)
    out = ours("x", cache="deepcache", cache_interval=2, num_inference_steps=2, num_frames=2, height=32, width=32)
    assert {k: out.settings[k] for k in ("cache", "cache_interval", "cache_branch")} == \
        {"cache": "deepcache", "cache_interval": 2, "cache_branch": 0}


def mid_calls(ours, monkeypatch, **kwargs) -> int:
    """How many times the mid block (run on full steps only) ran in one call of `ours`."""
    count = {"n": 0}
    forward = ours.unet.mid_block.forward

    def counted(*args, **kw):
        count["n"] += 1
        return forward(*args, **kw)

    monkeypatch.setattr(ours.unet.mid_block, "forward", counted)
    ours("x", height=32, width=32, **kwargs)
    monkeypatch.undo()
    return count["n"]


@pytest.mark.parametrize("sampler, plain, cached", [("heun", 11, 6), ("pndm", 7, 4), ("dpmpp-2m", 6, 3)])
def test_steps_are_the_samplers_steps(ours, monkeypatch, sampler, plain, cached):
    """Full steps 0, 2, 4 of 6 (interval 2) run every evaluation of those steps in full: heun's second evaluation
    and pndm's warm-up evaluation belong to their step (a counter of distinct timesteps got heun's steps wrong:
    its second evaluation shares the next step's timestep)."""
    args = dict(num_frames=2, num_inference_steps=6, sampler=sampler)
    assert mid_calls(ours, monkeypatch, **args) == plain
    assert mid_calls(ours, monkeypatch, cache="deepcache", cache_interval=2, **args) == cached


def test_windows_free_init_and_loops(ours, monkeypatch):
    """Windows of frames each keep their own cache (2 windows x full steps 0, 3), FreeInit passes start over
    (2 passes x that), and a looping clip — whose one window rotates over the frames at every call — is refused."""
    args = dict(num_frames=6, window_size=4, window_stride=2, num_inference_steps=6, sampler="ddim",
                cache="deepcache", cache_interval=3)
    assert mid_calls(ours, monkeypatch, **args) == 4
    assert mid_calls(ours, monkeypatch, free_init_iterations=2, **args) == 8
    kwargs = dict(args, num_frames=4, window_size=4, loop=True)
    with pytest.raises(ValueError, match="does not combine with loop=True"):
        ours("x", height=32, width=32, **kwargs)


def test_a_video_to_video_run_schedules_its_full_steps_over_the_steps_it_runs(ours, monkeypatch):
    """strength 0.5 of 20 steps runs 10: the quadratic schedule packs its full steps over those 10 (0, 3, 5, 9 of
    the run), not over the 20 of a whole generation (which put them at 0, 3, 6, 7 of the run)."""
    import numpy as np

    from vidfusion import VideoToVideoPipeline

    v2v = VideoToVideoPipeline.from_pipe(ours)
    evaluations, full = {"n": 0}, []
    unet_forward, mid_forward = ours.unet.forward, ours.unet.mid_block.forward

    def counted_unet(*args, **kw):
        evaluations["n"] += 1
        return unet_forward(*args, **kw)

    def counted_mid(*args, **kw):
        full.append(evaluations["n"] - 1)
        return mid_forward(*args, **kw)

    monkeypatch.setattr(ours.unet, "forward", counted_unet)
    monkeypatch.setattr(ours.unet.mid_block, "forward", counted_mid)
    video = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    v2v("x", video, strength=0.5, num_inference_steps=20, sampler="ddim", guidance_scale=1.0, cache="deepcache",
        cache_interval=3, cache_schedule="quadratic", output_type="latent")
    assert evaluations["n"] == 10
    assert full == sorted(full_steps(CacheSettings("deepcache", 3, 0, "quadratic"), 10)) == [0, 3, 5, 9]
