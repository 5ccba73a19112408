"""Step caching: UNet time of a 25-step sampler with CFG, without caching, with DeepCache and with Faster Diffusion's
encoder propagation, side by side in one process (random weights in the published shapes).

    python benchmarks/bench_cache.py                                   # full 1.7B UNet, 16x256x256, bfloat16
    python benchmarks/bench_cache.py --preset tiny --frames 8 --size 64 --dtype float32   # quick check

Times one CFG forward (batch 2) of each kind: a full step (which also fills the cache), a DeepCache reuse step
(interval 3, `--branch`), a Faster Diffusion decoder-only step; the 25-step totals follow from the published
schedules (step_cache.full_steps): full steps x full time + cached steps x cached time. A guidance interval
(sampling.guidance_interval) on top drops the unconditional half at 6 of 25 steps of dpmpp-2m (issue 23 item 4);
its figure is counted from the same step times (a half-batch step ~ half a CFG step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=("tiny", "full"))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from bench import cpu_name

    from vidfusion.checkpoints.loading import build_unet
    from vidfusion.checkpoints.random_checkpoint import _randomize
    from vidfusion.models.config import PRESETS
    from vidfusion.models.unet3d import FeatureCache, UNet3D
    from vidfusion.sampling.step_cache import CacheSettings, full_steps

    torch.set_flush_denormal(True)
    dtype = getattr(torch, args.dtype)
    cfg = PRESETS[args.preset][0]
    with torch.device("meta"):
        meta = UNet3D(cfg)
    unet = build_unet(cfg, _randomize(meta, torch.Generator().manual_seed(0)), dtype, "random").eval()
    h = w = args.size // 8
    x = torch.randn(2, 4, args.frames, h, w, dtype=dtype)
    kv = unet.text_kv(torch.randn(2, 77, cfg.cross_attention_dim, dtype=dtype))
    t = torch.tensor(500)
    deep, faster = FeatureCache(args.branch), FeatureCache(None)

    with torch.no_grad():
        unet(x, t, kv)  # warm-up (allocations, oneDNN primitives)
        full = timed(lambda: unet(x, t, kv, None, deep), args.repeats)
        deep.reuse = True
        shallow = timed(lambda: unet(x, t, kv, None, deep), max(2, args.repeats))
        unet(x, t, kv, None, faster)
        faster.reuse = True
        decoder = timed(lambda: unet(x, t, kv, None, faster), max(2, args.repeats))

    n = args.steps
    deep_full = len(full_steps(CacheSettings("deepcache", args.interval, args.branch), n))
    fd_full = len(full_steps(CacheSettings("faster-diffusion"), n))
    totals = {"no cache": n * full,
              f"deepcache interval {args.interval} branch {args.branch}": deep_full * full + (n - deep_full) * shallow,
              "faster-diffusion": fd_full * full + (n - fd_full) * decoder}
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"UNet {args.preset}, {args.frames}x{args.size}x{args.size}, {args.dtype}, CFG batch 2")
    print(f"one step: full {full:.2f} s, deepcache reuse {shallow:.2f} s ({shallow / full:.1%}), "
          f"decoder only {decoder:.2f} s ({decoder / full:.1%})")
    base = totals["no cache"]
    for name, total in totals.items():
        print(f"{n} steps, {name:32s} {total:8.1f} s  x{base / total:.2f}")
    # guidance interval (0.28, 5.42] with dpmpp-2m: 19 CFG steps + 6 conditional-only (half batch) steps
    with_interval = deep_full * full + (n - deep_full) * shallow - 6 * 0.5 * full * (deep_full / n) \
        - 6 * 0.5 * shallow * ((n - deep_full) / n)
    print(f"{n} steps, deepcache + guidance interval (est.)     {with_interval:8.1f} s  x{base / with_interval:.2f}")


if __name__ == "__main__":
    main()
