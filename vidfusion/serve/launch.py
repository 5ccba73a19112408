"""Putting a server together: the job store, its runners (worker threads here or a Ray actor pool) and the settings
the API takes from the loaded pipeline (sampler defaults, default size, adapters)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI

from .app import ServeSettings, create_app
from .jobs import JobStore
from .render import JobRunner, check_lora_names, lora_files


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


def _settings_from(description: dict[str, Any], settings: ServeSettings) -> ServeSettings:
    """The API settings completed with what the loaded pipeline says."""
    size = description["size"]
    return replace(settings, default_height=size, default_width=size, sampler_defaults=description["sampler_defaults"],
                   video_sampler_defaults=description["video_sampler_defaults"],
                   video_metadata=description["video_metadata"], loras=tuple(description["loras"]),
                   default_sampler=description["default_sampler"], cache_branches=description["cache_branches"])


def local_app(settings: ServeSettings, options: ModelOptions, devices: list[str | None]) -> FastAPI:
    """The embedded server: one pipeline and worker thread per local device."""
    from ..devices import device_and_dtype
    from ..pipeline import TextToVideoPipeline
    from .worker import Worker

    named = {name: (str(path), str(path)) for name, path in lora_files(options.lora_dir).items()}
    store = JobStore(settings.data_dir)
    workers = []
    for device in devices:
        device, dtype = device_and_dtype(device, options.dtype)
        pipe = TextToVideoPipeline.from_pretrained(options.model, dtype=dtype, variant=options.variant,
                                                   revision=options.revision, vae=options.vae,
                                                   text_encoder=options.clip).to(device)
        runner = JobRunner(pipe, options.model, options.loras, options.lora_weight_name, options.lora_target,
                           options.turbo, named, options.preview_decoder)
        workers.append(Worker(store, runner, str(device)))
    return create_app(store, workers, _settings_from(workers[0].runner.describe(), settings))


def ray_app(settings: ServeSettings, options: ModelOptions, address: str, workers: int | None = None,
            gpus_per_worker: float | None = None, cpus_per_worker: float | None = None) -> FastAPI:
    """The server on a Ray actor pool: this process loads no model; the first actor describes the pipeline."""
    from .ray_workers import RayWorkers

    check_lora_names(list(lora_files(options.lora_dir)), options.loras, options.turbo)  # before any actor starts
    store = JobStore(settings.data_dir)
    actor_options = {k: getattr(options, k) for k in ("model", "variant", "revision", "dtype", "vae", "clip", "loras",
                                                      "lora_weight_name", "lora_target", "turbo",
                                                      "preview_decoder")}
    pool = RayWorkers(store, address, actor_options, lora_files(options.lora_dir), workers, gpus_per_worker,
                      cpus_per_worker)
    description = pool.connect()
    return create_app(store, [pool], _settings_from(description, settings))

