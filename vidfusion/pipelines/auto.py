"""`DiffusionPipeline.from_pretrained(...)`: diffusers-style dispatch to the pipeline a checkpoint names."""

from __future__ import annotations

import os
from typing import Any

from ..checkpoints.layout import pipeline_class_name
from ..checkpoints.loading import resolve_checkpoint
from .text_to_video import TextToVideoPipeline, TextToVideoSDPipeline
from .video2video import VideoToVideoSDPipeline


class DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained(...)` returns the pipeline the checkpoint's model_index.json names
    (TextToVideoSDPipeline or VideoToVideoSDPipeline; an original ModelScope folder is text-to-video)."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> TextToVideoPipeline:
        folder = resolve_checkpoint(name_or_path, kwargs.get("variant"), kwargs.get("revision"))
        video = pipeline_class_name(folder) == "VideoToVideoSDPipeline"
        # the resolved folder, so a hub id is listed and fetched once
        return (VideoToVideoSDPipeline if video else TextToVideoSDPipeline).from_pretrained(folder, **kwargs)
