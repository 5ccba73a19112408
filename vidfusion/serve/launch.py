"""Putting a server together: the job store, its runners (worker threads here or a Ray actor pool) and the settings
the API takes from the loaded pipeline (sampler defaults, default size, adapters)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fastapi import FastAPI

from .app import ServeSettings, create_app
from .jobs import JobStore
from .render import ModelOptions, check_lora_names, load_runner, lora_files


def _settings_from(description: dict[str, Any], settings: ServeSettings) -> ServeSettings:
    """The API settings completed with what the loaded pipeline says."""
    size = description["size"]
    return replace(settings, default_height=size, default_width=size, sampler_defaults=description["sampler_defaults"],
                   video_sampler_defaults=description["video_sampler_defaults"],
                   video_metadata=description["video_metadata"], loras=tuple(description["loras"]),
                   default_sampler=description["default_sampler"], cache_branches=description["cache_branches"])


def local_app(settings: ServeSettings, options: ModelOptions, devices: list[str | None]) -> FastAPI:
    """The embedded server: one pipeline and worker thread per local device."""
    from .worker import Worker

    named = {name: (str(path), str(path)) for name, path in lora_files(options.lora_dir).items()}
    store = JobStore(settings.data_dir)
    store.lock()  # before any model loads: a second server on this folder stops here
    workers = []
    for device in devices:
        runner = load_runner(options, device, named)
        workers.append(Worker(store, runner, str(runner.pipe.device)))
    return create_app(store, workers, _settings_from(workers[0].runner.describe(), settings))


def ray_app(settings: ServeSettings, options: ModelOptions, address: str, workers: int | None = None,
            gpus_per_worker: float | None = None, cpus_per_worker: float | None = None) -> FastAPI:
    """The server on a Ray actor pool: this process loads no model; the first actor describes the pipeline."""
    from .ray_workers import RayWorkers

    named = lora_files(options.lora_dir)
    check_lora_names(list(named), options.loras, options.turbo)  # before any actor starts
    store = JobStore(settings.data_dir)
    store.lock()
    pool = RayWorkers(store, address, options, named, workers, gpus_per_worker, cpus_per_worker)
    description = pool.connect()
    return create_app(store, [pool], _settings_from(description, settings))

