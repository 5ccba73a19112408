"""Adapters and few-step generation, measured side by side in one process.

    python benchmarks/bench_adapters.py turbo                       # cpu-small: 4-step t2v-turbo vs 25-step dpmpp-2m
    python benchmarks/bench_adapters.py turbo --config full --dtype bfloat16 --repeats 1   # real 1.7B shapes
    python benchmarks/bench_adapters.py overhead --config tiny      # step time: no adapter / switchable / fused
    python benchmarks/bench_adapters.py merge --config full --dtype bfloat16   # T2V-Turbo LoRA: read + merge, switch

Random weights in the published layout (init-random, or bench.py's cpu-small checkpoint); the T2V-Turbo LoRA is a
random cloneofsimo list over the whole UNet with the guidance embedding, rank 32 as published. Prints medians and
ratios; `--json` for one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

CONFIGS = {  # size of one video: frames, height, width
    "tiny": dict(frames=8, height=64, width=64),
    "cpu-small": dict(frames=8, height=128, width=128),
    "full": dict(frames=16, height=256, width=256),
}


def make_checkpoint(config: str, folder: Path) -> Path:
    from vidfusion.checkpoints.random_checkpoint import write_random_checkpoint

    if config == "cpu-small":
        from bench import make_checkpoint as make_small

        make_small("cpu-small", folder)
    else:
        write_random_checkpoint(folder, config, fp16_variant=False)
    return folder


def make_turbo_lora(pipe, path: Path, rank: int = 32, guidance_dim: int = 256) -> Path:
    """A T2V-Turbo-shaped unet_lora.pt for this UNet: [up, down] for every Linear / Conv of the whole UNet."""
    from vidfusion.lora.apply import list_candidates

    g = torch.Generator().manual_seed(0)
    flat = []
    for _, shape in list_candidates(pipe.unet, "unet", guidance_dim):
        r = min(rank, shape[0], shape[1])
        flat.append(torch.randn((shape[0], r, *([1] * (len(shape) - 2))), generator=g) * 0.01)
        flat.append(torch.randn((r, *shape[1:]), generator=g) * 0.01)
    torch.save(flat, path)
    return path


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_turbo(pipe, size: dict, repeats: int, folder: Path, baseline: bool = True) -> dict:
    def video(**kwargs):
        return lambda: pipe("a cat is surfing", generator=torch.Generator().manual_seed(0), num_frames=size["frames"],
                            height=size["height"], width=size["width"], **kwargs)

    base = timed(video(num_inference_steps=25, sampler="dpmpp-2m", guidance_scale=9.0), repeats) if baseline else []
    start = time.perf_counter()
    pipe.load_lora_weights(make_turbo_lora(pipe, folder / "unet_lora.pt"))
    load_s = time.perf_counter() - start
    turbo = timed(video(sampler="t2v-turbo"), repeats)  # 4 steps, guidance 7.5 embedded: 4 UNet passes
    decode = timed(lambda: pipe.decode_latents(torch.randn(1, 4, size["frames"], size["height"] // 8,
                                                           size["width"] // 8)), 1)
    pipe.unload_lora_weights()
    result = {"t2v-turbo 4 steps s": statistics.median(turbo), "turbo lora load s": load_s, "vae decode s": decode[0]}
    if base:
        result.update({"dpmpp-2m 25 steps cfg s": statistics.median(base),
                       "speed-up": statistics.median(base) / statistics.median(turbo)})
    return result


def bench_overhead(pipe, size: dict, repeats: int, folder: Path) -> dict:
    """One UNet CFG step (the unit the 10% budget is about) without adapters, with two switchable adapters active,
    and fused; and what a switch (set_adapters) costs."""
    from vidfusion.lora.apply import list_candidates

    latents = torch.randn(2, 4, size["frames"], size["height"] // 8, size["width"] // 8)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)

    @torch.no_grad()
    def step():
        pipe.unet(latents, torch.tensor(500), pipe.unet.text_kv(text))

    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):  # motion-LoRA-like: rank 16 on the temporal transformers
        flat = []
        for _, shape in list_candidates(pipe.unet, "temporal"):
            flat += [torch.randn((shape[0], 16), generator=g) * 0.01, torch.randn((16, shape[1]), generator=g) * 0.01]
        torch.save(flat, folder / f"{name}.pt")
    pipe.load_lora_weights(folder / "a.pt", adapter_name="a")
    pipe.load_lora_weights(folder / "b.pt", adapter_name="b")
    states = {"none": lambda: pipe.set_adapters([]), "switchable": lambda: pipe.set_adapters(["a", "b"], [0.7, 0.5]),
              "fused": lambda: (pipe.set_adapters(["a", "b"], [0.7, 0.5]), pipe.fuse_lora())}
    times: dict[str, list[float]] = {name: [] for name in states}
    switches = []
    step()
    for _ in range(repeats):  # interleaved, so drifting machine speed hits every state alike
        for name, enter in states.items():
            start = time.perf_counter()
            enter()
            switches.append(time.perf_counter() - start)
            times[name] += timed(step, 2)
            if name == "fused":
                pipe.unfuse_lora()
    pipe.unload_lora_weights()
    m = {name: statistics.median(t) for name, t in times.items()}
    return {"step s (no adapter)": m["none"], "step s (2 switchable adapters)": m["switchable"],
            "step s (fused)": m["fused"], "switchable / none": m["switchable"] / m["none"],
            "fused / none": m["fused"] / m["none"], "set_adapters s (median)": statistics.median(switches)}


def _fingerprints(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every weight's bytes."""
    import hashlib

    return {k: hashlib.sha256(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def bench_merge(config: str, dtype: torch.dtype, folder: Path) -> dict:
    """T2V-Turbo's LoRA (575 layers, rank 32) on a UNet of `config` built in memory (no checkpoint on disk): reading
    the file and merging it (pipe.load_lora_weights' work), a weight change (set_adapters), an exact unload."""
    from vidfusion.checkpoints.loading import build_unet
    from vidfusion.checkpoints.random_checkpoint import _randomize
    from vidfusion.lora.adapters import LoraAdapters
    from vidfusion.lora.formats import read_lora_file
    from vidfusion.models.config import PRESETS
    from vidfusion.models.unet3d import UNet3D

    cfg = PRESETS[config][0]
    with torch.device("meta"):
        meta = UNet3D(cfg)
    unet = build_unet(cfg, _randomize(meta, torch.Generator().manual_seed(0)), dtype, "random").eval()
    path = make_turbo_lora(type("Pipe", (), {"unet": unet})(), folder / "unet_lora.pt")
    before = _fingerprints(unet)  # not clones: 3.4 GB more resident memory slows the merge itself by 2x
    models, adapters = {"unet": unet}, LoraAdapters()
    start = time.perf_counter()
    adapters.load(models, read_lora_file(path), "t2v-turbo", 1.0, None)
    load = time.perf_counter() - start
    layers = len(adapters.adapters["t2v-turbo"].layers)
    start = time.perf_counter()
    adapters.set_adapters(models, ["t2v-turbo"], [0.5])
    switch = time.perf_counter() - start
    start = time.perf_counter()
    adapters.unload(models)
    unload = time.perf_counter() - start
    exact = _fingerprints(unet) == before
    return {"LoRA layers": layers, "read + merge s": load, "set_adapters s": switch,
            "unload s": unload, "unload bit-exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("turbo", "overhead", "merge"))
    parser.add_argument("--config", choices=CONFIGS, default="cpu-small")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default=None, help="reuse a checkpoint folder")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="turbo: skip the 25-step CFG run (full shapes)")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormals (random tiny weights make some, which slow x86 math by 10-15%%)")
    args = parser.parse_args()
    torch.set_flush_denormal(not args.keep_denormals)

    from vidfusion import TextToVideoPipeline

    if args.what == "merge":
        with tempfile.TemporaryDirectory() as tmp:
            result = bench_merge(args.config, getattr(torch, args.dtype), Path(tmp))
        for key, value in result.items():
            print(f"{key:>34}: {value:.3f}" if isinstance(value, float) else f"{key:>34}: {value}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.checkpoint) if args.checkpoint else make_checkpoint(args.config, Path(tmp) / "ckpt")
        pipe = TextToVideoPipeline.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        if args.what == "turbo":
            result = bench_turbo(pipe, CONFIGS[args.config], args.repeats, Path(tmp), not args.no_baseline)
        else:
            result = bench_overhead(pipe, CONFIGS[args.config], args.repeats, Path(tmp))
    result = {"what": args.what, "config": args.config, "dtype": args.dtype, "device": args.device,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "flush denormals": not args.keep_denormals, **result}
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>34}: {value:.3f}" if isinstance(value, float) else f"{key:>34}: {value}")


if __name__ == "__main__":
    main()
