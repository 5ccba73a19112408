"""Every example of the docs (docs/*.md) runs: Python blocks and `vidfusion ...` shell blocks execute, page by page in
one folder, in order. One rule swaps what a test machine lacks: the published model ids become the tiny random
checkpoint (also for a command that names no model), a GPU becomes the CPU and float16 float32, and the tiny
checkpoint runs at most 4 steps; SERVER_URL / TOKEN name a running test server, a `vidfusion serve` block starts in
the background on a free port. Files the examples name (in.mp4, clip.mp4, my_dog.mp4, clips/, the LoRAs
motion.safetensors and style.safetensors) exist; a block with `title="NAME"` is written to NAME. `console` blocks
are shown, not run (installs, multi-machine set-ups, HTTP transcripts). A renamed flag or parameter fails here. The
count of blocks run is printed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from vidfusion import export_to_video

from .serve_helpers import Server, free_port

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
BLOCK = re.compile(r'```(\w+)(?:[ \t]+title="([^"]+)")?\n(.*?)```', re.S)
MODEL_IDS = ("damo-vilab/text-to-video-ms-1.7b", "cerspense/zeroscope_v2_576w", "cerspense/zeroscope_v2_XL")
NEEDS_MODEL = ("generate", "upscale", "extend", "batch", "serve", "train-lora")
TOKEN = "docs-token"
COUNTS = {"run": 0, "shown": 0}


def for_the_tiny_checkpoint(code: str, model: str, server: str) -> str:
    """The one rule that makes an example run on a test machine (see the module docstring)."""
    for model_id in MODEL_IDS:
        code = code.replace(model_id, model)
    code = code.replace('.to("cuda")', '.to("cpu")').replace("torch.float16", "torch.float32")
    code = code.replace("--mixed-precision fp16", "--mixed-precision no").replace("--dtype float16", "--dtype float32")
    code = re.sub(r"(--steps |num_inference_steps=)(\d+)", lambda m: f"{m.group(1)}{min(int(m.group(2)), 4)}", code)
    code = code.replace("$SERVER_URL", server).replace("SERVER_URL", repr(server)).replace("$TOKEN", TOKEN)
    return code.replace("TOKEN)", f"{TOKEN!r})")


def shell_commands(body: str) -> list[str]:
    """The `vidfusion ...` commands of a shell block (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip().startswith("vidfusion ")]


@pytest.fixture(scope="module")
def lora_files(tiny_checkpoint, tmp_path_factory) -> Path:
    """The LoRA files docs/lora.md names (motion / style: diffusers-format, rank 4) for the tiny checkpoint."""
    from vidfusion import TextToVideoPipeline

    from .test_serve_inputs import write_lora

    folder = tmp_path_factory.mktemp("doc-loras")
    pipe = TextToVideoPipeline.from_pretrained(tiny_checkpoint)
    write_lora(pipe, folder / "motion.safetensors", 1)
    write_lora(pipe, folder / "style.safetensors", 2)
    return folder


def make_inputs(folder: Path, loras: Path) -> None:
    for lora in loras.iterdir():
        (folder / lora.name).write_bytes(lora.read_bytes())
    frames = (np.random.default_rng(0).random((8, 64, 64, 3)) * 255).astype(np.uint8)
    for name in ("in.mp4", "clip.mp4", "my_dog.mp4"):
        export_to_video(frames, folder / name, fps=8)
    (folder / "clips").mkdir()
    export_to_video(frames, folder / "clips" / "a.mp4", fps=8)
    (folder / "clips" / "a.txt").write_text("a clip of noise")


@pytest.fixture(scope="module")
def docs_server(tiny_checkpoint, tmp_path_factory):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("docs-server") / "data", token=TOKEN).start()
    yield srv
    srv.stop()


