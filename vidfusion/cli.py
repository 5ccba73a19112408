"""Command line: argument parsing only; everything else is the Python API."""

from __future__ import annotations

import argparse
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

    init = sub.add_parser("init-random", help="write a random-weight checkpoint in the published layout")
    init.add_argument("dir")
    init.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--fp16-variant", action="store_true", help="also write *.fp16.safetensors")
    return parser


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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a valid device (e.g. cpu, cuda, cuda:1)") from None
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
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
