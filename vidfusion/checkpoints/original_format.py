"""The original ModelScope release files: a restricted reader for PyTorch checkpoints that may name arbitrary
classes (PyTorch Lightning's), and UNet state dicts converted both ways with naming.py's rules.

The reader never executes pickled code and needs none of the packages a checkpoint names: tensors are rebuilt from
the archive's storages, a few known containers are real, and every other class becomes an inert placeholder that
records its arguments. So `VQGAN_autoencoder.pth` (a Lightning checkpoint holding a ModelCheckpoint callback and
numpy scalars) loads without pytorch_lightning installed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, CheckpointNotFoundError, ConversionError, first_keys
from ..media.fileio import atomic_folder
from ..models.config import UNetConfig, VAEConfig
from .loading import (
    build_text_encoder,
    build_unet,
    build_vae,
    load_text_encoder,
    load_tokenizer,
    load_vae,
    resolve_checkpoint,
)
from .naming import (
    clip_name_to_transformers,
    unet_name_to_diffusers,
    unet_name_to_original,
    vae_name_to_diffusers,
    vae_name_to_original,
)
from .published import PUBLISHED_SCHEDULER, write_bpe_files
from .state_files import read_state_file

# the temporal transformers' proj_in / proj_out are Conv1d (C, C, 1) in the original UNet, Linear in diffusers'
TEMPORAL_PROJ = re.compile(r"(^|\.)(transformer_in|temp_attentions\.\d+)\.(proj_in|proj_out)\.weight$")


def read_checkpoint(path: str | Path) -> Any:
    """The object an original .pth / .bin file holds, read without executing pickled code (state_files.py)."""
    return read_state_file(path, error=ConversionError)[0]


def state_dict_of(obj: Any, where: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint object: a plain state dict or a Lightning-style {"state_dict": ...}; keys under
    `prefix` (e.g. "first_stage_model.") with it removed, when any key has it."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{where}: not a state dict (expected a dict of tensors, or one under 'state_dict')")
    if prefix and any(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
    return dict(obj)


def rename_state(state: dict[str, torch.Tensor], rename, reshape, problem: str) -> dict[str, torch.Tensor]:
    """Every key renamed by `rename(key) -> str | None` and every value passed through `reshape(old key, new key,
    value)`; keys without a new name are an error (`problem` says what they are, then the first of them)."""
    out, unmatched = {}, []
    for key, value in state.items():
        name = rename(key)
        if name is None:
            unmatched.append(key)
            continue
        out[name] = reshape(key, name, value)
    if unmatched:
        raise ConversionError(f"{problem}: {first_keys(unmatched)}")
    return out


def unet_to_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig, where: str = "UNet"
                      ) -> dict[str, torch.Tensor]:
    """An original-format UNet state dict -> diffusers key names and shapes (Conv1d projections -> Linear)."""
    return rename_state(state, lambda key: unet_name_to_diffusers(key, cfg),
                        lambda key, name, v: v.squeeze(-1) if TEMPORAL_PROJ.search(name) and v.dim() == 3 else v,
                        f"{where}: keys that are not part of the original UNet for this config")


def unet_to_original(state: dict[str, torch.Tensor], cfg: UNetConfig, where: str = "UNet"
                     ) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict -> the original key names and shapes (Linear projections -> Conv1d (C, C, 1))."""
    return rename_state(state, lambda key: unet_name_to_original(key, cfg),
                        lambda key, name, v: v.unsqueeze(-1) if TEMPORAL_PROJ.search(key) and v.dim() == 2 else v,
                        f"{where}: keys with no original name")


