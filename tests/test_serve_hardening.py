"""The service under hostile requests and faults (issue 30): limits decided from headers and parameters before any
work, a local server that other sites' pages cannot drive, honest health, and faults (a full disk, a second server,
a dead worker) that never lose or duplicate a job. Black-box through HTTP on a real server where the item is about
the service; fault injection (a store that fails, fsync recorded) for the worker and the disk."""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidfusion.media.video_io import export_to_video
from vidfusion.serve.jobs import QUEUED, RUNNING, SUCCEEDED, JobStore
from vidfusion.serve.render import JobResult
from vidfusion.serve.worker import Worker

from .serve_helpers import SMALL, Server

HOOKS = Path(__file__).parent / "hooks"
TOKEN = "hardening-token"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    env = {"PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
           "VIDFUSION_TEST_WORKER_DIES": "1"}
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("hard") / "data", "--max-upload-mb", "1",
                 "--max-frames", "32", "--max-pixels", str(64 * 64), token=TOKEN, env=env).start()
    yield srv
    srv.stop()


def raw_request(url: str, head: str, body: bytes = b"", wait: float = 5.0) -> tuple[int, bytes]:
    """Send a request by hand (headers we choose, a body that may be shorter than announced); the status line."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


# ---- 1-4: limits decided before work ---------------------------------------------------------------------------

def test_interpolated_output_is_bounded_at_submission(server):
    """Catches 128 frames at fps 1 to 120 fps (15,360 frames, stacked in RAM) accepted: 422 naming the field."""
    with server.client() as c:
        r = c.post("/v1/videos", json={**SMALL, "prompt": "a cat", "num_frames": 32, "fps": 1,
                                       "interpolate_fps": 60})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "interpolate_fps"]
        assert "1920 frames" in r.text
        ok = c.post("/v1/videos", json={**SMALL, "prompt": "a cat", "fps": 8, "interpolate_fps": 24})
        assert ok.status_code == 202


def test_interpolation_streams_into_the_encoder(tmp_path):
    """Catches the interpolated frames stacked in memory (np.stack of every output frame) before encoding: the
    peak traced while writing 16 -> 480 frames stays far below the output's size."""
    import tracemalloc

    frames = (np.random.default_rng(0).random((16, 64, 64, 3)) * 255).astype(np.uint8)
    output_bytes = 480 * 64 * 64 * 3
    tracemalloc.start()
    try:
        export_to_video(frames, tmp_path / "x.mp4", fps=1, interpolate_fps=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < output_bytes / 4, peak


def _upload(c, files, params=None):
    import json

    return c.post("/v1/videos/upload", data={"params": json.dumps(params or {"prompt": "a cat"})}, files=files)


def test_uploads_are_judged_by_their_headers(server, tmp_path):
    """Catches a small file that decodes huge being decoded: a 512x512 H.264 (over this server's 64x64 frame limit),
    a picture over 16x the frame limit and an ffconcat script are refused with 422 naming the field, never 5xx."""
    big = export_to_video(np.zeros((2, 512, 512, 3), np.uint8), tmp_path / "big.mp4", fps=8)
    assert Path(big).stat().st_size < 20_000  # small on the wire
    picture = io.BytesIO()
    Image.new("L", (1200, 1200)).save(picture, format="PNG")  # 1.44 MP > 16 x 4096 pixels
    (tmp_path / "in.mp4").write_bytes(Path(big).read_bytes())
    script = b"ffconcat version 1.0\nfile in.mp4\n"
    with server.client() as c:
        for field, files in [("video", {"video": ("big.mp4", Path(big).read_bytes(), "video/mp4")}),
                             ("image", {"image": ("p.png", picture.getvalue(), "image/png")}),
                             ("video", {"video": ("x.ffconcat", script, "application/octet-stream")})]:
            r = _upload(c, files)
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["loc"] == ["body", field]
        small = export_to_video(np.zeros((40, 48, 48, 3), np.uint8), tmp_path / "small.mp4", fps=8)
        r = _upload(c, {"video": ("s.mp4", Path(small).read_bytes(), "video/mp4")},
                    {"prompt": "a cat", "num_frames": 4, "num_inference_steps": 2})
        assert r.status_code == 202, r.text  # longer than --max-frames, but only its first 4 frames are asked


def test_413_before_the_body_is_read(server):
    """Catches the multipart form spooled before the size check: a 50 MB announcement to a 1 MB server is answered
    413 while (almost) nothing of it has been sent; a body without a length is cut off at the cap."""
    head = (f"POST /v1/videos/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {50 * 2**20}")
    started = time.monotonic()
    status, _ = raw_request(server.url, head, b"--x\r\n")
    assert status == 413 and time.monotonic() - started < 5
    chunked = (f"POST /v1/videos/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
               "Content-Type: multipart/form-data; boundary=x\r\nTransfer-Encoding: chunked")
    part = (b'--x\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n'
            b"Content-Type: video/mp4\r\n\r\n")
    pieces = [part] + [b"a" * 2**20] * 5  # a well-formed start, then 5 MB of file: over the 4 MB cap
    body = b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in pieces)
    status, _ = raw_request(server.url, chunked, body)
    assert status == 413


