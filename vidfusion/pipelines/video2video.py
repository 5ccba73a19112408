"""VideoToVideoPipeline: encode a video -> noise it to step (1 - strength) -> sample from there -> decode."""

from __future__ import annotations

from typing import Any

import torch

from ..media.video_io import resize_video, video_to_tensor
from ..sampling.noise import frame_major_noise
from ..sampling.samplers import first_step, start_state
from .generation import Plan
from .text_to_video import TextToVideoOutput, TextToVideoPipeline


class VideoToVideoPipeline(TextToVideoPipeline):
    """Restyle or upscale a video with a prompt (diffusers' VideoToVideoSDPipeline; the Zeroscope XL recipe).
    All frames go through the UNet at once, as in diffusers; pass window_size for inputs longer than the model's
    training length."""

    windows_by_default = False
    default_guidance_scale = 15.0  # diffusers' VideoToVideoSDPipeline default (few-step samplers keep their own)
    _init_video: torch.Tensor | None = None
    _strength: float = 0.6

    @classmethod
    def from_pipe(cls, pipe: TextToVideoPipeline) -> VideoToVideoPipeline:
        """A video-to-video pipeline sharing the loaded models (no copy) of another pipeline."""
        new = cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
        new._progress = dict(pipe._progress)
        new._freeu = pipe._freeu
        new.training_frames = pipe.training_frames
        new._lora = pipe._lora  # the same weights, so the same adapters
        new._offload = pipe._offload  # the same models, so the same placement
        return new

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | dict[int, str] | None = None, video: Any = None,
                 strength: float = 0.6, *, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None, **kwargs: Any) -> TextToVideoOutput | tuple:
        """Generate from `video` (frames or a file path): strength 0 keeps it, 1 ignores it. height/width resize
        the frames first (multiples of 8). Other arguments as TextToVideoPipeline."""
        if video is None:
            raise ValueError("pass the input video: frames (numpy/torch/PIL) or a video file path")
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        if kwargs.get("free_init_iterations", 1) != 1:
            raise ValueError("free_init_iterations is for text-to-video; video-to-video starts from the video")
        if kwargs.get("latents") is not None:
            raise ValueError("pass either video or latents, not both")
        frames = video_to_tensor(video)
        height, width = height or frames.shape[-2], width or frames.shape[-1]
        if height % 8 or width % 8:
            raise ValueError(f"video frames are {frames.shape[-1]}x{frames.shape[-2]}; width and height must be "
                             "multiples of 8: pass width= and height= to resize")
        if num_frames is not None and num_frames != frames.shape[1]:
            raise ValueError(f"num_frames={num_frames} but the video has {frames.shape[1]} frames")
        self._init_video, self._strength = resize_video(frames, height, width), float(strength)
        try:
            output = super().__call__(prompt, num_frames=frames.shape[1], height=height, width=width,
                                      guidance_scale=guidance_scale, **kwargs)
        finally:
            self._init_video = None
        if isinstance(output, TextToVideoOutput):
            output.settings["strength"] = float(strength)
        return output

    def _initial_latents(self, shape: tuple[int, ...], generator, dtype: torch.dtype, latents: torch.Tensor | None,
                         plan: Plan) -> tuple[torch.Tensor, int]:
        """The input video encoded (VAE posterior sample) and noised to the first step strength asks for."""
        sampler, schedule = plan.base, plan.schedule
        steps = schedule.num_steps
        start = first_step(sampler, schedule, self._strength)  # strength 0 (or too few steps): no step runs
        b, c, f, h, w = shape
        video = self._init_video
        if video.shape[0] not in (1, b):
            raise ValueError(f"got {video.shape[0]} videos for {b} outputs; pass one video or one per prompt")
        video = video.expand(b, *video.shape[1:]).reshape(b * f, *video.shape[2:])  # (B*F, 3, H, W)
        device = self.device
        # as diffusers: the posterior sample, then the forward noise, both drawn frame-major (B*F, C, h, w)
        self._activate(self.vae)
        mean, logvar = self.vae.encode(video.to(device=device, dtype=self.vae.dtype))
        frames_shape = (b, f, c, h, w)
        posterior = frame_major_noise(frames_shape, generator, device, mean.dtype).view(mean.shape)
        x0 = (mean + torch.exp(0.5 * logvar) * posterior).float() * self.vae.config.scaling_factor
        noise = frame_major_noise(frames_shape, generator, device, dtype).view(x0.shape).float()
        x = x0 if start >= steps else start_state(sampler, schedule, x0, noise, start)
        self._activate(self.unet)
        return x.view(b, f, c, h, w).permute(0, 2, 1, 3, 4), start


class VideoToVideoSDPipeline(VideoToVideoPipeline):
    """diffusers' name, so that scripts switch by changing their imports. Identical to VideoToVideoPipeline (which
    already runs every frame at once unless window_size is given, as diffusers does)."""
