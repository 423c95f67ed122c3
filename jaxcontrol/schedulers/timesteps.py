"""Timestep spacings and sigma ladders, ported rule for rule from diffusers' `set_timesteps`."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def _check(n: int, cfg) -> None:
    if not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"num_inference_steps must be a positive integer, got {n!r}")
    if n > cfg.num_train_timesteps:
        raise ConfigError(f"num_inference_steps={n} exceeds num_train_timesteps={cfg.num_train_timesteps}")


def discrete_timesteps(cfg, n: int) -> np.ndarray:
    """DDPM / DDIM / PNDM-style integer timesteps, descending (int64)."""
    _check(n, cfg)
    N = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, N - 1, n).round()[::-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (N // n)).round()[::-1].copy().astype(np.int64)
        return ts + cfg.steps_offset
    return np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1


def float_timesteps(cfg, n: int) -> np.ndarray:
    """Euler / Heun-style timesteps, descending (float32)."""
    _check(n, cfg)
    N = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, N - 1, n, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (N // n)).round()[::-1].copy().astype(np.float32)
        return ts + np.float32(cfg.steps_offset)
    return np.arange(N, 0, -N / n).round().copy().astype(np.float32) - np.float32(1)


def multistep_timesteps(cfg, n: int, last_timestep: int | None = None) -> np.ndarray:
    """DPM-Solver / UniPC-style timesteps: n + 1 points with the last dropped (int64)."""
    _check(n, cfg)
    N = cfg.num_train_timesteps
    last = N if last_timestep is None else last_timestep
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].copy().astype(np.int64)
        return ts + cfg.steps_offset
    return np.arange(last, 0, -N / n).round().copy().astype(np.int64) - 1


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sqrt((1 - abar) / abar) in float32, ascending in t."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1) - ac) / ac).astype(np.float32)


def karras_sigmas(in_sigmas: np.ndarray, n: int, sigma_min=None, sigma_max=None, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), descending (float64)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep whose sigma is `sigma`, interpolating log-sigma linearly."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def sigmas_to_timesteps(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """`sigma_to_t` for each of `sigmas` (1-D): the fractional timesteps, float64, as diffusers' `_sigma_to_t`."""
    return np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
