"""vidfusion.client and `--server` against the real service: the same bytes as a local run, a wait that survives
a kill -9 of the server, a create whose answer is lost that never makes a second job, typed errors, resumable
downloads, and an import that loads no torch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vidfusion.client import AuthError, Client, InvalidRequest, NotFound, QueueFull

from .serve_helpers import Server

HOOKS = Path(__file__).parent / "hooks"
TOKEN = "client-token"
SMALL = {"num_frames": 2, "height": 32, "width": 32, "num_inference_steps": 2}


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "vidfusion", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("client") / "data", "--max-queue", "3",
                 token=TOKEN).start()
    yield srv
    srv.stop()


def test_round_trip_gives_the_local_clis_bytes(server, tiny_checkpoint, tmp_path):
    """Catches a client or `--server` run that writes another file than the local run of the same command."""
    local = tmp_path / "local.mp4"
    assert cli("generate", "a red fox", "--model", str(tiny_checkpoint), "--frames", "2", "--steps", "2",
               "--height", "32", "--width", "32", "--seed", "11", "--out", str(local), "--quiet").returncode == 0
    client = Client(server.url, token=TOKEN)
    job = client.create("a red fox", seed=11, **SMALL)
    seen = []
    final = client.wait(job, on_progress=lambda j: seen.append(j["progress"]["step"]))
    assert final["status"] == "succeeded" and seen[-1] == 2
    assert client.download(final, tmp_path / "client.mp4").read_bytes() == local.read_bytes()
    env = {**os.environ, "VIDFUSION_SERVER": server.url, "VIDFUSION_TOKEN": TOKEN}
    result = cli("generate", "a red fox", "--frames", "2", "--steps", "2", "--height", "32", "--width", "32",
                 "--seed", "11", "--quiet", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a-red-fox.mp4").read_bytes() == local.read_bytes()  # the local name rule, the same bytes
    assert "seed 11" in result.stderr


def test_server_flags_it_cannot_take_are_refused_and_refusals_are_exit_2(server, tmp_path):
    env = {**os.environ, "VIDFUSION_TOKEN": TOKEN}
    local_only = cli("generate", "a cat", "--server", server.url, "--dtype", "bfloat16", env=env, cwd=tmp_path)
    assert local_only.returncode == 2 and "--dtype" in local_only.stderr and not list(tmp_path.iterdir())
    refused = cli("generate", "a cat", "--server", server.url, "--frames", "100000", env=env, cwd=tmp_path)
    assert refused.returncode == 2 and "num_frames" in refused.stderr
    no_token = cli("generate", "a cat", "--server", server.url, env={**os.environ, "VIDFUSION_TOKEN": ""},
                   cwd=tmp_path)
    assert no_token.returncode == 2 and "token" in no_token.stderr
    assert len(no_token.stderr.strip().splitlines()) == 1


def test_typed_errors_carry_the_servers_message(server):
    with pytest.raises(AuthError, match="token"):
        Client(server.url).list()
    client = Client(server.url, token=TOKEN)
    with pytest.raises(InvalidRequest) as invalid:
        client.create("a cat", num_frames=0)
    assert invalid.value.field == "num_frames" and invalid.value.status == 422
    with pytest.raises(NotFound):
        client.get("no-such-job")
    long = {**SMALL, "num_inference_steps": 400, "height": 64, "width": 64, "num_frames": 8}
    jobs = [client.create(f"fill {i}", **long) for i in range(3)]
    try:
        with pytest.raises(QueueFull) as full:
            client.create("one too many", **SMALL)
        assert full.value.retry_after > 0
    finally:
        for job in jobs:
            client.cancel(job)


def test_jobs_command(server, tmp_path):
    client = Client(server.url, token=TOKEN)
    job = client.wait(client.create("a boat", seed=1, **SMALL))
    env = {**os.environ, "VIDFUSION_SERVER": server.url, "VIDFUSION_TOKEN": TOKEN}
    listed = cli("jobs", "list", env=env)
    assert listed.returncode == 0 and job["id"] in listed.stdout and '"a boat"' in listed.stdout
    shown = cli("jobs", "show", job["id"], env=env)
    assert shown.returncode == 0 and '"succeeded"' in shown.stdout
    out = tmp_path / "boat.mp4"
    assert cli("jobs", "download", job["id"], "--out", str(out), env=env).returncode == 0
    assert out.read_bytes() == client.download(job, tmp_path / "again.mp4").read_bytes()
    cancel = cli("jobs", "cancel", job["id"], env=env)
    assert cancel.returncode == 2 and "already finished" in cancel.stderr


def test_download_resumes_with_a_range_request(server, tmp_path):
    """Catches a resumed download that starts over or appends a second copy: a .part holding the first bytes is
    completed by the rest, and the file appears only when whole."""
    client = Client(server.url, token=TOKEN)
    job = client.wait(client.create("a bird", seed=2, **SMALL))
    whole = client.download(job, tmp_path / "whole.mp4").read_bytes()
    target = tmp_path / "resumed.mp4"
    part = tmp_path / f"resumed.mp4.{job['id']}.part"  # named by the job: another job's part is never continued
    part.write_bytes(whole[:1000])
    assert client.download(job, target).read_bytes() == whole
    assert not part.exists()
    part.write_bytes(b"x" * (len(whole) + 10))  # not a prefix of this video (416): started over, not renamed
    assert client.download(job, target).read_bytes() == whole


class _CutProxy:
    """A TCP proxy that forwards the first request to the server and closes the client's connection before the
    answer comes back (the server accepted it; the client never hears so); later connections pass through."""

    def __init__(self, upstream_port: int):
        self.upstream, self.cut_next = upstream_port, True
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        up = socket.create_connection(("127.0.0.1", self.upstream))
        cut, self.cut_next = self.cut_next, False
        conn.settimeout(2)
        data = b""
        try:
            while True:  # the whole request (headers + Content-Length body)
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                if _ and len(body) >= int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                                if line.lower().startswith(b"content-length")), b"0")):
                    break
        except TimeoutError:
            pass
        up.sendall(data)
        answer = up.recv(65536)
        if cut:
            time.sleep(0.5)  # the server has answered: the job exists
            conn.close()
        else:
            conn.sendall(answer)
            conn.close()
        up.close()


def test_a_create_whose_answer_is_lost_makes_one_job(server):
    """Catches a retry without the first attempt's Idempotency-Key: the connection is cut after the server accepted
    the create; the client's retry returns that job, and the server holds one job with this prompt."""
    proxy = _CutProxy(server.port)
    client = Client(f"http://127.0.0.1:{proxy.port}", token=TOKEN, backoff=0.1)
    job = client.create("a lost answer", seed=3, **SMALL)
    direct = Client(server.url, token=TOKEN)
    same = [j for j in direct.list(limit=500) if j["params"]["prompt"] == "a lost answer"]
    assert [j["id"] for j in same] == [job["id"]]
    proxy.listener.close()


