"""Which layout a checkpoint is in, and its parts: a diffusers folder or hub id (loading.py) or an original
ModelScope folder (original_format.py), as one `Checkpoint` the pipelines are built from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..sampling.schedulers import Scheduler, scheduler_from_checkpoint
from . import loading
from .original_format import is_original_folder, load_original


@dataclass
class Checkpoint:
    folder: Path
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Scheduler
    training_frames: int  # the clip length it was trained on (16 ModelScope, 24 Zeroscope v2)

    def components(self) -> dict[str, Any]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "scheduler": self.scheduler}


def pipeline_class_name(folder: Path) -> str:
    """The pipeline a resolved checkpoint folder names: model_index.json's _class_name (an original folder is a
    text-to-video one)."""
    if is_original_folder(folder):
        return "TextToVideoSDPipeline"
    return loading.read_model_index(folder).get("_class_name")


def load_checkpoint(name_or_path: str | os.PathLike, dtype: torch.dtype, variant: str | None = None,
                    revision: str | None = None, vae: str | os.PathLike | None = None,
                    text_encoder: str | os.PathLike | None = None) -> Checkpoint:
    """Every part of a diffusers folder / hub id or an original folder (`vae=` / `text_encoder=` supply parts an
    original folder lacks), built strictly in `dtype`."""
    folder = loading.resolve_checkpoint(name_or_path, variant, revision)
    if is_original_folder(folder):
        parts = load_original(folder, dtype, vae, text_encoder)
    else:
        if vae is not None or text_encoder is not None:
            raise ValueError("vae= / text_encoder= complete original ModelScope folders; this is a diffusers one")
        parts = loading.load_diffusers(folder, dtype, variant)
    try:
        scheduler = scheduler_from_checkpoint(parts.pop("scheduler_config"), f"{folder}: scheduler config")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return Checkpoint(folder=folder, **parts, scheduler=scheduler,
                      training_frames=loading.training_frames(name_or_path, folder))
