"""`vidfusion serve --ray auto` on a real Ray cluster (`ray start --head` on this machine, CPU actors, the tiny
checkpoint). Generations are counted by a hook in the Ray workers (tests/hooks/sitecustomize.py), not by the
service's own records: a job must be generated once per attempt and written once."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from vidfusion.media.video_io import export_to_video, read_metadata, read_video

from .serve_helpers import SMALL, Server, free_port, wait_for

pytest.importorskip("ray", reason="the ray extra: pip install 'vidfusion[ray]'")

HOOKS = Path(__file__).parent / "hooks"
SLOW = {**SMALL, "num_inference_steps": 300}  # a few seconds per job: long enough to be hit mid-job


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-machine Ray cluster (4 logical CPUs) whose workers log every generation to the returned file."""
    log = tmp_path_factory.mktemp("ray") / "generations.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
           "VIDFUSION_TEST_GENERATIONS": str(log)}
    ray_cli = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_cli, "start", "--head", "--num-cpus", "4", "--include-dashboard=false",
                    "--disable-usage-stats", "--port", str(free_port())], env=env, check=True, capture_output=True)
    yield log
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True)


def generations(log: Path) -> list[tuple[str, int, str]]:
    """(kind, pid, prompt) of every line: start / done / stopped."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [(kind, int(pid), prompt) for kind, pid, prompt in (line.split(" ", 2) for line in lines)]


def started_by(log: Path, prompt: str, timeout: float = 60) -> int:
    """The pid of the worker that started generating `prompt`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = [pid for kind, pid, p in generations(log) if kind == "start" and p == prompt]
        if pids:
            return pids[-1]
        time.sleep(0.05)
    raise TimeoutError(f"no worker started {prompt!r}")


def gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def lora_dir(tiny_checkpoint, tmp_path_factory):
    from vidfusion.pipelines.text_to_video import TextToVideoPipeline

    from .test_serve_inputs import write_lora

    folder = tmp_path_factory.mktemp("ray-loras")
    write_lora(TextToVideoPipeline.from_pretrained(tiny_checkpoint), folder / "motion-pan.safetensors", 1)
    return folder


@pytest.fixture(scope="module")
def ray_server(cluster, tiny_checkpoint, lora_dir, tmp_path_factory):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("serve-ray") / "data", "--ray", "auto", "--workers", "2",
                 "--cpus-per-worker", "1", "--lora-dir", str(lora_dir)).start(timeout=240)
    yield srv
    srv.stop()


def same_request(server: Server, params: dict, video: bytes | None = None) -> bytes:
    """The video `server` makes for this request (multipart when there is an input video)."""
    with server.client() as c:
        if video is None:
            job_id = c.post("/v1/videos", json=params).json()["id"]
        else:
            job_id = c.post("/v1/videos/upload", data={"params": json.dumps(params)},
                            files={"video": ("in.mp4", video)}).json()["id"]
        job = wait_for(c, job_id, timeout=240)
        assert job["status"] == "succeeded", job["error"]
        return c.get(f"/v1/videos/{job_id}/content").content


