"""The HTTP service, started for real on a loopback port with a tiny random checkpoint."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import av
import pytest

from .serve_helpers import SMALL, Server, wait_for

TOKEN = "s3cret-token"
LONG = {**SMALL, "num_frames": 8, "height": 64, "width": 64, "num_inference_steps": 500}  # seconds per job


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "data", "--max-frames", "24",
                 "--max-pixels", str(128 * 128), token=TOKEN).start()
    yield srv
    srv.stop()


def decode(content: bytes, tmp_path, name="v.mp4"):
    path = tmp_path / name
    path.write_bytes(content)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in c.decode(stream)], float(stream.average_rate)


def test_fifty_jobs_from_ten_concurrent_clients(server, tmp_path):
    def client_run(k: int) -> list[dict]:
        with server.client() as c:
            ids = []
            for i in range(5):
                r = c.post("/v1/videos", json={**SMALL, "prompt": f"client {k} video {i}", "seed": 10 * k + i,
                                               "fps": 4 + i})
                assert r.status_code == 202, r.text
                assert r.json()["status"] == "queued"
                ids.append(r.json()["id"])
            return [wait_for(c, job_id) for job_id in ids]

    with ThreadPoolExecutor(10) as pool:
        jobs = [job for batch in pool.map(client_run, range(10)) for job in batch]
    assert len(jobs) == 50 and len({j["id"] for j in jobs}) == 50
    with server.client() as c:
        for job in jobs:
            assert job["status"] == "succeeded", job
            assert job["progress"] == {"step": 2, "total": 2} and job["finished_at"] >= job["created_at"]
            r = c.get(f"/v1/videos/{job['id']}/content")
            assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
            frames, fps = decode(r.content, tmp_path)
            assert len(frames) == 2 and frames[0].shape == (32, 32, 3) and fps == job["params"]["fps"]


def test_same_seed_same_video_and_listing(server, tmp_path):
    with server.client() as c:
        a, b = (c.post("/v1/videos", json={**SMALL, "prompt": "a red fox", "seed": 7}).json() for _ in range(2))
        for job in (a, b):
            wait_for(c, job["id"])
        va, vb = (c.get(f"/v1/videos/{j['id']}/content").content for j in (a, b))
        assert va == vb
        listed = c.get("/v1/videos", params={"status": "succeeded", "limit": 2}).json()["data"]
        assert [j["id"] for j in listed] == [b["id"], a["id"]]  # newest first
        assert c.get("/v1/videos", params={"status": "bogus"}).status_code == 422
        assert c.get("/v1/videos", params={"limit": 0}).status_code == 422


def test_auth(server):
    body = {**SMALL, "prompt": "auth"}
    with server.client(token=None) as c:
        assert c.get("/healthz").status_code == 200  # health needs no token
        r = c.post("/v1/videos", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/videos").status_code == 401
    with server.client(token="wrong") as c:
        assert c.get("/v1/videos").status_code == 401
        assert c.post("/v1/videos", json=body).status_code == 401
    with server.client() as c:
        assert c.get("/v1/videos").status_code == 200
        assert c.post("/v1/videos", json=body).status_code == 202
        assert c.get("/v1/videos", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401


@pytest.mark.parametrize("body, field", [
    ({"num_frames": 2}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x", "num_frames": 0}, "num_frames"),
    ({"prompt": "x", "num_frames": 25}, "num_frames"),  # over --max-frames 24
    ({"prompt": "x", "height": 30}, "height"),
    ({"prompt": "x", "height": 256, "width": 256}, "height"),  # over --max-pixels
    ({"prompt": "x", "sampler": "magic"}, "sampler"),
    ({"prompt": "x", "guidance_scale": "lots"}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "output_path": "/etc/passwd"}, "output_path"),  # nothing a client sends becomes a path
])
def test_validation_names_the_field(server, body, field):
    with server.client() as c:
        r = c.post("/v1/videos", json=body)
        assert r.status_code == 422, r.text
        assert any(d["loc"][-1] == field for d in r.json()["detail"]), r.text


def test_unknown_job_is_404(server):
    with server.client() as c:
        for method, path in (("GET", ""), ("GET", "/content"), ("GET", "/events"), ("DELETE", "")):
            assert c.request(method, f"/v1/videos/nope{path}").status_code == 404


def test_cancel_running_and_queued_jobs(server):
    with server.client() as c:
        running = c.post("/v1/videos", json={**LONG, "prompt": "long one"}).json()
        queued = c.post("/v1/videos", json={**SMALL, "prompt": "waits"}).json()
        wait_for(c, running["id"], predicate=lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
        assert c.get(f"/v1/videos/{running['id']}/content").status_code == 404  # not there until it exists
        r = c.delete(f"/v1/videos/{queued['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = c.delete(f"/v1/videos/{running['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        step = r.json()["progress"]["step"]
        after = c.post("/v1/videos", json={**SMALL, "prompt": "after"}).json()
        assert wait_for(c, after["id"])["status"] == "succeeded"  # the worker moved on
        for job in (running, queued):
            final = c.get(f"/v1/videos/{job['id']}").json()
            assert final["status"] == "cancelled" and c.get(f"/v1/videos/{job['id']}/content").status_code == 404
        assert c.get(f"/v1/videos/{running['id']}").json()["progress"]["step"] <= step + 2  # stopped promptly
        assert c.get(f"/v1/videos/{queued['id']}").json()["started_at"] is None  # never ran
        assert c.delete(f"/v1/videos/{after['id']}").status_code == 409  # finished jobs cannot be cancelled


def test_idempotency_key(server):
    with server.client() as c:
        body = {**SMALL, "prompt": "only once"}
        first = c.post("/v1/videos", json=body, headers={"Idempotency-Key": "abc-123"})
        second = c.post("/v1/videos", json=body, headers={"Idempotency-Key": "abc-123"})
        assert first.status_code == 202 and second.status_code == 202
        assert first.json()["id"] == second.json()["id"]
        assert first.json()["params"]["seed"] == second.json()["params"]["seed"]
        other = c.post("/v1/videos", json=body, headers={"Idempotency-Key": "abc-456"})
        assert other.json()["id"] != first.json()["id"]
        clash = c.post("/v1/videos", json={**body, "num_frames": 3}, headers={"Idempotency-Key": "abc-123"})
        assert clash.status_code == 409 and "abc-123" in clash.text
        listed = c.get("/v1/videos", params={"limit": 500}).json()["data"]
        assert sum(j["params"]["prompt"] == "only once" for j in listed) == 2


def test_server_sent_events_report_progress_then_the_final_status(server):
    with server.client() as c:
        job = c.post("/v1/videos", json={**SMALL, "num_inference_steps": 12, "prompt": "events"}).json()
        events = []
        with c.stream("GET", f"/v1/videos/{job['id']}/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        steps = [e["progress"]["step"] for e in events if e["status"] == "running"]
        assert events[-1]["status"] == "succeeded" and events[-1]["progress"] == {"step": 12, "total": 12}
        assert len(steps) >= 3 and steps == sorted(steps) and max(steps) > 0
        assert all(e["id"] == job["id"] for e in events)


def test_queue_limit_gives_429(tiny_checkpoint, tmp_path):
    srv = Server(tiny_checkpoint, tmp_path / "data", "--max-queue", "2").start()
    try:
        with srv.client() as c:
            ids = [c.post("/v1/videos", json={**LONG, "prompt": f"fill {i}"}).json()["id"] for i in range(2)]
            r = c.post("/v1/videos", json={**SMALL, "prompt": "one too many"})
            assert r.status_code == 429 and "queue is full" in r.json()["detail"]
            c.delete(f"/v1/videos/{ids[1]}")
            assert c.post("/v1/videos", json={**SMALL, "prompt": "room again"}).status_code == 202
            c.delete(f"/v1/videos/{ids[0]}")
    finally:
        srv.stop()


def test_non_loopback_host_without_token_refuses_to_start(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "vidfusion", "serve", "--model", str(tiny_checkpoint),
                             "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")], capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "without a token" in result.stderr
    assert not (tmp_path / "d").exists()


def test_kill_9_mid_job_then_restart_loses_and_duplicates_nothing(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    srv = Server(tiny_checkpoint, data).start()
    slow = {**SMALL, "num_frames": 4, "num_inference_steps": 30}
    with srv.client() as c:
        ids = [c.post("/v1/videos", json={**(SMALL if i == 0 else slow), "prompt": f"job {i}", "seed": i},
                      headers={"Idempotency-Key": f"k{i}"}).json()["id"] for i in range(4)]
        done = wait_for(c, ids[0])
        wait_for(c, ids[1], predicate=lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
        first_video = hashlib.sha256(c.get(f"/v1/videos/{ids[0]}/content").content).hexdigest()
    srv.kill()
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        states = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    assert states[ids[0]] == "succeeded" and states[ids[1]] == "running"

    srv = Server(tiny_checkpoint, data).start()
    try:
        with srv.client() as c:
            again = c.post("/v1/videos", json={**slow, "prompt": "job 1", "seed": 1}, headers={"Idempotency-Key": "k1"})
            assert again.json()["id"] == ids[1]  # the key still maps to the same job after the crash
            jobs = [wait_for(c, i) for i in ids]
            assert [j["status"] for j in jobs] == ["succeeded"] * 4
            assert jobs[0]["finished_at"] == done["finished_at"]  # finished jobs were not run again
            listed = c.get("/v1/videos", params={"limit": 500}).json()["data"]
            assert sorted(j["id"] for j in listed) == sorted(ids)
            assert hashlib.sha256(c.get(f"/v1/videos/{ids[0]}/content").content).hexdigest() == first_video
            for i in ids[1:]:
                frames, _ = decode(c.get(f"/v1/videos/{i}/content").content, tmp_path)
                assert len(frames) == 4
        videos = sorted(p.name for p in (data / "videos").iterdir())
        assert videos == sorted(f"{i}.mp4" for i in ids)  # one file per job, no temp files left
    finally:
        srv.stop()


def test_two_workers_share_the_queue_without_running_a_job_twice(tiny_checkpoint, tmp_path):
    srv = Server(tiny_checkpoint, tmp_path / "data", "--device", "cpu", "--device", "cpu", "--log-level", "info")
    srv.start()
    try:
        with srv.client() as c:
            assert len(c.get("/healthz").json()["workers"]) == 2
            ids = [c.post("/v1/videos", json={**SMALL, "prompt": f"p{i}"}).json()["id"] for i in range(12)]
            assert all(wait_for(c, i)["status"] == "succeeded" for i in ids)
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert all(log.count(f"job {i}: running") == 1 for i in ids)
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        assert db.execute("SELECT MAX(attempts) FROM jobs").fetchone()[0] == 1


def test_preview_poster_and_video_metadata(server, tmp_path):
    import io

    from PIL import Image

    from vidfusion.media.video_io import read_metadata

    with server.client() as c:
        running = c.post("/v1/videos", json={**LONG, "prompt": "slow one"}).json()
        queued = c.post("/v1/videos", json={**SMALL, "prompt": "a poster", "seed": 3}).json()
        assert c.get(f"/v1/videos/{queued['id']}/preview").status_code == 404  # before its first step
        wait_for(c, running["id"], predicate=lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
        r = c.get(f"/v1/videos/{running['id']}/preview")  # while it runs
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (64, 64)  # latents upscaled to the video size
        assert c.get(f"/v1/videos/{running['id']}/poster").status_code == 404  # not finished
        c.delete(f"/v1/videos/{running['id']}")
        assert wait_for(c, queued["id"])["status"] == "succeeded"
        r = c.get(f"/v1/videos/{queued['id']}/poster")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (32, 32)
        assert c.get(f"/v1/videos/{queued['id']}/preview").status_code == 200  # still there after
        assert server.client(token=None).get(f"/v1/videos/{queued['id']}/poster").status_code == 401
        path = tmp_path / "v.mp4"
        path.write_bytes(c.get(f"/v1/videos/{queued['id']}/content").content)
        meta = read_metadata(path)
        assert meta["prompt"] == "a poster" and meta["seed"] == 3 and meta["num_inference_steps"] == 2
        assert meta["sampler"] == "ddim" and meta["model"] and meta["vidfusion"]


def test_few_step_sampler_defaults_in_the_job_record_and_the_video(server, tmp_path):
    """Catches the service filling in 50 steps / guidance 9 for {"sampler": "mcm"} (Python runs 4 steps, no CFG)."""
    from vidfusion.media.video_io import read_metadata

    with server.client() as c:
        body = {k: v for k, v in SMALL.items() if k not in ("num_inference_steps", "guidance_scale")}
        job = c.post("/v1/videos", json={**body, "prompt": "a fast one", "sampler": "mcm", "seed": 1}).json()
        assert (job["params"]["num_inference_steps"], job["params"]["guidance_scale"]) == (4, 1.0)
        assert wait_for(c, job["id"])["progress"] == {"step": 4, "total": 4}
        path = tmp_path / "mcm.mp4"
        path.write_bytes(c.get(f"/v1/videos/{job['id']}/content").content)
        meta = read_metadata(path)
        assert (meta["sampler"], meta["num_inference_steps"], meta["guidance_scale"]) == ("mcm", 4, 1.0)
        r = c.post("/v1/videos", json={**body, "prompt": "x", "sampler": "t2v-turbo"})  # needs the T2V-Turbo UNet
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "sampler"


def test_a_job_interrupted_3_times_fails_instead_of_running_forever(tmp_path):
    """Catches a crash-looping job (one that takes the server down each time) being requeued forever: the store
    gives it 3 runs, then records it failed with the cause; other jobs are requeued as usual."""
    from vidfusion.serve.jobs import FAILED, MAX_ATTEMPTS, QUEUED, JobStore

    store = JobStore(tmp_path / "data")
    crashing, _ = store.submit({"prompt": "takes the server down"})
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claimed = store.claim()
        assert claimed.id == crashing.id and store.get(crashing.id).attempts == attempt
        store.close()  # the server dies mid-job ...
        store = JobStore(tmp_path / "data")  # ... and starts again
        requeued = store.recover()
        assert requeued == ([crashing.id] if attempt < MAX_ATTEMPTS else [])
    job = store.get(crashing.id)
    assert MAX_ATTEMPTS == 3 and job.status == FAILED and "interrupted 3 times" in job.error
    other, _ = store.submit({"prompt": "fine"})
    store.claim()
    assert store.recover() == [other.id] and store.get(other.id).status == QUEUED


def test_interpolate_fps_field(server, tmp_path):
    """The service's interpolate_fps: 4 frames at 8 fps come back as 8 frames at 16 fps, recorded in the file."""
    from vidfusion.media.video_io import read_metadata

    with server.client() as c:
        body = {**SMALL, "num_frames": 4, "prompt": "smooth", "seed": 2, "fps": 8}
        assert c.post("/v1/videos", json={**body, "interpolate_fps": 8}).status_code == 422  # not above fps
        job = c.post("/v1/videos", json={**body, "interpolate_fps": 16}).json()
        assert wait_for(c, job["id"])["status"] == "succeeded"
        content = c.get(f"/v1/videos/{job['id']}/content").content
    frames, fps = decode(content, tmp_path)
    assert len(frames) == 8 and fps == 16
    path = tmp_path / "s.mp4"
    path.write_bytes(content)
    assert read_metadata(path)["interpolate_fps"] == 16


