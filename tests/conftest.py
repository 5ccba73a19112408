"""Tiny random checkpoints in the published layout, written by diffusers itself (the reference)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

from vidfusion.random_checkpoint import PUBLISHED_SCHEDULER, write_clip_tokenizer

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("diffusers").setLevel(logging.ERROR)

TINY_UNET = dict(
    sample_size=8,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=8,
)
TINY_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                 vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)


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
