"""What every sampler shares: the model / callback / noise types, and the conversions of a network output (eps, v
or x0 prediction) to x0 and eps in each space, kept apart from the solver math."""

from __future__ import annotations

from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None
NoiseSampler = Callable[[], torch.Tensor] | None


# ---- prediction conversions (kept apart from the solvers) ------------------------------------------------

def vp_x0_eps(output: torch.Tensor, x: torch.Tensor, alpha_prod: torch.Tensor, kind: str):
    """(x0, eps) from a network output in variance-preserving space at cumulative alpha `alpha_prod`."""
    beta_prod = 1 - alpha_prod
    if kind == "epsilon":
        return (x - beta_prod**0.5 * output) / alpha_prod**0.5, output
    if kind == "v_prediction":
        return alpha_prod**0.5 * x - beta_prod**0.5 * output, alpha_prod**0.5 * output + beta_prod**0.5 * x
    return output, (x - alpha_prod**0.5 * output) / beta_prod**0.5


def sigma_x0(output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, kind: str) -> torch.Tensor:
    """x0 from a network output for x in sigma (variance-exploding) space."""
    if kind == "epsilon":
        return x - sigma * output
    if kind == "v_prediction":
        return output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    return output


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP (alpha_t, sigma_t) for a VE sigma."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def multistep_output(output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, kind: str, data_pred: bool
                     ) -> torch.Tensor:
    """What the multistep solvers extrapolate: x0 (data prediction) or eps, for VP x at VE `sigma`."""
    alpha_s, sigma_s = alpha_sigma(sigma)
    if data_pred:
        if kind == "epsilon":
            return (x - sigma_s * output) / alpha_s
        return alpha_s * x - sigma_s * output if kind == "v_prediction" else output
    if kind == "epsilon":
        return output
    return alpha_s * output + sigma_s * x if kind == "v_prediction" else (x - alpha_s * output) / sigma_s


def lambda_of(sigma: torch.Tensor) -> torch.Tensor:
    alpha_t, sigma_t = alpha_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def draw_noise(noise_sampler: NoiseSampler, x: torch.Tensor) -> torch.Tensor:
    return noise_sampler() if noise_sampler is not None else torch.randn_like(x)


def step_done(callback: Callback, step: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run the step callback; a tensor it returns replaces x (the pipeline's callback_on_step_end)."""
    if callback is not None:
        replaced = callback(step, t, x)
        if replaced is not None:
            return replaced
    return x
