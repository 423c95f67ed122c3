"""DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", arXiv:2010.02502.

    x_prev = alpha_prev * x0 + direction * eps + noise_std * z          (eq. 12)

with the paper's sqrt(alpha) written alpha_t here (x_t = alpha_t x0 + sigma_t eps),
direction = sqrt(1 - alpha_prev^2 - noise_std^2) ("the direction pointing to x_t") and
noise_std = eta * sqrt((1 - alpha_prev^2) / (1 - alpha_t^2)) * sqrt(1 - alpha_t^2 / alpha_prev^2) (eq. 16).
"""

from __future__ import annotations

import numpy as np

from ..timesteps import discrete_timesteps
from .common import clip_x0, noise_schedule, x0_eps
from .plan import F32, Plan, Solver, finish, refuse_epsilon_at_snr_zero


def plan(cfg, n: int, *, eta: float = 0.0, begin: int = 0) -> Plan:
    """DDIM's generalised generative process (eq. 12), eta as in eq. 16: diffusers' `DDIMScheduler`.

    eta = 0 is the deterministic DDIM sampler, eta = 1 DDPM's ancestral variance. After the last
    step alpha_bar is 1 (`set_alpha_to_one`) or alpha_bar_0. Raises `ConfigError` for an epsilon
    model on a schedule that reaches SNR 0.
    """
    sched = noise_schedule(cfg, "ddim")
    ac = sched.alphas_cumprod
    final = F32(1.0) if cfg.set_alpha_to_one else ac[0]
    ts = discrete_timesteps(cfg, n)
    prev = ts - cfg.num_train_timesteps // n
    abar_t = ac[ts]
    abar_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(F32)
    variance = (F32(1) - abar_prev) / (F32(1) - abar_t) * (F32(1) - abar_t / abar_prev)
    noise_std = F32(eta) * np.sqrt(variance)
    rows = dict(
        t=ts, in_div=np.ones(n), alpha_t=np.sqrt(abar_t), sigma_t=np.sqrt(F32(1) - abar_t),
        alpha_prev=np.sqrt(abar_prev), direction=np.sqrt(np.maximum(F32(1) - abar_prev - noise_std**2, 0)),
        noise_std=noise_std, next_a=np.sqrt(abar_prev), next_b=np.sqrt(F32(1) - abar_prev),
    )
    refuse_epsilon_at_snr_zero("ddim", cfg, ts[begin:], rows["alpha_t"][begin:])
    return finish("ddim", cfg, ts, rows, sched, begin, num_inference_steps=n - begin, init_noise_sigma=1.0,
                  start=(np.sqrt(abar_t[begin]), np.sqrt(1 - abar_t[begin])))


def update(cfg):
    """The jittable step `(state, model_output, row, noise) -> state` of eq. 12 (module docstring).

    Recovers x0 and eps from the model output (`cfg.prediction_type`), clips x0 as configured, and
    returns {"x": alpha_prev x0 + direction eps + noise_std z}; `noise` is z (standard normal, NHWC,
    the shape of `state["x"]`), used only when eta > 0.
    """
    def step(state, out, row, noise):
        x0, eps = x0_eps(out, state["x"], row["alpha_t"], row["sigma_t"], cfg.prediction_type)
        x0 = clip_x0(x0, cfg)
        return {"x": row["alpha_prev"] * x0 + row["direction"] * eps + row["noise_std"] * noise}

    return step


SOLVER = Solver("ddim", plan, update)
