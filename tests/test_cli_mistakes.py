"""A newcomer's mistakes, as a subprocess each: every one is one line naming the problem and exit 2, before
anything loads or is written; `--help` and `--version` answer without importing torch."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest

from vidfusion import export_to_video


def run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "vidfusion", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistakes")
    (folder / "notes.txt").write_text("not a picture")
    from PIL import Image

    Image.new("RGB", (32, 32)).save(folder / "pic.png")
    export_to_video(np.zeros((4, 32, 32, 3), np.uint8), folder / "in.mp4", fps=8)
    (folder / "weights.safetensors").write_bytes(b"x")
    return folder


# (arguments, words the one line must hold); MODEL / FILES are filled in
MISTAKES = {
    "image-not-a-picture": (["generate", "a cat", "--model", "MODEL", "--image", "FILES/notes.txt"], "not a picture"),
    "image-missing": (["generate", "a cat", "--model", "MODEL", "--image", "FILES/nope.png"], "does not exist"),
    "device-cuda-without-cuda": (["generate", "a cat", "--model", "MODEL", "--device", "cuda"], "no CUDA"),
    "model-is-a-file": (["generate", "a cat", "--model", "FILES/weights.safetensors"], "is a file"),
    "tiny-decoder-missing": (["generate", "a cat", "--model", "MODEL", "--decoder", "tiny:FILES/taesd.pth"],
                             "does not exist"),
    "strength-without-init-video": (["generate", "a cat", "--model", "MODEL", "--strength", "0.5"], "--init-video"),
    "image-with-init-video": (["generate", "a cat", "--model", "MODEL", "--init-video", "FILES/in.mp4", "--image",
                               "FILES/pic.png"], "--image"),
    "frames-beyond-the-init-video": (["generate", "a cat", "--model", "MODEL", "--init-video", "FILES/in.mp4",
                                      "--frames", "9"], "has 4 frames"),
    "picture-as-init-video": (["generate", "a cat", "--model", "MODEL", "--init-video", "FILES/pic.png"],
                              "not a video"),
    "busy-port": (["serve", "--model", "MODEL", "--port", "PORT"], "another program"),
    "unknown-flag": (["generate", "a cat", "--colour", "3"], "unrecognized"),
    "bad-number": (["generate", "a cat", "--frames", "x"], "invalid int"),
    "train-lora-missing-data": (["train-lora", "FILES/nothing", "--out", "FILES/lora-out"], "nothing"),
    "impossible-size": (["generate", "a cat", "--model", "MODEL", "--frames", "100000"], "GiB available"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_every_mistake_is_one_line_and_exit_2(case, tiny_checkpoint, files, tmp_path):
    """Catches raw tracebacks (UnidentifiedImageError, AssertionError), uvicorn's exit 3, misleading messages
    ("folder does not exist" for a file), flags dropped in silence, and a failed command's leftovers."""
    args, words = MISTAKES[case]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        filled = [a.replace("MODEL", str(tiny_checkpoint)).replace("FILES", str(files)).replace("PORT", str(port))
                  for a in args]
        result = run(*filled, cwd=tmp_path)
    finally:
        listener.close()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("vidfusion: error:") and words in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == [] and not (files / "lora-out").exists()  # nothing written


def test_frames_with_init_video_takes_its_first_frames(tiny_checkpoint, files, tmp_path):
    """Catches --frames dropped with --init-video (the whole input was restyled): the output has the asked frames."""
    import av

    out = tmp_path / "v.mp4"
    result = run("generate", "a cat", "--model", str(tiny_checkpoint), "--init-video", str(files / "in.mp4"),
                 "--frames", "2", "--steps", "2", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as c:
        assert len(list(c.decode(c.streams.video[0]))) == 2


def test_help_and_version_load_no_torch():
    """Catches heavy imports at module level (`vidfusion --help` took seconds): the parser is torch-free."""
    code = ("import sys\nfrom vidfusion.cli.main import main\nfor argv in (['--help'], ['generate', '--help'], "
            "['--version'], ['generate', '--frames', 'x']):\n    try:\n        main(argv)\n    except SystemExit:\n"
            "        pass\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout + result.stderr
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("vidfusion ")


def test_a_missing_optional_package_names_its_extra(tmp_path, files):
    """Catches a raw ModuleNotFoundError (exit 1) when peft is not installed: one line naming the extra, exit 2."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "peft.py").write_text("raise ModuleNotFoundError(\"No module named 'peft'\", name='peft')\n")
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    clips = tmp_path / "clips"
    clips.mkdir()
    export_to_video(np.zeros((4, 32, 32, 3), np.uint8), clips / "a.mp4", fps=8)
    (clips / "a.txt").write_text("a clip")
    result = run("train-lora", str(clips), "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 2, result.stderr
    assert "pip install 'vidfusion[train]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_offline_fails_in_seconds_with_one_line(tmp_path):
    """Catches ~11 retry lines over ~28 s and a `huggingface-cli download` hint (gone from today's huggingface_hub):
    no network is found once, the line names `hf download` and HF_HUB_OFFLINE=1."""
    import os
    import time

    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    result = run("generate", "a cat", cwd=tmp_path, env=env)
    assert time.monotonic() - started < 15
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf download damo-vilab/text-to-video-ms-1.7b" in lines[0], result.stderr
    assert "HF_HUB_OFFLINE=1" in lines[0]


def test_quiet_by_default_and_everything_with_debug(tiny_checkpoint, tmp_path):
    """Catches raw Python warnings (file paths, source lines) and transformers' token-length warning on a long
    prompt: every line on stderr is a `vidfusion:` line (one per note, said once); --debug shows the warnings."""
    long_prompt = " ".join(["a cat on a red boat"] * 20)  # over 77 tokens: chunked, not truncated
    args = ["generate", long_prompt, "--model", str(tiny_checkpoint), "--variant", "fp16", "--frames", "2",
            "--steps", "2", "--height", "32", "--width", "32", "--quiet"]
    result = run(*args, "--out", str(tmp_path / "a.mp4"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("vidfusion:") for line in lines), result.stderr
    assert sum("variant" in line for line in lines) == 3 and len(set(lines)) == len(lines)
    loud = run(*args, "--debug", "--out", str(tmp_path / "b.mp4"))
    assert loud.returncode == 0 and "UserWarning" in loud.stderr
