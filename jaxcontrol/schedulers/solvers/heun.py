"""Heun: Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv:2206.00364, Algorithm 1 (Heun's second-order method), two model evaluations per step:

    d = (x - D(x; sigma)) / sigma                         x_next' = x + (sigma_next - sigma) d
    d' = (x_next' - D(x_next'; sigma_next)) / sigma_next  x_next = x + (sigma_next - sigma) (d + d') / 2

The last step, to sigma 0, is the Euler step alone. State: x, and the step's start x_prev, d_prev, dt_prev.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from . import karras
from .common import clip_x0
from .plan import F32, Plan, Solver, finish


def plan(cfg, n: int, *, begin: int = 0) -> Plan:
    """Algorithm 1, its two evaluations per step interleaved: diffusers' `HeunDiscreteScheduler`.

    The plan has 2n - 1 evaluations; `begin` counts steps, so evaluation 2 * begin comes first.
    """
    ts, sigmas, sched = karras.sigma_ladder(cfg, n, "heun")
    S = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]).astype(F32)
    T = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(F32)
    m = len(T)
    second = np.arange(m) % 2 == 1
    # the sigma D is evaluated at: sigma for the Euler stage, sigma_next for the correction (both S[j])
    rows = dict(t=T, in_div=karras.in_div(S[:m]), sigma=S[:m], dt=np.where(second, 0, S[1 : m + 1] - S[:m]),
                second=second, next_a=np.ones(m), next_b=S[1 : m + 1])
    start = 2 * begin
    return finish("heun", cfg, T, rows, sched, start, num_inference_steps=n - begin,
                  init_noise_sigma=karras.init_noise_sigma(cfg, S), start=(1.0, S[start]), sigmas=S)


def init(cfg, x):
    """The scan's initial state: the sample `x` (NHWC float32) and zero x_prev, d_prev (like x) and dt_prev (scalar)."""
    return {"x": x, "x_prev": jnp.zeros_like(x), "d_prev": jnp.zeros_like(x), "dt_prev": jnp.zeros((), x.dtype)}


def update(cfg):
    """The jittable step `(state, model_output, row, noise) -> state` of Algorithm 1, one evaluation per call.

    On a first evaluation (`row["second"]` 0) it takes the Euler step x + (sigma_next - sigma) d and
    stores x, d and dt; on the second it returns the corrected x_prev + dt_prev (d_prev + d') / 2
    (module docstring). Deterministic: `noise` is unused.
    """
    def step(state, out, row, noise):
        x = state["x"]
        x0 = clip_x0(karras.denoised(out, x, row["sigma"], row["sigma"], cfg.prediction_type), cfg)
        d = (x - x0) / row["sigma"]
        second = row["second"] > 0
        x_next = jnp.where(second, state["x_prev"] + (state["d_prev"] + d) / 2 * state["dt_prev"], x + d * row["dt"])
        return {
            "x": x_next,
            "x_prev": jnp.where(second, state["x_prev"], x),
            "d_prev": jnp.where(second, state["d_prev"], d),
            "dt_prev": jnp.where(second, state["dt_prev"], row["dt"]),
        }

    return step


SOLVER = Solver("heun", plan, update, init)
