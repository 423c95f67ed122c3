"""The sigma-space view shared by Euler, Euler ancestral and Heun.

Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv:2206.00364: with x = x_t / alpha_t and sigma = sigma_t / alpha_t, sampling integrates the ODE
dx/dsigma = (x - D(x; sigma)) / sigma (eqs. 1 and 3), D the denoiser (the model's x0). The model
still sees the variance-preserving x_t = x / sqrt(sigma^2 + 1) (`in_div`).
"""

from __future__ import annotations

import numpy as np

from ..noise import NoiseSchedule
from ..timesteps import float_timesteps, karras_sigmas, sigmas_to_timesteps, train_sigmas
from .common import noise_schedule
from .plan import F32


def sigma_ladder(cfg, n: int, solver: str) -> tuple[np.ndarray, np.ndarray, NoiseSchedule]:
    """(timesteps float32, n + 1 sigmas float32, schedule) as diffusers' Euler-family `set_timesteps`.

    Sigmas are interpolated at the timesteps, or Karras et al.'s eq. 5 ladder (`use_karras_sigmas`,
    timesteps then mapped back through log-sigma); the last is 0 or sigma at t = 0
    (`final_sigmas_type`).
    """
    sched = noise_schedule(cfg, solver)
    ts = float_timesteps(cfg, n)
    base = train_sigmas(sched.alphas_cumprod)
    log_sigmas = np.log(base)
    sigmas = np.interp(ts, np.arange(0, len(base)), base)
    if cfg.use_karras_sigmas:
        sigmas = karras_sigmas(sigmas, n, cfg.sigma_min, cfg.sigma_max)
        ts = sigmas_to_timesteps(sigmas, log_sigmas)
    if cfg.final_sigmas_type == "sigma_min":
        ac0 = sched.alphas_cumprod[0]
        last = ((F32(1) - ac0) / ac0) ** F32(0.5)
    else:
        last = 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(F32)
    return ts.astype(F32), sigmas, sched


def init_noise_sigma(cfg, sigmas) -> float:
    """diffusers' `init_noise_sigma`: sigma_max, or sqrt(sigma_max^2 + 1) for `leading` spacing."""
    m = sigmas.max()
    return float(m) if cfg.timestep_spacing in ("linspace", "trailing") else float((m**2 + F32(1)) ** F32(0.5))


def in_div(sigma):
    """The model input is x / sqrt(sigma^2 + 1), the variance-preserving x_t."""
    return (sigma**2 + F32(1)) ** F32(0.5)


def denoised(out, x, sigma, sigma_hat, prediction_type: str):
    """D(x; sigma_hat): the model's x0, from an output made at `sigma` (sigma_hat after churn)."""
    if prediction_type == "epsilon":
        return x - sigma_hat * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return out
