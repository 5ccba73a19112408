"""`vidfusion serve --ray`: jobs run on a pool of Ray actors, one loaded pipeline each, on any machine of the cluster.

The API process keeps SQLite as the one source of truth. One thread per actor slot claims a queued job only when its
actor is idle (no queue inside Ray), so a job is either queued in SQLite or running on exactly one actor. While it
runs, the thread polls the actor for progress and preview pictures and forwards a cancel; the finished video comes
back as bytes and the API process writes it (no shared filesystem). An actor that dies: its job is queued again with
the same seed (failed after MAX_ATTEMPTS attempts) and the slot gets a new actor. Without a fixed `workers`, the
pool grows when machines join (one worker per GPU, or per machine / `cpus_per_worker` CPUs without GPUs)."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .jobs import FAILED, RUNNING, JobStore
from .render import JobCancelled, JobResult, JobRunner
from .worker import complete, error_line, read_inputs, record_step

log = logging.getLogger("vidfusion.serve")
POLL_SECONDS = 0.2
GROW_SECONDS = 10.0


class JobActor:
    """A Ray actor: one pipeline, one job at a time; `poll` and `cancel` answer while a job runs (threaded actor)."""

    def __init__(self, options: dict[str, Any], named_loras: dict[str, tuple[str, str, bytes]],
                 threads: int | None = None):
        """options: from_pretrained's model, variant, revision, dtype, vae, clip and JobRunner's LoRA options;
        named_loras: name -> (file name, path recorded in videos, bytes), written to a folder of this machine."""
        import torch

        from ..devices import device_and_dtype
        from ..pipeline import TextToVideoPipeline

        if threads:
            torch.set_num_threads(threads)
        device, dtype = device_and_dtype(None, options["dtype"])
        pipe = TextToVideoPipeline.from_pretrained(options["model"], dtype=dtype, variant=options["variant"],
                                                   revision=options["revision"], vae=options["vae"],
                                                   text_encoder=options["clip"]).to(device)
        self._folder = tempfile.TemporaryDirectory(prefix="vidfusion-loras-")
        files = {}
        for name, (file_name, recorded, data) in named_loras.items():
            (Path(self._folder.name) / file_name).write_bytes(data)
            files[name] = (str(Path(self._folder.name) / file_name), recorded)
        self.runner = JobRunner(pipe, options["model"], options["loras"], options["lora_weight_name"],
                                options["lora_target"], options["turbo"], files)
        self._lock = threading.Lock()
        self._job: str | None = None
        self._cancelled = False
        self._latest: tuple[int, int, bytes | None] | None = None

    def ready(self) -> dict[str, Any]:
        """The pipeline's description and where this actor runs."""
        return {**self.runner.describe(), "pid": os.getpid(), "host": socket.gethostname()}

    def run(self, job_id: str, params: dict[str, Any], inputs: dict[str, bytes]) -> dict[str, Any]:
        """{"status": "succeeded", "result": JobResult} | {"status": "cancelled"} | {"status": "failed", "error"}."""
        with self._lock:
            self._job, self._cancelled, self._latest = job_id, False, None

        def report(step: int, total: int, preview: bytes | None) -> bool:
            with self._lock:
                self._latest = (step, total, preview)
                return not self._cancelled

        try:
            return {"status": "succeeded", "result": self.runner.run(params, inputs, report)}
        except JobCancelled:
            return {"status": "cancelled"}
        except Exception as exc:  # the job's own failure; the actor lives on
            return {"status": "failed", "error": error_line(exc)}
        finally:
            with self._lock:
                self._job = None

    def poll(self) -> tuple[int, int, bytes | None] | None:
        """The latest step report since the last poll (None: no new step)."""
        with self._lock:
            latest, self._latest = self._latest, None
        return latest

    def cancel(self, job_id: str) -> None:
        """Stop `job_id` at its next step, if it is the one running."""
        with self._lock:
            if self._job == job_id:
                self._cancelled = True


def connect(address: str):
    """Ray, connected: "local" starts an instance in this process, "auto" / an address joins a cluster."""
    try:
        import ray
    except ImportError:
        raise ValueError('--ray needs Ray: pip install "vidfusion[ray]"') from None
    if not ray.is_initialized():
        quiet = {"log_to_driver": False, "logging_level": "ERROR"}
        if address == "local":
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    return ray


