"""Batch throughput: the same rows in this process vs on a local Ray instance, side by side.

    python benchmarks/bench_batch.py                 # 24 rows, tiny model, local vs --ray local --workers 2
    python benchmarks/bench_batch.py --rows 48 --workers 2 --steps 25 --frames 8 --size 64

Each mode runs `vidfusion batch` as a subprocess into a fresh folder. Printed: wall time, videos per minute, the
mean seconds a row spends generating (from the manifest) and the overhead per row, (wall * workers - sum of row
seconds) / rows: model loading, Ray's actor start-up, scheduling and moving the videos back to the driver.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_mode(rows: Path, out: Path, model: Path, extra: list[str]) -> dict:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "vidfusion", "batch", str(rows), "--out-dir", str(out),
                             "--model", str(model), "--quiet", *extra], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"batch failed ({result.returncode}): {result.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {"wall": wall, "rows": len(records), "row_seconds": sum(r["seconds"] for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    from vidfusion.checkpoints.random_checkpoint import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(write_random_checkpoint(tmp / "tiny", "tiny"))
        rows = tmp / "rows.jsonl"
        rows.write_text("\n".join(json.dumps({"id": f"r{i}", "prompt": f"prompt number {i}", "num_frames": args.frames,
                                              "height": args.size, "width": args.size,
                                              "num_inference_steps": args.steps}) for i in range(args.rows)))
        modes = {"local": ([], 1),
                 f"ray local x{args.workers}": (["--ray", "local", "--workers", str(args.workers),
                                                 "--cpus-per-worker", "1"], args.workers)}
        print(f"{args.rows} rows of {args.frames}x{args.size}x{args.size}, {args.steps} steps, tiny model")
        print(f"{'mode':>16} {'wall s':>8} {'videos/min':>11} {'s/row in worker':>16} {'overhead s/row':>15}")
        for name, (extra, workers) in modes.items():
            r = run_mode(rows, tmp / name.replace(" ", "-"), model, extra)
            overhead = (r["wall"] * workers - r["row_seconds"]) / r["rows"]
            print(f"{name:>16} {r['wall']:8.1f} {60 * r['rows'] / r['wall']:11.1f} "
                  f"{r['row_seconds'] / r['rows']:16.3f} {overhead:15.3f}")


if __name__ == "__main__":
    main()