def test_uploads_received_at_once_are_capped(tmp_path, monkeypatch):
    """Catches uploads bounded only after the multipart parser has held their parts in memory (or not at all):
    with --max-concurrent-uploads 1, a second upload while the first is being read is answered 429 with
    Retry-After by the guard, before its body is received (its parts never reach the route); an upload without the
    token is a 401 there (a stranger holds no slot); a refused upload (422) gives its slot back."""
    import asyncio

    import httpx

    from vidfusion.serve import uploads
    from vidfusion.serve.app import create_app
    from vidfusion.serve.params import ServeSettings

    inside, release = threading.Event(), threading.Event()
    real = uploads.store_picture
    reads = []

    def slow_store(*args, **kwargs):
        reads.append(1)
        inside.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(uploads, "store_picture", slow_store)
    settings = ServeSettings(data_dir=str(tmp_path / "data"), max_concurrent_uploads=1, max_pixels=64 * 64,
                             token="t")
    app = create_app(JobStore(settings.data_dir), [], settings)
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    params = {"params": '{"prompt": "a cat", "height": 32, "width": 32}'}
    form = {"data": params, "files": {"image": ("p.png", png.getvalue(), "image/png")}}
    bad = {"data": params, "files": {"image": ("p.png", b"not a picture", "image/png")}}

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                     headers={"Authorization": "Bearer t"}) as c:
            first = asyncio.create_task(c.post("/v1/videos/upload", **form))
            await asyncio.get_running_loop().run_in_executor(None, inside.wait, 30)
            second = await c.post("/v1/videos/upload", **form)
            stranger = await c.post("/v1/videos/upload", headers={"Authorization": "Bearer wrong"}, **form)
            release.set()
            done = await first
            refused = await c.post("/v1/videos/upload", **bad)
            return [done, second, stranger, refused, await c.post("/v1/videos/upload", **form)]

    first, second, stranger, refused, last = asyncio.run(scenario())
    assert first.status_code == 202 and last.status_code == 202, (first.text, last.text)
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert "--max-concurrent-uploads" in second.json()["detail"] and stranger.status_code == 401
    assert refused.status_code == 422  # and its slot came back: the last upload was taken
    assert len(reads) == 3  # first, the refused one's picture check, last: never the 429's or the stranger's


def test_prompt_edits_are_capped_and_encoded_once_per_text(server, ours):
    """Catches one CLIP encoding per step: `[a|b]` over 50 steps runs the text encoder for 2 texts, not 50 (and
    keeps 2 sets of keys/values); the service refuses prompts with more distinct texts than its cap."""
    calls = []
    hook = ours.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        ours("a [cat|dog]", num_frames=2, height=16, width=16, num_inference_steps=50, guidance_scale=1.0,
             generator=None, output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == 2
    many = " ".join(f"[w{i}:v{i}:{i + 1}]" for i in range(40))  # 41 different texts over 50 steps
    with server.client() as c:
        r = c.post("/v1/videos", json={**SMALL, "prompt": many, "num_inference_steps": 50})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]


# ---- 5-6: a local server is not everyone's ------------------------------------------------------------------------

