"""The HTTP service: REST jobs API under /v1, server-sent progress events, the web UI at /."""

from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..media.fileio import atomic_file, write_bytes
from ..media.video_io import probe_video
from ..sampling.schedules import SAMPLER_NAMES
from ..sampling.step_cache import NO_CACHE_NAMES
from .jobs import FINISHED, STATUSES, IdempotencyConflictError, JobStore, QueueFullError
from .ui import render_ui

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi", ".m4v")


@dataclass(frozen=True)
class ServeSettings:
    data_dir: str = "./vidfusion-data"
    token: str | None = None
    max_queue: int = 100
    max_frames: int = 128
    max_pixels: int = 1024 * 1024
    default_height: int = 256
    default_width: int = 256
    model: str = ""
    # sampler name ("" = the pipeline's default) -> (num_inference_steps, guidance_scale) when a request leaves them
    # out: TextToVideoPipeline.sampler_defaults(); a sampler missing here is refused (422)
    sampler_defaults: dict[str, tuple[int, float]] = field(default_factory=lambda: {"": (50, 9.0)})
    # the same for video-to-video jobs (a video input: guidance 15 for the multi-step samplers)
    video_sampler_defaults: dict[str, tuple[int, float]] = field(default_factory=lambda: {"": (50, 15.0)})
    max_upload_mb: float = 20.0  # the largest picture or video a request may upload
    video_metadata: dict[str, Any] = field(default_factory=dict)  # model, base LoRAs: recorded in every video
    loras: tuple[str, ...] = ()  # adapters a request may name (--lora-dir), loaded once on every worker
    default_sampler: str = "ddim"  # the solver a request without `sampler` runs (t2v-turbo on a turbo server)
    cache_branches: int = 12  # DeepCache skip branches of the model's UNet


class LoraChoice(BaseModel):
    """One of the server's adapters (GET /v1/loras) and its weight for this job."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    weight: float = Field(default=1.0, ge=-10.0, le=10.0)


class VideoRequest(BaseModel):
    """Parameters of one video; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(default=None, max_length=2000)
    num_frames: int = Field(default=16, ge=1)
    height: int | None = Field(default=None, ge=8, multiple_of=8)
    width: int | None = Field(default=None, ge=8, multiple_of=8)
    num_inference_steps: int | None = Field(default=None, ge=1, le=500)  # default: the server's (50, T2V-Turbo 4)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)  # default: the server's (9, T2V-Turbo 7.5)
    sampler: Literal[tuple(SAMPLER_NAMES)] | None = None  # type: ignore[valid-type]
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    fps: int = Field(default=8, ge=1, le=60)
    interpolate_fps: int | None = Field(default=None, ge=2, le=120)  # motion-interpolated to this rate
    loras: list[LoraChoice] = Field(default_factory=list, max_length=16)  # per-request adapters (--lora-dir)
    strength: float | None = Field(default=None, ge=0.0, le=1.0)  # video inputs: 0 keeps the video, 1 ignores it
    cache: Literal["deepcache", "faster-diffusion"] | None = None  # step caching (multi-step samplers)
    cache_interval: int = Field(default=3, ge=1, le=50)  # deepcache: a full UNet step every N steps
    cache_branch: int = Field(default=0, ge=0, le=32)  # deepcache: the skip branch cached below (0: fastest)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


def _field_error(field: str, message: str) -> HTTPException:
    """A 422 in FastAPI's own validation format, naming the field."""
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_check(settings: ServeSettings):
    """The /v1 dependency: a bearer token when the server has one (compared in constant time)."""

    def require_token(authorization: str | None = Header(default=None)) -> None:
        if settings.token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_token


@dataclass(frozen=True)
class SourceVideo:
    """An uploaded input video, checked and kept in the job inputs folder."""

    path: str
    frames: int
    height: int
    width: int
    fps: float