def test_wait_survives_a_kill_9_of_the_server(tiny_checkpoint, tmp_path):
    """Catches a wait that dies with the connection: the server is killed mid-job and restarted; the same wait
    returns the finished video, and the job finished once (counted by the hook in the server, not by the API)."""
    log = tmp_path / "generations.log"
    env = {"PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
           "VIDFUSION_TEST_GENERATIONS": str(log)}
    srv = Server(tiny_checkpoint, tmp_path / "data", env=env).start()
    client = Client(srv.url, backoff=0.2)
    job = client.create("a long wait", seed=4, num_frames=4, height=64, width=64, num_inference_steps=30)
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(client.wait(job, timeout=600)), daemon=True)
    waiter.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and client.get(job)["progress"]["step"] < 3:
            time.sleep(0.1)
        srv.kill()
        time.sleep(1.0)
        srv.start()
        waiter.join(600)
        assert result.get("status") == "succeeded" and result["id"] == job["id"]
        assert client.download(job, tmp_path / "v.mp4").stat().st_size > 0
        lines = log.read_text().splitlines()
        assert sum(line.startswith("done") for line in lines) == 1  # finished once
        assert sum(line.startswith("start") for line in lines) == 2  # started twice: the kill came mid-job
        assert len(client.list(limit=500)) == 1
    finally:
        srv.stop()


def test_import_loads_no_torch():
    code = "import sys, vidfusion.client, vidfusion; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()
    assert out == "False"
