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

from .config import UNetConfig, VAEConfig
from .errors import ConversionError, first_keys
from .fileio import atomic_folder
from .naming import (
    clip_name_to_transformers,
    unet_name_to_diffusers,
    unet_name_to_original,
    vae_name_to_diffusers,
    vae_name_to_original,
)
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
        for candidate in _openclip_candidates(key, layers):
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
    return out


def _qkv_template(key: str) -> str:
    return re.sub(r"self_attn\.[qkv]_proj\.", "self_attn.{qkv}_proj.", key)


def _openclip_candidates(key: str, layers: int) -> list[str]:
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


def clip_tokenizer(cache_dir: str | Path | None = None):
    """The CLIP BPE tokenizer OpenCLIP uses (49408 tokens, padded with id 0 as OpenCLIP pads), built from the
    vocabulary shipped with vidfusion: no network, no open_clip_torch."""
    import gzip
    import json

    from transformers import CLIPTokenizer

    folder = Path(cache_dir or Path(torch.hub.get_dir()).parent / "vidfusion" / "clip-bpe-tokenizer")
    if not (folder / "vocab.json").is_file():
        lines = gzip.open(BPE_VOCAB).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        from .random_checkpoint import bytes_to_unicode

        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in lines]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        _mkdir(folder.parent)
        try:
            with atomic_folder(folder) as tmp:
                (tmp / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
                (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
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
    from .random_checkpoint import PUBLISHED_SCHEDULER

    return {**PUBLISHED_SCHEDULER, "num_train_timesteps": int(cfg.get("num_timesteps", 1000))}


def component_file(folder: Path, config: dict[str, Any], key: str) -> Path | None:
    """The file model_args[key] names, relative to the folder (None when the folder has no such file)."""
    name = config["args"].get(key)
    if not name:
        return None
    path = (folder / name).resolve()
    return path if path.is_file() else None


def read_original_state(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return state_dict_of(load_file(path), str(path), prefix)
    return state_dict_of(read_checkpoint(path), str(path), prefix)


# ---- converting folders both ways -----------------------------------------------------------------------------

def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | None = None, dtype: str | None = None,
            vae: str | os.PathLike | None = None, clip: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Convert a checkpoint between the diffusers layout and the original ModelScope layout (`to`: "diffusers" or
    "original"; default the other one than SRC's). DST appears complete or not at all. From an original folder,
    `vae` / `clip` supply parts it lacks; to the original layout, `clip` (an OpenCLIP file or original folder)
    supplies the text-tower weights the model does not use (last block, projection, visual tower)."""
    from .loading import is_original_folder, resolve_checkpoint
    from .pipeline import TextToVideoPipeline

    source = resolve_checkpoint(src)
    original_source = is_original_folder(source)
    to = to or ("diffusers" if original_source else "original")
    if to not in ("diffusers", "original"):
        raise ValueError(f"to must be 'diffusers' or 'original', got {to!r}")
    target_dtype = None
    if dtype is not None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        target_dtype = getattr(torch, dtype)
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"'{dst}' exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    if not dst.parent.exists():
        raise FileNotFoundError(f"output folder '{dst.parent}' does not exist")
    parts = {"vae": vae, "text_encoder": clip} if original_source and to == "diffusers" else {}
    pipe = TextToVideoPipeline.from_pretrained(source, **parts)
    with atomic_folder(dst, replace=True) as tmp:
        if to == "diffusers":
            _write_diffusers(pipe, tmp, target_dtype)
        else:
            extra = _clip_extra(clip) if clip is not None else None
            _write_original(pipe, tmp, target_dtype, extra)
    return dst


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in state.items()}


def _write_diffusers(pipe, folder: Path, dtype: torch.dtype | None) -> None:
    import json

    from safetensors.torch import save_file

    from .random_checkpoint import MODEL_INDEX, config_json

    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    for name, model, cls in (("unet", pipe.unet, "UNet3DConditionModel"), ("vae", pipe.vae, "AutoencoderKL")):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config_json(model.config, cls), indent=2))
        save_file(_cast(model.state_dict(), dtype), folder / name / "diffusion_pytorch_model.safetensors")
    text = pipe.text_encoder.to(dtype) if dtype is not None else pipe.text_encoder
    text.save_pretrained(folder / "text_encoder", safe_serialization=True)
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(pipe.scheduler.config), indent=2))


def _clip_extra(clip: str | os.PathLike) -> dict[str, torch.Tensor]:
    from .loading import is_original_folder

    path = Path(clip)
    if path.is_dir() and is_original_folder(path):
        config = read_configuration(path)
        path = component_file(path, config, "ckpt_clip") or path / str(config["args"].get("ckpt_clip"))
    return read_original_state(path)


def _write_original(pipe, folder: Path, dtype: torch.dtype | None, clip_extra: dict[str, torch.Tensor] | None
                    ) -> None:
    import json
    import warnings

    cfg = pipe.unet.config
    if cfg.norm_num_groups != 32 or pipe.vae.config.norm_num_groups != 32:
        raise ConversionError("the original format fixes GroupNorm at 32 groups; this checkpoint uses "
                              f"{cfg.norm_num_groups} (UNet) / {pipe.vae.config.norm_num_groups} (VAE)")
    if len(set(cfg.head_dims)) != 1:
        raise ConversionError(f"the original format has one unet_head_dim; this UNet has {cfg.head_dims}")
    channels = cfg.block_out_channels
    options = pipe.scheduler.options
    model_cfg = {"unet_in_dim": cfg.in_channels, "unet_dim": channels[0], "unet_y_dim": 768,
                 "unet_context_dim": cfg.cross_attention_dim, "unet_out_dim": cfg.out_channels,
                 "unet_dim_mult": [c // channels[0] for c in channels], "unet_num_heads": 8,
                 "unet_head_dim": cfg.head_dims[0], "unet_res_blocks": cfg.layers_per_block,
                 "unet_attn_scales": [0.5**i for i, kind in enumerate(cfg.down_block_types) if "CrossAttn" in kind],
                 "unet_dropout": 0.1, "temporal_attention": "True", "num_timesteps": options["num_train_timesteps"],
                 "mean_type": "v" if options["prediction_type"] == "v_prediction" else "eps",
                 "var_type": "fixed_small", "loss_type": "mse"}
    files = {"ckpt_clip": "open_clip_pytorch_model.bin", "ckpt_unet": "text2video_pytorch_model.pth",
             "ckpt_autoencoder": "VQGAN_autoencoder.pth"}
    (folder / "configuration.json").write_text(json.dumps(
        {"framework": "pytorch", "task": "text-to-video-synthesis",
         "model": {"type": "latent-text-to-video-synthesis", "model_args": {**files, "max_frames": 16},
                   "model_cfg": model_cfg},
         "pipeline": {"type": "latent-text-to-video-synthesis"}}, indent=2))
    torch.save(_cast(unet_to_original(pipe.unet.state_dict(), cfg), dtype), folder / files["ckpt_unet"])
    vae = _cast(vae_to_original(pipe.vae.state_dict(), pipe.vae.config), dtype)
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in vae.items()}},
               folder / files["ckpt_autoencoder"])
    if clip_extra is None:
        warnings.warn("the text tower's last block, projection and visual weights are not in a diffusers checkpoint "
                      "and were left out of open_clip_pytorch_model.bin (pass clip= / --clip with the original file "
                      "to copy them)", stacklevel=3)
    text = clip_to_openclip(pipe.text_encoder.state_dict(), clip_extra)
    torch.save(_cast(text, dtype), folder / files["ckpt_clip"])
