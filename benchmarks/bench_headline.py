"""Issue 23's headline figures, prompt to file, at the real shapes (random weights in the published layout):

    python benchmarks/bench_headline.py            # 16x256x256, bfloat16, this machine's cores

1. a 4-step T2V-Turbo clip decoded by the tiny decoder (TAESD), after merging T2V-Turbo's LoRA (timed apart);
2. the 25-step dpmpp-2m clip with CFG and DeepCache (interval 3, branch 0), VAE decode;
   `--no-cache` adds the same clip without caching (~12 minutes on 2 cores).
Each from the call to the written mp4; model loading is not counted. No warm-up call: the first call's
one-time costs (oneDNN kernels) are in the figures, as a user sees them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def clip(pipe, out: Path, **kwargs) -> float:
    from vidfusion.media.video_io import export_to_video

    start = time.perf_counter()
    frames = pipe("a cat is surfing", generator=torch.Generator().manual_seed(0), num_frames=16, height=256,
                  width=256, **kwargs).frames[0]
    export_to_video(frames, out, fps=8)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-cache", action="store_true", help="also the 25-step clip without caching")
    args = parser.parse_args()

    from bench import cpu_name
    from bench_adapters import make_turbo_lora
    from diffusers import AutoencoderTiny

    from vidfusion import TextToVideoPipeline
    from vidfusion.checkpoints.random_checkpoint import write_random_checkpoint

    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_checkpoint(tmp / "model", "full")
        AutoencoderTiny().save_pretrained(tmp / "taesd")  # TAESD's published shapes, random weights
        pipe = TextToVideoPipeline.from_pretrained(tmp / "model", dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_tiny_decoder(tmp / "taesd")
        lora = make_turbo_lora(pipe, tmp / "unet_lora.pt")
        start = time.perf_counter()
        pipe.load_lora_weights(lora, adapter_name="t2v-turbo")
        merge = time.perf_counter() - start
        turbo = clip(pipe, tmp / "turbo.mp4", sampler="t2v-turbo", decoder="tiny")
        pipe.unload_lora_weights()
        cached = clip(pipe, tmp / "cached.mp4", sampler="dpmpp-2m", num_inference_steps=25, guidance_scale=9.0,
                      cache="deepcache", cache_interval=3)
        plain = clip(pipe, tmp / "plain.mp4", sampler="dpmpp-2m", num_inference_steps=25,
                     guidance_scale=9.0) if args.no_cache else None
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, 16x256x256 bfloat16")
    print(f"T2V-Turbo LoRA read + merge                  {merge:7.1f} s")
    print(f"4-step t2v-turbo clip, tiny decoder, to mp4   {turbo:7.1f} s")
    print(f"25-step dpmpp-2m CFG, DeepCache 3, to mp4    {cached:7.1f} s")
    if plain is not None:
        print(f"25-step dpmpp-2m CFG, no cache, to mp4       {plain:7.1f} s  (x{plain / cached:.2f} with DeepCache)")


if __name__ == "__main__":
    main()
