"""LoRA files: every published format -> one internal form (`Adapter`: {module path: LoraLayer}).

Formats (detected from the file): diffusers / PEFT state dicts, PEFT adapter folders, kohya / A1111, cloneofsimo
keyless lists (Text-To-Video-Finetuning, MotionDirector, T2V-Turbo) and sd-webui-text2video "Stable LoRA". Each
becomes an `Adapter`: {module path: LoraLayer(up, down, scale)}, paths in the pipeline's own module names
("unet.<diffusers name>", "text_encoder.<transformers name>").
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.hub import hub_folder, looks_like_repo_id
from ..checkpoints.naming import unet_name_to_diffusers
from ..checkpoints.state_files import read_state_file
from ..errors import CheckpointNotFoundError, LoraError, first_keys

LORA_FILE_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth", ".ckpt")
PREFERRED_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "unet_lora.pt",
                   "pytorch_lora_weights.bin", "adapter_model.bin")
# cloneofsimo `target=`: the ancestor classes whose layers the list covers (diffusers class -> ours)
LIST_TARGETS = {"unet": None, "spatial": "Transformer2D", "temporal": "TransformerTemporal"}
TARGET_LAYERS = (nn.Linear, nn.Conv2d, nn.Conv3d)


@dataclass
class LoraLayer:
    """delta = scale * (up @ down) seen as the weight's shape. up (out, r), down (r, fan_in) for the standard
    layout; `stable_view` for Stable LoRA convolutions, whose product is (out*k, in*k) viewed as
    (out, in, k, k[, 1]) and, for Conv3d (k,1,1), averaged over the second k (as sd-webui-text2video computes it)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    stable_view: tuple[int, ...] | None = None

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """scale * (up @ down) as a float32 weight of `shape`."""
        product = self.up.to(device, torch.float32).flatten(1) @ self.down.to(device, torch.float32).flatten(1)
        if self.stable_view is not None:
            product = product.view(self.stable_view)
            if len(self.stable_view) == 5:
                product = product.mean(dim=-2, keepdim=True)
        return product.reshape(shape) * self.scale

    def plus(self, base: torch.Tensor, weight: float) -> torch.Tensor:
        """base + weight * delta as a new tensor of base's dtype (base, a weight in the standard layout, is never
        changed): one addmm for the standard layout — the product accumulated in float32 and added before the one
        rounding to base's dtype, no product tensor, no extra passes over the weight."""
        if self.stable_view is not None:
            return (base.float() + self.delta(base.shape, base.device) * weight).to(base.dtype)
        order = _memory_order(base)  # channels-last convs: (out, kh, kw, in) is the contiguous order
        down = self.down.to(base.device, base.dtype)  # (r, in[, k...]) or (r, in * k...): as base's dims 1..
        down = down.reshape(down.shape[0], *base.shape[1:]).permute(order).reshape(down.shape[0], -1)
        flat = base.permute(order).reshape(base.shape[0], -1)  # a view when base is contiguous in that order
        merged = torch.addmm(flat, self.up.to(base.device, base.dtype).flatten(1), down, alpha=self.scale * weight)
        return merged.view([base.shape[i] for i in order]).permute(_inverse(order))  # base's shape and strides

    def check(self, weight_shape: torch.Size) -> str | None:
        """None if this layer fits a weight of that shape, else what is wrong."""
        up, down = self.up.flatten(1), self.down.flatten(1)
        if up.shape[1] != down.shape[0]:
            return f"up {tuple(self.up.shape)} and down {tuple(self.down.shape)} have different ranks"
        if self.stable_view is not None:
            fits = up.shape[0] * down.shape[1] == math.prod(self.stable_view)
        else:  # a conv's down has the conv's kernel; a linear's may carry trailing 1s (Conv1d-style saves)
            fits = up.shape[0] == weight_shape[0] and down.shape[1] == math.prod(weight_shape[1:])
            if self.down.dim() == len(weight_shape) > 2:
                fits = fits and tuple(self.down.shape[2:]) == tuple(weight_shape[2:])
        return None if fits else (f"up {tuple(self.up.shape)} @ down {tuple(self.down.shape)} does not fit the "
                                  f"weight {tuple(weight_shape)}")


def _memory_order(tensor: torch.Tensor) -> list[int]:
    """The dims in memory order, outermost first, when the output dim 0 is outermost (standard or channels-last
    weights); else the logical order."""
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))
    return order if order[0] == 0 else list(range(tensor.dim()))


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse


@dataclass
class Adapter:
    name: str
    format: str
    source: str
    layers: dict[str, LoraLayer]
    # T2V-Turbo: the UNet gains a guidance embedding (time_embedding.cond_proj, zero base weight) of this width
    guidance_embedding_dim: int | None = None


# ---- reading files --------------------------------------------------------------------------------------

