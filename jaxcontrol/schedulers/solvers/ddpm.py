"""DDPM: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239.

Ancestral sampling from the posterior q(x_prev | x_t, x0) with x0 predicted by the model (eqs. 6-7):

    x_prev = mu_x0 * x0 + mu_xt * x_t + noise_std * z

mu_x0 = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t), mu_xt = sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t),
where, for a step that skips timesteps, alpha_t = alpha_bar_t / alpha_bar_prev and beta_t = 1 - alpha_t.
"""

from __future__ import annotations

import numpy as np

from ...errors import ConfigError
from ..timesteps import discrete_timesteps
from .common import clip_x0, noise_schedule, x0_eps
from .plan import F32, Plan, Solver, finish, refuse_epsilon_at_snr_zero

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def posterior_std(variance_type: str, abar_t, abar_prev, beta_t):
    """sigma_t of sec. 3.2: sqrt(beta_tilde_t) (`fixed_small`, eq. 7) or sqrt(beta_t) (`fixed_large`)."""
    if variance_type == "fixed_large":
        return np.sqrt(beta_t)
    beta_tilde = (F32(1) - abar_prev) / (F32(1) - abar_t) * beta_t
    return np.sqrt(np.maximum(beta_tilde, F32(1e-20)))


def plan(cfg, n: int, *, begin: int = 0) -> Plan:
    """The posterior mean of eq. 7 plus sigma_t z (sec. 3.2): diffusers' `DDPMScheduler`.

    No noise is added at timestep 0. Raises `ConfigError` for a `variance_type` other than
    fixed_small, fixed_small_log or fixed_large, and for an epsilon model at SNR 0.
    """
    if cfg.variance_type not in VARIANCE_TYPES:
        raise ConfigError(f"DDPM variance_type={cfg.variance_type!r} is not supported "
                          "(fixed_small, fixed_small_log, fixed_large)")
    sched = noise_schedule(cfg, "ddpm")
    ac = sched.alphas_cumprod
    ts = discrete_timesteps(cfg, n)
    prev = np.append(ts[1:], -1)
    abar_t = ac[ts]
    abar_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], F32(1)).astype(F32)
    alpha_t = abar_t / abar_prev
    beta_t = F32(1) - alpha_t
    noise_std = np.where(ts > 0, posterior_std(cfg.variance_type, abar_t, abar_prev, beta_t), 0)
    rows = dict(
        t=ts, in_div=np.ones(n), alpha_t=np.sqrt(abar_t), sigma_t=np.sqrt(F32(1) - abar_t),
        mu_x0=np.sqrt(abar_prev) * beta_t / (F32(1) - abar_t),
        mu_xt=np.sqrt(alpha_t) * (F32(1) - abar_prev) / (F32(1) - abar_t),
        noise_std=noise_std, next_a=np.sqrt(abar_prev), next_b=np.sqrt(F32(1) - abar_prev),
    )
    refuse_epsilon_at_snr_zero("ddpm", cfg, ts[begin:], rows["alpha_t"][begin:])
    return finish("ddpm", cfg, ts, rows, sched, begin, num_inference_steps=n - begin, init_noise_sigma=1.0,
                  start=(np.sqrt(abar_t[begin]), np.sqrt(1 - abar_t[begin])))


def update(cfg):
    """The jittable step `(state, model_output, row, noise) -> state`: ancestral sampling of eqs. 6-7.

    Recovers x0 from the model output (`cfg.prediction_type`), clips it as configured, and returns
    {"x": mu_x0 x0 + mu_xt x_t + noise_std z} (module docstring); `noise` is z (standard normal, NHWC).
    """
    def step(state, out, row, noise):
        x0, _ = x0_eps(out, state["x"], row["alpha_t"], row["sigma_t"], cfg.prediction_type)
        x0 = clip_x0(x0, cfg)
        return {"x": row["mu_x0"] * x0 + row["mu_xt"] * state["x"] + row["noise_std"] * noise}

    return step


SOLVER = Solver("ddpm", plan, update)
