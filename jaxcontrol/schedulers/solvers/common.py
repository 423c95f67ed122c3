"""What several solvers share: the noise schedule a class builds, x0 and epsilon from a model output.

Notation (variance-preserving, as in DDIM, DPM-Solver and UniPC): x_t = alpha_t x_0 + sigma_t eps,
with alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t).
"""

from __future__ import annotations

import jax.numpy as jnp

from ..config import terminal_alpha_bar
from ..noise import NoiseSchedule, make_betas


def noise_schedule(cfg, solver: str) -> NoiseSchedule:
    """The noise schedule as `solver`'s diffusers class builds it (see `config.SOLVER_TABLE`).

    A class that does not take `rescale_betas_zero_snr` (PNDM, Heun) gets the plain schedule; one
    that does may clamp the last alpha_bar (`SolverSpec.terminal_alpha_bar`).
    """
    betas = make_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                       cfg.trained_betas, cfg.rescale_betas_zero_snr)
    return NoiseSchedule(betas, terminal_alpha_bar=terminal_alpha_bar(solver, cfg))


def x0_eps(out, x, alpha_t, sigma_t, prediction_type: str):
    """(x0, eps) from a model output `out` at x = alpha_t * x0 + sigma_t * eps.

    `prediction_type`: "epsilon" (out = eps), "v_prediction" (out = alpha_t eps - sigma_t x0,
    Salimans & Ho 2022, arXiv:2202.00512) or "sample" (out = x0). Arrays broadcast; any float dtype.
    """
    if prediction_type == "epsilon":
        return (x - sigma_t * out) / alpha_t, out
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * out, alpha_t * out + sigma_t * x
    return out, (x - alpha_t * out) / sigma_t


def clip_x0(x0, cfg):
    """diffusers' `clip_sample`: x0 clipped to [-clip_sample_range, clip_sample_range] when set."""
    if cfg.clip_sample:
        r = cfg.clip_sample_range
        return jnp.clip(x0, -r, r)
    return x0
