"""The API process's side of running a job, whoever runs it: reading its inputs, writing previews, the finished
video and poster (atomically), recording the outcome. And the embedded runner: one worker thread per local device."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from ..media.fileio import write_bytes
from .jobs import FAILED, RUNNING, SUCCEEDED, JobStore
from .render import INPUT_KEYS, JobCancelled, JobResult, JobRunner

log = logging.getLogger("vidfusion.serve")


def read_inputs(params: dict[str, Any]) -> dict[str, bytes]:
    """The files a job's params name (uploaded pictures, the input video), as bytes to send to its runner."""
    return {key: Path(params[key]).read_bytes() for key in INPUT_KEYS if params.get(key)}


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message`, short enough for the job record."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}"[:500]


def record_step(store: JobStore, job_id: str, step: int, total: int, preview: bytes | None) -> bool:
    """A step report: the preview picture replaced (best effort: a failed write, e.g. a full disk, is logged and the
    job goes on), the step recorded. False when the job is no longer running."""
    if preview is not None:
        try:
            write_bytes(store.preview_path(job_id), preview)
        except OSError as exc:
            log.warning("job %s: preview not written (%s)", job_id, error_line(exc))
    return store.progress(job_id, step, total)


def complete(store: JobStore, job_id: str, result: JobResult) -> None:
    """A finished job's poster and video written atomically, then the job marked succeeded (the video dropped again
    when it was cancelled meanwhile)."""
    if store.status_of(job_id) != RUNNING:
        return
    write_bytes(store.poster_path(job_id), result.poster, durable=True)
    write_bytes(store.video_path(job_id), result.video, durable=True)  # on disk before the job says succeeded
    if not store.finish(job_id, SUCCEEDED):
        store.video_path(job_id).unlink(missing_ok=True)
    log.info("job %s: succeeded", job_id)


def run_next_job(store: JobStore, worker: Any) -> None:
    """Claim the next queued job (or wait a moment for one) and run it with `worker.run_job`, its id in
    `worker.job` meanwhile: one step of the loop of a local worker and of a Ray actor slot. When run_job raises
    (its outcome could not be recorded), `worker.job` still names the job, for the caller to requeue it."""
    if worker.job is not None:  # the last job's outcome could not be recorded (a store or disk error): run again
        store.requeue(worker.job, "its outcome could not be recorded")
        worker.job = None
    job = store.claim_or_wait()
    if job is None:
        return
    worker.job = job.id
    worker.run_job(job.id, job.params)
    worker.job = None


class Worker(threading.Thread):
    """Takes queued jobs in order and runs them on a pipeline loaded in this process."""

    def __init__(self, store: JobStore, runner: JobRunner, name: str):
        super().__init__(name=f"vidfusion-worker-{name}", daemon=True)
        self.store = store
        self.runner = runner
        self.job: str | None = None
        self._stop_event = threading.Event()

    def status(self) -> list[dict[str, Any]]:
        """This worker's name, pid, host and current job (the same fields as a Ray pool's workers)."""
        return [{"name": self.name, "pid": os.getpid(), "host": socket.gethostname(), "job": self.job}]

    def alive(self) -> bool:
        """Whether the thread runs (GET /healthz says 503 when not)."""
        return self.is_alive()

    def stop(self) -> None:
        self._stop_event.set()
        with self.store.changed:
            self.store.changed.notify_all()

    def run(self) -> None:
        """Jobs until stopped; an error of the store or the disk (SQLite locked, disk full) is logged and retried
        with backoff, never the end of the thread (its job would stay `running` and the queue would wait forever)."""
        delay = 0.0
        while not self._stop_event.wait(delay):
            try:
                run_next_job(self.store, self)
                delay = 0.0
            except Exception:
                delay = min(30.0, max(0.5, delay * 2))
                log.exception("worker %s: store or disk error; retrying in %.1f s", self.name, delay)

    def run_job(self, job_id: str, params: dict[str, Any]) -> None:
        """One job on this worker's pipeline, to its outcome in the store (a failure never kills the worker)."""

        def report(step: int, total: int, preview: bytes | None) -> bool:
            return record_step(self.store, job_id, step, total, preview) and not self._stop_event.is_set()

        failure = None
        try:
            log.info("job %s: running", job_id)
            result = self.runner.run(params, read_inputs(params), report)
        except JobCancelled:
            log.info("job %s: stopped (%s)", job_id, "server stopping" if self._stop_event.is_set() else "cancelled")
            return
        except Exception as exc:  # a failed job must not kill the worker
            log.exception("job %s failed", job_id)
            failure = error_line(exc)
        # recorded outside the handler: an error here (disk full) reaches run()'s backoff with the job still named
        if failure is None:
            complete(self.store, job_id, result)
        else:
            self.store.finish(job_id, FAILED, failure)