def test_host_and_origin_are_checked(server):
    """Catches a DNS-rebound page (Host: its own name) and another site's form POST (Origin) reaching /v1."""
    with server.client() as c:
        assert c.get("/v1/videos", headers={"Host": "evil.example:7860"}).status_code == 400
        r = c.post("/v1/videos", json={**SMALL, "prompt": "a cat"}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        own = c.post("/v1/videos", json={**SMALL, "prompt": "a cat"}, headers={"Origin": server.url})
        assert own.status_code == 202
        assert c.get("/v1/videos", headers={"Host": "localhost"}).status_code == 200


def test_a_stalled_upload_body_is_cut_off_and_frees_its_slot(tmp_path, monkeypatch):
    """Catches a slow sender holding an upload slot forever (with --max-concurrent-uploads 1, one stalled upload
    would refuse every other): a body that stops arriving before its end is answered 408 after the idle time, and
    the next upload is taken."""
    import asyncio

    from vidfusion.serve import guard
    from vidfusion.serve.app import create_app
    from vidfusion.serve.params import ServeSettings

    monkeypatch.setattr(guard, "BODY_IDLE_SECONDS", 0.5)
    settings = ServeSettings(data_dir=str(tmp_path / "data"), max_concurrent_uploads=1, max_pixels=64 * 64)
    app = create_app(JobStore(settings.data_dir), [], settings)

    async def post(stall: bool) -> int:
        body = (b'--x\r\nContent-Disposition: form-data; name="params"\r\n\r\n{"prompt": "a cat", "height": 32, '
                b'"width": 32}\r\n--x--\r\n')
        pieces = [body[:20]] if stall else [body]
        sent: list[dict] = []

        async def receive() -> dict:
            if pieces:
                piece = pieces.pop(0)
                return {"type": "http.request", "body": piece, "more_body": stall}
            await asyncio.sleep(3600)  # the sender stalls (or, after the body, never disconnects)

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/videos/upload", "raw_path": b"/v1/videos/upload",
                 "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 7860),
                 "client": ("127.0.0.1", 5000), "http_version": "1.1",
                 "headers": [(b"host", b"127.0.0.1:7860"), (b"content-type", b"multipart/form-data; boundary=x")]}
        await asyncio.wait_for(app(scope, receive, send), 20)
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    async def scenario() -> tuple[int, int]:
        return await post(stall=True), await post(stall=False)

    stalled, next_one = asyncio.run(scenario())
    assert stalled == 408 and next_one == 202


