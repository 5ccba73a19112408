"""Batch on a real local Ray instance: the same files as a local run, a killed worker is replaced and every row is
generated and written exactly once, a row that kills its worker fails after --max-attempts deaths."""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
import time

import pytest

from vidfusion.scale import batch
from vidfusion.scale.batch import RowRenderer, run

from .test_batch import ROWS, manifest

ray = pytest.importorskip("ray", reason="the ray extra: pip install 'vidfusion[ray]'")
# the renderers below travel to the workers by value (the tests package is not importable there)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CountingRenderer(RowRenderer):
    """Appends the id of every row it finished generating (or is about to crash on) to `log` (one line, O_APPEND)."""

    log = ""

    def _note(self, row_id: str) -> None:
        with open(self.log, "a") as f:
            f.write(row_id + "\n")

    def render(self, row, retries=0):
        if row["prompt"] == "crash":  # a row that takes its worker down hard (as a segfault or the OOM killer)
            self._note(row["id"])
            os._exit(1)
        result = super().render(row, retries)
        self._note(row["id"])
        return result


def renderer_logging_to(path) -> type[CountingRenderer]:
    return type("CountingRenderer", (CountingRenderer,), {"log": str(path), "__module__": __name__})


def counts(path) -> collections.Counter:
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def writes(monkeypatch):
    """Video files the driver writes, per file name."""
    written = collections.Counter()
    original = batch.write_bytes

    def counting(path, data):
        written[os.path.basename(path)] += 1
        return original(path, data)

    monkeypatch.setattr(batch, "write_bytes", counting)
    return written


def test_ray_outputs_equal_local(tiny_checkpoint, tmp_path, local_ray):
    local = run(ROWS, tmp_path / "local", model=str(tiny_checkpoint), progress=False)
    remote = run(ROWS, tmp_path / "ray", model=str(tiny_checkpoint), ray="local", workers=2, cpus_per_worker=1,
                 progress=False)
    assert [(r["id"], r["status"], r["seed"]) for r in remote] == [(r["id"], r["status"], r["seed"]) for r in local]
    for record in local:
        if record["status"] == "succeeded":
            name = os.path.basename(record["path"])
            assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def _ray_worker_pids() -> list[int]:
    import psutil

    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if "Renderer" in " ".join(p.info["cmdline"] or [])]


def test_killed_ray_worker_is_replaced_and_every_row_done_once(tiny_checkpoint, tmp_path, local_ray, writes):
    """Catches rows lost or made twice around a killed worker: generations and file writes are counted per row
    (not manifest lines, which are one per row by construction)."""
    rows = [{"id": f"r{i}", "prompt": f"clip {i}", "num_frames": 4, "height": 64, "width": 64,
             "num_inference_steps": 30} for i in range(4)]
    out, log = tmp_path / "out", tmp_path / "generations.log"
    killed = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline:
            pids = _ray_worker_pids()
            if pids and counts(log):  # a row is done and the next one is running
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    records = run(rows, out, model=str(tiny_checkpoint), ray="local", workers=1, cpus_per_worker=2, progress=False,
                  renderer=renderer_logging_to(log))
    thread.join()
    assert killed, "no Ray worker process was found to kill"
    assert [r["status"] for r in records] == ["succeeded"] * 4
    assert counts(log) == {f"r{i}": 1 for i in range(4)}  # each row generated to the end once
    assert writes == {f"r{i}.mp4": 1 for i in range(4)}  # and written once
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.jsonl"] + [f"r{i}.mp4" for i in range(4)])


def test_row_that_kills_its_worker_fails_after_max_attempts(tiny_checkpoint, tmp_path, local_ray, writes):
    """Catches actors restarted forever: a row that crashes its worker hung the job. After 3 deaths (the default)
    it is recorded failed with the cause, and the other rows finish."""
    rows = [{"id": "ok1", "prompt": "a cat", "num_frames": 2, "height": 32, "width": 32, "num_inference_steps": 2},
            {"id": "boom", "prompt": "crash", "num_frames": 2, "height": 32, "width": 32},
            {"id": "ok2", "prompt": "a dog", "num_frames": 2, "height": 32, "width": 32, "num_inference_steps": 2}]
    log = tmp_path / "generations.log"
    started = time.time()
    records = run(rows, tmp_path / "out", model=str(tiny_checkpoint), ray="local", workers=2, cpus_per_worker=1,
                  progress=False, renderer=renderer_logging_to(log))
    assert time.time() - started < 300
    by_id = {r["id"]: r for r in records}
    assert [by_id[i]["status"] for i in ("ok1", "boom", "ok2")] == ["succeeded", "failed", "succeeded"]
    assert "died 3 times" in by_id["boom"]["error"]
    assert counts(log) == {"ok1": 1, "ok2": 1, "boom": 3}
    assert writes == {"ok1.mp4": 1, "ok2.mp4": 1}
    assert json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[-1])["id"] in by_id
    assert manifest(tmp_path / "out")
