"""Start the real `vidfusion serve` as a subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SMALL = {"num_frames": 2, "height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 7.5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, data_dir: Path, *args: str, token: str | None = None,
                 env: dict[str, str] | None = None):
        self.checkpoint, self.data_dir, self.args, self.token, self.env = checkpoint, data_dir, args, token, env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 120) -> Server:
        env = {**os.environ, **self.env, "VIDFUSION_TOKEN": self.token or ""}
        cmd = [sys.executable, "-m", "vidfusion", "serve", "--model", str(self.checkpoint), "--data-dir",
               str(self.data_dir), "--port", str(self.port), "--log-level", "warning", *self.args]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server did not start: {self.log.read_text()[-2000:]}")

    def client(self, token: str | None = "default") -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for(client: httpx.Client, job_id: str, done=("succeeded", "failed", "cancelled"), timeout: float = 120,
             predicate=None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/videos/{job_id}").json()
        if (predicate(job) if predicate else job["status"] in done):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} still {job['status']} ({json.dumps(job['progress'])})")
