"""One generation's stages outside the pipeline class: the plan (every setting resolved and checked once), the
per-step reporting the samplers call, the FreeInit restart loop and the output conversion. The pipeline's
`__call__` runs plan -> encode -> denoise -> decode with these."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..models.layers import guidance_embedding
from ..sampling.noise import check_noise_prior, free_init_filter, mix_frequencies, randn
from ..sampling.samplers import PARTIAL_BASES, PARTIAL_SAMPLERS, SAMPLERS
from ..sampling.schedules import NoiseSchedule, step_defaults
from ..sampling.step_cache import CacheSettings, check_cache
from .conditioning import conditioned_frames, frame_weights
from .long_video import check_keyframes, check_window, default_window, keyframe_weights
from .prompts import PROMPT_SYNTAXES, WEIGHTINGS, prompt_schedule

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class Plan:
    """Every setting of one call, defaults resolved and checked."""

    sampler: str  # the name asked for (or the default one's): what a file records
    base: str  # the solver it runs (SAMPLERS key)
    schedule: NoiseSchedule
    steps: int
    guidance_scale: float
    cfg: bool  # classifier-free guidance: an unconditional batch beside the conditional one
    num_frames: int
    height: int
    width: int
    prompts: list[str] | None
    negatives: list[str] | None
    keyframes: tuple[list[int], list[str]] | None  # prompt travel
    videos_per_prompt: int
    window_size: int
    window_stride: int
    loop: bool
    freeu: tuple[float, float, float, float] | None
    free_init_iterations: int
    low_pass: torch.Tensor | None  # FreeInit's frequency mask
    noise_prior: str
    base_noise_ratio: float
    eta: float
    output_type: str
    lora_scale: float | None = None  # cross_attention_kwargs["scale"]: the active LoRAs' weights times this
    guidance_interval: tuple[float, float] | None = None  # CFG only for sigma in [lo, hi]
    prompt_syntax: str = "a1111"  # "none": brackets are literal text
    prompt_weighting: str = "original"  # A1111's mean-preserving weights, or "plain"
    images: dict[int, Any] | None = None  # conditioned frames -> picture
    image_weights: torch.Tensor | None = None  # (F,) blend weights of the pictures' latents
    image_init_strength: float | None = None  # start from the first picture over every frame, noised this much
    # prompt editing / alternation: (last step, prompts, negatives) segments; None when every step sees one text
    edits: list[tuple[int, list[str], list[str] | None]] | None = None
    cache: CacheSettings | None = None  # step caching (step_cache.py)
    dtype: str = "float32"  # the UNet's dtype: a file records it, as it changes the frames

    def sampler_options(self) -> dict[str, Any]:
        """Keyword options of the sampler beyond the shared signature (eta where it takes one)."""
        return {"eta": self.eta} if "eta" in inspect.signature(SAMPLERS[self.base]).parameters else {}

    def settings(self) -> dict[str, Any]:
        """What ran, as a file made from it records (TextToVideoOutput.settings)."""
        ran = {"sampler": self.sampler, "num_inference_steps": self.steps,
               "guidance_scale": float(self.guidance_scale), "num_frames": self.num_frames, "height": self.height,
               "width": self.width, "dtype": self.dtype}
        if self.guidance_interval:
            ran["guidance_interval"] = list(self.guidance_interval)
        if self.prompt_syntax != "a1111":
            ran["prompt_syntax"] = self.prompt_syntax
        if self.prompt_weighting != "original":
            ran["prompt_weighting"] = self.prompt_weighting
        return {**ran, **self.cache.settings()} if self.cache else ran


def make_plan(pipe: Any, call: dict[str, Any]) -> Plan:
    """The plan of `pipe(**call)`: defaults of the sampler, size and windows resolved; bad input a clear error."""
    base, options = pipe.sampler_or_turbo(call["sampler"])
    default_steps, default_guidance = step_defaults(base, pipe.default_guidance_scale)
    steps = default_steps if call["num_inference_steps"] is None else call["num_inference_steps"]
    guidance_scale = default_guidance if call["guidance_scale"] is None else call["guidance_scale"]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = call["height"] or size, call["width"] or size
    num_frames, prompt = call["num_frames"], call["prompt"]
    keyframes = check_keyframes(prompt, num_frames) if isinstance(prompt, dict) else None
    prompts, negatives = check_inputs(keyframes[1] if keyframes else prompt, call["negative_prompt"],
                                      call["prompt_embeds"], call["negative_prompt_embeds"], num_frames, height, width,
                                      steps, guidance_scale, call["eta"], call["output_type"], call["callback_steps"])
    check_positive_ints(num_videos_per_prompt=call["num_videos_per_prompt"],
                        free_init_iterations=call["free_init_iterations"])
    check_noise_prior(call["noise_prior"], call["base_noise_ratio"])
    if call["decoder"] not in ("vae", "tiny") or (call["decoder"] == "tiny" and pipe.tiny_decoder is None):
        raise ValueError(f"decoder must be 'vae' or 'tiny' (after pipe.load_tiny_decoder(); CLI --decoder tiny), "
                         f"got {call['decoder']!r}")
    lora_scale = check_cross_attention_kwargs(call["cross_attention_kwargs"])
    images = conditioned_frames(num_frames, call["image"], call["last_image"], call["images"])
    if images and base not in PARTIAL_BASES:
        raise ValueError(f"image conditioning needs a sampler that can noise a picture to any step; {base} cannot "
                         f"(use one of {', '.join(PARTIAL_SAMPLERS)})")
    init_strength = call["image_init_strength"]
    if init_strength is not None and (not images or not isinstance(init_strength, (int, float))
                                      or not 0 <= init_strength <= 1):
        raise ValueError(f"image_init_strength must be a number in [0, 1] and needs image= / images=; got "
                         f"{init_strength!r}")
    if init_strength is not None and call["free_init_iterations"] > 1:
        raise ValueError("image_init_strength starts from the picture; it does not combine with free_init_iterations")
    if call["prompt_syntax"] not in PROMPT_SYNTAXES or call["prompt_weighting"] not in WEIGHTINGS:
        raise ValueError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)} and prompt_weighting one of "
                         f"{', '.join(WEIGHTINGS)}; got {call['prompt_syntax']!r}, {call['prompt_weighting']!r}")
    interval = call["guidance_interval"]
    if interval is not None:
        if (not isinstance(interval, (tuple, list)) or len(interval) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
                or not 0 <= interval[0] <= interval[1]):
            raise ValueError(f"guidance_interval must be (sigma_lo, sigma_hi) with 0 <= lo <= hi, got {interval!r}")
        interval = (float(interval[0]), float(interval[1]))
    window_size, loop = call["window_size"], call["loop"]
    if isinstance(window_size, int) and window_size > num_frames and not loop:
        raise ValueError(f"window_size={window_size} is larger than num_frames={num_frames}; leave it out for "
                         "clips no longer than the training length")
    window_size = window_size or default_window(num_frames, pipe.training_frames if pipe.windows_by_default else None)
    stride = check_window(num_frames, window_size, call["window_stride"], loop)
    if keyframes and (not isinstance(call["negative_prompt"], (str, type(None))) or call["prompt_embeds"] is not None):
        raise ValueError("with a keyframe prompt dict pass one negative_prompt string and no prompt_embeds")
    low_pass = None
    if call["free_init_iterations"] > 1:
        latent_size = (num_frames, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        low_pass = free_init_filter(latent_size, call["free_init_filter"], call["free_init_spatial"],
                                    call["free_init_temporal"], device=pipe.device)
    return Plan(sampler=call["sampler"] or base, base=base, schedule=NoiseSchedule.create(options, steps), steps=steps,
                guidance_scale=guidance_scale, cfg=guidance_scale > 1.0 and pipe.unet.guidance_embedding_dim is None,
                num_frames=num_frames, height=height, width=width, prompts=prompts, negatives=negatives,
                keyframes=keyframes, videos_per_prompt=call["num_videos_per_prompt"], window_size=window_size,
                window_stride=stride, loop=loop,
                freeu=pipe._freeu if call["freeu"] is None else check_freeu(call["freeu"]),
                free_init_iterations=call["free_init_iterations"], low_pass=low_pass, noise_prior=call["noise_prior"],
                base_noise_ratio=call["base_noise_ratio"], eta=call["eta"], output_type=call["output_type"],
                lora_scale=lora_scale, guidance_interval=interval, prompt_syntax=call["prompt_syntax"],
                prompt_weighting=call["prompt_weighting"], dtype=str(pipe.unet.dtype).removeprefix("torch."),
                images=images or None, image_init_strength=init_strength,
                image_weights=frame_weights(images, num_frames, call["image_weights"]) if images else None,
                edits=text_edits(keyframes[1] if keyframes else prompts, negatives, steps, call["prompt_syntax"]),
                cache=check_cache(call["cache"], call["cache_interval"], call["cache_branch"], call["cache_schedule"],
                                  base, pipe.unet, call["loop"]))


def check_noise_inputs(shape: tuple[int, ...], generator: Any, latents: torch.Tensor | None) -> None:
    """One generator per video when a list is given; given latents of the generation's shape."""
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for {shape[0]} videos; pass one per video")
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} (batch, channels, frames, height/8, width/8), "
                         f"got {tuple(latents.shape)}")


