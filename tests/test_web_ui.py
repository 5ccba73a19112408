"""The web UI driven in headless Chromium (Debian's chromium + Playwright), against the real server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .serve_helpers import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if os.environ.get("VIDFUSION_SKIP_BROWSER") == "1":  # said on purpose by the run, never guessed from the machine
    pytest.skip("VIDFUSION_SKIP_BROWSER=1: the web UI is not driven in this run", allow_module_level=True)
if not os.path.exists(CHROMIUM):  # a missing browser is a failure: the UI would go untested while the run says green
    raise RuntimeError("chromium is not installed: apt-get install chromium (or run with VIDFUSION_SKIP_BROWSER=1 to "
                       "leave the web UI untested on purpose)")
SCREENSHOT = Path(__file__).parents[1] / "docs" / "assets" / "web-ui.png"

ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_generate_from_the_page_plays_the_video(tiny_checkpoint, tmp_path, browser):
    srv = Server(tiny_checkpoint, tmp_path / "data", token="ui-token").start()
    try:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.fill("#token", "ui-token")
        # picking a few-step sampler brings its own steps and guidance (lcm / mcm: 4 steps, no CFG), and back
        assert (page.input_value("#num_inference_steps"), page.input_value("#guidance_scale")) == ("50", "9")
        page.select_option("#sampler", "mcm")
        assert (page.input_value("#num_inference_steps"), page.input_value("#guidance_scale")) == ("4", "1")
        page.select_option("#sampler", "ddim")
        assert (page.input_value("#num_inference_steps"), page.input_value("#guidance_scale")) == ("50", "9")
        page.fill("#prompt", "a lighthouse in a storm")
        page.fill("#negative_prompt", "blurry")
        for field, value in (("num_frames", "4"), ("width", "32"), ("height", "32"), ("num_inference_steps", "6"),
                             ("seed", "5"), ("fps", "6")):
            page.fill(f"#{field}", value)
        page.click("#generate")
        # the progress bar fills and the player gets a playable source (metadata loaded, no media error)
        page.wait_for_function("document.getElementById('player').readyState >= 1", timeout=60_000)
        assert page.eval_on_selector("#player", "v => v.error === null && v.duration > 0")
        assert page.eval_on_selector("#progress", "p => p.value === p.max && p.max === 6")
        assert "succeeded" in page.inner_text("#status")
        assert page.get_attribute("#download", "download").endswith(".mp4")
        page.wait_for_selector("#gallery .item")
        assert "a lighthouse in a storm" in page.inner_text("#gallery")
        # the finished job's poster shows in the gallery
        page.wait_for_function("[...document.querySelectorAll('#gallery img.poster')].some(i => i.naturalWidth > 0)")
        shot = page.screenshot(full_page=True)  # the page as a user sees it after a job (docs/service.md shows it)
        assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
        if os.environ.get("VIDFUSION_DOCS_SCREENSHOT") == "1":  # refresh the docs' picture: docs/development.md
            SCREENSHOT.write_bytes(shot)

        with srv.client() as c:  # the page went through the same queue as the API
            jobs = c.get("/v1/videos").json()["data"]
            assert len(jobs) == 1 and jobs[0]["params"]["num_frames"] == 4 and jobs[0]["params"]["seed"] == 5
            assert jobs[0]["params"]["negative_prompt"] == "blurry"

        page.fill("#num_frames", "500")  # over the server limit: the error is shown, naming the field
        page.click("#generate")
        page.wait_for_function("document.getElementById('error').textContent.includes('num_frames')")
    finally:
        srv.stop()


def test_preview_updates_while_the_job_runs(tiny_checkpoint, tmp_path, browser):
    srv = Server(tiny_checkpoint, tmp_path / "data").start()
    try:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.fill("#prompt", "a slow sunset")
        for field, value in (("num_frames", "8"), ("width", "64"), ("height", "64"), ("num_inference_steps", "400")):
            page.fill(f"#{field}", value)
        page.click("#generate")
        # a latent preview is on the page while the status still says running
        page.wait_for_function("(() => { const i = document.getElementById('preview');"
                               " return !i.hidden && i.naturalWidth === 64 &&"
                               " document.getElementById('status').textContent.startsWith('running'); })()",
                               timeout=60_000)
        first = page.get_attribute("#preview", "src")
        page.wait_for_function(f"document.getElementById('preview').src !== {first!r}")  # it updates
        page.click("#cancel")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('cancelled')")
    finally:
        srv.stop()


def test_a_first_frame_picture_from_the_form(tiny_checkpoint, tmp_path, browser):
    """The form's picture field goes through the multipart upload and the job keeps the picture."""
    import numpy as np
    from PIL import Image

    picture = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8)).save(picture)
    srv = Server(tiny_checkpoint, tmp_path / "data").start()
    try:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.fill("#prompt", "a lighthouse")
        for field, value in (("num_frames", "2"), ("width", "32"), ("height", "32"), ("num_inference_steps", "2")):
            page.fill(f"#{field}", value)
        page.set_input_files("#image", str(picture))
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('succeeded')",
                               timeout=60_000)
        with srv.client() as c:
            (job,) = c.get("/v1/videos").json()["data"]
            assert job["params"]["image"].endswith(".png")
    finally:
        srv.stop()


def test_video_input_and_loras_from_the_form(tiny_checkpoint, tmp_path, browser):
    """The form's video field and LoRA list: the job gets the uploaded video (all its frames unless the frame count
    was changed), the strength and the ticked LoRA with its weight; unticked ones are not sent."""
    import numpy as np

    from vidfusion.media.video_io import export_to_video
    from vidfusion.pipelines.text_to_video import TextToVideoPipeline

    from .test_serve_inputs import write_lora

    loras = tmp_path / "loras"
    loras.mkdir()
    pipe = TextToVideoPipeline.from_pretrained(tiny_checkpoint)
    write_lora(pipe, loras / "motion-pan.safetensors", 1)
    write_lora(pipe, loras / "style.safetensors", 2)
    video = export_to_video((np.random.default_rng(3).random((3, 32, 32, 3)) * 255).astype(np.uint8),
                            str(tmp_path / "in.mp4"), fps=8)
    srv = Server(tiny_checkpoint, tmp_path / "data", "--lora-dir", str(loras)).start()
    try:
        page = browser.new_page()
        page.goto(srv.url + "/")
        assert page.inner_text("#loras").split() == ["LoRAs", "motion-pan", "style"]
        page.fill("#prompt", "restyle it")
        page.fill("#num_inference_steps", "2")
        page.set_input_files("#video", video)
        page.fill("#strength", "0.45")
        page.check("#lora-1")
        page.fill("#weight-1", "0.7")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('succeeded')",
                               timeout=60_000)
        with srv.client() as c:
            (job,) = c.get("/v1/videos").json()["data"]
        params = job["params"]
        assert params["video"].endswith(".mp4") and params["strength"] == 0.45 and params["num_frames"] == 3
        assert params["loras"] == [{"name": "style", "weight": 0.7}]
    finally:
        srv.stop()
