"""The one default of where and in what precision models run, for every entry point (CLI, service, batch workers,
training): cuda when available else cpu; float16 on cuda, float32 elsewhere, unless a dtype is named."""

from __future__ import annotations

import torch


def resolve_device(device: str | None = None) -> str:
    """`device` checked (e.g. cpu, cuda, cuda:1), or cuda when available, else cpu."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a valid device (e.g. cpu, cuda, cuda:1)") from None
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device (torch {torch.__version__}); install the "
                         "CUDA build of torch, or leave --device out to run on the CPU")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; leave --device out to run on the CPU")
    return device


def device_and_dtype(device: str | None = None, dtype_name: str | None = None) -> tuple[str, torch.dtype]:
    """(device, dtype): the named dtype ("float32", "float16", "bfloat16"), else float16 on cuda, float32 elsewhere."""
    device = resolve_device(device)
    if dtype_name:
        return device, getattr(torch, dtype_name)
    return device, torch.float16 if torch.device(device).type == "cuda" else torch.float32