class RayWorkers:
    """The actor pool, driven from the API process (see the module docstring)."""

    def __init__(self, store: JobStore, address: str, options: dict[str, Any],
                 named_loras: dict[str, Path] | None = None, workers: int | None = None,
                 gpus_per_worker: float | None = None, cpus_per_worker: float | None = None):
        self.store, self.address, self.options = store, address, options
        self.fixed = workers
        self.gpus, self.cpus = gpus_per_worker, cpus_per_worker
        self.named_loras = {name: (path.name, str(path), path.read_bytes()) for name, path in
                            (named_loras or {}).items()}
        self.name = f"ray:{address}"
        self._stop = threading.Event()
        self._slots: list[_Slot] = []
        self._ray: Any = None
        self._actor_class: Any = None
        self._lora_ref: Any = None
        self._grower: threading.Thread | None = None

    def connect(self, timeout: float | None = None) -> dict[str, Any]:
        """Connect to Ray and load one actor: its pipeline description (sampler defaults, size, LoRAs) for the API."""
        ray = self._ray = connect(self.address)
        if self.gpus is None and ray.cluster_resources().get("GPU", 0) >= 1:
            self.gpus = 1.0  # one worker per GPU
        self._actor_class = ray.remote(num_cpus=self.cpus or 1, num_gpus=self.gpus or 0, max_restarts=0,
                                       max_concurrency=4, scheduling_strategy="SPREAD")(JobActor)
        self._lora_ref = ray.put(self.named_loras)
        first = _Slot(self, 0)
        info = first.start_actor(timeout)
        if info is None:
            raise RuntimeError(f"the first Ray worker did not start: {first.error or 'timed out'}")
        self._slots.append(first)
        return info

    def new_actor(self) -> Any:
        threads = max(1, int(self.cpus)) if self.cpus else None
        return self._actor_class.remote(self.options, self._lora_ref, threads)

    def wanted(self) -> int:
        """How many workers the cluster has room for now (or the fixed `workers`)."""
        if self.fixed:
            return self.fixed
        resources = self._ray.cluster_resources()
        if self.gpus:
            return max(1, int(resources.get("GPU", 0) // self.gpus))
        if self.cpus:
            return max(1, int(resources.get("CPU", 1) // self.cpus))
        return max(1, sum(1 for node in self._ray.nodes() if node.get("Alive")))

    def start(self) -> None:
        for slot in self._slots:
            slot.start()
        self._grow()
        self._grower = threading.Thread(target=self._keep_growing, name="vidfusion-ray-pool", daemon=True)
        self._grower.start()

    def _grow(self) -> None:
        while len(self._slots) < self.wanted() and not self._stop.is_set():
            slot = _Slot(self, len(self._slots))
            self._slots.append(slot)
            slot.start()

    def _keep_growing(self) -> None:
        while not self._stop.wait(GROW_SECONDS):
            try:
                self._grow()
            except Exception:  # a cluster hiccup: try again later
                log.exception("cannot size the Ray worker pool")

    def status(self) -> list[dict[str, Any]]:
        return [slot.status() for slot in self._slots]

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        with self.store.changed:
            self.store.changed.notify_all()

    def join(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or 10)
        for slot in self._slots:
            if slot.is_alive():
                slot.join(max(0.0, deadline - time.monotonic()))
        for slot in self._slots:
            slot.kill_actor()


class _Slot(threading.Thread):
    """One actor of the pool and the thread that feeds it jobs (and replaces it when it dies)."""

    def __init__(self, pool: RayWorkers, index: int):
        super().__init__(name=f"vidfusion-ray-worker-{index}", daemon=True)
        self.pool, self.index = pool, index
        self.actor: Any = None
        self.info: dict[str, Any] = {}
        self.job: str | None = None
        self.error: str | None = None  # why the last actor could not start

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.info.get("pid"), "host": self.info.get("host"), "job": self.job}

    def start_actor(self, timeout: float | None = None) -> dict[str, Any] | None:
        """A new actor, waited for until its pipeline is loaded (None: it failed, or the pool is stopping)."""
        ray = self.pool._ray
        self.actor, self.info = self.pool.new_actor(), {}
        ready = self.actor.ready.remote()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.pool.stopping and (deadline is None or time.monotonic() < deadline):
            if ray.wait([ready], timeout=1.0)[0]:
                try:
                    self.info = ray.get(ready)
                    log.info("Ray worker %d ready: pid %s on %s", self.index, self.info["pid"], self.info["host"])
                    return self.info
                except Exception as exc:
                    self.error = _cause(exc)
                    log.error("Ray worker %d cannot start: %s", self.index, self.error)
                    break
        self.kill_actor()
        return None

    def kill_actor(self) -> None:
        if self.actor is not None:
            try:
                self.pool._ray.kill(self.actor, no_restart=True)
            except Exception:  # already gone
                pass
            self.actor = None

    def run(self) -> None:
        pool, store = self.pool, self.pool.store
        while not pool.stopping:
            if self.actor is None and self.start_actor() is None:
                pool._stop.wait(5.0)  # cannot load (or no room yet): try again later
                continue
            job = store.claim()
            if job is None:
                with store.changed:
                    store.changed.wait(timeout=0.5)
                continue
            self.job = job.id
            try:
                self.run_job(job.id, job.params)
            finally:
                self.job = None

    def run_job(self, job_id: str, params: dict[str, Any]) -> None:
        ray, store = self.pool._ray, self.pool.store
        died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)
        log.info("job %s: running on Ray worker %d (pid %s)", job_id, self.index, self.info.get("pid"))
        try:
            ref = self.actor.run.remote(job_id, params, read_inputs(params))
            self._follow(job_id, ref)
            outcome = ray.get(ref)
        except died as exc:
            status = store.requeue(job_id, error_line(exc))
            log.warning("job %s: Ray worker %d died (%s); job %s", job_id, self.index, error_line(exc), status)
            self.kill_actor()
            return
        except Exception as exc:  # the inputs are gone, Ray refused the call, ...
            store.finish(job_id, FAILED, error_line(exc))
            return
        if outcome["status"] == "succeeded":
            result: JobResult = outcome["result"]
            complete(store, job_id, result)
        elif outcome["status"] == "failed":
            store.finish(job_id, FAILED, outcome["error"])

    def _follow(self, job_id: str, ref: Any) -> None:
        """Until the job's call returns: step reports to the store, a cancel (or the pool stopping) to the actor."""
        ray, store = self.pool._ray, self.pool.store
        cancelled = False
        while True:
            done = ray.wait([ref], timeout=POLL_SECONDS)[0]
            latest = ray.get(self.actor.poll.remote())
            if latest is not None:
                running = record_step(store, job_id, *latest)
            else:
                running = store.status_of(job_id) == RUNNING
            if not cancelled and (not running or self.pool.stopping):
                self.actor.cancel.remote(job_id)
                cancelled = True
            if done:
                return


def _cause(exc: BaseException) -> str:
    """The original error inside a Ray error, as one line."""
    cause = getattr(exc, "cause", None)
    return error_line(cause if isinstance(cause, BaseException) else exc)
