"""One job on one loaded pipeline, wherever it runs (a worker thread of the API process or a Ray actor on another
machine): params + the job's input files as bytes -> step reports (progress, preview picture) -> the encoded video,
its poster and settings as bytes, which the API process writes. Nothing here touches the job store."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..lora.apply import adapter_weights, apply_loras
from ..media.metadata import video_settings
from ..media.video_io import export_to_video, read_video

INPUT_KEYS = ("image", "last_image", "video")  # params naming a file of DATA/inputs (sent to the runner as bytes)
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# (step done, total steps, preview PNG or None) -> False to stop the job
StepReport = Callable[[int, int, bytes | None], bool]


class JobCancelled(Exception):
    """The job was cancelled (or the server is stopping) while it ran."""


@dataclass(frozen=True)
class JobResult:
    """A finished job, as it travels back to the API process (from a Ray actor: pickled bytes)."""

    video: bytes  # the mp4, settings embedded
    poster: bytes  # JPEG of the middle frame
    settings: dict[str, Any]


def lora_files(lora_dir: str | Path | None) -> dict[str, Path]:
    """The adapters a server offers per request: name (file stem) -> file, every LoRA file directly in `lora_dir`."""
    if lora_dir is None:
        return {}
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--lora-dir '{folder}' is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
            if path.stem in files:
                raise ValueError(f"--lora-dir has two LoRAs named {path.stem!r} ({files[path.stem].name}, "
                                 f"{path.name}); rename one")
            files[path.stem] = path.resolve()  # videos record where it is, wherever the server was started
    return files


def check_lora_names(named: list[str], loras: list[tuple[str, float]], turbo: bool) -> None:
    """A --lora-dir name must differ from the adapters every job uses (their file stems, t2v-turbo)."""
    from ..checkpoints.published import TURBO_LORA

    base = {Path(path).stem for path, _ in loras} | ({Path(TURBO_LORA[1]).stem, "t2v-turbo"} if turbo else set())
    clash = sorted(set(named) & base)
    if clash:
        raise ValueError(f"--lora-dir has {clash[0]!r}, also the name of a --lora / --turbo adapter that every job "
                         "uses; rename the file")


def image_bytes(frames: np.ndarray, fmt: str, scale: int = 1) -> bytes:
    """The middle frame of (F, H, W, 3) frames (uint8, or floats in [0, 1]) as PNG / JPEG bytes, enlarged `scale`
    times (nearest; latent previews are 1/8 of the video size)."""
    from PIL import Image

    frame = frames[len(frames) // 2]
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(frame)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


@dataclass(frozen=True)
class ModelOptions:
    """What every runner loads: the checkpoint and its adapters."""

    model: str
    variant: str | None = None
    revision: str | None = None
    dtype: str | None = None
    vae: str | None = None
    clip: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)  # in every job (--lora PATH[:WEIGHT])
    lora_weight_name: str | None = None
    lora_target: str | None = None
    turbo: bool = False
    lora_dir: str | None = None  # adapters a request may name
    preview_decoder: str | None = None  # tiny decoder for the live previews (TAESD / TAESDV)


JOB_FOLDER_PREFIX = "vidfusion-job-"  # + the pid of the process that made it: a dead process's folders are swept


def sweep_job_folders(folder: str | None = None) -> list[Path]:
    """Remove the per-job temp folders that killed workers left (their pid is gone), not a live one's; returns
    what was removed."""
    import shutil

    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob(f"{JOB_FOLDER_PREFIX}*"):
        pid = path.name[len(JOB_FOLDER_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def load_runner(options: ModelOptions, device: str | None, named_loras: dict[str, tuple[str, str]]) -> JobRunner:
    """A pipeline loaded as `options` say on `device` (None: CUDA when there is one), with the server's adapters:
    the one loading path of the embedded workers and the Ray actors (which sweep the job folders killed workers
    left on this machine first)."""
    from ..devices import device_and_dtype
    from ..pipelines.text_to_video import TextToVideoPipeline

    sweep_job_folders()
    device, dtype = device_and_dtype(device, options.dtype)
    pipe = TextToVideoPipeline.from_pretrained(options.model, dtype=dtype, variant=options.variant,
                                               revision=options.revision, vae=options.vae,
                                               text_encoder=options.clip).to(device)
    return JobRunner(pipe, options.model, options.loras, options.lora_weight_name, options.lora_target,
                     options.turbo, named_loras, options.preview_decoder)


class JobRunner:
    """A loaded pipeline with the server's adapters: `--lora` / `--turbo` ones in every job, `--lora-dir` ones
    loaded once (inactive) and switched per job by re-merging, never reloading."""

    def __init__(self, pipe: Any, model: str, loras: list[tuple[str, float]] | None = None,
                 lora_weight_name: str | None = None, lora_target: str | None = None, turbo: bool = False,
                 named_loras: dict[str, tuple[str, str]] | None = None, preview_decoder: str | None = None):
        """named_loras: name -> (file to load on this machine, path recorded in the videos); preview_decoder: a
        tiny decoder (TAESD / TAESDV, pipe.load_tiny_decoder) for real preview pictures at every step."""
        pipe.set_progress_bar_config(disable=True)
        check_lora_names(list(named_loras or {}), loras or [], turbo)
        self.pipe = pipe
        self.metadata = {"model": str(model), **apply_loras(pipe, loras or [], lora_weight_name, lora_target, turbo)}
        self.base = adapter_weights(pipe)  # adapter -> weight, in every job
        self.named = {name: recorded for name, (_, recorded) in (named_loras or {}).items()}
        for name, (path, _) in (named_loras or {}).items():
            pipe.load_lora_weights(path, adapter_name=name, scale=0.0, target=lora_target)
        if preview_decoder:
            pipe.load_tiny_decoder(preview_decoder)
        self._in_use: dict[str, float] | None = None
        self._use_loras([])
        self._video_pipe: Any = None

    def describe(self) -> dict[str, Any]:
        """What the API process needs to know of the pipeline (it may not load one itself)."""
        return {"sampler_defaults": self.pipe.sampler_defaults(), "video_metadata": self.metadata,
                "video_sampler_defaults": self._video_pipeline().sampler_defaults(),
                "size": self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor, "loras": sorted(self.named),
                "default_sampler": self.pipe.sampler_or_turbo(None)[0],
                "cache_branches": self.pipe.unet.skip_count}

    def _use_loras(self, requested: list[dict[str, Any]]) -> None:
        """The base adapters plus the requested ones at their weights (skipped when the last job used the same)."""
        unknown = [lora["name"] for lora in requested if lora["name"] not in self.named]
        if unknown:
            raise ValueError(f"unknown LoRA {unknown[0]!r}; this server has: {', '.join(self.named) or 'none'}")
        wanted = {**self.base, **{lora["name"]: float(lora["weight"]) for lora in requested}}
        if wanted != self._in_use and (wanted or self.named or self.base):
            self.pipe.set_adapters(list(wanted), list(wanted.values()))
        self._in_use = wanted

    def _lora_metadata(self, requested: list[dict[str, Any]]) -> dict[str, Any]:
        if not requested:
            return self.metadata
        extra = [{"path": self.named[lora["name"]], "weight": float(lora["weight"])} for lora in requested]
        return {**self.metadata, "loras": [*self.metadata.get("loras", []), *extra]}

    def _video_pipeline(self) -> Any:
        """The video-to-video pipeline on the same loaded models (made once)."""
        if self._video_pipe is None:
            from ..pipelines.video2video import VideoToVideoPipeline

            self._video_pipe = VideoToVideoPipeline.from_pipe(self.pipe)
        return self._video_pipe

    def run(self, params: dict[str, Any], inputs: dict[str, bytes], report: StepReport) -> JobResult:
        """Generate one job's video. `inputs`: the bytes of the files its INPUT_KEYS params name. Raises
        JobCancelled when `report` returns False."""
        requested = params.get("loras") or []
        self._use_loras(requested)
        total = params["num_inference_steps"]

        def on_step(step: int, timestep: torch.Tensor, latents: torch.Tensor) -> None:
            middle = latents.shape[2] // 2  # the preview is the middle frame: only it is decoded
            frame = self.pipe.preview(latents[:1, :, middle:middle + 1])[0]  # (1, H or h, W or w, 3)
            preview = image_bytes(frame, "PNG", scale=max(1, params["height"] // frame.shape[1]))
            if not report(step + 1, total, preview):
                raise JobCancelled

        with tempfile.TemporaryDirectory(prefix=f"{JOB_FOLDER_PREFIX}{os.getpid()}-") as tmp:
            pipe, options = self._call_options(params, inputs, Path(tmp))
            generator = torch.Generator("cpu").manual_seed(params["seed"])  # same video on any device
            output = pipe(params["prompt"], negative_prompt=params.get("negative_prompt"), num_inference_steps=total,
                          height=params["height"], width=params["width"], guidance_scale=params["guidance_scale"],
                          sampler=params.get("sampler"), generator=generator, callback=on_step, output_type="np",
                          **options)
            frames = output.frames[0]
            inputs_used = {"init_video": params.get("video"), "image": params.get("image"),
                           "last_image": params.get("last_image")}  # the server's copies: `generate --from` there
            settings = video_settings(output.settings, params, **self._lora_metadata(requested), **inputs_used)
            path = export_to_video(frames, Path(tmp) / "video.mp4", fps=params["fps"],
                                   interpolate_fps=params.get("interpolate_fps"), metadata=settings)
            return JobResult(Path(path).read_bytes(), image_bytes(frames, "JPEG"), settings)

    def _call_options(self, params: dict[str, Any], inputs: dict[str, bytes], tmp: Path) -> tuple[Any, dict]:
        """The pipeline a job runs on (video-to-video for a video input) and its input arguments."""
        from PIL import Image

        options: dict[str, Any] = {}
        for key in ("image", "last_image"):
            if params.get(key):
                options[key] = Image.open(io.BytesIO(inputs[key])).convert("RGB")
        if params.get("cache"):
            options.update(cache=params["cache"], cache_interval=params["cache_interval"],
                           cache_branch=params["cache_branch"])
        if not params.get("video"):
            return self.pipe, {**options, "num_frames": params["num_frames"]}
        source = tmp / f"input{Path(params['video']).suffix}"
        source.write_bytes(inputs["video"])
        frames = read_video(source, max_frames=params["num_frames"])  # (F, H, W, 3) uint8
        return self._video_pipeline(), {**options, "video": frames, "strength": params["strength"]}
