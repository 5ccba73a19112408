"""Training data for LoRA fine-tuning: (video, caption) pairs from a folder, a JSONL / CSV or one video, and clips
read as the model sees them (frames at a rate, resized and centre-cropped, in [-1, 1])."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi")


class TrainDataError(ValueError):
    """Training data that cannot be used: names the clip or file and what to do."""


def find_clips(data: str | os.PathLike, prompt: str | None = None) -> list[tuple[Path, str]]:
    """(video, caption) pairs: a folder of videos with same-name .txt captions, a JSONL / CSV manifest with
    `video` and `prompt` columns (paths relative to it), or one video with `prompt`."""
    path = Path(data)
    if not path.exists():
        raise TrainDataError(f"training data '{path}' does not exist")
    if path.is_dir():
        videos = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            raise TrainDataError(f"{path}: no videos ({', '.join(VIDEO_SUFFIXES)}) in the folder")
        missing = [v.name for v in videos if not v.with_suffix(".txt").is_file()]
        if missing:
            raise TrainDataError(f"{path}: no caption for {', '.join(missing[:5])}: add a same-name .txt file "
                                 f"(e.g. {Path(missing[0]).with_suffix('.txt')})")
        return [(v, v.with_suffix(".txt").read_text().strip()) for v in videos]
    if path.suffix.lower() in (".jsonl", ".csv"):
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        pairs = []
        for number, row in enumerate(rows, 1):
            if not row.get("video") or not row.get("prompt"):
                raise TrainDataError(f"{path}, row {number}: needs 'video' and 'prompt'")
            video = Path(row["video"]) if Path(row["video"]).is_absolute() else path.parent / row["video"]
            pairs.append((video, str(row["prompt"])))
        return pairs
    if prompt is None:
        raise TrainDataError(f"{path} is one video: pass its caption with --prompt")
    return [(path, prompt)]


def read_clip(path: Path, frames: int, fps: int, height: int, width: int) -> torch.Tensor:
    """`frames` frames sampled at `fps` from the start, resized (shorter side) and centre-cropped:
    float32 (3, F, H, W) in [-1, 1]. Raises TrainDataError naming the clip when it is unreadable or short."""
    import av

    if not path.is_file():
        raise TrainDataError(f"video '{path}' does not exist")
    wanted = np.arange(frames) / fps
    decoded = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(container.streams.video[0]):
                decoded.append((float(frame.time or 0.0), frame.to_ndarray(format="rgb24")))
                if decoded[-1][0] > wanted[-1]:  # past the last time needed: no later frame is nearer; stop decoding
                    break
    except Exception as exc:
        raise TrainDataError(f"cannot read video '{path}': {type(exc).__name__}: {exc}") from None
    if not decoded:
        raise TrainDataError(f"video '{path}' has no frames")
    times = np.array([t for t, _ in decoded])
    if wanted[-1] > times[-1] + 0.5 / fps:
        raise ShortClipError(path, len(decoded), times[-1], frames, fps)
    picks = [int(np.abs(times - t).argmin()) for t in wanted]
    video = torch.from_numpy(np.stack([decoded[i][1] for i in picks])).permute(0, 3, 1, 2).float()  # (F, 3, h, w)
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[:, :, top:top + height, left:left + width]
    return (video / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


class ShortClipError(TrainDataError):
    def __init__(self, path: Path, count: int, duration: float, frames: int, fps: int):
        self.usable = int(duration * fps + 0.5) + 1  # frames at `fps` the clip covers
        super().__init__(f"video '{path}' is too short: {frames} frames at {fps} fps need "
                         f"{(frames - 1) / fps:.2f} s, it has {duration:.2f} s ({count} frames); use a longer clip, "
                         f"or fewer --frames / a higher --fps")


def load_clips(pairs: list[tuple[Path, str]], frames: int, fps: int, height: int, width: int
               ) -> tuple[list[torch.Tensor], int]:
    """Every clip read; when all of them are short, --frames is lowered (with a warning) to what they all have."""
    wanted = frames
    try:
        return [read_clip(p, frames, fps, height, width) for p, _ in pairs], frames
    except ShortClipError:
        usable = []
        for path, _ in pairs:
            try:
                read_clip(path, frames, fps, height, width)
                usable.append(frames)
            except ShortClipError as exc:
                usable.append(exc.usable)
        if max(usable) >= frames:  # only some clips are short: name the first
            for path, _ in pairs:
                read_clip(path, frames, fps, height, width)
        frames = min(usable)
        if frames < 2:
            raise
        warnings.warn(f"every clip is shorter than {wanted} frames at {fps} fps: training on {frames} "
                      "frames", stacklevel=2)
        return [read_clip(p, frames, fps, height, width) for p, _ in pairs], frames