def text_edits(prompts: list[str] | None, negatives: list[str] | None, steps: int, syntax: str
               ) -> list[tuple[int, list[str], list[str] | None]] | None:
    """The texts each denoising step sees when a prompt uses A1111 editing ([from:to:when], [a|b]): consecutive
    schedule steps with the same texts grouped as (end_at_step, prompts, negatives), as prompt_schedule; None when
    nothing changes."""
    if syntax != "a1111" or prompts is None:
        return None
    texts = prompts + (negatives or [])
    schedules = [prompt_schedule(text, steps) for text in texts]
    if all(len(s) == 1 and s[0][1] == t for s, t in zip(schedules, texts)):
        return None
    segments: list[tuple[int, list[str], list[str] | None]] = []
    for step in range(1, steps + 1):
        now = [next(text for last, text in s if step <= last) for s in schedules]
        resolved = (now[:len(prompts)], now[len(prompts):] if negatives else None)
        if segments and (segments[-1][1], segments[-1][2]) == resolved:
            segments[-1] = (step, *resolved)
        else:
            segments.append((step, *resolved))
    return segments


class StepContexts:
    """Text states that change during sampling (prompt editing): (end_at_step, context) segments; `current` is the
    first whose end_at_step >= `step`, the index of the step being computed counted from 0 as A1111's denoiser
    counts (set by the step reporter: the run's first step, then one more after each)."""

    def __init__(self, segments: list[tuple[int, Any]]):
        self.segments, self.step = segments, 0

    @property
    def current(self) -> Any:
        return next((context for last, context in self.segments if self.step <= last), self.segments[-1][1])

    def map(self, fn: Callable[[Any], Any]) -> StepContexts:
        """`fn` of each distinct context once (segments that share a text share its result)."""
        done: dict[int, Any] = {}
        for _, context in self.segments:
            if id(context) not in done:
                done[id(context)] = fn(context)
        return StepContexts([(last, done[id(context)]) for last, context in self.segments])


