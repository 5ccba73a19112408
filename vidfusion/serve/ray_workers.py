"""`vidfusion serve --ray`: jobs run on a pool of Ray actors, one loaded pipeline each, on any machine of the cluster.

The API process keeps SQLite as the one source of truth. One thread per actor slot claims a queued job only when its
actor is idle (no queue inside Ray; an actor runs one `run` at a time), so a job is either queued in SQLite or
running on exactly one actor. While it runs, the thread polls the actor for progress and preview pictures, and every
poll carries whether the job should stop (cancelled, or the server stopping). The finished video comes back as bytes
and the API process writes it (no shared filesystem). An actor that dies: it is killed for good, then its job is
queued again with the same seed (failed after MAX_ATTEMPTS attempts) and the slot gets a new actor. A server that
stops leaves its running jobs `running`; the next start re-runs them. Without a fixed `workers`, the pool grows when
machines join (one worker per GPU, or per machine / `cpus_per_worker` CPUs without GPUs)."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..scale.ray_cluster import connect
from .jobs import FAILED, RUNNING, JobStore
from .render import JobCancelled, ModelOptions, load_runner
from .worker import complete, error_line, read_inputs, record_step, run_next_job

log = logging.getLogger("vidfusion.serve")
POLL_SECONDS = 0.2
UNREACHABLE_GRACE = 30.0  # seconds an actor may be unreachable (ActorUnavailableError) before it counts as lost
GROW_SECONDS = 10.0
START_TIMEOUT = 600.0  # the first worker must load its pipeline within this (a cluster without room never does)
CONTROL = {"concurrency_group": "control"}  # poll / cancel answer while `run` holds the default group (size 1)


@dataclass
class LoraFiles:
    """The server's LoRA files, sent to every actor (which may run on another machine): `--lora-dir` ones by name
    -> (file name, path recorded in videos, bytes), and `--lora` files (every job; folders and hub ids load where
    the actor runs) by the server's path -> bytes."""

    named: dict[str, tuple[str, str, bytes]]
    every_job: dict[str, bytes]


LORA_CACHE = "vidfusion-lora-cache"  # in the temp folder: files named by content, shared by this machine's actors


def cached_copy(data: bytes, file_name: str) -> Path:
    """This machine's copy of a LoRA file the server sent: TMP/vidfusion-lora-cache/<sha256>/<file name>, written
    once (atomically) and reused by every actor and restart, so killed actors leave no copies behind."""
    import hashlib

    from ..media.fileio import write_bytes

    path = Path(tempfile.gettempdir()) / LORA_CACHE / hashlib.sha256(data).hexdigest()[:32] / file_name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, data)
    return path


class JobActor:
    """A Ray actor: one pipeline, one job at a time; `poll` and `cancel` answer while a job runs."""

    def __init__(self, options: ModelOptions, lora_files: LoraFiles, threads: int | None = None):
        """lora_files: the server's LoRA files as bytes (see LoraFiles), kept in this machine's content-named cache
        (cached_copy); the videos record the server's paths of them."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        files = {name: (str(cached_copy(data, file_name)), recorded)
                 for name, (file_name, recorded, data) in lora_files.named.items()}
        here = {path: str(cached_copy(data, Path(path).name)) for path, data in lora_files.every_job.items()}
        local = dataclasses.replace(options, loras=[(here.get(path, path), weight) for path, weight in options.loras])
        self.runner = load_runner(local, None, files)
        server_path = {copy: path for path, copy in here.items()}
        for lora in self.runner.metadata.get("loras", []):  # videos record the server's path, as a local worker's do
            lora["path"] = server_path.get(lora["path"], lora["path"])
        self._lock = threading.Lock()
        self._stop: set[str] = set()  # jobs to stop: a stop that arrives before its run starts is kept
        self._latest: dict[str, tuple[int, int, bytes | None]] = {}

    def ready(self) -> dict[str, Any]:
        """The pipeline's description and where this actor runs."""
        return {**self.runner.describe(), "pid": os.getpid(), "host": socket.gethostname()}

    def run(self, job_id: str, params: dict[str, Any], inputs: dict[str, bytes]) -> dict[str, Any]:
        """{"status": "succeeded", "result": JobResult} | {"status": "cancelled"} | {"status": "failed", "error"}."""

        def report(step: int, total: int, preview: bytes | None) -> bool:
            with self._lock:
                self._latest[job_id] = (step, total, preview)
                return job_id not in self._stop

        try:
            if job_id in self._stop:
                raise JobCancelled
            return {"status": "succeeded", "result": self.runner.run(params, inputs, report)}
        except JobCancelled:
            return {"status": "cancelled"}
        except Exception as exc:  # the job's own failure; the actor lives on
            return {"status": "failed", "error": error_line(exc)}
        finally:
            with self._lock:
                self._stop.discard(job_id)
                self._latest.pop(job_id, None)

    def poll(self, job_id: str, stop: bool = False) -> tuple[int, int, bytes | None] | None:
        """The latest step report of `job_id` since the last poll (None: no new step); `stop` asks it to stop at its
        next step (sent with every poll once wanted, so it cannot be lost)."""
        with self._lock:
            if stop:
                self._stop.add(job_id)
            return self._latest.pop(job_id, None)


