"""LoRA fine-tuning on your own clips: data (clips + captions) -> latents -> peft LoRA on the UNet -> noise-prediction
loss -> checkpoints you can resume exactly -> DIR/pytorch_lora_weights.safetensors (diffusers format).

    from vidfusion.train import train_lora
    path = train_lora("clips/", "out/", model="damo-vilab/text-to-video-ms-1.7b", target="temporal", steps=500)

Determinism is part of the contract: the data order, noise and timesteps come from generators whose state is
checkpointed, so `resume=True` ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .devices import resolve_device
from .fileio import atomic_file, atomic_folder, write_text

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi")
_ATTENTION = (r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
              r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))")
# peft target_modules (regexes over the UNet's module names) of each --target
TARGETS = {
    "spatial": rf"(.*\.)?attentions\.\d+\.{_ATTENTION}",  # the spatial transformers: appearance
    "temporal": rf"(transformer_in|.*\.temp_attentions\.\d+)\.{_ATTENTION}",  # temporal transformers: motion
    "all": rf"((.*\.)?attentions\.\d+|transformer_in|.*\.temp_attentions\.\d+)\.{_ATTENTION}"
           r"|.*\.resnets\.\d+\.(conv1|conv2)",
}


class TrainDataError(ValueError):
    """Training data that cannot be used: names the clip or file and what to do."""


@dataclass
class TrainOptions:
    model: str = "damo-vilab/text-to-video-ms-1.7b"
    target: str = "temporal"
    rank: int = 16
    alpha: float | None = None  # default: rank (scale 1)
    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 1
    frames: int = 16
    height: int = 256
    width: int = 256
    fps: int = 8
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    resume: bool = False
    overwrite: bool = False  # a fresh run into an --out that holds an earlier run replaces it
    validation_prompt: str | None = None
    validation_every: int = 200
    seed: int = 0
    device: str | None = None
    prompt: str | None = None  # the caption of a single-video DATA
    cache_latents: bool = False
    offset_noise: float = 0.0
    debias: bool = False
    use_8bit_adam: bool = False
    progress: bool = True


# ---- data ---------------------------------------------------------------------------------------------------

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


def load_clips(pairs: list[tuple[Path, str]], opts: TrainOptions) -> tuple[list[torch.Tensor], int]:
    """Every clip read; when all of them are short, --frames is lowered (with a warning) to what they all have."""
    frames = opts.frames
    try:
        return [read_clip(p, frames, opts.fps, opts.height, opts.width) for p, _ in pairs], frames
    except ShortClipError:
        usable = []
        for path, _ in pairs:
            try:
                read_clip(path, frames, opts.fps, opts.height, opts.width)
                usable.append(frames)
            except ShortClipError as exc:
                usable.append(exc.usable)
        if max(usable) >= frames:  # only some clips are short: name the first
            for path, _ in pairs:
                read_clip(path, frames, opts.fps, opts.height, opts.width)
        frames = min(usable)
        if frames < 2:
            raise
        warnings.warn(f"every clip is shorter than {opts.frames} frames at {opts.fps} fps: training on {frames} "
                      "frames", stacklevel=2)
        return [read_clip(p, frames, opts.fps, opts.height, opts.width) for p, _ in pairs], frames


# ---- the loop -----------------------------------------------------------------------------------------------

# options a --resume must share with the checkpoint it continues (steps may grow; speed and memory options may change)
RESUME_KEYS = ("model", "data", "target", "rank", "alpha", "lr", "batch_size", "frames", "height", "width", "fps",
               "mixed_precision", "seed", "prompt", "offset_noise", "debias")
# what a training run writes in --out
RUN_FILES = ("train_log.jsonl", "pytorch_lora_weights.safetensors", "validation")


def saved_options(opts: TrainOptions, data: str | os.PathLike, frames: int) -> dict[str, Any]:
    """The options a checkpoint records: the run's, with the frames it trained on and the data's absolute path."""
    return {**asdict(opts), "frames": frames, "data": str(Path(data).resolve())}


def prepare_out(out: Path, opts: TrainOptions, options: dict[str, Any]) -> Path | None:
    """Get --out ready; returns the checkpoint to resume from (None: a fresh run). A fresh run into a folder that
    holds an earlier run is refused without `overwrite` (which removes that run); a resume must use the options the
    checkpoint was trained with, and its log keeps only the steps up to the checkpoint (each step once)."""
    import shutil

    checkpoints = _state_paths(out)
    if opts.resume and checkpoints:
        saved = json.loads((checkpoints[-1] / "options.json").read_text())
        if "data" in saved:
            saved["data"] = str(Path(saved["data"]).resolve())
        differ = [k for k in RESUME_KEYS if k in saved and saved[k] != options[k]]
        if differ:
            raise ValueError(f"--resume: {checkpoints[-1]} was trained with "
                             + ", ".join(f"{k}={saved[k]!r}" for k in differ) + "; this run asks "
                             + ", ".join(f"{k}={options[k]!r}" for k in differ)
                             + ": pass the same options to continue it, or train into a new --out")
        step = int(checkpoints[-1].name.split("-")[1])
        log = out / "train_log.jsonl"
        if log.is_file():  # steps after the checkpoint run again: drop their lines
            kept = [line for line in log.read_text().splitlines()
                    if line.strip() and _log_step(line) is not None and _log_step(line) <= step]
            write_text(log, "".join(line + "\n" for line in kept))
        return checkpoints[-1]
    earlier = checkpoints + [out / name for name in RUN_FILES if (out / name).exists()]
    if earlier and not opts.overwrite:
        raise FileExistsError(f"'{out}' holds an earlier training run ({', '.join(p.name for p in earlier[:4])}): "
                              "pass --resume to continue it or --overwrite to replace it")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


def _log_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill


def _state_paths(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit()
                  else -1)


def lora_state_dict(unet: torch.nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """The adapter in diffusers' format: unet.<module>.lora_A.weight / lora_B.weight and unet.<module>.alpha."""
    from peft import get_peft_model_state_dict

    state = {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        state[key[:-len(".lora_A.weight")] + ".alpha"] = torch.tensor(float(alpha))
    return state


def _save_atomic(folder: Path, files: dict[str, Any]) -> None:
    """Write a checkpoint folder completely under a temp name, then rename it into place."""
    from safetensors.torch import save_file

    with atomic_folder(folder, replace=True) as tmp:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_file(content, tmp / name)
            elif name.endswith(".json"):
                (tmp / name).write_text(json.dumps(content, indent=1))
            else:
                torch.save(content, tmp / name)


def train_lora(data: str | os.PathLike, out_dir: str | os.PathLike, **options: Any) -> Path:
    """Train a LoRA on the clips in `data`; returns DIR/pytorch_lora_weights.safetensors. Options: TrainOptions."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from .pipeline import TextToVideoPipeline
    from .schedules import alphas_cumprod as schedule_alphas
    from .text_encoder import encode_text
    from .video_io import export_to_video

    unknown = sorted(set(options) - set(TrainOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"train_lora() got unknown options: {', '.join(unknown)}")
    opts = TrainOptions(**options)
    _check_options(opts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = find_clips(data, opts.prompt)
    clips, frames = load_clips(pairs, opts)
    options_record = saved_options(opts, data, frames)
    resume_from = prepare_out(out, opts, options_record)
    device = torch.device(resolve_device(opts.device))
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opts.mixed_precision)

    pipe = TextToVideoPipeline.from_pretrained(opts.model).to(device)  # float32 master copy of the LoRA weights
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.gradient_checkpointing = opts.gradient_checkpointing
    if half is not None:  # the frozen models in half precision; peft keeps the LoRA weights in float32
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            model.to(half)
    with torch.no_grad():
        texts = encode_text(pipe.text_encoder, pipe.tokenizer, [c for _, c in pairs], device).float()  # (N, 77, D)
        latents = [_encode(pipe, clip.to(device)) for clip in clips] if opts.cache_latents else None

    alpha = float(opts.alpha if opts.alpha is not None else opts.rank)
    config = LoraConfig(r=opts.rank, lora_alpha=alpha, target_modules=TARGETS[opts.target], lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A's initial values from the global RNG: seed it
        torch.manual_seed(opts.seed)
        unet = inject_adapter_in_model(config, pipe.unet)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:  # peft casts new adapters to the base layer's dtype: train them in float32
            param.data = param.data.float()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = _optimizer(params, opts, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16 and device.type == "cuda")
    noise_gen = torch.Generator().manual_seed(opts.seed)
    alphas_cumprod = schedule_alphas(pipe.scheduler.options).to(device)
    prediction = pipe.scheduler.options["prediction_type"]
    step = 0
    if resume_from is not None:
        state_dir = resume_from
        from safetensors.torch import load_file

        adapter = {k[len("unet."):]: v for k, v in load_file(state_dir / "adapter.safetensors").items()
                   if not k.endswith(".alpha")}
        set_peft_model_state_dict(unet, adapter)
        state = torch.load(state_dir / "training_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        noise_gen.set_state(state["noise_rng"])
        step = int(state["step"])

    def save_checkpoint() -> None:
        _save_atomic(out / f"checkpoint-{step}", {
            "adapter.safetensors": lora_state_dict(unet, alpha),
            "training_state.pt": {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "scaler": scaler.state_dict(), "noise_rng": noise_gen.get_state(), "step": step},
            "options.json": options_record})

    from tqdm.auto import tqdm

    bar = tqdm(total=opts.steps, initial=step, disable=not opts.progress, desc="train", unit="step")
    log = open(out / "train_log.jsonl", "a")
    try:
        while step < opts.steps:
            start = time.perf_counter()
            batch = _batch_indices(step, opts.batch_size, len(pairs), opts.seed)
            with torch.no_grad():
                x0 = torch.cat([latents[i] if latents else _encode(pipe, clips[i].to(device)) for i in batch])
            context = texts[batch]
            noise = torch.randn(x0.shape, generator=noise_gen).to(device)
            if opts.offset_noise:
                noise = noise + opts.offset_noise * torch.randn((*x0.shape[:2], 1, 1, 1), generator=noise_gen
                                                                ).to(device)
            t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=noise_gen).to(device)
            anchor = int(torch.randint(0, x0.shape[2], (1,), generator=noise_gen))
            a = alphas_cumprod[t].view(-1, 1, 1, 1, 1)
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            unet.train()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(opts.seed * 1_000_003 + step)  # dropout's draws depend on (seed, step): resumable
                with torch.autocast(device.type, dtype=half, enabled=half is not None):
                    pred = unet(noisy, t, context).float()
            loss = F.mse_loss(pred, target)
            if opts.debias:  # MotionDirector: the loss also on frames relative to one anchor frame
                k = math.sqrt(2.0)
                loss = loss + F.mse_loss(k * pred - pred[:, :, anchor:anchor + 1],
                                         k * target - target[:, :, anchor:anchor + 1])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            log.write(json.dumps({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                                  "seconds": round(time.perf_counter() - start, 4), "time": round(time.time(), 3)})
                      + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
            if step % opts.checkpoint_every == 0 or step == opts.steps:
                save_checkpoint()
            if opts.validation_prompt and (step % opts.validation_every == 0 or step == opts.steps):
                unet.eval()
                video = pipe(opts.validation_prompt, num_frames=frames, height=opts.height, width=opts.width,
                             generator=torch.Generator().manual_seed(opts.seed)).frames[0]
                (out / "validation").mkdir(exist_ok=True)
                export_to_video(video, out / "validation" / f"{step}.mp4", fps=opts.fps,
                                metadata={"prompt": opts.validation_prompt, "seed": opts.seed, "step": step})
    except KeyboardInterrupt:
        save_checkpoint()  # Ctrl-C: keep what was trained, resume later with --resume
        raise
    finally:
        log.close()
        bar.close()
    from safetensors.torch import save_file

    final = out / "pytorch_lora_weights.safetensors"
    with atomic_file(final, suffix=".safetensors") as tmp:
        save_file(lora_state_dict(unet, alpha), tmp, metadata={"format": "pt", "target": opts.target})
    return final


def _check_options(opts: TrainOptions) -> None:
    if opts.target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {opts.target!r}")
    if opts.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {opts.mixed_precision!r}")
    for name in ("rank", "steps", "batch_size", "frames", "height", "width", "fps", "checkpoint_every",
                 "validation_every"):
        value = getattr(opts, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if opts.height % 8 or opts.width % 8:
        raise ValueError(f"height and width must be multiples of 8, got {opts.height}x{opts.width}")
    if not opts.lr > 0:
        raise ValueError(f"lr must be positive, got {opts.lr!r}")


def _optimizer(params: list[torch.nn.Parameter], opts: TrainOptions, device: torch.device):
    if not opts.use_8bit_adam:
        return torch.optim.AdamW(params, lr=opts.lr)
    if device.type != "cuda":
        raise ValueError("8-bit Adam (bitsandbytes) runs on CUDA GPUs only; drop --use-8bit-adam on this device")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit(params, lr=opts.lr)


def _encode(pipe, clip: torch.Tensor) -> torch.Tensor:
    """clip (3, F, H, W) in [-1, 1] -> latents (1, C, F, h, w): the posterior mean, scaled."""
    mean, _ = pipe.vae.encode(clip.permute(1, 0, 2, 3).to(pipe.vae.dtype))  # (F, C, h, w)
    return (mean.float() * pipe.vae.config.scaling_factor).permute(1, 0, 2, 3)[None]


def _batch_indices(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """The clips of one step: epochs of a seeded permutation, so the order depends only on (seed, step)."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        indices.append(int(order[offset]))
    return indices

