"""LoRA training on synthetic clips (a moving square): the loss falls, the LoRA loads here and in diffusers + peft
with the same video, --resume after a kill equals the uninterrupted run, bad data gives clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vidfusion import TextToVideoPipeline, export_to_video
from vidfusion.training.train import TrainDataError, find_clips, train_lora

from .test_parity import assert_latents_close

SIZE = dict(frames=8, height=32, width=32, rank=4, lr=1e-3, progress=False)


def moving_square(path: Path, frames=16, shift=0, colour=(1.0, 0.2, 0.0)):
    video = np.zeros((frames, 64, 64, 3), np.float32)
    for f in range(frames):
        x = 4 + 2 * f + shift
        video[f, 20:36, x:x + 16] = colour
    export_to_video(video, path, fps=8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    for k in range(2):
        moving_square(folder / f"clip{k}.mp4", shift=8 * k)
        (folder / f"clip{k}.txt").write_text(f"a red square sliding right, take {k}")
    return folder


def test_loss_falls_and_the_lora_loads_in_vidfusion_and_diffusers(tiny_checkpoint, clips, tmp_path):
    out = tmp_path / "out"
    path = train_lora(clips, out, model=str(tiny_checkpoint), target="all", steps=60, cache_latents=True,
                      checkpoint_every=30, **SIZE)
    assert path == out / "pytorch_lora_weights.safetensors"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61)) and all(r["lr"] == 1e-3 and r["seconds"] > 0 for r in log)
    first, last = np.mean([r["loss"] for r in log[:15]]), np.mean([r["loss"] for r in log[-15:]])
    assert last < 0.9 * first, (first, last)
    state = load_file(path)
    assert any(k.startswith("unet.down_blocks.0.temp_attentions.0.") and k.endswith(".lora_A.weight") for k in state)
    assert any(k.startswith("unet.down_blocks.0.attentions.0.") for k in state)
    assert any(".resnets.0.conv1.lora_A.weight" in k for k in state)
    assert all(state[k].item() == 4.0 for k in state if k.endswith(".alpha"))
    assert (out / "checkpoint-30").is_dir() and (out / "checkpoint-60").is_dir()
    from vidfusion.media.fileio import current_umask

    mask = current_umask()  # the umask's permissions, not mkstemp's / save_file's owner-only 0600
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
    assert os.stat(out / "checkpoint-30").st_mode & 0o777 == 0o777 & ~mask
    assert all(os.stat(p).st_mode & 0o777 == 0o666 & ~mask for p in (out / "checkpoint-30").iterdir())

    ours = TextToVideoPipeline.from_pretrained(tiny_checkpoint)
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red square sliding right", num_frames=4, height=32, width=32, num_inference_steps=3,
                  output_type="latent")
    base = ours(generator=torch.Generator().manual_seed(0), sampler="ddim", **kwargs).frames
    ours.load_lora_weights(path)
    tuned = ours(generator=torch.Generator().manual_seed(0), sampler="ddim", **kwargs).frames
    assert (tuned - base).abs().max() > 1e-3 * base.abs().max()  # the LoRA changes the video

    # the same file through peft on diffusers' UNet3DConditionModel
    from diffusers import DDIMScheduler, TextToVideoSDPipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from vidfusion.training.train import TARGETS

    reference = TextToVideoSDPipeline.from_pretrained(str(tiny_checkpoint))
    reference.set_progress_bar_config(disable=True)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS["all"]), reference.unet)
    set_peft_model_state_dict(reference.unet, {k[5:]: v for k, v in state.items() if not k.endswith(".alpha")})
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    expected = reference(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert_latents_close(expected, tuned)


def test_resume_after_kill_equals_the_uninterrupted_run(tiny_checkpoint, clips, tmp_path):
    common = dict(model=str(tiny_checkpoint), target="temporal", steps=24, checkpoint_every=4, seed=3,
                  offset_noise=0.1, debias=True)
    straight = train_lora(clips, tmp_path / "straight", **common, **SIZE)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "vidfusion", "train-lora", str(clips), "--out", str(out), "--model",
            str(tiny_checkpoint), "--target", "temporal", "--steps", "24", "--checkpoint-every", "4", "--seed", "3",
            "--offset-noise", "0.1", "--debias", "--frames", "8", "--height", "32", "--width", "32", "--rank", "4",
            "--lr", "1e-3", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoint-8").is_dir():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-8").is_dir() and not (out / "pytorch_lora_weights.safetensors").exists()
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    resumed_at = time.time()
    result = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    a, b = load_file(straight), load_file(out / "pytorch_lora_weights.safetensors")
    # bit for bit: catches a resume that loads the adapter but not the optimizer state (or vice versa)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run starts at the checkpoint's step (catches one that ignores the checkpoint and retrains from
    # step 0: its weights are the same, every draw depending on (seed, step)), and each step is logged once
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25))
    assert all((r["time"] < resumed_at) == (r["step"] <= newest) for r in log), (newest, log)


def test_resume_with_other_options_and_fresh_run_into_an_earlier_one_are_refused(tiny_checkpoint, clips, tmp_path):
    """Catches --resume silently continuing with another rank / lr / target / data, and a fresh run that appends to
    the old log and mixes its checkpoints with the earlier run's."""
    out = tmp_path / "out"
    common = dict(model=str(tiny_checkpoint), target="temporal", steps=2, checkpoint_every=2, **SIZE)
    train_lora(clips, out, **common)
    for change, names in ((dict(rank=8), "rank=4.*rank=8"), (dict(lr=5e-4), "lr=0.001.*lr=0.0005"),
                          (dict(target="spatial"), "target='temporal'.*target='spatial'")):
        with pytest.raises(ValueError, match=names):
            train_lora(clips, out, **{**common, **change, "steps": 4, "resume": True})
    other = tmp_path / "other-clips"
    other.mkdir()
    moving_square(other / "c.mp4")
    (other / "c.txt").write_text("a square")
    with pytest.raises(ValueError, match="data="):
        train_lora(other, out, **{**common, "steps": 4, "resume": True})
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_lora(clips, out, **common)
    train_lora(clips, out, **{**common, "steps": 4, "resume": True})  # the same options continue
    log = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    train_lora(clips, out, **{**common, "steps": 1, "checkpoint_every": 1, "overwrite": True})
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # the earlier run's are gone
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1]


