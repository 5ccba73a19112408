"""Batch generation: rows (JSONL / CSV) -> ids and seeds -> a runner (this process, or a pool of Ray actors)
-> atomic video files + DIR/manifest.jsonl. Resumable: finished rows are skipped, failed ones retried.

    from vidfusion.batch import run
    records = run("prompts.jsonl", "out/", model="damo-vilab/text-to-video-ms-1.7b")
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..devices import device_and_dtype
from ..lora.apply import apply_loras
from ..media.fileio import remove_temp_files, write_bytes, write_text
from ..sampling.schedules import SAMPLER_NAMES
from .ray_cluster import connect, first_line

FIELDS = {"id": str, "prompt": str, "negative_prompt": str, "seed": int, "num_frames": int, "height": int,
          "width": int, "num_inference_steps": int, "guidance_scale": float, "sampler": str, "fps": int,
          "format": str, "interpolate_fps": int, "cache": str, "cache_interval": int, "cache_branch": int}
FORMATS = ("mp4", "webm", "gif")
MANIFEST = "manifest.jsonl"
# errors that are the row's own fault: recorded at once, never retried
INPUT_ERRORS = (ValueError, TypeError, KeyError)


class BatchInputError(ValueError):
    """The input cannot be run at all (unknown field, duplicate id, unreadable file): nothing was started."""


# ---- rows -----------------------------------------------------------------------------------------------------

def read_rows(source: str | os.PathLike | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows from a JSONL file, a CSV file with a header, or dicts; checked, with ids and seeds filled in."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise BatchInputError(f"input file '{path}' does not exist")
        raw = list(_read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path))
    else:
        raw = [(i + 1, dict(row)) for i, row in enumerate(source)]
    rows, seen = [], {}
    for number, row in raw:
        row = _check_row(number, row)
        if row["id"] in seen:
            raise BatchInputError(f"rows {seen[row['id']]} and {number} have the same id {row['id']!r} (rows without "
                                  "an id get one from their content: identical rows need ids of their own)")
        seen[row["id"]] = number
        rows.append(row)
    if not rows:
        raise BatchInputError("the input has no rows")
    return rows


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchInputError(f"{path}, row {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise BatchInputError(f"{path}, row {number}: expected a JSON object")
        yield number, row


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, newline="") as f:
        for number, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
            if None in row:
                raise BatchInputError(f"{path}, row {number}: more cells than header columns")
            yield number, {k: _csv_value(k, v) for k, v in row.items() if v not in (None, "")}


def _csv_value(field: str, value: str) -> Any:
    kind = FIELDS.get(field)
    try:
        return kind(value) if kind in (int, float) else value
    except ValueError:
        return value  # the row fails with a clear error when it runs


def _check_row(number: int, row: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise BatchInputError(f"row {number}: unknown field {unknown[0]!r}; fields are: {', '.join(FIELDS)}")
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise BatchInputError(f"row {number}: 'prompt' is required (a non-empty string)")
    row = dict(row)
    if row.get("id") is not None:
        row["id"] = str(row["id"])
        if not row["id"] or "/" in row["id"] or row["id"].startswith(".") or "\\" in row["id"]:
            raise BatchInputError(f"row {number}: id {row['id']!r} cannot be a file name")
    else:
        content = json.dumps({k: v for k, v in row.items() if k != "id"}, sort_keys=True)
        row["id"] = hashlib.sha256(content.encode()).hexdigest()[:16]
    if row.get("seed") is None:
        row["seed"] = int.from_bytes(hashlib.sha256(("seed:" + row["id"]).encode()).digest()[:8], "big") >> 1
    return row


# ---- one row --------------------------------------------------------------------------------------------------

def generation_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    """The pipeline arguments of a row (everything but id, seed, fps, interpolate_fps, format)."""
    keys = ("negative_prompt", "num_frames", "height", "width", "num_inference_steps", "guidance_scale", "sampler",
            "cache", "cache_interval", "cache_branch")
    return {k: row[k] for k in keys if row.get(k) is not None}


def render_row(pipe, row: dict[str, Any], metadata: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """Generate one row's video: (the encoded file's bytes, for the driver to write; its full settings)."""
    import torch

    from ..media.metadata import video_settings
    from ..media.video_io import export_to_video

    fmt = row.get("format", "mp4")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if row.get("sampler") is not None and row["sampler"] not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {row['sampler']!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
    fps = row.get("fps", 8)
    generator = torch.Generator().manual_seed(int(row["seed"]))
    output = pipe(row["prompt"], generator=generator, output_type="np", **generation_kwargs(row))
    frames = output.frames[0]
    settings = video_settings(output.settings, {**row, "fps": fps}, **metadata, id=row["id"])
    with tempfile.TemporaryDirectory() as tmp:
        path = export_to_video(frames, Path(tmp) / f"video.{fmt}", fps=fps, metadata=settings,
                               interpolate_fps=row.get("interpolate_fps"))
        return Path(path).read_bytes(), {**settings, "format": fmt}


class RowRenderer:
    """Loads the pipeline once (in this process or in a Ray actor) and renders rows; a row's own error becomes
    its result, so one bad row never stops the others."""

    def __init__(self, model: str, variant: str | None = None, dtype: str | None = None, device: str | None = None,
                 vae: str | None = None, clip: str | None = None,
                 loras: list[tuple[str, float]] | None = None, lora_weight_name: str | None = None,
                 lora_target: str | None = None, turbo: bool = False, threads: int | None = None):
        import torch

        from ..pipelines.text_to_video import TextToVideoPipeline

        if threads:
            torch.set_num_threads(threads)
        device, torch_dtype = device_and_dtype(device, dtype)
        self.pipe = TextToVideoPipeline.from_pretrained(model, dtype=torch_dtype, variant=variant, vae=vae,
                                                        text_encoder=clip).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.metadata = {"model": str(model),
                         **apply_loras(self.pipe, loras or [], lora_weight_name, lora_target, turbo)}

    def render(self, row: dict[str, Any], retries: int = 0) -> dict[str, Any]:
        start = time.perf_counter()
        for attempt in range(retries + 1):
            try:
                data, settings = render_row(self.pipe, row, self.metadata)
                return {"id": row["id"], "data": data, "error": None, "seconds": time.perf_counter() - start,
                        "settings": json.dumps(settings)}
            except Exception as exc:  # a row's own error (bad value) at once; others (out of memory) after retries
                if isinstance(exc, INPUT_ERRORS) or attempt == retries:
                    return {"id": row["id"], "data": None, "error": _error(exc),
                            "seconds": time.perf_counter() - start, "settings": ""}
        raise AssertionError("unreachable")


def _error(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}"[:1000]


# ---- output folder --------------------------------------------------------------------------------------------

class OutputDir:
    """DIR/<id>.<format> written atomically, and DIR/manifest.jsonl: one line per finished row (the latest)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.path)  # of a run that was killed (only vidfusion's own temp names)
        self.records = self._read_manifest()
        self.compact()

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        manifest = self.path / MANIFEST
        if manifest.is_file():
            for line in manifest.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill: that row runs again
                if isinstance(record, dict) and "id" in record:
                    records[record["id"]] = record
        return records

    def compact(self) -> None:
        """Rewrite the manifest with the latest line of every id (atomically)."""
        write_text(self.path / MANIFEST, "".join(json.dumps(record) + "\n" for record in self.records.values()))

    def video_path(self, row: dict[str, Any]) -> Path:
        return self.path / f"{row['id']}.{row.get('format', 'mp4')}"

    def done(self, row: dict[str, Any]) -> bool:
        record = self.records.get(row["id"])
        return bool(record and record["status"] == "succeeded" and self.video_path(row).is_file())

    def finish(self, row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        data, error = result["data"] or None, result["error"] or None
        path = self.video_path(row)
        if data:
            write_bytes(path, data)
        # the full parameters the video was made with (defaults resolved), or those the row gave if it failed
        params = json.loads(result["settings"]) if result.get("settings") else dict(row)
        params = {k: v for k, v in params.items() if k not in ("id", "seed", "vidfusion")}
        record = {"id": row["id"], "status": "succeeded" if data else "failed", "path": str(path) if data else None,
                  "seed": row["seed"], "params": params, "seconds": round(float(result["seconds"]), 3),
                  "error": error}
        with open(self.path / MANIFEST, "a") as f:  # one whole line per finished row, flushed to disk
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[row["id"]] = record
        return record


# ---- runners --------------------------------------------------------------------------------------------------

def run(rows_or_path: str | os.PathLike | Iterable[dict[str, Any]], out_dir: str | os.PathLike, *,
        model: str = "damo-vilab/text-to-video-ms-1.7b", variant: str | None = None, dtype: str | None = None,
        vae: str | None = None, clip: str | None = None,
        device: str | None = None, ray: str | None = None, workers: int | None = None,
        gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
        loras: list[tuple[str, float]] | None = None, lora_weight_name: str | None = None,
        lora_target: str | None = None, turbo: bool = False, max_retries: int = 1, max_attempts: int = 3,
        progress: bool = True, renderer: type[RowRenderer] | None = None) -> list[dict[str, Any]]:
    """Generate every row not already done in `out_dir`; returns the manifest records of all rows.
    ray: None (this process), "local" (start a local Ray instance), "auto" or an address (a running cluster).
    max_retries: retries of a row after an error that is not the row's own (in the same worker); max_attempts (Ray):
    worker deaths on one row before it is recorded failed. renderer: the RowRenderer (sub)class rows run in."""
    rows = read_rows(rows_or_path)
    if not isinstance(max_retries, int) or max_retries < 0:
        raise BatchInputError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise BatchInputError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
    out = OutputDir(out_dir)
    pending = [row for row in rows if not out.done(row)]
    options = dict(model=model, variant=variant, dtype=dtype, vae=vae, clip=clip, loras=loras,
                   lora_weight_name=lora_weight_name,
                   lora_target=lora_target, turbo=turbo)
    bar = _progress(len(rows), len(rows) - len(pending), progress)
    by_id = {row["id"]: row for row in pending}
    try:
        if pending and ray is None:
            local = (renderer or RowRenderer)(device=device, **options)
            for row in pending:
                bar(out.finish(row, local.render(row, max_retries)))
        elif pending:
            for result in _ray_results(pending, ray, workers, gpus_per_worker, cpus_per_worker, max_retries,
                                       max_attempts, options, renderer or RowRenderer):
                bar(out.finish(by_id[result["id"]], result))
    finally:
        bar(None)
        out.compact()
    return [out.records[row["id"]] for row in rows if row["id"] in out.records]


def _ray_results(rows: list[dict[str, Any]], address: str, workers: int | None, gpus: float | None,
                 cpus: float | None, retries: int, max_attempts: int, options: dict[str, Any],
                 renderer: type = RowRenderer) -> Iterator[dict[str, Any]]:
    """Rows rendered on a pool of Ray actors (one loaded pipeline each), one row per idle actor. A worker that dies
    (killed, host out of memory, a crash) is replaced and its row queued again; after `max_attempts` deaths on the
    same row, that row is failed with the cause and the others go on."""
    ray = connect(address)
    size = workers or max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1) // (gpus or cpus or 1)))
    threads = max(1, int(cpus)) if cpus else None
    actor_class = ray.remote(num_cpus=cpus or 1, num_gpus=gpus or 0, max_restarts=0, max_task_retries=0)(renderer)
    actors = [actor_class.remote(**options, threads=threads) for _ in range(min(size, len(rows)))]
    queue, running, deaths = collections.deque(rows), {}, collections.Counter()
    idle = list(range(len(actors)))
    try:
        while queue or running:
            while queue and idle:
                slot, row = idle.pop(), queue.popleft()
                running[actors[slot].render.remote(row, retries)] = (slot, row)
            ref = ray.wait(list(running), num_returns=1)[0][0]
            slot, row = running.pop(ref)
            idle.append(slot)
            try:
                yield ray.get(ref)
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                cause = first_line(exc)
                if "creation task" in str(exc):  # the pipeline cannot load on a worker: no row can run
                    raise RuntimeError(f"Ray workers cannot start: {cause}") from None
            ray.kill(actors[slot], no_restart=True)
            actors[slot] = actor_class.remote(**options, threads=threads)
            deaths[row["id"]] += 1
            if deaths[row["id"]] < max_attempts:
                queue.appendleft(row)
            else:
                yield {"id": row["id"], "data": None, "seconds": 0.0, "settings": "",
                       "error": f"WorkerDied: its Ray worker died {deaths[row['id']]} times on this row ({cause})"}
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _progress(total: int, done: int, enabled: bool) -> Callable[[dict[str, Any] | None], None]:
    """A bar with rows done / failed / total and an ETA; call with each finished record, then with None."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, unit="video", disable=not enabled, desc="batch")
    failed = 0

    def update(record: dict[str, Any] | None) -> None:
        nonlocal failed
        if record is None:
            bar.close()
            return
        failed += record["status"] == "failed"
        bar.set_postfix(failed=failed, refresh=False)
        bar.update()

    return update


def summary(records: list[dict[str, Any]], total: int, out_dir: str | os.PathLike) -> str:
    failed = [r for r in records if r["status"] == "failed"]
    succeeded = sum(r["status"] == "succeeded" for r in records)
    line = f"{succeeded} of {total} videos in {out_dir}"
    if failed:
        line += f"; {len(failed)} failed (errors in {Path(out_dir) / MANIFEST}, e.g. {failed[0]['id']}: " \
                f"{failed[0]['error']})"
    return line
