"""Command line: argument parsing only; everything else is the Python API."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from pathlib import Path

DEFAULT_MODEL = "damo-vilab/text-to-video-ms-1.7b"
TURBO_LORA = ("jiachenli-ucsb/T2V-Turbo-MS", "unet_lora.pt")
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
    from .noise import FREE_INIT_FILTERS, NOISE_PRIORS
    from .schedules import SAMPLER_NAMES

    parser = _Parser(prog="vidfusion", description="Text-to-video with ModelScope / Zeroscope checkpoints.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (or VIDFUSION_DEBUG=1)")
    common = _Parser(add_help=False)  # --debug after the command too; SUPPRESS keeps a --debug given before it
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common], **k)  # type: ignore[method-assign]

    gen = sub.add_parser("generate", help="generate a video from a prompt (or restyle one: --init-video)")
    gen.add_argument("prompt", nargs="?", default=None)
    gen.add_argument("--from", dest="from_file", default=None, metavar="VIDEO",
                     help="regenerate a video vidfusion wrote, from the settings stored in it (flags override them)")
    _add_generation_options(gen, SAMPLER_NAMES)
    gen.add_argument("--frames", type=int, default=16)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--fps", type=int, default=None, help="default 8 (the input's with --init-video)")
    gen.add_argument("--init-video", default=None, help="video-to-video: start from this video file")
    gen.add_argument("--strength", type=float, default=0.6, help="with --init-video: 0 keeps it, 1 ignores it")
    gen.add_argument("--keyframe", action="append", default=[], metavar="FRAME:PROMPT",
                     help="prompt travel: the prompt from this frame on (the positional prompt is frame 0)")
    gen.add_argument("--window-size", type=int, default=None,
                     help="frames the UNet sees at once (default: all up to 24, else the training length: 16 or 24)")
    gen.add_argument("--window-stride", type=int, default=None, help="default window-size / 4")
    gen.add_argument("--loop", action="store_true", help="seamless loop: the last frame flows into the first")
    gen.add_argument("--noise-prior", choices=NOISE_PRIORS, default="iid")
    gen.add_argument("--base-noise-ratio", type=float, default=0.5, help="videofusion prior: shared noise share")
    gen.add_argument("--freeu", type=float, nargs=4, default=None, metavar=("S1", "S2", "B1", "B2"))
    gen.add_argument("--free-init-iterations", type=int, default=1)
    gen.add_argument("--free-init-filter", choices=FREE_INIT_FILTERS, default="butterworth")
    gen.add_argument("--num-videos", type=int, default=1, help="videos from this prompt (OUT-1.mp4, OUT-2.mp4, ...)")

    up = sub.add_parser("upscale", help="resize a video, then refine it with video-to-video (Zeroscope XL recipe)")
    up.add_argument("video")
    up.add_argument("prompt")
    _add_generation_options(up, SAMPLER_NAMES, model="cerspense/zeroscope_v2_XL")
    up.add_argument("--width", type=int, default=1024)
    up.add_argument("--height", type=int, default=576)
    up.add_argument("--strength", type=float, default=0.6)
    up.add_argument("--fps", type=int, default=None, help="default: the input's")

    srv = sub.add_parser("serve", help="HTTP jobs API and web UI")
    srv.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint folder")
    srv.add_argument("--variant", default=None)
    _add_part_options(srv)
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
    _add_lora_options(srv)

    bat = sub.add_parser("batch", help="generate every row of a JSONL / CSV file (resumable; --ray to scale out)")
    bat.add_argument("input", help="JSONL (or CSV with a header): prompt, optional id, seed, num_frames, ...")
    bat.add_argument("--out-dir", required=True, help="videos <id>.<format> and manifest.jsonl")
    bat.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint folder")
    bat.add_argument("--variant", default=None)
    _add_part_options(bat)
    bat.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPU, float32 on CPU")
    bat.add_argument("--device", default=None, help="without --ray (default: cuda when available, else cpu)")
    bat.add_argument("--ray", default=None, metavar="ADDRESS",
                     help="run on Ray actors: 'local' starts a local instance, 'auto' joins a running cluster")
    bat.add_argument("--workers", type=int, default=None, help="with --ray: actors (default: one per GPU / CPU)")
    bat.add_argument("--gpus-per-worker", type=float, default=None)
    bat.add_argument("--cpus-per-worker", type=float, default=None)
    bat.add_argument("--max-retries", type=int, default=1, help="retries of a row after a non-input error")
    bat.add_argument("--max-attempts", type=int, default=3,
                     help="with --ray: worker deaths (crash, out of memory) on one row before it is recorded failed")
    bat.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_lora_options(bat)

    tr = sub.add_parser("train-lora", help="train a LoRA on your clips (appearance: spatial, motion: temporal)")
    tr.add_argument("data", help="folder of videos + same-name .txt captions, a JSONL/CSV (video, prompt), or a video")
    tr.add_argument("--out", required=True, help="output folder (LoRA, checkpoints, log, validation videos)")
    tr.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint folder")
    tr.add_argument("--prompt", default=None, help="caption of a single-video DATA")
    tr.add_argument("--target", choices=("spatial", "temporal", "all"), default="temporal")
    tr.add_argument("--rank", type=int, default=16)
    tr.add_argument("--alpha", type=float, default=None, help="default: the rank")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--batch-size", type=int, default=1)
    tr.add_argument("--frames", type=int, default=16)
    tr.add_argument("--height", type=int, default=256)
    tr.add_argument("--width", type=int, default=256)
    tr.add_argument("--fps", type=int, default=8)
    tr.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    tr.add_argument("--gradient-checkpointing", action="store_true")
    tr.add_argument("--cache-latents", action="store_true", help="run the VAE once per clip")
    tr.add_argument("--offset-noise", type=float, default=0.0)
    tr.add_argument("--debias", action="store_true", help="temporal: MotionDirector's appearance-debiased loss")
    tr.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA only)")
    tr.add_argument("--checkpoint-every", type=int, default=100)
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tr.add_argument("--overwrite", action="store_true", help="replace an earlier training run in --out")
    tr.add_argument("--validation-prompt", default=None)
    tr.add_argument("--validation-every", type=int, default=200)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None)
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    conv = sub.add_parser("convert", help="convert a checkpoint: diffusers layout <-> original ModelScope layout")
    conv.add_argument("src", help="a diffusers folder / hub id or an original folder (configuration.json)")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=("diffusers", "original"), default=None, help="default: the other layout")
    conv.add_argument("--dtype", choices=("float32", "float16"), default=None, help="default: as loaded (float32)")
    conv.add_argument("--vae", default=None, help="from an original folder without a VAE: where to take it")
    conv.add_argument("--clip", default=None,
                      help="original folders without CLIP: where to take it; to original: the OpenCLIP file whose "
                           "unused weights (last block, projection, visual) are copied")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")

    info = sub.add_parser("info", help="print the generation settings stored in a video vidfusion wrote")
    info.add_argument("video")
    info.add_argument("--json", action="store_true", help="one JSON object")

    init = sub.add_parser("init-random", help="write a random-weight checkpoint in the published layout")
    init.add_argument("dir")
    init.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--fp16-variant", action="store_true", help="also write *.fp16.safetensors")
    return parser


def _add_generation_options(p: argparse.ArgumentParser, samplers, model: str = DEFAULT_MODEL) -> None:
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--model", default=model, help="hub id or local checkpoint folder")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    p.add_argument("--revision", default=None)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--steps", type=int, default=None, help="default 50 (4 with --turbo or the lcm sampler)")
    p.add_argument("--guidance", type=float, default=None, help="default 9 (15 for video-to-video, 7.5 with --turbo)")
    p.add_argument("--sampler", choices=samplers, default=None, help="default: the checkpoint's scheduler")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="output .mp4/.webm/.gif (default ./<prompt-slug>.mp4)")
    p.add_argument("--offload", choices=("none", "model", "sequential"), default="none")
    p.add_argument("--vae-slicing", action="store_true")
    p.add_argument("--vae-tiling", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE blocks (GPU; slow 1st call)")
    _add_part_options(p)
    _add_lora_options(p)


def _add_part_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", default=None, help="original ModelScope folders without a VAE: a file, folder or hub id")
    p.add_argument("--clip", default=None, help="original folders without CLIP: a file, folder or hub id")


def _add_lora_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID[:WEIGHT]",
                   help="apply a LoRA (any published format; repeatable), optionally with a weight, e.g. motion.pt:0.8")
    p.add_argument("--lora-weight-name", default=None,
                   help="file (or subfolder) inside a hub repo or folder given to --lora")
    p.add_argument("--lora-target", choices=("unet", "spatial", "temporal"), default=None,
                   help="layers a keyless cloneofsimo .pt covers (default: found from its size)")
    p.add_argument("--turbo", action="store_true",
                   help=f"T2V-Turbo: the {TURBO_LORA[0]} LoRA, 4 steps, t2v-turbo sampler, guidance 7.5")


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


def _check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def _serve(args: argparse.Namespace) -> None:
    from .serve.app import is_loopback

    token = args.token or None
    if not is_loopback(args.host) and token is None:
        raise ValueError(f"refusing to serve on non-loopback host {args.host!r} without a token: pass --token or "
                         "set VIDFUSION_TOKEN")
    _check_at_least_one(args, "max_queue", "max_frames", "max_pixels")
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
                                                   revision=args.revision, vae=args.vae,
                                                   text_encoder=args.clip).to(device)
        _apply_loras(pipe, args)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    size = pipes[0].unet.config.sample_size * pipes[0].vae_scale_factor
    settings = ServeSettings(data_dir=args.data_dir, token=token, max_queue=args.max_queue,
                             max_frames=args.max_frames, max_pixels=args.max_pixels, default_height=size,
                             default_width=size, model=str(args.model),
                             sampler_defaults=pipes[0].sampler_defaults(), video_metadata=_lora_metadata(args))
    app = create_app(JobStore(args.data_dir), pipes, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def _keyframes(prompt: str, specs: list[str]) -> dict[int, str] | str:
    if not specs:
        return prompt
    keyframes = {0: prompt}
    for spec in specs:
        frame, sep, text = spec.partition(":")
        if not sep or not frame.strip().isdigit() or not text.strip():
            raise ValueError(f"--keyframe must look like FRAME:PROMPT (e.g. 24:a city at night), got {spec!r}")
        keyframes[int(frame)] = text.strip()
    return keyframes


def _lora_specs(args: argparse.Namespace) -> list[tuple[str, float]]:
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


def _lora_metadata(args: argparse.Namespace) -> dict:
    meta = {"loras": [{"path": path, "weight": weight} for path, weight in _lora_specs(args)],
            "lora_weight_name": args.lora_weight_name, "lora_target": args.lora_target, "turbo": args.turbo}
    return {k: v for k, v in meta.items() if v not in (None, [], False)}


def _apply_loras(pipe, args: argparse.Namespace) -> None:
    specs = _lora_specs(args)
    for path, weight in specs:
        pipe.load_lora_weights(path, weight_name=args.lora_weight_name, scale=weight, target=args.lora_target)
    if args.turbo:
        pipe.load_lora_weights(TURBO_LORA[0], weight_name=TURBO_LORA[1], adapter_name="t2v-turbo")


def _load(cls, args: argparse.Namespace):
    device, dtype = _device_and_dtype(args.device, args.dtype)
    _lora_specs(args)
    pipe = cls.from_pretrained(args.model, dtype=dtype, variant=args.variant, revision=args.revision, vae=args.vae,
                               text_encoder=args.clip)
    _apply_loras(pipe, args)
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
    return pipe.compile() if args.compile else pipe


def _settings_from_video(args: argparse.Namespace, parser_defaults: dict) -> None:
    """`generate --from VIDEO`: every setting stored in the video that was not given on the command line."""
    from .metadata import CLI_ARGUMENTS
    from .video_io import read_metadata

    stored = read_metadata(args.from_file)
    if not stored.get("vidfusion"):
        raise ValueError(f"'{args.from_file}' holds no vidfusion settings (only videos vidfusion wrote do)")
    for key, attr in CLI_ARGUMENTS.items():
        if key in stored and getattr(args, attr) == parser_defaults.get(attr):
            value = stored[key]
            if key == "loras":
                value = [f"{lora['path']}:{lora['weight']}" for lora in value]
            setattr(args, attr, value)


def _metadata(args: argparse.Namespace, ran: dict, seed: int, fps: int) -> dict:
    from .metadata import CLI_ARGUMENTS, RAN_KEYS, REQUEST_KEYS, video_settings

    values = {**vars(args), "lora": _lora_metadata(args).get("loras")}
    if args.command == "upscale":
        values["init_video"] = args.video
    extra = {key: values.get(attr) for key, attr in CLI_ARGUMENTS.items() if key not in RAN_KEYS + REQUEST_KEYS}
    request = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed, "fps": fps}
    return video_settings(ran, request, **extra)


def _batch(args: argparse.Namespace) -> int:
    from .batch import read_rows, run, summary

    _check_at_least_one(args, "workers", "max_attempts")
    if args.max_retries < 0:
        raise ValueError("--max-retries must be at least 0")
    total = len(read_rows(args.input))  # input errors before anything loads
    records = run(args.input, args.out_dir, model=args.model, variant=args.variant, vae=args.vae, clip=args.clip,
                  dtype=args.dtype,
                  device=args.device, ray=args.ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                  cpus_per_worker=args.cpus_per_worker, loras=_lora_specs(args),
                  lora_weight_name=args.lora_weight_name, lora_target=args.lora_target, turbo=args.turbo,
                  max_retries=args.max_retries, max_attempts=args.max_attempts,
                  progress=not args.quiet)
    print(summary(records, total, args.out_dir))
    return 0 if all(r["status"] == "succeeded" for r in records) and len(records) == total else 1


def _info(args: argparse.Namespace) -> str:
    from .video_io import read_metadata

    if not Path(args.video).is_file():
        raise FileNotFoundError(f"video '{args.video}' does not exist")
    meta = read_metadata(args.video)
    if args.json:
        return json.dumps(meta)
    if not meta:
        return f"{args.video}: no generation settings stored"
    return "\n".join(f"{key}: {json.dumps(value) if isinstance(value, (list, dict)) else value}"
                     for key, value in meta.items())


def _generate(args: argparse.Namespace) -> list[str]:
    import random

    import torch

    from .pipeline import TextToVideoPipeline
    from .video2video import VideoToVideoPipeline
    from .video_io import CODECS, export_to_video, video_fps

    upscale = args.command == "upscale"
    if args.prompt is None:
        raise ValueError("pass a prompt (or --from VIDEO to regenerate a video vidfusion wrote)")
    init_video = args.video if upscale else args.init_video
    videos = 1 if upscale else args.num_videos
    out = Path(args.out) if args.out else _free_output(f"{slugify(args.prompt)}{'-upscaled' if upscale else ''}",
                                                        videos or 1)
    if out.suffix.lower() not in CODECS:
        raise ValueError(f"--out must end in one of {', '.join(CODECS)}, got '{out}'")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder '{out.parent}' does not exist")
    if init_video is not None and not Path(init_video).is_file():
        raise FileNotFoundError(f"input video '{init_video}' does not exist")
    _check_at_least_one(args, "steps", "fps", *([] if upscale else ["frames", "num_videos"]))
    fps = args.fps or (round(video_fps(init_video)) if init_video else 8)
    options = dict(num_inference_steps=args.steps, sampler=args.sampler or ("t2v-turbo" if args.turbo else None),
                   eta=args.eta, height=args.height, width=args.width)
    if args.guidance is not None:
        options["guidance_scale"] = args.guidance
    if not upscale:
        options.update(window_size=args.window_size, window_stride=args.window_stride, loop=args.loop,
                       noise_prior=args.noise_prior, base_noise_ratio=args.base_noise_ratio,
                       freeu=tuple(args.freeu) if args.freeu else None, num_videos_per_prompt=args.num_videos)
        if init_video is None:
            options.update(num_frames=args.frames, free_init_iterations=args.free_init_iterations,
                           free_init_filter=args.free_init_filter)
    prompt = args.prompt if upscale else _keyframes(args.prompt, args.keyframe)
    pipe = _load(VideoToVideoPipeline if init_video else TextToVideoPipeline, args)
    seed = args.seed if args.seed is not None else random.randrange(2**63)  # recorded, so the video can be remade
    generator = [torch.Generator().manual_seed(seed + i) for i in range(videos)]  # video i: seed + i
    if init_video:
        options.update(video=init_video, strength=args.strength)
    output = pipe(prompt, negative_prompt=args.negative_prompt, generator=generator, **options)
    paths = [export_to_video(clip, path, fps=fps, metadata=_metadata(args, output.settings, seed + i, fps))
             for i, (clip, path) in enumerate(zip(output.frames, _output_paths(out, videos)))]
    seeds = f"{seed}" if videos == 1 else f"{seed}..{seed + videos - 1} (one per video)"
    print(f"vidfusion: seed {seeds}; remake with --seed or --from {paths[0]}", file=sys.stderr)
    return paths


def _output_paths(out: Path, count: int) -> list[Path]:
    """OUT for one video, OUT-1, OUT-2, ... (before the suffix) for several."""
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(count)]


def _free_output(stem: str, count: int) -> Path:
    """The default output ./STEM.mp4, or STEM-1.mp4, STEM-2.mp4, ... when that is taken: never replaces a file."""
    for k in range(100_000):
        out = Path(f"{stem}-{k}.mp4" if k else f"{stem}.mp4")
        if not any(path.exists() for path in _output_paths(out, count)):
            return out
    raise FileExistsError(f"no free output name like ./{stem}.mp4; pass --out")


# a failure while running that a user can do something about: the hint printed with it
OUT_OF_MEMORY_HINT = ("out of memory: try --offload model (or sequential), --vae-slicing, --dtype float16 on a GPU, "
                      "or a smaller --width / --height / --frames")


def _failure_line(exc: BaseException) -> str:
    """One line for an error while running (exit 1)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, MemoryError) or any(s in message.lower() for s in ("out of memory", "allocate memory",
                                                                          "not enough memory")):
        return f"vidfusion: error: {OUT_OF_MEMORY_HINT} ({type(exc).__name__}: {message[:300]})"
    return f"vidfusion: error: {type(exc).__name__}: {message} (run with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code: 0 done, 2 bad arguments or input (one line, nothing written),
    1 a failure while running (one line; --debug or VIDFUSION_DEBUG=1 prints the traceback), 130 interrupted."""
    debug = os.environ.get("VIDFUSION_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = debug or getattr(args, "debug", False)
        if args.command == "generate" and args.from_file:
            defaults = vars(parser.parse_args(["generate", "x"]))
            _settings_from_video(args, {**defaults, "prompt": None})
        if args.command in ("generate", "upscale"):
            print("\n".join(_generate(args)))
        elif args.command == "info":
            print(_info(args))
        elif args.command == "batch":
            return _batch(args)
        elif args.command == "convert":
            from .convert import convert

            print(convert(args.src, args.dst, to=args.to, dtype=args.dtype, vae=args.vae, clip=args.clip,
                          overwrite=args.overwrite))
        elif args.command == "train-lora":
            from .train import TrainOptions, train_lora

            names = set(TrainOptions.__dataclass_fields__) - {"progress"}
            options = {k: v for k, v in vars(args).items() if k in names}
            print(train_lora(args.data, args.out, progress=not args.quiet, **options))
        elif args.command == "serve":
            _serve(args)
        else:
            from .random_checkpoint import write_random_checkpoint

            print(write_random_checkpoint(args.dir, args.preset, args.seed, args.fp16_variant))
        return 0
    except UsageError as exc:
        print(f"vidfusion: error: {exc}", file=sys.stderr)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"vidfusion: error: {message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("vidfusion: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # out of memory, a full disk, a bug: a failure while running, not a bad argument
        if debug:
            traceback.print_exc()
        print(_failure_line(exc), file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
