"""A job's parameters: the request schema (VideoRequest), the server's settings and limits (ServeSettings), the
checks and defaults that turn a request into a job's params (422 naming the field), and queueing it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from ..sampling.names import SAMPLER_NAMES
from ..sampling.step_cache import NO_CACHE_NAMES
from .jobs import IdempotencyConflictError, JobStore, QueueFullError


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
    max_concurrent_uploads: int = 4  # upload requests received at once (others: 429 before their body is read)
    video_metadata: dict[str, Any] = field(default_factory=dict)  # model, base LoRAs: recorded in every video
    loras: tuple[str, ...] = ()  # adapters a request may name (--lora-dir), loaded once on every worker
    default_sampler: str = "ddim"  # the solver a request without `sampler` runs (t2v-turbo on a turbo server)
    cache_branches: int = 12  # DeepCache skip branches of the model's UNet
    host: str = "127.0.0.1"  # the bound address: requests must name it (or a loopback name) in `Host`
    allowed_origins: tuple[str, ...] = ()  # other origins whose pages may call /v1 (guard.origin_of normalizes them)
    max_output_frames: int = 512  # frames a video may have after interpolation (num_frames x interpolate_fps / fps)
    max_prompt_texts: int = 32  # distinct texts prompt editing ([a:b:when], [a|b]) may give over the steps
    keep_days: float | None = None  # finished jobs (record, video, inputs) removed this long after they finished


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
    cache: Literal["deepcache", "faster-diffusion"] | None = None  # step caching (multi-step samplers)
    cache_interval: int = Field(default=3, ge=1, le=50)  # deepcache: a full UNet step every N steps
    cache_branch: int = Field(default=0, ge=0, le=32)  # deepcache: the skip branch cached below (0: fastest)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


class UploadRequest(VideoRequest):
    """The `params` of POST /v1/videos/upload: a video's fields, and `strength` for an uploaded `video`."""

    strength: float | None = Field(default=None, ge=0.0, le=1.0)  # video inputs: 0 keeps the video, 1 ignores it


