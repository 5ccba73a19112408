"""What the command line accepts: the argparse table of every `vidfusion` command (cli.py runs them)."""

from __future__ import annotations

import argparse
import os

from ..checkpoints.published import TURBO_LORA

DEFAULT_MODEL = "damo-vilab/text-to-video-ms-1.7b"
DTYPES = ("float32", "float16", "bfloat16")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from ..media.metadata import __version__
    from ..sampling.names import FREE_INIT_FILTERS, NOISE_PRIORS, SAMPLER_NAMES

    parser = _Parser(prog="vidfusion", description="Text-to-video with ModelScope / Zeroscope checkpoints.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (or VIDFUSION_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"vidfusion {__version__}")
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
    gen.add_argument("--image", default=None, help="fix the first frame to this picture (training-free guidance)")
    gen.add_argument("--last-image", default=None, help="fix the last frame to this picture")
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
    # switches a --from video may have stored on, switched off for the remake
    gen.add_argument("--no-loop", dest="loop", action="store_false", default=argparse.SUPPRESS,
                     help="with --from: not a loop, even if the video was")
    gen.add_argument("--no-turbo", dest="turbo", action="store_false", default=argparse.SUPPRESS,
                     help="with --from: without T2V-Turbo (and without the sampler, steps and guidance it implied)")
    gen.add_argument("--no-lora", action="store_true", help="with --from: without the LoRAs the video records")
    gen.add_argument("--trust-sources", action="store_true",
                     help="with --from: read the input files and download the hub repos the video names")
    _add_server_options(gen, "run on this vidfusion server instead of here (input files are uploaded)")

    up = sub.add_parser("upscale", help="resize a video, then refine it with video-to-video (Zeroscope XL recipe)")
    up.add_argument("video")
    up.add_argument("prompt")
    _add_generation_options(up, SAMPLER_NAMES, model="cerspense/zeroscope_v2_XL")
    up.add_argument("--width", type=int, default=1024)
    up.add_argument("--height", type=int, default=576)
    up.add_argument("--strength", type=float, default=0.6)
    up.add_argument("--fps", type=int, default=None, help="default: the input's")

    ext = sub.add_parser("extend", help="continue a video: new frames whose start is conditioned on its last ones")
    ext.add_argument("video")
    ext.add_argument("prompt")
    _add_generation_options(ext, SAMPLER_NAMES)
    ext.add_argument("--frames", type=int, default=16, help="frames of the new clip (overlap included)")
    ext.add_argument("--overlap", type=int, default=4, help="the input's last frames the new clip starts from")
    ext.add_argument("--fps", type=int, default=None, help="default: the input's")

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
    srv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest picture or video a request may upload")
    srv.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                     help="another origin whose pages may call /v1 (repeatable), e.g. the public https://NAME of a "
                          "reverse proxy that rewrites Host to this server's address")
    srv.add_argument("--max-concurrent-uploads", type=int, default=4,
                     help="upload requests received at once (their bodies in memory); more answer 429")
    srv.add_argument("--max-output-frames", type=int, default=512,
                     help="most frames a video may have after interpolation (num_frames x interpolate_fps / fps)")
    srv.add_argument("--keep-days", type=float, default=None,
                     help="remove finished jobs (record, video, inputs) this many days after they finished")
    srv.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    srv.add_argument("--ray", default=None, metavar="ADDRESS",
                     help="run jobs on Ray actors: 'local' starts a local instance, 'auto' or an address joins a "
                          "cluster (default: in this process, one worker per --device)")
    srv.add_argument("--workers", type=int, default=None,
                     help="with --ray: actors (default: one per GPU of the cluster, or one per machine without GPUs)")
    srv.add_argument("--gpus-per-worker", type=float, default=None)
    srv.add_argument("--cpus-per-worker", type=float, default=None)
    srv.add_argument("--preview-decoder", nargs="?", const="madebyollin/taesd", default=None, metavar="ID_OR_PATH",
                     help="live previews decoded by a tiny decoder (TAESD, or TAESDV: madebyollin/taesdv) instead "
                          "of the latents' approximate colours (default with the flag: madebyollin/taesd)")
    srv.add_argument("--lora-dir", default=None,
                     help="folder of LoRAs a request may name (file stem) with a weight; loaded once on every worker")
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
    conv.add_argument("--fuse", action="store_true", help="merge the --lora / --turbo adapters into the weights")
    _add_lora_options(conv)

    jobs = sub.add_parser("jobs", help="list, show, cancel or download the jobs of a vidfusion server")
    jobs.add_argument("action", choices=("list", "show", "cancel", "download"))
    jobs.add_argument("job", nargs="?", default=None, help="job id (show, cancel, download)")
    jobs.add_argument("--out", default=None, help="download: the file (default ./vidfusion-JOB.mp4)")
    jobs.add_argument("--status", default=None, choices=("queued", "running", "succeeded", "failed", "cancelled"))
    jobs.add_argument("--limit", type=int, default=50)
    _add_server_options(jobs, "the server (default: $VIDFUSION_SERVER)")

    info = sub.add_parser("info", help="print the generation settings stored in a video vidfusion wrote")
    info.add_argument("video")
    info.add_argument("--json", action="store_true", help="one JSON object")

    init = sub.add_parser("init-random", help="write a random-weight checkpoint in the published layout")
    init.add_argument("dir")
    init.add_argument("--preset", choices=("tiny", "tiny-original", "full"), default="tiny")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--fp16-variant", action="store_true", help="also write *.fp16.safetensors")
    return parser


