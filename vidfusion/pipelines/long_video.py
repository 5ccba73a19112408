"""Videos longer than the training length, loops and prompt travel (FreeNoise-style).

The UNet only ever sees `window_size` frames at a time; the predictions of overlapping windows are fused
with pyramid weights, so peak UNet memory depends on the window, not on num_frames. Initial noise is
rescheduled (later windows reuse shuffled noise of earlier ones) so distant windows stay consistent. With
`loop=True` the windows run around the end of the clip back to its start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..sampling.noise import Generator

# the family's longest training length (Zeroscope v2: 24 frames): a clip this short always runs all frames at once
ALL_AT_ONCE_FRAMES = 24


def default_window(num_frames: int, training_frames: int | None) -> int:
    """Frames the UNet sees at once when window_size is not given: the whole clip up to ALL_AT_ONCE_FRAMES (or when
    `training_frames` is None: the diffusers-named classes never window by default), else the training length."""
    if training_frames is None or num_frames <= ALL_AT_ONCE_FRAMES:
        return max(num_frames, 2)
    return training_frames


def check_window(num_frames: int, window_size: int, window_stride: int | None, loop: bool) -> int:
    """Validate the window options; returns the stride (default window_size // 4)."""
    if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 2:
        raise ValueError(f"window_size must be an integer >= 2, got {window_size!r}")
    stride = max(1, window_size // 4) if window_stride is None else window_stride
    if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= window_size:
        raise ValueError(f"window_stride must be an integer in [1, window_size={window_size}], got {window_stride!r}")
    if loop and num_frames < 2:
        raise ValueError("loop=True needs at least 2 frames")
    return stride


def frame_windows(num_frames: int, size: int, stride: int, loop: bool, call: int = 0) -> list[list[int]] | None:
    """Frame indices of each window, or None when one plain UNet call covers the clip."""
    if not loop:
        if num_frames <= size:
            return None
        starts = list(range(0, num_frames - size + 1, stride))
        if starts[-1] != num_frames - size:
            starts.append(num_frames - size)
        return [list(range(s, s + size)) for s in starts]
    if num_frames <= size:  # one window over the whole circle, rotated a little further at every call
        offset = (call * stride) % num_frames
        return [[(offset + j) % num_frames for j in range(num_frames)]]
    count = math.ceil(num_frames / stride)
    return [[(k * stride + j) % num_frames for j in range(size)] for k in range(count)]


def pyramid_weights(size: int, device: torch.device) -> torch.Tensor:
    """1, 2, ..., 2, 1: a window's middle frames count more than its edges."""
    j = torch.arange(size, device=device)
    return torch.minimum(j + 1, size - j).float()


def reschedule_noise(noise: torch.Tensor, size: int, stride: int, generator: Generator) -> torch.Tensor:
    """FreeNoise: frames after the first window get a shuffled copy of the noise `size` frames earlier.
    noise (B, C, F, H, W); with one generator per video, video b's permutations come from generator[b] (so a batch
    gives the same videos as one call per video)."""
    if isinstance(generator, list):
        return torch.cat([_reschedule(noise[b:b + 1], size, stride, gen) for b, gen in enumerate(generator)])
    return _reschedule(noise, size, stride, generator)


def _reschedule(noise: torch.Tensor, size: int, stride: int, gen: torch.Generator | None) -> torch.Tensor:
    gen = gen if gen is None or gen.device.type == "cpu" else None
    noise = noise.clone()
    frames = noise.shape[2]
    for start in range(size, frames, stride):
        src = max(0, start - size)
        length = min(stride, frames - start)
        order = torch.randperm(min(stride, start - src), generator=gen)[:length] + src
        noise[:, :, start:start + length] = noise[:, :, order.to(noise.device)]
    return noise


def windowed(model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], context: Any,
             per_frame_context: bool, num_frames: int, size: int, stride: int, loop: bool):
    """Wrap `model_fn(x, t, context)` (x (B, C, F, H, W)) into `fn(x, t)` that runs it window by window and
    fuses the overlapping predictions. `context` is passed through as it is (text states or their keys and
    values); a per-frame context is a (N*F, S, D) tensor and is sliced like the frames."""
    calls = [0]

    def context_for(idx: list[int] | None) -> Any:
        text = current(context)
        if idx is None or not per_frame_context:
            return text
        per_video = text.view(-1, num_frames, *text.shape[1:])  # (N, F, S, D)
        return per_video[:, idx].reshape(-1, *text.shape[1:])

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        windows = frame_windows(num_frames, size, stride, loop, calls[0])
        calls[0] += 1
        if windows is None:
            return model_fn(x, t, current(context))
        out = torch.zeros_like(x)
        total = torch.zeros(num_frames, device=x.device)
        for idx in windows:
            weight = pyramid_weights(len(idx), x.device)
            pred = model_fn(x[:, :, idx], t, context_for(idx))
            out[:, :, idx] += pred * weight.view(1, 1, -1, 1, 1)
            total[idx] += weight
        return out / total.view(1, 1, -1, 1, 1)

    return fn


def current(context: Any) -> Any:
    """The text states for the step being computed: a StepContexts (prompt editing) resolves to its current
    segment, anything else is the states themselves."""
    return getattr(context, "current", context)


def keyframe_weights(keyframes: list[int], num_frames: int) -> torch.Tensor:
    """(F, K) linear interpolation weights between prompt keyframes; constant before the first / after the last."""
    weights = torch.zeros(num_frames, len(keyframes))
    for f in range(num_frames):
        if f <= keyframes[0]:
            weights[f, 0] = 1
        elif f >= keyframes[-1]:
            weights[f, -1] = 1
        else:
            k = max(i for i, key in enumerate(keyframes) if key <= f)
            a = (f - keyframes[k]) / (keyframes[k + 1] - keyframes[k])
            weights[f, k], weights[f, k + 1] = 1 - a, a
    return weights


def check_keyframes(prompt: dict, num_frames: int) -> tuple[list[int], list[str]]:
    if not prompt:
        raise ValueError("a prompt dict needs at least one {frame: text} keyframe")
    keys = sorted(prompt)
    for key in keys:
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < num_frames:
            raise ValueError(f"prompt keyframe {key!r} is out of range: keys must be frame indices in "
                             f"[0, {num_frames - 1}]")
        if not isinstance(prompt[key], str):
            raise ValueError(f"prompt keyframe {key} must map to a string, got {prompt[key]!r}")
    return keys, [prompt[k] for k in keys]
