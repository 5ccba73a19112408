"""Checkpoint folder or hub id -> configs + state dicts -> models built strictly (all file reading is here)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, CheckpointNotFoundError, first_keys
from ..models.config import ConfigError, UNetConfig, VAEConfig
from ..models.layers import fuse_upsample_convs, use_channels_last_weights
from ..models.unet3d import UNet3D
from ..models.vae import AutoencoderKL
from .hub import hub_file, hub_folder, looks_like_repo_id
from .state_files import read_state_file

PIPELINE_CLASSES = ("TextToVideoSDPipeline", "VideoToVideoSDPipeline")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")

# Old diffusers VAE attention key names -> current ones (the published VAE may use either).
VAE_RENAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
# Buffers older transformers versions saved with the CLIP text model; they are recomputed, not loaded.
TEXT_ENCODER_DROPPED = ("text_model.embeddings.position_ids", "embeddings.position_ids")


# ---- locating files -------------------------------------------------------------------------------------

def _file_variant(name: str) -> str | None:
    """'x.fp16.safetensors' -> 'fp16'; 'x.safetensors.index.fp16.json' -> 'fp16'; 'x.safetensors' -> None."""
    parts = name.split(".")
    if name.endswith(".json"):  # index files
        return parts[-2] if len(parts) >= 5 else None
    return parts[-2] if len(parts) >= 3 else None


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name.endswith((".index.json",)) or ".index." in name


def choose_weight_files(names: list[str], variant: str | None, where: str) -> list[str]:
    """Pick the weight file (or index) of one component from its file names; shards are found via the index."""
    candidates = [n for n in names if _is_weight_file(n)]
    for want_variant in ([variant, None] if variant else [None]):
        pool = [n for n in candidates if _file_variant(n) == want_variant]
        for kind in (".safetensors", ".bin"):
            index = sorted(n for n in pool if kind + ".index" in n)
            if index:
                return index[:1]
            single = sorted(n for n in pool if n.endswith(kind) and "-of-" not in n)
            if single:
                canonical = [n for n in single if n.split(".")[0] in ("diffusion_pytorch_model", "model")]
                if len(canonical) == 1 or len(single) == 1:
                    return (canonical or single)[:1]
                raise CheckpointError(f"{where}: several weight files ({', '.join(single)}); keep only one")
        if variant and want_variant == variant:
            warnings.warn(f"{where}: no '{variant}' variant weights; loading the default weights instead", stacklevel=3)
    raise CheckpointNotFoundError(
        f"{where}: no weights found (expected *.safetensors, *.bin or a *.index.json"
        + (f", variant '{variant}'" if variant else "") + ")"
    )


def _hub_files(repo_id: str, variant: str | None, revision: str | None) -> Path:
    """Download just what a pipeline needs from the Hub into huggingface_hub's cache; return the folder."""
    def read_index(name: str) -> dict[str, Any]:
        return read_json(hub_file(repo_id, name, revision))

    return hub_folder(repo_id, lambda files: wanted_hub_files(files, variant, repo_id, read_index), revision)


def wanted_hub_files(files: list[str], variant: str | None, repo_id: str,
                     read_index: Callable[[str], dict[str, Any]]) -> list[str]:
    """The repo files a pipeline needs: model_index, configs, tokenizer files and the chosen weights of each
    component; for a sharded checkpoint the shards its index names (`read_index(path)` fetches an index)."""
    wanted = ["model_index.json"]
    for comp in COMPONENTS:
        names = [f.split("/", 1)[1] for f in files if f.startswith(comp + "/") and f.count("/") == 1]
        wanted += [f"{comp}/{n}" for n in names if n.endswith("config.json") or n in TOKENIZER_FILES]
        if comp in WEIGHT_NAMES and names:
            chosen = choose_weight_files(names, variant, f"{repo_id}/{comp}")
            wanted += [f"{comp}/{n}" for n in chosen]
            if chosen[0].endswith(".json"):
                weight_map = read_index(f"{comp}/{chosen[0]}").get("weight_map", {})
                wanted += sorted({f"{comp}/{shard}" for shard in weight_map.values()})
    return wanted


