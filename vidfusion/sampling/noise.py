"""Initial and ancestral noise, drawn exactly as diffusers draws it so that seeds carry over."""

from __future__ import annotations

import torch

from .names import FREE_INIT_FILTERS, NOISE_PRIORS

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


def frame_major_noise(shape: tuple[int, ...], generator: Generator, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """Noise (B, F, C, H, W) drawn as diffusers draws it for a (B*F, C, H, W) batch of frames; with one
    generator per video, each video draws its own frames from its own generator."""
    b, f, c, h, w = shape
    if isinstance(generator, list) and len(generator) > 1:
        return torch.stack([randn((f, c, h, w), g, device, dtype) for g in generator])
    return randn((b * f, c, h, w), generator, device, dtype).view(b, f, c, h, w)


def video_noise_sampler(shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype):
    """Ancestral noise for latents (B, C, F, H, W). diffusers steps its scheduler on (B*F, C, H, W), so the
    noise is drawn frame-major and then laid out as (B, C, F, H, W)."""
    b, c, f, h, w = shape

    def draw() -> torch.Tensor:
        return frame_major_noise((b, f, c, h, w), generator, device, dtype).permute(0, 2, 1, 3, 4).float()

    return draw



def check_noise_prior(prior: str, base_noise_ratio: float) -> None:
    """A clear error for an unknown prior, or a VideoFusion ratio outside [0, 1]."""
    if prior not in NOISE_PRIORS:
        raise ValueError(f"noise_prior must be one of {', '.join(NOISE_PRIORS)}, got {prior!r}")
    if prior != "iid" and (not isinstance(base_noise_ratio, (int, float)) or not 0 <= base_noise_ratio <= 1):
        raise ValueError(f"base_noise_ratio must be a number in [0, 1], got {base_noise_ratio!r}")


def initial_noise(shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype,
                  prior: str = "iid", base_noise_ratio: float = 0.5) -> torch.Tensor:
    """Initial latents (B, C, F, H, W). "iid": independent per frame (diffusers). "videofusion": the
    VideoFusion decomposition, per-frame noise = sqrt(l) * base + sqrt(1 - l) * residual_f with one base
    noise shared by all frames of a video; unit variance, frames correlated by l. The residual is drawn
    first, so l = 0 gives exactly the iid noise of the same seed."""
    check_noise_prior(prior, base_noise_ratio)
    noise = randn(shape, generator, device, dtype)
    if prior == "iid":
        return noise
    b, c, _, h, w = shape
    base = randn((b, c, 1, h, w), generator, device, dtype)
    return base_noise_ratio**0.5 * base + (1 - base_noise_ratio) ** 0.5 * noise



def free_init_filter(shape: tuple[int, int, int], kind: str, spatial: float = 0.25, temporal: float = 0.25,
                     order: int = 4, device: torch.device | str = "cpu") -> torch.Tensor:
    """FreeInit's low-pass mask over (F, H, W) in centred (fft-shifted) frequency coordinates."""
    if kind not in FREE_INIT_FILTERS:
        raise ValueError(f"free_init_filter must be one of {', '.join(FREE_INIT_FILTERS)}, got {kind!r}")
    for name, value in (("spatial", spatial), ("temporal", temporal)):
        if not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"free_init_{name} must be in (0, 1], got {value!r}")
    f, h, w = shape
    axes = [2 * torch.arange(n, device=device, dtype=torch.float32) / n - 1 for n in (f, h, w)]
    t, y, x = torch.meshgrid(*axes, indexing="ij")
    d2 = ((spatial / temporal) * t) ** 2 + y**2 + x**2
    if kind == "butterworth":
        return 1 / (1 + (d2 / spatial**2) ** order)
    if kind == "gaussian":
        return torch.exp(-d2 / (2 * spatial**2))
    return (d2 <= spatial * 2).float()


def mix_frequencies(low: torch.Tensor, high: torch.Tensor, low_pass: torch.Tensor) -> torch.Tensor:
    """Low frequencies of `low` plus high frequencies of `high`, over the (F, H, W) dims of (B, C, F, H, W)."""
    dims = (-3, -2, -1)
    low_f = torch.fft.fftshift(torch.fft.fftn(low.float(), dim=dims), dim=dims)
    high_f = torch.fft.fftshift(torch.fft.fftn(high.float(), dim=dims), dim=dims)
    mixed = low_f * low_pass + high_f * (1 - low_pass)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real.to(low.dtype)
