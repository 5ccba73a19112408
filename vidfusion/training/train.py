"""LoRA fine-tuning on your own clips: data (clips + captions) -> latents -> peft LoRA on the UNet -> noise-prediction
loss -> checkpoints you can resume exactly -> DIR/pytorch_lora_weights.safetensors (diffusers format).

    from vidfusion.train import train_lora
    path = train_lora("clips/", "out/", model="damo-vilab/text-to-video-ms-1.7b", target="temporal", steps=500)

Determinism is part of the contract: the data order, noise and timesteps come from generators whose state is
checkpointed, so `resume=True` ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoints.state_files import read_state_file
from ..devices import resolve_device
from ..media.fileio import atomic_file, atomic_folder, write_text
from .data import TrainDataError, find_clips, load_clips, read_clip  # noqa: F401  (public names)

_ATTENTION = (r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
              r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))")
# peft target_modules (regexes over the UNet's module names) of each --target
TARGETS = {
    "spatial": rf"(.*\.)?attentions\.\d+\.{_ATTENTION}",  # the spatial transformers: appearance
    "temporal": rf"(transformer_in|.*\.temp_attentions\.\d+)\.{_ATTENTION}",  # temporal transformers: motion
    "all": rf"((.*\.)?attentions\.\d+|transformer_in|.*\.temp_attentions\.\d+)\.{_ATTENTION}"
           r"|.*\.resnets\.\d+\.(conv1|conv2)",
}


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


@dataclass
class _Run:
    """What one training run holds: the pipeline (frozen), the UNet with its LoRA layers, the optimisation state
    and the precomputed text states / latents."""

    pipe: Any
    unet: torch.nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any
    noise_gen: torch.Generator
    texts: torch.Tensor  # (N, 77, D), one per clip
    latents: list[torch.Tensor] | None  # cached VAE latents, or None to encode each step
    device: torch.device
    half: torch.dtype | None
    step: int = 0

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "noise_rng": self.noise_gen.get_state(), "step": self.step}

    def resume(self, folder: Path) -> None:
        """Continue from a checkpoint folder: adapter weights, optimizer, scheduler, scaler, noise RNG and step."""
        from peft import set_peft_model_state_dict

        adapter, _ = read_state_file(folder / "adapter.safetensors")
        set_peft_model_state_dict(self.unet, {k[len("unet."):]: v for k, v in adapter.items()
                                              if not k.endswith(".alpha")})
        state, _ = read_state_file(folder / "training_state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.noise_gen.set_state(state["noise_rng"])
        self.step = int(state["step"])


def _start_run(opts: TrainOptions, captions: list[str], clips: list[torch.Tensor], alpha: float) -> _Run:
    """Load the model (frozen, in half precision with --mixed-precision), encode the captions (and the clips with
    --cache-latents) once, add the LoRA layers (float32) and the optimizer."""
    from peft import LoraConfig, inject_adapter_in_model

    from ..models.text_encoder import encode_text
    from ..pipelines.text_to_video import TextToVideoPipeline

    device = torch.device(resolve_device(opts.device))
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opts.mixed_precision)
    pipe = TextToVideoPipeline.from_pretrained(opts.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.gradient_checkpointing = opts.gradient_checkpointing
    if half is not None:  # the frozen models in half precision; the LoRA weights stay float32 (below)
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            model.to(half)
    with torch.no_grad():
        texts = encode_text(pipe.text_encoder, pipe.tokenizer, captions, device).float()  # (N, 77, D)
        latents = [_encode(pipe, clip.to(device)) for clip in clips] if opts.cache_latents else None
    config = LoraConfig(r=opts.rank, lora_alpha=alpha, target_modules=TARGETS[opts.target], lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A's initial values from the global RNG: seed it
        torch.manual_seed(opts.seed)
        unet = inject_adapter_in_model(config, pipe.unet)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:  # peft casts new adapters to the base layer's dtype: train them in float32
            param.data = param.data.float()
    optimizer = _optimizer([p for p in unet.parameters() if p.requires_grad], opts, device)
    return _Run(pipe, unet, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                torch.amp.GradScaler(device.type, enabled=half == torch.float16 and device.type == "cuda"),
                torch.Generator().manual_seed(opts.seed), texts, latents, device, half)


def _loss(run: _Run, opts: TrainOptions, clips: list[torch.Tensor], alphas_cumprod: torch.Tensor,
          prediction: str) -> torch.Tensor:
    """One step's loss: epsilon (or v) MSE at a uniform timestep (+ offset noise, + MotionDirector's debiased
    term). Every random draw depends only on (seed, step), so a resumed run makes the same ones."""
    batch = _batch_indices(run.step, opts.batch_size, len(clips), opts.seed)
    with torch.no_grad():
        x0 = torch.cat([run.latents[i] if run.latents else _encode(run.pipe, clips[i].to(run.device)) for i in batch])
    noise = torch.randn(x0.shape, generator=run.noise_gen).to(run.device)
    if opts.offset_noise:
        noise = noise + opts.offset_noise * torch.randn((*x0.shape[:2], 1, 1, 1), generator=run.noise_gen
                                                        ).to(run.device)
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=run.noise_gen).to(run.device)
    anchor = int(torch.randint(0, x0.shape[2], (1,), generator=run.noise_gen))
    a = alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    run.unet.train()
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(opts.seed * 1_000_003 + run.step)  # the temporal convs' dropout, per (seed, step)
        with torch.autocast(run.device.type, dtype=run.half, enabled=run.half is not None):
            pred = run.unet(noisy, t, run.texts[batch]).float()
    loss = F.mse_loss(pred, target)
    if opts.debias:  # MotionDirector: the loss also on frames relative to one anchor frame
        k = math.sqrt(2.0)
        loss = loss + F.mse_loss(k * pred - pred[:, :, anchor:anchor + 1], k * target - target[:, :, anchor:anchor + 1])
    return loss


def _validate(run: _Run, opts: TrainOptions, frames: int, out: Path) -> None:
    from ..media.video_io import export_to_video

    run.unet.eval()
    video = run.pipe(opts.validation_prompt, num_frames=frames, height=opts.height, width=opts.width,
                     generator=torch.Generator().manual_seed(opts.seed)).frames[0]
    (out / "validation").mkdir(exist_ok=True)
    export_to_video(video, out / "validation" / f"{run.step}.mp4", fps=opts.fps,
                    metadata={"prompt": opts.validation_prompt, "seed": opts.seed, "step": run.step})


def train_lora(data: str | os.PathLike, out_dir: str | os.PathLike, **options: Any) -> Path:
    """Train a LoRA on the clips in `data`; returns DIR/pytorch_lora_weights.safetensors. Options: TrainOptions.
    A run that fails before writing anything leaves no output folder behind."""
    unknown = sorted(set(options) - set(TrainOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"train_lora() got unknown options: {', '.join(unknown)}")
    opts = TrainOptions(**options)
    _check_options(opts)
    import peft  # noqa: F401  (the optional dependency: missing, the command says which extra to install)

    out = Path(out_dir)
    pairs = find_clips(data, opts.prompt)
    clips, frames = load_clips(pairs, opts.frames, opts.fps, opts.height, opts.width)
    options_record = saved_options(opts, data, frames)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        resume_from = prepare_out(out, opts, options_record)
        return _train(out, opts, pairs, clips, frames, options_record, resume_from)
    except BaseException:
        if created and not any(out.iterdir()):  # a failed command leaves no empty folder behind
            out.rmdir()
        raise


def _train(out: Path, opts: TrainOptions, pairs: list, clips: Any, frames: int, options_record: dict[str, Any],
           resume_from: Path | None) -> Path:
    """The training loop of train_lora (its arguments checked, its data loaded)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..sampling.schedules import alphas_cumprod as schedule_alphas

    alpha = float(opts.alpha if opts.alpha is not None else opts.rank)
    run = _start_run(opts, [caption for _, caption in pairs], clips, alpha)
    if resume_from is not None:
        run.resume(resume_from)
    alphas_cumprod = schedule_alphas(run.pipe.scheduler.options).to(run.device)
    prediction = run.pipe.scheduler.options["prediction_type"]

    def save_checkpoint() -> None:
        _save_atomic(out / f"checkpoint-{run.step}", {"adapter.safetensors": lora_state_dict(run.unet, alpha),
                                                      "training_state.pt": run.state(), "options.json": options_record})

    bar = tqdm(total=opts.steps, initial=run.step, disable=not opts.progress, desc="train", unit="step")
    log = open(out / "train_log.jsonl", "a")
    try:
        while run.step < opts.steps:
            start = time.perf_counter()
            loss = _loss(run, opts, clips, alphas_cumprod, prediction)
            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            run.step += 1
            log.write(json.dumps({"step": run.step, "loss": loss.item(), "lr": run.scheduler.get_last_lr()[0],
                                  "seconds": round(time.perf_counter() - start, 4), "time": round(time.time(), 3)})
                      + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
            if run.step % opts.checkpoint_every == 0 or run.step == opts.steps:
                save_checkpoint()
            if opts.validation_prompt and (run.step % opts.validation_every == 0 or run.step == opts.steps):
                _validate(run, opts, frames, out)
    except KeyboardInterrupt:
        save_checkpoint()  # Ctrl-C: keep what was trained, resume later with --resume
        raise
    finally:
        log.close()
        bar.close()
    final = out / "pytorch_lora_weights.safetensors"
    with atomic_file(final, suffix=".safetensors") as tmp:
        save_file(lora_state_dict(run.unet, alpha), tmp, metadata={"format": "pt", "target": opts.target})
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

