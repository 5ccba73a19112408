"""The HTTP service: REST jobs API under /v1, server-sent progress events, the web UI at /."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

from ..sampling.names import SAMPLER_NAMES
from .contract import Health, Job, JobList, LoraList, install_handlers, responses
from .guard import TOKEN_REFUSED, RequestGuard, allowed_hosts, bearer_matches, origin_of
from .jobs import FINISHED, STATUSES, JobStore
from .params import ServeSettings, VideoRequest, limited, submit_job, video_params
from .ui import render_ui
from .uploads import add_upload_route, upload_body_limit


def _token_check(settings: ServeSettings):
    """The /v1 dependency: a bearer token when the server has one (compared in constant time)."""

    def require_token(authorization: str | None = Header(default=None)) -> None:
        if not bearer_matches(authorization, settings.token):
            raise HTTPException(401, TOKEN_REFUSED,
                                headers={"WWW-Authenticate": "Bearer"})

    return require_token


async def _job_events(store: JobStore, job_id: str, request: Request) -> AsyncIterator[str]:
    """Server-sent events: the job's JSON whenever its status or step changes, until it is finished."""
    last, idle, n = None, 0.0, 0
    while True:
        job = store.get(job_id)
        state = (job.status, job.step, job.total)
        if state != last:
            n += 1
            yield f"id: {n}\ndata: {json.dumps(job.to_json())}\n\n"
            last, idle = state, 0.0
        if job.status in FINISHED or await request.is_disconnected():
            return
        await asyncio.sleep(0.1)
        idle += 0.1
        if idle >= 15:
            yield ": keep-alive\n\n"
            idle = 0.0


# a created job's id leads to its other operations (generated clients and stateful tests follow these)
JOB_LINKS = {name: {"operationId": name, "parameters": {"job_id": "$response.body#/id"}}
             for name in ("get_video", "cancel_video", "video_content", "video_events", "video_poster",
                          "video_preview")}
COMMON = (400, 401, 403, 405)  # what any /v1 operation may answer before its own checks (guard, token, method)


def _add_file_routes(api: APIRouter, store: JobStore, find: Any) -> None:
    """A job's files: the video, the latest preview, the poster (`find(job_id)`: the job, or 404)."""

    @api.get("/videos/{job_id}/content", operation_id="video_content", response_class=FileResponse, responses={
        200: {"content": {"video/mp4": {}}, "description": "The mp4 (Range requests resume a download)"},
        **responses(*COMMON, 404)})
    def video_content(job_id: str) -> FileResponse:
        job = find(job_id)
        path = store.video_path(job.id)
        if job.status != "succeeded" or not path.exists():
            raise HTTPException(404, f"job {job.id} has no video yet (status: {job.status})")
        return FileResponse(path, media_type="video/mp4", filename=f"vidfusion-{job.id}.mp4",
                            content_disposition_type="inline")

    def image(path, job, what: str, media_type: str) -> Response:
        """A small picture read whole in one open: the preview is replaced (renamed over) at every step, so a
        FileResponse's stat-then-open could announce one file's length and send another's bytes (a cut response)."""
        try:
            data = None if what == "poster" and job.status != "succeeded" else path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is None:
            raise HTTPException(404, f"job {job.id} has no {what} yet (status: {job.status})")
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-store"})

    @api.get("/videos/{job_id}/preview", operation_id="video_preview", response_class=Response, responses={
        200: {"content": {"image/png": {}}, "description": "PNG"}, **responses(*COMMON, 404)})
    def video_preview(job_id: str) -> Response:
        """The latest step's latent preview (PNG, the middle frame): while a job runs and after."""
        job = find(job_id)
        return image(store.preview_path(job.id), job, "preview", "image/png")

    @api.get("/videos/{job_id}/poster", operation_id="video_poster", response_class=Response, responses={
        200: {"content": {"image/jpeg": {}}, "description": "JPEG"}, **responses(*COMMON, 404)})
    def video_poster(job_id: str) -> Response:
        """A frame of the finished video (JPEG)."""
        job = find(job_id)
        return image(store.poster_path(job.id), job, "poster", "image/jpeg")


