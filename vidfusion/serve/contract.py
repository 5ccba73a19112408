"""The API's contract as the OpenAPI schema states it: response bodies (Job, JobList, LoraList, Error), every
status each operation can answer (`responses(...)`), and the handlers that keep the code to it: one error body
shape for every 4xx, validation errors that echo no raw bytes (a non-UTF-8 body is a 422, never a 500), and
`Allow` headers that list every method of a path."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .jobs import STATUSES


class ErrorItem(BaseModel):
    """One problem with a request: where (`["body", "num_frames"]`), what, and its kind."""

    loc: list[str | int]
    msg: str
    type: str


class Error(BaseModel):
    """Every 4xx body: `detail` is one line, or a list naming each field that is wrong (422)."""

    detail: str | list[ErrorItem]


class Progress(BaseModel):
    step: int
    total: int


class Job(BaseModel):
    """A job as the API shows it: `params` are the request's with this server's defaults filled in."""

    id: str
    status: Literal[STATUSES]  # type: ignore[valid-type]
    progress: Progress
    error: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    params: dict[str, Any]


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]


class LoraName(BaseModel):
    name: str


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraName]
    base: list[dict[str, Any]]


class Health(BaseModel):
    """`ok`, or `degraded` (503) when a worker died; the rest only for the token holder."""

    status: Literal["ok", "degraded"]
    model: str | None = None
    workers: list[dict[str, Any]] | None = None
    pending: int | None = None
    dead_workers: list[str] | None = None


DESCRIPTIONS = {
    400: "Malformed request (Host not this server's, a broken Content-Length or body)",
    401: "Missing or wrong bearer token",
    403: "Cross-site request from another origin",
    404: "No such job, or it has no file of that kind yet",
    405: "Method not allowed on this path (`Allow` lists the allowed ones)",
    408: "The request body stalled (nothing received for 30 s before its end)",
    409: "Conflict: the job has finished, or the Idempotency-Key was used with other parameters",
    413: "Body or file over this server's upload limit (--max-upload-mb)",
    415: "Unsupported Content-Type for this operation",
    422: "A field is wrong: `detail` names it",
    429: "The queue is full, or (uploads) --max-concurrent-uploads requests are being read: retry after "
         "`Retry-After` seconds",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of an operation: each status it can answer, with the one error body."""
    return {status: {"model": Error, "description": DESCRIPTIONS[status]} for status in sorted(statuses)}


def _safe(value: Any) -> Any:
    """A validation error's echo of the input made JSON-safe: bytes as text with replacement characters."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:200]).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe(v) for v in value]
    return value


def _leaf_routes(routes: list[Any]) -> Any:
    """Every endpoint route, through included routers (FastAPI keeps them as one entry with `original_router`)."""
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:
            yield from _leaf_routes(inner)
        else:
            yield route


def install_handlers(app: FastAPI) -> None:
    """422s that never fail on their own echo, and 405s whose Allow lists every method of the path."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(p) if not isinstance(p, int) else p for p in e.get("loc", ())],
                   "msg": str(e.get("msg", "invalid value")), "type": str(e.get("type", "value_error"))}
                  for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(_safe(errors))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            matched = [r for r in _leaf_routes(app.router.routes) if r.matches(request.scope)[0] != Match.NONE]
            path = matched[0].path if matched else None  # the template the router picks (first in order)
            methods = {m for r in matched if r.path == path for m in (getattr(r, "methods", None) or ())}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
