"""Euler ancestral: an Euler step of the probability-flow ODE (Karras et al., arXiv:2206.00364, eq. 3)
down to sigma_down, then fresh noise up to sigma_next, as k-diffusion's `sample_euler_ancestral`
(`get_ancestral_step`):

    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),  sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    d = (x - D(x; sigma)) / sigma
    x_next = x + (sigma_down - sigma) d + sigma_up z
"""

from __future__ import annotations

import numpy as np

from ...errors import ConfigError
from . import karras
from .plan import F32, Plan, Solver, finish


def plan(cfg, n: int, *, begin: int = 0) -> Plan:
    """The ancestral Euler step (sigma_up, sigma_down): diffusers' `EulerAncestralDiscreteScheduler`.

    Raises `ConfigError` for prediction_type "sample" (diffusers does not support it either).
    """
    if cfg.prediction_type == "sample":
        raise ConfigError("Euler ancestral supports prediction_type epsilon or v_prediction (as diffusers does)")
    ts, sigmas, sched = karras.sigma_ladder(cfg, n, "euler_ancestral")
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** F32(0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** F32(0.5)
    rows = dict(t=ts, in_div=karras.in_div(sigma), sigma=sigma, dt=sigma_down - sigma, noise_std=sigma_up,
                next_a=np.ones(n), next_b=sigma_next)
    return finish("euler_ancestral", cfg, ts, rows, sched, begin, num_inference_steps=n - begin,
                  init_noise_sigma=karras.init_noise_sigma(cfg, sigmas), start=(1.0, sigmas[begin]), sigmas=sigmas)


def update(cfg):
    """The jittable step `(state, model_output, row, noise) -> state`: Euler to sigma_down, noise up to sigma_next.

    Returns {"x": x + (sigma_down - sigma) d + sigma_up z} with d = (x - D(x; sigma)) / sigma (module
    docstring); `noise` is z (standard normal, NHWC). x in sigma space (x0 + sigma eps).
    """
    def step(state, out, row, noise):
        x = state["x"]
        d = (x - karras.denoised(out, x, row["sigma"], row["sigma"], cfg.prediction_type)) / row["sigma"]
        return {"x": x + d * row["dt"] + noise * row["noise_std"]}

    return step


SOLVER = Solver("euler_ancestral", plan, update)
