"""Write a random-weight checkpoint in the published diffusers layout (for smoke tests and benchmarks)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.config import PRESETS
from ..models.unet3d import UNet3D
from ..models.vae import AutoencoderKL
from .original_format import CLIP_VOCAB_SIZE, clip_tokenizer
from .published import MODEL_INDEX, PUBLISHED_SCHEDULER, config_json, write_bpe_files

WORDS = ("a", "an", "the", "cat", "dog", "is", "on", "in", "of", "and", "surfing", "spiderman", "astronaut",
         "riding", "horse", "wave", "beach", "sunset", "city", "night", "blurry", "low", "quality")


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = WORDS) -> None:
    """A small byte-level BPE vocabulary in CLIP's format (vocab.json + merges.txt), with merges for `words`."""
    folder.mkdir(parents=True, exist_ok=True)
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
    write_bpe_files(folder, merges)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }))


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("position_ids"):
            continue
        if name.endswith("bias"):
            state[name] = torch.zeros(value.shape)
        elif "norm" in name and value.dim() == 1:
            state[name] = torch.ones(value.shape)
        else:
            state[name] = torch.randn(value.shape, generator=generator) * 0.02
    return state


def write_random_checkpoint(folder: str | Path, preset: str = "tiny", seed: int = 0, fp16_variant: bool = False
                            ) -> Path:
    """Write model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    unet_cfg, vae_cfg, text_cfg = PRESETS[preset]
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    def save(sub: str, config: dict, state: dict[str, torch.Tensor], weights: str) -> None:
        path = root / sub
        path.mkdir(exist_ok=True)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / f"{weights}.safetensors"))
        if fp16_variant:
            half = {k: v.half().contiguous() for k, v in state.items()}
            save_file(half, str(path / f"{weights}.fp16.safetensors"))

    with torch.device("meta"):
        unet, vae = UNet3D(unet_cfg), AutoencoderKL(vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    save("unet", config_json(unet_cfg, "UNet3DConditionModel"), _randomize(unet, generator), "diffusion_pytorch_model")
    save("vae", config_json(vae_cfg, "AutoencoderKL"), _randomize(vae, generator), "diffusion_pytorch_model")
    save("text_encoder", dict(text_cfg), _randomize(text, generator), "model")
    if text_cfg["vocab_size"] == CLIP_VOCAB_SIZE:  # CLIP's whole vocabulary: its own BPE tokenizer (OpenCLIP's),
        with tempfile.TemporaryDirectory() as scratch:  # built in a scratch folder (nothing left in the user's cache)
            clip_tokenizer(Path(scratch) / "bpe").save_pretrained(str(root / "tokenizer"))
            for name in ("vocab.json", "merges.txt"):  # the published layout's files, beside tokenizer.json
                (root / "tokenizer" / name).write_bytes((Path(scratch) / "bpe" / name).read_bytes())
    else:
        write_clip_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(PUBLISHED_SCHEDULER, indent=2))
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root
