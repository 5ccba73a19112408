"""The command line's input checks, run before anything loads: every flag given is honoured or refused with one
line (exit 2), never dropped; input files are what their flag says; output paths and ports are usable."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def lora_specs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """--lora PATH_OR_ID[:WEIGHT] values (a trailing :number is the weight), checked before anything loads."""
    specs = []
    for spec in args.lora:
        path, sep, weight = spec.rpartition(":")
        if sep and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", weight):
            specs.append((path, float(weight)))
        else:
            specs.append((spec, 1.0))
    for path, _ in specs:
        if not path:
            raise ValueError("--lora needs a file, folder or hub id, e.g. --lora motion.pt:0.8")
    return specs


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def check_port_free(host: str, port: int) -> None:
    """A port another program listens on is an input mistake (one line), not uvicorn's exit 3 after loading."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is not busy
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); another program uses "
                             "it: pick another --port") from None


def check_inputs(args: argparse.Namespace, init_video: str | None) -> None:
    """Input files and flag combinations checked before anything loads: every flag given is honoured or refused."""
    from ..media.video_io import UPLOAD_FORMATS, probe_video

    if init_video is not None:
        if not Path(init_video).is_file():
            raise FileNotFoundError(f"input video '{init_video}' does not exist")
        try:
            frames = probe_video(init_video, formats=UPLOAD_FORMATS)[0]
        except ValueError:
            raise ValueError(f"'{init_video}' is not a video (mp4, webm, gif, mov, mkv, avi); for a picture use "
                             "--image") from None
        if args.command == "generate" and "frames" in args.given and args.frames > frames:
            raise ValueError(f"--frames {args.frames}: the input video has {frames} frames")
        bad = [f"--{name.replace('_', '-')}" for name in ("image", "last_image", "keyframe", "free_init_iterations",
                                                           "loop", "window_size") if name in args.given]
        if bad:
            raise ValueError(f"{', '.join(bad)} do(es) not combine with --init-video (video-to-video starts from the "
                             "video's frames)")
    elif "strength" in args.given:
        raise ValueError("--strength applies to video-to-video: pass --init-video (or leave --strength out)")
    for flag in ("image", "last_image"):
        path = getattr(args, flag, None)
        if path is not None:
            check_picture(path, f"--{flag.replace('_', '-')}")


def check_picture(path: str, flag: str) -> None:
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} '{path}' does not exist")
    try:
        with Image.open(path) as picture:
            picture.verify()
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{flag} '{path}' is not a picture (PNG, JPEG, WebP, ...)") from None


def check_out(out: Path) -> None:
    from ..media.video_io import CODECS

    if out.suffix.lower() not in CODECS:
        raise ValueError(f"--out must end in one of {', '.join(CODECS)}, got '{out}'")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder '{out.parent}' does not exist")


def check_fits(frames: int, height: int | None, width: int | None, videos: int = 1) -> None:
    """Refuse before loading what cannot fit: the decoded frames (float32 and uint8) and the latents the sampler
    holds, a lower bound of any run's peak (the networks' activations come on top), against the memory this
    machine has available now (a size left out counts as the smallest published one, 256)."""
    h, w = height or 256, width or 256
    need = videos * frames * h * w * 3 * (4 + 1) + videos * frames * (h // 8) * (w // 8) * 4 * 4 * 6
    have = available_memory()
    if have is not None and need > have:
        raise ValueError(f"{videos} x {frames} frames of {w}x{h} need at least {need / 2**30:.1f} GiB for the frames "
                         f"alone; this machine has {have / 2**30:.1f} GiB available: fewer --frames or a smaller "
                         "--width / --height")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable; None where the system does not say)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