def test_thirty_jobs_on_two_actors_one_killed_mid_job(cluster, ray_server, tiny_checkpoint, lora_dir, tmp_path):
    """30 jobs from 3 clients and a slow one whose actor is killed (kill -9 by pid) mid-job: the slow job runs again
    with the same seed on a new actor, every job succeeds and is generated to the end exactly once (a pool that
    lost the job, ran it twice or kept a dead actor fails here), and the videos are byte-identical to the
    single-process service's for the same requests."""
    with ray_server.client() as c:
        assert len(c.get("/healthz").json()["workers"]) == 2
        slow = c.post("/v1/videos", json={**SLOW, "prompt": "victim", "seed": 7}).json()
        victim = started_by(cluster, "victim")
        wait_for(c, slow["id"], predicate=lambda job: job["progress"]["step"] >= 3)

        def submit(i: int) -> str:
            with ray_server.client() as own:
                return own.post("/v1/videos", json={**SMALL, "prompt": f"job-{i}", "seed": 100 + i}).json()["id"]

        with ThreadPoolExecutor(3) as clients:
            ids = list(clients.map(submit, range(30)))
        os.kill(victim, signal.SIGKILL)
        jobs = [wait_for(c, job_id, timeout=240) for job_id in [slow["id"], *ids]]
        assert [job["status"] for job in jobs] == ["succeeded"] * 31, [job["error"] for job in jobs]
        pids = [worker["pid"] for worker in c.get("/healthz").json()["workers"]]
        assert len(pids) == 2 and victim not in pids  # the dead actor was replaced
        videos = {job["params"]["prompt"]: c.get(f"/v1/videos/{job['id']}/content").content for job in jobs}
    log = generations(cluster)
    done = collections.Counter(p for kind, _, p in log if kind == "done")
    assert all(done[job["params"]["prompt"]] == 1 for job in jobs), done
    victim_starts = [pid for kind, pid, p in log if kind == "start" and p == "victim"]
    assert len(victim_starts) == 2 and victim_starts[0] == victim and victim_starts[1] != victim
    assert {pid for kind, pid, p in log if kind == "start"} - {victim} <= set(pids) | {victim}

    # the same requests on the single-process service; a LoRA and an input video travel to the actors as bytes
    frames = (np.random.default_rng(0).random((3, 32, 32, 3)) * 255).astype(np.uint8)
    clip = Path(export_to_video(frames, str(tmp_path / "in.mp4"), fps=8)).read_bytes()
    styled = {"prompt": "styled", "seed": 9, "num_inference_steps": 2, "strength": 0.5,
              "loras": [{"name": "motion-pan", "weight": 0.6}]}
    on_ray = same_request(ray_server, styled, clip)
    local = Server(tiny_checkpoint, tmp_path / "local", "--lora-dir", str(lora_dir)).start()
    try:
        for prompt, params in [("victim", {**SLOW, "seed": 7}), ("job-0", {**SMALL, "seed": 100}),
                               ("job-29", {**SMALL, "seed": 129})]:
            assert same_request(local, {**params, "prompt": prompt}) == videos[prompt], prompt
        here = same_request(local, styled, clip)  # its file records each server's own copy of the input
        (tmp_path / "ray.mp4").write_bytes(on_ray)
        (tmp_path / "local.mp4").write_bytes(here)
        np.testing.assert_array_equal(read_video(tmp_path / "ray.mp4"), read_video(tmp_path / "local.mp4"))
        ray_meta, local_meta = read_metadata(tmp_path / "ray.mp4"), read_metadata(tmp_path / "local.mp4")
        assert ray_meta.pop("init_video") != local_meta.pop("init_video") and ray_meta == local_meta
        assert ray_meta["loras"] == [{"path": str((lora_dir / "motion-pan.safetensors").resolve()), "weight": 0.6}]
    finally:
        local.stop()


def test_cancel_reaches_the_running_actor(cluster, ray_server):
    """DELETE on a job running on an actor stops the generation there at its next step (a pool that only marked
    the job cancelled would leave the actor busy for all 300 steps and log it as done)."""
    with ray_server.client() as c:
        job = c.post("/v1/videos", json={**SLOW, "prompt": "to-cancel", "seed": 1}).json()
        wait_for(c, job["id"], predicate=lambda j: j["progress"]["step"] >= 2)
        assert c.delete(f"/v1/videos/{job['id']}").json()["status"] == "cancelled"
        deadline = time.time() + 30
        while time.time() < deadline and not any(k == "stopped" and p == "to-cancel"
                                                 for k, _, p in generations(cluster)):
            time.sleep(0.05)
        kinds = [k for k, _, p in generations(cluster) if p == "to-cancel"]
        assert kinds == ["start", "stopped"]
        final = c.get(f"/v1/videos/{job['id']}").json()
        assert final["status"] == "cancelled" and final["progress"]["step"] < SLOW["num_inference_steps"]
        assert c.get(f"/v1/videos/{job['id']}/content").status_code == 404
        after = wait_for(c, c.post("/v1/videos", json={**SMALL, "prompt": "after-cancel"}).json()["id"])
        assert after["status"] == "succeeded"


def test_api_killed_with_kill_9_and_restarted_while_actors_run(cluster, tiny_checkpoint, tmp_path):
    """kill -9 of the API process (the Ray driver) mid-job: its actors go with it; on restart the running job runs
    again on a new actor, the finished video stays as it was, the queued one runs, nothing runs twice to the end."""
    srv = Server(tiny_checkpoint, tmp_path / "data", "--ray", "auto", "--workers", "1", "--cpus-per-worker",
                 "1").start(timeout=240)
    try:
        with srv.client() as c:
            first = wait_for(c, c.post("/v1/videos", json={**SMALL, "prompt": "before-kill", "seed": 3}).json()["id"])
            video = c.get(f"/v1/videos/{first['id']}/content").content
            running = c.post("/v1/videos", json={**SLOW, "prompt": "during-kill", "seed": 4}).json()
            queued = c.post("/v1/videos", json={**SMALL, "prompt": "queued-at-kill", "seed": 5}).json()
            wait_for(c, running["id"], predicate=lambda j: j["progress"]["step"] >= 2)
            old_actor = c.get("/healthz").json()["workers"][0]["pid"]
        srv.kill()
        assert gone(old_actor), "the dead driver's actor is still alive"
        srv.start(timeout=240)
        with srv.client() as c:
            jobs = [wait_for(c, job_id, timeout=240) for job_id in (first["id"], running["id"], queued["id"])]
            assert [job["status"] for job in jobs] == ["succeeded"] * 3
            assert c.get(f"/v1/videos/{first['id']}/content").content == video
            assert c.get("/healthz").json()["workers"][0]["pid"] != old_actor
            # a clean stop (SIGINT) mid-job leaves the job running, not failed; the next start finishes it
            stopped = c.post("/v1/videos", json={**SLOW, "prompt": "during-stop", "seed": 6}).json()
            wait_for(c, stopped["id"], predicate=lambda j: j["progress"]["step"] >= 2)
        srv.stop()
        assert srv.proc.returncode == 0
        srv.start(timeout=240)
        with srv.client() as c:
            assert wait_for(c, stopped["id"], timeout=240)["status"] == "succeeded"
    finally:
        srv.stop()
    log = generations(cluster)
    done = collections.Counter(p for kind, _, p in log if kind == "done")
    starts = collections.Counter(p for kind, _, p in log if kind == "start")
    assert done["before-kill"] == done["during-kill"] == done["queued-at-kill"] == done["during-stop"] == 1
    assert starts["during-kill"] == 2 and starts["before-kill"] == 1


