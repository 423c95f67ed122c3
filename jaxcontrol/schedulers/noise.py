"""Noise schedules: betas, cumulative alphas and sigmas, computed on the host with numpy.

The arrays equal diffusers' own bit for bit: its float32 `torch.linspace` is reproduced (the two
halves are anchored at `start` and `end`, each value rounded once from an exact product), and
`torch.cumprod` accumulates in float64 before rounding to float32, as ATen does on the CPU.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU, exactly."""
    if steps == 1:
        return np.array([start], np.float32)
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lower = np.float64(a) + np.float64(step) * i
    upper = np.float64(b) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, lower, upper).astype(np.float32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's squared-cosine schedule (`squaredcos_cap_v2`)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023: shift and scale sqrt(alpha_bar) so that the last step has SNR 0."""
    alphas_bar_sqrt = np.sqrt(cumprod_f32(np.float32(1) - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * np.float32(first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    """Cumulative product accumulated in float64 and returned as float32 (alpha_bar from alphas, as diffusers')."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The beta_t of diffusers' schedulers: float32 array of length `num_train_timesteps`.

    `beta_schedule` is "linear", "scaled_linear" (linear in sqrt(beta), Stable Diffusion),
    "squaredcos_cap_v2" (Nichol & Dhariwal, arXiv:2102.09672) or "sigmoid"; `trained_betas`, when
    given, is used as is. `rescale_betas_zero_snr` applies `rescale_zero_terminal_snr`. Raises
    `ConfigError` for another beta_schedule.
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
    elif beta_schedule == "linear":
        betas = torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(num_train_timesteps)
    elif beta_schedule == "sigmoid":
        x = torch_linspace_f32(-6, 6, num_train_timesteps)
        betas = (np.float32(1) / (np.float32(1) + np.exp(-x))) * np.float32(beta_end - beta_start) + np.float32(beta_start)
    else:
        raise ConfigError(f"beta_schedule={beta_schedule!r} is not supported; expected one of {BETA_SCHEDULES}")
    betas = betas.astype(np.float32)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


class NoiseSchedule:
    """The training-time forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    Host arrays (float32, diffusers-identical) plus small jnp helpers for training and guidance:
    `add_noise`, `velocity`, `snr`, and `alpha_bar_at` for fractional timesteps (piecewise
    log-linear in sigma, the inverse of the Karras `sigma_to_t` rule, exact at integers).
    """

    def __init__(self, betas: np.ndarray, *, terminal_alpha_bar: float | None = None):
        self.betas = np.asarray(betas, np.float32)
        self.alphas = (np.float32(1) - self.betas).astype(np.float32)
        self.alphas_cumprod = cumprod_f32(self.alphas)
        if terminal_alpha_bar is not None:  # diffusers' sigma-space classes: 2**-24, so sigma_max is finite
            self.alphas_cumprod[-1] = np.float32(terminal_alpha_bar)
        self.num_train_timesteps = len(self.betas)

    @classmethod
    def from_config(cls, config) -> "NoiseSchedule":
        """The schedule a scheduler config's beta fields describe (see `make_betas`; raises its `ConfigError`).

        Reads num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr.
        """
        return cls(
            make_betas(
                config.num_train_timesteps,
                config.beta_start,
                config.beta_end,
                config.beta_schedule,
                config.trained_betas,
                config.get("rescale_betas_zero_snr", False),
            )
        )

    @property
    def sigmas(self) -> np.ndarray:
        """Karras-style sigma_t = sqrt((1 - abar_t) / abar_t), ascending in t (float32)."""
        ac = self.alphas_cumprod
        return np.sqrt((np.float32(1) - ac) / ac).astype(np.float32)

    # ---- jnp helpers (traceable; t may be a traced integer or float array) ----
    def alpha_bar_at(self, t):
        """alpha_bar at timesteps `t` (any shape, float or int, may be traced), clipped to [0, N - 1].

        Exact `alphas_cumprod[t]` at integers; between them log-sigma is interpolated linearly
        (the inverse of `sigma_to_t`). Returns float32 of t's shape.
        """
        import jax.numpy as jnp

        log_sigmas = jnp.asarray(np.log(self.sigmas.astype(np.float64)), jnp.float32)
        t = jnp.clip(jnp.asarray(t, jnp.float32), 0, self.num_train_timesteps - 1)
        lo = jnp.floor(t).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, self.num_train_timesteps - 1)
        w = t - lo
        log_sigma = (1 - w) * log_sigmas[lo] + w * log_sigmas[hi]
        frac_is_zero = w == 0
        exact = jnp.asarray(self.alphas_cumprod)[lo]
        interp = 1.0 / (1.0 + jnp.exp(2 * log_sigma))
        return jnp.where(frac_is_zero, exact, interp)

    def add_noise(self, x0, noise, t):
        """sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with t per sample (integer timesteps)."""
        import jax.numpy as jnp

        ab = jnp.asarray(self.alphas_cumprod)[jnp.asarray(t, jnp.int32)]
        ab = ab.reshape(ab.shape + (1,) * (x0.ndim - ab.ndim))
        return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise

    def velocity(self, x0, noise, t):
        """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
        import jax.numpy as jnp

        ab = jnp.asarray(self.alphas_cumprod)[jnp.asarray(t, jnp.int32)]
        ab = ab.reshape(ab.shape + (1,) * (x0.ndim - ab.ndim))
        return jnp.sqrt(ab) * noise - jnp.sqrt(1 - ab) * x0

    def snr(self, t):
        """Signal-to-noise ratio abar_t / (1 - abar_t) at integer timesteps `t` (jnp float32, t's shape)."""
        import jax.numpy as jnp

        ab = jnp.asarray(self.alphas_cumprod)[jnp.asarray(t, jnp.int32)]
        return ab / (1 - ab)
