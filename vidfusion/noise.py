"""Initial and ancestral noise, drawn exactly as diffusers draws it so that seeds carry over."""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise. A CPU generator draws on the CPU, then moves; a list draws one row each;
    no generator draws from torch's global RNG of `device` (diffusers' `randn_tensor`)."""
    device = torch.device(device)
    rand_device = device
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"cannot draw a {device.type} tensor from a {gen_type} generator; "
                                 "pass a CPU generator or one on the target device")
            rand_device = torch.device("cpu")
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]} videos; pass one per video")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(rows).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def video_noise_sampler(shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype):
    """Ancestral noise for latents (B, C, F, H, W). diffusers steps its scheduler on (B*F, C, H, W), so the
    noise is drawn frame-major and then laid out as (B, C, F, H, W). With one generator per video, each
    video draws its own frames from its own generator."""
    b, c, f, h, w = shape

    def draw() -> torch.Tensor:
        if isinstance(generator, list) and len(generator) > 1:
            parts = [randn((f, c, h, w), g, device, dtype) for g in generator]
            noise = torch.stack(parts)
        else:
            noise = randn((b * f, c, h, w), generator, device, dtype).view(b, f, c, h, w)
        return noise.permute(0, 2, 1, 3, 4).float()

    return draw
