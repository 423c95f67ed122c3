"""DDIM inversion: the deterministic DDIM step run from x_0 towards x_T.

Song, Meng & Ermon, "Denoising Diffusion Implicit Models", arXiv:2010.02502, sec. 4.3: eq. 12 with
eta = 0 is an Euler step of an ODE, so it can be taken with the time arrow reversed to encode an
image into its latent noise (as in Mokady et al., "Null-text Inversion", arXiv:2211.09794). The
update is DDIM's own, with alpha_prev the *next* (noisier) level.
"""

from __future__ import annotations

import numpy as np

from ...errors import ConfigError
from ..timesteps import discrete_timesteps
from . import ddim
from .common import noise_schedule
from .plan import F32, Plan, Solver, finish, refuse_epsilon_at_snr_zero


def inverse_timesteps(cfg, n: int) -> np.ndarray:
    """`DDIMInverseScheduler.set_timesteps`: ascending int64 timesteps (leading or trailing spacing)."""
    discrete_timesteps(cfg, n)  # validates n
    N = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (N // n)).round().copy().astype(np.int64) + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return np.round(np.arange(N, 0, -N / n)[::-1]).astype(np.int64) - 1
    raise ConfigError("DDIM inversion supports timestep_spacing 'leading' or 'trailing' (as diffusers does)")


def plan(cfg, n: int, *, begin: int = 0) -> Plan:
    """DDIM (eq. 12, eta = 0) from alpha_bar at t - N/n to alpha_bar at t: diffusers' `DDIMInverseScheduler`.

    The first step starts from alpha_bar = 1 (`set_alpha_to_one`) or alpha_bar_0. Raises
    `ConfigError` for `linspace` spacing and for an epsilon model at SNR 0.
    """
    sched = noise_schedule(cfg, "ddim_inverse")
    ac = sched.alphas_cumprod
    ts = inverse_timesteps(cfg, n)
    N = cfg.num_train_timesteps
    initial = F32(1.0) if cfg.set_alpha_to_one else ac[0]
    src = np.minimum(ts - N // n, N - 1)
    abar_from = np.where(src >= 0, ac[np.clip(src, 0, None)], initial).astype(F32)
    abar_to = ac[ts]
    rows = dict(
        t=ts, in_div=np.ones(n), alpha_t=np.sqrt(abar_from), sigma_t=np.sqrt(F32(1) - abar_from),
        alpha_prev=np.sqrt(abar_to), direction=np.sqrt(F32(1) - abar_to), noise_std=np.zeros(n),
        next_a=np.sqrt(abar_to), next_b=np.sqrt(F32(1) - abar_to),
    )
    refuse_epsilon_at_snr_zero("ddim_inverse", cfg, ts[begin:], rows["alpha_t"][begin:])
    return finish("ddim_inverse", cfg, ts, rows, sched, begin, num_inference_steps=n - begin,
                  init_noise_sigma=1.0, start=(1.0, 0.0))


SOLVER = Solver("ddim_inverse", plan, ddim.update)
