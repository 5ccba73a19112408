"""Noise schedules: sampler options from scheduler_config.json, betas -> alphas_cumprod, and the
timestep / sigma discretisations of each sampler (numerically identical to diffusers' schedulers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .names import SAMPLER_NAMES

_BASE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
_SIGMA_OPTS: dict[str, Any] = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_THRESHOLD: dict[str, Any] = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}

# Options of each sampler and their defaults: the parameters of the diffusers scheduler class of the same
# numerics. A checkpoint's scheduler_config.json sets those it names (as diffusers' `from_config` does).
SAMPLER_OPTIONS: dict[str, dict[str, Any]] = {
    "ddim": {**_BASE, **_THRESHOLD, "clip_sample": True, "set_alpha_to_one": True, "clip_sample_range": 1.0,
             "timestep_spacing": "leading"},
    "pndm": {**_BASE, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "euler": {**_BASE, **_SIGMA_OPTS, "interpolation_type": "linear", "sigma_min": None, "sigma_max": None,
              "timestep_spacing": "linspace", "timestep_type": "discrete", "final_sigmas_type": "zero"},
    "euler-ancestral": {**_BASE, "timestep_spacing": "linspace"},
    "heun": {**_BASE, **_SIGMA_OPTS, "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
             "clip_sample_range": 1.0, "timestep_spacing": "linspace"},
    "lms": {**_BASE, **_SIGMA_OPTS, "timestep_spacing": "linspace"},
    "dpmpp-2m": {**_BASE, **_SIGMA_OPTS, **_THRESHOLD, "solver_order": 2, "algorithm_type": "dpmsolver++",
                 "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                 "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
                 "lambda_min_clipped": -math.inf, "variance_type": None, "timestep_spacing": "linspace",
                 "use_dynamic_shifting": False},
    "unipc": {**_BASE, **_SIGMA_OPTS, **_THRESHOLD, "solver_order": 2, "predict_x0": True, "solver_type": "bh2",
              "lower_order_final": True, "disable_corrector": [], "solver_p": None, "use_flow_sigmas": False,
              "flow_shift": 1.0, "timestep_spacing": "linspace", "final_sigmas_type": "zero",
              "use_dynamic_shifting": False, "sigma_min": None, "sigma_max": None, "shift_terminal": None},
    # consistency models: LCM / MCM (diffusers' LCMScheduler) and T2V-Turbo (guidance-distilled, one pass per step)
    "lcm": {**_BASE, **_THRESHOLD, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
            "timestep_spacing": "leading", "timestep_scaling": 10.0},
    "t2v-turbo": {**_BASE, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "original_inference_steps": 50, "timestep_scaling": 10.0},
}
SAMPLER_OPTIONS["euler"]["rescale_betas_zero_snr"] = False
SAMPLER_OPTIONS["heun"].pop("rescale_betas_zero_snr")
SAMPLER_OPTIONS["lms"].pop("rescale_betas_zero_snr")
SAMPLER_OPTIONS["pndm"].pop("rescale_betas_zero_snr")

# Named presets on top of a sampler's options.
SAMPLER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp-2m-karras": ("dpmpp-2m", {"use_karras_sigmas": True}),
    "mcm": ("lcm", {"timestep_scaling": 4.0}),  # MCM's LoRAs (yhzhai/mcm) sample as LCM with timestep scaling 4
}
# Few-step samplers: their own num_inference_steps and guidance_scale. LCM / MCM run without classifier-free
# guidance (1: one UNet pass a step, as MCM's demo); T2V-Turbo's 7.5 is an input of its UNet (embedded guidance).
FEW_STEP_DEFAULTS: dict[str, dict[str, float]] = {
    "lcm": {"num_inference_steps": 4, "guidance_scale": 1.0},
    "t2v-turbo": {"num_inference_steps": 4, "guidance_scale": 7.5},
}
# every other sampler: 50 steps, guidance 9 (text-to-video) or 15 (video-to-video), diffusers' defaults
MULTI_STEP_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 9.0}


def step_defaults(sampler: str, guidance_scale: float = MULTI_STEP_DEFAULTS["guidance_scale"]) -> tuple[int, float]:
    """(num_inference_steps, guidance_scale) of a base sampler when a call does not give them; `guidance_scale` is
    the pipeline's own default for the multi-step samplers. The one place every entry point takes them from."""
    few = FEW_STEP_DEFAULTS.get(sampler)
    if few is not None:
        return int(few["num_inference_steps"]), float(few["guidance_scale"])
    return int(MULTI_STEP_DEFAULTS["num_inference_steps"]), float(guidance_scale)

# diffusers scheduler class (as named in scheduler_config.json) -> our sampler
SCHEDULER_CLASSES = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-ancestral",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpmpp-2m",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
}