def test_every_job_lora_files_travel_to_the_actors_as_bytes(cluster, tiny_checkpoint, lora_dir, tmp_path):
    """`--lora FILE` with Ray: actors (maybe on machines without that path) load the server's bytes. The file is
    removed once the service runs and the actor killed: its replacement still applies the LoRA (an actor that
    loaded the path fails to start), the videos are byte-identical and record the server's path of the file."""
    import shutil

    style = tmp_path / "style.safetensors"
    shutil.copy(lora_dir / "motion-pan.safetensors", style)
    srv = Server(tiny_checkpoint, tmp_path / "data", "--ray", "auto", "--workers", "1", "--cpus-per-worker", "1",
                 "--lora", f"{style}:0.7").start(timeout=240)
    try:
        request = {**SMALL, "prompt": "every-job lora", "seed": 11}
        before = same_request(srv, request)
        style.unlink()
        with srv.client() as c:
            actor = c.get("/healthz").json()["workers"][0]["pid"]
        os.kill(actor, signal.SIGKILL)
        assert gone(actor)
        after = same_request(srv, request)
        with srv.client() as c:
            assert c.get("/healthz").json()["workers"][0]["pid"] != actor
    finally:
        srv.stop()
    assert after == before
    (tmp_path / "after.mp4").write_bytes(after)
    assert read_metadata(tmp_path / "after.mp4")["loras"] == [{"path": str(style), "weight": 0.7}]


class _FlakyRay:
    """Enough of the `ray` module for _Slot._follow: the job's call finishes after `finish_after` polls; polls
    raise ActorUnavailableError while `unreachable(poll number)` says so."""

    def __init__(self, finish_after: int, unreachable):
        import ray

        self.exceptions, self.polls, self.finish_after, self.unreachable = ray.exceptions, 0, finish_after, unreachable

    def wait(self, refs, timeout=None):
        return (refs, []) if self.polls >= self.finish_after else ([], refs)

    def get(self, ref):
        self.polls += 1
        if self.unreachable(self.polls):
            raise self.exceptions.ActorUnavailableError("unreachable", None)
        return None


def _follow_with(ray_module) -> None:
    from types import SimpleNamespace

    from vidfusion.serve.jobs import RUNNING
    from vidfusion.serve.ray_workers import _Slot

    poll = SimpleNamespace(options=lambda **kw: SimpleNamespace(remote=lambda *a: "poll"))
    store = SimpleNamespace(status_of=lambda job_id: RUNNING)
    slot = _Slot(SimpleNamespace(_ray=ray_module, store=store, stopping=False), 0)
    slot._follow(SimpleNamespace(poll=poll), "job", "run-ref")


def test_an_actor_unreachable_for_a_moment_keeps_its_job(monkeypatch):
    """ActorUnavailableError (a network blip, a busy node) is not a death: following the job goes on through a
    few unreachable polls (a pool that took it for a death killed the actor and ran the job again elsewhere); past
    UNREACHABLE_GRACE it is a loss, as an ActorDiedError is."""
    from vidfusion.serve import ray_workers

    _follow_with(_FlakyRay(finish_after=6, unreachable=lambda n: 2 <= n <= 4))  # returns: the job stays here
    monkeypatch.setattr(ray_workers, "UNREACHABLE_GRACE", 0.0)
    import ray

    with pytest.raises(ray.exceptions.ActorUnavailableError):
        _follow_with(_FlakyRay(finish_after=1000, unreachable=lambda n: n >= 2))
