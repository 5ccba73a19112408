"""A client for `vidfusion serve`, standard library only (no torch, no httpx): create a job (JSON, or multipart when
files are given), follow it to its end over server-sent events (reconnecting when the connection drops, polling
when events are not available), download its video (atomic, resumable with a Range request), cancel, list.

    from vidfusion.client import Client

    client = Client("http://gpu-box:7860", token="T")
    job = client.create("a corgi surfing a wave", num_frames=16, seed=0)
    client.download(client.wait(job, on_progress=print), "corgi.mp4")

Every `create` sends an Idempotency-Key and retries it on a dropped connection, so a retried create never makes a
second job. Server errors become typed exceptions carrying the server's message (`AuthError` with a token hint,
`InvalidRequest` naming the field, `QueueFull` with the seconds to wait)."""

from __future__ import annotations

import json
import mimetypes
import os
import time
import uuid
from collections.abc import Callable, Iterator
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import quote, urlencode
from urllib.request import Request, urlopen

FINISHED = ("succeeded", "failed", "cancelled")
FILE_FIELDS = ("image", "last_image", "video")


class ClientError(Exception):
    """An error the server answered (4xx), or no answer at all (`status` 0)."""

    def __init__(self, message: str, status: int = 0, detail: Any = None):
        super().__init__(message)
        self.status, self.detail = status, detail


class AuthError(ClientError):
    """401: the server wants a token (Client(token=...), --token or $VIDFUSION_TOKEN) or another one."""


class NotFound(ClientError):
    """404: no such job, or it has no video yet."""


class Conflict(ClientError):
    """409: the job has finished (cancel), or the Idempotency-Key was used with other parameters."""


class TooLarge(ClientError):
    """413: a file over the server's upload limit."""


class InvalidRequest(ClientError):
    """400 / 415 / 422: `field` names what is wrong (None when the whole request is)."""

    @property
    def field(self) -> str | None:
        if isinstance(self.detail, list) and self.detail and isinstance(self.detail[0], dict):
            return str(self.detail[0].get("loc", [None])[-1])
        return None


class QueueFull(ClientError):
    """429: the queue is full; `retry_after` seconds to wait."""

    def __init__(self, message: str, status: int, detail: Any, retry_after: float):
        super().__init__(message, status, detail)
        self.retry_after = retry_after


class Unreachable(ClientError):
    """The server could not be reached (refused, reset, timed out) after the retries."""


ERRORS: dict[int, type[ClientError]] = {401: AuthError, 404: NotFound, 409: Conflict, 413: TooLarge,
                                        400: InvalidRequest, 415: InvalidRequest, 422: InvalidRequest}
TRANSIENT = (OSError, HTTPException)  # refused, reset, timed out (URLError is an OSError), a cut-off response


def _error(exc: HTTPError) -> ClientError:
    """The server's answer as a typed exception carrying its message."""
    try:
        detail = json.loads(exc.read() or b"{}").get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        message = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
                            if isinstance(d, dict)) or str(detail)
    else:
        message = str(detail or exc.reason)
    if exc.code == 401:
        message += " (pass the server's token: Client(url, token=...), --token or $VIDFUSION_TOKEN)"
    if exc.code == 429:
        retry = float(exc.headers.get("Retry-After") or 10)
        return QueueFull(f"{message} (retry in {retry:g} s)", exc.code, detail, retry)
    return ERRORS.get(exc.code, ClientError)(message, exc.code, detail)


def _job_id(job: str | dict[str, Any]) -> str:
    return job["id"] if isinstance(job, dict) else str(job)


