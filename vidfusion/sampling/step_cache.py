"""Training-free step caching for multi-step sampling: the UNet's deep features change little from one step to the
next, so most steps reuse them (unet3d.FeatureCache says what is kept; this module says when).

- DeepCache (Ma et al. 2023, horseee/DeepCache): a full UNet every `interval` steps (uniform), or at steps packed
  around `center` (non-uniform: DeepCache's quadratic spacing); in between only the shallow path up to skip
  branch `branch` (0 = transformer_in's output, the cheapest), the deeper features taken from the last full step.
  Temporal convolutions and temporal attention are skipped with the rest.
- Faster Diffusion (Li et al. 2023, hutaiHang/Faster-Diffusion, "encoder propagation"): the encoder (down blocks,
  mid block) runs at key steps only, the decoder at every step on the kept encoder features. Key steps as published
  for 50 steps, (0, 1, 2, 3, 5, 10, 15, 25, 35), scaled to other step counts. (Their prior noise injection is not
  part of this.)

Steps are the sampler's (its step callback advances them; FreeInit passes start over) and the cache is kept per
evaluation within a step (windows of frames, heun's second evaluation each have their own); a step whose batch
differs from the cached one (guidance interval boundaries) runs in full. Looping clips are refused: their single
window rotates over the frames at every call, so no feature would belong to the same frames twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.unet3d import FeatureCache
from .schedules import SAMPLER_NAMES, resolve_sampler

CACHES = ("deepcache", "faster-diffusion")
FASTER_DIFFUSION_KEYS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)  # hutaiHang/Faster-Diffusion, 50 DDIM steps
NO_CACHE_SAMPLERS = ("lcm", "t2v-turbo")  # consistency samplers: 4 steps that each change the features a lot
NO_CACHE_NAMES = tuple(name for name in SAMPLER_NAMES if resolve_sampler(name)[0] in NO_CACHE_SAMPLERS)  # + mcm


@dataclass(frozen=True)
class CacheSettings:
    kind: str  # "deepcache" | "faster-diffusion"
    interval: int = 3  # DeepCache: a full step every `interval` steps (1: every step, the plain result)
    branch: int = 0  # DeepCache: the skip branch below which features are cached
    schedule: str = "uniform"  # DeepCache: "uniform" | "quadratic" (non-uniform, denser around `center`)
    center: int | None = None  # quadratic: the step the full steps pack around (default: 30% of the steps)
    power: float = 1.4  # quadratic: DeepCache's `pow`

    def settings(self) -> dict[str, Any]:
        """What a video records (metadata)."""
        if self.kind == "faster-diffusion":
            return {"cache": self.kind}
        out = {"cache": self.kind, "cache_interval": self.interval, "cache_branch": self.branch}
        return {**out, "cache_schedule": self.schedule} if self.schedule != "uniform" else out


def check_cache(kind: str | None, interval: int, branch: int, schedule: str, base: str, unet: Any,
                loop: bool = False) -> CacheSettings | None:
    """The cache settings of a call (None: no caching); a clear error for what cannot run."""
    if kind is None:
        return None
    if kind not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)} (or None), got {kind!r}")
    if base in NO_CACHE_SAMPLERS:
        raise ValueError(f"cache={kind!r} is for multi-step samplers; the few-step sampler {base} runs 4 steps that "
                         "each need the whole UNet (leave cache out)")
    if loop:
        raise ValueError(f"cache={kind!r} does not combine with loop=True: a looping clip's frames shift at every "
                         "step, so no cached feature matches them (leave one of the two out)")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ValueError(f"cache_interval must be an integer >= 1, got {interval!r}")
    branches = unet.skip_count
    if not isinstance(branch, int) or isinstance(branch, bool) or not 0 <= branch < branches:
        raise ValueError(f"cache_branch must be an integer in 0..{branches - 1} (0: the shallowest), got {branch!r}")
    if schedule not in ("uniform", "quadratic"):
        raise ValueError(f"cache_schedule must be 'uniform' or 'quadratic', got {schedule!r}")
    return CacheSettings(kind, interval, branch, schedule)


def full_steps(settings: CacheSettings, steps: int) -> set[int]:
    """The steps (0-based) that run the whole UNet."""
    if settings.kind == "faster-diffusion":
        return {min(steps - 1, int(k * steps / 50)) for k in FASTER_DIFFUSION_KEYS_50}
    if settings.interval == 1:
        return set(range(steps))
    if settings.schedule == "uniform":
        return set(range(0, steps, settings.interval))
    count = -(-steps // settings.interval)
    center = settings.center if settings.center is not None else int(steps * 0.3)
    return set(_quadratic_steps(steps, count, center, settings.power))


def _quadratic_steps(steps: int, count: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform idea (`sample_from_quad_center`): points uniform in v, full steps at
    center + sign(v) |v|**power, so they pack around `center`; step 0 always; the power drops by 0.02 until the
    `count` steps are distinct."""
    center = min(max(center, 0), steps - 1)
    while power > 1:
        v = np.linspace(-(center ** (1 / power)), (steps - 1 - center) ** (1 / power), count)
        picked = sorted({0, *(int(round(center + np.sign(x) * abs(x) ** power)) for x in v)})
        if len(picked) >= count:
            return picked
        power -= 0.02
    return list(range(0, steps, max(1, -(-steps // count))))


class CachedNetwork:
    """`network(x, t, context)` around the UNet with step caching: full steps fill a FeatureCache, the others reuse
    it. The same signature as the plain network, so cfg_model and windows wrap it unchanged. The sampler's step
    callback (StepReporter) calls `next_step()` after each step and `begin_pass()` at each FreeInit pass, so steps
    are the sampler's own (heun's and pndm's extra evaluations within a step each keep their own cache)."""

    def __init__(self, settings: CacheSettings, steps: int,
                 call: Callable[[torch.Tensor, torch.Tensor, Any, FeatureCache], torch.Tensor], reporter: Any):
        self.settings, self.call = settings, call
        self.full = full_steps(settings, steps)
        self.step, self.evaluation = 0, 0
        self.caches: dict[int, FeatureCache] = {}  # evaluation index within a step (window, heun's 2nd) -> cache
        reporter.step_cache = self

    def next_step(self) -> None:
        self.step, self.evaluation = self.step + 1, 0

    def begin_pass(self) -> None:
        self.step, self.evaluation, self.caches = 0, 0, {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: Any) -> torch.Tensor:
        slot, self.evaluation = self.evaluation, self.evaluation + 1
        branch = None if self.settings.kind == "faster-diffusion" else self.settings.branch
        cache = self.caches.get(slot)
        kept = cache.hidden if cache is not None else None
        reuse = self.step not in self.full and kept is not None and kept.shape[0] == x.shape[0]
        if not reuse:
            cache = self.caches[slot] = FeatureCache(branch)
        cache.reuse = reuse
        return self.call(x, t, context, cache)
