"""Constants and files of the published diffusers layout (damo-vilab/text-to-video-ms-1.7b): the scheduler config
and model_index.json as published, config.json writing, CLIP's byte-level BPE files. Production code and the
random-checkpoint writer (tests, benchmarks) both take them from here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

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
# T2V-Turbo (MS): the LoRA that distils the model into a 4-step sampler with embedded guidance (`--turbo`)
TURBO_LORA = ("jiachenli-ucsb/T2V-Turbo-MS", "unet_lora.pt")
MODEL_INDEX = {
    "_class_name": "TextToVideoSDPipeline",
    "_diffusers_version": "0.15.0.dev0",
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet3DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


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


def write_bpe_files(folder: Path, merges: list[str]) -> None:
    """CLIP's vocab.json + merges.txt for these merges: the 256 byte symbols, the same with "</w>", one token per
    merge, then <|startoftext|> and <|endoftext|>."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    (folder / "vocab.json").write_text(json.dumps(ids))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def config_json(cfg: Any, class_name: str) -> dict[str, Any]:
    """A config dataclass as the config.json diffusers writes."""
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    return {"_class_name": class_name, "_diffusers_version": "0.15.0.dev0", **data}