def encode_segments(plan: Plan, encode: Callable[[Plan], tuple[Any, int]]) -> tuple[StepContexts, int]:
    """Prompt editing's text states: each distinct text of `plan.edits` encoded once by `encode(step_plan)` ->
    (context, videos), shared by every segment that shows it (`[a|b]` over 500 steps: two encodings, not 500)."""
    encoded: dict[tuple, tuple[Any, int]] = {}
    segments = []
    for last, texts, negatives in plan.edits:
        key = (tuple(texts), tuple(negatives or ()))
        if key not in encoded:
            keyframes = (plan.keyframes[0], texts) if plan.keyframes else None
            encoded[key] = encode(replace(plan, prompts=None if keyframes else texts, negatives=negatives,
                                          keyframes=keyframes, edits=None))
        segments.append((last, encoded[key][0]))
    return StepContexts(segments), encoded[key][1]


CROSS_ATTENTION_KWARGS = ("scale",)


def check_cross_attention_kwargs(kwargs: dict[str, Any] | None) -> float | None:
    """diffusers' cross_attention_kwargs: {"scale": s} scales the active LoRA adapters for the call; other keys
    (attention processor options diffusers passes through) are not supported here and are an error."""
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise ValueError(f"cross_attention_kwargs must be a dict such as {{'scale': 0.6}}, got {kwargs!r}")
    unknown = sorted(set(kwargs) - set(CROSS_ATTENTION_KWARGS))
    if unknown:
        raise ValueError(f"cross_attention_kwargs: unsupported key(s) {', '.join(map(repr, unknown))}; supported: "
                         f"{', '.join(CROSS_ATTENTION_KWARGS)} (the LoRA scale)")
    scale = kwargs.get("scale")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise ValueError(f"cross_attention_kwargs['scale'] must be a number, got {scale!r}")
    return None if scale is None else float(scale)