def run_shell(command: str, folder: Path, model: str, servers: list) -> None:
    args = shlex.split(command)[1:]
    if args[0] in NEEDS_MODEL and "--model" not in args and "--server" not in args and "--from" not in args:
        args += ["--model", model]
    if args[0] == "serve":  # in the background, until the page is done
        port = free_port()
        args += ["--port", str(port), "--data-dir", str(folder / f"serve-{port}")]
        servers.append(subprocess.Popen([sys.executable, "-m", "vidfusion", *args], cwd=folder,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"{command}: the server did not start")
    env = {**os.environ, "VIDFUSION_TOKEN": TOKEN}
    result = subprocess.run([sys.executable, "-m", "vidfusion", *args], cwd=folder, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("page", PAGES)
def test_every_example_of_the_page_runs(page, tiny_checkpoint, docs_server, lora_files, tmp_path):
    text = (DOCS / page).read_text()
    make_inputs(tmp_path, lora_files)
    servers: list = []
    namespace: dict = {}
    try:
        for lang, title, body in BLOCK.findall(text):
            code = for_the_tiny_checkpoint(body, str(tiny_checkpoint), docs_server.url)
            if title:
                (tmp_path / title).write_text(body)
            elif lang == "python":
                cwd = os.getcwd()
                os.chdir(tmp_path)
                try:
                    exec(compile(code, f"{page} (example)", "exec"), namespace)  # noqa: S102 (the docs' own code)
                finally:
                    os.chdir(cwd)
            elif lang == "bash":
                for command in shell_commands(code):
                    run_shell(command, tmp_path, str(tiny_checkpoint), servers)
            else:
                COUNTS["shown"] += 1
                continue
            COUNTS["run"] += 1
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(30)


def test_zz_count_of_blocks_run():
    """Printed with -s or in the summary: how many examples ran and how many are shown only."""
    print(f"\ndocs examples: {COUNTS['run']} blocks run, {COUNTS['shown']} shown only (console/text/json)")
    assert COUNTS["run"] >= 10 or not COUNTS["run"]  # all pages ran in this session: a page lost its examples


def test_the_cli_reference_is_generated_from_the_parser():
    """Catches a reference copied by hand: every command and a recent flag appear in what the hook generates."""
    sys.path.insert(0, str(DOCS))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS))
    reference = hooks.cli_reference()
    for command in ("generate", "serve", "jobs", "batch", "train-lora", "convert", "info", "init-random"):
        assert f"## vidfusion {command}" in reference
    assert "--no-loop" in reference and "--max-output-frames" in reference
    http = hooks.http_reference()
    assert "## POST `/v1/videos/upload`" in http and "| 429 |" in http


def test_readme_is_short_and_links_every_page():
    readme = (DOCS.parent / "README.md").read_text()
    assert len(readme.splitlines()) <= 120
    for page in ("quickstart", "prompts", "creative-controls", "lora", "fine-tuning", "speed-and-memory",
                 "batch-and-ray", "service", "reference/cli", "reference/http-api", "python-api", "architecture"):
        assert f"docs/{page}.md" in readme, page
    index = (DOCS / "index.md").read_text()
    nav = [p for p in PAGES if p not in ("index.md",)]
    assert all(p in index for p in nav if p not in ("hooks.py",)), [p for p in nav if p not in index]


def test_the_charts_are_drawn_from_results_md():
    """Catches a chart edited by hand or left behind when RESULTS.md changed: `python docs/charts.py` would draw
    exactly the committed SVGs (and every chart has a bar per figure it reads)."""
    sys.path.insert(0, str(DOCS))
    try:
        import charts
    finally:
        sys.path.remove(str(DOCS))
    text = (DOCS.parent / "benchmarks" / "RESULTS.md").read_text()
    assert len(charts.headline_seconds(text)) >= 3 and len(charts.memory_rows(text)) >= 6
    for name, svg in charts.charts(text).items():
        assert (DOCS / "assets" / name).read_text() == svg, f"docs/assets/{name} is stale: run python docs/charts.py"