# Option values that exist in diffusers but are not implemented here: setting them is an error.
_ALLOWED: dict[str, tuple[Any, ...]] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "thresholding": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "variance_type": (None,),
    "solver_p": (None,),
    "shift_terminal": (None,),
    "final_sigmas_type": ("zero", "sigma_min"),
    "algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"),
    "solver_type": ("midpoint", "heun", "bh1", "bh2"),
    "solver_order": (1, 2, 3),
}


def resolve_sampler(name: str) -> tuple[str, dict[str, Any]]:
    """Sampler name -> (base sampler, preset options). Unknown names raise a ValueError listing them."""
    if name in SAMPLER_ALIASES:
        return SAMPLER_ALIASES[name]
    if name in SAMPLER_OPTIONS:
        return name, {}
    raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}")


def sampler_options(sampler: str, scheduler_config: dict[str, Any], overrides: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The sampler's defaults, updated by the keys the checkpoint's scheduler config sets, then by overrides."""
    opts = dict(SAMPLER_OPTIONS[sampler])
    defaults_used = set(scheduler_config.get("_use_default_values", []))
    for key, value in scheduler_config.items():
        if key in opts and key not in defaults_used:
            opts[key] = value
    for key, value in (overrides or {}).items():
        if key not in opts:
            raise ValueError(
                f"option {key!r} is not an option of the {sampler} sampler; its options are: {', '.join(sorted(opts))}"
            )
        opts[key] = value
    for key, allowed in _ALLOWED.items():
        if key in opts and opts[key] not in allowed:
            raise ValueError(
                f"{sampler} sampler: {key}={opts[key]!r} is not supported; "
                f"supported values: {', '.join(map(repr, allowed))}"
            )
    if sampler == "dpmpp-2m" and opts["solver_type"] not in ("midpoint", "heun"):
        opts["solver_type"] = "midpoint"  # diffusers maps UniPC's bh1/bh2 to midpoint as well
    if sampler == "unipc" and opts["solver_type"] not in ("bh1", "bh2"):
        raise ValueError(f"unipc sampler: solver_type={opts['solver_type']!r} is not supported; use 'bh1' or 'bh2'")
    if sum(bool(opts.get(k)) for k in _SIGMA_OPTS) > 1:
        raise ValueError(f"{sampler} sampler: only one of {', '.join(_SIGMA_OPTS)} may be set")
    return opts


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def alphas_cumprod(opts: dict[str, Any]) -> torch.Tensor:
    """Training-time cumulative alpha products (float32, computed exactly as diffusers does)."""
    n = opts["num_train_timesteps"]
    if opts["trained_betas"] is not None:
        betas = torch.tensor(opts["trained_betas"], dtype=torch.float32)
    elif opts["beta_schedule"] == "linear":
        betas = torch.linspace(opts["beta_start"], opts["beta_end"], n, dtype=torch.float32)
    elif opts["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(opts["beta_start"] ** 0.5, opts["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    else:
        betas = _cosine_betas(n)
    if opts.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    ac = torch.cumprod(1.0 - betas, dim=0)
    if opts.get("rescale_betas_zero_snr"):
        ac[-1] = 2**-24
    return ac


@dataclass(frozen=True)
class NoiseSchedule:
    """What every sampler receives: training alphas, resolved options and the number of steps."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32
    options: dict[str, Any] = field(hash=False)
    num_steps: int

    @classmethod
    def create(cls, opts: dict[str, Any], num_steps: int) -> NoiseSchedule:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps!r}")
        if num_steps > opts["num_train_timesteps"]:
            raise ValueError(
                f"num_inference_steps={num_steps} exceeds the model's {opts['num_train_timesteps']} training timesteps"
            )
        return cls(alphas_cumprod(opts), opts, num_steps)

    @property
    def prediction_type(self) -> str:
        return self.options["prediction_type"]

    def train_sigmas(self) -> np.ndarray:
        ac = self.alphas_cumprod
        return (((1 - ac) / ac) ** 0.5).numpy()

    def sigma_at(self, t: torch.Tensor | float) -> float:
        """The noise level sigma = sqrt((1 - a) / a) at timestep t; fractional t (the Euler family) interpolates
        log sigma between the neighbouring training timesteps, as k-diffusion's t_to_sigma."""
        log_sigmas = np.log(self.train_sigmas())
        t = float(t)
        low = int(np.clip(np.floor(t), 0, len(log_sigmas) - 1))
        high = min(low + 1, len(log_sigmas) - 1)
        w = t - low
        return float(np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high]))


