"""Multistep solvers in log-SNR time (VP space, integer timesteps): DPM-Solver++ 2M and UniPC, step for step as
diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler."""

from __future__ import annotations

import torch

from .predictions import (
    Callback,
    ModelFn,
    NoiseSampler,
    alpha_sigma,
    draw_noise,
    lambda_of,
    multistep_output,
    step_done,
)
from .schedules import NoiseSchedule, multistep_sigmas

# ---- multistep solvers in log-SNR time (VP space, integer timesteps) --------------------------------------

def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *,
                    noise_sampler: NoiseSampler = None, callback: Callback = None, start: int = 0) -> torch.Tensor:
    """DPM-Solver(++) multistep, orders 1-3, ODE or SDE variants (diffusers' DPMSolverMultistepScheduler)."""
    opts, kind = schedule.options, schedule.prediction_type
    algo, order = opts["algorithm_type"], opts["solver_order"]
    if algo in ("dpmsolver", "sde-dpmsolver") and opts["final_sigmas_type"] == "zero":
        raise ValueError(f"dpmpp-2m sampler: algorithm_type={algo!r} needs final_sigmas_type='sigma_min'")
    if algo == "sde-dpmsolver" and order == 3:
        raise ValueError("dpmpp-2m sampler: algorithm_type='sde-dpmsolver' supports solver_order 1 or 2")
    data_pred = algo in ("dpmsolver++", "sde-dpmsolver++")
    timesteps, sigmas = multistep_sigmas(schedule)
    n = len(timesteps)
    outputs: list[torch.Tensor] = []
    lower_nums = 0
    for i in range(start, n):
        t = timesteps[i]
        out = model_fn(x, t)
        m = multistep_output(out, x, sigmas[i], kind, data_pred)
        outputs = (outputs + [m])[-order:]
        final = i == n - 1 and (opts["euler_at_final"] or (opts["lower_order_final"] and n < 15)
                                or opts["final_sigmas_type"] == "zero")
        second_last = i == n - 2 and opts["lower_order_final"] and n < 15
        noise = draw_noise(noise_sampler, x).float() if algo.startswith("sde") else None
        if order == 1 or lower_nums < 1 or final:
            use = 1
        elif order == 2 or lower_nums < 2 or second_last:
            use = 2
        else:
            use = 3
        x = _dpm_update(x, outputs, sigmas, i, use, algo, opts["solver_type"], noise)
        lower_nums = min(lower_nums + 1, order)
        x = step_done(callback, i, t, x)
    return x


def _dpm_update(x, outputs, sigmas, i, use, algo, solver_type, noise):
    alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
    alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
    lam_t, lam_s0 = lambda_of(sigmas[i + 1]), lambda_of(sigmas[i])
    h = lam_t - lam_s0
    m0 = outputs[-1]
    plus = algo in ("dpmsolver++", "sde-dpmsolver++")
    sde = algo.startswith("sde")
    if use == 1:
        if algo == "dpmsolver++":
            return (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        if algo == "dpmsolver":
            return (alpha_t / alpha_s0) * x - (sigma_t * (torch.exp(h) - 1.0)) * m0
        if algo == "sde-dpmsolver++":
            return ((sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * m0
                    + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)
        return ((alpha_t / alpha_s0) * x - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * m0
                + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise)
    lam_s1 = lambda_of(sigmas[i - 1])
    m1 = outputs[-2]
    h_0 = lam_s0 - lam_s1
    r0 = h_0 / h
    if use == 2:
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        if plus and not sde:
            base = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * d0
            if solver_type == "midpoint":
                return base - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            return base + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        if not plus and not sde:
            base = (alpha_t / alpha_s0) * x - (sigma_t * (torch.exp(h) - 1.0)) * d0
            if solver_type == "midpoint":
                return base - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * d1
            return base - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * d1
        if plus:
            base = (sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * d0
            if solver_type == "midpoint":
                base = base + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
            else:
                base = base + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            return base + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        base = (alpha_t / alpha_s0) * x - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * d0
        if solver_type == "midpoint":
            base = base - (sigma_t * (torch.exp(h) - 1.0)) * d1
        else:
            base = base - 2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * d1
        return base + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
    m2 = outputs[-3]
    h_1 = lam_s1 - lambda_of(sigmas[i - 2])
    r1 = h_1 / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    if algo == "dpmsolver++":
        return ((sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
                - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2)
    if algo == "dpmsolver":
        return ((alpha_t / alpha_s0) * x - (sigma_t * (torch.exp(h) - 1.0)) * m0
                - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * d1
                - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * d2)
    return ((sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * m0
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)


def sample_unipc(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, *, noise_sampler: NoiseSampler = None,
                 callback: Callback = None, start: int = 0) -> torch.Tensor:
    """UniPC multistep predictor-corrector (diffusers' UniPCMultistepScheduler, bh1/bh2)."""
    opts, kind = schedule.options, schedule.prediction_type
    order, predict_x0 = opts["solver_order"], opts["predict_x0"]
    timesteps, sigmas = multistep_sigmas(schedule)
    n = len(timesteps)
    outputs: list[torch.Tensor] = []
    lower_nums, this_order, last_x = 0, 1, None
    for i in range(start, n):
        t = timesteps[i]
        out = model_fn(x, t)
        m = multistep_output(out, x, sigmas[i], kind, predict_x0)
        if i > 0 and (i - 1) not in opts["disable_corrector"] and last_x is not None:
            x = _unipc_update(last_x, outputs, sigmas, i - 1, this_order, opts, corrector=m)
        outputs = (outputs + [m])[-order:]
        this_order = min(order, n - i) if opts["lower_order_final"] else order
        this_order = min(this_order, lower_nums + 1)
        last_x = x
        x = _unipc_update(x, outputs, sigmas, i, this_order, opts)
        lower_nums = min(lower_nums + 1, order)
        x = step_done(callback, i, t, x)
    return x


def _unipc_update(x, outputs, sigmas, i, order, opts, corrector=None):
    """Predictor (corrector=None) from step i to i+1, or corrector of that step given the new output."""
    alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
    alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
    lam_s0 = lambda_of(sigmas[i])
    h = lambda_of(sigmas[i + 1]) - lam_s0
    m0 = outputs[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lambda_of(sigmas[i - k]) - lam_s0) / h
        rks.append(rk)
        d1s.append((outputs[-(k + 1)] - m0) / rk)
    rks.append(torch.ones(()))
    rks_t = torch.stack(rks)
    hh = -h if opts["predict_x0"] else h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if opts["solver_type"] == "bh1" else torch.expm1(hh)
    factorial, rows, b = 1, [], []
    for k in range(1, order + 1):
        rows.append(torch.pow(rks_t, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r_mat, b_vec = torch.stack(rows), torch.stack(b)
    if opts["predict_x0"]:
        base, scale = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t
    else:
        base, scale = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t
    if corrector is None:
        if not d1s:
            return base
        rhos = torch.ones(1) * 0.5 if order == 2 else torch.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
        return base - scale * b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(r_mat, b_vec)
    res = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
    return base - scale * b_h * (res + rhos[-1] * (corrector - m0))
