"""Durable job queue: SQLite (WAL) under the data dir; videos in data_dir/videos under server-chosen names."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..media.fileio import TEMP_PREFIX, remove_temp_files

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
MAX_ATTEMPTS = 3  # a job interrupted by this many crashes is marked failed instead of run again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


class QueueFullError(Exception):
    pass


class IdempotencyConflictError(Exception):
    pass


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    params: dict[str, Any]
    step: int
    total: int
    error: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "status": self.status, "progress": {"step": self.step, "total": self.total},
               "error": self.error, "created_at": _iso(self.created_at), "started_at": _iso(self.started_at),
               "finished_at": _iso(self.finished_at), "params": self.params}
        return out


class DataDirInUseError(ValueError):
    """Another server holds this data folder."""


class JobStore:
    """All job state lives in SQLite, so a restarted server sees every job; one connection guarded by a lock."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.video_dir = self.data_dir / "videos"
        self.image_dir = self.data_dir / "images"  # latest-step previews and posters
        self.video_dir.mkdir(parents=True, exist_ok=True)
        self.image_dir.mkdir(exist_ok=True)
        self.input_dir = self.data_dir / "inputs"  # uploaded pictures and videos, kept with their jobs
        self.input_dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # input file -> requests in flight that use it
        self._db = sqlite3.connect(self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on the disk (WAL synced) before it returns
        self._db.executescript(_SCHEMA)
        self.changed = threading.Condition()  # notified on every state change (workers, event streams)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def lock(self) -> None:
        """Hold the data folder for this process's lifetime (one server per --data-dir: a second one would re-queue
        the first one's running jobs and both would write the same video). Raises DataDirInUseError naming the
        process that holds it."""
        import fcntl

        handle = open(self.data_dir / "server.lock", "a+")  # noqa: SIM115 (held until the process ends)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise DataDirInUseError(f"the data folder {self.data_dir} is in use by {holder}: one server per "
                                    "--data-dir (stop it, or pass another --data-dir)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"vidfusion serve (pid {os.getpid()})")
        handle.flush()
        self._lock_file = handle

    def hold_input(self, data: bytes, suffix: str) -> tuple[Path, bool]:
        """The inputs-folder file for uploaded `data` (named by its content: a retried upload, or the same file sent
        twice, is one file), held by the calling request until release_input; (path, whether it must be written).
        Held before the existence check, so a refused request beside this one cannot remove it in between."""
        path = self.input_dir / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
        with self._lock:
            self._held[str(path)] = self._held.get(str(path), 0) + 1
            return path, not path.exists()

    def release_input(self, path: str | Path, refused: bool) -> None:
        """The request is done with the file; a refused one removes it unless another request in flight holds it or
        a job names it (nothing of a refused request stays behind, nothing of an accepted one goes)."""
        key = str(path)
        with self._lock:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]
            if refused and key not in self._held and not self._names_input(key):
                Path(key).unlink(missing_ok=True)

    def _names_input(self, path: str) -> bool:
        """Whether a job's params name this input file (called with the lock held)."""
        quoted = json.dumps(path)[1:-1]  # as it appears inside the params JSON
        row = self._db.execute("SELECT 1 FROM jobs WHERE instr(params, ?) > 0 LIMIT 1", (quoted,)).fetchone()
        return row is not None

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def video_path(self, job_id: str) -> Path:
        """The server-chosen file of a job's video (job ids are server-made hex uuids)."""
        return self.video_dir / f"{job_id}.mp4"

    def preview_path(self, job_id: str) -> Path:
        """The latest step's latent preview of a job (PNG), replaced at every step."""
        return self.image_dir / f"{job_id}.preview.png"

    def poster_path(self, job_id: str) -> Path:
        """A frame of a job's finished video (JPEG)."""
        return self.image_dir / f"{job_id}.poster.jpg"

    def recover(self) -> list[str]:
        """After a crash: jobs left running go back to the queue (or fail after MAX_ATTEMPTS interruptions);
        half-written temp files are removed. Returns the ids that were requeued."""
        remove_temp_files(self.video_dir)
        remove_temp_files(self.image_dir)
        remove_temp_files(self.input_dir)
        with self._lock:
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE status = ?", (RUNNING,)).fetchall()
            requeued = []
            for row in rows:
                if row["attempts"] >= MAX_ATTEMPTS:
                    self._db.execute("UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                                     (FAILED, f"interrupted {row['attempts']} times by server restarts", time.time(),
                                      row["id"]))
                else:
                    self._db.execute("UPDATE jobs SET status = ?, step = 0, started_at = NULL WHERE id = ?",
                                     (QUEUED, row["id"]))
                    requeued.append(row["id"])
        self._notify()
        return requeued

    def prune(self, older_than: float) -> list[str]:
        """Finished jobs that finished more than `older_than` seconds ago removed: record, video, poster, preview,
        and the input files no remaining job names. Returns their ids."""
        cutoff = time.time() - older_than
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM jobs WHERE status IN ({','.join('?' * len(FINISHED))}) AND "
                                    "finished_at < ?", (*FINISHED, cutoff)).fetchall()
            ids = [row["id"] for row in rows]
            for job_id in ids:
                for path in (self.video_path(job_id), self.poster_path(job_id), self.preview_path(job_id)):
                    path.unlink(missing_ok=True)
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            if ids:
                for path in self.input_dir.iterdir():  # (a file being written has a temp name: left alone)
                    if not path.name.startswith(TEMP_PREFIX) and str(path) not in self._held and \
                            not self._names_input(str(path)):
                        path.unlink(missing_ok=True)
        return ids

    def submit(self, params: dict[str, Any], idempotency_key: str | None = None,
               max_queue: int | None = None) -> tuple[Job, bool]:
        """Queue a job. Returns (job, created); an idempotency key seen before returns that job, created=False."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if idempotency_key is not None:
                    row = self._db.execute("SELECT * FROM jobs WHERE idempotency_key = ?",
                                           (idempotency_key,)).fetchone()
                    if row is not None:
                        self._db.execute("COMMIT")
                        job = _job(row)
                        asked = {k: v for k, v in params.items() if not (k == "seed" and v is None)}
                        if any(job.params.get(k) != v for k, v in asked.items()):
                            raise IdempotencyConflictError(
                                f"Idempotency-Key {idempotency_key!r} was used for job {job.id} with other parameters")
                        return job, False
                if max_queue is not None:
                    pending = self._pending_locked()
                    if pending >= max_queue:
                        raise QueueFullError(f"{pending} jobs are waiting or running (limit {max_queue})")
                job_id = uuid.uuid4().hex
                if params.get("seed") is None:  # fixed now, so a job re-run after a crash makes the same video
                    params = {**params, "seed": secrets.randbelow(2**63)}
                self._db.execute(
                    "INSERT INTO jobs (id, idempotency_key, status, params, total, created_at) VALUES (?,?,?,?,?,?)",
                    (job_id, idempotency_key, QUEUED, json.dumps(params), params.get("num_inference_steps", 0),
                     time.time()))
                row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        self._notify()
        return _job(row), True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, status: str | None = None, limit: int = 50) -> list[Job]:
        """Newest first."""
        with self._lock:
            if status is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ?",
                                        (status, limit)).fetchall()
        return [_job(r) for r in rows]

    def claim(self) -> Job | None:
        """Atomically take the oldest queued job and mark it running."""
        with self._lock:
            row = self._db.execute(
                "UPDATE jobs SET status = ?, started_at = ?, attempts = attempts + 1, step = 0 "
                "WHERE seq = (SELECT seq FROM jobs WHERE status = ? ORDER BY seq LIMIT 1) RETURNING *",
                (RUNNING, time.time(), QUEUED)).fetchone()
        if row is not None:
            self._notify()
        return None if row is None else _job(row)

    def claim_or_wait(self, timeout: float = 0.5) -> Job | None:
        """claim(), or None after waiting up to `timeout` seconds for a change (the runners' idle loop)."""
        job = self.claim()
        if job is None:
            with self.changed:
                self.changed.wait(timeout=timeout)
        return job

    def progress(self, job_id: str, step: int, total: int) -> bool:
        """Record a running job's step. False when it is no longer running (cancelled meanwhile)."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET step = ?, total = ? WHERE id = ? AND status = ?",
                                   (step, total, job_id, RUNNING))
        self._notify()
        return cur.rowcount == 1

    def finish(self, job_id: str, status: str, error: str | None = None) -> bool:
        """Running -> a final status. False when the job was no longer running (cancelled meanwhile)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ?, step = CASE WHEN ? THEN total ELSE step END "
                "WHERE id = ? AND status = ?", (status, error, time.time(), status == SUCCEEDED, job_id, RUNNING))
        self._notify()
        return cur.rowcount == 1

    def requeue(self, job_id: str, cause: str) -> str | None:
        """A running job whose runner died: queued again (same params, so the same seed), or failed with `cause`
        after MAX_ATTEMPTS attempts. Returns its new status (None when it was no longer running)."""
        with self._lock:
            row = self._db.execute(
                "UPDATE jobs SET status = CASE WHEN attempts >= ? THEN ? ELSE ? END, step = 0, "
                "started_at = CASE WHEN attempts >= ? THEN started_at END, "
                "finished_at = CASE WHEN attempts >= ? THEN ? END, "
                "error = CASE WHEN attempts >= ? THEN 'WorkerDied: its worker died ' || attempts || ' times (' || ? "
                "|| ')' END WHERE id = ? AND status = ? RETURNING status",
                (MAX_ATTEMPTS, FAILED, QUEUED, MAX_ATTEMPTS, MAX_ATTEMPTS, time.time(), MAX_ATTEMPTS, cause[:300],
                 job_id, RUNNING)).fetchone()
        self._notify()
        return None if row is None else row[0]

    def cancel(self, job_id: str) -> Job | None:
        """Queued or running -> cancelled (a running job's worker notices at its next step)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = ?, finished_at = ?, error = NULL WHERE id = ? AND status IN "
                             "(?, ?)", (CANCELLED, time.time(), job_id, QUEUED, RUNNING))
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        self._notify()
        return None if row is None else _job(row)

    def status_of(self, job_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else row[0]

    def pending(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._pending_locked()

    def _pending_locked(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", (QUEUED, RUNNING)).fetchone()[0]


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], status=row["status"], params=json.loads(row["params"]), step=row["step"],
               total=row["total"], error=row["error"], attempts=row["attempts"], created_at=row["created_at"],
               started_at=row["started_at"], finished_at=row["finished_at"])
