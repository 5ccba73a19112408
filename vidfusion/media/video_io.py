"""Writing videos: H.264 mp4 (browser-playable), VP9 webm or gif, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .fileio import atomic_file

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


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3), even H and W -> planar YUV 4:2:0 (H * 3/2, W), BT.601 limited range (as swscale's
    default), chroma averaged over 2x2 blocks. Deterministic, unlike a converter that may read buffer padding."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    h, w = r.shape
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    pooled = x.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    pr, pg, pb = pooled[..., 0], pooled[..., 1], pooled[..., 2]
    u = 128 + (-37.797 * pr - 74.203 * pg + 112.0 * pb) / 255
    v = 128 + (112.0 * pr - 93.786 * pg - 18.214 * pb) / 255
    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, u, v)]
    return np.concatenate([p.ravel() for p in planes]).reshape(h * 3 // 2, w)  # Y, then U, then V (PyAV's layout)


def export_to_video(frames: Any, output_path: str | os.PathLike | None = None, fps: int = 8,
                    metadata: dict[str, Any] | None = None, interpolate_fps: int | None = None) -> str:
    """Write one video's frames to `output_path` (.mp4 H.264 yuv420p with the index first, .webm VP9, .gif);
    default a temp .mp4. `metadata` (a JSON-serialisable dict, e.g. the generation settings) is stored as the
    file's `comment` tag; `read_metadata` reads it back. The same frames give the same bytes. The file appears
    complete or not at all. `interpolate_fps` (above fps): motion-compensated frames in between (ffmpeg's
    minterpolate), the originals kept at their times, the same duration; the file plays at interpolate_fps.
    Returns the path."""
    import av

    video = to_uint8_frames(frames)
    if len(video) == 0:
        raise ValueError("no frames to export (the video is empty)")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    if output_path is None:  # a fresh name: nothing exists there until the video is complete
        output_path = Path(tempfile.gettempdir()) / f"vidfusion-{uuid.uuid4().hex}.mp4"
    path = Path(output_path)
    suffix = path.suffix.lower()
    if suffix not in CODECS:
        raise ValueError(f"unsupported video extension {suffix!r}; use one of {', '.join(CODECS)}")
    if not isinstance(fps, (int, float)) or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    _, h, w, _ = video.shape
    pad = ((0, h % 2), (0, w % 2), (0, 0)) if suffix in (".mp4", ".webm") else ((0, 0),) * 3  # yuv420p: even sizes
    h, w = h + pad[0][1], w + pad[1][1]
    if interpolate_fps is not None:  # streamed from the filter graph into the encoder, never held all at once
        video, fps = interpolated_frames(video, fps, interpolate_fps), interpolate_fps
    video = (np.pad(frame, pad, mode="edge") if pad[0][1] or pad[1][1] else frame for frame in video)
    tags = {"comment": json.dumps(metadata, sort_keys=True, separators=(",", ":"))} if metadata else {}
    # the index (moov) before the data, so players start before the whole file has arrived (a muxer option)
    container_options = {"fflags": "+bitexact"}  # no random ids (Matroska UIDs) or version strings
    if suffix == ".mp4":
        container_options["movflags"] = "+faststart"
    with atomic_file(path, suffix=suffix) as tmp:
        with av.open(str(tmp), mode="w", container_options=container_options) as container:
            container.metadata.update(tags)
            stream = container.add_stream(CODECS[suffix], rate=_rate(fps))
            stream.width, stream.height = w, h
            if suffix == ".gif":
                stream.pix_fmt = "pal8"
                frames = _palettized(video, fps, h, w)
            else:
                stream.pix_fmt = "yuv420p"
                # one encoder thread, our own RGB -> YUV 4:2:0 and no x264 macroblock-tree pass (it reads memory it
                # never wrote: 2-3 different files from 10 encodes in a busy process): same frames, same bytes
                stream.options = ({"crf": "18", "threads": "1", "x264-params": "mbtree=0"} if suffix == ".mp4"
                                  else {"crf": "30", "b:v": "0", "threads": "1", "row-mt": "0"})
                frames = (av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p") for frame in video)
            for frame in frames:
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        if suffix == ".gif" and tags:  # the gif muxer writes no comment: add a GIF comment extension
            tmp.write_bytes(_gif_with_comment(tmp.read_bytes(), tags["comment"]))
    return str(path)


def _palettized(video: Iterable[np.ndarray], fps: float, h: int, w: int) -> list:
    """uint8 frames (H, W, 3) -> pal8 frames sharing one 256-colour palette made from the whole video (ffmpeg's
    palettegen + paletteuse through PyAV's filter graph; a fixed rgb8 palette bands gradients heavily)."""
    import av

    time_base = 1 / _rate(fps)
    graph = av.filter.Graph()
    source = graph.add_buffer(width=w, height=h, format="rgb24", time_base=time_base)
    split, sink = graph.add("split"), graph.add("buffersink")
    palette, use = graph.add("palettegen", "stats_mode=full"), graph.add("paletteuse", "dither=sierra2_4a")
    source.link_to(split)
    split.link_to(palette, 0, 0)
    split.link_to(use, 1, 0)
    palette.link_to(use, 0, 1)
    use.link_to(sink)
    graph.configure()
    for i, array in enumerate(video):
        frame = av.VideoFrame.from_ndarray(array, format="rgb24")
        frame.pts, frame.time_base = i, time_base
        source.push(frame)
    source.push(None)  # palettegen emits its palette at the end of the stream
    frames = []
    while True:
        try:
            frames.append(sink.pull())
        except (av.error.EOFError, av.error.BlockingIOError):
            return frames


def interpolated_frames(video: np.ndarray, fps: int, target_fps: int) -> Iterator[np.ndarray]:
    """uint8 frames (F, H, W, 3) at `fps` -> F * target_fps / fps frames (H, W, 3) at `target_fps`, one at a time as
    the filter makes them: motion-compensated interpolation (ffmpeg's minterpolate, mci, through PyAV's filter graph);
    every frame whose time is an original's is that original, and the clip lasts as long (the last frame is held at
    the end). Only a few frames are in memory at once, however many the output has."""
    import av

    if not isinstance(target_fps, int) or isinstance(target_fps, bool) or target_fps <= fps:
        raise ValueError(f"interpolate_fps must be an integer above fps={fps}, got {target_fps!r}")
    count, h, w, _ = video.shape
    time_base = 1 / _rate(fps)
    graph = av.filter.Graph()
    source = graph.add_buffer(width=w, height=h, format="rgb24", time_base=time_base)
    steps = [graph.add("minterpolate", f"fps={target_fps}:mi_mode=mci"), graph.add("format", "rgb24"),
             graph.add("buffersink")]
    source.link_to(steps[0])
    steps[0].link_to(steps[1])
    steps[1].link_to(steps[2])
    graph.configure()
    wanted = round(count * target_fps / fps)

    def frames(graph: av.filter.Graph = graph) -> Iterator[np.ndarray]:  # holds the graph: its filters live in it
        made, last = 0, None
        held = [video[-1], video[-1]]  # held frames: the last interval is interpolated too
        for i, array in enumerate([*video, *held, None]):
            if array is None:
                source.push(None)
            else:
                frame = av.VideoFrame.from_ndarray(array, format="rgb24")
                frame.pts, frame.time_base = i, time_base
                source.push(frame)
            while made < wanted:  # what the filter has ready now
                try:
                    last = steps[2].pull().to_ndarray(format="rgb24")
                except (av.error.EOFError, av.error.BlockingIOError):
                    break
                made += 1
                yield last
        for _ in range(wanted - made):
            yield last

    return frames()


def _rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def video_to_tensor(video: Any) -> torch.Tensor:
    """Frames as the pipelines return them (np (F, H, W, 3) / (B, F, H, W, 3) in [0, 1] or uint8, torch
    (F, 3, H, W) / (B, F, 3, H, W) in [0, 1], a list of PIL images) or a video file path
    -> float32 (B, F, 3, H, W) in [-1, 1]."""
    if isinstance(video, (str, os.PathLike)):
        video = read_video(video)
    if isinstance(video, (list, tuple)) and video and hasattr(video[0], "convert"):  # PIL images
        video = np.stack([np.asarray(frame.convert("RGB")) for frame in video])
    if isinstance(video, np.ndarray):
        if video.ndim not in (4, 5) or video.shape[-1] != 3:
            raise ValueError(f"video array must be (frames, H, W, 3) or (batch, frames, H, W, 3), got {video.shape}")
        array = video.astype(np.float32) / 255 if video.dtype == np.uint8 else video.astype(np.float32)
        tensor = torch.from_numpy(array).movedim(-1, -3)
    elif isinstance(video, torch.Tensor):
        if video.dim() not in (4, 5) or video.shape[-3] != 3:
            raise ValueError(f"video tensor must be (frames, 3, H, W) or (batch, frames, 3, H, W), got "
                             f"{tuple(video.shape)}")
        tensor = video.float() / 255 if video.dtype == torch.uint8 else video.float()
    else:
        raise ValueError("video must be frames (numpy array, torch tensor, list of PIL images) or a video file path, "
                         f"got {type(video).__name__}")
    if tensor.dim() == 4:
        tensor = tensor[None]
    if tensor.shape[1] < 1:
        raise ValueError("video has no frames")
    return tensor.cpu() * 2 - 1


def resize_video(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, F, 3, H, W) -> (B, F, 3, height, width), bicubic with antialiasing, values kept in [-1, 1]."""
    b, f = video.shape[:2]
    if video.shape[-2:] == (height, width):
        return video
    frames = F.interpolate(video.flatten(0, 1), size=(height, width), mode="bicubic", antialias=True,
                           align_corners=False)
    return frames.clamp(-1, 1).view(b, f, 3, height, width)


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """Decode a video file -> uint8 frames (F, H, W, 3); with `max_frames`, its first frames only (the rest are
    not decoded)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input video '{path}' does not exist")
    try:
        with av.open(str(path)) as container:
            frames = []
            for frame in container.decode(container.streams.video[0]):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"cannot read video '{path}': {exc}") from None
    if not frames:
        raise ValueError(f"video '{path}' has no frames")
    return np.stack(frames)


