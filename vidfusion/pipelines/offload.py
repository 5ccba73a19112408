"""CPU offload: whole models (one on the accelerator at a time) or submodule by submodule."""

from __future__ import annotations

import torch
from torch import nn

from ..models.layers import Downsample, ResnetBlock, TimestepEmbedding, Upsample
from ..models.unet3d import TemporalConvLayer, Transformer2D, TransformerTemporal
from ..models.vae import VAEAttention

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


class OffloadState:
    """Where a pipeline's models wait between uses: all on their device (`mode` None), model offload (each whole
    model moved to `device` while it runs, one at a time) or sequential offload (hooks move each unit)."""

    def __init__(self) -> None:
        self.mode: str | None = None  # None | "model" | "sequential"
        self.device: torch.device | None = None
        self._sequential: SequentialOffload | None = None

    def disable(self) -> None:
        if self._sequential is not None:
            self._sequential.remove()
            self._sequential = None
        self.mode, self.device = None, None

    def enable_model(self, models: list[nn.Module], target: torch.device) -> None:
        self.disable()
        for model in models:
            model.to("cpu")
        self.mode, self.device = "model", target

    def enable_sequential(self, models: list[nn.Module], target: torch.device) -> None:
        self.disable()
        self._sequential = SequentialOffload(models, target)
        self.mode, self.device = "sequential", target

    def activate(self, model: nn.Module, models: list[nn.Module]) -> None:
        """Model offload: `model` onto the device, the others back to the CPU."""
        if self.mode == "model":
            for other in models:
                if other is not model:
                    other.to("cpu")
            model.to(self.device)

    def release(self, models: list[nn.Module]) -> None:
        if self.mode == "model":
            for model in models:
                model.to("cpu")