def video_params(body: VideoRequest, settings: ServeSettings, source: SourceVideo | None = None) -> dict[str, Any]:
    """A request's parameters with this server's defaults filled in (size; steps and guidance of its sampler; for a
    video input its size, length and frame rate) and its limits checked (422 naming the field)."""
    params = body.model_dump()
    if source is not None:
        _video_defaults(params, body.model_fields_set, source, settings)
    elif params["strength"] is not None:
        raise _field_error("strength", "strength applies to a video input: upload a `video` to /v1/videos/upload")
    params["height"] = params["height"] or settings.default_height
    params["width"] = params["width"] or settings.default_width
    table = settings.video_sampler_defaults if source is not None else settings.sampler_defaults
    defaults = table.get(params["sampler"] or "")
    if defaults is None:
        raise _field_error("sampler", f"sampler {params['sampler']!r} does not run on this server's model; "
                                      f"choose one of: {', '.join(s for s in table if s)}")
    if params["num_inference_steps"] is None:
        params["num_inference_steps"] = defaults[0]
    if params["guidance_scale"] is None:
        params["guidance_scale"] = defaults[1]
    _check_loras(params["loras"], settings)
    sampler = params["sampler"] or settings.default_sampler
    if params["cache"] is not None and sampler in NO_CACHE_NAMES:
        raise _field_error("cache", f"cache is for multi-step samplers; {sampler} runs a few steps that each need "
                                    "the whole UNet")
    if params["cache"] is not None and params["cache_branch"] >= settings.cache_branches:
        raise _field_error("cache_branch", f"cache_branch must be below {settings.cache_branches} on this model")
    if params["interpolate_fps"] is not None and params["interpolate_fps"] <= params["fps"]:
        raise _field_error("interpolate_fps", f"interpolate_fps must be above fps ({params['fps']})")
    if params["num_frames"] > settings.max_frames:
        raise _field_error("num_frames", f"num_frames must be at most {settings.max_frames} on this server" +
                           (" (the video is longer: pass num_frames to use its first frames)" if source else ""))
    if params["height"] * params["width"] > settings.max_pixels:
        raise _field_error("height", f"height x width = {params['height'] * params['width']} pixels; this "
                                     f"server allows at most {settings.max_pixels} per frame")
    return params


