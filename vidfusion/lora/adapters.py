"""LoRA adapter state of one pipeline: load (any format, via formats.py), switch, fuse, unfuse, unload.

Adapters are applied by merging: a touched weight is `original + sum(weight_a * delta_a)` over the active adapters,
one addmm per adapter in the weight's own precision where its matmuls are fast (products accumulated in float32,
rounded once; `merge_dtype`), else in float32, and written in place (layout, compiled graphs and the oneDNN path
stay valid), so an adapter costs nothing per step. The original of every touched weight is kept on the CPU:
switching adapters re-merges from it, and unloading restores it bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.layers import Linear, Upsample, fuse_upsample_convs
from .formats import AdaptableLayers, Adapter, LoraFile, build_adapter


class LoraAdapters:
    """The adapters loaded into one pipeline, their weights, and the original weights they replace."""

    def __init__(self) -> None:
        self.adapters: dict[str, Adapter] = {}
        self.active: dict[str, float] = {}  # switchable adapters in use -> weight
        self.fused: dict[str, float] = {}  # adapters fused by fuse_lora() -> weight (unaffected by set_adapters)
        self.originals: dict[str, torch.Tensor] = {}  # layer path -> its original weight (CPU copy)
        self.created_cond_proj = False

    def load(self, models: dict[str, nn.Module], lora: LoraFile, name: str | None, scale: float,
             target: str | None) -> str:
        if name is None:
            stem = Path(lora.source).stem or "adapter"
            name = stem if stem not in self.adapters else f"{stem}_{len(self.adapters)}"
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; pass another adapter_name or unload it")
        _check_weight(scale, "scale")
        adapter = build_adapter(lora, AdaptableLayers(models), name, target)
        if adapter.guidance_embedding_dim is not None:
            self._add_cond_proj(models["unet"], adapter.guidance_embedding_dim)
        self.adapters[name] = adapter
        self.active[name] = float(scale)
        self.apply(models)
        return name

    def _add_cond_proj(self, unet: nn.Module, dim: int) -> None:
        """T2V-Turbo's guidance embedding: a bias-free Linear dim -> C whose base weight is not published (zero)."""
        embedding = unet.time_embedding
        if embedding.cond_proj is not None:
            return
        ref = embedding.linear_1.weight
        cond_proj = Linear(dim, embedding.linear_1.in_features, bias=False, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(cond_proj.weight)
        embedding.cond_proj = cond_proj.requires_grad_(False)
        self.created_cond_proj = True

    def set_adapters(self, models: dict[str, nn.Module], names: str | list[str],
                     weights: float | list[float] | None = None) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"unknown adapter(s) {', '.join(unknown)}; loaded: {', '.join(self.adapters) or 'none'}")
        fused = [n for n in names if n in self.fused]
        if fused:
            raise ValueError(f"adapter(s) {', '.join(fused)} are fused; call unfuse_lora() first")
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, (int, float)):
            weights = [float(weights)] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} weights for {len(names)} adapters")
        for w in weights:
            _check_weight(w, "adapter weight")
        self.active = {n: float(w) for n, w in zip(names, weights)}
        self.apply(models)

    def fuse(self, models: dict[str, nn.Module], lora_scale: float, names: list[str] | None) -> None:
        names = list(self.active) if names is None else names
        unknown = [n for n in names if n not in self.active]
        if unknown:
            raise ValueError(f"cannot fuse {', '.join(unknown)}: not an active adapter (active: "
                             f"{', '.join(self.active) or 'none'})")
        for n in names:
            self.fused[n] = self.active.pop(n) * lora_scale
        self.apply(models)

    def unfuse(self, models: dict[str, nn.Module]) -> None:
        self.active.update(self.fused)
        self.fused.clear()
        self.apply(models)

    def unload(self, models: dict[str, nn.Module]) -> None:
        self.adapters.clear()
        self.active.clear()
        self.fused.clear()
        self.apply(models)
        if self.created_cond_proj:
            models["unet"].time_embedding.cond_proj = None
            self.created_cond_proj = False

    def apply(self, models: dict[str, nn.Module]) -> None:
        """Write original + sum of the applied adapters' deltas into every layer any loaded adapter touches, and
        the original back into layers no adapter touches any more."""
        weights = {**self.active, **self.fused}
        touched = {path for adapter in self.adapters.values() for path in adapter.layers}
        with torch.no_grad():
            for path in sorted(touched | set(self.originals)):
                component, name = path.split(".", 1)
                module = models[component].get_submodule(name)
                weight = module.weight
                if path not in self.originals:  # on CPU the weight tensor itself (_set_weight never writes into it)
                    cpu = weight.device.type == "cpu"
                    self.originals[path] = weight.detach() if cpu else weight.detach().to("cpu", copy=True)
                original = self.originals[path]
                contributions = [(self.adapters[a].layers[path], w) for a, w in weights.items()
                                 if path in self.adapters[a].layers and w != 0]
                if contributions:
                    merged = original.to(weight.device, _product_dtype(weight))  # plus() never writes into it
                    for layer, w in contributions:
                        merged = layer.plus(merged, w)
                    _set_weight(module, merged)
                else:
                    _set_weight(module, original)
                if path not in touched:
                    del self.originals[path]
                parent = models[component].get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
                if isinstance(parent, Upsample):
                    fuse_upsample_convs(parent)  # its phase kernels are computed from the 3x3 weight

    @contextlib.contextmanager
    def scaled(self, models: dict[str, nn.Module], scale: float | None) -> Iterator[None]:
        """The active (unfused) adapters at `scale` times their weights for the duration (diffusers'
        cross_attention_kwargs={"scale": s}); their weights come back afterwards, whatever happens."""
        if scale is None or scale == 1.0 or not self.active:
            yield
            return
        _check_weight(scale, "cross_attention_kwargs['scale']")
        weights = dict(self.active)
        self.set_adapters(models, list(weights), [w * scale for w in weights.values()])
        try:
            yield
        finally:
            self.set_adapters(models, list(weights), list(weights.values()))

    def applied(self) -> list[str]:
        return [n for n in {**self.active, **self.fused} if n in self.adapters]


def _set_weight(module: nn.Module, value: torch.Tensor) -> None:
    """module.weight := value. On CPU the module is handed a tensor (value itself when it has the weight's dtype and
    layout, else a copy in them), so the original weight is kept without a backup copy and restored without one;
    elsewhere value is copied into the weight (the backup stays in CPU memory)."""
    weight = module.weight
    if hasattr(module, "_kernels"):  # winograd.WinogradConv2d's kernels of the old weight (its address may be reused)
        module._kernels = None
    if weight.device.type != "cpu":
        weight.copy_(value)
    elif value.dtype == weight.dtype and value.stride() == weight.stride():
        weight.data = value
    else:
        weight.data = torch.empty_like(weight).copy_(value)


def _product_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a merge into this weight runs in (the products accumulate in float32 either way): the weight's own
    where its matmuls are fast (float32, bfloat16 anywhere, float16 on GPUs), else float32."""
    if weight.dtype == torch.bfloat16 or (weight.dtype == torch.float16 and weight.device.type != "cpu"):
        return weight.dtype
    return torch.float32


def _check_weight(value: Any, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
