"""Write a random-weight checkpoint in the published diffusers layout (for smoke tests and benchmarks)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import PRESETS
from .unet3d import UNet3D
from .vae import AutoencoderKL

# scheduler_config.json as published with damo-vilab/text-to-video-ms-1.7b
PUBLISHED_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.15.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "TextToVideoSDPipeline",
    "_diffusers_version": "0.15.0.dev0",
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet3DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
WORDS = ("a", "an", "the", "cat", "dog", "is", "on", "in", "of", "and", "surfing", "spiderman", "astronaut",
         "riding", "horse", "wave", "beach", "sunset", "city", "night", "blurry", "low", "quality")


def bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = WORDS) -> None:
    """A small byte-level BPE vocabulary in CLIP's format (vocab.json + merges.txt), with merges for `words`."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
                vocab.append(merged)
            parts = [merged] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    (folder / "vocab.json").write_text(json.dumps(ids))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
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


def config_json(cfg, class_name: str) -> dict:
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    return {"_class_name": class_name, "_diffusers_version": "0.15.0.dev0", **data}


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
    write_clip_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(PUBLISHED_SCHEDULER, indent=2))
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root
