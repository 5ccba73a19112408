"""Peak GPU memory and step time of LoRA training at the real 1.7B shapes (issue 15's "fits a 12 GB GPU").

    python benchmarks/train_memory.py --checkpoint /tmp/ckpt-full --target temporal [--gradient-checkpointing]

Random full-size weights (init-random layout) and one random 16x256x256 clip; fp16 mixed precision, latents cached,
rank 16, a few steps. Prints one JSON line: peak torch.cuda.max_memory_allocated / reserved, median step seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="full-size checkpoint folder (written if missing)")
    parser.add_argument("--target", choices=("spatial", "temporal", "all"), default="temporal")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no memory figures)")
    parser.add_argument("--size", type=int, nargs=3, default=(16, 256, 256), metavar=("FRAMES", "H", "W"))
    args = parser.parse_args()

    from vidfusion import export_to_video
    from vidfusion.checkpoints.random_checkpoint import write_random_checkpoint
    from vidfusion.training.train import train_lora

    folder = Path(args.checkpoint)
    if not (folder / "model_index.json").exists():
        write_random_checkpoint(folder, "full", fp16_variant=False)
    work = Path(tempfile.mkdtemp(prefix="vidfusion-train-mem-"))
    count, height, width = args.size
    frames = np.random.default_rng(0).random((count, height, width, 3), dtype=np.float32)
    export_to_video(list(frames), str(work / "clip.mp4"), fps=8)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_lora(work / "clip.mp4", work / "out", model=str(folder), prompt="a random clip", target=args.target,
               frames=count, height=height, width=width,
               steps=args.steps, mixed_precision="fp16" if cuda else "no", cache_latents=True, device=args.device,
               gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=10**9, progress=False)
    log = [json.loads(line) for line in (work / "out" / "train_log.jsonl").read_text().splitlines()]
    times = [row["seconds"] for row in log]
    print(json.dumps({"target": args.target, "size": [count, height, width],
                      "gradient_checkpointing": args.gradient_checkpointing,
                      "median_step_s": statistics.median(times[1:] or times),
                      **({"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                          "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                          "gpu": torch.cuda.get_device_name()} if cuda else {})}))


if __name__ == "__main__":
    main()