def _jobs_api(store: JobStore, settings: ServeSettings) -> APIRouter:
    """The REST jobs API under /v1."""
    api = APIRouter(prefix="/v1", dependencies=[Depends(_token_check(settings))])

    def find(job_id: str):
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job with id {job_id!r}")
        return job

    def create_video(body: VideoRequest,
                     idempotency_key: str | None = Header(default=None, max_length=200)) -> dict[str, Any]:
        """Queue a video job (JSON body). A retry with the same Idempotency-Key returns the same job."""
        return submit_job(store, video_params(body, settings), idempotency_key, settings)

    create_video.__annotations__["body"] = limited(VideoRequest, settings)  # this server's limits in the schema
    api.post("/videos", status_code=202, response_model=Job, operation_id="create_video",
             responses={202: {"description": "Queued", "links": JOB_LINKS},
                        **responses(*COMMON, 408, 409, 413, 415, 422, 429)})(create_video)

    add_upload_route(api, store, settings, JOB_LINKS)

    @api.get("/loras", operation_id="list_loras", response_model=LoraList, responses=responses(*COMMON))
    def list_loras() -> dict[str, Any]:
        """The adapters a request may name in `loras` (with a weight), and those every job uses."""
        base = settings.video_metadata.get("loras", [])
        return {"object": "list", "data": [{"name": name} for name in settings.loras], "base": base}

    @api.get("/videos", operation_id="list_videos", response_model=JobList, responses=responses(*COMMON, 422))
    def list_videos(status: Literal[STATUSES] | None = None,  # type: ignore[valid-type]
                    limit: int = Query(default=50, ge=1, le=500)) -> dict[str, Any]:
        return {"object": "list", "data": [job.to_json() for job in store.list(status, limit)]}

    @api.get("/videos/{job_id}", operation_id="get_video", response_model=Job, responses=responses(*COMMON, 404))
    def get_video(job_id: str) -> dict[str, Any]:
        return find(job_id).to_json()

    _add_file_routes(api, store, find)

    @api.delete("/videos/{job_id}", operation_id="cancel_video", response_model=Job,
                responses=responses(*COMMON, 404, 409))
    def cancel_video(job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (409 when it has finished)."""
        job = find(job_id)
        if job.status in FINISHED:
            raise HTTPException(409, f"job {job.id} has already finished (status: {job.status})")
        return store.cancel(job.id).to_json()

    @api.get("/videos/{job_id}/events", operation_id="video_events", response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {}}, "description": "The job's JSON at each change, until finished"},
        **responses(*COMMON, 404)})
    async def video_events(job_id: str, request: Request) -> StreamingResponse:
        find(job_id)
        return StreamingResponse(_job_events(store, job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return api


async def _prune_forever(store: JobStore, keep_days: float) -> None:
    """--keep-days: finished jobs older than that removed at start and every hour after."""
    while True:
        try:
            await run_in_threadpool(store.prune, keep_days * 86400)
        except Exception:  # a full disk or a locked database: the next round tries again
            logging.getLogger("vidfusion.serve").exception("cannot remove old jobs")
        await asyncio.sleep(3600)


def create_app(store: JobStore, workers: Sequence[Any], settings: ServeSettings) -> FastAPI:
    """The app around a job store and its runners: worker.Worker threads (one pipeline per local device) or a
    ray_workers.RayWorkers pool; each has name, start(), stop(), join(timeout), alive() and status()."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.recover()
        for worker in workers:
            worker.start()
        pruning = asyncio.create_task(_prune_forever(store, settings.keep_days)) if settings.keep_days else None
        yield
        if pruning is not None:
            pruning.cancel()
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(timeout=10)

    app = FastAPI(title="vidfusion", version="0.1.0", lifespan=lifespan,
                  description="Text-to-video jobs: submit, watch progress, download the mp4.")
    app.state.store = store
    app.include_router(_jobs_api(store, settings))
    install_handlers(app)
    app.add_middleware(RequestGuard, hosts=allowed_hosts(settings.host), upload_limit=upload_body_limit(settings),
                       origins=frozenset(origin_of(o) for o in settings.allowed_origins),
                       upload_slots=settings.max_concurrent_uploads, token=settings.token)
    token_ok = _token_check(settings)

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "a worker died"},
                                                           **responses(400)})
    def healthz(authorization: str | None = Header(default=None)) -> JSONResponse:
        """`ok` while every worker runs (503 `degraded` when one died); with the token (or on a server without one)
        also the model, the workers (name, pid, host, job) and the queue length."""
        dead = [w.name for w in workers if not w.alive()]
        body: dict[str, Any] = {"status": "degraded" if dead else "ok"}
        try:
            token_ok(authorization)
            body.update(model=settings.model, workers=[s for w in workers for s in w.status()],
                        pending=store.pending(), dead_workers=dead)
        except HTTPException:
            pass  # details are for the token holder
        return JSONResponse(body, status_code=503 if dead else 200)

    page = render_ui(settings, SAMPLER_NAMES)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def ui() -> str:
        return page

    return app
