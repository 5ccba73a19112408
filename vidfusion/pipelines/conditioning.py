"""Pictures fixed in a text-to-video generation (training-free): a first frame (`image=`), a last frame
(`last_image=`), any frames (`images={frame: picture}`), or the end of another video (`extend`).

After every denoising step the conditioned frames' latents are replaced by the picture's latent noised to the
next step's level, in the sampler's own space (RePaint-style; `sampling.start_state`), blended by per-frame
weights (`image_weights`, default 1 on a conditioned frame, 0 elsewhere); after the last step they are the
picture's latent itself. This is guidance of a text-to-video model, not an image-to-video model: the other
frames follow the picture only as far as the model's temporal layers carry it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..media.video_io import resize_video, video_to_tensor
from ..sampling.noise import randn
from ..sampling.samplers import start_state
from ..sampling.schedules import NoiseSchedule


def picture_to_tensor(picture: Any) -> torch.Tensor:
    """A PIL image, an array (H, W, 3) uint8 / floats in [0, 1], a tensor (3, H, W) in [0, 1], or an image file
    -> float32 (3, H, W) in [-1, 1]."""
    if isinstance(picture, (str, os.PathLike)):
        from PIL import Image

        if not os.path.isfile(picture):
            raise FileNotFoundError(f"image '{picture}' does not exist")
        picture = Image.open(picture)
    if hasattr(picture, "convert"):
        picture = np.asarray(picture.convert("RGB"))
    is_array = isinstance(picture, np.ndarray) and picture.ndim == 3 and picture.shape[-1] == 3
    is_tensor = isinstance(picture, torch.Tensor) and picture.dim() == 3 and picture.shape[0] == 3
    if not (is_array or is_tensor):
        raise ValueError("an image must be a PIL image, an (H, W, 3) array, a (3, H, W) tensor or an image file")
    return video_to_tensor(picture[None])[0, 0]  # a one-frame video: the same conversion as video inputs


def conditioned_frames(num_frames: int, image: Any = None, last_image: Any = None,
                       images: dict[int, Any] | None = None) -> dict[int, Any]:
    """{frame: picture} from the three ways of giving them; frames checked against num_frames."""
    frames = dict(images or {})
    if image is not None:
        frames[0] = image
    if last_image is not None:
        frames[num_frames - 1] = last_image
    for frame in frames:
        if not isinstance(frame, int) or isinstance(frame, bool) or not 0 <= frame < num_frames:
            raise ValueError(f"images: frame {frame!r} is not in [0, {num_frames - 1}]")
    return dict(sorted(frames.items()))


def frame_weights(frames: dict[int, Any], num_frames: int, weights: Any = None) -> torch.Tensor:
    """(F,) blend weights: `weights` given per frame (a list of F numbers, or {frame: weight}), else 1 on the
    conditioned frames and 0 elsewhere."""
    out = torch.zeros(num_frames)
    if weights is None:
        out[list(frames)] = 1.0
    elif isinstance(weights, dict):
        for frame, w in weights.items():
            out[frame] = float(w)
    else:
        if len(weights) != num_frames:
            raise ValueError(f"image_weights has {len(weights)} entries for {num_frames} frames")
        out = torch.tensor([float(w) for w in weights])
    if not ((out >= 0) & (out <= 1)).all():
        raise ValueError("image_weights must be in [0, 1]")
    return out


class ImageConditioning:
    """The step hook: after step i (0-based) the latents (B, C, F, h, w) get, on each weighted frame, the
    picture's latent noised to step i + 1 (the clean latent after the last step)."""

    def __init__(self, latents: torch.Tensor, weights: torch.Tensor, sampler: str, schedule: NoiseSchedule,
                 generator: Any):
        self.picture = latents  # (B, C, F, h, w): each frame's picture latent (zeros where unweighted)
        self.weights = weights.view(1, 1, -1, 1, 1).to(latents.device)
        self.sampler, self.schedule = sampler, schedule
        self.noise = _own_noise(tuple(latents.shape), generator, latents.device)

    def target(self, step: int) -> torch.Tensor:
        """The conditioned latents after `step` (0-based): noised to the next step's start, or clean at the end."""
        if step + 1 >= self.schedule.num_steps:
            return self.picture
        return start_state(self.sampler, self.schedule, self.picture, self.noise, step + 1)

    def __call__(self, step: int, x: torch.Tensor) -> torch.Tensor:
        return x + self.weights * (self.target(step).to(x.dtype) - x)


