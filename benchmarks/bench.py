"""Side-by-side benchmark: vidfusion vs diffusers on the same random checkpoint, same settings.

    python benchmarks/bench.py                      # CPU case from anchors.md (56M-param UNet3D)
    python benchmarks/bench.py --case full-576 --device cuda --dtype float16
    python benchmarks/bench.py --profile            # torch profiler table for vidfusion

Each library runs in its own subprocess (so peak RSS is its own); runs alternate A/B and the medians,
their ratio, peak memory and the max difference between the two outputs are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# anchors.md CPU model: UNet3D 64/128/256/256, cross-attention 128, head dim 16; SD-sized VAE; small CLIP
CPU_MODEL = dict(unet=dict(block_out_channels=(64, 128, 256, 256), cross_attention_dim=128, attention_head_dim=16,
                           sample_size=16),
                 vae=dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=256),
                 clip=dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4))
CASES = {
    # anchors.md CPU case: 8 frames 128x128, DPM++ 4 steps
    "cpu-small": dict(**CPU_MODEL, frames=8, height=128, width=128, steps=4),
    # the same weights at a larger video: 16 frames 256x256 (VAE-heavy)
    "cpu-mid": dict(**CPU_MODEL, frames=16, height=256, width=256, steps=4),
    # UNet-heavy (issue 23.5): the same UNet with a small VAE (64/128/128/128), 25 steps: the UNet is most of it
    "cpu-unet": dict(unet=CPU_MODEL["unet"], clip=CPU_MODEL["clip"],
                     vae=dict(block_out_channels=(64, 128, 128, 128), norm_num_groups=32, sample_size=128),
                     frames=8, height=128, width=128, steps=25),
    # the real 1.7B shapes (GPU)
    "full-576": dict(unet={}, vae=None, clip=None, frames=24, height=320, width=576, steps=25),
    "full-256": dict(unet={}, vae=None, clip=None, frames=16, height=256, width=256, steps=25),
    # the reference page's long clip: model offload + VAE slicing, peak CUDA memory is the figure; vidfusion
    # runs its native pipeline (16-frame windows), so the frame difference is not a parity check here
    "full-256-64-offload": dict(unet={}, vae=None, clip=None, frames=64, height=256, width=256, steps=25,
                                offload=True, native=True),
}


def cpu_name() -> str:
    """The CPU's model name, with its family/model numbers (VMs often say only "AMD EPYC"), and core count."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        import platform

        return platform.processor() or "unknown CPU"
    flags = fields.get("flags", "").split()
    extras = [flag for flag in ("avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
            f"{', ' + ' '.join(extras) if extras else ''}), {os.cpu_count()} cores")


def make_checkpoint(case: str, folder: Path) -> None:
    """Random weights written by diffusers in the published layout (vidfusion's init-random for full shapes)."""
    spec = CASES[case]
    if spec["vae"] is None:
        from vidfusion.checkpoints.random_checkpoint import write_random_checkpoint

        write_random_checkpoint(folder, "full", fp16_variant=False)
        return
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from vidfusion.checkpoints.random_checkpoint import PUBLISHED_SCHEDULER, write_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet3DConditionModel(**spec["unet"])
    with torch.no_grad():  # diffusers zero-inits the last temporal convs; make every path do real work
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **spec["vae"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, max_position_embeddings=77, **spec["clip"]))
    write_clip_tokenizer(folder / "tokenizer")
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(
        str(folder / "tokenizer")), unet=unet, scheduler=DDIMScheduler.from_config(PUBLISHED_SCHEDULER))
    pipe.save_pretrained(str(folder))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(PUBLISHED_SCHEDULER))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def unet_tflops(lib: str, pipe, spec: dict, device: str, repeats: int) -> dict:
    """UNet CFG forward alone (batch 2): FLOPs counted by torch.utils.flop_counter, median time, TFLOP/s."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    dtype = next(unet.parameters()).dtype
    h, w = spec["height"] // 8, spec["width"] // 8
    x = torch.randn(2, 4, spec["frames"], h, w, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, 1024 if not spec["unet"] else spec["unet"]["cross_attention_dim"], device=device,
                      dtype=dtype)
    t = torch.tensor(500, device=device)

    def forward():
        if lib == "diffusers":
            return unet(x, t, encoder_hidden_states=ctx).sample
        return unet(x, t, ctx)

    with torch.no_grad():
        forward()
        from vidfusion.models import layers

        onednn, layers.ONEDNN = layers.ONEDNN, False  # count through F.linear (same FLOPs)
        with FlopCounterMode(display=False) as counter:
            forward()
        layers.ONEDNN = onednn
        flops = counter.get_total_flops()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            forward()
            _sync(device)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {"times": times, "flops": flops, "tflops": flops / median / 1e12,
              "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.startswith("cuda"):
        result["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def worker(lib: str, folder: str, case: str, device: str, dtype: str, repeats: int, out: str,
           compile_model: bool = False, unet_only: bool = False) -> None:
    import torch

    spec = CASES[case]
    torch_dtype = getattr(torch, dtype)
    kwargs = dict(num_frames=spec["frames"], height=spec["height"], width=spec["width"],
                  num_inference_steps=spec["steps"])
    if lib == "diffusers":
        from diffusers import DPMSolverMultistepScheduler, TextToVideoSDPipeline

        pipe = TextToVideoSDPipeline.from_pretrained(folder, torch_dtype=torch_dtype)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    else:
        from vidfusion import TextToVideoPipeline, TextToVideoSDPipeline

        # like for like: all frames at once, as diffusers (unless the case measures the native windows)
        pipe = (TextToVideoPipeline if spec.get("native") else TextToVideoSDPipeline).from_pretrained(
            folder, dtype=torch_dtype)
        kwargs["sampler"] = "dpmpp-2m"
    if spec.get("offload"):
        pipe.enable_model_cpu_offload()
        pipe.vae.enable_slicing()
    else:
        pipe.to(device)
    compile_s = None
    if compile_model and lib == "vidfusion":
        pipe.compile()
    if unet_only:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result = unet_tflops(lib, pipe, spec, device, repeats)
        Path(out + ".json").write_text(json.dumps(result))
        np.save(out + ".npy", np.zeros(1, np.float32))
        return
    pipe.set_progress_bar_config(disable=True)
    times, frames = [], None

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):  # first run is warm-up (and, with --compile, the compilation)
        _sync(device)
        start = time.perf_counter()
        frames = pipe("a cat is surfing", generator=torch.Generator().manual_seed(0), **kwargs).frames
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
        else:
            compile_s = time.perf_counter() - start
    result = {"times": times, "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "first_call_s": compile_s}
    if device.startswith("cuda"):
        result["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    np.save(out + ".npy", np.asarray(frames, dtype=np.float32))
    Path(out + ".json").write_text(json.dumps(result))


def profile(folder: str, case: str, device: str, dtype: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from vidfusion import TextToVideoPipeline

    spec = CASES[case]
    pipe = TextToVideoPipeline.from_pretrained(folder, dtype=getattr(torch, dtype), device=device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=spec["frames"], height=spec["height"], width=spec["width"],
                  num_inference_steps=spec["steps"], sampler="dpmpp-2m")
    pipe("warm-up", **kwargs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        pipe("a cat is surfing", **kwargs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total" if device == "cpu" else "self_cuda_time_total",
                                    row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=CASES, default="cpu-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library per round")
    parser.add_argument("--rounds", type=int, default=2, help="A/B alternations")
    parser.add_argument("--checkpoint", default=None, help="reuse a checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true", help="vidfusion with pipe.compile(); first call reported")
    parser.add_argument("--unet-only", action="store_true", help="UNet CFG forward: TFLOP/s (flop_counter)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker(args.worker, args.checkpoint, args.case, args.device, args.dtype, args.repeats, args.out,
               args.compile, args.unet_only)
        return
    tmp = tempfile.mkdtemp(prefix="vidfusion-bench-")
    folder = Path(args.checkpoint or os.path.join(tmp, "ckpt"))
    if not (folder / "model_index.json").exists():
        make_checkpoint(args.case, folder)
    if args.profile:
        profile(str(folder), args.case, args.device, args.dtype)
        return
    runs: dict[str, list[dict]] = {"diffusers": [], "vidfusion": []}
    for r in range(args.rounds):
        for lib in ("diffusers", "vidfusion") if r % 2 == 0 else ("vidfusion", "diffusers"):
            out = os.path.join(tmp, f"{lib}-{r}")
            cmd = [sys.executable, __file__, "--worker", lib, "--checkpoint", str(folder), "--case", args.case,
                   "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats), "--out", out]
            cmd += ["--compile"] * args.compile + ["--unet-only"] * args.unet_only
            subprocess.run(cmd, check=True)
            runs[lib].append({**json.loads(Path(out + ".json").read_text()), "frames": np.load(out + ".npy")})
    summary = {"case": args.case, "device": args.device, "dtype": args.dtype, "cpu": cpu_name()}
    for lib, results in runs.items():
        summary[lib] = {
            "median_s": statistics.median(t for r in results for t in r["times"]),
            "max_rss_gib": max(r["max_rss_gib"] for r in results),
            **({"cuda_peak_gib": max(r["cuda_peak_gib"] for r in results)} if "cuda_peak_gib" in results[0] else {}),
            **({"tflops": statistics.median(r["tflops"] for r in results), "gflop": results[0]["flops"] / 1e9}
               if "tflops" in results[0] else {}),
            **({"first_call_s": results[0]["first_call_s"]} if results[0].get("first_call_s") else {}),
        }
    summary["speedup"] = summary["diffusers"]["median_s"] / summary["vidfusion"]["median_s"]
    summary["max_abs_diff"] = float(np.abs(runs["diffusers"][0]["frames"] - runs["vidfusion"][0]["frames"]).max())
    if args.dtype != "float32" and not args.unet_only:  # half precision: PSNR of each library against float32
        out = os.path.join(tmp, "vidfusion-fp32")
        subprocess.run([sys.executable, __file__, "--worker", "vidfusion", "--checkpoint", str(folder), "--case",
                        args.case, "--device", args.device, "--dtype", "float32", "--repeats", "0", "--out", out],
                       check=True)
        reference = np.load(out + ".npy")
        for lib in runs:
            mse = float(np.mean((runs[lib][0]["frames"] - reference) ** 2))
            summary[lib]["psnr_vs_fp32_db"] = 10 * np.log10(1 / max(mse, 1e-20))
    if args.json:
        print(json.dumps(summary))
        return
    print(f"case {args.case} on {args.device} {args.dtype}   CPU: {summary['cpu']}")
    for lib in ("diffusers", "vidfusion"):
        s = summary[lib]
        mem = f"  peak CUDA {s['cuda_peak_gib']:.2f} GiB" if "cuda_peak_gib" in s else ""
        rss = f"   max RSS {s['max_rss_gib']:.2f} GiB" if "max_rss_gib" in s else ""
        flops = f"  {s['gflop']:.0f} GFLOP  {s['tflops']:.1f} TFLOP/s" if "tflops" in s else ""
        first = f"  first call {s['first_call_s']:.1f} s" if "first_call_s" in s else ""
        first += f"  PSNR vs fp32 {s['psnr_vs_fp32_db']:.1f} dB" if "psnr_vs_fp32_db" in s else ""
        print(f"  {lib:10s} median {s['median_s']:.3f} s{rss}{mem}{flops}{first}")
    print(f"  speedup {summary['speedup']:.2f}x   max |frame diff| {summary['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
