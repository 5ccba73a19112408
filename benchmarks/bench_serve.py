"""Service throughput: the same jobs on the embedded server and on Ray actor pools of 1 and 2 workers, side by side.

    python benchmarks/bench_serve.py                   # 24 jobs, tiny model, this machine's cores split over workers
    python benchmarks/bench_serve.py --jobs 48 --steps 25 --frames 8 --size 64

Each mode starts `vidfusion serve` as a subprocess (Ray modes: `--ray local`, `--cpus-per-worker` = cores / workers,
so every mode uses the same cores), waits until it answers, submits every job at once and times the first submit to
the last success. Printed: jobs per minute and the ratio to the embedded server.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(model: Path, data: Path, extra: list[str], jobs: list[dict]) -> float:
    """Seconds from the first submit to the last finished job."""
    port = free_port()
    log = open(data.parent / f"{data.name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vidfusion", "serve", "--model", str(model), "--data-dir",
                             str(data), "--port", str(port), "--log-level", "warning", "--max-queue", "1000", *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server did not start: {(data.parent / f'{data.name}.log').read_text()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=60) as client:
            start = time.perf_counter()
            ids = [client.post("/v1/videos", json=job).json()["id"] for job in jobs]
            pending = set(ids)
            while pending:
                for job_id in list(pending):
                    status = client.get(f"/v1/videos/{job_id}").json()["status"]
                    if status == "succeeded":
                        pending.discard(job_id)
                    elif status in ("failed", "cancelled"):
                        raise SystemExit(f"job {job_id} {status}")
                time.sleep(0.05)
            return time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    from vidfusion.checkpoints.random_checkpoint import write_random_checkpoint

    cores = os.cpu_count() or 2
    jobs = [{"prompt": f"prompt number {i}", "num_frames": args.frames, "height": args.size, "width": args.size,
             "num_inference_steps": args.steps, "seed": i} for i in range(args.jobs)]
    modes = {"embedded": [],
             "ray, 1 worker": ["--ray", "local", "--workers", "1", "--cpus-per-worker", str(cores)],
             "ray, 2 workers": ["--ray", "local", "--workers", "2", "--cpus-per-worker", str(max(1, cores // 2))]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(write_random_checkpoint(tmp / "tiny", "tiny"))
        results = {name: run_mode(model, tmp / f"data{i}", extra, jobs) for i, (name, extra) in
                   enumerate(modes.items())}
    base = args.jobs / results["embedded"] * 60
    print(f"{args.jobs} jobs, {args.frames}x{args.size}x{args.size}, {args.steps} steps, {cores} cores")
    for name, seconds in results.items():
        per_min = args.jobs / seconds * 60
        print(f"{name:16s} {seconds:7.1f} s  {per_min:6.1f} jobs/min  x{per_min / base:.2f}")


if __name__ == "__main__":
    main()
