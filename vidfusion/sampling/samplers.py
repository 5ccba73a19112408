"""Samplers as stateless functions with one signature (k-diffusion style):

    sample_<name>(model_fn, x, schedule, *, noise_sampler=None, callback=None, **opts) -> x0

`model_fn(x_in, t)` returns the raw network output (eps, v or x0 as the schedule's prediction_type says)
for the model input `x_in` at timestep `t` (0-dim tensor). `x` is unit-variance initial noise, float32;
each sampler applies its own initial scale. `noise_sampler()` draws fresh unit noise shaped like `x`
(ancestral samplers). `callback(step, t, x)` runs after each of the `schedule.num_steps` steps; a tensor it
returns replaces x.
The numerics follow diffusers' schedulers step for step, so seeds carry over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .multistep import sample_dpmpp_2m, sample_unipc
from .predictions import (
    Callback,
    ModelFn,
    NoiseSampler,
    alpha_sigma,
    draw_noise,
    sigma_x0,
    step_done,
    vp_x0_eps,
)
from .schedules import (
    SAMPLER_NAMES,
    NoiseSchedule,
    consistency_timesteps,
    discrete_sigmas,
    init_noise_sigma,
    multistep_sigmas,
    resolve_sampler,
    spaced_timesteps,
)


def cfg_model(network: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], guidance_scale: float, cfg: bool,
              guided: Callable[[torch.Tensor], bool] | None = None
              ) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """Classifier-free guidance around a network `network(x, t, context) -> output` (k-diffusion's CFGDenoiser):
    with `cfg` the network runs once on [x; x] against the [uncond; cond] context and the outputs are combined as
    uncond + guidance_scale * (cond - uncond), in float32; without it, one plain pass. `guided(t)` False (outside a
    guidance interval) runs one pass on the conditional half of the context only."""

    def model(x: torch.Tensor, t: torch.Tensor, context: Any) -> torch.Tensor:
        if cfg and guided is not None and not guided(t):
            return network(x, t, conditional_half(context)).float()
        out = network(torch.cat([x, x]) if cfg else x, t, context).float()
        if not cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return model


def conditional_half(context: Any) -> Any:
    """The cond half of a [uncond; cond] context: a text tensor (2N, S, D) or its per-layer (keys, values)."""
    if isinstance(context, torch.Tensor):
        return context[context.shape[0] // 2:]
    return tuple(tuple(part[part.shape[0] // 2:] for part in layer) for layer in context)


def guidance_interval(schedule: NoiseSchedule, interval: tuple[float, float] | None
                      ) -> Callable[[torch.Tensor], bool] | None:
    """Kynkaanniemi et al. 2024 ("Applying Guidance in a Limited Interval"): whether a timestep's noise level lies
    in [sigma_lo, sigma_hi], where guidance helps; None applies it everywhere."""
    if interval is None:
        return None
    lo, hi = interval
    return lambda t: lo <= schedule.sigma_at(t) <= hi


# ---- DDIM / PNDM (alpha space, integer timesteps) ---------------------------------------------------------

def sample_ddim(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *, noise_sampler: NoiseSampler = None,
                callback: Callback = None, eta: float = 0.0, start: int = 0) -> torch.Tensor:
    opts, n, ac = schedule.options, schedule.num_steps, schedule.alphas_cumprod
    final = torch.tensor(1.0) if opts["set_alpha_to_one"] else ac[0]
    stride = opts["num_train_timesteps"] // n
    for i, t in enumerate(torch.from_numpy(spaced_timesteps(opts, n, integer=True))):
        if i < start:
            continue
        a_t = ac[t]
        a_prev = ac[t - stride] if t - stride >= 0 else final
        x0, eps = vp_x0_eps(model_fn(x, t), x, a_t, schedule.prediction_type)
        if opts["clip_sample"]:
            x0 = x0.clamp(-opts["clip_sample_range"], opts["clip_sample_range"])
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * draw_noise(noise_sampler, x)
        x = step_done(callback, i, t, x)
    return x


def _pndm_prev(x, t, t_prev, eps, ac, final, kind):
    a_t = ac[t]
    a_prev = ac[t_prev] if t_prev >= 0 else final
    b_t, b_prev = 1 - a_t, 1 - a_prev
    if kind == "v_prediction":
        eps = a_t**0.5 * eps + b_t**0.5 * x
    denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def sample_pndm(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *, noise_sampler: NoiseSampler = None,
                callback: Callback = None, start: int = 0) -> torch.Tensor:
    """Pseudo numerical methods: Runge-Kutta warm-up (unless skip_prk_steps), then linear multistep."""
    opts, n, ac = schedule.options, schedule.num_steps, schedule.alphas_cumprod
    if schedule.prediction_type == "sample":
        raise ValueError("pndm sampler: prediction_type='sample' is not supported")
    if start:
        raise ValueError(f"the pndm sampler cannot start part-way (video-to-video); use one of "
                         f"{', '.join(PARTIAL_SAMPLERS)}")
    final = torch.tensor(1.0) if opts["set_alpha_to_one"] else ac[0]
    stride = opts["num_train_timesteps"] // n
    base = spaced_timesteps(opts, n, integer=True)[::-1].copy()  # ascending
    kind = schedule.prediction_type

    def prev(sample, t, t_prev, eps):
        return _pndm_prev(sample, t, t_prev, eps, ac, final, kind)

    ets: list[torch.Tensor] = []
    step = -1
    if opts["skip_prk_steps"]:
        timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        first_x = None
        for i, t in enumerate(timesteps.tolist()):
            eps = model_fn(x, torch.tensor(t))
            if i == 0:
                ets.append(eps)
                first_x = x
                x = prev(x, t, t - stride, eps)
            elif i == 1:  # second evaluation at the same point: average it with the first, restart from x_0
                x = prev(first_x, t + stride, t, (eps + ets[-1]) / 2)
            else:
                ets = ets[-3:] + [eps]
                x = prev(x, t, t - stride, _plms_combination(ets))
            if i >= 1:
                step += 1
                x = step_done(callback, step, torch.tensor(t), x)
        return x

    half = stride // 2
    prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
    plms = base[:-3][::-1].copy()
    acc: torch.Tensor | int = 0
    cur_x = x
    for counter, t in enumerate(prk.tolist()):
        eps = model_fn(x, torch.tensor(t))
        t_prev = t - (0 if counter % 2 else half)
        t_ref = int(prk[counter // 4 * 4])
        phase = counter % 4
        if phase == 0:
            acc = acc + 1 / 6 * eps
            ets.append(eps)
            cur_x = x
        elif phase in (1, 2):
            acc = acc + 1 / 3 * eps
        else:
            eps = acc + 1 / 6 * eps
            acc = 0
        x = prev(cur_x, t_ref, t_prev, eps)
        if phase == 3:
            step += 1
            x = step_done(callback, step, torch.tensor(t), x)
    for t in plms.tolist():
        eps = model_fn(x, torch.tensor(t))
        ets = ets[-3:] + [eps]
        x = prev(x, t, t - stride, _plms_combination(ets))
        step += 1
        x = step_done(callback, step, torch.tensor(t), x)
    return x


def _plms_combination(ets: list[torch.Tensor]) -> torch.Tensor:
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


# ---- Euler family (sigma space, fractional timesteps) -----------------------------------------------------

def _scaled(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / ((sigma**2 + 1) ** 0.5)


def sample_euler(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *, noise_sampler: NoiseSampler = None,
                 callback: Callback = None, start: int = 0) -> torch.Tensor:
    timesteps, sigmas = discrete_sigmas(schedule, config_limits=True)
    x = x if start else x * init_noise_sigma(sigmas, schedule.options)
    for i in range(start, len(timesteps)):
        t, sigma = timesteps[i], sigmas[i]
        x0 = sigma_x0(model_fn(_scaled(x, sigma), t), x, sigma, schedule.prediction_type)
        x = x + (x - x0) / sigma * (sigmas[i + 1] - sigma)
        x = step_done(callback, i, t, x)
    return x


def sample_euler_ancestral(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *,
                           noise_sampler: NoiseSampler = None, callback: Callback = None,
                           start: int = 0) -> torch.Tensor:
    timesteps, sigmas = discrete_sigmas(schedule, config_limits=False)
    x = x if start else x * init_noise_sigma(sigmas, schedule.options)
    for i in range(start, len(timesteps)):
        t, s_from, s_to = timesteps[i], sigmas[i], sigmas[i + 1]
        x0 = sigma_x0(model_fn(_scaled(x, s_from), t), x, s_from, schedule.prediction_type)
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
        s_down = (s_to**2 - s_up**2) ** 0.5
        x = x + (x - x0) / s_from * (s_down - s_from)
        x = x + draw_noise(noise_sampler, x) * s_up
        x = step_done(callback, i, t, x)
    return x


def sample_heun(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *, noise_sampler: NoiseSampler = None,
                callback: Callback = None, start: int = 0) -> torch.Tensor:
    opts, kind = schedule.options, schedule.prediction_type
    timesteps, sigmas = discrete_sigmas(schedule, config_limits=False)
    x = x if start else x * init_noise_sigma(sigmas, opts)

    def derivative(x_at, sigma, t):
        x0 = sigma_x0(model_fn(_scaled(x_at, sigma), t), x_at, sigma, kind)
        if opts["clip_sample"]:
            x0 = x0.clamp(-opts["clip_sample_range"], opts["clip_sample_range"])
        return (x_at - x0) / sigma

    n = len(timesteps)
    for i in range(start, n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = derivative(x, sigma, timesteps[i])
        dt = sigma_next - sigma
        if i < n - 1:  # second evaluation at the end point, then average the slopes
            d = (d + derivative(x + d * dt, sigma_next, timesteps[i + 1])) / 2
        x = x + d * dt
        x = step_done(callback, i, timesteps[i], x)
    return x


def _lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial j (exact Gauss-Legendre)."""
    nodes, weights = np.polynomial.legendre.leggauss(4)
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    prod = np.ones_like(tau)
    for k in range(order):
        if k != j:
            prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.sum(weights * prod))


