"""LoRA support, by concept: file formats -> one internal form (lora_formats.py) and the adapter state of a
pipeline (adapters.py). This module keeps the public names importable from `vidfusion.lora`, and `apply_loras`."""

from __future__ import annotations

from typing import Any

from ..checkpoints.published import TURBO_LORA
from ..errors import LoraError
from ..media.metadata import lora_settings
from .adapters import LoraAdapters
from .formats import AdaptableLayers, Adapter, LoraFile, LoraLayer, build_adapter, list_candidates, read_lora_file

__all__ = ["AdaptableLayers", "Adapter", "LoraAdapters", "LoraError", "LoraFile", "LoraLayer", "adapter_weights",
           "apply_loras", "build_adapter", "list_candidates", "read_lora_file"]


def apply_loras(pipe: Any, loras: list[tuple[str, float]], weight_name: str | None = None, target: str | None = None,
                turbo: bool = False) -> dict[str, Any]:
    """Load each (path or hub id, weight) LoRA into `pipe`, and T2V-Turbo's with `turbo`; returns what a video made
    with them records (metadata.lora_settings). The one way the CLI, the service and batch workers do it."""
    for path, weight in loras:
        pipe.load_lora_weights(path, weight_name=weight_name, scale=weight, target=target)
    if turbo:
        pipe.load_lora_weights(TURBO_LORA[0], weight_name=TURBO_LORA[1], adapter_name="t2v-turbo")
    return lora_settings(loras, weight_name, target, turbo)


def adapter_weights(pipe: Any) -> dict[str, float]:
    """The switchable (unfused) adapters `pipe` uses now -> their weights."""
    return dict(pipe._lora.active)