def test_picture_upload_conditions_the_first_frame(server, tmp_path):
    """POST /v1/videos/upload (multipart: params + image): the job runs with the picture as its first frame and
    keeps it with the job; a file that is not an image is a 422 naming the field, one over --max-upload-mb a 413."""
    import io

    import numpy as np
    from PIL import Image

    picture = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    png = io.BytesIO()
    picture.save(png, format="PNG")
    params = json.dumps({**SMALL, "prompt": "from a picture", "seed": 4})
    with server.client() as c:
        r = c.post("/v1/videos/upload", data={"params": params}, files={"image": ("p.png", png.getvalue())})
        assert r.status_code == 202, r.text
        job = wait_for(c, r.json()["id"])
        assert job["status"] == "succeeded" and job["params"]["image"].endswith(".png")
        with_picture = c.get(f"/v1/videos/{job['id']}/content").content
        bad = c.post("/v1/videos/upload", data={"params": params}, files={"image": ("x.png", b"not an image")})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "image"
        big = c.post("/v1/videos/upload", data={"params": params}, files={"image": ("x.png", b"0" * (21 * 2**20))})
        assert big.status_code == 413
        invalid = c.post("/v1/videos/upload", data={"params": json.dumps({"prompt": ""})})
        assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"][-1] == "prompt"
    import pathlib

    assert pathlib.Path(job["params"]["image"]).is_file()
    # the frames are the local `generate --image` run's (the picture fixed as frame 0, as tests/test_conditioning.py
    # checks in-process): catches an upload that was ignored, put on the last frame, or decoded with other colours
    from vidfusion.cli.main import main as cli_main

    (tmp_path / "p.png").write_bytes(png.getvalue())
    local = tmp_path / "local.mp4"
    assert cli_main(["generate", "from a picture", "--model", str(server.checkpoint), "--frames", "2", "--height",
                     "32", "--width", "32", "--steps", "2", "--guidance", "7.5", "--seed", "4", "--image",
                     str(tmp_path / "p.png"), "--out", str(local), "--quiet"]) == 0
    served, _ = decode(with_picture, tmp_path)
    expected, _ = decode(local.read_bytes(), tmp_path, "local-copy.mp4")
    assert len(served) == 2 and all((a == b).all() for a, b in zip(served, expected, strict=True))
    plain = tmp_path / "plain.mp4"  # and the same run without the picture has another first frame
    assert cli_main(["generate", "from a picture", "--model", str(server.checkpoint), "--frames", "2", "--height",
                     "32", "--width", "32", "--steps", "2", "--guidance", "7.5", "--seed", "4", "--out", str(plain),
                     "--quiet"]) == 0
    assert not (decode(plain.read_bytes(), tmp_path, "plain-copy.mp4")[0][0] == served[0]).all()
