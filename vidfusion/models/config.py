"""Frozen model configs built from a checkpoint's config.json, with presets for known checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config.json that does not describe a model vidfusion can build."""


def _from_dict(cls, raw: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key.startswith("_") or key not in known:
            continue
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        config = cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass defaults cover all fields
        raise ConfigError(f"{where}: {exc}") from None
    config.validate(where)
    return config


@dataclass(frozen=True)
class UNetConfig:
    """UNet3DConditionModel config.

    Naming quirk kept from diffusers: `attention_head_dim` is passed down as "number of heads" and then
    swapped back by the blocks, so in effect attention layers have `channels // attention_head_dim` heads of
    width `attention_head_dim`; the first temporal transformer has 8 heads of that width.
    """

    sample_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "CrossAttnDownBlock3D",
        "DownBlock3D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock3D",
        "CrossAttnUpBlock3D",
        "CrossAttnUpBlock3D",
        "CrossAttnUpBlock3D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1024
    attention_head_dim: int | tuple[int, ...] = 64
    num_attention_heads: int | tuple[int, ...] | None = None
    time_cond_proj_dim: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "unet/config.json") -> UNetConfig:
        return _from_dict(cls, raw, where)

    @property
    def head_dims(self) -> tuple[int, ...]:
        heads = self.attention_head_dim
        if isinstance(heads, int):
            return (heads,) * len(self.down_block_types)
        return tuple(heads)

    def validate(self, where: str) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"{where}: down_block_types, up_block_types and block_out_channels differ in length")
        for name in self.down_block_types:
            if name not in ("CrossAttnDownBlock3D", "DownBlock3D"):
                raise ConfigError(f"{where}: unsupported down block type {name!r}")
        for name in self.up_block_types:
            if name not in ("CrossAttnUpBlock3D", "UpBlock3D"):
                raise ConfigError(f"{where}: unsupported up block type {name!r}")
        if self.num_attention_heads is not None:
            raise ConfigError(f"{where}: num_attention_heads is not supported (use attention_head_dim, as diffusers)")
        if self.time_cond_proj_dim is not None and (not isinstance(self.time_cond_proj_dim, int)
                                                    or self.time_cond_proj_dim < 2):
            raise ConfigError(f"{where}: time_cond_proj_dim must be an integer >= 2, got {self.time_cond_proj_dim!r}")
        if self.act_fn != "silu":
            raise ConfigError(f"{where}: act_fn {self.act_fn!r} is not supported (only 'silu')")
        if len(self.head_dims) != n:
            raise ConfigError(f"{where}: attention_head_dim needs one entry per block")
        for channels, heads in zip(self.block_out_channels, self.head_dims):
            if channels % heads or channels % self.norm_num_groups:
                raise ConfigError(
                    f"{where}: block width {channels} is not divisible by attention_head_dim {heads} "
                    f"/ norm_num_groups {self.norm_num_groups}"
                )


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL config (the Stable Diffusion 2 VAE for the published checkpoints)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "vae/config.json") -> VAEConfig:
        return _from_dict(cls, raw, where)

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, where: str) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(f"{where}: block types and block_out_channels differ in length")
        if set(self.down_block_types) != {"DownEncoderBlock2D"} or set(self.up_block_types) != {"UpDecoderBlock2D"}:
            raise ConfigError(f"{where}: only DownEncoderBlock2D / UpDecoderBlock2D VAEs are supported")
        if self.act_fn != "silu":
            raise ConfigError(f"{where}: act_fn {self.act_fn!r} is not supported (only 'silu')")


# The published text-to-video-ms-1.7b shapes (Zeroscope v2 576w/XL use the same networks).
FULL_UNET = UNetConfig()
FULL_VAE = VAEConfig(sample_size=256)
FULL_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "hidden_act": "gelu",
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# Tiny shapes for smoke tests: every kind of block is present, everything runs in well under a second.
TINY_UNET = UNetConfig(
    sample_size=8,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
)
TINY_VAE = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)
TINY_TEXT_ENCODER = dict(
    FULL_TEXT_ENCODER,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=32,
    vocab_size=1000,
)

# The tiny shapes the original ModelScope format can hold, so `convert` takes them both ways: GroupNorm's 32 groups
# (the original code fixes them), an OpenCLIP text tower of 64-wide heads and CLIP's whole 49408-token vocabulary
# (an original folder carries no tokenizer: OpenCLIP's BPE is implied).
TINY_ORIGINAL_UNET = dataclasses.replace(TINY_UNET, norm_num_groups=32, cross_attention_dim=64)
TINY_ORIGINAL_VAE = dataclasses.replace(TINY_VAE, block_out_channels=(32, 64), norm_num_groups=32)
TINY_ORIGINAL_TEXT_ENCODER = dict(TINY_TEXT_ENCODER, hidden_size=64, intermediate_size=128, num_attention_heads=1,
                                  projection_dim=64, vocab_size=FULL_TEXT_ENCODER["vocab_size"])

PRESETS = {
    "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER),
    "tiny-original": (TINY_ORIGINAL_UNET, TINY_ORIGINAL_VAE, TINY_ORIGINAL_TEXT_ENCODER),
    "full": (FULL_UNET, FULL_VAE, FULL_TEXT_ENCODER),
}
