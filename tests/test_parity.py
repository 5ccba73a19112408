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


CASES = {
    "no-cfg": dict(BASE, guidance_scale=1.0),
    "negative-prompt": dict(BASE, negative_prompt="blurry, low quality"),
    "two-prompts": dict(BASE, prompt=["a cat is surfing", "a dog on the beach"], negative_prompt=["blurry", "low"]),
    "odd-size-and-frames": dict(BASE, height=40, width=56, num_frames=5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generation_options_match_diffusers(reference, ours, case):
    kwargs = CASES[case]
    assert_latents_close(run_reference(reference, "ddim", output_type="latent", **kwargs),
                         run_ours(ours, "ddim", output_type="latent", **kwargs))
    ref, got = run_reference(reference, "dpmpp-2m", **kwargs), run_ours(ours, "dpmpp-2m", **kwargs)
    assert got.shape == ref.shape
    assert np.abs(ref - got).max() < 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "euler-ancestral"])
def test_ancestral_noise_matches_diffusers_for_a_batch(reference, ours, sampler):
    kwargs = dict(BASE, prompt=["a cat is surfing", "a dog"], num_frames=3)
    extra = {"eta": 0.7} if sampler == "ddim" else {}
    assert_latents_close(run_reference(reference, sampler, output_type="latent", **kwargs, **extra),
                         run_ours(ours, sampler, output_type="latent", **kwargs, **extra))


def test_prompt_embeds_and_global_rng_match_diffusers(reference, ours):
    ids = reference.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = reference.text_encoder(ids)[0]
    kwargs = dict(num_frames=2, height=32, width=32, num_inference_steps=3, output_type="latent")
    torch.manual_seed(7)
    ref = reference(prompt_embeds=embeds, **kwargs).frames
    torch.manual_seed(7)
    got = ours(prompt_embeds=embeds, **kwargs).frames
    assert_latents_close(ref, got)


def test_output_types(ours):
    kwargs = dict(BASE, num_frames=2, num_inference_steps=2)
    pt = run_ours(ours, "ddim", output_type="pt", **kwargs)
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 2, 3, 32, 32)
    pil = run_ours(ours, "ddim", output_type="pil", **kwargs)
    assert len(pil) == 1 and len(pil[0]) == 2 and pil[0][0].size == (32, 32)
    latent = run_ours(ours, "ddim", output_type="latent", **kwargs)
    assert latent.shape == (1, 4, 2, 16, 16)  # the tiny VAE downsamples by 2
    arr = run_ours(ours, "ddim", **kwargs)
    assert arr.min() >= 0 and arr.max() <= 1
    np.testing.assert_allclose(arr, pt.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    out = ours("a cat", num_frames=2, height=32, width=32, num_inference_steps=2, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 2, 32, 32, 3)


def test_clip_skip_uses_an_earlier_layer_then_the_final_norm(reference, ours):
    # diffusers' own clip_skip path is broken with transformers 5 (no `.text_model`), so check the formula
    ids = reference.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = reference.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = reference.text_encoder.final_layer_norm(hidden[-2])
        got = ours.encode_prompt(["a cat"], None, False, clip_skip=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
