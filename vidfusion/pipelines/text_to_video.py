"""TextToVideoPipeline: encode prompt -> make noise -> sample -> decode -> frames, as a straight line."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checkpoints.layout import load_checkpoint
from ..checkpoints.loading import TRAINING_FRAMES
from ..checkpoints.tiny_decoder import load_tiny_decoder
from ..lora.adapters import LoraAdapters
from ..lora.formats import read_lora_file
from ..models.layers import Downsample, ResnetBlock, TextKV, Upsample
from ..models.text_encoder import encode_text
from ..models.tiny_vae import decode_frames, preview_frames
from ..models.unet3d import TemporalConvLayer, Transformer2D, TransformerTemporal
from ..models.vae import approximate_rgb
from ..sampling.noise import initial_noise, video_noise_sampler
from ..sampling.samplers import cfg_model, guidance_interval
from ..sampling.schedulers import Scheduler
from ..sampling.schedules import FEW_STEP_DEFAULTS, SAMPLER_NAMES, resolve_sampler, sampler_options, step_defaults
from ..sampling.step_cache import CachedNetwork
from .conditioning import ImageConditioning, encode_pictures, still_start
from .generation import (
    Plan,
    StepContexts,
    StepReporter,
    Stopped,
    check_noise_inputs,
    encode_segments,
    guidance_condition,
    make_plan,
    postprocess,
    repeat_each,
    sample_with_free_init,
    travel_context,
)
from .long_video import current, reschedule_noise, windowed
from .offload import OffloadState, offload_device
from .prompts import encode_prompts, same_length

COMPILED_BLOCKS = (ResnetBlock, TemporalConvLayer, Transformer2D, TransformerTemporal, Upsample, Downsample)
REGIONAL_RECOMPILE_LIMIT = 256  # graphs per compiled block class (dynamo's default, 8, failed cpu-unet's resnets)


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
        self._offload = OffloadState()
        self._freeu: tuple[float, float, float, float] | None = None
        self._interrupted = False
        self._lora = LoraAdapters()
        self.tiny_decoder: torch.nn.Module | None = None  # load_tiny_decoder()

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
        self._offload.disable()
        for model in self._models():
            model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        """The device computations run on."""
        if self._offload.device is not None:
            return self._offload.device
        return self.unet.conv_in.weight.device

    dtype = property(lambda self: self.unet.dtype, doc="The UNet's dtype.")

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        """Keep models on the CPU and move each whole model to the accelerator while it runs."""
        self._offload.enable_model(self._models(), offload_device(gpu_id, device))

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None,
                                      device: str | torch.device | None = None) -> None:
        """Keep weights on the CPU and move each submodule to the accelerator only for its forward."""
        self._offload.enable_sequential(self._models(), offload_device(gpu_id, device))

    def _activate(self, model: torch.nn.Module) -> None:
        self._offload.activate(model, self._models())

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
                      clip_skip: int | None = None, syntax: str = "a1111", weighting: str = "original"
                      ) -> torch.Tensor:
        """Text states for the UNet: [uncond; cond] stacked (2B, 77, D) with guidance, else cond (B, 77, D)."""
        device, dtype = self.device, self.text_encoder.dtype
        self._activate(self.text_encoder)
        if prompt_embeds is None:
            prompt_embeds = encode_prompts(self.text_encoder, self.tokenizer, prompts, device, clip_skip, syntax,
                                           weighting)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if not guidance:
            return prompt_embeds
        if negative_prompt_embeds is None:
            batch = prompt_embeds.shape[0]
            negative = negative if negative is not None else [""] * batch
            negative_prompt_embeds = encode_prompts(self.text_encoder, self.tokenizer, negative, device, None,
                                                    syntax, weighting)
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        negative_prompt_embeds, prompt_embeds = self._same_length(negative_prompt_embeds, prompt_embeds)
        return torch.cat([negative_prompt_embeds, prompt_embeds])

    def _same_length(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cond and uncond states padded to one token length with the empty prompt's chunk (long prompts)."""
        if a.shape[1] == b.shape[1]:
            return a, b
        empty = encode_text(self.text_encoder, self.tokenizer, [""], a.device)[0]
        return same_length(a, b, empty)

    def sampler_or_turbo(self, sampler: str | None) -> tuple[str, dict[str, Any]]:
        """(solver, its options) for a sampler name. None: the checkpoint's scheduler, or t2v-turbo once the
        T2V-Turbo LoRA has given the UNet a guidance embedding (a guidance-distilled UNet samples in few steps)."""
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
        base = self.sampler_or_turbo(sampler)[0]
        return (sampler or base, *step_defaults(base, self.default_guidance_scale))

    def sampler_defaults(self) -> dict[str, tuple[int, float]]:
        """(steps, guidance) of every sampler this pipeline can run ("": its default), for the service and form."""
        table = {"": self.generation_defaults()[1:]}
        for name in SAMPLER_NAMES:
            try:
                table[name] = self.generation_defaults(name)[1:]
            except ValueError:  # t2v-turbo without the T2V-Turbo UNet
                continue
        return table

    def compile(self, *, regional: bool = True, mode: str | None = None, backend: str = "inductor"
                ) -> TextToVideoPipeline:
        """Opt-in torch.compile of the UNet and the VAE decoder (no graph breaks). regional: each repeated block
        (COMPILED_BLOCKS) compiled per shape and reused; otherwise the whole UNet forward as one full graph.
        mode="reduce-overhead" adds CUDA graphs on GPU. Returns the pipeline."""
        if self._offload.mode == "sequential":
            raise ValueError("compile() does not combine with enable_sequential_cpu_offload(); use model offload")
        if regional:  # a block class runs with many weight shapes (and video sizes): a graph for each, no failure
            limits = torch._dynamo.config
            limits.recompile_limit = max(limits.recompile_limit, REGIONAL_RECOMPILE_LIMIT)
            limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, 4 * REGIONAL_RECOMPILE_LIMIT)
            for module in [*self.unet.modules(), *self.vae.decoder.modules()]:
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

    def preview(self, latents: torch.Tensor) -> np.ndarray:
        """Live preview: latents (B, 4, F, h, w) -> uint8 frames (B, F, H, W, 3), by the tiny decoder once loaded
        (load_tiny_decoder: real pictures), else the latents' approximate colours at latent size (no decoder)."""
        return approximate_rgb(latents) if self.tiny_decoder is None else preview_frames(self.tiny_decoder, latents)

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
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        prompt_syntax: str = "a1111", prompt_weighting: str = "original",
        image: Any = None, last_image: Any = None, images: dict[int, Any] | None = None, image_weights: Any = None,
        image_init_strength: float | None = None, decoder: str = "vae",
        cache: str | None = None, cache_interval: int = 3, cache_branch: int = 0, cache_schedule: str = "uniform",
    ) -> TextToVideoOutput | tuple:
        """Generate num_videos_per_prompt videos per prompt. See README for the meaning of each argument.
        num_inference_steps defaults to 50 (4 for the few-step samplers), guidance_scale to 9 (1, no classifier-free
        guidance, for lcm / mcm; 7.5 for t2v-turbo)."""
        call = dict(locals())
        del call["self"]
        plan = make_plan(self, call)  # 1. every setting resolved and checked
        reporter = StepReporter(self, plan.steps * plan.free_init_iterations, self._progress, callback, callback_steps,
                                callback_on_step_end)
        try:  # 2. text, once -> 3. noise and the sampler loop (LoRAs at cross_attention_kwargs' scale meanwhile)
            with self._lora.scaled(self._adapter_models(), plan.lora_scale):
                context, batch = self._encode(plan, prompt_embeds, negative_prompt_embeds, clip_skip)
                x = self._denoise(plan, context, batch, generator, latents, reporter)
        finally:
            reporter.close()
            self._interrupted = False
        video = x if output_type == "latent" else postprocess(self.decode_latents(x, decoder), output_type)  # 4.
        self._offload.release(self._models())
        return TextToVideoOutput(frames=video, settings=plan.settings()) if return_dict else (video,)

    def _encode(self, plan: Plan, prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None,
                clip_skip: int | None) -> tuple[torch.Tensor | StepContexts, int]:
        """(text states, videos): [uncond; cond] with guidance; per frame (N*F, 77, D) for prompt travel; with prompt
        editing, the states of each segment of steps (StepContexts)."""
        if plan.edits:
            return encode_segments(plan, lambda step_plan: self._encode(step_plan, prompt_embeds,
                                                                        negative_prompt_embeds, clip_skip))
        times = plan.videos_per_prompt
        if plan.keyframes:
            negative = plan.negatives[:1] if plan.negatives else None
            return travel_context(self, plan, negative, times, clip_skip), times
        context = self.encode_prompt(repeat_each(plan.prompts, times), repeat_each(plan.negatives, times), plan.cfg,
                                     repeat_each(prompt_embeds, times), repeat_each(negative_prompt_embeds, times),
                                     clip_skip, plan.prompt_syntax, plan.prompt_weighting)
        return context, context.shape[0] // (2 if plan.cfg else 1)

    def _denoise(self, plan: Plan, context: torch.Tensor | StepContexts, batch: int, generator,
                 latents: torch.Tensor | None, reporter: StepReporter) -> torch.Tensor:
        """Initial latents -> the sampler loop (FreeInit passes, windows of frames) -> final latents (B, C, F, h, w)."""
        device, noise_dtype = self.device, current(context).dtype
        shape = (batch, self.unet.config.in_channels, plan.num_frames, plan.height // self.vae_scale_factor,
                 plan.width // self.vae_scale_factor)
        check_noise_inputs(shape, generator, latents)
        x, start = self._initial_latents(shape, generator, noise_dtype, latents, plan)
        x = x.to(device=device, dtype=torch.float32)
        self._activate(self.unet)
        unet_dtype = self.unet.dtype
        stepped = context if isinstance(context, StepContexts) else StepContexts([(plan.steps, context)])
        stepped = stepped.map(lambda c: c.to(unet_dtype))
        if plan.keyframes is None and self._offload.mode != "sequential":
            # one text per video: its keys and values for every cross-attention, once for the whole generation
            # (per-frame texts stay text: their K/V would be frames times larger; sequential offload keeps the
            # projections off the device outside a forward)
            stepped = stepped.map(self.unet.text_kv)
        reporter.contexts = stepped if len(stepped.segments) > 1 else None
        context = stepped if reporter.contexts is not None else stepped.current
        guidance_cond = guidance_condition(self.unet, plan.guidance_scale, batch, device)

        def network(x_in: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor | TextKV, cache=None) -> torch.Tensor:
            return self.unet(x_in.to(unet_dtype), t.to(device), ctx, guidance_cond, cache)

        guided = guidance_interval(plan.schedule, plan.guidance_interval)
        net = CachedNetwork(plan.cache, plan.steps - start, network, reporter) if plan.cache else network  # steps run
        model_fn = windowed(cfg_model(net, plan.guidance_scale, plan.cfg, guided), context,
                            plan.keyframes is not None, plan.num_frames, plan.window_size, plan.window_stride,
                            plan.loop)
        noise_sampler = video_noise_sampler(shape, generator, device, noise_dtype)
        if plan.images:  # pictures fixed in their frames after every step (conditioning.py)
            pictures = encode_pictures(self, plan.images, shape, plan.height, plan.width)
            reporter.conditioning = ImageConditioning(pictures, plan.image_weights, plan.base, plan.schedule,
                                                      generator)
        previous_freeu, self.unet.freeu = self.unet.freeu, plan.freeu
        reporter.start()
        try:
            return sample_with_free_init(model_fn, x, plan, reporter, noise_sampler, generator, noise_dtype, start)
        except Stopped as stopped:
            return stopped.latents
        finally:
            self.unet.freeu = previous_freeu

    def _initial_latents(self, shape: tuple[int, ...], generator, dtype: torch.dtype, latents: torch.Tensor | None,
                         plan: Plan) -> tuple[torch.Tensor, int]:
        """(latents to start from, first step). Text-to-video: the given latents, or noise drawn as diffusers draws
        it (or with the VideoFusion prior; rescheduled across windows for long clips), from step 0."""
        if latents is not None:
            return latents, 0
        x = initial_noise(shape, generator, self.device, dtype, plan.noise_prior, plan.base_noise_ratio)
        if not plan.loop and plan.num_frames > plan.window_size:
            x = reschedule_noise(x, plan.window_size, plan.window_stride, generator)
        return still_start(self, plan, x) if plan.image_init_strength is not None else (x, 0)

    def load_tiny_decoder(self, source: str | os.PathLike = "madebyollin/taesd") -> None:
        """TAESD's decoder (tiny_vae.py) for `decoder="tiny"`: drafts decoded with ~18x fewer FLOPs."""
        self.tiny_decoder = load_tiny_decoder(source, self.vae.dtype).to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, decoder: str = "vae") -> torch.Tensor:
        """latents (B, C, F, h, w) -> video (B, F, 3, H, W) float32 in [-1, 1], by the VAE or the tiny decoder."""
        if decoder == "tiny":
            return decode_frames(self.tiny_decoder, latents.to(self.device))
        self._activate(self.vae)
        b, c, f, h, w = latents.shape
        z = (latents / self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        images = self.vae.decode(z.to(self.vae.dtype))
        return images.view(b, f, *images.shape[1:]).float()


class TextToVideoSDPipeline(TextToVideoPipeline):
    """diffusers' name, so that scripts switch by changing their imports. It differs from TextToVideoPipeline only
    by windowing: clips longer than 24 frames also run all frames at once (no windows unless window_size is
    passed), as diffusers does."""

    windows_by_default = False