def test_allowed_origin_lets_a_proxys_page_call_the_api(tmp_path):
    """Catches a server unusable behind a Host-rewriting proxy (its page's Origin is the proxy's public name, the
    Host the server's own address: refused as cross-site) and an allow-list that lets every origin in: only the named
    origin (as browsers send it, any case) passes; a malformed --allowed-origin is one line, exit 2, before loading."""
    from fastapi.testclient import TestClient

    from vidfusion.serve.app import create_app
    from vidfusion.serve.params import ServeSettings

    settings = ServeSettings(data_dir=str(tmp_path / "data"), allowed_origins=("https://Videos.example.com/",))
    app = create_app(JobStore(settings.data_dir), [], settings)
    c = TestClient(app, base_url="http://127.0.0.1:7860")  # without its lifespan: listing jobs needs no worker
    assert c.get("/v1/videos", headers={"Origin": "https://videos.example.com"}).status_code == 200
    for other in ("https://evil.example", "http://videos.example.com", "https://videos.example.com.evil.example",
                  "https://videos.example.com:8443", "null"):
        assert c.get("/v1/videos", headers={"Origin": other}).status_code == 403, other
    from vidfusion.serve.guard import origin_of

    assert origin_of("https://Videos.Example.com:443/") == "https://videos.example.com"  # browsers drop :443
    assert origin_of("http://localhost:8080") == "http://localhost:8080"
    assert origin_of("https://vidéos.example") == "https://xn--vidos-dsa.example"  # browsers send the IDNA form
    for wrong in ("videos.example.com", "https://user:pw@videos.example.com", "https://videos.example.com:99999",
                  "https://*", "https://a b.com", "https://videos.example.com/ui", "ftp://videos.example.com"):
        with pytest.raises(ValueError, match="is not an origin"):
            origin_of(wrong)
    result = subprocess.run([sys.executable, "-m", "vidfusion", "serve", "--model", str(tmp_path / "none"),
                             "--allowed-origin", "videos.example.com"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "scheme://host[:port]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_healthz_reports_a_dead_worker_and_keeps_details_for_the_token(server):
    """Catches `ok` while the worker thread is dead, and host names / pids shown to anyone."""
    import httpx

    anonymous = httpx.get(server.url + "/healthz").json()
    assert anonymous == {"status": "ok"}
    with server.client() as c:
        assert {"workers", "pending", "model"} <= set(c.get("/healthz").json())
        job = c.post("/v1/videos", json={**SMALL, "prompt": "die"}).json()  # the injected fatal bug
        deadline = time.time() + 30
        while time.time() < deadline and c.get("/healthz").status_code == 200:
            time.sleep(0.1)
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "degraded" and r.json()["dead_workers"]
        assert c.get(f"/v1/videos/{job['id']}").json()["status"] == RUNNING  # not lost: the next start re-runs it


# ---- 7-10: faults --------------------------------------------------------------------------------------------------

class _Runner:
    """A stand-in for JobRunner: a job's result at once."""

    def run(self, params, inputs, report):
        report(1, 1, None)
        return JobResult(video=b"video of " + params["prompt"].encode(), poster=b"jpeg", settings={})


def test_the_worker_survives_store_and_disk_errors(tmp_path, monkeypatch):
    """Catches the worker thread ending on an error while recording (disk full): its job stays `running` and every
    later job queues forever. Recording fails twice; the job is run again and succeeds, later jobs too."""
    store = JobStore(tmp_path / "data")
    failures = {"left": 2}
    finish = store.finish

    def flaky_finish(job_id, status, error=None):
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return finish(job_id, status, error)

    monkeypatch.setattr(store, "finish", flaky_finish)
    worker = Worker(store, _Runner(), "test")
    worker.start()
    try:
        first, _ = store.submit({"prompt": "a"})
        second, _ = store.submit({"prompt": "b"})
        deadline = time.time() + 60
        while time.time() < deadline and {store.status_of(first.id), store.status_of(second.id)} != {SUCCEEDED}:
            time.sleep(0.05)
        assert store.status_of(first.id) == SUCCEEDED and store.status_of(second.id) == SUCCEEDED
        assert worker.alive()
        assert store.video_path(first.id).read_bytes() == b"video of a"
    finally:
        worker.stop()
        worker.join(5)


def test_one_server_per_data_dir(server, tiny_checkpoint):
    """Catches a second server on the same --data-dir re-queuing the first one's running jobs: it exits 2 with one
    line naming the folder, and the first one still answers."""
    result = subprocess.run([sys.executable, "-m", "vidfusion", "serve", "--model", str(tiny_checkpoint),
                             "--data-dir", str(server.data_dir), "--port", "1"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "VIDFUSION_TOKEN": ""})
    assert result.returncode == 2
    assert "in use" in result.stderr and str(server.data_dir) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with server.client() as c:
        assert c.get("/v1/videos").status_code == 200


def test_a_finished_video_is_on_the_disk_before_the_job_says_succeeded(tmp_path, monkeypatch):
    """Catches a rename without fsync (a power loss after `succeeded` leaves an empty or missing file): the video's
    data and its folder's entry are flushed before the record changes, and the record is committed FULL."""
    from vidfusion.media import fileio
    from vidfusion.serve.worker import complete

    store = JobStore(tmp_path / "data")
    job, _ = store.submit({"prompt": "a"})
    store.claim()
    events = []
    real_fsync, real_finish = os.fsync, store.finish
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                       real_fsync(fd))[1])
    monkeypatch.setattr(store, "finish", lambda *a: (events.append(("finish",)), real_finish(*a))[1])
    complete(store, job.id, JobResult(video=b"v", poster=b"p", settings={}))
    names = [e for e in events if e[0] == "fsync"]
    assert events[-1] == ("finish",)
    assert any(str(store.video_dir) == e[1] for e in names)  # the folder entry
    assert any(e[1].startswith(str(store.video_dir / ".vidfusion-tmp.")) for e in names)  # the data
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_preview_replaced_while_it_is_sent_comes_whole(tmp_path):
    """Catches a FileResponse for the preview: it stats the file, then opens it; the worker renames a new preview
    over it at every step in between, so the response announced one picture's length and sent another's bytes (a
    cut connection under schemathesis). Every answer must be exactly one of the pictures written, at its length."""
    from fastapi.testclient import TestClient

    from vidfusion.media.fileio import write_bytes
    from vidfusion.serve.app import create_app
    from vidfusion.serve.params import ServeSettings

    settings = ServeSettings(data_dir=str(tmp_path / "data"), max_pixels=64 * 64)
    store = JobStore(settings.data_dir)
    c = TestClient(create_app(store, [], settings), base_url="http://127.0.0.1:7860")  # no worker: it stays queued
    job = c.post("/v1/videos", json={**SMALL, "prompt": "a preview race"}).json()
    path = store.preview_path(job["id"])
    versions = [bytes([n]) * size for n, size in enumerate((70_000, 300, 140_000, 5))]
    write_bytes(path, versions[-1])  # there before the first GET (else a 404 that is right: no preview yet)
    stop = threading.Event()

    def replace() -> None:
        n = 0
        while not stop.is_set():
            write_bytes(path, versions[n % len(versions)])
            n += 1

    writer = threading.Thread(target=replace)
    writer.start()
    try:
        for _ in range(300):
            r = c.get(f"/v1/videos/{job['id']}/preview")
            assert r.status_code == 200 and r.content in versions
            assert int(r.headers["content-length"]) == len(r.content)
    finally:
        stop.set()
        writer.join()


