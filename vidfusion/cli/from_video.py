"""`vidfusion generate --from VIDEO`: the settings a video records, taken where the command line does not set them,
and what a stranger's file would make this machine read or fetch shown first: input files and hub downloads not
already cached need --trust-sources (or a yes on a terminal)."""

from __future__ import annotations

import argparse
import sys

from .checks import lora_specs

# settings a T2V-Turbo video stores because --turbo implied them: --no-turbo leaves them behind too
TURBO_IMPLIED = ("sampler", "num_inference_steps", "guidance_scale")
LORA_KEYS = ("loras", "lora_weight_name", "lora_target", "lora_scale")


def settings_from_video(args: argparse.Namespace, given: set[str]) -> None:
    """`generate --from VIDEO`: every setting stored in the video that the command line does not set itself (`given`:
    the options typed, whatever their value; `--no-loop`, `--no-turbo`, `--no-lora` switch stored ones off). The
    stored ones are added to `given`."""
    from ..media.metadata import CLI_ARGUMENTS
    from ..media.video_io import read_metadata

    stored = read_metadata(args.from_file)
    if not stored.get("vidfusion"):
        raise ValueError(f"'{args.from_file}' holds no vidfusion settings (only videos vidfusion wrote do)")
    if stored.get("kind") == "extend" or "extended" in stored:
        raise ValueError(f"'{args.from_file}' continues {stored.get('extended')!r} (vidfusion extend): remake it with "
                         f"vidfusion extend {stored.get('extended')} PROMPT --frames {stored.get('num_frames')} "
                         f"--overlap {stored.get('overlap')} --seed {stored.get('seed')}, not generate --from")
    left_out = set(LORA_KEYS) if args.no_lora else set()
    if stored.get("turbo") and "turbo" in given and not args.turbo:
        left_out |= set(TURBO_IMPLIED)
    from_file: set[str] = set()
    for key, attr in CLI_ARGUMENTS.items():
        if key in stored and attr not in given and key not in left_out:
            value = stored[key]
            if key == "loras":
                value = [f"{lora['path']}:{lora['weight']}" for lora in value]
            setattr(args, attr, value)
            given.add(attr)  # from the file counts as given (e.g. a video-to-video's first frames)
            from_file.add(attr)
    check_sources(args, from_file)


def printable(value: object) -> str:
    """A stored value as one safe line: control characters (a terminal's escape sequences, newlines) escaped."""
    text = str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_sources(args: argparse.Namespace, from_file: set[str]) -> None:
    """Print what the file makes this run load (model, LoRAs, inputs); the input files it names and the hub
    downloads not in the local cache need --trust-sources, a yes on a terminal, or else refuse with one line."""
    from ..checkpoints.hub import looks_like_repo_id

    named = [("model", args.model)] if "model" in from_file else []
    named += [("LoRA", path) for path, _ in lora_specs(args)] if "lora" in from_file else []
    decoder = args.decoder.partition(":")[2] if "decoder" in from_file else ""
    named += [("tiny decoder", decoder)] if decoder else []  # a local file, or a hub repo
    inputs = [getattr(args, name) for name in ("init_video", "image", "last_image", "vae", "clip")
              if name in from_file and getattr(args, name)]
    shown = [f"{kind} {name}" for kind, name in named] + [f"input {i}" for i in inputs]
    if not shown:
        return
    print(f"vidfusion: --from {printable(args.from_file)} loads: {printable(', '.join(shown))}", file=sys.stderr)
    inputs += [name for kind, name in named if kind == "tiny decoder" and not looks_like_repo_id(name)]
    downloads = [name for kind, name in named if looks_like_repo_id(name)
                 and not _cached(name, getattr(args, "revision", None) if kind == "model" else None)]
    untrusted = inputs + downloads
    if not untrusted or args.trust_sources:
        return
    listed = printable(", ".join(untrusted))
    if sys.stdin.isatty():
        answer = input(f"vidfusion: the file names {listed}; read / download them? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            return
    raise ValueError(f"--from {printable(args.from_file)} names {listed}: files and downloads a video names are "
                     "used only with --trust-sources (check them first)")


def _cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether the Hugging Face cache already holds this repo at `revision` (default main): then nothing is
    downloaded."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:
        return False
    return True