def limited(model: type[VideoRequest], settings: ServeSettings) -> type[VideoRequest]:
    """`model` with this server's limits in its schema (the OpenAPI contract states them, a generated client
    validates before sending): num_frames up to --max-frames, sides up to what --max-pixels allows, the samplers
    its model runs, the LoRAs it has. What a schema cannot state (height x width, interpolated length, decodable
    files) stays a 422 naming the field."""
    side = max(8, settings.max_pixels // 8 // 8 * 8)
    samplers = tuple(s for s in settings.sampler_defaults if s) or SAMPLER_NAMES
    fields: dict[str, Any] = {
        "num_frames": (int, Field(default=min(16, settings.max_frames), ge=1, le=settings.max_frames)),
        "height": (int | None, Field(default=None, ge=8, le=side, multiple_of=8)),
        "width": (int | None, Field(default=None, ge=8, le=side, multiple_of=8)),
        "sampler": (Literal[samplers] | None, None),  # type: ignore[valid-type]
    }
    if not settings.loras:
        fields["loras"] = (list[LoraChoice], Field(default_factory=list, max_length=0))
    return create_model(model.__name__, __base__=model, __doc__=model.__doc__, **fields)


def field_error(field: str, message: str) -> HTTPException:
    """A 422 in FastAPI's own validation format, naming the field."""
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


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
    elif params.pop("strength", None) is not None:
        raise field_error("strength", "strength applies to a video input: upload a `video` with it")
    params["height"] = params["height"] or settings.default_height
    params["width"] = params["width"] or settings.default_width
    table = settings.video_sampler_defaults if source is not None else settings.sampler_defaults
    defaults = table.get(params["sampler"] or "")
    if defaults is None:
        raise field_error("sampler", f"sampler {params['sampler']!r} does not run on this server's model; "
                                      f"choose one of: {', '.join(s for s in table if s)}")
    if params["num_inference_steps"] is None:
        params["num_inference_steps"] = defaults[0]
    if params["guidance_scale"] is None:
        params["guidance_scale"] = defaults[1]
    _check_loras(params["loras"], settings)
    sampler = params["sampler"] or settings.default_sampler
    if params["cache"] is not None and sampler in NO_CACHE_NAMES:
        raise field_error("cache", f"cache is for multi-step samplers; {sampler} runs a few steps that each need "
                                    "the whole UNet")
    if params["cache"] is not None and params["cache_branch"] >= settings.cache_branches:
        raise field_error("cache_branch", f"cache_branch must be below {settings.cache_branches} on this model")
    if params["interpolate_fps"] is not None and params["interpolate_fps"] <= params["fps"]:
        raise field_error("interpolate_fps", f"interpolate_fps must be above fps ({params['fps']})")
    output_frames = round(params["num_frames"] * (params["interpolate_fps"] or params["fps"]) / params["fps"])
    if output_frames > settings.max_output_frames:
        raise field_error("interpolate_fps", f"the video would have {output_frames} frames after interpolation; "
                                              f"this server writes at most {settings.max_output_frames} "
                                              "(--max-output-frames): lower interpolate_fps or num_frames")
    _check_prompt_texts(params, settings.max_prompt_texts)
    if params["num_frames"] > settings.max_frames:
        raise field_error("num_frames", f"num_frames must be at most {settings.max_frames} on this server" +
                           (" (the video is longer: pass num_frames to use its first frames)" if source else ""))
    if params["height"] * params["width"] > settings.max_pixels:
        raise field_error("height", f"height x width = {params['height'] * params['width']} pixels; this "
                                     f"server allows at most {settings.max_pixels} per frame")
    return params


def _video_defaults(params: dict[str, Any], given: set[str], source: SourceVideo, settings: ServeSettings) -> None:
    """A video job's defaults: all its frames, its size (to multiples of 8), its frame rate, strength 0.6."""
    if "num_frames" in given and params["num_frames"] > source.frames:
        raise field_error("num_frames", f"the video has {source.frames} frames; num_frames={params['num_frames']}")
    if "num_frames" not in given:
        params["num_frames"] = source.frames
    params["height"] = params["height"] or max(8, source.height // 8 * 8)
    params["width"] = params["width"] or max(8, source.width // 8 * 8)
    if "fps" not in given:
        params["fps"] = max(1, min(60, round(source.fps)))
    if params["strength"] is None:
        params["strength"] = 0.6
    params["video"] = source.path


def _check_prompt_texts(params: dict[str, Any], limit: int) -> None:
    """Prompt editing and alternation give one text encoding per distinct text over the steps: at most `limit`."""
    from ..pipelines.generation import text_edits

    try:
        edits = text_edits([params["prompt"]], [params["negative_prompt"]] if params["negative_prompt"] else None,
                           params["num_inference_steps"], "a1111")
    except ValueError as exc:
        raise field_error("prompt", str(exc)) from None
    distinct = len({(tuple(texts), tuple(negatives or ())) for _, texts, negatives in edits or []})
    if distinct > limit:
        raise field_error("prompt", f"prompt editing gives {distinct} different texts over the steps; this server "
                                     f"encodes at most {limit}")


def _check_loras(loras: list[dict[str, Any]], settings: ServeSettings) -> None:
    names = [lora["name"] for lora in loras]
    for name in names:
        if name not in settings.loras:
            raise field_error("loras", f"unknown LoRA {name!r}; this server has: "
                                        f"{', '.join(settings.loras) or 'none (start it with --lora-dir)'}")
    if len(set(names)) != len(names):
        raise field_error("loras", "a LoRA is named twice; give each once with its weight")


def submit_job(store: JobStore, params: dict[str, Any], idempotency_key: str | None,
            settings: ServeSettings) -> dict[str, Any]:
    """Queue a job: 429 when the queue is full, 409 for an idempotency key reused with other parameters."""
    try:
        job, _ = store.submit(params, idempotency_key, settings.max_queue)
    except QueueFullError as exc:
        raise HTTPException(429, f"queue is full: {exc}; retry later", headers={"Retry-After": "10"}) from None
    except IdempotencyConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    return job.to_json()