def _video_defaults(params: dict[str, Any], given: set[str], source: SourceVideo, settings: ServeSettings) -> None:
    """A video job's defaults: all its frames, its size (to multiples of 8), its frame rate, strength 0.6."""
    if "num_frames" in given and params["num_frames"] > source.frames:
        raise _field_error("num_frames", f"the video has {source.frames} frames; num_frames={params['num_frames']}")
    if "num_frames" not in given:
        params["num_frames"] = source.frames
    params["height"] = params["height"] or max(8, source.height // 8 * 8)
    params["width"] = params["width"] or max(8, source.width // 8 * 8)
    if "fps" not in given:
        params["fps"] = max(1, min(60, round(source.fps)))
    if params["strength"] is None:
        params["strength"] = 0.6
    params["video"] = source.path


def _check_loras(loras: list[dict[str, Any]], settings: ServeSettings) -> None:
    names = [lora["name"] for lora in loras]
    for name in names:
        if name not in settings.loras:
            raise _field_error("loras", f"unknown LoRA {name!r}; this server has: "
                                        f"{', '.join(settings.loras) or 'none (start it with --lora-dir)'}")
    if len(set(names)) != len(names):
        raise _field_error("loras", "a LoRA is named twice; give each once with its weight")


def _check_upload_size(size: int, field: str, max_mb: float) -> None:
    if size > max_mb * 2**20:
        raise HTTPException(413, f"{field}: {size / 2**20:.1f} MB is more than this server's {max_mb:g} MB "
                                 "(--max-upload-mb)")


def store_picture(data: bytes, field: str, store: JobStore, max_mb: float, held: list[str]) -> str:
    """An uploaded picture checked (size: 413, not an image: 422 naming the field) and kept as PNG in the job
    inputs folder, held for the request (JobStore.hold_input; its path added to `held`); its path."""
    from PIL import Image, UnidentifiedImageError

    _check_upload_size(len(data), field, max_mb)
    try:
        picture = Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise _field_error(field, f"{field} is not an image (PNG, JPEG, WebP, ...)") from None
    path, new = store.hold_input(data, ".png")
    held.append(str(path))
    if new:
        with atomic_file(path, suffix=".png") as tmp:
            picture.save(tmp, format="PNG")
    return str(path)


def store_video(data: bytes, filename: str, store: JobStore, max_mb: float, held: list[str]) -> SourceVideo:
    """An uploaded video kept as uploaded in the job inputs folder (so a re-run after a crash uses the same bytes),
    held for the request (JobStore.hold_input; its path added to `held`), then checked (size: 413; not a video,
    or undecodable: 422)."""
    _check_upload_size(len(data), "video", max_mb)
    suffix = Path(filename or "").suffix.lower()
    path, new = store.hold_input(data, suffix if suffix in VIDEO_SUFFIXES else ".mp4")
    held.append(str(path))
    if new:
        write_bytes(path, data)
    try:
        frames, height, width, fps = probe_video(path)
    except ValueError:
        raise _field_error("video", "video is not a video file ffmpeg can decode (mp4, webm, gif, mov, ...)") from None
    return SourceVideo(str(path), frames, height, width, fps)


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


def _submit(store: JobStore, params: dict[str, Any], idempotency_key: str | None,
            settings: ServeSettings) -> dict[str, Any]:
    """Queue a job: 429 when the queue is full, 409 for an idempotency key reused with other parameters."""
    try:
        job, _ = store.submit(params, idempotency_key, settings.max_queue)
    except QueueFullError as exc:
        raise HTTPException(429, f"queue is full: {exc}; retry later", headers={"Retry-After": "10"}) from None
    except IdempotencyConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    return job.to_json()


UPLOAD_FIELDS = ("params", "video", "image", "last_image")


def _add_upload_route(api: APIRouter, store: JobStore, settings: ServeSettings) -> None:
    """POST /v1/videos/upload: a job with input files (multipart)."""

    @api.post("/videos/upload", status_code=202)
    async def create_video_with_inputs(request: Request,
                                       idempotency_key: str | None = Header(default=None, max_length=200)
                                       ) -> dict[str, Any]:
        """multipart/form-data: `params` (the JSON body of POST /v1/videos, with `strength` for a video), a `video`
        file (video-to-video; height/width resize it, e.g. to upscale) and/or `image` / `last_image` files (the
        first / last frame, training-free conditioning). The inputs are kept with the job, so a re-run after a crash
        uses them; a request that is refused leaves none behind."""
        form = await request.form()
        unknown = sorted(set(form) - set(UPLOAD_FIELDS))
        if unknown:
            raise _field_error(unknown[0], f"unknown form field {unknown[0]!r}; fields are {', '.join(UPLOAD_FIELDS)}"
                                           " (request fields go inside `params`)")
        try:
            body = VideoRequest.model_validate_json(form.get("params") or "{}")
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        held: list[str] = []  # input files this request holds (JobStore.hold_input)
        refused = True
        try:
            files = {}
            for name in ("video", "image", "last_image"):
                upload = form.get(name)
                if upload is not None and hasattr(upload, "read"):
                    _check_upload_size(upload.size or 0, name, settings.max_upload_mb)  # before reading it
                    files[name] = (await upload.read(), upload.filename)
            source = None
            if "video" in files:
                source = await run_in_threadpool(store_video, *files.pop("video"), store, settings.max_upload_mb, held)
            params = video_params(body, settings, source)
            for name, (data, _) in files.items():
                params[name] = await run_in_threadpool(store_picture, data, name, store, settings.max_upload_mb,
                                                       held)
            job = _submit(store, params, idempotency_key, settings)
            refused = False
        finally:
            for path in held:
                store.release_input(path, refused)
        return job


def _jobs_api(store: JobStore, settings: ServeSettings) -> APIRouter:
    """The REST jobs API under /v1."""
    api = APIRouter(prefix="/v1", dependencies=[Depends(_token_check(settings))])

    def find(job_id: str):
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job with id {job_id!r}")
        return job

    @api.post("/videos", status_code=202)
    def create_video(body: VideoRequest,
                     idempotency_key: str | None = Header(default=None, max_length=200)) -> dict[str, Any]:
        return _submit(store, video_params(body, settings), idempotency_key, settings)

    _add_upload_route(api, store, settings)

    @api.get("/loras")
    def list_loras() -> dict[str, Any]:
        """The adapters a request may name in `loras` (with a weight), and those every job uses."""
        base = settings.video_metadata.get("loras", [])
        return {"object": "list", "data": [{"name": name} for name in settings.loras], "base": base}

    @api.get("/videos")
    def list_videos(status: Literal[STATUSES] | None = None,  # type: ignore[valid-type]
                    limit: int = Query(default=50, ge=1, le=500)) -> dict[str, Any]:
        return {"object": "list", "data": [job.to_json() for job in store.list(status, limit)]}

    @api.get("/videos/{job_id}")
    def get_video(job_id: str) -> dict[str, Any]:
        return find(job_id).to_json()

    @api.get("/videos/{job_id}/content", response_class=FileResponse)
    def video_content(job_id: str) -> FileResponse:
        job = find(job_id)
        path = store.video_path(job.id)
        if job.status != "succeeded" or not path.exists():
            raise HTTPException(404, f"job {job.id} has no video yet (status: {job.status})")
        return FileResponse(path, media_type="video/mp4", filename=f"vidfusion-{job.id}.mp4",
                            content_disposition_type="inline")

    def image(path, job, what: str, media_type: str) -> FileResponse:
        if not path.exists() or (what == "poster" and job.status != "succeeded"):
            raise HTTPException(404, f"job {job.id} has no {what} yet (status: {job.status})")
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-store"})

    @api.get("/videos/{job_id}/preview", response_class=FileResponse)
    def video_preview(job_id: str) -> FileResponse:
        """The latest step's latent preview (PNG, the middle frame): while a job runs and after."""
        job = find(job_id)
        return image(store.preview_path(job.id), job, "preview", "image/png")

    @api.get("/videos/{job_id}/poster", response_class=FileResponse)
    def video_poster(job_id: str) -> FileResponse:
        """A frame of the finished video (JPEG)."""
        job = find(job_id)
        return image(store.poster_path(job.id), job, "poster", "image/jpeg")

    @api.delete("/videos/{job_id}")
    def cancel_video(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        if job.status in FINISHED:
            raise HTTPException(409, f"job {job.id} has already finished (status: {job.status})")
        return store.cancel(job.id).to_json()

    @api.get("/videos/{job_id}/events")
    async def video_events(job_id: str, request: Request) -> StreamingResponse:
        find(job_id)
        return StreamingResponse(_job_events(store, job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return api


def create_app(store: JobStore, workers: Sequence[Any], settings: ServeSettings) -> FastAPI:
    """The app around a job store and its runners: worker.Worker threads (one pipeline per local device) or a
    ray_workers.RayWorkers pool; each has start(), stop(), join(timeout) and status()."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.recover()
        for worker in workers:
            worker.start()
        yield
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(timeout=10)

    app = FastAPI(title="vidfusion", version="0.1.0", lifespan=lifespan,
                  description="Text-to-video jobs: submit, watch progress, download the mp4.")
    app.state.store = store
    app.include_router(_jobs_api(store, settings))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model, "workers": [s for w in workers for s in w.status()],
                "pending": store.pending()}

    page = render_ui(settings, SAMPLER_NAMES)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def ui() -> str:
        return page

    return app
