"""Reading a tiny decoder: TAESD as a diffusers AutoencoderTiny folder / hub id or madebyollin's
`taesd_decoder.pth`, TAESDV as `taesdv.pth` (or a folder / hub id holding it), built strictly on the models of
`models.tiny_vae`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError, CheckpointNotFoundError
from ..models.layers import use_channels_last_weights
from ..models.tiny_vae import TinyDecoder, TinyVideoDecoder
from .hub import hub_folder, looks_like_repo_id
from .loading import build_strict, read_json
from .state_files import read_state_file


def _taesdv_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """taesdv.pth (encoder and decoder) -> the decoder's keys."""
    return {k: v for k, v in raw.items() if k.startswith("decoder.")}


def load_tiny_decoder(source: str | os.PathLike = "madebyollin/taesd", dtype: torch.dtype = torch.float32
                      ) -> TinyDecoder | TinyVideoDecoder:
    """A TAESD decoder from a diffusers AutoencoderTiny folder or hub id (config.json + weights; the encoder's keys
    are left out) or an original `taesd_decoder.pth` / `.safetensors` file; a TAESDV decoder from `taesdv.pth`
    (or a folder / hub id holding it, e.g. madebyollin/taesdv). Missing or extra decoder keys are an error naming
    them."""
    path = Path(source).expanduser()
    if not path.exists() and not looks_like_repo_id(str(source)):
        raise CheckpointNotFoundError(f"tiny decoder '{source}' does not exist (a taesd_decoder.pth / taesdv.pth "
                                      "file, an AutoencoderTiny folder or a hub id such as madebyollin/taesd)")
    if not path.exists() and looks_like_repo_id(str(source)):
        path = hub_folder(str(source), lambda files: [f for f in files if f in (
            "config.json", "diffusion_pytorch_model.safetensors", "taesdv.pth")], what="tiny decoder")
    if path.is_dir() and (path / "taesdv.pth").is_file():
        path = path / "taesdv.pth"
    raw = read_state_file(path)[0] if path.is_file() else None
    if isinstance(raw, dict) and "decoder.1.weight" in raw and not any(k.startswith("decoder.layers.") for k in raw):
        state = _taesdv_state(raw)  # TAESDV (diffusers' AutoencoderTiny files say decoder.layers.*)
        width = state.get("decoder.1.weight", torch.empty(64, 4))
        return use_channels_last_weights(build_strict(
            lambda: TinyVideoDecoder(width.shape[1], width.shape[0]), state, dtype, str(path)))
    if path.is_dir():
        config = read_json(path / "config.json")
        weights = next((path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                        if (path / n).is_file()), path / "diffusion_pytorch_model.safetensors")
        state = {k[len("decoder."):]: v for k, v in read_state_file(weights)[0].items() if k.startswith("decoder.")}
        kwargs = dict(latent_channels=config.get("latent_channels", 4), out_channels=config.get("out_channels", 3),
                      blocks=tuple(config.get("num_decoder_blocks", (3, 3, 3, 1))),
                      channels=tuple(config.get("decoder_block_out_channels", (64, 64, 64, 64))),
                      upsampling=config.get("upsampling_scaling_factor", 2))
    else:
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: not a TAESD decoder state dict")
        state = {}
        for key, value in raw.items():
            index, _, rest = key.partition(".")
            if not index.isdigit():
                raise CheckpointError(f"{path}: {key!r} is not a key of madebyollin's Decoder (a Sequential)")
            state[f"layers.{int(index) - 1}.{rest}"] = value  # index 0 is the clamp
        first = state.get("layers.0.weight")
        if first is None:
            raise CheckpointError(f"{path}: no first convolution ('1.weight'): not madebyollin's TAESD decoder")
        kwargs = dict(latent_channels=first.shape[1], channels=(first.shape[0],) * 4)  # one width throughout
    return use_channels_last_weights(build_strict(lambda: TinyDecoder(**kwargs), state, dtype, str(path)))
