"""`vidfusion.convert`: a checkpoint folder rewritten in the other layout (diffusers <-> original ModelScope files),
complete or not at all. Built on the pipeline (it loads either layout) and the original format's rule tables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.loading import resolve_checkpoint
from ..checkpoints.original_format import (
    ConversionError,
    clip_to_openclip,
    component_file,
    is_original_folder,
    read_configuration,
    read_original_state,
    unet_to_original,
    vae_to_original,
)
from ..checkpoints.published import MODEL_INDEX, config_json
from ..lora.apply import apply_loras
from ..media.fileio import atomic_folder
from .text_to_video import TextToVideoPipeline


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | None = None, dtype: str | None = None,
            vae: str | os.PathLike | None = None, clip: str | os.PathLike | None = None,
            overwrite: bool = False, loras: list[tuple[str, float]] | None = None, lora_weight_name: str | None = None,
            lora_target: str | None = None, turbo: bool = False, fuse: bool = False) -> Path:
    """Convert a checkpoint between the diffusers layout and the original ModelScope layout (`to`: "diffusers" or
    "original"; default the other one than SRC's). DST appears complete or not at all. From an original folder,
    `vae` / `clip` supply parts it lacks; to the original layout, `clip` (an OpenCLIP file or original folder)
    supplies the text-tower weights the model does not use (last block, projection, visual tower). With `fuse`, the
    `loras` ((path or hub id, weight), any format) and T2V-Turbo's with `turbo` are merged into the written weights:
    the result loads like any checkpoint and needs no merging at start (T2V-Turbo keeps its guidance embedding,
    `time_cond_proj_dim` in the UNet config; diffusers layout only)."""
    if (loras or turbo) and not fuse:
        raise ValueError("LoRAs given to convert are merged into the checkpoint: pass fuse=True (CLI: --fuse)")
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
    if loras or turbo:
        apply_loras(pipe, loras or [], lora_weight_name, lora_target, turbo)
        if pipe.unet.guidance_embedding_dim is not None and to != "diffusers":
            raise ValueError("a T2V-Turbo UNet (guidance embedding) has no original-format names; use to='diffusers'")
    expected = _fingerprint(pipe, target_dtype)  # before writing: a writer that changed the model is caught too
    with atomic_folder(dst, replace=True) as tmp:
        if to == "diffusers":
            _write_diffusers(pipe, tmp, target_dtype)
        else:
            extra = _clip_extra(clip) if clip is not None else None
            _write_original(pipe, tmp, target_dtype, extra)
            del extra
        del pipe  # the source's weights go before the written folder is loaded back (one model in memory)
        _check_loads_back(tmp, dst, expected, target_dtype)
    return dst


class ConvertedFolderError(RuntimeError):
    """The folder convert wrote does not load back as the source (a fault of convert, not of the input: exit 1)."""


COMPONENTS = ("unet", "vae", "text_encoder")


def _fingerprint(pipe, dtype: torch.dtype | None) -> dict[str, Any]:
    """What a converted folder must give back: each component's weights as {name: (shape, dtype, sha256)} in the
    written precision (cast and hashed one tensor at a time), the configs that shape the computation, the
    scheduler's schedule and the tokenizer's ids for a sample text."""
    import hashlib

    out: dict[str, Any] = {}
    for name in COMPONENTS:
        weights = {}
        for key, value in getattr(pipe, name).state_dict().items():
            if "position_ids" not in key:
                v = _cast_tensor(value, dtype)
                weights[key] = (tuple(v.shape), str(v.dtype),
                                hashlib.sha256(v.cpu().view(-1).view(torch.uint8).numpy()).hexdigest())
        out[name] = weights
    u, v, t = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    out["configs"] = {
        "unet": (u.in_channels, u.out_channels, u.down_block_types, u.up_block_types, u.block_out_channels,
                 u.layers_per_block, u.norm_num_groups, u.cross_attention_dim, u.head_dims,
                 pipe.unet.guidance_embedding_dim),
        "vae": (v.block_out_channels, v.layers_per_block, v.latent_channels, v.norm_num_groups, v.scaling_factor),
        "text_encoder": (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size,
                         t.vocab_size, t.hidden_act, t.layer_norm_eps),
        "scheduler": {k: pipe.scheduler.options.get(k) for k in ("prediction_type", "num_train_timesteps",
                                                                  "beta_schedule", "beta_start", "beta_end")},
        "tokenizer": tuple(pipe.tokenizer("a cat is surfing a wave at sunset, 4k").input_ids)}
    return out


def _check_loads_back(folder: Path, dst: Path, expected: dict[str, Any], dtype: torch.dtype | None) -> None:
    """The written folder loaded by vidfusion gives the source's weights bit for bit and its configs, or the
    conversion fails (and DST is not created): catches a layout the loader cannot read, a tensor renamed, dropped
    or garbled, a config value (heads, schedule, tokenizer) lost on the way."""
    try:
        again = _fingerprint(TextToVideoPipeline.from_pretrained(folder, dtype=dtype), dtype)
    except (ValueError, OSError, KeyError) as exc:  # out of memory and other failures propagate as they are
        raise ConvertedFolderError(f"the converted folder does not load back ({exc}); nothing was written to "
                                   f"'{dst}'") from exc
    for name in COMPONENTS:
        differ = sorted(k for k in expected[name].keys() | again[name].keys()
                        if expected[name].get(k) != again[name].get(k))
        if differ:
            raise ConvertedFolderError(f"the converted {name} loads back with other weights ({', '.join(differ[:5])}"
                                       f"{' ...' if len(differ) > 5 else ''}); nothing was written to '{dst}'")
    for name, value in expected["configs"].items():
        if again["configs"][name] != value:
            raise ConvertedFolderError(f"the converted {name} loads back with another configuration "
                                       f"({again['configs'][name]} instead of {value}); nothing was written to "
                                       f"'{dst}'")


def _cast_tensor(value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A weight in the written precision (floating-point tensors only), contiguous."""
    return (value.to(dtype) if dtype is not None and value.is_floating_point() else value).contiguous()


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: _cast_tensor(v, dtype) for k, v in state.items()}


