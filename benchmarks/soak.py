"""Soak the service: `vidfusion serve` on a tiny random checkpoint for N minutes under mixed valid and hostile
requests, then report its peak RSS, open files, disk used, and jobs lost / duplicated (both must be 0).

    python benchmarks/soak.py --minutes 5 [--clients 4] [--schemathesis]

Valid traffic: small jobs from several clients, each create sent with an Idempotency-Key and sent twice (a retry),
then followed to the end. Hostile traffic, from another client: 50 MB announcements to a 1 MB server, uploads that
decode huge (a 1024x1024 H.264 on a 64x64 server, a large PNG), ffconcat scripts, garbage and non-UTF-8 bodies,
wrong content types, DNS-rebinding Host headers and cross-site Origins, prompts that edit 40 times, output
interpolation bombs. With --schemathesis, `st run --checks all` runs in a loop beside them. Any 5xx is counted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

TOKEN = "soak-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> tuple[int, int]:
    """(peak RSS bytes, open file descriptors) of a process, from /proc."""
    hwm = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return hwm, len(os.listdir(f"/proc/{pid}/fd"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Soak:
    def __init__(self, url: str, stop: threading.Event):
        self.url, self.stop = url, stop
        self.accepted: dict[str, str] = {}  # idempotency key -> job id
        self.duplicates = 0
        self.server_errors: list[str] = []
        self.hostile = 0
        self.lock = threading.Lock()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def note(self, r: httpx.Response, what: str) -> None:
        if r.status_code >= 500:
            with self.lock:
                self.server_errors.append(f"{what}: {r.status_code} {r.text[:200]}")

    def valid(self, seed: int) -> None:
        rng = random.Random(seed)
        with self.client() as c:
            while not self.stop.is_set():
                key = uuid.uuid4().hex
                body = {"prompt": f"soak {rng.random():.6f}", "num_frames": 2, "height": 32, "width": 32,
                        "num_inference_steps": 2, "seed": rng.randrange(1000)}
                ids = set()
                for _ in range(2):  # a create and its retry
                    r = c.post("/v1/videos", json=body, headers={"Idempotency-Key": key})
                    self.note(r, "create")
                    if r.status_code == 202:
                        ids.add(r.json()["id"])
                    elif r.status_code == 429:
                        time.sleep(float(r.headers.get("Retry-After", 1)) / 5)
                if ids:
                    with self.lock:
                        self.duplicates += len(ids) - 1
                        self.accepted[key] = ids.pop()

    def hostile_loop(self, inputs: dict[str, bytes]) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        attacks = [
            lambda c: c.post("/v1/videos/upload", files={"video": ("big.mp4", inputs["big_video"], "video/mp4")},
                             data={"params": json.dumps({"prompt": "x"})}),
            lambda c: c.post("/v1/videos/upload", files={"image": ("big.png", inputs["big_png"], "image/png")},
                             data={"params": json.dumps({"prompt": "x"})}),
            lambda c: c.post("/v1/videos/upload", files={"video": ("x.ffconcat", inputs["ffconcat"])},
                             data={"params": json.dumps({"prompt": "x"})}),
            lambda c: c.post("/v1/videos", content=os.urandom(512), headers={"Content-Type": "application/json"}),
            lambda c: c.post("/v1/videos", content=b"\xff\xfe" * 100, headers={"Content-Type": "text/plain"}),
            lambda c: c.get("/v1/videos", headers={"Host": "rebound.example"}),
            lambda c: c.post("/v1/videos", json={"prompt": "x"}, headers={"Origin": "http://evil.example"}),
            lambda c: c.post("/v1/videos", json={"prompt": " ".join(f"[a{i}:b{i}:{i + 1}]" for i in range(40)),
                                                 "num_inference_steps": 50}),
            lambda c: c.post("/v1/videos", json={"prompt": "x", "num_frames": 8, "fps": 1, "interpolate_fps": 120}),
            lambda c: c.get("/v1/videos/" + "%ff" * 50),
        ]
        with self.client() as c:
            while not self.stop.is_set():
                attack = random.choice(attacks)
                try:
                    self.note(attack(c), "hostile")
                except httpx.HTTPError:
                    pass
                self.announce_huge(port)
                with self.lock:
                    self.hostile += 2

    def announce_huge(self, port: int) -> None:
        head = (f"POST /v1/videos/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {50 * 2**20}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head.encode() + b"--x\r\n")
            status = s.recv(4096).split(b" ", 2)[1:2]
            if status and status[0].startswith(b"5"):
                with self.lock:
                    self.server_errors.append("announcement: 5xx")


def hostile_inputs(folder: Path) -> dict[str, bytes]:
    from vidfusion import export_to_video

    video = export_to_video(np.zeros((4, 1024, 1024, 3), np.uint8), folder / "big.mp4", fps=8)
    png = io.BytesIO()
    Image.new("L", (3000, 3000)).save(png, format="PNG")
    return {"big_video": Path(video).read_bytes(), "big_png": png.getvalue(),
            "ffconcat": b"ffconcat version 1.0\nfile big.mp4\n"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--schemathesis", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vidfusion-soak-"))
    subprocess.run([sys.executable, "-m", "vidfusion", "init-random", str(work / "tiny")], check=True,
                   capture_output=True)
    data, port = work / "data", free_port()
    server = subprocess.Popen([sys.executable, "-m", "vidfusion", "serve", "--model", str(work / "tiny"),
                               "--data-dir", str(data), "--port", str(port), "--max-upload-mb", "1", "--max-frames",
                               "16", "--max-pixels", str(64 * 64), "--max-queue", "20", "--log-level", "error"],
                              env={**os.environ, "VIDFUSION_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    stop = threading.Event()
    soak = Soak(url, stop)
    threads = [threading.Thread(target=soak.valid, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=soak.hostile_loop, args=(hostile_inputs(work),)))
    st = None
    # (run in work/: schemathesis keeps its case cache in the working directory)
    if args.schemathesis and shutil.which("st"):
        st = subprocess.Popen(f"while true; do st run {url}/openapi.json --checks all -n 5 -H 'Authorization: "
                              f"Bearer {TOKEN}' --no-color >> {work}/st.log 2>&1; done", shell=True, cwd=work)
    for t in threads:
        t.start()
    peak_fds, peak_disk, started = 0, 0, time.time()
    while time.time() - started < args.minutes * 60:
        time.sleep(2)
        _, fds = proc_stats(server.pid)
        peak_fds, peak_disk = max(peak_fds, fds), max(peak_disk, folder_bytes(data))
    stop.set()
    if st is not None:
        st.kill()
    for t in threads:
        t.join()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        deadline = time.time() + 600
        while time.time() < deadline and c.get("/healthz").json().get("pending"):
            time.sleep(1)
        stored = c.get("/v1/videos", params={"limit": 500}).json()["data"]
    peak_rss, _ = proc_stats(server.pid)
    server.terminate()
    server.wait(30)
    ids = {job["id"] for job in stored}
    lost = [job_id for job_id in soak.accepted.values() if job_id not in ids]
    unfinished = [job["id"] for job in stored if job["status"] not in ("succeeded", "failed", "cancelled")]
    print(f"minutes {args.minutes:g}, valid creates {2 * len(soak.accepted)} (each sent twice), hostile requests "
          f"{soak.hostile}, schemathesis {'on' if st else 'off'}")
    print(f"peak RSS {peak_rss / 2**20:.0f} MiB, peak open files {peak_fds}, peak data dir {peak_disk / 2**20:.1f} MiB")
    print(f"jobs accepted {len(soak.accepted)}, lost {len(lost)}, duplicated {soak.duplicates}, left unfinished "
          f"{len(unfinished)}, 5xx answers {len(soak.server_errors)}")
    for line in soak.server_errors[:5]:
        print("  5xx:", line)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
