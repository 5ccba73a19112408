"""The CLI end to end, as a subprocess."""

from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vidfusion", *args], capture_output=True, text=True, cwd=cwd,
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


def test_creative_flags(tiny_checkpoint, tmp_path):
    result = run("generate", "a cat", "--model", str(tiny_checkpoint), "--frames", "6", "--steps", "2", "--seed", "1",
                 "--keyframe", "3:a dog", "--loop", "--window-size", "4", "--window-stride", "2", "--noise-prior",
                 "videofusion", "--base-noise-ratio", "0.3", "--freeu", "0.9", "0.2", "1.2", "1.4", "--num-videos",
                 "2", "--out", str(tmp_path / "clip.mp4"), "--quiet")
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["clip-1.mp4", "clip-2.mp4"]
    for path in paths:
        with av.open(path) as c:
            assert len(list(c.decode(c.streams.video[0]))) == 6


def test_init_video_and_upscale(tiny_checkpoint, tmp_path):
    src = tmp_path / "in.mp4"
    assert run("generate", "a cat", "--model", str(tiny_checkpoint), "--frames", "4", "--steps", "2", "--fps", "6",
               "--out", str(src), "--quiet").returncode == 0
    result = run("generate", "a cat, oil painting", "--model", str(tiny_checkpoint), "--init-video", str(src),
                 "--strength", "0.5", "--steps", "4", "--out", str(tmp_path / "v2v.mp4"), "--quiet")
    assert result.returncode == 0, result.stderr
    result = run("upscale", str(src), "a cat", "--model", str(tiny_checkpoint), "--width", "32", "--height", "24",
                 "--steps", "2", "--out", str(tmp_path / "up.mp4"), "--quiet")
    assert result.returncode == 0, result.stderr
    with av.open(str(tmp_path / "up.mp4")) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (32, 24) and len(list(c.decode(s))) == 4 and float(s.average_rate) == 6


@pytest.mark.parametrize("args, message", [
    (["--keyframe", "x:dog"], "FRAME:PROMPT"),
    (["--keyframe", "99:dog"], "keyframe"),
    (["--init-video", "/nonexistent.mp4"], "does not exist"),
    (["--window-size", "1", "--frames", "4"], "window_size"),
    (["--noise-prior", "videofusion", "--base-noise-ratio", "2"], "base_noise_ratio"),
])
def test_creative_flag_errors(tiny_checkpoint, tmp_path, args, message):
    result = run("generate", "a cat", "--model", str(tiny_checkpoint), "--steps", "1", "--frames", "4",
                 "--out", str(tmp_path / "x.mp4"), *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_videos_carry_their_settings_info_and_from(tiny_checkpoint, tmp_path):
    import json

    first = tmp_path / "first.mp4"
    result = run("generate", "a red fox", "--model", str(tiny_checkpoint), "--frames", "3", "--height", "32",
                 "--width", "48", "--steps", "2", "--seed", "5", "--negative-prompt", "blurry", "--fps", "6",
                 "--out", str(first), "--quiet")
    assert result.returncode == 0, result.stderr
    info = run("info", str(first), "--json")
    assert info.returncode == 0, info.stderr
    meta = json.loads(info.stdout)
    assert meta["prompt"] == "a red fox" and meta["negative_prompt"] == "blurry" and meta["seed"] == 5
    assert meta["sampler"] == "ddim" and meta["num_inference_steps"] == 2 and meta["guidance_scale"] == 9.0
    assert (meta["height"], meta["width"], meta["num_frames"], meta["fps"]) == (32, 48, 3, 6)
    assert meta["model"] == str(tiny_checkpoint) and meta["vidfusion"]
    text = run("info", str(first))
    assert "prompt: a red fox" in text.stdout and "seed: 5" in text.stdout
    again = tmp_path / "again.mp4"
    result = run("generate", "--from", str(first), "--out", str(again), "--quiet")
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == first.read_bytes()  # same settings, same frames, same bytes
    changed = tmp_path / "changed.mp4"
    result = run("generate", "--from", str(first), "--seed", "6", "--out", str(changed), "--quiet")
    assert result.returncode == 0 and json.loads(run("info", str(changed), "--json").stdout)["seed"] == 6


def test_random_seed_is_recorded(tiny_checkpoint, tmp_path):
    import json

    out = tmp_path / "r.gif"
    assert run("generate", "a dog", "--model", str(tiny_checkpoint), "--frames", "2", "--steps", "1", "--out",
               str(out), "--quiet").returncode == 0
    assert isinstance(json.loads(run("info", str(out), "--json").stdout)["seed"], int)


def test_info_and_from_errors(tmp_path):
    from vidfusion import export_to_video

    plain = export_to_video(np.zeros((2, 16, 16, 3), np.float32), tmp_path / "plain.mp4")
    assert "no generation settings" in run("info", plain).stdout
    for args, needle in [(("info", str(tmp_path / "missing.mp4")), "does not exist"),
                         (("generate", "--from", plain), "holds no vidfusion settings"),
                         (("generate",), "pass a prompt")]:
        result = run(*args)
        assert result.returncode == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_failure_while_running_exits_1_with_one_line_and_debug_traceback(tiny_checkpoint, tmp_path, monkeypatch,
                                                                        capsys):
    """Catches every RuntimeError / OSError turned into exit 2 (README keeps 2 for bad arguments): out of memory is
    a failure while running (exit 1) whose line names what to change; --debug prints the traceback. (A size that
    cannot fit at all is refused before loading: exit 2, tests/test_cli_mistakes.py.)"""
    from vidfusion.cli.main import main
    from vidfusion.pipelines.text_to_video import TextToVideoPipeline

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(TextToVideoPipeline, "__call__", out_of_memory)
    args = ["generate", "a dog", "--model", str(tiny_checkpoint), "--frames", "2", "--steps", "1", "--quiet",
            "--out", str(tmp_path / "x.mp4")]
    assert main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "out of memory" in lines[0] and "--offload model" in lines[0], lines
    assert "--vae-slicing" in lines[0]
    assert main([*args, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    huge = run("generate", "a dog", "--model", str(tiny_checkpoint), "--frames", "2", "--height", "400000",
               "--width", "400000", "--quiet", "--out", str(tmp_path / "y.mp4"))
    assert huge.returncode == 2 and "GiB available" in huge.stderr and not list(tmp_path.iterdir())


def test_default_name_never_replaces_a_file_and_the_seed_is_printed(tiny_checkpoint, tmp_path):
    """Catches ./<slug>.mp4 silently replacing the previous video of the same prompt."""
    args = ("generate", "a dog", "--model", str(tiny_checkpoint), "--frames", "2", "--steps", "1", "--quiet")
    first, second = run(*args, "--seed", "3", cwd=tmp_path), run(*args, "--seed", "4", cwd=tmp_path)
    assert first.returncode == second.returncode == 0, second.stderr
    assert first.stdout.strip() == "a-dog.mp4" and second.stdout.strip() == "a-dog-1.mp4"
    assert "seed 3" in first.stderr and "seed 4" in second.stderr
    from vidfusion.media.video_io import read_metadata

    assert read_metadata(tmp_path / "a-dog.mp4")["seed"] == 3 and read_metadata(tmp_path / "a-dog-1.mp4")["seed"] == 4