def _write_diffusers(pipe, folder: Path, dtype: torch.dtype | None) -> None:
    import json

    from safetensors.torch import save_file

    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    for name, model, cls in (("unet", pipe.unet, "UNet3DConditionModel"), ("vae", pipe.vae, "AutoencoderKL")):
        (folder / name).mkdir()
        config = model.config
        if name == "unet" and model.guidance_embedding_dim is not None:  # a fused T2V-Turbo LoRA
            config = dataclasses.replace(config, time_cond_proj_dim=model.guidance_embedding_dim)
        (folder / name / "config.json").write_text(json.dumps(config_json(config, cls), indent=2))
        save_file(_cast(model.state_dict(), dtype), folder / name / "diffusion_pytorch_model.safetensors")
    (folder / "text_encoder").mkdir()  # as transformers' save_pretrained lays it out, without its progress bars
    text_state = _cast(pipe.text_encoder.state_dict(), dtype)
    config = pipe.text_encoder.config.to_dict()
    stored = str(next(iter(text_state.values())).dtype).removeprefix("torch.")  # the precision written
    config.update({"architectures": ["CLIPTextModel"], "dtype" if "dtype" in config else "torch_dtype": stored})
    (folder / "text_encoder" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(text_state, folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(pipe.scheduler.config), indent=2))


def _clip_extra(clip: str | os.PathLike) -> dict[str, torch.Tensor]:
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
                              f"{cfg.norm_num_groups} (UNet) / {pipe.vae.config.norm_num_groups} (VAE); a tiny "
                              "test checkpoint that converts both ways: "
                              "vidfusion init-random DIR --preset tiny-original")
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
        warnings.warn("the text tower's last block (which the video model skips), projection and visual weights are "
                      "not in a diffusers checkpoint: open_clip_pytorch_model.bin holds zeros for that block and "
                      "leaves the rest out (pass clip= / --clip with the original file to copy them)", stacklevel=3)
    text = clip_to_openclip(pipe.text_encoder.state_dict(), clip_extra)
    torch.save(_cast(text, dtype), folder / files["ckpt_clip"])
