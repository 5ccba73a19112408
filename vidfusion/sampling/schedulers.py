"""Scheduler objects with diffusers' names: typed config holders that select one of our sampler functions.

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)

Options the sampler does not have, or values it does not implement, are a ValueError, never ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .schedules import SCHEDULER_CLASSES, sampler_options


class SchedulerConfig(dict):
    """A read-only dict whose keys are also attributes (like diffusers' FrozenDict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("scheduler configs are read-only; use Scheduler.from_config(config, **changes)")

    __setitem__ = __delitem__ = update = pop = setdefault = clear = _readonly  # type: ignore[assignment]


class Scheduler:
    """Base of the named schedulers: `config` is the raw config, `options` what our sampler uses."""

    sampler: ClassVar[str]

    def __init__(self, **config: Any):
        self._set(dict(config), {})

    def _set(self, raw: dict[str, Any], overrides: dict[str, Any]) -> None:
        self.options = sampler_options(self.sampler, raw, overrides)
        merged = {**raw, **overrides, "_class_name": type(self).__name__}
        merged.pop("_use_default_values", None)
        defaults_used = set(raw.get("_use_default_values", []))
        self.config = SchedulerConfig({k: v for k, v in merged.items() if k not in defaults_used})

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, **overrides: Any) -> Scheduler:
        obj = cls.__new__(cls)
        obj._set(dict(config or {}), overrides)
        return obj

    @property
    def order(self) -> int:
        return 2 if self.sampler == "heun" else 1

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options.items() if not k.startswith("_")}
        return f"{type(self).__name__}({changed})"


class DDIMScheduler(Scheduler):
    sampler = "ddim"


class PNDMScheduler(Scheduler):
    sampler = "pndm"


class EulerDiscreteScheduler(Scheduler):
    sampler = "euler"


class EulerAncestralDiscreteScheduler(Scheduler):
    sampler = "euler-ancestral"


class HeunDiscreteScheduler(Scheduler):
    sampler = "heun"


class LMSDiscreteScheduler(Scheduler):
    sampler = "lms"


class DPMSolverMultistepScheduler(Scheduler):
    sampler = "dpmpp-2m"


class UniPCMultistepScheduler(Scheduler):
    sampler = "unipc"


class LCMScheduler(Scheduler):
    """Latent consistency sampling (LCM-LoRA, MCM: `LCMScheduler.from_config(config, timestep_scaling=4.0)`)."""

    sampler = "lcm"


SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.__name__: cls
    for cls in (DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                HeunDiscreteScheduler, LMSDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                LCMScheduler)
}
assert set(SCHEDULERS) == set(SCHEDULER_CLASSES)


def scheduler_from_checkpoint(config: dict[str, Any], where: str) -> Scheduler:
    name = config.get("_class_name", "DDIMScheduler")
    if name not in SCHEDULERS:
        raise ValueError(f"{where}: scheduler {name!r} is not supported; supported: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)
