"""LCM: Luo, Tan, Huang, Li & Zhao, "Latent Consistency Models: Synthesizing High-Resolution Images
with Few-Step Inference", arXiv:2310.04378, Algorithm 3 (multistep consistency sampling).

The consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (Song et al., "Consistency
Models", arXiv:2303.01469, eq. 7 parameterisation, sigma_data = 0.5, t scaled by `timestep_scaling`)
gives the denoised sample; every step but the last re-noises it to the next timestep:

    denoised = c_skip x_t + c_out x0
    x_prev = alpha_prev * denoised + sigma_prev * z
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ...errors import ConfigError
from .common import clip_x0, noise_schedule, x0_eps
from .plan import F32, Plan, Solver, finish, refuse_epsilon_at_snr_zero

SIGMA_DATA_SQUARED = 0.25


def lcm_timesteps(cfg, n: int, original: int, strength: float) -> np.ndarray:
    """`LCMScheduler.set_timesteps`: n of the `original` schedule's timesteps (descending int64)."""
    N = cfg.num_train_timesteps
    if original > N:
        raise ConfigError(f"original_inference_steps={original} exceeds num_train_timesteps={N}")
    origin = np.asarray(list(range(1, int(original * strength) + 1))) * (N // original) - 1
    if len(origin) // n < 1:
        raise ConfigError(f"LCM: {n} steps is more than the {len(origin)} original timesteps allow")
    if n > original:
        raise ConfigError(f"LCM: num_inference_steps={n} exceeds original_inference_steps={original}")
    origin = origin[::-1].copy()
    return origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]


def plan(cfg, n: int, *, begin: int = 0, strength: float = 1.0, original_inference_steps: int | None = None) -> Plan:
    """Algorithm 3 with diffusers' boundary conditions c_skip, c_out: diffusers' `LCMScheduler`.

    `strength` < 1 (img2img) takes the timesteps from the first `strength` fraction of the original
    schedule. The last step returns the denoised sample itself. Raises `ConfigError` when `n` or
    `original_inference_steps` do not fit the schedule, and for an epsilon model at SNR 0.
    """
    sched = noise_schedule(cfg, "lcm")
    ac = sched.alphas_cumprod
    ts = lcm_timesteps(cfg, n, original_inference_steps or cfg.original_inference_steps, strength)
    final = F32(1.0) if cfg.set_alpha_to_one else ac[0]
    prev = np.append(ts[1:], ts[-1])
    abar_t = ac[ts]
    abar_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(F32)
    scaled = ts * cfg.timestep_scaling
    last = np.arange(n) == n - 1
    rows = dict(t=ts, in_div=np.ones(n), alpha_t=np.sqrt(abar_t), sigma_t=np.sqrt(F32(1) - abar_t),
                c_skip=SIGMA_DATA_SQUARED / (scaled**2 + SIGMA_DATA_SQUARED),
                c_out=scaled / (scaled**2 + SIGMA_DATA_SQUARED) ** 0.5, alpha_prev=np.sqrt(abar_prev),
                noise_std=np.where(last, 0, np.sqrt(F32(1) - abar_prev)), last=last,
                next_a=np.where(last, 1, np.sqrt(abar_prev)), next_b=np.where(last, 0, np.sqrt(F32(1) - abar_prev)))
    refuse_epsilon_at_snr_zero("lcm", cfg, ts[begin:], rows["alpha_t"][begin:])
    return finish("lcm", cfg, ts, rows, sched, begin, num_inference_steps=n - begin, init_noise_sigma=1.0,
                  start=(np.sqrt(abar_t[begin]), np.sqrt(1 - abar_t[begin])))


def init(cfg, x):
    """The scan's initial state: the sample `x` (NHWC float32) and `denoised`, set to x until the first step."""
    return {"x": x, "denoised": x}


def output(state):
    """The run's sample: the last step's denoised sample c_skip x_t + c_out x0 (NHWC float32), not x."""
    return state["denoised"]


def update(cfg):
    """The jittable step `(state, model_output, row, noise) -> state` of Algorithm 3.

    Computes denoised = c_skip x_t + c_out x0 (x0 clipped as configured) and re-noises it,
    x_prev = alpha_prev denoised + sigma_prev z, except on the last step, which returns denoised
    itself (module docstring). Returns {"x", "denoised"}; `noise` is z (standard normal, NHWC).
    """
    def step(state, out, row, noise):
        x = state["x"]
        x0, _ = x0_eps(out, x, row["alpha_t"], row["sigma_t"], cfg.prediction_type)
        denoised = row["c_out"] * clip_x0(x0, cfg) + row["c_skip"] * x
        x = jnp.where(row["last"] > 0, denoised, row["alpha_prev"] * denoised + row["noise_std"] * noise)
        return {"x": x, "denoised": denoised}

    return step


SOLVER = Solver("lcm", plan, update, init, output, strength_sets_timesteps=True)
