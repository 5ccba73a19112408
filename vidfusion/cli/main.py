"""Command line: each `vidfusion` command run through the Python API (the options live in cli_args.py). Exit codes:
0 done, 2 bad arguments or input (one line, nothing written), 1 a failure while running, 130 interrupted."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from pathlib import Path

from .args import UsageError, build_parser, given_options
from .checks import check_at_least_one, check_fits, check_inputs, check_out, check_port_free, lora_specs
from .from_video import printable, settings_from_video


def slugify(text: str, limit: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "video"


def _serve(args: argparse.Namespace) -> None:
    from ..serve.guard import is_loopback, origin_of

    token = args.token or None
    origins = tuple(origin_of(url) for url in args.allowed_origin)
    if not is_loopback(args.host) and token is None:
        raise ValueError(f"refusing to serve on non-loopback host {args.host!r} without a token: pass --token or "
                         "set VIDFUSION_TOKEN")
    check_at_least_one(args, "max_queue", "max_frames", "max_pixels", "workers", "max_output_frames",
                       "max_concurrent_uploads")
    if args.keep_days is not None and not args.keep_days > 0:
        raise ValueError(f"--keep-days must be above 0, got {args.keep_days}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    check_port_free(args.host, args.port)
    if args.ray is None and (args.workers or args.gpus_per_worker or args.cpus_per_worker):
        raise ValueError("--workers, --gpus-per-worker and --cpus-per-worker need --ray (local, auto or an address)")
    if args.ray is not None and args.device:
        raise ValueError("--device is for the embedded server; with --ray use --gpus-per-worker")

    import logging

    import uvicorn

    from ..serve.launch import local_app, ray_app
    from ..serve.params import ServeSettings
    from ..serve.render import ModelOptions, lora_files

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lora_files(args.lora_dir)  # checked before anything loads
    options = ModelOptions(model=str(args.model), variant=args.variant, revision=args.revision, dtype=args.dtype,
                           vae=args.vae, clip=args.clip, loras=lora_specs(args),
                           lora_weight_name=args.lora_weight_name, lora_target=args.lora_target, turbo=args.turbo,
                           lora_dir=args.lora_dir, preview_decoder=args.preview_decoder)
    settings = ServeSettings(data_dir=args.data_dir, token=token, max_queue=args.max_queue,
                             max_frames=args.max_frames, max_pixels=args.max_pixels,
                             max_upload_mb=args.max_upload_mb, max_concurrent_uploads=args.max_concurrent_uploads,
                             allowed_origins=origins,
                             model=str(args.model), host=args.host,
                             max_output_frames=args.max_output_frames, keep_days=args.keep_days)
    if args.ray is None:
        app = local_app(settings, options, args.device or [None])
    else:
        app = ray_app(settings, options, args.ray, args.workers, args.gpus_per_worker, args.cpus_per_worker)
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


def _lora_metadata(args: argparse.Namespace) -> dict:
    from ..media.metadata import lora_settings

    return lora_settings(lora_specs(args), args.lora_weight_name, args.lora_target, args.turbo)


def _apply_loras(pipe, args: argparse.Namespace) -> None:
    from ..lora.apply import apply_loras

    apply_loras(pipe, lora_specs(args), args.lora_weight_name, args.lora_target, args.turbo)


def _load(cls, args: argparse.Namespace):
    from ..devices import device_and_dtype

    device, dtype = device_and_dtype(args.device, args.dtype)
    lora_specs(args)
    pipe = cls.from_pretrained(args.model, dtype=dtype, variant=args.variant, revision=args.revision, vae=args.vae,
                               text_encoder=args.clip)
    _apply_loras(pipe, args)
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=args.device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=args.device)
    else:
        pipe.to(device)
    kind, _, source = args.decoder.partition(":")
    if kind not in ("vae", "tiny"):
        raise ValueError(f"--decoder must be vae or tiny[:ID_OR_PATH], got {args.decoder!r}")
    if kind == "tiny":
        pipe.load_tiny_decoder(source or "madebyollin/taesd")
    if args.vae_slicing:
        pipe.enable_vae_slicing()
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    pipe.set_progress_bar_config(disable=args.quiet)
    return pipe.compile() if args.compile else pipe


def _metadata(args: argparse.Namespace, ran: dict, seed: int, fps: int) -> dict:
    from ..media.metadata import CLI_ARGUMENTS, RAN_KEYS, REQUEST_KEYS, video_settings

    values = {**vars(args), "lora": _lora_metadata(args).get("loras")}
    if args.command == "upscale":
        values["init_video"] = args.video
    extra = {key: values.get(attr) for key, attr in CLI_ARGUMENTS.items() if key not in RAN_KEYS + REQUEST_KEYS}
    request = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": seed, "fps": fps,
               "interpolate_fps": args.interpolate_fps}
    return video_settings(ran, request, **extra)


def _batch(args: argparse.Namespace) -> int:
    from ..scale.batch import read_rows, run, summary

    check_at_least_one(args, "workers", "max_attempts")
    if args.max_retries < 0:
        raise ValueError("--max-retries must be at least 0")
    total = len(read_rows(args.input))  # input errors before anything loads
    records = run(args.input, args.out_dir, model=args.model, variant=args.variant, vae=args.vae, clip=args.clip,
                  dtype=args.dtype,
                  device=args.device, ray=args.ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                  cpus_per_worker=args.cpus_per_worker, loras=lora_specs(args),
                  lora_weight_name=args.lora_weight_name, lora_target=args.lora_target, turbo=args.turbo,
                  max_retries=args.max_retries, max_attempts=args.max_attempts,
                  progress=not args.quiet)
    print(summary(records, total, args.out_dir))
    return 0 if all(r["status"] == "succeeded" for r in records) and len(records) == total else 1


def _info(args: argparse.Namespace) -> str:
    from ..media.video_io import read_metadata

    if not Path(args.video).is_file():
        raise FileNotFoundError(f"video '{args.video}' does not exist")
    meta = read_metadata(args.video)
    if args.json:
        return json.dumps(meta)
    if not meta:
        return f"{args.video}: no generation settings stored"
    return "\n".join(f"{printable(key)}: {json.dumps(value) if isinstance(value, (list, dict)) else printable(value)}"
                     for key, value in meta.items())


def _generate(args: argparse.Namespace) -> list[str]:
    upscale = args.command == "upscale"
    if args.prompt is None:
        raise ValueError("pass a prompt (or --from VIDEO to regenerate a video vidfusion wrote)")
    init_video = args.video if upscale else args.init_video
    videos = 1 if upscale else args.num_videos
    out = Path(args.out) if args.out else _free_output(f"{slugify(args.prompt)}{'-upscaled' if upscale else ''}",
                                                        videos or 1)
    check_out(out)
    check_inputs(args, init_video)
    check_at_least_one(args, "steps", "fps", *([] if upscale else ["frames", "num_videos"]))
    if getattr(args, "server", None):
        from .remote import generate_remote

        return generate_remote(args, out)
    if not upscale and init_video is None:
        check_fits(args.frames, args.height, args.width, videos)
    return _generate_here(args, init_video, out, videos)


def _generate_here(args: argparse.Namespace, init_video: str | None, out: Path, videos: int) -> list[str]:
    import random

    import torch

    from ..media.video_io import export_to_video, video_fps
    from ..pipelines.text_to_video import TextToVideoPipeline
    from ..pipelines.video2video import VideoToVideoPipeline

    upscale = args.command == "upscale"
    fps = args.fps or (round(video_fps(init_video)) if init_video else 8)
    options = _sampling_options(args)
    options.update(height=args.height, width=args.width)
    if not upscale:
        options.update(window_size=args.window_size, window_stride=args.window_stride, loop=args.loop,
                       noise_prior=args.noise_prior, base_noise_ratio=args.base_noise_ratio,
                       freeu=tuple(args.freeu) if args.freeu else None, num_videos_per_prompt=args.num_videos)
        if init_video is None:
            options.update(num_frames=args.frames, free_init_iterations=args.free_init_iterations,
                           free_init_filter=args.free_init_filter, image=args.image, last_image=args.last_image)
        elif "frames" in args.given:  # video-to-video on the input's first frames
            from ..media.video_io import read_video

            options["video"] = read_video(init_video, max_frames=args.frames)
    prompt = args.prompt if upscale else _keyframes(args.prompt, args.keyframe)
    pipe = _load(VideoToVideoPipeline if init_video is not None else TextToVideoPipeline, args)
    seed = args.seed if args.seed is not None else random.randrange(2**63)  # recorded, so the video can be remade
    generator = [torch.Generator().manual_seed(seed + i) for i in range(videos)]  # video i: seed + i
    if init_video is not None:
        options.update(video=options.get("video", init_video), strength=args.strength)
    output = pipe(prompt, negative_prompt=args.negative_prompt, generator=generator, **options)
    paths = [export_to_video(clip, path, fps=fps, interpolate_fps=args.interpolate_fps,
                             metadata=_metadata(args, output.settings, seed + i, fps))
             for i, (clip, path) in enumerate(zip(output.frames, _output_paths(out, videos)))]
    seeds = f"{seed}" if videos == 1 else f"{seed}..{seed + videos - 1} (one per video)"
    print(f"vidfusion: seed {seeds}; remake with --seed or --from {paths[0]}", file=sys.stderr)
    return paths


def _sampling_options(args: argparse.Namespace) -> dict:
    """Pipeline options every generating command shares (generate, upscale, extend)."""
    options = dict(num_inference_steps=args.steps, sampler=args.sampler or ("t2v-turbo" if args.turbo else None),
                   eta=args.eta, prompt_syntax=args.prompt_syntax, prompt_weighting=args.prompt_weighting)
    if args.guidance is not None:
        options["guidance_scale"] = args.guidance
    if args.guidance_interval is not None:
        options["guidance_interval"] = tuple(args.guidance_interval)
    if args.lora_scale is not None:
        options["cross_attention_kwargs"] = {"scale": args.lora_scale}
    if args.cache is not None:
        options.update(cache=args.cache, cache_interval=args.cache_interval, cache_branch=args.cache_branch,
                       cache_schedule=args.cache_schedule)
    if args.decoder != "vae":
        options["decoder"] = "tiny"
    return options


def _extend(args: argparse.Namespace) -> str:
    """`vidfusion extend VIDEO PROMPT`: the video and its continuation, one file (the input's frame rate)."""
    import random

    import torch

    from ..media.video_io import export_to_video, video_fps
    from ..pipelines.conditioning import extend
    from ..pipelines.text_to_video import TextToVideoPipeline

    if not Path(args.video).is_file():
        raise FileNotFoundError(f"input video '{args.video}' does not exist")
    if "model" not in args.given:  # the model the video was made with, when vidfusion made it
        from ..media.video_io import read_metadata

        args.model = read_metadata(args.video).get("model") or args.model
    out = Path(args.out) if args.out else _free_output(f"{Path(args.video).stem}-extended", 1)
    check_out(out)
    check_at_least_one(args, "steps", "frames", "overlap", "fps")
    fps = args.fps or round(video_fps(args.video))
    pipe = _load(TextToVideoPipeline, args)
    seed = args.seed if args.seed is not None else random.randrange(2**63)
    frames, ran = extend(pipe, args.video, args.prompt, args.frames, args.overlap,
                         negative_prompt=args.negative_prompt, generator=torch.Generator().manual_seed(seed),
                         **_sampling_options(args))
    meta = {**_metadata(args, ran, seed, fps), "kind": "extend", "extended": str(args.video), "overlap": args.overlap}
    path = export_to_video(frames, out, fps=fps, interpolate_fps=args.interpolate_fps, metadata=meta)
    print(f"vidfusion: seed {seed}", file=sys.stderr)
    return path


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


# optional dependencies -> the extra that installs them (a missing one is an install mistake: exit 2)
OPTIONAL_PACKAGES = {"peft": "train", "ray": "ray", "bitsandbytes": "train"}

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


def quiet_notes() -> None:
    """User-facing notes only: each Python warning once as one `vidfusion: note:` line (no file paths or source
    lines), and the libraries' own chatter (transformers' token-length warning, hub retries) off. --debug keeps
    it all."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    seen: set[str] = set()

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            print(f"vidfusion: note: {text}", file=sys.stderr)

    warnings.showwarning = one_line


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code: 0 done, 2 bad arguments or input (one line, nothing written),
    1 a failure while running (one line; --debug or VIDFUSION_DEBUG=1 prints the traceback), 130 interrupted."""
    debug = os.environ.get("VIDFUSION_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        argv = sys.argv[1:] if argv is None else argv
        args = parser.parse_args(argv)
        debug = debug or getattr(args, "debug", False)
        if not debug:
            quiet_notes()
        args.given = given_options(argv) if args.command in ("generate", "upscale", "extend") else set()
        if args.command == "generate" and args.from_file:
            settings_from_video(args, args.given)
        if args.command == "extend":
            print(_extend(args))
        elif args.command in ("generate", "upscale"):
            print("\n".join(_generate(args)))
        elif args.command == "info":
            print(_info(args))
        elif args.command == "jobs":
            from .remote import jobs_command

            print(jobs_command(args))
        elif args.command == "batch":
            return _batch(args)
        elif args.command == "convert":
            from ..pipelines.convert import convert

            print(convert(args.src, args.dst, to=args.to, dtype=args.dtype, vae=args.vae, clip=args.clip,
                          overwrite=args.overwrite, loras=lora_specs(args), lora_weight_name=args.lora_weight_name,
                          lora_target=args.lora_target, turbo=args.turbo, fuse=args.fuse))
        elif args.command == "train-lora":
            from ..training.train import TrainOptions, train_lora

            names = set(TrainOptions.__dataclass_fields__) - {"progress"}
            options = {k: v for k, v in vars(args).items() if k in names}
            print(train_lora(args.data, args.out, progress=not args.quiet, **options))
        elif args.command == "serve":
            _serve(args)
        else:
            from ..checkpoints.random_checkpoint import write_random_checkpoint

            print(write_random_checkpoint(args.dir, args.preset, args.seed, args.fp16_variant))
        return 0
    except UsageError as exc:
        print(f"vidfusion: error: {exc}", file=sys.stderr)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"vidfusion: error: {message}", file=sys.stderr)
    except ModuleNotFoundError as exc:
        if exc.name not in OPTIONAL_PACKAGES:
            print(_failure_line(exc), file=sys.stderr)
            return 1
        print(f"vidfusion: error: this command needs the optional package {exc.name}: "
              f"pip install 'vidfusion[{OPTIONAL_PACKAGES[exc.name]}]'", file=sys.stderr)
    except KeyboardInterrupt:
        print("vidfusion: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # out of memory, a full disk, a bug: a failure while running, not a bad argument
        if debug:
            traceback.print_exc()
        print(_failure_line(exc), file=sys.stderr)
        return 1
    return 2

