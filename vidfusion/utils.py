"""diffusers-compatible helpers: `from vidfusion.utils import export_to_video`."""

from .media.video_io import export_to_video

__all__ = ["export_to_video"]
