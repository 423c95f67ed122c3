"""The log-SNR view shared by the multistep exponential integrators, DPM-Solver(++) and UniPC.

Lu et al., "DPM-Solver", arXiv:2206.00927, sec. 3: with alpha_t = 1 / sqrt(sigma^2 + 1),
sigma_t = sigma alpha_t (sigma the Karras-style ratio of `karras.py`) and lambda_t = log(alpha_t / sigma_t),
the exact solution of the diffusion ODE from s to t is a linear term in x_s plus an integral over
lambda of the model output, which the solvers approximate by Taylor terms in h = lambda_t - lambda_s.
Both are linear in the sample and in the history of converted model outputs m_k, so their plans are
tables of weights on (x, m_0, m_1, ...), m_0 the newest.
"""

from __future__ import annotations

import numpy as np

from ..noise import NoiseSchedule
from ..timesteps import karras_sigmas, multistep_timesteps, sigmas_to_timesteps, train_sigmas
from .plan import F32


def alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the VP process at Karras-style sigma (any float array)."""
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def lambda_(sigma):
    """lambda_t = log(alpha_t) - log(sigma_t), float64; +inf at sigma 0."""
    alpha, s = alpha_sigma(np.float64(sigma))
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(s)


def multistep_sigmas(cfg, n: int, sched: NoiseSchedule, *, final_from_karras: bool):
    """(timesteps int64, n + 1 sigmas float32) as diffusers' DPM-Solver / UniPC `set_timesteps`.

    `lambda_min_clipped` drops the timesteps below that log-SNR; Karras sigmas (eq. 5 of Karras et
    al.) are mapped back to rounded timesteps. With `final_sigmas_type="sigma_min"` the last sigma is
    the ladder's own last (`final_from_karras`, UniPC) or sigma at t = 0 (DPM-Solver).
    """
    ac = sched.alphas_cumprod
    base = train_sigmas(ac)
    log_sigmas = np.log(base)
    if cfg.lambda_min_clipped != -np.inf:
        alpha_t, sigma_t = np.sqrt(ac), np.sqrt(F32(1) - ac)
        lambdas = np.log(alpha_t) - np.log(sigma_t)
        clipped = int(np.searchsorted(lambdas[::-1], cfg.lambda_min_clipped))
        ts = multistep_timesteps(cfg, n, cfg.num_train_timesteps - clipped)
    else:
        ts = multistep_timesteps(cfg, n)
    if cfg.use_karras_sigmas:
        sigmas = karras_sigmas(np.flip(base).copy(), n, cfg.sigma_min, cfg.sigma_max)
        ts = sigmas_to_timesteps(sigmas, log_sigmas)
        if cfg.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
        ts = ts.astype(np.int64)
        if cfg.final_sigmas_type == "sigma_min":
            last = sigmas[-1] if final_from_karras else ((1 - ac[0]) / ac[0]) ** 0.5
        else:
            last = 0.0
    else:
        sigmas = np.interp(ts, np.arange(0, len(base)), base)
        last = ((F32(1) - ac[0]) / ac[0]) ** F32(0.5) if cfg.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(F32)
    return ts, sigmas


def conversion(cfg, sigma, *, to_x0: bool):
    """(p, q) with m = p * x + q * model_output: the data prediction x0 (`to_x0`) or the noise eps.

    x is the VP sample at Karras-style `sigma`; the output is in the model's `prediction_type`.
    """
    a, s = alpha_sigma(np.float64(sigma))
    kind = cfg.prediction_type
    if to_x0:
        return {"epsilon": (1 / a, -s / a), "v_prediction": (a, -s), "sample": (0.0, 1.0)}[kind]
    return {"epsilon": (0.0, 1.0), "v_prediction": (s, a), "sample": (1 / s, -a / s)}[kind]