class Client:
    """A vidfusion server at `url` (e.g. http://127.0.0.1:7860), with its bearer `token` if it has one."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 0.5):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.retries, self.backoff = retries, backoff

    # ---- HTTP ------------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                 timeout: float | None = None) -> HTTPResponse:
        """One request; its response, open (the caller reads it). 4xx/5xx raise (typed); no answer raises OSError."""
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = Request(self.url + path, data=body, headers=headers, method=method)
        try:
            return urlopen(request, timeout=timeout or self.timeout)
        except HTTPError as exc:
            if exc.code >= 500:
                raise ConnectionError(f"server error {exc.code}") from exc  # retried like a dropped connection
            raise _error(exc) from None

    def _call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
              retry: bool = True) -> Any:
        """A JSON call, retried with backoff on a dropped connection or a 5xx (safe: GETs, idempotent creates)."""
        for attempt in range(self.retries + 1 if retry else 1):
            try:
                with self._request(method, path, body, headers) as response:
                    return json.loads(response.read() or b"null")
            except ClientError:
                raise
            except TRANSIENT as exc:
                if attempt == (self.retries if retry else 0):
                    raise Unreachable(f"{self.url}: no answer ({type(exc).__name__}: {exc})") from None
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    # ---- the API ---------------------------------------------------------------------------------------------------

    def create(self, prompt: str, *, image: str | os.PathLike | None = None,
               last_image: str | os.PathLike | None = None, video: str | os.PathLike | None = None,
               idempotency_key: str | None = None, **params: Any) -> dict[str, Any]:
        """Queue a job: `params` are POST /v1/videos' fields (num_frames, height, width, num_inference_steps,
        guidance_scale, sampler, seed, fps, ...; `strength` with a `video`). Files make it a multipart upload. A
        retry after a dropped connection sends the same Idempotency-Key: one job, whatever happened."""
        key = idempotency_key or uuid.uuid4().hex
        body = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        files = {name: Path(p) for name, p in (("image", image), ("last_image", last_image), ("video", video))
                 if p is not None}
        if not files:
            return self._call("POST", "/v1/videos", json.dumps(body).encode(),
                              {"Content-Type": "application/json", "Idempotency-Key": key})
        boundary = uuid.uuid4().hex
        data = _multipart(boundary, {"params": json.dumps(body)}, files)
        return self._call("POST", "/v1/videos/upload", data,
                          {"Content-Type": f"multipart/form-data; boundary={boundary}", "Idempotency-Key": key})

    def get(self, job: str | dict[str, Any]) -> dict[str, Any]:
        return self._call("GET", f"/v1/videos/{quote(_job_id(job))}")

    def list(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        query = urlencode({k: v for k, v in (("status", status), ("limit", limit)) if v is not None})
        return self._call("GET", f"/v1/videos?{query}")["data"]

    def cancel(self, job: str | dict[str, Any]) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/videos/{quote(_job_id(job))}", retry=False)

    def loras(self) -> list[str]:
        """The LoRA names a request may use (`loras=[{"name": ..., "weight": ...}]`)."""
        return [entry["name"] for entry in self._call("GET", "/v1/loras")["data"]]

    def wait(self, job: str | dict[str, Any], on_progress: Callable[[dict[str, Any]], None] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Follow a job to its end; returns its final record. `on_progress(job)` at each change. The events stream
        is reopened when the connection drops (a server restart: it retries until `timeout`), and replaced by
        polling when the server offers no events."""
        job_id, deadline = _job_id(job), None if timeout is None else time.monotonic() + timeout
        polling, failures = False, 0
        while deadline is None or time.monotonic() < deadline:
            try:
                for state in (self._poll(job_id) if polling else self._events(job_id)):
                    failures = 0
                    if on_progress is not None:
                        on_progress(state)
                    if state["status"] in FINISHED:
                        return state
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                if not polling:  # the stream ended before the job did (a proxy, a restart): ask instead, then again
                    polling = failures > 2
                    failures += 1
                time.sleep(0.5 if polling else min(5.0, self.backoff * 2**min(failures, 4)))
            except NotFound:
                if polling:
                    raise
                polling = True  # no events here (or a proxy drops them): ask instead
            except (Unreachable, *TRANSIENT):  # the connection dropped or the server restarts: again, with backoff
                failures += 1
                time.sleep(min(5.0, self.backoff * 2**min(failures, 4)))
        raise TimeoutError(f"job {job_id} did not finish within {timeout} s")

    def _events(self, job_id: str) -> Iterator[dict[str, Any]]:
        with self._request("GET", f"/v1/videos/{quote(job_id)}/events", headers={"Accept": "text/event-stream"},
                           timeout=max(self.timeout, 30.0)) as response:
            for raw in response:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("data:"):
                    yield json.loads(line[5:].strip())

    def _poll(self, job_id: str) -> Iterator[dict[str, Any]]:
        yield self.get(job_id)

    def download(self, job: str | dict[str, Any], path: str | os.PathLike) -> Path:
        """The job's mp4 written to `path` atomically (a `.part` file beside it named by the job, renamed only when
        every byte the server announced has arrived); an interrupted download resumes from the `.part` with a
        Range request."""
        job_id, path = _job_id(job), Path(path)
        part = path.with_name(f"{path.name}.{job_id}.part")
        for attempt in range(self.retries + 1):
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with self._request("GET", f"/v1/videos/{quote(job_id)}/content", headers=headers) as response:
                    resumed = bool(have) and response.status == 206
                    expected = int(response.headers.get("Content-Length") or -1)
                    got = 0
                    with open(part, "ab" if resumed else "wb") as out:
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                            got += len(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                if 0 <= expected != got:  # the connection closed early (read() returns b"" then): resume
                    raise ConnectionError(f"download cut off after {got} of {expected} bytes")
                os.replace(part, path)
                return path
            except ClientError as exc:
                if exc.status == 416 and have:  # the part is not a prefix of this video (or is all of it): anew
                    part.unlink(missing_ok=True)
                    continue
                raise
            except TRANSIENT:
                if attempt == self.retries:
                    raise Unreachable(f"{self.url}: the download of {job_id} kept failing") from None
                time.sleep(self.backoff * 2**attempt)
        raise Unreachable(f"{self.url}: the download of {job_id} kept failing")


def _multipart(boundary: str, fields: dict[str, str], files: dict[str, Path]) -> bytes:
    """A multipart/form-data body: text fields, then files (read whole: uploads are limited by the server)."""
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, file in files.items():
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{file.name}"\r\n'
                f"Content-Type: {kind}\r\n\r\n").encode()
        parts.append(head + file.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()
