"""Prompt encoding with transformers' CLIP tokenizer and text model."""

from __future__ import annotations

import logging

import torch
from transformers import CLIPTextModel

logger = logging.getLogger("vidfusion")


def tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, attention mask), each (N, max_length), padded; too-long prompts are truncated with a warning."""
    max_len = tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    ids = tokens.input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full):
        dropped = tokenizer.batch_decode(full[:, max_len - 1:-1])
        logger.warning(
            "The following part of your input was truncated because CLIP can only handle sequences up to "
            "%d tokens: %s", max_len, dropped
        )
    return ids, tokens.attention_mask


@torch.no_grad()
def encode_text(text_encoder: CLIPTextModel, tokenizer, prompts: list[str], device: torch.device,
                clip_skip: int | None = None) -> torch.Tensor:
    """Hidden states (N, 77, D) of the last layer, or of `clip_skip` layers before it (then final-normed)."""
    ids, mask = tokenize(tokenizer, prompts)
    ids = ids.to(device)
    mask = mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    if clip_skip is None:
        return text_encoder(ids, attention_mask=mask)[0]
    hidden = text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    if not 0 <= clip_skip < len(hidden) - 1:
        raise ValueError(f"clip_skip must be between 0 and {len(hidden) - 2}, got {clip_skip}")
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden[-(clip_skip + 1)])
