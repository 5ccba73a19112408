"""CPU offload: whole models (one on the accelerator at a time) or submodule by submodule."""

from __future__ import annotations

import torch
from torch import nn

from .layers import Downsample, ResnetBlock, TimestepEmbedding, Upsample
from .unet3d import TemporalConvLayer, Transformer2D, TransformerTemporal
from .vae import VAEAttention

# Modules whose forward is called as a whole; their weights travel to the device for that call only.
_UNITS: tuple[type[nn.Module], ...] = (ResnetBlock, TemporalConvLayer, Transformer2D, TransformerTemporal, Downsample,
                                       Upsample, VAEAttention, TimestepEmbedding, nn.Conv2d, nn.Embedding)


class NoAcceleratorError(ValueError, RuntimeError):
    """Offload asked for on a machine without an accelerator: a bad argument (CLI exit 2); a RuntimeError as in
    diffusers."""


def offload_device(gpu_id: int | None, device: str | torch.device | None) -> torch.device:
    """The accelerator to offload to; a clear error when there is none and no device was given."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_id or 0)
    raise NoAcceleratorError(
        "CPU offload needs an accelerator and none is available (torch.cuda.is_available() is False); "
        "run without offload, or pass device= explicitly"
    )


def _is_text_layer(module: nn.Module) -> bool:
    return type(module).__name__ in ("CLIPEncoderLayer",)


def _units(model: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, _UNITS) or _is_text_layer(child):
                found.append(child)
            else:
                walk(child)

    walk(model)
    return found


class SequentialOffload:
    """Keeps each unit's weights on the CPU and moves them to `device` only around its forward."""

    def __init__(self, models: list[nn.Module], device: torch.device):
        self.device = device
        self.handles = []
        for model in models:
            model.to(device)  # small leftovers (norms used functionally, embeddings) stay resident
            for unit in _units(model):
                unit.to("cpu")
                self.handles.append(unit.register_forward_pre_hook(self._load))
                self.handles.append(unit.register_forward_hook(self._unload))

    def _load(self, module: nn.Module, args) -> None:
        module.to(self.device)

    def _unload(self, module: nn.Module, args, output) -> None:
        module.to("cpu")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