def _add_server_options(p: argparse.ArgumentParser, server_help: str) -> None:
    p.add_argument("--server", default=os.environ.get("VIDFUSION_SERVER") or None, metavar="URL",
                   help=f"{server_help} (default: $VIDFUSION_SERVER)")
    p.add_argument("--token", default=os.environ.get("VIDFUSION_TOKEN") or None,
                   help="the server's bearer token (default: $VIDFUSION_TOKEN)")


def given_options(argv: list[str]) -> set[str]:
    """The options (dests) a command line sets itself, decided from the words typed, not by comparing values with the
    defaults: `--frames 16` is given although 16 is the default. The same parser with every default suppressed keeps
    only what the command line named."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        for action in current._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    return set(vars(parser.parse_args(argv)))


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
    p.add_argument("--prompt-syntax", choices=("a1111", "none"), default="a1111",
                   help="a1111: (emphasis), [less], (word:1.3), BREAK, long prompts in chunks; none: literal text")
    p.add_argument("--prompt-weighting", choices=("original", "plain"), default="original",
                   help="original: A1111's mean-preserving emphasis; plain: without the rescale")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="classifier-free guidance only at noise levels sigma in [LO, HI] (one UNet pass elsewhere)")
    p.add_argument("--cache", choices=("deepcache", "faster-diffusion"), default=None,
                   help="step caching (multi-step samplers): reuse the UNet's deep features between full steps")
    p.add_argument("--cache-interval", type=int, default=3, help="deepcache: a full UNet step every N steps")
    p.add_argument("--cache-branch", type=int, default=0, help="deepcache: skip branch cached below (0: the fastest)")
    p.add_argument("--cache-schedule", choices=("uniform", "quadratic"), default="uniform",
                   help="deepcache: full steps evenly spaced, or packed around the early-middle steps")
    p.add_argument("--decoder", default="vae", metavar="vae|tiny[:ID_OR_PATH]",
                   help="final decode: the VAE, or TAESD's tiny decoder (default madebyollin/taesd) for drafts")
    p.add_argument("--interpolate-fps", type=int, default=None, metavar="FPS",
                   help="smooth the video to this frame rate (motion-compensated; the original frames are kept)")
    p.add_argument("--lora-scale", type=float, default=None,
                   help="the LoRAs' weights times this for this video (diffusers' cross_attention_kwargs scale)")
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
