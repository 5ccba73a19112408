"""What every request passes before any route sees it (an ASGI middleware): the `Host` it names (a DNS-rebound page
names its own host, not this server's), the `Origin` of calls to /v1 (another site's page may not drive a local
server: a multipart POST is a CORS "simple request", sent without a preflight), the size of its body (announced
sizes answered 413 before a byte is read; bodies without a length cut off at the cap while they arrive) and, for
uploads, a free upload slot (429 before the body is received: the multipart parser holds parts in memory)."""

from __future__ import annotations

import asyncio
import hmac
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
UPLOAD_PATH = "/v1/videos/upload"
TOKEN_REFUSED = "missing or wrong token: send 'Authorization: Bearer <token>'"  # every 401
CONTENT_TYPES = {"/v1/videos": ("application/json",),  # what each POST route's body may be
                 UPLOAD_PATH: ("multipart/form-data", "application/x-www-form-urlencoded")}


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


def bearer_matches(authorization: str | None, token: str | None) -> bool:
    """`Authorization: Bearer <token>` names this server's token (compared in constant time); True without one."""
    if token is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class RequestGuard:
    """The middleware: 400 for a Host this server is not, 403 for a cross-site /v1 call, 415 for a POST body of
    another type than its route takes, 413 for a body over `upload_limit` bytes on the upload route (over
    JSON_BODY_LIMIT elsewhere); on the upload route also 401 without the token and 429 when `upload_slots`
    uploads are being received, both before the body is read."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None, upload_limit: int,
                 origins: frozenset[str] = frozenset(), upload_slots: int = 4, token: str | None = None):
        """origins: other sites' origins whose pages may call /v1 (--allowed-origin; e.g. the public name of a
        proxy that rewrites `Host` to this server's address), as `origin_of` writes them; upload_slots: uploads
        received, parsed and read at once (--max-concurrent-uploads); token: the server's bearer token."""
        self.app, self.hosts, self.upload_limit, self.origins = app, hosts, upload_limit, origins
        self.slots_total, self.uploads, self.token = upload_slots, asyncio.Semaphore(upload_slots), token

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
        upload = path == UPLOAD_PATH and scope.get("method") == "POST"
        limit = self.upload_limit if upload else JSON_BODY_LIMIT
        length = headers.get("content-length")
        valid = length is not None and re.fullmatch(r"[0-9]{1,18}", length) is not None
        if length is not None and (not valid or int(length) > limit):
            return await _refuse(send, 413 if valid else 400,
                                 f"request body of {length} bytes: this server takes at most {limit} here "
                                 "(--max-upload-mb)" if valid else "malformed Content-Length")
        if not upload:
            return await self.app(scope, _capped(receive, limit), send)
        if not bearer_matches(headers.get("authorization"), self.token):  # a stranger holds no upload slot
            return await _refuse(send, 401, TOKEN_REFUSED,
                                 [(b"www-authenticate", b"Bearer")])
        if self.uploads.locked():  # no wait (a waiting request would hold its connection): retry later
            return await _refuse(send, 429, f"{self.slots_total} uploads are being received now (this server's "
                                            "--max-concurrent-uploads); retry after Retry-After seconds",
                                 [(b"retry-after", b"2")])
        async with self.uploads:  # the multipart parser, the route's reads and checks: this many at once
            await self.app(scope, _capped(receive, limit), send)


DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_key(origin: str) -> str | None:
    """An origin as browsers serialize it (scheme://host[:port], lower case, IDNA host, no default port), or None
    when `origin` is not one (userinfo, a path, a bad port, a wildcard, spaces, `null`)."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc or "@" in parts.netloc or parts.query or parts.fragment:
        return None
    if parts.path not in ("", "/"):
        return None
    try:
        port, host = parts.port, (parts.hostname or "")
        host = host.encode("idna").decode("ascii") if host and not host.startswith("[") and ":" not in host else host
    except (ValueError, UnicodeError):
        return None
    if not host or not re.fullmatch(r"[a-z0-9.\-]+|[0-9a-f:.]+", host) or host.startswith(".") or ".." in host:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + ("" if port in (None, DEFAULT_PORTS[parts.scheme]) else f":{port}")


def origin_of(url: str) -> str:
    """An --allowed-origin value checked and normalized (`https://Videos.example.com:443/` ->
    `https://videos.example.com`): scheme and host[:port] only, as browsers send `Origin`."""
    key = _origin_key(url)
    if key is None:
        raise ValueError(f"--allowed-origin {url!r} is not an origin: give scheme://host[:port], e.g. "
                         "https://videos.example.com")
    return key


def _same_origin(origin: str, host: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


BODY_IDLE_SECONDS = 30.0  # a body that stalls this long between two pieces is cut off (408)


def _capped(receive: Callable, limit: int) -> Callable:
    """`receive` that stops a body (sent without a length, or longer than it said) at `limit` bytes with a 413, and
    one that stalls BODY_IDLE_SECONDS before its end with a 408 (a slow sender cannot hold an upload slot forever)."""
    seen, complete, idle = 0, False, BODY_IDLE_SECONDS

    async def capped() -> dict:
        nonlocal seen, complete
        if complete:  # after the body: waiting for a disconnect has no deadline
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), idle)
        except TimeoutError:
            raise HTTPException(408, f"the request body stalled for {idle:g} s; send it without pauses") from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if seen > limit:
                raise HTTPException(413, f"request body over this server's {limit} bytes (--max-upload-mb)")
        else:
            complete = True
        return message

    return capped


async def _refuse(send: Callable, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None
                  ) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
