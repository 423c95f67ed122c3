"""PNDM: Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds", arXiv:2202.09778.

Every model evaluation ends in the paper's transfer part phi (sec. 3), DDIM's step from t to t - delta
driven by a noise estimate e':

    x_{t-delta} = phi_x * x_t - phi_e * e'
    phi_x = sqrt(alpha_bar_{t-delta} / alpha_bar_t)
    phi_e = (alpha_bar_{t-delta} - alpha_bar_t)
            / (alpha_bar_t sqrt(1 - alpha_bar_{t-delta}) + sqrt(alpha_bar_t (1 - alpha_bar_t) alpha_bar_{t-delta}))

and e' is the gradient part: pseudo Runge-Kutta (PRK, e' = (e1 + 2 e2 + 2 e3 + e4) / 6 over four
evaluations, three warm-up steps) and then pseudo linear multistep (PLMS, the Adams-Bashforth
weights (55 e_t - 59 e_{t-delta} + 37 e_{t-2delta} - 9 e_{t-3delta}) / 24, lower orders while the
history fills). The plan turns that bookkeeping into per-evaluation weights:

    e' = w_e_now * e + w_e . e_hist + w_rk * rk_sum
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ...errors import ConfigError
from .common import noise_schedule
from .plan import F32, Plan, Solver, finish

# Adams-Bashforth weights on (e_t, e_{t-delta}, ...), by the number of stored noise estimates.
ADAMS_BASHFORTH = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}

# The four evaluations of one PRK step: e1 at x_t, e2 and e3 at the midpoint, e4 at the end, all
# transferred from the step's start x_t; rk_sum collects e1/6 + e2/3 + e3/3 for e' = rk_sum + e4/6.
PRK_STAGES = (
    dict(w_e_now=1.0, rk_add=1 / 6, push=1, set_start=1),
    dict(w_e_now=1.0, rk_add=1 / 3),
    dict(w_e_now=1.0, rk_add=1 / 3),
    dict(w_e_now=1 / 6, w_rk=1.0, rk_keep=0.0),
)
ROW_DEFAULTS = dict(push=0, w_e_now=0.0, w_rk=0.0, rk_keep=1.0, rk_add=0.0, from_start=0, set_start=0)


def pndm_timesteps(cfg, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`PNDMScheduler.set_timesteps`: (PRK timesteps, PLMS timesteps), both descending int64."""
    N = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        base = np.linspace(0, N - 1, n).round().astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        base = (np.arange(0, n) * (N // n)).round().astype(np.int64) + cfg.steps_offset
    else:
        base = np.round(np.arange(N, 0, -N / n))[::-1].astype(np.int64) - 1
    if cfg.skip_prk_steps:
        return np.array([], np.int64), np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
    if n < 4:
        raise ConfigError("PNDM with PRK warm-up needs at least 4 steps; set skip_prk_steps=True (PLMS)")
    prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, N // n // 2]), 4)
    return prk[:-1].repeat(2)[1:-1][::-1].copy(), base[:-3][::-1].copy()


def prk_row(k: int, prk: np.ndarray, delta: int) -> tuple[dict, int, int]:
    """Evaluation k of the PRK warm-up: (weights, t the transfer starts from, t it lands on)."""
    weights = {**ROW_DEFAULTS, **PRK_STAGES[k % 4], "from_start": 1, "w_e": [0.0] * 4}
    t_prev = int(prk[k]) - (0 if k % 2 else delta // 2)
    return weights, int(prk[k // 4 * 4]), t_prev


def plms_row(k: int, timestep: int, delta: int, n_e: int, rk_live: bool) -> tuple[dict, int, int, int]:
    """Evaluation k of PLMS (k counts on from the PRK warm-up, as diffusers' counter does).

    Returns (weights, t, t_prev, stored noise estimates). Without PRK the first two evaluations are
    PLMS's own warm-up: an Euler-like transfer with e_t, then the same step redone from its start
    with (e_t + e_{t-delta}) / 2 (the second evaluation does not advance t).
    """
    weights = {**ROW_DEFAULTS, "rk_keep": 1.0 if rk_live else 0.0, "w_e": [0.0] * 4}
    t, t_prev = timestep, timestep - delta
    if k != 1:
        weights["push"] = 1
        n_e = min(n_e + 1, 4)
    else:
        t, t_prev = timestep + delta, timestep
    if n_e == 1 and k == 0:
        weights.update(w_e_now=1.0, set_start=1)
    elif n_e == 1 and k == 1:
        weights.update(w_e_now=0.5, from_start=1)
        weights["w_e"][0] = 0.5
    else:
        weights["w_e"][:n_e] = ADAMS_BASHFORTH[n_e]
    return weights, t, t_prev, n_e


def transfer(abar_t, abar_prev) -> dict:
    """The transfer part phi's coefficients from alpha_bar_t to alpha_bar_{t-delta} (float32 scalars)."""
    denom = abar_t * (F32(1) - abar_prev) ** 0.5 + (abar_t * (F32(1) - abar_t) * abar_prev) ** 0.5
    return dict(phi_x=(abar_prev / abar_t) ** 0.5, phi_e=(abar_prev - abar_t) / denom,
                alpha_t=abar_t**0.5, sigma_t=(1 - abar_t) ** 0.5)


def plan(cfg, n: int, *, begin: int = 0) -> Plan:
    """PRK warm-up then PLMS (or PLMS alone, `skip_prk_steps`): diffusers' `PNDMScheduler`.

    Raises `ConfigError` for prediction_type "sample", for PRK with fewer than 4 steps, and for
    `begin` > 0 (PNDM cannot start part-way).
    """
    if cfg.prediction_type == "sample":
        raise ConfigError("PNDM supports prediction_type epsilon or v_prediction")
    sched = noise_schedule(cfg, "pndm")
    ac = sched.alphas_cumprod
    final = F32(1.0) if cfg.set_alpha_to_one else ac[0]
    delta = cfg.num_train_timesteps // n
    prk, plms = pndm_timesteps(cfg, n)
    ts = np.concatenate([prk, plms]).astype(np.int64)
    if begin:
        raise ConfigError("PNDM cannot start part-way (img2img); use DDIM, Euler, DPM-Solver or UniPC")
    rows: dict[str, list] = {}
    n_e = 0
    for k, timestep in enumerate(ts):
        if k < len(prk):
            weights, t, t_prev = prk_row(k, prk, delta)
            n_e += k % 4 == 0
        else:
            weights, t, t_prev, n_e = plms_row(k, int(timestep), delta, n_e, len(prk) > 0)
        coefficients = transfer(ac[t], ac[t_prev] if t_prev >= 0 else final)
        for name, value in {"t": int(timestep), **weights, **coefficients}.items():
            rows.setdefault(name, []).append(value)
    level = np.array([ac[t] for t in ts[1:]] + [1.0])
    rows["next_a"], rows["next_b"] = np.sqrt(level), np.sqrt(1 - level)
    rows["in_div"] = np.ones(len(ts))
    return finish("pndm", cfg, ts, rows, sched, 0, num_inference_steps=n, init_noise_sigma=1.0,
                  start=(np.sqrt(ac[ts[0]]), np.sqrt(1 - ac[ts[0]])))


def init(cfg, x):
    """The scan's initial state: `x` (NHWC float32), zero x_start and rk_sum like x, and e_hist (4, *x.shape) zeros."""
    z = jnp.zeros_like(x)
    return {"x": x, "x_start": z, "rk_sum": z, "e_hist": jnp.zeros((4,) + x.shape, x.dtype)}


def update(cfg):
    """The jittable step `(state, model_output, row, noise) -> state`: gradient part e', then transfer phi.

    Pushes the model's noise estimate onto e_hist when the row says so, forms
    e' = w_e_now e + w_e . e_hist + w_rk rk_sum, and returns x_{t-delta} = phi_x x_t - phi_e e'
    (module docstring), x_t being the PRK step's start where `from_start` is set. A v_prediction
    output becomes the noise as alpha_t v + sigma_t x_t. Deterministic: `noise` is unused.
    """
    def step(state, e, row, noise):
        e_hist = jnp.where(row["push"] > 0, jnp.concatenate([e[None], state["e_hist"][:-1]]), state["e_hist"])
        e_prime = row["w_e_now"] * e + jnp.tensordot(row["w_e"], e_hist, axes=1) + row["w_rk"] * state["rk_sum"]
        rk_sum = row["rk_keep"] * state["rk_sum"] + row["rk_add"] * e
        x_start = jnp.where(row["set_start"] > 0, state["x"], state["x_start"])
        x_t = jnp.where(row["from_start"] > 0, x_start, state["x"])
        if cfg.prediction_type == "v_prediction":  # the model's v, turned into its epsilon
            e_prime = row["alpha_t"] * e_prime + row["sigma_t"] * x_t
        return {"x": row["phi_x"] * x_t - row["phi_e"] * e_prime, "x_start": x_start, "rk_sum": rk_sum,
                "e_hist": e_hist}

    return step


SOLVER = Solver("pndm", plan, update, init)