@dataclass
class LoraFile:
    content: Any  # dict of tensors or a list of tensors
    source: str
    metadata: dict[str, str] = field(default_factory=dict)
    peft_config: dict[str, Any] | None = None


def _choose_file(names: list[str], where: str) -> str:
    candidates = sorted(n for n in names if n.endswith(LORA_FILE_SUFFIXES))
    for preferred in PREFERRED_NAMES:
        if preferred in candidates:
            return preferred
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise LoraError(f"{where}: no LoRA weights found (expected one of {', '.join(LORA_FILE_SUFFIXES)})")
    raise LoraError(f"{where}: several weight files ({', '.join(candidates[:8])}); pick one with weight_name=")


def read_lora_file(path_or_hub_id: str | Path, weight_name: str | None = None) -> LoraFile:
    """A LoRA file, a folder holding one (a PEFT adapter folder with adapter_config.json), or a hub id (fetched
    through the hub cache; `weight_name` picks a file or a subfolder there)."""
    path = Path(path_or_hub_id).expanduser()
    if not path.exists():
        text = str(path_or_hub_id)
        if not looks_like_repo_id(text):
            raise LoraError(f"LoRA '{text}' does not exist (pass a file, a folder or a hub id)")
        path = _hub_download(text, weight_name)
        weight_name = None
    if path.is_dir() and weight_name:
        path = path / weight_name
        if not path.exists():
            raise LoraError(f"{path} does not exist")
    if path.is_dir():
        names = [p.name for p in path.iterdir() if p.is_file()]
        path = path / _choose_file(names, str(path))
    content, metadata = read_state_file(path, error=LoraError, what="LoRA file ")
    config_path = path.parent / "adapter_config.json"
    config = None
    if config_path.is_file() and path.name.startswith("adapter_model"):
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise LoraError(f"{config_path} is not valid JSON ({exc})") from None
    return LoraFile(content, str(path), metadata, config)


def _hub_download(repo_id: str, weight_name: str | None) -> Path:
    """Fetch one LoRA file of a hub repo (and the adapter_config.json beside it) into the hub cache. weight_name:
    a file, or a subfolder whose single LoRA file is taken (MCM publishes one PEFT folder per variant)."""
    chosen: list[str] = []

    def wanted(files: list[str]) -> list[str]:
        if weight_name in files:
            chosen.append(weight_name)
        else:
            folder = (weight_name or "").strip("/")
            prefix = folder + "/" if folder else ""
            inside = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
            chosen.append(prefix + _choose_file(inside, f"{repo_id}/{folder}"))
        config = chosen[0].rpartition("/")[0] + ("/" if "/" in chosen[0] else "") + "adapter_config.json"
        return [chosen[0]] + ([config] if config in files else [])

    try:
        folder = hub_folder(repo_id, wanted, what="LoRA")
    except CheckpointNotFoundError as exc:
        raise LoraError(str(exc)) from None
    # online: the chosen file; offline: the cached snapshot, where weight_name is looked up as locally
    return folder / chosen[0] if chosen else folder / (weight_name or "")


# ---- formats -> adapters ------------------------------------------------------------------------------------

def detect_format(lora: LoraFile) -> str:
    content = lora.content
    if isinstance(content, (list, tuple)):
        return "cloneofsimo"
    if not isinstance(content, dict) or not content:
        raise LoraError(f"{lora.source}: not a LoRA (expected a dict of tensors or a list of tensors, got "
                        f"{type(content).__name__})")
    keys = list(content)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        raise LoraError(f"{lora.source}: not a LoRA state dict (values must be tensors)")
    if "stable_lora_text_to_video" in lora.metadata or any(k.endswith((".lora_A", ".lora_B")) for k in keys):
        return "stable-lora"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return "kohya"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(re.search(r"\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$", k) for k in keys):
        return "diffusers"
    raise LoraError(f"{lora.source}: no LoRA format recognised (first keys: {first_keys(keys, 5)}); supported: "
                    "diffusers/PEFT (lora_A/lora_B), kohya (lora_unet_*), cloneofsimo lists (.pt), "
                    "Stable LoRA (.lora_A/.lora_B)")


class AdaptableLayers:
    """The pipeline's adaptable layers by path ("unet.<name>", "text_encoder.<name>") and the lookups the formats
    need: kohya's underscore names and text-encoder names with or without transformers' "text_model." prefix."""

    def __init__(self, models: dict[str, nn.Module]):
        self.models = models
        self.layers: dict[str, nn.Module] = {}
        for component, model in models.items():
            for name, module in model.named_modules():
                if isinstance(module, TARGET_LAYERS):
                    self.layers[f"{component}.{name}"] = module
        self.underscored: dict[str, str] = {}
        for path in self.layers:
            component, name = path.split(".", 1)
            prefix = "lora_unet_" if component == "unet" else "lora_te_"
            for alias in self._aliases(component, name):
                self.underscored.setdefault(prefix + alias.replace(".", "_"), path)

    @staticmethod
    def _aliases(component: str, name: str) -> list[str]:
        if component != "text_encoder":
            return [name]
        bare = name.removeprefix("text_model.")
        return [bare, "text_model." + bare]

    def resolve(self, component: str, name: str) -> str | None:
        for alias in self._aliases(component, name):
            if f"{component}.{alias}" in self.layers:
                return f"{component}.{alias}"
        return None

    @property
    def unet(self) -> nn.Module:
        return self.models["unet"]


