"""The storage-lifetime tracker behind benchmarks/memory_estimate.py counts what is alive at once."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "memory_estimate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("memory_estimate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_counts_live_storages_once_and_ignores_existing_ones():
    script = load_script()
    weight = torch.empty(1000, device="meta")  # 4000 bytes that exist before: views of it are free
    with script.PeakMemory({weight.untyped_storage()._cdata}) as tracker:
        a = torch.empty(256, device="meta") + 1  # 1024 bytes; the empty and the sum: 2048 at the peak
        view = a.view(16, 16).t()  # a view: no new storage
        del view
        b = weight[:10] * 2  # 40 bytes (the temporary empty is gone by now: 1064 alive)
        del a
        c = torch.zeros(600, device="meta")  # 2400 bytes, while `a` is gone: 2440 alive, the new peak
    assert tracker.peak == 2400 + 40
    assert tracker.current == 2400 + 40
    del b, c


def test_full_model_estimate_runs_on_the_meta_device():
    result = load_script().estimate(8, 64, 64, torch.float16, slicing=True, window=8)
    assert 2.5 < result["weights unet"] < 3.0  # 1.41B parameters in fp16, plus the folded upsample kernels
    assert result["peak, model offload (one model at a time)"] < result["peak, all models resident"]
