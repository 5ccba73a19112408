"""The one settings schema: what a video file records about how it was made (read back by `vidfusion info` and
`generate --from`), written the same way by the CLI, batch jobs and the service.

A file records: the vidfusion version; what the pipeline reports it ran (TextToVideoOutput.settings: sampler,
steps, guidance, size, frames, strength for video-to-video, defaults resolved); the request's prompt, negative
prompt, seed and fps; and what the writer adds (model, LoRAs, creative options). Only what applies is kept: no empty
values, no eta of 0, no noise-prior ratio for the plain prior, no FreeInit filter without FreeInit.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it here; recorded in every video)

# TextToVideoOutput.settings: what ran (these win over anything a writer passes)
RAN_KEYS = ("sampler", "num_inference_steps", "guidance_scale", "height", "width", "num_frames", "dtype", "strength",
            "guidance_interval", "prompt_syntax", "prompt_weighting", "cache", "cache_interval", "cache_branch",
            "cache_schedule")
REQUEST_KEYS = ("prompt", "negative_prompt", "seed", "fps", "interpolate_fps")
# metadata key -> `vidfusion generate` argument (dest), for writing from and reading back into the command line
CLI_ARGUMENTS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "keyframes": "keyframe", "seed": "seed",
    "sampler": "sampler", "num_inference_steps": "steps", "guidance_scale": "guidance", "eta": "eta",
    "height": "height", "width": "width", "num_frames": "frames", "fps": "fps", "interpolate_fps": "interpolate_fps",
    "model": "model",
    "variant": "variant", "revision": "revision", "loras": "lora", "lora_weight_name": "lora_weight_name",
    "lora_target": "lora_target", "lora_scale": "lora_scale",
    "guidance_interval": "guidance_interval", "prompt_syntax": "prompt_syntax", "cache": "cache",
    "cache_interval": "cache_interval", "cache_branch": "cache_branch", "cache_schedule": "cache_schedule",
    "prompt_weighting": "prompt_weighting", "turbo": "turbo", "init_video": "init_video",
    "strength": "strength", "image": "image", "last_image": "last_image", "decoder": "decoder",
    "window_size": "window_size", "window_stride": "window_stride", "loop": "loop", "noise_prior": "noise_prior",
    "base_noise_ratio": "base_noise_ratio", "freeu": "freeu", "free_init_iterations": "free_init_iterations",
    "free_init_filter": "free_init_filter", "dtype": "dtype", "vae": "vae", "clip": "clip", "vae_tiling": "vae_tiling",
    "compile": "compile",
}


def lora_settings(loras: list[tuple[str, float]], weight_name: str | None = None, target: str | None = None,
                  turbo: bool = False) -> dict[str, Any]:
    """What a video made with these LoRAs records beside its settings (`generate --from` loads them again)."""
    meta = {"loras": [{"path": path, "weight": weight} for path, weight in loras], "lora_weight_name": weight_name,
            "lora_target": target, "turbo": turbo}
    return {k: v for k, v in meta.items() if v not in (None, [], False)}


def video_settings(ran: dict[str, Any], request: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The settings a video file records (see the module docstring)."""
    settings = {"vidfusion": __version__, **extra, **{k: request.get(k) for k in REQUEST_KEYS},
                **{k: ran[k] for k in RAN_KEYS if k in ran}}
    if settings.get("noise_prior") == "iid":  # the plain prior: neither it nor its ratio applies
        settings.pop("noise_prior"), settings.pop("base_noise_ratio", None)
    if settings.get("free_init_iterations") == 1:  # no FreeInit
        settings.pop("free_init_iterations"), settings.pop("free_init_filter", None)
    if not settings.get("eta"):
        settings.pop("eta", None)
    if settings.get("decoder") == "vae":  # the default decode
        settings.pop("decoder")
    return {k: v for k, v in settings.items()
            if not (v is None or v is False or (isinstance(v, (str, list)) and not v))}
