"""What every request passes before any route sees it (an ASGI middleware): the `Host` it names (a DNS-rebound page
names its own host, not this server's), the `Origin` of calls to /v1 (another site's page may not drive a local
server: a multipart POST is a CORS "simple request", sent without a preflight) and the size of its body (announced
sizes answered 413 before a byte is read; bodies without a length cut off at the cap while they arrive)."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import HTTPException

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
JSON_BODY_LIMIT = 256 * 1024  # POST /v1/videos: parameters only
CONTENT_TYPES = {"/v1/videos": ("application/json",),  # what each POST route's body may be
                 "/v1/videos/upload": ("multipart/form-data", "application/x-www-form-urlencoded")}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """`example.com:7860` -> `example.com`; `[::1]:7860` -> `::1` (lower case)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(bind_host: str) -> frozenset[str] | None:
    """The `Host` names a server bound to `bind_host` answers: loopback names and the bound name; None (any) for a
    server bound to every interface (it needs a token)."""
    if bind_host.strip().lower() in WILDCARD_HOSTS:
        return None
    return LOOPBACK_NAMES | {host_name(bind_host)}


class RequestGuard:
    """The middleware: 400 for a Host this server is not, 403 for a cross-site /v1 call, 415 for a POST body of
    another type than its route takes, 413 for a body over `upload_limit` bytes on the upload route (over
    JSON_BODY_LIMIT elsewhere)."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None, upload_limit: int,
                 origins: frozenset[str] = frozenset()):
        """origins: other sites' origins whose pages may call /v1 (--allowed-origin; e.g. the public name of a
        proxy that rewrites `Host` to this server's address), as `origin_of` writes them."""
        self.app, self.hosts, self.upload_limit, self.origins = app, hosts, upload_limit, origins

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return await _refuse(send, 400, f"Host {host!r} is not this server's name (a DNS-rebinding guard); "
                                            f"use http://127.0.0.1 or start the server with --host NAME")
        path = scope.get("path", "")
        origin = headers.get("origin")
        if path.startswith("/v1") and origin is not None and not (_same_origin(origin, host)
                                                                  or _origin_key(origin) in self.origins):
            return await _refuse(send, 403, f"cross-site request from {origin!r} refused: only this server's own "
                                            "page may call /v1 from a browser")
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        wanted = CONTENT_TYPES.get(path) if scope.get("method") == "POST" else None
        if wanted is not None and kind not in wanted:
            return await _refuse(send, 415, f"{path} takes {' or '.join(wanted)}, not "
                                            f"{kind or 'a body without a Content-Type'}")
        limit = self.upload_limit if path == "/v1/videos/upload" else JSON_BODY_LIMIT
        length = headers.get("content-length")
        valid = length is not None and re.fullmatch(r"[0-9]{1,18}", length) is not None
        if length is not None and (not valid or int(length) > limit):
            return await _refuse(send, 413 if valid else 400,
                                 f"request body of {length} bytes: this server takes at most {limit} here "
                                 "(--max-upload-mb)" if valid else "malformed Content-Length")
        await self.app(scope, _capped(receive, limit), send)


def _origin_key(origin: str) -> str | None:
    parts = urlsplit(origin.strip())
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme in ("http", "https") and parts.netloc else None


def origin_of(url: str) -> str:
    """An --allowed-origin value checked and normalized (`https://Videos.example.com/` -> `https://videos.example.com`):
    scheme and host[:port] only, as browsers send `Origin`."""
    key = _origin_key(url)
    if key is None or urlsplit(url.strip()).path not in ("", "/") or "?" in url or "#" in url:
        raise ValueError(f"--allowed-origin {url!r} is not an origin: give scheme://host[:port], e.g. "
                         "https://videos.example.com")
    return key


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


def _capped(receive: Callable, limit: int) -> Callable:
    """`receive` that stops a body (sent without a length, or longer than it said) at `limit` bytes with a 413."""
    seen = 0

    async def capped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body over this server's {limit} bytes (--max-upload-mb)")
        return message

    return capped


async def _refuse(send: Callable, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