def test_mixed_precision_holds_the_frozen_models_in_half(tiny_checkpoint, clips, tmp_path, monkeypatch):
    """Catches --mixed-precision leaving the frozen UNet in float32 (README's memory figures describe a half UNet):
    every frozen weight is bfloat16, every LoRA weight float32, and the step trains."""
    import vidfusion.training.train as train

    seen = {}
    original = train._optimizer

    def capture(params, opts, device):
        from vidfusion.pipelines.text_to_video import TextToVideoPipeline  # noqa: F401  (the models are built by now)

        seen["params"] = params
        return original(params, opts, device)

    monkeypatch.setattr(train, "_optimizer", capture)
    captured_unet = {}
    original_inject = __import__("peft").inject_adapter_in_model

    def inject(config, model, *args, **kwargs):
        captured_unet["unet"] = model
        return original_inject(config, model, *args, **kwargs)

    monkeypatch.setattr("peft.inject_adapter_in_model", inject)
    train_lora(clips, tmp_path / "out", model=str(tiny_checkpoint), target="all", steps=2, mixed_precision="bf16",
               **SIZE)
    unet = captured_unet["unet"]
    frozen = {n: p.dtype for n, p in unet.named_parameters() if "lora_" not in n}
    lora = {n: p.dtype for n, p in unet.named_parameters() if "lora_" in n}
    assert frozen and set(frozen.values()) == {torch.bfloat16}, {n: d for n, d in frozen.items() if d != torch.bfloat16}
    assert lora and set(lora.values()) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in seen["params"])
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log)


def test_bad_data_errors(tiny_checkpoint, clips, tmp_path):
    folder = tmp_path / "no-caption"
    folder.mkdir()
    moving_square(folder / "a.mp4")
    with pytest.raises(TrainDataError, match=r"no caption for a.mp4.*a.txt"):
        find_clips(folder)
    (folder / "a.txt").write_text("x")
    (folder / "b.mp4").write_bytes(b"not a video")
    (folder / "b.txt").write_text("y")
    with pytest.raises(TrainDataError, match="cannot read video .*b.mp4"):
        train_lora(folder, tmp_path / "o1", model=str(tiny_checkpoint), steps=1, **SIZE)
    with pytest.raises(TrainDataError, match="pass its caption with --prompt"):
        find_clips(folder / "a.mp4")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    moving_square(mixed / "long.mp4", frames=16)
    moving_square(mixed / "short.mp4", frames=3)
    for name in ("long", "short"):
        (mixed / f"{name}.txt").write_text(name)
    with pytest.raises(TrainDataError, match=r"short.mp4' is too short: 8 frames at 8 fps"):
        train_lora(mixed, tmp_path / "o2", model=str(tiny_checkpoint), steps=1, **SIZE)
    with pytest.warns(UserWarning, match="training on 3 frames"):  # every clip short: fewer frames, with a warning
        train_lora(mixed / "short.mp4", tmp_path / "o3", model=str(tiny_checkpoint), steps=1, prompt="short",
                   **SIZE)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"video": str(clips / "clip0.mp4")}) + "\n")
    with pytest.raises(TrainDataError, match="row 1: needs 'video' and 'prompt'"):
        find_clips(manifest)
    result = subprocess.run([sys.executable, "-m", "vidfusion", "train-lora", str(tmp_path / "nope"), "--out",
                             str(tmp_path / "o4")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_gpu_layout_group_norm_trains(monkeypatch):
    """The layout-keeping GroupNorm (the GPU path) must support autograd: train-lora runs through it on CUDA."""
    from torch import nn

    from vidfusion.models import layers

    monkeypatch.setattr(layers, "keeps_channels_last", lambda device: False)
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(2, 3, 5, 5, 16, requires_grad=True)
    y = layers.group_norm_cl(norm, x, batch_dims=1)
    reference = nn.functional.group_norm(x.detach().permute(0, 4, 1, 2, 3), 4, norm.weight, norm.bias)
    assert torch.allclose(y, reference.permute(0, 2, 3, 4, 1), atol=1e-5)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_temporal_conv_dropout_in_training_matches_diffusers(reference, ours):
    """Catches the temporal convolutions skipping their Dropout(0.1) in train mode: with the same seed the UNet's
    training forward equals diffusers' (which applies it), and eval mode has no dropout."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    t = torch.tensor([500])
    text = torch.randn(1, 77, 32, generator=g)
    try:
        reference.unet.train()
        ours.unet.train()
        with torch.no_grad():
            torch.manual_seed(0)
            expected = reference.unet(x, t, text).sample
            torch.manual_seed(0)
            got = ours.unet(x, t, text)
            torch.manual_seed(1)
            other_mask = ours.unet(x, t, text)
    finally:
        reference.unet.eval()
        ours.unet.eval()
    assert_latents_close(expected, got)
    with torch.no_grad():
        evaluated = ours.unet(x, t, text)
    assert (evaluated - got).abs().max() > 1e-3 * got.abs().max()  # dropout really acted in training
    assert (other_mask - got).abs().max() > 1e-3 * got.abs().max()
