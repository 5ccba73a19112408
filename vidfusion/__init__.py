"""vidfusion: fast, lean text-to-video diffusion for the ModelScope text-to-video-ms-1.7b family."""

from .auto import DiffusionPipeline
from .convert import convert
from .errors import CheckpointError, CheckpointNotFoundError
from .pipeline import TextToVideoOutput, TextToVideoPipeline, TextToVideoSDPipeline
from .schedulers import (
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
from .schedules import SAMPLER_NAMES
from .vae import approximate_rgb as preview
from .video2video import VideoToVideoPipeline, VideoToVideoSDPipeline
from .video_io import export_to_video, read_video

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DiffusionPipeline",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SAMPLER_NAMES",
    "TextToVideoOutput",
    "TextToVideoPipeline",
    "TextToVideoSDPipeline",
    "UniPCMultistepScheduler",
    "VideoToVideoPipeline",
    "VideoToVideoSDPipeline",
    "convert",
    "export_to_video",
    "preview",
    "read_video",
]
