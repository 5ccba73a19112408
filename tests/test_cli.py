"""The CLI end to end, as a subprocess."""

from __future__ import annotations

import subprocess
import sys

import av
import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vidfusion.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_generate_writes_the_video_and_prints_its_path(tiny_checkpoint, tmp_path):
    result = run("generate", "a cat is surfing", "--model", str(tiny_checkpoint), "--frames", "5", "--height", "40",
                 "--width", "56", "--steps", "3", "--seed", "1", "--fps", "12", "--sampler", "dpmpp-2m",
                 "--negative-prompt", "blurry", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "a-cat-is-surfing.mp4"
    assert result.stdout.strip().endswith("a-cat-is-surfing.mp4") and path.exists()
    assert "100%" in result.stderr  # the progress bar
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(s))
        assert len(frames) == 5 and (s.width, s.height) == (56, 40) and float(s.average_rate) == 12


def test_same_seed_same_video(tiny_checkpoint, tmp_path):
    outs = []
    for name in ("a.gif", "b.gif"):
        result = run("generate", "a dog", "--model", str(tiny_checkpoint), "--frames", "2", "--steps", "2",
                     "--seed", "3", "--out", str(tmp_path / name), "--quiet")
        assert result.returncode == 0, result.stderr
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]


def test_init_random_writes_a_loadable_checkpoint(tmp_path):
    result = run("init-random", str(tmp_path / "ck"), "--fp16-variant")
    assert result.returncode == 0, result.stderr
    for sub in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json", "text_encoder/model.safetensors",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (tmp_path / "ck" / sub).exists(), sub
    result = run("generate", "a cat", "--model", str(tmp_path / "ck"), "--variant", "fp16", "--frames", "2",
                 "--steps", "2", "--out", str(tmp_path / "v.mp4"), "--quiet")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "/does/not/exist"], "does not exist"),
    (["--sampler", "nope"], "invalid choice: 'nope'"),
    (["--height", "30"], "multiples of 8"),
    (["--frames", "0"], "--frames must be at least 1"),
    (["--out", "video.avi"], "--out must end in one of"),
    (["--out", "/no/such/dir/v.mp4"], "does not exist"),
    (["--offload", "model"], "needs an accelerator"),
    (["--steps", "many"], "invalid int value"),
])
def test_bad_arguments_one_line_exit_2_no_output(tiny_checkpoint, tmp_path, args, message):
    full = ["generate", "a cat", "--model", str(tiny_checkpoint), "--frames", "2", "--steps", "2", "--quiet"]
    result = run(*full, *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vidfusion: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing written
