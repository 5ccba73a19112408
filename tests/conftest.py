"""Tiny random checkpoints in the published layout, written by diffusers itself (the reference)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from pathlib import Path

import pytest
import torch

from vidfusion.checkpoints.random_checkpoint import PUBLISHED_SCHEDULER, write_clip_tokenizer
from vidfusion.models import config

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("diffusers").setLevel(logging.ERROR)

def _diffusers_kwargs(cfg, cls) -> dict:
    """A vidfusion config dataclass as keyword arguments of the diffusers model class (its config.json keys)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items() if k in accepted}


def _tiny_kwargs():
    """The tiny preset of vidfusion.models.config (the one definition of the tiny shapes), as diffusers / transformers
    arguments; the test UNet uses 8-dimensional heads (4 in the preset) so both head layouts are exercised."""
    from diffusers import AutoencoderKL, UNet3DConditionModel

    unet = {**_diffusers_kwargs(config.TINY_UNET, UNet3DConditionModel), "attention_head_dim": 8}
    clip = {k: v for k, v in config.TINY_TEXT_ENCODER.items() if k not in ("architectures", "model_type")}
    return unet, _diffusers_kwargs(config.TINY_VAE, AutoencoderKL), clip


TINY_UNET, TINY_VAE, TINY_CLIP = _tiny_kwargs()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """diffusers zero-initialises some layers (the last temporal conv); give every weight random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                scale = 0.2 / max(p[0].numel(), 1) ** 0.5 if p.dim() > 1 else 0.05
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def make_reference_pipeline(folder: Path, scheduler_config: dict | None = None):
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet3DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    for i, m in enumerate((unet, vae, text)):
        _randomize(m, i)
    write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    config = {k: v for k, v in (scheduler_config or PUBLISHED_SCHEDULER).items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(config)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(folder))
    # keep the scheduler config exactly as published (diffusers would write every default out)
    import json

    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config or PUBLISHED_SCHEDULER))
    return pipe


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-t2v")
    make_reference_pipeline(folder)
    return folder


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """diffusers' TextToVideoSDPipeline loaded from the same files."""
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(str(tiny_checkpoint))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ours(tiny_checkpoint):
    from vidfusion import TextToVideoPipeline

    pipe = TextToVideoPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe
