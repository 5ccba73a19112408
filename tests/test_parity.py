"""The backbone: the same checkpoint and seed give diffusers' latents and frames, for every sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def run_reference(reference, sampler, seed=0, **kwargs):
    import diffusers

    original = reference.scheduler
    cls_name, extra = SCHEDULERS[sampler]
    reference.scheduler = getattr(diffusers, cls_name).from_config(original.config, **extra)
    try:
        return reference(generator=torch.Generator().manual_seed(seed), **kwargs).frames
    finally:
        reference.scheduler = original


def run_ours(ours, sampler, seed=0, **kwargs):
    return ours(generator=torch.Generator().manual_seed(seed), sampler=sampler, **kwargs).frames


def assert_latents_close(ref, got):
    ref, got = torch.as_tensor(ref), torch.as_tensor(got)
    assert ref.shape == got.shape
    rel = ((ref - got).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"latents differ: max relative error {rel:.2e}"


BASE = dict(prompt="a cat is surfing", num_frames=3, height=32, width=32, num_inference_steps=4)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_latents_and_frames_match_diffusers(reference, ours, sampler):
    assert_latents_close(run_reference(reference, sampler, output_type="latent", **BASE),
                         run_ours(ours, sampler, output_type="latent", **BASE))
    ref = run_reference(reference, sampler, **BASE)
    got = run_ours(ours, sampler, **BASE)
    assert got.shape == ref.shape == (1, 3, 32, 32, 3) and got.dtype == np.float32
    assert np.abs(ref - got).max() < 1e-3