def _gif_blocks_start(data: bytes) -> int:
    """Offset of the first block after a GIF's header, logical screen descriptor and global colour table."""
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        raise ValueError("not a GIF file")
    packed = data[10]
    return 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)


def _gif_with_comment(data: bytes, text: str) -> bytes:
    raw = text.encode()
    blocks = b"".join(bytes([len(raw[i:i + 255])]) + raw[i:i + 255] for i in range(0, len(raw), 255))
    start = _gif_blocks_start(data)
    return data[:start] + b"\x21\xfe" + blocks + b"\x00" + data[start:]


def _gif_comment(data: bytes) -> str | None:
    """The first comment extension of a GIF (walking its blocks), or None."""

    def sub_blocks(j: int) -> tuple[int, bytes]:  # -> (offset after the terminator, concatenated content)
        out = bytearray()
        while j < len(data) and data[j]:
            out += data[j + 1:j + 1 + data[j]]
            j += 1 + data[j]
        return j + 1, bytes(out)

    i = _gif_blocks_start(data)
    while i < len(data):
        if data[i] == 0x21:  # extension: label, then sub-blocks
            label = data[i + 1]
            i, content = sub_blocks(i + 2)
            if label == 0xFE:
                return content.decode(errors="replace")
        elif data[i] == 0x2C:  # image: descriptor, optional local colour table, LZW code size, sub-blocks
            packed = data[i + 9]
            i, _ = sub_blocks(i + 10 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0) + 1)
        else:  # trailer
            break
    return None


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict `export_to_video(..., metadata=...)` stored in a video file ({} if there is none)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video '{path}' does not exist")
    try:
        if path.suffix.lower() == ".gif":
            comment = _gif_comment(path.read_bytes())
        else:
            with av.open(str(path)) as container:
                comment = container.metadata.get("comment") or container.metadata.get("COMMENT")
    except (av.error.FFmpegError, ValueError, IndexError) as exc:
        raise ValueError(f"cannot read video '{path}': {exc}") from None
    if not comment:
        return {}
    try:
        data = json.loads(comment)
    except json.JSONDecodeError:
        return {"comment": comment}
    return data if isinstance(data, dict) else {"comment": comment}


