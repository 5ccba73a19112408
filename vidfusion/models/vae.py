"""AutoencoderKL (encoder and decoder) on channels-last frames, with frame-chunked and tiled decoding."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import VAEConfig
from .layers import Downsample, Linear, ResnetBlock, Upsample, attention, conv_cl, group_norm_cl, group_norm_silu
from .winograd import WinogradConv2d

EPS = 1e-6
CPU_CHUNK_BYTES = 16 << 20  # the largest activation of a group of frames decoded together on CPU


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels of a frame (mid block), with its own GroupNorm."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        y = group_norm_cl(self.group_norm, x, batch_dims=1).reshape(n, h * w, c)
        y = attention(self.to_q(y), self.to_k(y), self.to_v(y), heads=1)
        return x + self.to_out[0](y).view(n, h, w, c)


class MidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, None, groups, EPS, conv3x3=WinogradConv2d) for _ in range(2)])
        if add_attention:
            self.attentions = nn.ModuleList([VAEAttention(channels, groups)])
        self.add_attention = add_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i in range(len(ch)):
            inp, out = out, ch[i]
            block = nn.Module()
            block.resnets = nn.ModuleList(
                [ResnetBlock(inp if j == 0 else out, out, None, groups, EPS, conv3x3=WinogradConv2d)
                 for j in range(cfg.layers_per_block)]
            )
            if i < len(ch) - 1:
                block.downsamplers = nn.ModuleList([Downsample(out, padding=0)])
            self.down_blocks.append(block)
        self.mid_block = MidBlock2D(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_cl(self.conv_in, x)  # (N, H, W, C)
        for block in self.down_blocks:
            for resnet in block.resnets:
                x = resnet(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
        x = self.mid_block(x)
        return conv_cl(self.conv_out, group_norm_silu(self.conv_norm_out, x, batch_dims=1))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock2D(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList()
        out = ch[0]
        for i in range(len(ch)):
            inp, out = out, ch[i]
            block = nn.Module()
            block.resnets = nn.ModuleList(
                [ResnetBlock(inp if j == 0 else out, out, None, groups, EPS, conv3x3=WinogradConv2d)
                 for j in range(cfg.layers_per_block + 1)]
            )
            if i < len(ch) - 1:
                block.upsamplers = nn.ModuleList([Upsample(out)])
            self.up_blocks.append(block)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, chunk_bytes: int | None = None) -> torch.Tensor:
        """z (N, h, w, C) -> (N, H, W, 3). With chunk_bytes, each stage (mid block, then every up block) sees as many
        frames at once as keep its largest activation within that size: all frames at the latent resolution (large
        products for the 512-channel convolutions), fewer as the maps grow (bounded memory), each group finished
        before the next."""
        groups = _groups(z, z.shape[1] * z.shape[2] * self.conv_in.out_channels, chunk_bytes)
        if groups is not None:
            return torch.cat([self(part, chunk_bytes) for part in groups])
        return self._up(self.mid_block(conv_cl(self.conv_in, z)), 0, chunk_bytes)  # (N, h, w, C)

    def _up(self, x: torch.Tensor, index: int, chunk_bytes: int | None) -> torch.Tensor:
        if index == len(self.up_blocks):
            return conv_cl(self.conv_out, group_norm_silu(self.conv_norm_out, x, batch_dims=1))
        block = self.up_blocks[index]
        scale = 2 if hasattr(block, "upsamplers") else 1
        largest = scale * x.shape[1] * scale * x.shape[2] * max(x.shape[-1], block.resnets[-1].conv2.out_channels)
        groups = _groups(x, largest, chunk_bytes)
        if groups is not None:
            return torch.cat([self._up(part, index, chunk_bytes) for part in groups])
        for resnet in block.resnets:
            x = resnet(x)
        if hasattr(block, "upsamplers"):
            x = block.upsamplers[0](x)
        return self._up(x, index + 1, chunk_bytes)


def _groups(x: torch.Tensor, elements_per_frame: int, chunk_bytes: int | None) -> tuple[torch.Tensor, ...] | None:
    """x split into groups of frames whose largest activation (`elements_per_frame` values each) fits chunk_bytes;
    None when all of x fits at once."""
    frames = max(1, chunk_bytes // (elements_per_frame * x.element_size())) if chunk_bytes else x.shape[0]
    return x.split(frames) if frames < x.shape[0] else None


class AutoencoderKL(nn.Module):
    """The VAE. `decode`/`encode` take and return NCHW tensors, processing `frame_chunk` frames at a time."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.frame_chunk: int | None = None  # frames decoded at once (None: 16 on CPU, 8 on GPU); bounds memory
        self.use_slicing = False
        self.use_tiling = False
        self.tile_latent_size = max(cfg.sample_size // cfg.scale_factor, 8)
        self.tile_overlap = 0.25

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def _chunk(self, device: torch.device) -> int:
        return self.frame_chunk or (16 if device.type == "cpu" else 8)

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        # z (N, h, w, C) channels-last latents -> (N, H, W, 3). On CPU the decoder regroups frames per resolution
        # (CPU_CHUNK_BYTES per activation: fresh tensors up to that size reuse heap memory instead of page-faulting)
        if self.config.use_post_quant_conv:
            z = conv_cl(self.post_quant_conv, z)
        return self.decoder(z, CPU_CHUNK_BYTES if z.device.type == "cpu" and not self.use_slicing else None)

    def _decode_tiled(self, z: torch.Tensor) -> torch.Tensor:
        """Decode overlapping latent tiles and blend the overlaps linearly, so no seams show."""
        n, h, w, _ = z.shape
        f = self.config.scale_factor
        tile = self.tile_latent_size
        stride = max(int(tile * (1 - self.tile_overlap)), 1)
        out = torch.zeros(n, h * f, w * f, self.config.out_channels, dtype=torch.float32, device=z.device)
        weight = torch.zeros(1, h * f, w * f, 1, dtype=torch.float32, device=z.device)
        ys = list(range(0, max(h - tile, 0) + 1, stride))
        xs = list(range(0, max(w - tile, 0) + 1, stride))
        if ys[-1] + tile < h:
            ys.append(h - tile)
        if xs[-1] + tile < w:
            xs.append(w - tile)
        for y0 in ys:
            for x0 in xs:
                part = self._decode_frames(z[:, y0:y0 + tile, x0:x0 + tile]).float()
                th, tw = part.shape[1:3]
                ramp_y = _ramp(th, (tile - stride) * f if y0 > 0 else 0, (tile - stride) * f if y0 + tile < h else 0)
                ramp_x = _ramp(tw, (tile - stride) * f if x0 > 0 else 0, (tile - stride) * f if x0 + tile < w else 0)
                mask = (ramp_y[:, None] * ramp_x[None, :]).to(z.device)[None, :, :, None]
                out[:, y0 * f:y0 * f + th, x0 * f:x0 * f + tw] += part * mask
                weight[:, y0 * f:y0 * f + th, x0 * f:x0 * f + tw] += mask
        return (out / weight).to(z.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, C, h, w), already divided by scaling_factor -> images (N, 3, H, W) in [-1, 1]."""
        z = latents.permute(0, 2, 3, 1)
        chunk = 1 if self.use_slicing else self._chunk(z.device)
        tiled = self.use_tiling and max(z.shape[1], z.shape[2]) > self.tile_latent_size
        frames = [self._decode_tiled(c) if tiled else self._decode_frames(c) for c in z.split(chunk)]
        return torch.cat(frames).permute(0, 3, 1, 2)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) in [-1, 1] -> (mean, logvar) of the latent distribution, each (N, C, h, w)."""
        chunk = 1 if self.use_slicing else self._chunk(images.device)
        moments = []
        for part in images.permute(0, 2, 3, 1).split(chunk):
            m = self.encoder(part)
            if self.config.use_quant_conv:
                m = conv_cl(self.quant_conv, m)
            moments.append(m)
        mean, logvar = torch.cat(moments).permute(0, 3, 1, 2).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


def _ramp(length: int, fade_in: int, fade_out: int) -> torch.Tensor:
    """1-D blending weights: linear fade over the overlapping borders, 1 elsewhere (never exactly 0)."""
    w = torch.ones(length)
    if fade_in:
        w[:fade_in] = torch.linspace(1.0 / (fade_in + 1), 1.0, fade_in + 1)[:-1]
    if fade_out:
        w[-fade_out:] = torch.linspace(1.0, 1.0 / (fade_out + 1), fade_out + 1)[1:]
    return w


# Least-squares map from the 4 latent channels (as the UNet sees them) to RGB in [-1, 1] for SD-family VAEs
# (the widely used "latent RGB factors").
LATENT_RGB = torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                           [-0.2120, -0.2616, -0.7177]])


def approximate_rgb(latents: torch.Tensor) -> np.ndarray:
    """latents (B, 4, F, h, w) -> uint8 (B, F, h, w, 3) without running the decoder (for live previews)."""
    if latents.dim() != 5 or latents.shape[1] != 4:
        raise ValueError(f"preview needs latents of shape (B, 4, F, h, w), got {tuple(latents.shape)}")
    rgb = torch.einsum("bcfhw,cr->bfhwr", latents.detach().float().cpu(), LATENT_RGB)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