def _count(state: dict[str, torch.Tensor], pattern: str, where: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    if not found:
        raise ConversionError(f"{where}: no keys like {pattern!r}: not this kind of model")
    return max(found) + 1


# ---- VAE ------------------------------------------------------------------------------------------------------

_VAE_ATTENTION_WEIGHT = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def vae_layout(state: dict[str, torch.Tensor], where: str) -> tuple[int, int]:
    """(levels, resnets per encoder level) of an original-format VAE, read from its keys."""
    return (_count(state, r"encoder\.down\.(\d+)\.", where),
            _count(state, r"encoder\.down\.0\.block\.(\d+)\.", where))


def vae_to_diffusers(state: dict[str, torch.Tensor], where: str = "VAE") -> dict[str, torch.Tensor]:
    """An LDM AutoencoderKL state dict -> diffusers names (mid-block attention 1x1 convs -> linears)."""
    levels, layers = vae_layout(state, where)
    return rename_state(state, lambda key: vae_name_to_diffusers(key, levels, layers),
                        lambda key, name, v: v.flatten(1) if _VAE_ATTENTION_WEIGHT.search(name) and v.dim() == 4 else v,
                        f"{where}: keys that are not part of an LDM AutoencoderKL")


def vae_to_original(state: dict[str, torch.Tensor], cfg: VAEConfig, where: str = "VAE") -> dict[str, torch.Tensor]:
    levels = len(cfg.block_out_channels)
    return rename_state(state, lambda key: vae_name_to_original(key, levels, cfg.layers_per_block),
                        lambda key, name, v: v[:, :, None, None] if _VAE_ATTENTION_WEIGHT.search(key) and v.dim() == 2
                        else v, f"{where}: keys with no original name")


def vae_config_from(state: dict[str, torch.Tensor], scaling_factor: float = 0.18215) -> VAEConfig:
    """The VAE config a diffusers-named AutoencoderKL state dict implies (the original format stores none;
    GroupNorm has 32 groups there)."""
    levels = _count(state, r"encoder\.down_blocks\.(\d+)\.", "VAE")
    channels = tuple(int(state[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(levels))
    return VAEConfig(in_channels=int(state["encoder.conv_in.weight"].shape[1]),
                     out_channels=int(state["decoder.conv_out.weight"].shape[0]),
                     down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                     block_out_channels=channels,
                     layers_per_block=_count(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", "VAE"),
                     latent_channels=int(state["post_quant_conv.weight"].shape[0]), norm_num_groups=32,
                     scaling_factor=scaling_factor)


# ---- text encoder ---------------------------------------------------------------------------------------------

_CLIP_UNUSED = re.compile(r"^(visual\.|text_projection|logit_scale|attn_mask)")


def clip_to_transformers(state: dict[str, torch.Tensor], where: str = "text encoder"
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """OpenCLIP weights -> (CLIPTextModel state dict without the "text_model." prefix, its CLIPTextConfig kwargs).
    The model uses the penultimate block's output, so the text model is built without the last block."""
    blocks = _count(state, r"transformer\.resblocks\.(\d+)\.", where)
    layers = blocks - 1
    out, unmatched = {}, []
    for key, value in state.items():
        name = clip_name_to_transformers(key, layers)
        if name is None:
            if not (_CLIP_UNUSED.match(key) or key.startswith(f"transformer.resblocks.{layers}.")):
                unmatched.append(key)
            continue
        if "{qkv}" in name:
            for part, chunk in zip("qkv", value.chunk(3)):
                out[name.format(qkv=part)] = chunk.clone()
        else:
            out[name] = value
    if unmatched:
        raise ConversionError(f"{where}: keys that are not part of an OpenCLIP text tower: "
                              f"{first_keys(unmatched)}")
    width = int(state["token_embedding.weight"].shape[1])
    config = dict(vocab_size=int(state["token_embedding.weight"].shape[0]), hidden_size=width,
                  intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                  num_hidden_layers=layers, num_attention_heads=width // 64,  # OpenCLIP heads are 64 wide
                  max_position_embeddings=int(state["positional_embedding"].shape[0]), hidden_act="gelu",
                  layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
                  projection_dim=int(state["text_projection"].shape[1]) if "text_projection" in state else 512)
    return out, config


def clip_to_openclip(state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict (with or without "text_model.") -> OpenCLIP names; `extra` (an OpenCLIP state
    dict, e.g. the original file) supplies what the text-to-video model does not keep: the last block, the
    projection, the visual tower."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if "position_ids" not in k}
    layers = _count(state, r"encoder\.layers\.(\d+)\.", "text encoder")
    inverse = {}
    for key in state:
        for candidate in _openclip_candidates(key):
            if clip_name_to_transformers(candidate, layers) in (key, _qkv_template(key)):
                inverse[key] = candidate
                break
    missing = sorted(set(state) - set(inverse))
    if missing:
        raise ConversionError(f"text encoder: keys with no OpenCLIP name: {first_keys(missing)}")
    out: dict[str, torch.Tensor] = {}
    for key, name in inverse.items():
        if name.endswith(("in_proj_weight", "in_proj_bias")):
            if name not in out:
                template = _qkv_template(key)
                out[name] = torch.cat([state[template.format(qkv=p)] for p in "qkv"])
        else:
            out[name] = state[key]
    for key, value in (extra or {}).items():
        out.setdefault(key, value)
    last, kept = f"transformer.resblocks.{layers}.", f"transformer.resblocks.{layers - 1}."
    if not any(key.startswith(last) for key in out):  # no `extra`: the block the video model skips (it reads the
        for key in [k for k in out if k.startswith(kept)]:  # penultimate one) kept as zeros, so a reader that drops
            out[last + key.removeprefix(kept)] = torch.zeros_like(out[key])  # the last block drops this one
    return out


def _qkv_template(key: str) -> str:
    return re.sub(r"self_attn\.[qkv]_proj\.", "self_attn.{qkv}_proj.", key)


def _openclip_candidates(key: str) -> list[str]:
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)$", key)
    if m is None:
        return ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"]
    i, rest = m.groups()
    prefix = f"transformer.resblocks.{i}."
    names = ["ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.out_proj.weight", "attn.out_proj.bias",
             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "attn.in_proj_weight",
             "attn.in_proj_bias"]
    return [prefix + n for n in names]


# ---- tokenizer ------------------------------------------------------------------------------------------------

BPE_VOCAB = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408  # 256 bytes x 2 (with and without </w>), 48894 merges, 2 special tokens


def clip_tokenizer(cache_dir: str | Path | None = None):
    """The CLIP BPE tokenizer OpenCLIP uses (49408 tokens, padded with id 0 as OpenCLIP pads), built from the
    vocabulary shipped with vidfusion: no network, no open_clip_torch."""
    import gzip

    from transformers import CLIPTokenizer

    folder = Path(cache_dir or Path(torch.hub.get_dir()).parent / "vidfusion" / "clip-bpe-tokenizer")
    if not (folder / "vocab.json").is_file():
        merges = gzip.open(BPE_VOCAB).read().decode("utf-8").split("\n")[1:CLIP_VOCAB_SIZE - 512 - 2 + 1]
        _mkdir(folder.parent)
        try:
            with atomic_folder(folder) as tmp:
                write_bpe_files(tmp, merges)
        except OSError:  # another process made it first
            pass
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- an original release folder -------------------------------------------------------------------------------

MODEL_CFG_FIELDS = ("unet_dim", "unet_dim_mult", "unet_res_blocks", "unet_attn_scales", "unet_head_dim",
                    "unet_context_dim", "unet_in_dim", "unet_out_dim")


def read_configuration(folder: Path) -> dict[str, Any]:
    """configuration.json of an original folder, checked: model.model_cfg fields and model.model_args files."""
    import json

    path = folder / "configuration.json"
    try:
        config = json.loads(path.read_text())
        model = config["model"]
        cfg, args = model["model_cfg"], model.get("model_args", {})
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConversionError(f"{path}: not a ModelScope configuration (needs model.model_cfg; {exc})") from None
    missing = [k for k in MODEL_CFG_FIELDS if k not in cfg]
    if missing:
        raise ConversionError(f"{path}: model.model_cfg lacks {', '.join(missing)}")
    return {"cfg": cfg, "args": args, "path": path}


def unet_config_from(cfg: dict[str, Any], where: str) -> UNetConfig:
    """model_cfg -> UNetConfig: channels unet_dim * unet_dim_mult, attention at the scales 1/2^level listed in
    unet_attn_scales, heads of width unet_head_dim; GroupNorm with 32 groups as the original code."""
    if cfg.get("unet_num_heads", 8) != 8:
        raise ConversionError(f"{where}: unet_num_heads={cfg['unet_num_heads']} (the first temporal transformer's "
                              "heads) is not supported; the published models use 8")
    mults = list(cfg["unet_dim_mult"])
    scales = [float(s) for s in cfg["unet_attn_scales"]]
    attention = [any(abs(s - 0.5**level) < 1e-9 for s in scales) for level in range(len(mults))]
    try:
        unet_cfg = UNetConfig(
            in_channels=int(cfg["unet_in_dim"]), out_channels=int(cfg["unet_out_dim"]),
            block_out_channels=tuple(int(cfg["unet_dim"]) * int(m) for m in mults),
            down_block_types=tuple("CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attention),
            up_block_types=tuple("CrossAttnUpBlock3D" if a else "UpBlock3D" for a in attention[::-1]),
            layers_per_block=int(cfg["unet_res_blocks"]), attention_head_dim=int(cfg["unet_head_dim"]),
            cross_attention_dim=int(cfg["unet_context_dim"]), norm_num_groups=32)
        unet_cfg.validate(where)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{where}: model_cfg does not describe a UNet ({exc})") from None
    return unet_cfg


def scheduler_config_from(cfg: dict[str, Any]) -> dict[str, Any]:
    """The original schedule as diffusers' published scheduler config: DDIM, scaled_linear 0.00085 -> 0.012."""
    return {**PUBLISHED_SCHEDULER, "num_train_timesteps": int(cfg.get("num_timesteps", 1000))}


def component_file(folder: Path, config: dict[str, Any], key: str) -> Path | None:
    """The file model_args[key] names, relative to the folder (None when the folder has no such file)."""
    name = config["args"].get(key)
    if not name:
        return None
    path = (folder / name).resolve()
    return path if path.is_file() else None


def read_original_state(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    return state_dict_of(read_checkpoint(path), str(path), prefix)


# ---- loading an original folder (diffusers-layout parts a folder lacks come through loading.py) --------------

def is_original_folder(folder: Path) -> bool:
    """An original release folder: configuration.json and no model_index.json."""
    return (folder / "configuration.json").is_file() and not (folder / "model_index.json").is_file()


def load_original(folder: Path, dtype: torch.dtype, vae: str | os.PathLike | None = None,
                  text_encoder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The components of an original-format folder; a part the folder lacks (Zeroscope's zs2_* folders ship UNet
    and CLIP only) comes from `vae=` / `text_encoder=`: a file, an original folder, or a diffusers folder / hub id."""
    config = read_configuration(folder)
    where = str(config["path"])
    unet_cfg = unet_config_from(config["cfg"], where)
    unet_file = _original_file(folder, config, "ckpt_unet", "UNet", None)
    try:
        state = unet_to_diffusers(read_original_state(unet_file), unet_cfg, str(unet_file))
    except ConversionError as exc:
        raise CheckpointError(str(exc)) from None
    unet = build_unet(unet_cfg, state, dtype, str(unet_file))
    text, tokenizer = _original_text(folder, dtype, text_encoder)
    return {"unet": unet, "vae": _original_vae(folder, dtype, vae), "text_encoder": text,
            "tokenizer": tokenizer, "scheduler_config": scheduler_config_from(config["cfg"])}


def _original_file(folder: Path, config: dict[str, Any], key: str, what: str, flag: str | None) -> Path:
    path = component_file(folder, config, key)
    if path is None:
        named = config["args"].get(key)
        how = f"; pass it with {flag}" if flag else ""
        raise CheckpointNotFoundError(f"{folder}: no {what} file (configuration.json model.model_args.{key} = "
                                      f"{named!r}){how}")
    return path


def _other_source(source: str | os.PathLike) -> tuple[str, Path]:
    """('file' | 'original' | 'diffusers', path) of a vae= / text_encoder= argument."""
    path = Path(source).expanduser()
    if path.is_file():
        return "file", path
    if path.is_dir() and is_original_folder(path):
        return "original", path
    return "diffusers", resolve_checkpoint(source)


def _original_vae(folder: Path, dtype: torch.dtype, source) -> nn.Module:
    kind, path = ("original", folder) if source is None else _other_source(source)
    if kind == "diffusers":
        return load_vae(path / "vae", dtype)
    if kind == "original":
        how = "vae= (CLI: --vae) with a VAE file, an original folder or a diffusers folder / hub id"
        path = _original_file(path, read_configuration(path), "ckpt_autoencoder", "VAE", how)
    try:
        state = vae_to_diffusers(read_original_state(path, "first_stage_model."), str(path))
        cfg = vae_config_from(state)
    except (ConversionError, KeyError) as exc:
        raise CheckpointError(f"{path}: not an LDM AutoencoderKL checkpoint ({exc})") from None
    return build_vae(cfg, state, dtype, str(path))


def _original_text(folder: Path, dtype: torch.dtype, source):
    kind, path = ("original", folder) if source is None else _other_source(source)
    if kind == "diffusers":
        return load_text_encoder(path / "text_encoder", dtype), load_tokenizer(path / "tokenizer")
    if kind == "original":
        how = ("text_encoder= (CLI: --clip) with an OpenCLIP file, an original folder or a diffusers folder / "
               "hub id")
        path = _original_file(path, read_configuration(path), "ckpt_clip", "CLIP text encoder", how)
    try:
        state, cfg = clip_to_transformers(read_original_state(path), str(path))
    except (ConversionError, KeyError) as exc:
        raise CheckpointError(f"{path}: not an OpenCLIP checkpoint ({exc})") from None
    return build_text_encoder(cfg, state, dtype, str(path)), clip_tokenizer()