def resolve_checkpoint(name_or_path: str | os.PathLike, variant: str | None = None,
                       revision: str | None = None) -> Path:
    """A local folder as is, or a hub id downloaded (only the files needed) into the hub cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.is_file():
        raise CheckpointNotFoundError(f"'{text}' is a file; a model is a checkpoint folder (model_index.json, "
                                      "unet/, vae/, ...) or a hub id: pass its folder")
    if not looks_like_repo_id(text):
        raise CheckpointNotFoundError(f"checkpoint folder '{text}' does not exist (pass a folder or a hub id)")
    return _hub_files(text, variant, revision)


# frames each published family was trained on: the window long clips run in (README, "Long videos")
TRAINING_FRAMES = {"modelscope": 16, "zeroscope": 24}


def training_frames(name_or_path: str | os.PathLike, folder: Path) -> int:
    """The checkpoint's training length: 24 for Zeroscope v2 (hub ids, cached copies and original `zs2_*` folders),
    else 16 (ModelScope text-to-video-ms-1.7b and its fine-tunes)."""
    names = f"{name_or_path} {folder}".lower()
    zeroscope = "zeroscope" in names or folder.name.lower().startswith("zs2")
    return TRAINING_FRAMES["zeroscope" if zeroscope else "modelscope"]


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointNotFoundError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def read_model_index(folder: Path) -> dict[str, Any]:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise CheckpointNotFoundError(
            f"{folder} is not a pipeline checkpoint: model_index.json is missing (expected the diffusers layout "
            "with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    index = read_json(index_path)
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise CheckpointError(
            f"{index_path}: unknown layout {cls!r}; vidfusion loads {' and '.join(PIPELINE_CLASSES)} checkpoints"
        )
    for comp in COMPONENTS:
        if not (folder / comp).is_dir():
            raise CheckpointNotFoundError(f"{folder}: subfolder '{comp}/' is missing")
    return index


# ---- reading weights ------------------------------------------------------------------------------------

def _read_state(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state, _ = read_state_file(path, dtype)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a dict of tensors)")
    return state


def read_weights(folder: Path, variant: str | None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """State dict of one component folder (single file or sharded via an index); floats cast to `dtype`."""
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"missing subfolder: {folder}")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    (chosen,) = choose_weight_files(names, variant, str(folder))
    if not chosen.endswith(".json"):
        return _read_state(folder / chosen, dtype)
    index = read_json(folder / chosen)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{folder / chosen}: no 'weight_map' in the index")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_state(folder / shard, dtype))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(f"{folder / chosen}: keys listed in the index are not in the shards: "
                              f"{first_keys(absent)}")
    return state


def rename_keys(state: dict[str, torch.Tensor], renames: dict[str, str], dropped: tuple[str, ...] = ()
                ) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key in dropped:
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def build_strict(factory: Callable[[], nn.Module], state: dict[str, torch.Tensor], dtype: torch.dtype,
                 where: str) -> nn.Module:
    """Build a module on the meta device and assign the state dict; any key mismatch is an error naming it."""
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {first_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {first_keys(unexpected)}")
    if wrong:
        problems.append("wrong shapes: " + first_keys(
            [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong]))
    if problems:
        raise CheckpointError(f"{where}: weights do not match the config ({'; '.join(problems)})")
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ---- components -----------------------------------------------------------------------------------------

def _config(cls, path: Path):
    try:
        return cls.from_dict(read_json(path), str(path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def build_unet(cfg: UNetConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> UNet3D:
    """The UNet from a state dict in diffusers names, strictly, laid out for inference (channels-last convs,
    folded upsample kernels)."""
    return fuse_upsample_convs(use_channels_last_weights(build_strict(lambda: UNet3D(cfg), state, dtype, where)))


def build_vae(cfg: VAEConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> AutoencoderKL:
    """The VAE from a state dict in diffusers names, strictly, laid out for inference."""
    return fuse_upsample_convs(use_channels_last_weights(build_strict(lambda: AutoencoderKL(cfg), state, dtype,
                                                                      where)))


def load_unet(folder: Path, dtype: torch.dtype, variant: str | None = None) -> UNet3D:
    cfg = _config(UNetConfig, folder / "config.json")
    return build_unet(cfg, read_weights(folder, variant, dtype), dtype, str(folder))


def load_vae(folder: Path, dtype: torch.dtype, variant: str | None = None) -> AutoencoderKL:
    cfg = _config(VAEConfig, folder / "config.json")
    return build_vae(cfg, rename_keys(read_weights(folder, variant, dtype), VAE_RENAMES), dtype, str(folder))


def load_text_encoder(folder: Path, dtype: torch.dtype, variant: str | None = None):
    raw = read_json(folder / "config.json")
    return build_text_encoder(raw, read_weights(folder, variant, dtype), dtype, str(folder))


def build_text_encoder(raw: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype, where: str):
    """A transformers CLIPTextModel from its config dict and a state dict with or without "text_model."."""
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        cfg = CLIPTextConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})
    except Exception as exc:
        raise CheckpointError(f"{where}: not a CLIP text model config ({exc})") from None
    with torch.device("meta"):
        prefixed = any(k.startswith("text_model.") for k in CLIPTextModel(cfg).state_dict())
    # transformers < 5 names the keys "text_model.*" (as published); 5.x drops the prefix
    renames = {} if prefixed else {"text_model.": ""}
    state = rename_keys(state, renames, TEXT_ENCODER_DROPPED)
    if prefixed:
        state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    model = build_strict(lambda: CLIPTextModel(cfg), state, dtype, where)
    embeddings = getattr(model, "text_model", model).embeddings
    positions = torch.arange(cfg.max_position_embeddings).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)
    return model


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    has_vocab = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_vocab and not (folder / "tokenizer.json").is_file():
        raise CheckpointNotFoundError(f"{folder}: needs vocab.json + merges.txt or tokenizer.json")
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise CheckpointError(f"cannot read the tokenizer in {folder} ({type(exc).__name__}: {exc})") from None


def load_diffusers(folder: Path, dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
    """The parts of a diffusers-layout pipeline folder (the scheduler as its config dict)."""
    read_model_index(folder)
    return {"unet": load_unet(folder / "unet", dtype, variant), "vae": load_vae(folder / "vae", dtype, variant),
            "text_encoder": load_text_encoder(folder / "text_encoder", dtype, variant),
            "tokenizer": load_tokenizer(folder / "tokenizer"),
            "scheduler_config": load_scheduler_config(folder / "scheduler")}


def load_scheduler_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / "scheduler_config.json")
