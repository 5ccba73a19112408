"""One worker thread per device: takes queued jobs in order, runs the pipeline, writes the video atomically."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_file
from ..metadata import video_settings
from ..video_io import export_to_video
from .jobs import FAILED, RUNNING, SUCCEEDED, JobStore

log = logging.getLogger("vidfusion.serve")


class JobCancelled(Exception):
    pass


def write_image(frames: np.ndarray, path: Path, scale: int = 1) -> None:
    """The middle frame of (F, H, W, 3) frames (uint8, or floats in [0, 1]) as PNG / JPEG by suffix, enlarged
    `scale` times (nearest; latent previews are 1/8 of the video size), written to a temp name and renamed."""
    from PIL import Image

    frame = frames[len(frames) // 2]
    if frame.dtype != np.uint8:
        frame = (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(frame)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    with atomic_file(path, suffix=path.suffix) as tmp:
        image.save(tmp, format="PNG" if path.suffix == ".png" else "JPEG", quality=90)


class Worker(threading.Thread):
    def __init__(self, store: JobStore, pipe: Any, name: str, video_metadata: dict[str, Any] | None = None):
        super().__init__(name=f"vidfusion-worker-{name}", daemon=True)
        self.store = store
        self.pipe = pipe
        self.video_metadata = video_metadata or {}  # model, LoRAs: stored in each video beside its parameters
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        with self.store.changed:
            self.store.changed.notify_all()

    def run(self) -> None:
        while not self._stop_event.is_set():
            job = self.store.claim()
            if job is None:
                with self.store.changed:
                    self.store.changed.wait(timeout=0.5)
                continue
            self.run_job(job.id, job.params)

    def run_job(self, job_id: str, params: dict[str, Any]) -> None:
        total = params["num_inference_steps"]

        def on_step(step: int, timestep: torch.Tensor, latents: torch.Tensor) -> None:
            preview = self.pipe.preview(latents)[0]  # (F, h, w, 3) uint8 at latent size
            write_image(preview, self.store.preview_path(job_id), scale=self.pipe.vae_scale_factor)
            still_running = self.store.progress(job_id, step + 1, total)
            if self._stop_event.is_set() or not still_running:
                raise JobCancelled

        try:
            log.info("job %s: running", job_id)
            generator = torch.Generator("cpu").manual_seed(params["seed"])  # same video on any device
            output = self.pipe(params["prompt"], params.get("negative_prompt"), num_frames=params["num_frames"],
                               height=params["height"], width=params["width"], num_inference_steps=total,
                               guidance_scale=params["guidance_scale"], sampler=params.get("sampler"),
                               generator=generator, callback=on_step, output_type="np",
                               image=params.get("image"), last_image=params.get("last_image"))
            frames = output.frames[0]
            if self.store.status_of(job_id) != RUNNING:
                return
            write_image(frames, self.store.poster_path(job_id))
            export_to_video(frames, self.store.video_path(job_id), fps=params["fps"],
                            interpolate_fps=params.get("interpolate_fps"),
                            metadata=video_settings(output.settings, params, **self.video_metadata))
            if not self.store.finish(job_id, SUCCEEDED):  # cancelled while encoding: drop the file
                self.store.video_path(job_id).unlink(missing_ok=True)
            log.info("job %s: succeeded", job_id)
        except JobCancelled:
            log.info("job %s: stopped (%s)", job_id, "server stopping" if self._stop_event.is_set() else "cancelled")
        except Exception as exc:  # a failed job must not kill the worker
            log.exception("job %s failed", job_id)
            message = str(exc).splitlines()[0] if str(exc) else ""
            self.store.finish(job_id, FAILED, f"{type(exc).__name__}: {message}"[:500])