def sample_lms(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *, noise_sampler: NoiseSampler = None,
               callback: Callback = None, order: int = 4, start: int = 0) -> torch.Tensor:
    timesteps, sigmas = discrete_sigmas(schedule, config_limits=False)
    x = x if start else x * init_noise_sigma(sigmas, schedule.options)
    sig = sigmas.double().numpy()
    derivatives: list[torch.Tensor] = []
    for i in range(start, len(timesteps)):
        t, sigma = timesteps[i], sigmas[i]
        x0 = sigma_x0(model_fn(_scaled(x, sigma), t), x, sigma, schedule.prediction_type)
        derivatives = (derivatives + [(x - x0) / sigma])[-order:]
        cur = min(i + 1, order)
        coeffs = [_lms_coefficient(sig, cur, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(derivatives)))
        x = step_done(callback, i, t, x)
    return x


# ---- consistency models (LCM / MCM, T2V-Turbo): denoise to x0 in one pass, re-noise to the next step -------------

def consistency_scalings(t: torch.Tensor, timestep_scaling: float, sigma_data: float = 0.5):
    """Boundary-condition scalings (c_skip, c_out) at discrete timestep t: c_skip -> 1 and c_out -> 0 as t -> 0."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def _sample_consistency(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, sampler: str,
                        noise_sampler: NoiseSampler, callback: Callback, start: int) -> torch.Tensor:
    opts, ac = schedule.options, schedule.alphas_cumprod
    timesteps = torch.from_numpy(consistency_timesteps(opts, schedule.num_steps, sampler))
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        x0, _ = vp_x0_eps(model_fn(x, t), x, ac[t], schedule.prediction_type)
        if opts.get("clip_sample"):
            x0 = x0.clamp(-opts["clip_sample_range"], opts["clip_sample_range"])
        c_skip, c_out = consistency_scalings(t, opts["timestep_scaling"])
        denoised = c_out * x0 + c_skip * x
        if i < len(timesteps) - 1:  # fresh noise up to the next timestep; the last step returns the denoised sample
            a_next = ac[timesteps[i + 1]]
            x = a_next.sqrt() * denoised + (1 - a_next).sqrt() * draw_noise(noise_sampler, x)
        else:
            x = denoised
        x = step_done(callback, i, t, x)
    return x


def sample_lcm(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *, noise_sampler: NoiseSampler = None,
               callback: Callback = None, start: int = 0) -> torch.Tensor:
    """Latent consistency model multistep sampling (diffusers' LCMScheduler; MCM with timestep_scaling=4)."""
    return _sample_consistency(model_fn, x, schedule, "lcm", noise_sampler, callback, start)


def sample_t2v_turbo(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *,
                     noise_sampler: NoiseSampler = None, callback: Callback = None, start: int = 0) -> torch.Tensor:
    """T2V-Turbo (MS): consistency sampling on every (50 // n)-th distillation timestep from 999, timestep scaling 10.
    The guidance scale is an input of the UNet (its guidance embedding), not classifier-free guidance."""
    return _sample_consistency(model_fn, x, schedule, "t2v-turbo", noise_sampler, callback, start)


def start_state(sampler: str, schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, start: int
                ) -> torch.Tensor:
    """Clean latents x0 noised to step `start` of `sampler`'s schedule, in that sampler's own space: what
    `sample_<name>(..., start=start)` continues from (image/video-to-video; diffusers' add_noise)."""
    if sampler in ("euler", "euler-ancestral", "heun", "lms"):
        _, sigmas = discrete_sigmas(schedule, config_limits=sampler == "euler")
        return x0 + noise * sigmas[start]
    if sampler in ("dpmpp-2m", "unipc"):
        alpha_t, sigma_t = alpha_sigma(multistep_sigmas(schedule)[1][start])
        return alpha_t * x0 + sigma_t * noise
    if sampler in ("ddim", *CONSISTENCY):
        t = int(_start_timesteps(sampler, schedule)[start])
        a_t = schedule.alphas_cumprod[t]
        return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * noise
    raise ValueError(f"the {sampler} sampler cannot start part-way (video-to-video); use one of "
                     f"{', '.join(PARTIAL_SAMPLERS)}")


def first_step(sampler: str, schedule: NoiseSchedule, strength: float) -> int:
    """The step video-to-video starts at for `strength` (0 keeps the input, 1 starts from noise): diffusers'
    `steps - int(steps * strength)`; the few-step consistency samplers start at their first timestep at or below
    strength * num_train_timesteps (num_steps: none runs)."""
    steps = schedule.num_steps
    if sampler not in CONSISTENCY:
        return steps - min(int(steps * strength), steps)
    limit = strength * schedule.options["num_train_timesteps"]
    return next((i for i, t in enumerate(_start_timesteps(sampler, schedule)) if t <= limit), steps)


def _start_timesteps(sampler: str, schedule: NoiseSchedule) -> np.ndarray:
    if sampler in CONSISTENCY:
        return consistency_timesteps(schedule.options, schedule.num_steps, sampler)
    return spaced_timesteps(schedule.options, schedule.num_steps, integer=True)


CONSISTENCY = ("lcm", "t2v-turbo")
# base samplers that can start part-way through their schedule (video-to-video, pictures); pndm cannot
PARTIAL_BASES = ("ddim", "dpmpp-2m", "unipc", "euler", "euler-ancestral", "heun", "lms", *CONSISTENCY)
PARTIAL_SAMPLERS = tuple(name for name in SAMPLER_NAMES if resolve_sampler(name)[0] in PARTIAL_BASES)  # names


SAMPLERS = {
    "ddim": sample_ddim,
    "pndm": sample_pndm,
    "euler": sample_euler,
    "euler-ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpmpp-2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
    "t2v-turbo": sample_t2v_turbo,
}