class RayWorkers:
    """The actor pool, driven from the API process (see the module docstring)."""

    def __init__(self, store: JobStore, address: str, options: ModelOptions,
                 named_loras: dict[str, Path] | None = None, workers: int | None = None,
                 gpus_per_worker: float | None = None, cpus_per_worker: float | None = None):
        self.store, self.address, self.options = store, address, options
        self.fixed = workers
        self.gpus, self.cpus = gpus_per_worker, cpus_per_worker
        self.lora_files = LoraFiles(
            {name: (path.name, str(path), path.read_bytes()) for name, path in (named_loras or {}).items()},
            {path: Path(path).read_bytes() for path, _ in options.loras if Path(path).is_file()})
        self.name = f"ray:{address}"
        self._stop = threading.Event()
        self._slots: list[_Slot] = []
        self._ray: Any = None
        self._actor_class: Any = None
        self._lora_ref: Any = None
        self._grower: threading.Thread | None = None

    def connect(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Connect to Ray and load one actor: its pipeline description (sampler defaults, size, LoRAs) for the API.
        Raises RuntimeError when it cannot start (the cause, or no room for it within `timeout` seconds)."""
        ray = self._ray = connect(self.address)
        self._actor_class = ray.remote(max_restarts=0, max_concurrency=1, concurrency_groups={"control": 2})(JobActor)
        self._lora_ref = ray.put(self.lora_files)
        self.lora_files = LoraFiles({}, {})  # the object store holds them now
        first = _Slot(self, 0)
        info = first.start_actor(timeout)
        if info is None:
            raise RuntimeError(f"the first Ray worker did not start: {first.error or f'no room within {timeout:g} s'}"
                               f" (resources asked per worker: {self.resources()})")
        self._slots.append(first)
        return info

    def resources(self) -> dict[str, float]:
        """What one new worker asks of the cluster: `--gpus-per-worker`, or one GPU once the cluster has GPUs."""
        gpus = self.gpus if self.gpus is not None else (1.0 if self._ray.cluster_resources().get("GPU", 0) else 0.0)
        return {"num_cpus": self.cpus or 1, "num_gpus": gpus}

    def new_actor(self) -> Any:
        """A new actor (its pipeline loads in the background: wait for `ready`)."""
        threads = max(1, int(self.cpus)) if self.cpus else None
        return self._actor_class.options(scheduling_strategy="SPREAD", **self.resources()).remote(
            self.options, self._lora_ref, threads)

    def wanted(self) -> int:
        """How many workers the cluster has room for now (or the fixed `workers`)."""
        if self.fixed:
            return self.fixed
        resources = self._ray.cluster_resources()
        gpus = self.resources()["num_gpus"]
        if gpus:
            return max(1, int(resources.get("GPU", 0) // gpus))
        if self.cpus:
            return max(1, int(resources.get("CPU", 1) // self.cpus))
        return max(1, sum(1 for node in self._ray.nodes() if node.get("Alive")))

    def start(self) -> None:
        """Start feeding jobs to the workers (and growing the pool)."""
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

    def alive(self) -> bool:
        """Whether every slot thread (and the pool's grower) runs: GET /healthz says 503 when not."""
        threads = [*self._slots, *([self._grower] if self._grower is not None else [])]
        return all(thread.is_alive() for thread in threads)

    def status(self) -> list[dict[str, Any]]:
        """One entry per worker: name, pid, host, the job it runs."""
        return [slot.status() for slot in self._slots]

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop taking jobs; running ones are asked to stop at their next step (and stay `running` for the next
        start to re-run)."""
        self._stop.set()
        with self.store.changed:
            self.store.changed.notify_all()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the slot threads (up to `timeout` seconds), then kill every actor."""
        deadline = time.monotonic() + (timeout or 10)
        if self._grower is not None:
            self._grower.join(max(0.0, deadline - time.monotonic()))
        for slot in list(self._slots):
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
        self.store_error: str | None = None  # the store failed while following the current job (not the actor)

    def status(self) -> dict[str, Any]:
        """This worker's name, pid, host and current job (pid None while its actor starts)."""
        return {"name": self.name, "pid": self.info.get("pid"), "host": self.info.get("host"), "job": self.job}

    def start_actor(self, timeout: float | None = None) -> dict[str, Any] | None:
        """A new actor, waited for until its pipeline is loaded (None: it failed, timed out or the pool stops)."""
        ray = self.pool._ray
        self.actor, self.info = self.pool.new_actor(), {}
        ready, started = self.actor.ready.remote(), time.monotonic()
        warned = False
        while not self.pool.stopping and (timeout is None or time.monotonic() - started < timeout):
            if ray.wait([ready], timeout=1.0)[0]:
                try:
                    self.info = ray.get(ready)
                    log.info("Ray worker %d ready: pid %s on %s", self.index, self.info["pid"], self.info["host"])
                    return self.info
                except Exception as exc:
                    self.error = error_line(getattr(exc, "cause", None) or exc)
                    log.error("Ray worker %d cannot start: %s", self.index, self.error)
                    break
            if not warned and time.monotonic() - started > 30:
                log.warning("Ray worker %d: waiting for a machine with %s", self.index, self.pool.resources())
                warned = True
        self.kill_actor()
        return None

    def kill_actor(self) -> None:
        """Kill this slot's actor for good (no restart); nothing when there is none."""
        actor, self.actor = self.actor, None
        if actor is not None:
            try:
                self.pool._ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass

    def run(self) -> None:
        """Claim a job whenever the actor is idle; replace the actor when it dies; never die of an error."""
        pool, store = self.pool, self.pool.store
        while not pool.stopping:
            try:
                if self.actor is None and self.start_actor() is None:
                    pool._stop.wait(5.0)  # cannot load (or no room yet): try again later
                    continue
                run_next_job(store, self)
            except Exception:  # the store or the cluster failed: log, wait, go on
                log.exception("Ray worker %d: unexpected error", self.index)
                pool._stop.wait(1.0)

    def run_job(self, job_id: str, params: dict[str, Any]) -> None:
        """One job on this slot's actor, to its outcome in the store."""
        ray, store, actor = self.pool._ray, self.pool.store, self.actor
        log.info("job %s: running on Ray worker %d (pid %s)", job_id, self.index, self.info.get("pid"))
        try:
            inputs = read_inputs(params)
        except OSError as exc:  # its uploaded files are gone: the job cannot run anywhere
            store.finish(job_id, FAILED, error_line(exc))
            return
        try:
            ref = actor.run.remote(job_id, params, inputs)
            self._follow(actor, job_id, ref)
            outcome = ray.get(ref)
        except Exception as exc:  # the actor died, or Ray failed around it: the job runs again elsewhere
            self.kill_actor()  # first, so it can never run beside the job's next attempt
            if self.pool.stopping:
                return  # stays running: the next start re-runs it
            status = store.requeue(job_id, error_line(exc))
            log.warning("job %s: Ray worker %d lost (%s); job %s", job_id, self.index, error_line(exc), status)
            return
        if self.store_error:  # the slot's loop requeues the job (still this slot's `job`); the actor lives on
            error, self.store_error = self.store_error, None
            raise RuntimeError(f"job {job_id}: this process's job store failed: {error}")
        try:
            if outcome["status"] == "succeeded":
                complete(store, job_id, outcome["result"])
            elif outcome["status"] == "failed":
                store.finish(job_id, FAILED, outcome["error"])
        except OSError as exc:  # the video could not be written (disk full, ...)
            store.finish(job_id, FAILED, error_line(exc))

    def _follow(self, actor: Any, job_id: str, ref: Any) -> None:
        """Until the job's call returns: step reports to the store; a stop (cancelled, server stopping) to the
        actor with every poll."""
        ray, store = self.pool._ray, self.pool.store
        running, unreachable_since = True, None
        while True:
            done = ray.wait([ref], timeout=POLL_SECONDS)[0]
            stop = not running or self.pool.stopping
            try:
                latest = ray.get(actor.poll.options(**CONTROL).remote(job_id, stop))
            except ray.exceptions.ActorUnavailableError:  # a network blip or a busy node: not a death (yet)
                if done:  # its result is here: run_job reads it
                    return
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_GRACE:
                    raise
                continue
            unreachable_since = None
            try:
                if latest is not None:
                    running = record_step(store, job_id, *latest) and running
                elif running:
                    running = store.status_of(job_id) == RUNNING
            except sqlite3.Error as exc:  # this process's store failed, not the actor: stop the job, keep the actor
                log.error("job %s: cannot record its progress (%s); stopping it", job_id, error_line(exc))
                self.store_error, running = error_line(exc), False
            if done:
                return
