"""Euler with churn: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
Models", arXiv:2206.00364, Algorithm 2 without its second-order correction (as k-diffusion's
`sample_euler`). Per step, in sigma space (see `karras.py`):

    sigma_hat = sigma (gamma + 1)                         gamma = min(S_churn / N, sqrt(2) - 1) in [S_tmin, S_tmax]
    x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z
    d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat
    x_next = x_hat + (sigma_next - sigma_hat) d
"""

from __future__ import annotations

import numpy as np

from . import karras
from .plan import F32, Plan, Solver, finish


def plan(cfg, n: int, *, begin: int = 0, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = float("inf"), s_noise: float = 1.0) -> Plan:
    """Algorithm 2's Euler step with churn (S_churn, S_tmin, S_tmax, S_noise): diffusers' `EulerDiscreteScheduler`."""
    ts, sigmas, sched = karras.sigma_ladder(cfg, n, "euler")
    sigma = sigmas[:-1]
    gamma = np.where((s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / (len(sigmas) - 1), 2**0.5 - 1), 0.0)
    sigma_hat = (sigma * (gamma + 1)).astype(F32)
    rows = dict(
        t=ts, in_div=karras.in_div(sigma), sigma=sigma, sigma_hat=sigma_hat, dt=sigmas[1:] - sigma_hat,
        noise_std=np.where(gamma > 0, s_noise * np.sqrt(np.maximum(sigma_hat**2 - sigma**2, 0)), 0),
        next_a=np.ones(n), next_b=sigmas[1:],
    )
    return finish("euler", cfg, ts, rows, sched, begin, num_inference_steps=n - begin,
                  init_noise_sigma=karras.init_noise_sigma(cfg, sigmas), start=(1.0, sigmas[begin]), sigmas=sigmas)


def update(cfg):
    """The jittable step `(state, model_output, row, noise) -> state` of Algorithm 2 without its correction.

    Churns x to x_hat = x + noise_std z at sigma_hat, takes d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat
    and returns {"x": x_hat + (sigma_next - sigma_hat) d} (module docstring). x in sigma space (x0 + sigma eps).
    """
    def step(state, out, row, noise):
        x_hat = state["x"] + row["noise_std"] * noise
        x0 = karras.denoised(out, x_hat, row["sigma"], row["sigma_hat"], cfg.prediction_type)
        d = (x_hat - x0) / row["sigma_hat"]
        return {"x": x_hat + d * row["dt"]}

    return step


SOLVER = Solver("euler", plan, update)