def _own_noise(shape: tuple[int, ...], generator: Any, device: torch.device) -> torch.Tensor:
    """Noise for the pictures from generators seeded off the call's own (their initial seeds), so the call's
    generators draw exactly what they draw without pictures (weight 0 gives the unconditioned video bit for bit)."""
    gens = generator if isinstance(generator, list) else [generator] * shape[0]
    parts = []
    for gen in gens:
        own = torch.Generator().manual_seed(gen.initial_seed() + 7919) if gen is not None else None
        parts.append(randn((1, *shape[1:]), own, torch.device("cpu"), torch.float32))
    return torch.cat(parts).to(device)


def still_start(pipe: Any, plan: Any, noise: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`image_init_strength`: the first picture's latent over every frame, noised to the first step that strength
    asks for (as video-to-video starts), and that step. noise (B, C, F, h, w): the call's initial noise."""
    from ..sampling.samplers import first_step

    first = min(plan.images)
    still = encode_pictures(pipe, {first: plan.images[first]}, tuple(noise.shape), plan.height, plan.width)
    still = still[:, :, first:first + 1].expand_as(noise)
    start = first_step(plan.base, plan.schedule, plan.image_init_strength)
    if start >= plan.schedule.num_steps:
        return still.clone(), start
    return start_state(plan.base, plan.schedule, still, noise.float(), start), start


def encode_pictures(pipe: Any, frames: dict[int, Any], shape: tuple[int, ...], height: int, width: int
                    ) -> torch.Tensor:
    """Each picture resized to the video, VAE-encoded (posterior mean, scaled): latents (B, C, F, h, w), zeros on
    frames without a picture."""
    b, c, f, h, w = shape
    out = torch.zeros(shape, device=pipe.device)
    if not frames:
        return out
    pixels = torch.stack([picture_to_tensor(p) for p in frames.values()])  # (K, 3, H', W')
    pixels = resize_video(pixels[None], height, width)[0]
    pipe._activate(pipe.vae)
    mean, _ = pipe.vae.encode(pixels.to(device=pipe.device, dtype=pipe.vae.dtype))
    latents = mean.float() * pipe.vae.config.scaling_factor  # (K, C, h, w)
    out[:, :, list(frames)] = latents.permute(1, 0, 2, 3)[None].expand(b, -1, -1, -1, -1)
    pipe._activate(pipe.unet)
    return out


def extend(pipe: Any, video: Any, prompt: Any, num_frames: int = 16, overlap: int = 4, **kwargs: Any
           ) -> tuple[np.ndarray, dict[str, Any]]:
    """Continue a video: a new clip of `num_frames` whose first `overlap` frames are conditioned on the input's
    last frames; returns (the input followed by the new clip's other frames (F, H, W, 3) floats in [0, 1], the
    settings that ran: num_frames is the generated clip's, with its overlap). `video`: frames (F, H, W, 3) uint8 /
    floats in [0, 1] or a video file."""
    from ..media.video_io import read_video

    frames = read_video(video) if isinstance(video, (str, os.PathLike)) else np.asarray(video)
    frames = frames.astype(np.float32) / 255 if frames.dtype == np.uint8 else frames.astype(np.float32)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video must be frames (F, H, W, 3) or a video file, got shape {frames.shape}")
    if not isinstance(overlap, int) or not 1 <= overlap < num_frames or overlap > len(frames):
        raise ValueError(f"overlap must be an integer in [1, {min(num_frames - 1, len(frames))}], got {overlap!r}")
    height, width = frames.shape[1:3]
    if height % 8 or width % 8:
        raise ValueError(f"the video is {width}x{height}; extending needs sizes that are multiples of 8")
    tail = frames[len(frames) - overlap:]
    out = pipe(prompt, num_frames=num_frames, height=height, width=width, output_type="np",
               images={i: tail[i] for i in range(overlap)}, **kwargs)
    new = out.frames[0][overlap:]
    return np.concatenate([frames, new]), {**out.settings, "overlap": overlap}
