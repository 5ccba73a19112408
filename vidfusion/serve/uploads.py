"""POST /v1/videos/upload: a job with input files (multipart), each judged before it is decoded and kept with the
job, so a re-run after a crash uses the same bytes and a refused request leaves nothing behind."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from fastapi import APIRouter, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ..media.fileio import atomic_file, write_bytes
from ..media.video_io import UPLOAD_FORMATS, probe_video
from .contract import Job, responses
from .jobs import JobStore
from .params import ServeSettings, SourceVideo, UploadRequest, field_error, limited, submit_job, video_params
from .render import INPUT_KEYS

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi", ".m4v")


def _check_upload_size(size: int, field: str, max_mb: float) -> None:
    if size > max_mb * 2**20:
        raise HTTPException(413, f"{field}: {size / 2**20:.1f} MB is more than this server's {max_mb:g} MB "
                                 "(--max-upload-mb)")


PICTURE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # the only decoders an uploaded picture reaches
PICTURE_PIXELS_PER_FRAME = 16  # an uploaded picture may have this many times a frame's pixel limit


def store_picture(data: bytes, field: str, store: JobStore, max_mb: float, held: list[str], max_pixels: int) -> str:
    """An uploaded picture checked (size: 413; not an image, or over PICTURE_PIXELS_PER_FRAME x the frame pixel limit
    judged from its header before decoding: 422 naming the field), downscaled to `max_pixels` and kept as PNG in the
    job inputs folder, held for the request (JobStore.hold_input; its path added to `held`); its path."""
    from PIL import Image, UnidentifiedImageError

    _check_upload_size(len(data), field, max_mb)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is refused, not decoded
            picture = Image.open(io.BytesIO(data), formats=PICTURE_FORMATS)  # no PostScript, no exotic parsers
            if picture.width * picture.height > max_pixels * PICTURE_PIXELS_PER_FRAME:
                raise field_error(field, f"{field} is {picture.width}x{picture.height}; this server takes pictures "
                                          f"of at most {max_pixels * PICTURE_PIXELS_PER_FRAME} pixels")
            picture = picture.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        raise field_error(field, f"{field} is not an image (PNG, JPEG, WebP, ...) of a size this server takes"
                           ) from None
    if picture.width * picture.height > max_pixels:  # stored downscaled once: the job resizes it to the frame
        scale = (max_pixels / (picture.width * picture.height)) ** 0.5
        picture = picture.resize((max(1, int(picture.width * scale)), max(1, int(picture.height * scale))),
                                 Image.Resampling.LANCZOS)
    path, new = store.hold_input(data, ".png")
    held.append(str(path))
    if new:
        with atomic_file(path, suffix=".png") as tmp:
            picture.save(tmp, format="PNG")
    return str(path)


def store_video(data: bytes, filename: str, store: JobStore, max_mb: float, held: list[str],
                settings: ServeSettings, frames_needed: int) -> SourceVideo:
    """An uploaded video kept as uploaded in the job inputs folder (so a re-run after a crash uses the same bytes),
    held for the request (JobStore.hold_input; its path added to `held`), then checked (size: 413; a container
    format other than UPLOAD_FORMATS, frames over the pixel limit or far over the frame limit by its header,
    undecodable: 422); at most `frames_needed` + 1 frames are decoded."""
    _check_upload_size(len(data), "video", max_mb)
    suffix = Path(filename or "").suffix.lower()
    path, new = store.hold_input(data, suffix if suffix in VIDEO_SUFFIXES else ".mp4")
    held.append(str(path))
    if new:
        write_bytes(path, data)
    try:
        frames, height, width, fps = probe_video(path, settings.max_pixels, frames_needed, UPLOAD_FORMATS)
    except ValueError as exc:
        raise field_error("video", f"video is not a video this server takes (mp4, webm, gif, mov, mkv, avi of at "
                                    f"most {settings.max_pixels} pixels a frame): {exc}") from None
    return SourceVideo(str(path), frames, height, width, fps)


UPLOAD_FIELDS = ("params", *INPUT_KEYS)  # the form: the parameters, and a file for each input a job can name


def upload_body_limit(settings: ServeSettings) -> int:
    """The most bytes an upload request's body may have: its three files at the upload limit, and the form around."""
    return int(3 * settings.max_upload_mb * 2**20) + 2**20


def add_upload_route(api: APIRouter, store: JobStore, settings: ServeSettings, links: dict[str, Any]) -> None:
    """POST /v1/videos/upload: a job with input files (multipart); `links`: the created job's operations."""

    upload_model = limited(UploadRequest, settings)  # parsed from the `params` text, so no annotation is needed

    @api.post("/videos/upload", status_code=202, response_model=Job, operation_id="create_video_with_inputs",
              responses={202: {"description": "Queued", "links": links},
                         **responses(400, 401, 403, 405, 408, 409, 413, 415, 422, 429)})
    async def create_video_with_inputs(
        request: Request,
        params: str = Form(default="{}", max_length=20000, description=(
            "The JSON body of POST /v1/videos, as text, and `strength` (0 keeps an uploaded video, 1 ignores it), "
            'e.g. {"prompt": "a cat, oil painting", "strength": 0.6}'), json_schema_extra={
            "contentMediaType": "application/json"}),
        video: UploadFile = File(default=None, description="video-to-video (height/width resize it)"),
        image: UploadFile = File(default=None, description="the first frame (training-free conditioning)"),
        last_image: UploadFile = File(default=None, description="the last frame"),
        idempotency_key: str | None = Header(default=None, max_length=200),
    ) -> dict[str, Any]:
        """A job with input files (multipart/form-data): `params`, and a `video` and/or `image` / `last_image`.
        The inputs are kept with the job, so a re-run after a crash uses them; a request that is refused leaves
        none behind."""
        form = await request.form()  # parsed once already (cached), under the guard's body cap
        unknown = sorted(set(form) - set(UPLOAD_FIELDS))
        if unknown:
            raise field_error(unknown[0], f"unknown form field {unknown[0]!r}; fields are {', '.join(UPLOAD_FIELDS)}"
                                           " (request fields go inside `params`)")
        try:
            body = upload_model.model_validate_json(params or "{}")
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", "params", *e["loc"])} for e in exc.errors()]
                                         ) from None
        uploads = {"video": video, "image": image, "last_image": last_image}  # --max-concurrent-uploads: the guard
        held: list[str] = []  # input files this request holds (JobStore.hold_input)
        refused = True
        try:
            files = {}
            for name, upload in uploads.items():
                if upload is not None:
                    _check_upload_size(upload.size or 0, name, settings.max_upload_mb)  # spooled, not yet in memory
                    files[name] = (await upload.read(), upload.filename)
            source = None
            if "video" in files:
                needed = min(body.num_frames if "num_frames" in body.model_fields_set else settings.max_frames,
                             settings.max_frames)
                source = await run_in_threadpool(store_video, *files.pop("video"), store, settings.max_upload_mb, held,
                                                 settings, needed)
            params = video_params(body, settings, source)
            for name, (data, _) in files.items():
                params[name] = await run_in_threadpool(store_picture, data, name, store, settings.max_upload_mb,
                                                       held, settings.max_pixels)
            job = submit_job(store, params, idempotency_key, settings)
            refused = False
        finally:
            for path in held:
                store.release_input(path, refused)
        return job
