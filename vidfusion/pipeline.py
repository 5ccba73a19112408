"""TextToVideoPipeline: encode prompt -> make noise -> sample -> decode -> frames, as a straight line."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import LoraAdapters
from .checkpoints import load_checkpoint
from .layers import Downsample, ResnetBlock, TextKV, Upsample, guidance_embedding
from .loading import TRAINING_FRAMES
from .long_video import check_keyframes, check_window, default_window, keyframe_weights, reschedule_noise, windowed
from .lora_formats import read_lora_file
from .noise import free_init_filter as free_init_filter_mask
from .noise import initial_noise, mix_frequencies, randn, video_noise_sampler
from .offload import SequentialOffload, offload_device
from .sampling import SAMPLERS
from .schedulers import Scheduler
from .schedules import FEW_STEP_DEFAULTS, SAMPLER_NAMES, NoiseSchedule, resolve_sampler, sampler_options, step_defaults
from .text_encoder import encode_text
from .unet3d import TemporalConvLayer, Transformer2D, TransformerTemporal
from .vae import approximate_rgb

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
# the repeated blocks that regional compilation compiles once each
COMPILED_BLOCKS = (ResnetBlock, TemporalConvLayer, Transformer2D, TransformerTemporal, Upsample, Downsample)


@dataclass
class TextToVideoOutput:
    """`frames`: (B, F, H, W, 3) array for "np", (B, F, 3, H, W) tensor for "pt", lists of PIL images for
    "pil", or the final latents (B, 4, F, H/8, W/8) for "latent". `settings`: what ran, defaults resolved (sampler,
    num_inference_steps, guidance_scale, num_frames, height, width; strength for video-to-video): what a file made
    from these frames records."""

    frames: Any
    settings: dict[str, Any] = field(default_factory=dict)


class TextToVideoPipeline:
    """Text-to-video with the ModelScope text-to-video-ms-1.7b family (and Zeroscope v2)."""

    # long clips (above long_video.ALL_AT_ONCE_FRAMES) run in windows of the checkpoint's training length unless
    # window_size is given; False (the diffusers-named classes) runs every frame at once, exactly as diffusers does
    windows_by_default: bool = True
    # frames the checkpoint was trained on (from_pretrained sets it: 24 for Zeroscope v2, else 16)
    training_frames: int = TRAINING_FRAMES["modelscope"]
    # guidance_scale of the multi-step samplers when a call does not give it (few-step samplers have their own)
    default_guidance_scale: float = 9.0

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler: Scheduler):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._progress: dict[str, Any] = {}
        self._offload: str | None = None
        self._offload_device: torch.device | None = None
        self._sequential: SequentialOffload | None = None
        self._freeu: tuple[float, float, float, float] | None = None
        self._interrupted = False
        self._lora = LoraAdapters()

    # ---- loading and placement ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        variant: str | None = None, revision: str | None = None,
                        device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                        compile: bool = False, vae: str | os.PathLike | None = None,
                        text_encoder: str | os.PathLike | None = None, **unused: Any) -> TextToVideoPipeline:
        """Load a checkpoint folder in the diffusers layout, a hub id, or an original ModelScope folder
        (configuration.json + .pth files; `vae=` / `text_encoder=` supply parts it lacks). `torch_dtype` is
        diffusers' name for `dtype`; other diffusers loading options are not supported and raise."""
        if unused:
            raise TypeError(f"from_pretrained() got unsupported arguments: {', '.join(sorted(unused))}")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError("pass either dtype or torch_dtype, not both")
        dtype = dtype or torch_dtype or torch.float32
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype such as torch.float16, got {dtype!r}")
        checkpoint = load_checkpoint(name_or_path, dtype, variant, revision, vae, text_encoder)
        pipe = cls(**checkpoint.components())
        pipe.training_frames = checkpoint.training_frames
        pipe = pipe.to(device) if device is not None else pipe
        return pipe.compile() if compile else pipe

    def _models(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.unet, self.vae]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextToVideoPipeline:
        """Move and/or cast every model (this turns CPU offload off); returns the pipeline."""
        if isinstance(device, torch.dtype):  # pipe.to(torch.float16)
            device, dtype = None, device
        self._disable_offload()
        for model in self._models():
            model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        """The device computations run on."""
        if self._offload_device is not None:
            return self._offload_device
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _disable_offload(self) -> None:
        if self._sequential is not None:
            self._sequential.remove()
            self._sequential = None
        self._offload, self._offload_device = None, None

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        """Keep models on the CPU and move each whole model to the accelerator while it runs."""
        target = offload_device(gpu_id, device)
        self._disable_offload()
        for model in self._models():
            model.to("cpu")
        self._offload, self._offload_device = "model", target

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None,
                                      device: str | torch.device | None = None) -> None:
        """Keep weights on the CPU and move each submodule to the accelerator only for its forward."""
        target = offload_device(gpu_id, device)
        self._disable_offload()
        self._sequential = SequentialOffload(self._models(), target)
        self._offload, self._offload_device = "sequential", target

    def _activate(self, model: torch.nn.Module) -> None:
        if self._offload == "model":
            for other in self._models():
                if other is not model:
                    other.to("cpu")
            model.to(self._offload_device)

    def _release(self) -> None:
        if self._offload == "model":
            for model in self._models():
                model.to("cpu")

    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress = dict(kwargs)

    # ---- adapters (LoRA; adapters.py) ----------------------------------------------------------------------

    def _adapter_models(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def load_lora_weights(self, path_or_hub_id: str | os.PathLike, *, weight_name: str | None = None,
                          adapter_name: str | None = None, scale: float = 1.0, target: str | None = None) -> str:
        """Load a LoRA in any published format (detected from the file) and activate it with weight `scale`;
        returns its adapter name. `target` ("unet", "spatial", "temporal") picks the layers of a keyless
        cloneofsimo list (default: the one whose layer count fits)."""
        lora = read_lora_file(path_or_hub_id, weight_name)
        return self._lora.load(self._adapter_models(), lora, adapter_name, scale, target)

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        """Use exactly these (unfused) adapters, each with its weight (default 1)."""
        self._lora.set_adapters(self._adapter_models(), names, weights)

    def get_active_adapters(self) -> list[str]:
        return self._lora.applied()

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Fix the active adapters (or those named) in the weights, times lora_scale; set_adapters no longer
        changes them until unfuse_lora()."""
        self._lora.fuse(self._adapter_models(), lora_scale, adapter_names)

    def unfuse_lora(self) -> None:
        self._lora.unfuse(self._adapter_models())

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the weights are the original ones again, bit for bit."""
        self._lora.unload(self._adapter_models())

    # ---- the pipeline ---------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.scale_factor

    def encode_prompt(self, prompts: list[str] | None, negative: list[str] | None, guidance: bool,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      clip_skip: int | None = None) -> torch.Tensor:
        """Text states for the UNet: [uncond; cond] stacked (2B, 77, D) with guidance, else cond (B, 77, D)."""
        device, dtype = self.device, self.text_encoder.dtype
        self._activate(self.text_encoder)
        if prompt_embeds is None:
            prompt_embeds = encode_text(self.text_encoder, self.tokenizer, prompts, device, clip_skip)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if not guidance:
            return prompt_embeds
        if negative_prompt_embeds is None:
            batch = prompt_embeds.shape[0]
            negative = negative if negative is not None else [""] * batch
            negative_prompt_embeds = encode_text(self.text_encoder, self.tokenizer, negative, device)
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        return torch.cat([negative_prompt_embeds, prompt_embeds])

    def _sampler(self, sampler: str | None) -> tuple[str, dict[str, Any]]:
        embedded = self.unet.guidance_embedding_dim is not None
        if sampler is None and embedded and self.scheduler.sampler not in FEW_STEP_DEFAULTS:
            sampler = "t2v-turbo"  # a guidance-distilled UNet (T2V-Turbo LoRA loaded) samples in few steps
        if sampler == "t2v-turbo" and not embedded:
            raise ValueError("the t2v-turbo sampler needs the T2V-Turbo UNet: load its LoRA first, "
                             "pipe.load_lora_weights('jiachenli-ucsb/T2V-Turbo-MS', weight_name='unet_lora.pt') "
                             "(CLI: --turbo)")
        if sampler is None:
            return self.scheduler.sampler, self.scheduler.options
        if not isinstance(sampler, str):
            raise ValueError(f"sampler must be a name, got {type(sampler).__name__}")
        base, preset = resolve_sampler(sampler)
        return base, sampler_options(base, dict(self.scheduler.config), preset)

    def generation_defaults(self, sampler: str | None = None) -> tuple[str, int, float]:
        """(sampler, num_inference_steps, guidance_scale) a call uses when they are not given."""
        base = self._sampler(sampler)[0]
        return (sampler or base, *step_defaults(base, self.default_guidance_scale))

    def sampler_defaults(self) -> dict[str, tuple[int, float]]:
        """(num_inference_steps, guidance_scale) for every sampler name this pipeline can run, "" for its default
        sampler: what the service and its web form fill in when a request leaves them out."""
        table = {"": self.generation_defaults()[1:]}
        for name in SAMPLER_NAMES:
            try:
                table[name] = self.generation_defaults(name)[1:]
            except ValueError:  # t2v-turbo without the T2V-Turbo UNet
                continue
        return table

    def _guidance_condition(self, guidance_scale: float, batch: int) -> torch.Tensor | None:
        """The guidance scale as the UNet's guidance embedding (B, D) for a guidance-distilled UNet, else None."""
        dim = self.unet.guidance_embedding_dim
        if dim is None:
            return None
        w = torch.full((batch,), float(guidance_scale), device=self.device)
        return guidance_embedding(w, dim).to(self.unet.dtype)

    def compile(self, *, regional: bool = True, mode: str | None = None, backend: str = "inductor"
                ) -> TextToVideoPipeline:
        """Opt-in torch.compile of the UNet and the VAE decoder (the forward has no graph breaks). regional:
        compile each repeated block class once and reuse it (compile time stays low; the first call of each new
        shape compiles); otherwise the whole UNet forward as one full graph. mode="reduce-overhead" adds CUDA
        graphs on GPU. Returns the pipeline."""
        if self._sequential is not None:
            raise ValueError("compile() does not combine with enable_sequential_cpu_offload(); use model offload")
        if regional:
            for model in (self.unet, self.vae.decoder):
                for module in model.modules():
                    if isinstance(module, COMPILED_BLOCKS):
                        module.compile(fullgraph=True, mode=mode, backend=backend, dynamic=False)
        else:
            self.unet.compile(fullgraph=True, mode=mode, backend=backend, dynamic=False)
        return self

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU on every following call (diffusers' enable_freeu); `freeu=` on a call overrides it."""
        self._freeu = (s1, s2, b1, b2)

    def disable_freeu(self) -> None:
        self._freeu = None

    def interrupt(self) -> None:
        """Stop the generation in progress after its current step; it returns what it has, decoded. Called while no
        generation runs (a cancel racing a call's start), the next call stops after its first step."""
        self._interrupted = True

    @staticmethod
    def preview(latents: torch.Tensor) -> np.ndarray:
        """Cheap live preview: latents (B, 4, F, h, w) -> uint8 frames (B, F, h, w, 3), no VAE."""
        return approximate_rgb(latents)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | dict[int, str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        num_frames: int = 16,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        eta: float = 0.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        callback_on_step_end: Callable[..., dict | None] | None = None,
        clip_skip: int | None = None,
        noise_prior: str = "iid",
        base_noise_ratio: float = 0.5,
        window_size: int | None = None,
        window_stride: int | None = None,
        loop: bool = False,
        freeu: tuple[float, float, float, float] | None = None,
        free_init_iterations: int = 1,
        free_init_filter: str = "butterworth",
        free_init_spatial: float = 0.25,
        free_init_temporal: float = 0.25,
    ) -> TextToVideoOutput | tuple:
        """Generate num_videos_per_prompt videos per prompt. See README for the meaning of each argument.
        num_inference_steps defaults to 50 (4 for the few-step samplers), guidance_scale to 9 (1, no classifier-free
        guidance, for lcm / mcm; 7.5 for t2v-turbo)."""
        base, options = self._sampler(sampler)
        default_steps, default_guidance = step_defaults(base, self.default_guidance_scale)
        num_inference_steps = default_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = default_guidance if guidance_scale is None else guidance_scale
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        keyframes = check_keyframes(prompt, num_frames) if isinstance(prompt, dict) else None
        prompts, negatives = _check_inputs(keyframes[1] if keyframes else prompt, negative_prompt, prompt_embeds,
                                           negative_prompt_embeds, num_frames, height, width, num_inference_steps,
                                           guidance_scale, eta, output_type, callback_steps)
        _check_positive_ints(num_videos_per_prompt=num_videos_per_prompt, free_init_iterations=free_init_iterations)
        if window_size is not None and isinstance(window_size, int) and window_size > num_frames and not loop:
            raise ValueError(f"window_size={window_size} is larger than num_frames={num_frames}; leave it out for "
                             "clips no longer than the training length")
        training = self.training_frames if self.windows_by_default else None
        window_size = window_size or default_window(num_frames, training)
        stride = check_window(num_frames, window_size, window_stride, loop)
        if keyframes and (not isinstance(negative_prompt, (str, type(None))) or prompt_embeds is not None):
            raise ValueError("with a keyframe prompt dict pass one negative_prompt string and no prompt_embeds")
        freeu = self._freeu if freeu is None else _check_freeu(freeu)
        low_pass = None
        if free_init_iterations > 1:
            low_pass = free_init_filter_mask((num_frames, height // self.vae_scale_factor,
                                              width // self.vae_scale_factor), free_init_filter, free_init_spatial,
                                             free_init_temporal, device=self.device)
        guidance = guidance_scale > 1.0 and self.unet.guidance_embedding_dim is None  # CFG: an unconditional batch
        schedule = NoiseSchedule.create(options, num_inference_steps)
        device = self.device

        # 1. text, once per generation: [uncond; cond] with guidance; per frame (N*F, 77, D) for prompt travel
        if keyframes:
            negative = negatives[:1] if negatives else None
            context = self._travel_context(keyframes, negative, num_frames, num_videos_per_prompt, guidance,
                                           clip_skip)
            batch = num_videos_per_prompt
        else:
            context = self.encode_prompt(_repeat(prompts, num_videos_per_prompt),
                                         _repeat(negatives, num_videos_per_prompt), guidance,
                                         _repeat(prompt_embeds, num_videos_per_prompt),
                                         _repeat(negative_prompt_embeds, num_videos_per_prompt), clip_skip)
            batch = context.shape[0] // (2 if guidance else 1)
        noise_dtype = context.dtype

        # 2. initial noise, drawn as diffusers draws it (or with the VideoFusion prior)
        shape = (batch, self.unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} videos; pass one per video")
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (batch, channels, frames, height/8, width/8), "
                             f"got {tuple(latents.shape)}")
        x, start = self._initial_latents(shape, generator, noise_dtype, latents, base, schedule)
        if start == 0 and latents is None:
            x = initial_noise(shape, generator, device, noise_dtype, noise_prior, base_noise_ratio)
            if not loop and num_frames > window_size:
                x = reschedule_noise(x, window_size, stride, generator)
        x = x.to(device=device, dtype=torch.float32)

        # 3. sample: the UNet sees at most window_size frames at once
        self._activate(self.unet)
        unet_dtype = self.unet.dtype
        context = context.to(unet_dtype)
        if keyframes is None and self._offload != "sequential":
            # one text per video: its keys and values for every cross-attention, once for the whole generation
            # (per-frame texts stay text: their K/V would be frames times larger; sequential offload keeps the
            # projections off the device outside a forward)
            context = self.unet.text_kv(context)

        guidance_cond = self._guidance_condition(guidance_scale, batch)

        def guided(x_in: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor | TextKV) -> torch.Tensor:
            inp = torch.cat([x_in, x_in]) if guidance else x_in
            out = self.unet(inp.to(unet_dtype), t.to(device), ctx, guidance_cond).float()
            if guidance:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            return out

        model_fn = windowed(guided, context, keyframes is not None, num_frames, window_size, stride, loop)
        total_steps = num_inference_steps * free_init_iterations
        progress = tqdm(total=total_steps, **self._progress)
        iteration = 0

        def on_step(step: int, t: torch.Tensor, x_now: torch.Tensor) -> torch.Tensor:
            progress.update()
            step += iteration * num_inference_steps
            if callback is not None and step % callback_steps == 0:
                callback(step, t, x_now)
            if callback_on_step_end is not None:
                update = callback_on_step_end(self, step, t, {"latents": x_now}) or {}
                if not isinstance(update, dict):
                    raise TypeError(f"callback_on_step_end must return a dict or None, got {type(update).__name__}")
                if update.get("latents") is not None:
                    if tuple(update["latents"].shape) != tuple(x_now.shape):
                        raise ValueError(f"callback_on_step_end returned latents of shape "
                                         f"{tuple(update['latents'].shape)}; expected {tuple(x_now.shape)}")
                    x_now = update["latents"].to(device=x_now.device, dtype=x_now.dtype)
                if update.get("stop"):
                    self._interrupted = True
            if self._interrupted:
                raise _Stopped(x_now)
            return x_now

        extra = {"eta": eta} if "eta" in inspect.signature(SAMPLERS[base]).parameters else {}
        if start:
            extra["start"] = start
        noise_sampler = video_noise_sampler(shape, generator, device, noise_dtype)
        start_noise = x
        previous_freeu, self.unet.freeu = self.unet.freeu, freeu
        try:
            for iteration in range(free_init_iterations):
                if iteration:  # FreeInit: diffuse the result back to t=T, keep its low frequencies, fresh high ones
                    a_t = schedule.alphas_cumprod[-1].to(device)
                    diffused = a_t**0.5 * x + (1 - a_t) ** 0.5 * start_noise
                    fresh = randn(shape, generator, device, noise_dtype).float()
                    x = mix_frequencies(diffused, fresh, low_pass)
                x = SAMPLERS[base](model_fn, x, schedule, noise_sampler=noise_sampler, callback=on_step, **extra)
        except _Stopped as stopped:
            x = stopped.latents
        finally:
            self.unet.freeu = previous_freeu
            progress.close()
            self._interrupted = False

        # 4. decode -> frames
        if output_type == "latent":
            video = x
        else:
            video = _postprocess(self.decode_latents(x), output_type)
        self._release()
        settings = {"sampler": sampler or base, "num_inference_steps": num_inference_steps,
                    "guidance_scale": float(guidance_scale), "num_frames": num_frames, "height": height, "width": width}
        return TextToVideoOutput(frames=video, settings=settings) if return_dict else (video,)

    def _initial_latents(self, shape: tuple[int, ...], generator, dtype: torch.dtype, latents: torch.Tensor | None,
                         sampler: str, schedule: NoiseSchedule) -> tuple[torch.Tensor | None, int]:
        """(latents to start from, first step). Text-to-video: the given latents or fresh noise from step 0."""
        return latents, 0

    def _travel_context(self, keyframes: tuple[list[int], list[str]], negatives: list[str] | None, num_frames: int,
                        videos: int, guidance: bool, clip_skip: int | None) -> torch.Tensor:
        """Per-frame text states (videos*F, 77, D), interpolated linearly between keyframe prompts."""
        keys, texts = keyframes
        embeds = self.encode_prompt(texts, None, False, clip_skip=clip_skip)  # (K, 77, D)
        weights = keyframe_weights(keys, num_frames).to(embeds.device, embeds.dtype)
        per_frame = torch.einsum("fk,ksd->fsd", weights, embeds).repeat(videos, 1, 1)  # (videos*F, 77, D)
        if not guidance:
            return per_frame
        uncond = self.encode_prompt([""], negatives, True)[:1]  # (1, 77, D)
        return torch.cat([uncond.expand_as(per_frame), per_frame])

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, F, h, w) -> video (B, F, 3, H, W) float32 in [-1, 1]."""
        self._activate(self.vae)
        b, c, f, h, w = latents.shape
        z = (latents / self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        images = self.vae.decode(z.to(self.vae.dtype))
        return images.view(b, f, *images.shape[1:]).float()


class _Stopped(Exception):
    def __init__(self, latents: torch.Tensor):
        super().__init__("generation stopped")
        self.latents = latents


def _repeat(items, times: int):
    """Each prompt (or embedding row) `times` times in a row, as diffusers' num_images_per_prompt."""
    if items is None or times == 1:
        return items
    if isinstance(items, torch.Tensor):
        return items.repeat_interleave(times, dim=0)
    return [item for item in items for _ in range(times)]


SETTINGS_KEYS = ("prompt", "negative_prompt", "seed", "fps")


def generation_settings(ran: dict[str, Any], params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The settings a video was made with, as stored in the files the service and batch jobs write: what ran
    (`TextToVideoOutput.settings`: sampler, steps, guidance and size with defaults resolved), the request's prompt,
    negative prompt, seed and fps, the vidfusion version and `extra`."""
    from . import __version__

    settings = {"vidfusion": __version__, **extra, **{k: params.get(k) for k in SETTINGS_KEYS}, **ran}
    return {k: v for k, v in settings.items() if v not in (None, "")}


def _check_freeu(freeu) -> tuple[float, float, float, float]:
    if (not isinstance(freeu, (tuple, list)) or len(freeu) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in freeu)):
        raise ValueError(f"freeu must be four numbers (s1, s2, b1, b2), e.g. (0.9, 0.2, 1.2, 1.4); got {freeu!r}")
    return tuple(float(v) for v in freeu)


def _as_list(value: str | list[str], name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def _check_positive_ints(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_frames, height, width,
                  steps, guidance_scale, eta, output_type, callback_steps):
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass a prompt (or prompt_embeds)")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both")
    prompts = _as_list(prompt, "prompt") if prompt is not None else None
    negatives = None
    if negative_prompt is not None:
        if negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        negatives = _as_list(negative_prompt, "negative_prompt")
        if isinstance(negative_prompt, str):
            negatives = negatives * batch  # one negative prompt for every prompt
        if len(negatives) != batch:
            raise ValueError(f"negative_prompt has {len(negatives)} entries but there are {batch} prompts")
    _check_positive_ints(num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                         callback_steps=callback_steps)
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
    if not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
    if not isinstance(eta, (int, float)) or eta < 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    return prompts, negatives


def _postprocess(video: torch.Tensor, output_type: str):
    """video (B, F, 3, H, W) in [-1, 1] -> the requested output type, values in [0, 1]."""
    video = (video / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return video
    frames = video.permute(0, 1, 3, 4, 2).cpu().float().numpy()  # (B, F, H, W, 3)
    if output_type == "np":
        return frames
    from PIL import Image

    return [[Image.fromarray(f) for f in (clip * 255).round().astype(np.uint8)] for clip in frames]


class TextToVideoSDPipeline(TextToVideoPipeline):
    """diffusers' name, so that scripts switch by changing their imports: everything as TextToVideoPipeline,
    but long clips run all frames at once (no windows unless window_size is passed), as diffusers does."""

    windows_by_default = False
