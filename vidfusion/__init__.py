"""vidfusion: fast, lean text-to-video diffusion for the ModelScope text-to-video-ms-1.7b family.

The public names below load lazily (as diffusers' do): `import vidfusion` and `import vidfusion.client` import no
torch; the first use of a name imports the wing that defines it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .media.metadata import __version__

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "CheckpointError": ("errors", "CheckpointError"),
    "CheckpointNotFoundError": ("errors", "CheckpointNotFoundError"),
    "DiffusionPipeline": ("pipelines.auto", "DiffusionPipeline"),
    "TextToVideoOutput": ("pipelines.text_to_video", "TextToVideoOutput"),
    "TextToVideoPipeline": ("pipelines.text_to_video", "TextToVideoPipeline"),
    "TextToVideoSDPipeline": ("pipelines.text_to_video", "TextToVideoSDPipeline"),
    "VideoToVideoPipeline": ("pipelines.video2video", "VideoToVideoPipeline"),
    "VideoToVideoSDPipeline": ("pipelines.video2video", "VideoToVideoSDPipeline"),
    "convert": ("pipelines.convert", "convert"),
    "SAMPLER_NAMES": ("sampling.schedules", "SAMPLER_NAMES"),
    "preview": ("models.vae", "approximate_rgb"),
    "export_to_video": ("media.video_io", "export_to_video"),
    "read_video": ("media.video_io", "read_video"),
    **{name: ("sampling.schedulers", name) for name in (
        "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler",
        "HeunDiscreteScheduler", "LCMScheduler", "LMSDiscreteScheduler", "PNDMScheduler",
        "UniPCMultistepScheduler")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vidfusion' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and the docs see
    from .errors import CheckpointError, CheckpointNotFoundError
    from .media.video_io import export_to_video, read_video
    from .models.vae import approximate_rgb as preview
    from .pipelines.auto import DiffusionPipeline
    from .pipelines.convert import convert
    from .pipelines.text_to_video import TextToVideoOutput, TextToVideoPipeline, TextToVideoSDPipeline
    from .pipelines.video2video import VideoToVideoPipeline, VideoToVideoSDPipeline
    from .sampling.schedulers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        LCMScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )
    from .sampling.schedules import SAMPLER_NAMES
