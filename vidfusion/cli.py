"""Command line: argument parsing only; everything else is the Python API."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

DEFAULT_MODEL = "damo-vilab/text-to-video-ms-1.7b"
DTYPES = ("float32", "float16", "bfloat16")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        raise UsageError(message)


def slugify(text: str, limit: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "video"


def build_parser() -> argparse.ArgumentParser:
    from .schedules import SAMPLER_NAMES

    parser = _Parser(prog="vidfusion", description="Text-to-video with ModelScope / Zeroscope checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate a video from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint folder")
    gen.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    gen.add_argument("--revision", default=None)
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPU, float32 on CPU")
    gen.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    gen.add_argument("--frames", type=int, default=16)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=9.0)
    gen.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help="default: the checkpoint's scheduler")
    gen.add_argument("--eta", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--fps", type=int, default=8)
    gen.add_argument("--out", default=None, help="output .mp4/.webm/.gif (default ./<prompt-slug>.mp4)")
    gen.add_argument("--offload", choices=("none", "model", "sequential"), default="none")
    gen.add_argument("--vae-slicing", action="store_true")
    gen.add_argument("--vae-tiling", action="store_true")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    srv = sub.add_parser("serve", help="HTTP jobs API and web UI")
    srv.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint folder")
    srv.add_argument("--variant", default=None)
    srv.add_argument("--revision", default=None)
    srv.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPU, float32 on CPU")
    srv.add_argument("--device", action="append", default=None,
                     help="device to run jobs on; repeat for one worker per device (default: cuda if present)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=7860)
    srv.add_argument("--data-dir", default="./vidfusion-data", help="job database and videos")
    srv.add_argument("--token", default=os.environ.get("VIDFUSION_TOKEN"),
                     help="bearer token required on /v1 (default: $VIDFUSION_TOKEN)")
    srv.add_argument("--max-queue", type=int, default=100, help="queued + running jobs before 429")
    srv.add_argument("--max-frames", type=int, default=128)
    srv.add_argument("--max-pixels", type=int, default=1024 * 1024, help="most height x width per frame")
    srv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    init = sub.add_parser("init-random", help="write a random-weight checkpoint in the published layout")
    init.add_argument("dir")
    init.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--fp16-variant", action="store_true", help="also write *.fp16.safetensors")
    return parser


def _device_and_dtype(device: str | None, dtype_name: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a valid device (e.g. cpu, cuda, cuda:1)") from None
    if dtype_name:
        return device, getattr(torch, dtype_name)
    return device, torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _serve(args: argparse.Namespace) -> None:
    from .serve.app import is_loopback

    token = args.token or None
    if not is_loopback(args.host) and token is None:
        raise ValueError(f"refusing to serve on non-loopback host {args.host!r} without a token: pass --token or "
                         "set VIDFUSION_TOKEN")
    for name in ("max_queue", "max_frames", "max_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")

    import logging

    import uvicorn

    from .pipeline import TextToVideoPipeline
    from .serve.app import ServeSettings, create_app
    from .serve.jobs import JobStore

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pipes = []
    for device in args.device or [None]:
        device, dtype = _device_and_dtype(device, args.dtype)
        pipe = TextToVideoPipeline.from_pretrained(args.model, dtype=dtype, variant=args.variant,
                                                   revision=args.revision).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    size = pipes[0].unet.config.sample_size * pipes[0].vae_scale_factor
    settings = ServeSettings(data_dir=args.data_dir, token=token, max_queue=args.max_queue,
                             max_frames=args.max_frames, max_pixels=args.max_pixels, default_height=size,
                             default_width=size, model=str(args.model))
    app = create_app(JobStore(args.data_dir), pipes, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def _generate(args: argparse.Namespace) -> str:
    import torch

    from .pipeline import TextToVideoPipeline
    from .video_io import CODECS, export_to_video

    out = Path(args.out or f"{slugify(args.prompt)}.mp4")
    if out.suffix.lower() not in CODECS:
        raise ValueError(f"--out must end in one of {', '.join(CODECS)}, got '{out}'")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder '{out.parent}' does not exist")
    for name in ("frames", "steps", "fps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    device, dtype = _device_and_dtype(args.device, args.dtype)
    pipe = TextToVideoPipeline.from_pretrained(args.model, dtype=dtype, variant=args.variant, revision=args.revision)
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=args.device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=args.device)
    else:
        pipe.to(device)
    if args.vae_slicing:
        pipe.enable_vae_slicing()
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    pipe.set_progress_bar_config(disable=args.quiet)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    frames = pipe(args.prompt, args.negative_prompt, num_frames=args.frames, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, eta=args.eta,
                  generator=generator).frames
    return export_to_video(frames[0], out, fps=args.fps)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "generate":
            print(_generate(args))
        elif args.command == "serve":
            _serve(args)
        else:
            from .random_checkpoint import write_random_checkpoint

            print(write_random_checkpoint(args.dir, args.preset, args.seed, args.fp16_variant))
        return 0
    except UsageError as exc:
        print(f"vidfusion: error: {exc}", file=sys.stderr)
    except (ValueError, FileNotFoundError, RuntimeError, OSError, TypeError) as exc:
        message = " ".join(str(exc).split())
        print(f"vidfusion: error: {message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("vidfusion: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