def spaced_timesteps(opts: dict[str, Any], n: int, *, integer: bool) -> np.ndarray:
    """Descending timesteps for n steps ('linspace' / 'leading' / 'trailing' spacing, with steps_offset)."""
    total = opts["num_train_timesteps"]
    spacing = opts["timestep_spacing"]
    if spacing == "linspace":
        if integer:
            return np.linspace(0, total - 1, n).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, total - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = total // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64 if integer else np.float32)
        return ts + opts["steps_offset"]
    ratio = total / n
    ts = np.round(np.arange(total, 0, -ratio)).astype(np.int64 if integer else np.float32)
    return ts - 1


def consistency_timesteps(opts: dict[str, Any], n: int, sampler: str) -> np.ndarray:
    """Descending timesteps of the few-step consistency samplers, taken from the distillation schedule
    `arange(1, original_inference_steps + 1) * (num_train_timesteps // original_inference_steps) - 1`:
    "lcm" at floor(linspace(0, original, n, endpoint=False)) of it reversed (diffusers' LCMScheduler);
    "t2v-turbo" every (original // n)-th from the end (T2V-Turbo's scheduler; n=4 -> 999, 759, 519, 279)."""
    original, total = opts["original_inference_steps"], opts["num_train_timesteps"]
    if not isinstance(original, int) or not 1 <= original <= total:
        raise ValueError(f"{sampler} sampler: original_inference_steps must be in 1..{total}, got {original!r}")
    if n > original:
        raise ValueError(f"{sampler} sampler: num_inference_steps={n} is more than its original_inference_steps="
                         f"{original}; use at most {original} steps (1-8 is the usual range)")
    origin = np.arange(1, original + 1, dtype=np.int64) * (total // original) - 1
    if sampler == "lcm":
        return origin[::-1][np.floor(np.linspace(0, original, num=n, endpoint=False)).astype(np.int64)].copy()
    return origin[::-(original // n)][:n].copy()


def multistep_timesteps(opts: dict[str, Any], n: int, last_timestep: int) -> np.ndarray:
    """The n+1-point spacing used by the multistep solvers (DPM-Solver, UniPC), last point dropped."""
    spacing = opts["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last_timestep // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return ts + opts["steps_offset"]
    ratio = opts["num_train_timesteps"] / n
    return np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64) - 1


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by linear interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train_sigmas.shape[0] - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def discrete_sigmas(schedule: NoiseSchedule, *, config_limits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps float32 (n,), sigmas float32 (n+1,)) for the Euler-family samplers (sigma space)."""
    opts, n = schedule.options, schedule.num_steps
    timesteps = spaced_timesteps(opts, n, integer=False)
    train = schedule.train_sigmas()
    sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    if opts.get("use_karras_sigmas"):
        lo = opts.get("sigma_min") if config_limits and opts.get("sigma_min") is not None else sigmas[-1].item()
        hi = opts.get("sigma_max") if config_limits and opts.get("sigma_max") is not None else sigmas[0].item()
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = sigma_to_t(sigmas, np.log(train))
    last = 0.0
    if opts.get("final_sigmas_type") == "sigma_min":
        last = float(train[0])
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return torch.from_numpy(np.asarray(timesteps).astype(np.float32)), torch.from_numpy(sigmas)


def multistep_sigmas(schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps int64 (n,), sigmas float32 (n+1,)) for DPM-Solver++ and UniPC."""
    opts, n = schedule.options, schedule.num_steps
    ac = schedule.alphas_cumprod
    lambdas = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
    clipped = torch.searchsorted(torch.flip(lambdas, [0]), opts.get("lambda_min_clipped", -math.inf))
    last_timestep = int(opts["num_train_timesteps"] - clipped.item())
    timesteps = multistep_timesteps(opts, n, last_timestep)
    train = schedule.train_sigmas()
    if opts.get("use_karras_sigmas"):
        desc = np.flip(train).copy()
        lo = opts.get("sigma_min") if opts.get("sigma_min") is not None else desc[-1].item()
        hi = opts.get("sigma_max") if opts.get("sigma_max") is not None else desc[0].item()
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = sigma_to_t(sigmas, np.log(train)).round()
        last = sigmas[-1] if opts["final_sigmas_type"] == "sigma_min" else 0.0
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        last = float(((1 - ac[0]) / ac[0]) ** 0.5) if opts["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    return torch.from_numpy(np.asarray(timesteps)).to(torch.int64), torch.from_numpy(sigmas)


def init_noise_sigma(sigmas: torch.Tensor, opts: dict[str, Any]) -> torch.Tensor:
    """Initial noise scale of the sigma-space samplers (depends on the spacing, as in diffusers)."""
    top = sigmas.max()
    return top if opts["timestep_spacing"] in ("linspace", "trailing") else (top**2 + 1) ** 0.5