def _split_component(name: str) -> tuple[str, str]:
    for component in ("unet", "text_encoder"):
        if name.startswith(component + "."):
            return component, name[len(component) + 1:]
    return "unet", name


def _collect(pairs: dict[str, dict[str, torch.Tensor]], fmt: str, source: str,
             scale_of, resolve) -> dict[str, LoraLayer]:
    layers, unmatched, incomplete = {}, [], []
    for module, parts in pairs.items():
        if "up" not in parts or "down" not in parts:
            incomplete.append(module)
            continue
        path = resolve(module)
        if path is None:
            unmatched.append(module)
            continue
        layers[path] = LoraLayer(parts["up"], parts["down"], scale_of(module, parts))
    if incomplete:
        raise LoraError(f"{source}: {fmt} LoRA: up or down weight missing for {first_keys(incomplete, 5)}")
    if unmatched:
        hint = " (a LoRA for another architecture, e.g. Stable Diffusion?)" if not layers else ""
        raise LoraError(f"{source}: {fmt} LoRA: {len(unmatched)} of {len(pairs)} modules match no layer of this "
                        f"model{hint}: {first_keys(unmatched, 5)}")
    return layers


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name that ends in it at a dot."""
    if name in patterns:
        return patterns[name]
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def _from_state_dict(lora: LoraFile, index: AdaptableLayers, fmt: str) -> dict[str, LoraLayer]:
    roles = {"lora_A": "down", "lora_B": "up", "lora.down": "down", "lora.up": "up", "lora_down": "down",
             "lora_up": "up"}
    pattern = re.compile(r"^(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)(?:\.weight)?$|^(.+?)\.alpha$")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    ignored = []
    for key, tensor in lora.content.items():
        if fmt == "peft":
            key = key.removeprefix("base_model.model.")
        m = pattern.match(key)
        if m is None:
            ignored.append(key)
            continue
        if m.group(3) is not None:
            pairs.setdefault(m.group(3), {})["alpha"] = tensor
        else:
            pairs.setdefault(m.group(1), {})[roles[m.group(2)]] = tensor
    if ignored:
        raise LoraError(f"{lora.source}: {fmt} LoRA: keys that are not LoRA weights (DoRA / bias / other adapters "
                        f"are not supported): {first_keys(ignored, 5)}")
    config = lora.peft_config or {}
    if config.get("use_dora"):
        raise LoraError(f"{lora.source}: DoRA adapters (use_dora) are not supported")

    def scale_of(module: str, parts: dict[str, torch.Tensor]) -> float:
        rank = parts["down"].shape[0]
        if "alpha" in parts:
            return float(parts["alpha"]) / rank
        if fmt == "kohya" or not config:
            return 1.0
        r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
        return alpha / (math.sqrt(r) if config.get("use_rslora") else r)

    if fmt == "kohya":
        return _collect(pairs, fmt, lora.source, scale_of, index.underscored.get)
    return _collect(pairs, fmt, lora.source, scale_of, lambda m: index.resolve(*_split_component(m)))


def _from_stable_lora(lora: LoraFile, index: AdaptableLayers) -> dict[str, LoraLayer]:
    cfg = index.unet.config
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    biases = []
    for key, tensor in lora.content.items():
        module, _, kind = key.rpartition(".")
        if kind in ("lora_A", "lora_B"):
            pairs.setdefault(module, {})["down" if kind == "lora_A" else "up"] = tensor
        elif kind == "bias":
            biases.append(key)
        else:
            raise LoraError(f"{lora.source}: stable-lora LoRA: unexpected key {key}")
    if biases:
        warnings.warn(f"{lora.source}: Stable LoRA bias entries are not applied (as in sd-webui-text2video): "
                      f"{first_keys(biases, 5)}", stacklevel=4)

    def resolve(module: str) -> str | None:
        name = unet_name_to_diffusers(module.removeprefix("model.diffusion_model."), cfg)
        return None if name is None else index.resolve("unet", name)

    layers = _collect(pairs, "stable-lora", lora.source, lambda m, p: 1.0, resolve)
    for path, layer in layers.items():
        weight = index.layers[path].weight
        if weight.dim() == 4:
            layer.stable_view = tuple(weight.shape)
        elif weight.dim() == 5:  # Conv3d (k, 1, 1): the product is viewed as (out, in, k, k, 1), then averaged
            out, inp, k = weight.shape[:3]
            layer.stable_view = (out, inp, k, k, 1)
    return layers


def list_candidates(unet: nn.Module, target: str, guidance_dim: int | None = None) -> list[tuple[str, torch.Size]]:
    """(module path, weight shape) of every Linear / Conv2d / Conv3d under the target's ancestor classes, in the
    registration order of diffusers' UNet3DConditionModel (up_blocks before mid_block; time_embedding.cond_proj
    between linear_1 and linear_2 -- included for the whole UNet when `guidance_dim` gives its width)."""
    children = [n for n, _ in unet.named_children()]
    children.remove("mid_block")
    children.insert(children.index("up_blocks") + 1, "mid_block")
    ordered = [item for child in children for item in getattr(unet, child).named_modules(prefix=child)]
    ancestor = LIST_TARGETS[target]
    if ancestor is not None:  # layers inside modules of the ancestor class
        roots = tuple(n + "." for n, m in ordered if type(m).__name__ == ancestor)
        ordered = [(n, m) for n, m in ordered if n.startswith(roots)]
    found = []
    for name, module in ordered:
        if isinstance(module, TARGET_LAYERS):
            found.append((f"unet.{name}", module.weight.shape))
        if name == "time_embedding.linear_1" and ancestor is None and guidance_dim and \
                unet.time_embedding.cond_proj is None:
            found.append(("unet.time_embedding.cond_proj", torch.Size((module.in_features, guidance_dim))))
    return found


def _from_list(lora: LoraFile, index: AdaptableLayers, target: str | None) -> tuple[dict[str, LoraLayer], int | None]:
    tensors = list(lora.content)
    if not tensors or len(tensors) % 2 or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise LoraError(f"{lora.source}: cloneofsimo LoRA: expected an even-length list [up_0, down_0, up_1, ...] of "
                        f"tensors, got {len(tensors)} items")
    pairs = [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]
    targets = [target] if target else list(LIST_TARGETS)
    if any(t not in LIST_TARGETS for t in targets):
        raise LoraError(f"target must be one of {', '.join(LIST_TARGETS)}, got {target!r}")
    plans, counts = [], []
    for name in targets:
        for guidance_dim in (None, _guidance_dim_guess(pairs)) if name == "unet" else (None,):
            candidates = list_candidates(index.unet, name, guidance_dim)
            counts.append(f"{name}{' with guidance embedding' if guidance_dim else ''}: {len(candidates)}")
            if len(candidates) == len(pairs):
                plans.append((candidates, guidance_dim))
    if not plans:
        raise LoraError(f"{lora.source}: cloneofsimo LoRA with {len(pairs)} (up, down) pairs fits no target of this "
                        f"UNet (layers per target: {'; '.join(counts)}); pass target= for the right one")
    candidates, guidance_dim = plans[0]
    layers = {}
    for i, ((path, shape), (up, down)) in enumerate(zip(candidates, pairs)):
        layer = LoraLayer(up, down)
        problem = layer.check(shape)
        if problem:
            raise LoraError(f"{lora.source}: cloneofsimo LoRA: pair {i} does not fit layer {path}: {problem}")
        layers[path] = layer
    return layers, guidance_dim


def _guidance_dim_guess(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int | None:
    # T2V-Turbo: the third pair (conv_in, time_embedding.linear_1, cond_proj, ...) is the guidance embedding's
    return int(pairs[2][1].shape[1]) if len(pairs) > 2 and pairs[2][1].dim() == 2 else None


def build_adapter(lora: LoraFile, index: AdaptableLayers, name: str, target: str | None = None) -> Adapter:
    """Parse a LoRA file into an Adapter for this model; every layer checked against its weight's shape."""
    fmt = detect_format(lora)
    guidance_dim = None
    if fmt == "cloneofsimo":
        layers, guidance_dim = _from_list(lora, index, target)
    elif target is not None:
        raise LoraError(f"target= applies to keyless cloneofsimo lists only; {lora.source} is a {fmt} LoRA")
    elif fmt == "stable-lora":
        layers = _from_stable_lora(lora, index)
    else:
        layers = _from_state_dict(lora, index, fmt)
    wrong = []
    for path, layer in layers.items():
        module = index.layers.get(path)
        if module is not None:
            problem = layer.check(module.weight.shape)
            if problem:
                wrong.append(f"{path}: {problem}")
    if wrong:
        raise LoraError(f"{lora.source}: {fmt} LoRA: shapes do not fit this model (a LoRA for another architecture?): "
                        f"{first_keys(wrong, 3)}")
    return Adapter(name, fmt, lora.source, layers, guidance_dim)