def test_keep_days_removes_old_finished_jobs_only(tmp_path):
    """Catches retention that removes queued jobs, a recent video, or an input a remaining job still names."""
    store = JobStore(tmp_path / "data")
    old_input = store.input_dir / "old.png"
    kept_input = store.input_dir / "kept.png"
    old_input.write_bytes(b"x"), kept_input.write_bytes(b"y")
    old, _ = store.submit({"prompt": "old", "image": str(old_input)})
    recent, _ = store.submit({"prompt": "recent"})
    queued, _ = store.submit({"prompt": "queued", "image": str(kept_input)})
    for job in (old, recent):
        store.claim()
        store.video_path(job.id).write_bytes(b"v")
        store.finish(job.id, SUCCEEDED)
    store._db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (time.time() - 3 * 86400, old.id))
    assert store.prune(2 * 86400) == [old.id]
    assert store.get(old.id) is None and not store.video_path(old.id).exists() and not old_input.exists()
    assert store.get(recent.id).status == SUCCEEDED and store.video_path(recent.id).exists()
    assert store.get(queued.id).status == QUEUED and kept_input.exists()


def test_a_preview_write_error_does_not_stop_the_job(tmp_path, monkeypatch):
    """Catches a failed preview write (disk full) raised out of the step report: on Ray that killed a healthy actor
    and re-ran its job; the preview is best effort."""
    from vidfusion.serve import worker as worker_module

    store = JobStore(tmp_path / "data")
    job, _ = store.submit({"prompt": "a"})
    store.claim()
    monkeypatch.setattr(worker_module, "write_bytes", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    assert worker_module.record_step(store, job.id, 1, 2, b"png") is True
    assert store.get(job.id).step == 1


def test_temp_files_of_killed_workers_are_swept_and_lora_copies_shared(tmp_path, monkeypatch):
    """Catches per-actor LoRA copies left on every stop (a kill -9 runs no cleanup) and per-job folders of killed
    workers that stay forever: copies are named by content and reused; a dead pid's job folder is swept at start,
    a live one's kept."""
    import tempfile

    from vidfusion.serve.ray_workers import cached_copy
    from vidfusion.serve.render import JOB_FOLDER_PREFIX, sweep_job_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first, again = cached_copy(b"lora bytes", "motion.pt"), cached_copy(b"lora bytes", "motion.pt")
    assert first == again and first.name == "motion.pt" and first.read_bytes() == b"lora bytes"
    assert len(list((tmp_path / "vidfusion-lora-cache").iterdir())) == 1
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{JOB_FOLDER_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{JOB_FOLDER_PREFIX}{os.getpid()}-def"
    stale.mkdir(), live.mkdir()
    assert sweep_job_folders(str(tmp_path)) == [stale]
    assert not stale.exists() and live.exists()


def test_threads_left_after_the_module():
    """The fault tests leave no worker thread behind (each is stopped and joined)."""
    assert not [t for t in threading.enumerate() if t.name.startswith("vidfusion-worker-test")]
