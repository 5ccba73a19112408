"""TAESD's decoder (madebyollin's tiny autoencoder; diffusers' AutoencoderTiny): the ModelScope VAE's latent space
(Stable Diffusion's KL-f8, scaled by 0.18215) decoded with ~18x fewer FLOPs, for drafts and previews. Module names
equal diffusers' `decoder.layers.*` keys; the original `taesd_decoder.pth` is the same Sequential shifted by one
(its index 0 is the clamp). TAESDV (madebyollin/taesdv) adds memory: each of its blocks also sees its input of the
previous frame, for less flicker; its module names equal `taesdv.pth`'s `decoder.*` keys. Files are read by
`checkpoints.tiny_decoder`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TinyBlock(nn.Module):
    """Three 3x3 convs with ReLUs, a residual (1x1 conv when the width changes), ReLU."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(n_out, n_out, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(n_out, n_out, 3, padding=1))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.conv(x).add_(self.skip(x)))  # in place: one pass less over the block's output


class TinyDecoder(nn.Module):
    """latents (N, 4, h, w), as the UNet sees them -> images (N, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, latent_channels: int = 4, out_channels: int = 3, blocks: tuple[int, ...] = (3, 3, 3, 1),
                 channels: tuple[int, ...] = (64, 64, 64, 64), upsampling: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, channels[0], 3, padding=1), nn.ReLU(inplace=True)]
        for i, count in enumerate(blocks):
            final = i == len(blocks) - 1
            layers += [TinyBlock(channels[i], channels[i]) for _ in range(count)]
            if not final:
                layers.append(nn.Upsample(scale_factor=upsampling, mode="nearest"))
            layers.append(nn.Conv2d(channels[i], out_channels if final else channels[i], 3, padding=1, bias=final))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(latents / 3) * 3  # TAESD's soft clamp
        return self.layers(x).mul(2).sub(1)


class Clamp(nn.Module):
    """TAESD's soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemoryBlock(nn.Module):
    """A TinyBlock whose first conv also sees this block's input of the previous frame (TAESDV's MemBlock)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, memory], 1)) + x)


class TinyVideoDecoder(nn.Module):
    """TAESDV's decoder: latents (B*F, 4, h, w) of `frames`-frame videos -> images (B*F, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, latent_channels: int = 4, channels: int = 64):
        super().__init__()

        def stage() -> list[nn.Module]:
            return [MemoryBlock(channels) for _ in range(3)] + [
                nn.Upsample(scale_factor=2), nn.Conv2d(channels, channels, 3, padding=1, bias=False)]

        self.decoder = nn.Sequential(Clamp(), nn.Conv2d(latent_channels, channels, 3, padding=1), nn.ReLU(),
                                     *stage(), *stage(), *stage(), MemoryBlock(channels),
                                     nn.Conv2d(channels, 3, 3, padding=1))

    def forward(self, latents: torch.Tensor, frames: int) -> torch.Tensor:
        x = latents
        for layer in self.decoder:
            if isinstance(layer, MemoryBlock):  # memory: this input one frame earlier (zeros before the first)
                video = x.unflatten(0, (-1, frames))  # (B, F, C, h, w)
                x = layer(x, torch.cat([torch.zeros_like(video[:, :1]), video[:, :-1]], 1).flatten(0, 1))
            else:
                x = layer(x)
        return x.mul(2).sub(1)


@torch.no_grad()
def decode_frames(decoder: TinyDecoder | TinyVideoDecoder, latents: torch.Tensor) -> torch.Tensor:
    """latents (B, C, F, h, w) as the sampler returns them -> video (B, F, 3, H, W) float32 in [-1, 1]."""
    b, c, f, h, w = latents.shape
    dtype = next(decoder.parameters()).dtype
    frames = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).to(dtype)
    frames = frames.contiguous(memory_format=torch.channels_last)  # oneDNN's fast conv layout on CPU
    images = decoder(frames, f) if isinstance(decoder, TinyVideoDecoder) else decoder(frames)
    return images.reshape(b, f, *images.shape[1:]).float()


def preview_frames(decoder: TinyDecoder | TinyVideoDecoder, latents: torch.Tensor) -> np.ndarray:
    """latents (B, C, F, h, w) -> uint8 frames (B, F, H, W, 3) by the tiny decoder (live previews)."""
    video = decode_frames(decoder, latents.to(next(decoder.parameters()).device))  # (B, F, 3, H, W) in [-1, 1]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