class Stopped(Exception):
    """Raised by the step reporter to end sampling early (interrupt(), {"stop": True}); carries the latents."""

    def __init__(self, latents: torch.Tensor):
        super().__init__("generation stopped")
        self.latents = latents


class StepReporter:
    """The samplers' per-step callback: progress bar, the legacy `callback(step, t, latents)` every
    `callback_steps`, `callback_on_step_end(pipe, step, t, {"latents"})` (may replace the latents or stop) and
    `pipe.interrupt()`. `offset` numbers steps on across FreeInit passes. The progress bar appears when sampling
    starts (`start()`), so an input error found before prints one line only."""

    def __init__(self, pipe: Any, total: int, bar_options: dict[str, Any], callback: Callable | None,
                 callback_steps: int, on_step_end: Callable | None):
        self.pipe, self.callback, self.every, self.on_step_end = pipe, callback, callback_steps, on_step_end
        self.total, self.bar_options, self.progress = total, bar_options, None
        self.offset = 0
        self.contexts: StepContexts | None = None  # advanced after every step (prompt editing)
        self.conditioning: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # pictures fixed in frames
        self.step_cache: Any = None  # step_cache.CachedNetwork: told where each step ends

    def begin_pass(self, iteration: int, steps: int, start: int = 0) -> None:
        """A sampler pass starts (FreeInit repeats it) at step `start` (part-way for video-to-video and picture-started
        runs): steps count from here, texts from the run's first step."""
        self.offset = iteration * steps
        if self.contexts is not None:
            self.contexts.step = start
        if self.step_cache is not None:
            self.step_cache.begin_pass()

    def start(self) -> None:
        from tqdm.auto import tqdm

        self.progress = tqdm(total=self.total, **self.bar_options)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def __call__(self, step: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.progress.update()
        if self.step_cache is not None:
            self.step_cache.next_step()
        if self.contexts is not None:
            self.contexts.step = step + 1  # the next step's text
        if self.conditioning is not None:
            x = self.conditioning(step, x)
        step += self.offset
        if self.callback is not None and step % self.every == 0:
            self.callback(step, t, x)
        if self.on_step_end is not None:
            update = self.on_step_end(self.pipe, step, t, {"latents": x}) or {}
            if not isinstance(update, dict):
                raise TypeError(f"callback_on_step_end must return a dict or None, got {type(update).__name__}")
            if update.get("latents") is not None:
                if tuple(update["latents"].shape) != tuple(x.shape):
                    raise ValueError(f"callback_on_step_end returned latents of shape "
                                     f"{tuple(update['latents'].shape)}; expected {tuple(x.shape)}")
                x = update["latents"].to(device=x.device, dtype=x.dtype)
            if update.get("stop"):
                self.pipe._interrupted = True
        if self.pipe._interrupted:
            raise Stopped(x)
        return x


def sample_with_free_init(model_fn: Callable, x: torch.Tensor, plan: Plan, reporter: StepReporter,
                          noise_sampler: Callable, generator: Any, noise_dtype: torch.dtype, start: int = 0
                          ) -> torch.Tensor:
    """The sampler from `x` (from step `start`), once, or `free_init_iterations` times with FreeInit's restart in
    between: the result diffused back to t=T, its low frequencies kept and fresh noise for the high ones."""
    sampler, extra = SAMPLERS[plan.base], plan.sampler_options()
    if start:
        extra["start"] = start
    start_noise = x
    for iteration in range(plan.free_init_iterations):
        if iteration:
            a_t = plan.schedule.alphas_cumprod[-1].to(x.device)
            diffused = a_t**0.5 * x + (1 - a_t) ** 0.5 * start_noise
            fresh = randn(tuple(x.shape), generator, x.device, noise_dtype).float()
            x = mix_frequencies(diffused, fresh, plan.low_pass)
        reporter.begin_pass(iteration, plan.steps, start)
        x = sampler(model_fn, x, plan.schedule, noise_sampler=noise_sampler, callback=reporter, **extra)
    return finite_latents(x)


def finite_latents(x: torch.Tensor) -> torch.Tensor:
    """The sampler's result, refused when it holds NaN or inf: a garbage video is never decoded and written."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            "sampling produced NaN/inf latents; nothing was written (float16 overflow or a broken checkpoint or LoRA "
            "are the usual causes: try --dtype float32 / bfloat16, a lower LoRA weight or guidance)")
    return x


def travel_context(pipe: Any, plan: Plan, negatives: list[str] | None, videos: int, clip_skip: int | None
                   ) -> torch.Tensor:
    """Prompt travel: per-frame text states (videos*F, T, D), interpolated linearly between the keyframe prompts
    (with guidance, the unconditional text first)."""
    keys, texts = plan.keyframes
    embeds = pipe.encode_prompt(texts, None, False, clip_skip=clip_skip, syntax=plan.prompt_syntax,
                                weighting=plan.prompt_weighting)  # (K, T, D)
    weights = keyframe_weights(keys, plan.num_frames).to(embeds.device, embeds.dtype)
    per_frame = torch.einsum("fk,ksd->fsd", weights, embeds).repeat(videos, 1, 1)  # (videos*F, T, D)
    if not plan.cfg:
        return per_frame
    uncond = pipe.encode_prompt([""], negatives, True, syntax=plan.prompt_syntax,
                                weighting=plan.prompt_weighting)[:1]  # (1, T', D)
    uncond, per_frame = pipe._same_length(uncond, per_frame)
    return torch.cat([uncond.expand_as(per_frame), per_frame])


def guidance_condition(unet: Any, guidance_scale: float, batch: int, device: torch.device) -> torch.Tensor | None:
    """The guidance scale as the UNet's guidance embedding (B, D) for a guidance-distilled UNet, else None."""
    if unet.guidance_embedding_dim is None:
        return None
    w = torch.full((batch,), float(guidance_scale), device=device)
    return guidance_embedding(w, unet.guidance_embedding_dim).to(unet.dtype)


def repeat_each(items, times: int):
    """Each prompt (or embedding row) `times` times in a row, as diffusers' num_images_per_prompt."""
    if items is None or times == 1:
        return items
    if isinstance(items, torch.Tensor):
        return items.repeat_interleave(times, dim=0)
    return [item for item in items for _ in range(times)]


def check_freeu(freeu) -> tuple[float, float, float, float]:
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


def check_positive_ints(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_frames, height, width,
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
    check_positive_ints(num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
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


def postprocess(video: torch.Tensor, output_type: str):
    """video (B, F, 3, H, W) in [-1, 1] -> the requested output type, values in [0, 1]."""
    video = (video / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return video
    frames = video.permute(0, 1, 3, 4, 2).cpu().float().numpy()  # (B, F, H, W, 3)
    if output_type == "np":
        return frames
    from PIL import Image

    return [[Image.fromarray(f) for f in (clip * 255).round().astype(np.uint8)] for clip in frames]