# containers an uploaded video may be (no script or playlist demuxers: ffconcat, hls, ... open other files)
UPLOAD_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,gif,avi"


def probe_video(path: str | os.PathLike, max_pixels: int | None = None, max_frames: int | None = None,
                formats: str | None = None) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of a video file. The container's header is judged first: frames over
    `max_pixels` are refused before anything is decoded; then frames are decoded (so a broken file is found), one at
    a time and none kept, up to `max_frames` + 1 (one more than needed: the count says "longer" without decoding
    the rest). `formats`: the only container formats opened (ffmpeg's format_whitelist, e.g. UPLOAD_FORMATS)."""
    import av

    options = {"format_whitelist": formats} if formats else {}
    frames, height, width = 0, 0, 0
    try:
        with av.open(str(path), options=options, metadata_errors="replace") as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 8)
            if stream.codec_context is None:
                raise ValueError("its video codec has no decoder here")
            header_height, header_width = stream.codec_context.height, stream.codec_context.width
            if max_pixels is not None and header_height * header_width > max_pixels:
                raise ValueError(f"its frames are {header_width}x{header_height}, over {max_pixels} pixels")
            limit = None if max_frames is None else max_frames + 1
            for frame in container.decode(stream):
                if max_pixels is not None and frame.height * frame.width > max_pixels:
                    raise ValueError(f"a frame is {frame.width}x{frame.height}, over {max_pixels} pixels")
                frames, height, width = frames + 1, frame.height, frame.width
                if limit is not None and frames >= limit:
                    break
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"cannot read video '{path}': {exc}") from None
    if not frames:
        raise ValueError(f"video '{path}' has no frames")
    return frames, height, width, fps


def video_fps(path: str | os.PathLike) -> float:
    """Frame rate of a video file."""
    import av

    try:
        with av.open(str(path)) as container:
            return float(container.streams.video[0].average_rate or 8)
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"cannot read video '{path}': {exc}") from None
