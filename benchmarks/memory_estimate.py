"""Peak accelerator memory of vidfusion's full-size models, estimated without a GPU.

    python benchmarks/memory_estimate.py                          # 576x320x24, 256x256x16, 64 frames with offload
    python benchmarks/memory_estimate.py --frames 24 --height 320 --width 576 --dtype bfloat16

The full text-to-video-ms-1.7b architecture is built on the `meta` device (no weights, no arithmetic) and each
stage of a generation runs through a dispatch mode that follows every tensor storage from the op that creates it
until it is freed, the way CUDA's caching allocator counts `max_memory_allocated`. Stages: text encoder (cond +
uncond), one UNet CFG forward, VAE decode (8-frame chunks, 1 with slicing). The code paths are the GPU ones
(layout-keeping GroupNorm, SDPA). Not counted: cuDNN/cuBLAS workspaces and allocator rounding; attention is
counted as a fused kernel does it (output only, no L x L matrix). A measurement on the GPU supersedes this.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vidfusion.models.config import FULL_TEXT_ENCODER, FULL_UNET, FULL_VAE
from vidfusion.models.layers import fuse_upsample_convs
from vidfusion.models.unet3d import UNet3D
from vidfusion.models.vae import AutoencoderKL

GIB = 2**30


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode that are alive at once: current and peak."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing = existing  # storages allocated before (weights): views of them cost nothing
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.live and storage._cdata not in self.existing:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def fused_attention(q, k, v, *args, **kwargs):
    # what a fused kernel allocates: the output, laid out (N, L, heads, d) and returned as (N, heads, L, d)
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))


def stage_peak(model: torch.nn.Module, fn) -> int:
    existing = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}
    with torch.no_grad(), PeakMemory(existing) as tracker:
        result = fn()
    del result
    return tracker.peak


def build(dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet3D(FULL_UNET).to(dtype)
        vae = AutoencoderKL(FULL_VAE).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(**FULL_TEXT_ENCODER, attn_implementation="sdpa")).to(dtype)
    fuse_upsample_convs(unet)
    fuse_upsample_convs(vae)
    return unet.eval(), vae.eval(), text.eval()


def estimate(frames: int, height: int, width: int, dtype: torch.dtype, slicing: bool = False,
             window: int | None = None) -> dict[str, float]:
    """GiB per item; `window`: frames per UNet call (the windowed long-video pipeline), default all frames."""
    unet, vae, text = build(dtype)
    h, w = height // 8, width // 8
    meta = dict(device="meta", dtype=dtype)
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention
    try:
        vae.use_slicing = slicing
        peaks = {
            "text encoder": stage_peak(text, lambda: text(torch.zeros(2, 77, dtype=torch.long, device="meta"))[0]),
            "unet (CFG forward)": stage_peak(unet, lambda: unet(torch.empty(2, 4, window or frames, h, w, **meta),
                                                          torch.tensor(999.0, device="meta"),
                                                          torch.empty(2, 77, 1024, **meta))),
            "vae decode": stage_peak(vae, lambda: vae.decode(torch.empty(frames, 4, h, w, **meta))),
        }
    finally:
        F.scaled_dot_product_attention = original
    weights = {"text encoder": weight_bytes(text), "unet (CFG forward)": weight_bytes(unet),
               "vae decode": weight_bytes(vae)}
    # sampler state (float32 latents, model output, history, window fusion) and decoded frames (+ float32 copy)
    state = 8 * 4 * frames * h * w * 4 + 2 * 77 * 1024 * 2 + frames * 3 * height * width * (dtype.itemsize + 4)
    resident = sum(weights.values())
    result = {f"weights {k.split(' ')[0]}": v / GIB for k, v in weights.items()}
    result.update({f"activations {k}": v / GIB for k, v in peaks.items()})
    result["peak, all models resident"] = (resident + state + max(peaks.values())) / GIB
    result["peak, model offload (one model at a time)"] = max(weights[k] + peaks[k] for k in peaks) / GIB + state / GIB
    return result


def estimate_training(frames: int, height: int, width: int, dtype: torch.dtype, target: str, rank: int,
                      checkpointing: bool) -> dict[str, float]:
    """`vidfusion train-lora` on the GPU: frozen UNet in `dtype`, peft LoRA weights, their gradients and AdamW
    state in float32, one training step (forward + backward, batch 1) with latents cached (the VAE and text
    encoder are not resident during the loop)."""
    from peft import LoraConfig, inject_adapter_in_model

    from vidfusion.training.train import TARGETS

    with torch.device("meta"):
        unet = UNet3D(FULL_UNET).to(dtype)
    fuse_upsample_convs(unet)
    unet = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS[target]), unet)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    unet.gradient_checkpointing = checkpointing
    lora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    h, w = height // 8, width // 8
    meta = dict(device="meta", dtype=dtype)
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention
    existing = {t.untyped_storage()._cdata for t in list(unet.parameters()) + list(unet.buffers())}
    try:
        with PeakMemory(existing) as tracker, torch.autocast("cuda", dtype=dtype, enabled=False):
            out = unet(torch.empty(1, 4, frames, h, w, **meta), torch.tensor([500], device="meta"),
                       torch.empty(1, 77, 1024, **meta))
            out.float().square().mean().backward()
            del out
    finally:
        F.scaled_dot_product_attention = original
    frozen = sum(p.nbytes for p in unet.parameters() if not p.requires_grad)
    lora_state = lora * 4 * 4  # float32 weights, gradients, Adam's two moments
    return {"LoRA parameters (millions)": lora / 1e6 * GIB / GIB, "frozen UNet weights": frozen / GIB,
            "LoRA weights + grads + AdamW": lora_state / GIB, "activations (forward + backward)": tracker.peak / GIB,
            "peak": (frozen + lora_state + tracker.peak) / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--slicing", action="store_true", help="VAE decodes one frame at a time")
    parser.add_argument("--window", type=int, help="frames per UNet call (long videos)")
    parser.add_argument("--train", choices=["spatial", "temporal", "all"], help="a LoRA training step instead")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.train:
        frames, height, width = args.frames or 16, args.height, args.width
        print(f"train-lora --target {args.train} --rank {args.rank}: {frames} frames {width}x{height} {args.dtype}"
              + (" + gradient checkpointing" if args.gradient_checkpointing else ""))
        for name, value in estimate_training(frames, height, width, dtype, args.train, args.rank,
                                             args.gradient_checkpointing).items():
            print(f"  {name:44s} {value:6.2f}" + ("" if "millions" in name else " GiB"))
        return
    if args.frames:
        cases = [(args.frames, args.height, args.width, args.slicing, args.window)]
    else:  # issue 4's GPU cases; TextToVideoPipeline runs 64 frames as windows of 16 through the UNet
        cases = [(24, 320, 576, False, None), (16, 256, 256, False, None), (64, 256, 256, True, 16)]
    for frames, height, width, slicing, window in cases:
        extra = (" + VAE slicing" if slicing else "") + (f", UNet windows of {window} frames" if window else "")
        print(f"{frames} frames {width}x{height} {args.dtype}{extra}")
        for name, gib in estimate(frames, height, width, dtype, slicing, window).items():
            print(f"  {name:44s} {gib:6.2f} GiB")


if __name__ == "__main__":
    main()
