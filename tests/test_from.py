"""Every video the CLI writes records exactly what ran, and `generate --from FILE` remakes it bit for bit, for each
kind of generation (in-process `cli.main.main`, so the cases stay fast; test_cli covers the subprocess path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vidfusion import export_to_video
from vidfusion.cli.main import main as cli_main
from vidfusion.media.video_io import read_metadata


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("from-inputs")
    frames = np.random.default_rng(0).random((4, 32, 48, 3)).astype(np.float32)
    video = export_to_video(frames, folder / "in.mp4", fps=6)
    from vidfusion import TextToVideoPipeline

    unet = TextToVideoPipeline.from_pretrained(tiny_checkpoint).unet.state_dict()
    g = torch.Generator().manual_seed(0)
    state = {}
    for key in [k for k in unet if k.endswith(("attn1.to_q.weight", "attn2.to_v.weight"))]:
        out_dim, in_dim = unet[key].shape
        module = key[: -len(".weight")]
        state[f"unet.{module}.lora_A.weight"] = torch.randn(4, in_dim, generator=g) * 0.3
        state[f"unet.{module}.lora_B.weight"] = torch.randn(out_dim, 4, generator=g) * 0.3
    save_file(state, folder / "lora.safetensors")
    return {"VIDEO": video, "LORA": str(folder / "lora.safetensors")}


SMALL = ["--steps", "2", "--height", "32", "--width", "32", "--frames", "3"]
KINDS = {
    "text-to-video": ["generate", "a red fox", "--negative-prompt", "blurry", "--sampler", "dpmpp-2m", *SMALL],
    "video-to-video": ["generate", "a red fox, oil painting", "--init-video", "VIDEO", "--strength", "0.5",
                       "--steps", "4"],
    "upscale": ["upscale", "VIDEO", "a red fox", "--width", "64", "--height", "48", "--steps", "3"],
    "long-looping": ["generate", "waves", "--frames", "12", "--window-size", "6", "--window-stride", "2", "--loop",
                     "--steps", "2", "--height", "16", "--width", "16"],
    "keyframes": ["generate", "a cat", "--keyframe", "2:a dog", *SMALL],
    "lora": ["generate", "a cat", "--lora", "LORA:0.7", "--lora-scale", "0.5", *SMALL],
    "interpolated": ["generate", "a cat", "--interpolate-fps", "24", *SMALL],
    "bfloat16": ["generate", "a cat", "--dtype", "bfloat16", "--vae-tiling", *SMALL],
}
# what each kind must record (besides prompt, seed, model): the values that ran, not the parser's defaults
EXPECTED = {
    "text-to-video": {"sampler": "dpmpp-2m", "guidance_scale": 9.0, "height": 32, "width": 32, "num_frames": 3},
    "video-to-video": {"guidance_scale": 15.0, "height": 32, "width": 48, "num_frames": 4, "strength": 0.5, "fps": 6},
    "upscale": {"guidance_scale": 15.0, "height": 48, "width": 64, "num_frames": 4, "strength": 0.6, "fps": 6},
    "long-looping": {"loop": True, "window_size": 6, "window_stride": 2, "num_frames": 12},
    "keyframes": {"keyframes": ["2:a dog"]},
    "lora": {"loras": [{"path": "LORA", "weight": 0.7}], "lora_scale": 0.5},
    "interpolated": {"fps": 8, "interpolate_fps": 24},
    "bfloat16": {"dtype": "bfloat16", "vae_tiling": True},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_from_remakes_the_same_file(kind, tiny_checkpoint, inputs, tmp_path):
    """Catches metadata that describes another video (v2v guidance 9 / the model's default size recorded, strength
    on a text-to-video file), and `--from` runs that differ from the original."""
    args = [inputs.get(a, a) for a in KINDS[kind]]
    args = [a.replace("LORA", inputs["LORA"]) if a.startswith("LORA") else a for a in args]
    first, again = tmp_path / "first.mp4", tmp_path / "again.mp4"
    assert cli_main([*args, "--model", str(tiny_checkpoint), "--seed", "5", "--out", str(first), "--quiet"]) == 0
    meta = read_metadata(first)
    expected = {k: (inputs["LORA"] if v == "LORA" else v) for k, v in EXPECTED[kind].items()}
    if kind == "lora":
        expected = {"loras": [{"path": inputs["LORA"], "weight": 0.7}], "lora_scale": 0.5}
    assert {k: meta.get(k) for k in expected} == expected, meta
    assert meta["seed"] == 5 and meta["model"] == str(tiny_checkpoint)
    assert ("strength" in meta) == (kind in ("video-to-video", "upscale"))  # only what applies
    assert not {"base_noise_ratio", "free_init_filter", "free_init_iterations", "noise_prior"} & set(meta)
    trust = ["--trust-sources"] if kind in ("video-to-video", "upscale") else []  # the file names an input video
    assert cli_main(["generate", "--from", str(first), *trust, "--out", str(again), "--quiet"]) == 0
    assert again.read_bytes() == first.read_bytes()


# (first run's flags, the override that equals the parser's default or switches a stored option off, what the remake
# must record): a `--from` that decides "given" by comparing with defaults keeps the stored value in every row
OVERRIDES = {
    "frames": (["--frames", "3"], ["--frames", "16"], {"num_frames": 16}),
    "eta": (["--sampler", "ddim", "--eta", "0.5"], ["--eta", "0"], {"eta": None}),
    "prompt-syntax": (["--prompt-syntax", "none"], ["--prompt-syntax", "a1111"], {"prompt_syntax": None}),
    "cache-interval": (["--cache", "deepcache", "--cache-interval", "2"], ["--cache-interval", "3"],
                       {"cache": "deepcache", "cache_interval": 3}),
    "strength": (["--init-video", "VIDEO", "--strength", "0.4"], ["--strength", "0.6"], {"strength": 0.6}),
    "loop": (["--frames", "6", "--window-size", "4", "--window-stride", "2", "--loop"], ["--no-loop"],
             {"loop": None, "window_size": 4}),
    "lora": (["--lora", "LORA:0.7", "--lora-scale", "0.5"], ["--no-lora"], {"loras": None, "lora_scale": None}),
    "dtype": (["--dtype", "bfloat16"], ["--dtype", "float32"], {"dtype": "float32"}),
}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_a_flag_always_overrides_the_file(case, tiny_checkpoint, inputs, tmp_path):
    """Catches `--from` deciding "was it given" by comparing with the parser's defaults (a stored value winning over
    `--frames 16`, `--eta 0`, ...) and stored switches (loop, LoRAs) that cannot be turned off."""
    first_flags, override, expected = OVERRIDES[case]
    fill = {"VIDEO": inputs["VIDEO"], "LORA:0.7": inputs["LORA"] + ":0.7"}
    first_flags = [fill.get(a, a) for a in first_flags]
    size = [] if case in ("strength", "frames", "loop") else ["--frames", "3"]
    first, again = tmp_path / "first.mp4", tmp_path / "again.mp4"
    assert cli_main(["generate", "a cat", "--model", str(tiny_checkpoint), "--steps", "2", "--height", "16",
                     "--width", "16", *size, *first_flags, "--seed", "1", "--out", str(first), "--quiet"]) == 0
    assert cli_main(["generate", "--from", str(first), *override, "--trust-sources", "--out", str(again),
                     "--quiet"]) == 0
    meta = read_metadata(again)
    assert {k: meta.get(k) for k in expected} == expected, meta
    assert meta["seed"] == 1 and meta["prompt"] == "a cat"  # the rest still comes from the file


def test_from_asks_before_it_reads_what_a_strangers_file_names(tiny_checkpoint, inputs, tmp_path, capsys):
    """Catches `--from` silently reading an input file (or fetching a hub repo) that a received video names: it
    prints what it will load, and without --trust-sources (no terminal to ask) refuses with one line naming it."""
    first, again = tmp_path / "first.mp4", tmp_path / "again.mp4"
    assert cli_main(["generate", "a fox", "--init-video", inputs["VIDEO"], "--steps", "2", "--model",
                     str(tiny_checkpoint), "--seed", "1", "--out", str(first), "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["generate", "--from", str(first), "--out", str(again), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"input {inputs['VIDEO']}" in err[0] and "--trust-sources" in err[-1] and not again.exists()
    assert cli_main(["generate", "--from", str(first), "--trust-sources", "--out", str(again), "--quiet"]) == 0


def test_info_escapes_control_characters(tmp_path, capsys):
    """Catches a stored prompt whose escape sequences would drive the reader's terminal."""
    path = export_to_video(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "x.mp4",
                           metadata={"vidfusion": "0.1.0", "prompt": "a cat\x1b[2J\nrm -rf"})
    assert cli_main(["info", path]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "\x1b" not in out and "\\x1b[2J" in out and len(lines) == 2 and "rm -rf" in lines[0]  # one line a key


def test_from_names_lora_paths_as_the_command_line_reads_them(capsys):
    """The list --from prints splits a LoRA's weight off as --lora does (one shared reader): catches a split on the
    last ':' that shows `/data/a` for a stored `/data/a:b/motion.safetensors` (a weightless path with a colon)."""
    import argparse

    from vidfusion.cli.from_video import check_sources

    args = argparse.Namespace(model=None, lora=["/data/a:b/motion.safetensors", "/data/style.pt:0.5"],
                              decoder="vae", from_file="in.mp4", trust_sources=False)
    check_sources(args, {"lora"})
    line = capsys.readouterr().err.strip()
    assert line == "vidfusion: --from in.mp4 loads: LoRA /data/a:b/motion.safetensors, LoRA /data/style.pt", line


def test_from_counts_a_model_as_cached_only_at_the_recorded_revision(tmp_path, monkeypatch, capsys):
    """Catches the cache check that looked at `main` only: a file recording revision v2 of a repo whose main alone
    is cached would download v2 without asking. Cached at main: loads as today; v2: needs --trust-sources."""
    import argparse

    import huggingface_hub.constants

    from vidfusion.cli.from_video import check_sources

    repo = tmp_path / "hub" / "models--someorg--t2v"
    commit = "a" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def args(revision):
        return argparse.Namespace(model="someorg/t2v", revision=revision, lora=[], decoder="vae",
                                  from_file="in.mp4", trust_sources=False)

    check_sources(args(None), {"model", "revision"})  # cached at main: no question
    with pytest.raises(ValueError, match="someorg/t2v.*--trust-sources"):
        check_sources(args("v2"), {"model", "revision"})
