"""Writing videos: H.264 mp4 (browser-playable), VP9 webm or gif, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CODECS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".gif": "gif"}


def to_uint8_frames(frames: Any) -> np.ndarray:
    """One video's frames -> uint8 array (F, H, W, 3). Accepts the pipeline's np (F, H, W, 3) floats in [0, 1],
    pt (F, 3, H, W), a list of PIL images, uint8 arrays, or a batch that holds exactly one video."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("no frames to export")
        if isinstance(frames[0], (list, tuple)):  # pil output of a batch
            if len(frames) != 1:
                raise ValueError(f"got a batch of {len(frames)} videos; export one at a time, e.g. frames[0]")
            frames = frames[0]
        if hasattr(frames[0], "convert"):  # PIL images
            frames = np.stack([np.asarray(im.convert("RGB")) for im in frames])
        else:
            frames = np.stack([np.asarray(f) for f in frames])
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.dim() in (4, 5) and frames.shape[-3] == 3 and frames.shape[-1] != 3:
            frames = frames.movedim(-3, -1)  # (..., 3, H, W) -> (..., H, W, 3)
        frames = frames.float().numpy() if frames.is_floating_point() else frames.numpy()
    frames = np.asarray(frames)
    if frames.ndim == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"got a batch of {frames.shape[0]} videos; export one at a time, e.g. frames[0]")
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be (frames, height, width, 3); got shape {frames.shape}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(frames)


def export_to_video(frames: Any, output_path: str | os.PathLike | None = None, fps: int = 8) -> str:
    """Write one video's frames to `output_path` (.mp4 H.264 yuv420p, .webm VP9, .gif); default a temp .mp4.
    The file appears complete or not at all. Returns the path."""
    import av

    video = to_uint8_frames(frames)
    if output_path is None:
        handle, output_path = tempfile.mkstemp(suffix=".mp4")
        os.close(handle)
    path = Path(output_path)
    suffix = path.suffix.lower()
    if suffix not in CODECS:
        raise ValueError(f"unsupported video extension {suffix!r}; use one of {', '.join(CODECS)}")
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    _, h, w, _ = video.shape
    if suffix in (".mp4", ".webm") and (h % 2 or w % 2):  # yuv420p needs even sizes: pad by repeating the edge
        video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = video.shape[1:3]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp, mode="w") as container:
            stream = container.add_stream(CODECS[suffix], rate=_rate(fps))
            stream.width, stream.height = w, h
            if suffix == ".gif":
                stream.pix_fmt = "rgb8"
            else:
                stream.pix_fmt = "yuv420p"
                if suffix == ".mp4":
                    stream.options = {"crf": "18", "movflags": "+faststart"}
                else:
                    stream.options = {"crf": "30", "b:v": "0"}
            for frame in video:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)


def _rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file -> uint8 frames (F, H, W, 3)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input video '{path}' does not exist")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"cannot read video '{path}': {exc}") from None
    if not frames:
        raise ValueError(f"video '{path}' has no frames")
    return np.stack(frames)


def video_fps(path: str | os.PathLike) -> float:
    """Frame rate of a video file."""
    import av

    try:
        with av.open(str(path)) as container:
            return float(container.streams.video[0].average_rate or 8)
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"cannot read video '{path}': {exc}") from None
