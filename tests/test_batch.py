"""Batch generation: local runs, resuming, bad rows, the CLI's exit codes, and a real local Ray instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vidfusion import TextToVideoPipeline
from vidfusion.media.video_io import export_to_video, read_metadata, read_video
from vidfusion.scale.batch import BatchInputError, read_rows, run

SMALL = {"num_frames": 2, "height": 32, "width": 32, "num_inference_steps": 2}
ROWS = [
    {"id": "cat", "prompt": "a cat", **SMALL, "seed": 3},
    {"prompt": "a dog on a beach", **SMALL, "guidance_scale": 5.0, "sampler": "dpmpp-2m"},
    {"id": "loop", "prompt": "a loop", **SMALL, "format": "gif", "fps": 4},
    {"id": "bad", "prompt": "odd size", **SMALL, "height": 36},  # fails alone
]


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_local_run_equals_the_api_and_resumes(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    records = run(ROWS, out, model=str(tiny_checkpoint), progress=False)
    by_id = {r["id"]: r for r in records}
    assert [r["status"] for r in records] == ["succeeded", "succeeded", "succeeded", "failed"]
    assert "multiples of 8" in by_id["bad"]["error"] and by_id["bad"]["path"] is None
    derived = records[1]["id"]
    assert derived == read_rows([ROWS[1]])[0]["id"]  # stable: derived from the content
    assert records[1]["seed"] == read_rows([ROWS[1]])[0]["seed"]
    assert by_id["cat"]["params"]["sampler"] == "ddim" and by_id["cat"]["params"]["guidance_scale"] == 9.0
    assert by_id["cat"]["seconds"] > 0 and (out / "loop.gif").is_file()

    pipe = TextToVideoPipeline.from_pretrained(tiny_checkpoint)  # the same video through the API
    pipe.set_progress_bar_config(disable=True)
    for row_id, kwargs in (("cat", dict(ROWS[0])), (derived, dict(ROWS[1]))):
        seed = by_id[row_id]["seed"]
        kwargs = {k: v for k, v in kwargs.items() if k not in ("id", "seed")}
        frames = pipe(kwargs.pop("prompt"), generator=torch.Generator().manual_seed(seed), **kwargs).frames[0]
        expected = read_video(export_to_video(frames, tmp_path / f"api-{row_id}.mp4"))
        assert np.array_equal(read_video(out / f"{row_id}.mp4"), expected)
    meta = read_metadata(out / "cat.mp4")
    assert meta["prompt"] == "a cat" and meta["seed"] == 3 and meta["id"] == "cat"

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run(ROWS, out, model=str(tiny_checkpoint), progress=False)  # resume: only the failed row runs again
    assert [r["status"] for r in again] == [r["status"] for r in records]
    assert all((out / name).stat().st_mtime_ns == t for name, t in mtimes.items() if name != "manifest.jsonl")
    lines = manifest(out)
    assert sorted(r["id"] for r in lines) == sorted(r["id"] for r in records)  # one line per id
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.jsonl", "cat.mp4", f"{derived}.mp4",
                                                            "loop.gif"])


def test_input_errors_before_anything_starts(tmp_path):
    cases = [([{"prompt": "a", "steps": 4}], r"row 1: unknown field 'steps'"),
             ([{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}], "rows 1 and 2 have the same id 'x'"),
             ([{"prompt": "same"}, {"prompt": "same"}], "same id"),
             ([{"negative_prompt": "no prompt"}], "'prompt' is required"),
             ([{"prompt": "a", "id": "../escape"}], "cannot be a file name"),
             ([], "no rows")]
    for rows, match in cases:
        with pytest.raises(BatchInputError, match=match):
            run(rows, tmp_path / "never", model="unused", progress=False)
    assert not (tmp_path / "never").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json}\n')
    with pytest.raises(BatchInputError, match="row 2: not valid JSON"):
        read_rows(bad)


def test_csv_input(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,prompt,num_frames,guidance_scale,negative_prompt\nr1,a cat,4,7.5,\nr2,\"a dog, running\",2,,"
                    "blurry\n")
    rows = read_rows(path)
    assert rows[0] == {"id": "r1", "prompt": "a cat", "num_frames": 4, "guidance_scale": 7.5,
                       "seed": rows[0]["seed"]}
    assert rows[1]["prompt"] == "a dog, running" and rows[1]["negative_prompt"] == "blurry"
    assert "guidance_scale" not in rows[1]


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "vidfusion", "batch", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_cli_exit_codes(tiny_checkpoint, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    result = cli(str(good), "--out-dir", str(tmp_path / "a"), "--model", str(tiny_checkpoint), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "2 of 2 videos" in result.stdout
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    result = cli(str(mixed), "--out-dir", str(tmp_path / "b"), "--model", str(tiny_checkpoint))
    assert result.returncode == 1 and "1 failed" in result.stdout and "manifest.jsonl" in result.stdout
    assert "batch" in result.stderr  # the progress bar
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"prompt": "a", "colour": "red"}\n')
    result = cli(str(unknown), "--out-dir", str(tmp_path / "c"), "--model", str(tiny_checkpoint))
    assert result.returncode == 2 and "unknown field 'colour'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_resume_after_kill_9_of_the_driver(tiny_checkpoint, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"id": f"r{i}", "prompt": f"clip {i}", "num_frames": 4, "height": 64,
                                          "width": 64, "num_inference_steps": 15}) for i in range(6)) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vidfusion", "batch", str(rows), "--out-dir", str(out),
                             "--model", str(tiny_checkpoint), "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "manifest.jsonl").exists() and len(manifest(out)) >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {r["id"]: (out / f"{r['id']}.mp4").stat().st_mtime_ns for r in manifest(out)}
    assert 2 <= len(first) < 6
    result = cli(str(rows), "--out-dir", str(out), "--model", str(tiny_checkpoint), "--quiet")
    assert result.returncode == 0, result.stderr
    lines = manifest(out)
    assert sorted(r["id"] for r in lines) == [f"r{i}" for i in range(6)]
    assert all(r["status"] == "succeeded" for r in lines)
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.jsonl"] + [f"r{i}.mp4" for i in range(6)])
    assert all((out / f"{i}.mp4").stat().st_mtime_ns == t for i, t in first.items())  # not made twice


def test_rows_can_be_smoothed_with_interpolate_fps(tiny_checkpoint, tmp_path):
    """A row's interpolate_fps: 4 frames at 8 fps -> 8 frames at 16 fps, recorded in the file and the manifest."""
    rows = [{"id": "smooth", "prompt": "a cat", **SMALL, "num_frames": 4, "interpolate_fps": 16, "seed": 1}]
    (record,) = run(rows, tmp_path / "out", model=str(tiny_checkpoint), progress=False)
    assert record["status"] == "succeeded" and record["params"]["interpolate_fps"] == 16
    frames = read_video(record["path"])
    assert len(frames) == 8 and read_metadata(record["path"])["interpolate_fps"] == 16
