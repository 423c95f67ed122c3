"""Multistep DPM-Solver and DPM-Solver++ (orders 1 to 3, ODE and SDE forms).

Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
Sampling in Around 10 Steps", arXiv:2206.00927 (noise prediction, `algorithm_type="dpmsolver"`), and
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095
(data prediction, `dpmsolver++`, Algorithm 2 for 2M; `sde-dpmsolver++` its SDE form). From s to t,
h = lambda_t - lambda_s, with D0 = m_0 the newest converted output and, from the previous steps,
r0 = h_{i-1} / h, D1 = (m_0 - m_1) / r0 (and for order 3 the r0, r1 combination of DPM-Solver++'s
3M), e.g. for DPM-Solver++:

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0 - (alpha_t / 2) (e^-h - 1) D1        (midpoint, 2M)
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0 + alpha_t ((e^-h - 1) / h + 1) D1    (heun)

All are `x_next = A x + w . (m_0, m_1, m_2) + noise_std z`; the plan holds A, w, noise_std.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ...errors import ConfigError
from .common import noise_schedule
from .multistep import alpha_sigma, conversion, lambda_, multistep_sigmas
from .plan import Plan, Solver, as_f32

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")
HISTORY = 3  # m_0, m_1, m_2


def taylor_coefficients(algorithm: str, alpha_t, sigma_t, alpha_s, sigma_s, h) -> dict:
    """The update's terms from s to t: A on x_s, noise_std on z, and the weights of D0, D1, D2.

    `b0`, `b1`, `b2` weigh D0, D1, D2 in the third-order (and `heun` second-order) update,
    `b1_midpoint` weighs D1 in the `midpoint` second-order update. In phi-function form
    (phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z), DPM-Solver++'s are
    b_k = alpha_t h phi_{k+1}(-h).
    """
    if algorithm == "dpmsolver++":
        em = np.exp(-h)
        return dict(A=sigma_t / sigma_s, noise_std=0.0, b0=-alpha_t * (em - 1.0),
                    b1_midpoint=-0.5 * alpha_t * (em - 1.0), b1=alpha_t * ((em - 1.0) / h + 1.0),
                    b2=-alpha_t * ((em - 1.0 + h) / h**2 - 0.5))
    if algorithm == "sde-dpmsolver++":
        e2 = np.exp(-2.0 * h)
        return dict(A=sigma_t / sigma_s * np.exp(-h), noise_std=sigma_t * np.sqrt(1.0 - e2), b0=alpha_t * (1 - e2),
                    b1_midpoint=0.5 * alpha_t * (1 - e2), b1=alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0),
                    b2=alpha_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5))
    ep = np.exp(h)  # DPM-Solver, noise prediction
    return dict(A=alpha_t / alpha_s, noise_std=0.0, b0=-sigma_t * (ep - 1.0), b1_midpoint=-0.5 * sigma_t * (ep - 1.0),
                b1=-sigma_t * ((ep - 1.0) / h - 1.0), b2=-sigma_t * ((ep - 1.0 - h) / h**2 - 0.5))


def step_weights(algorithm: str, solver_type: str, order: int, sigmas, i: int):
    """(A, w, noise_std) of the step from sigmas[i] to sigmas[i + 1]: x_next = A x + w . m + noise_std z."""
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha_t, sigma_t = alpha_sigma(np.float64(sigmas[i + 1]))
        alpha_s, sigma_s = alpha_sigma(np.float64(sigmas[i]))
        lambda_s0 = lambda_(sigmas[i])
        h = lambda_(sigmas[i + 1]) - lambda_s0
        c = taylor_coefficients(algorithm, alpha_t, sigma_t, alpha_s, sigma_s, h)
        A, w = c["A"], np.zeros(HISTORY)
        w[0] = c["b0"]  # D0 = m_0
        if order == 1:
            if sigma_t == 0:  # the last step to sigma 0 lands exactly on the converted output
                A = 0.0
            return A, w, c["noise_std"]
        lambda_s1 = lambda_(sigmas[i - 1])
        r0 = (lambda_s0 - lambda_s1) / h
        D1_0 = np.array([1 / r0, -1 / r0, 0.0])  # (m_0 - m_1) / r0
        if order == 2:
            return A, w + (c["b1_midpoint"] if solver_type == "midpoint" else c["b1"]) * D1_0, c["noise_std"]
        r1 = (lambda_s1 - lambda_(sigmas[i - 2])) / h
        D1_1 = np.array([0.0, 1 / r1, -1 / r1])  # (m_1 - m_2) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        return A, w + c["b1"] * D1 + c["b2"] * D2, c["noise_std"]


def step_order(cfg, i: int, L: int, warm: int) -> int:
    """The order of step i of L after `warm` earlier steps: lower while the history fills, and at the end."""
    final_1 = i == L - 1 and (cfg.euler_at_final or (cfg.lower_order_final and L < 15)
                              or cfg.final_sigmas_type == "zero")
    final_2 = i == L - 2 and cfg.lower_order_final and L < 15
    if cfg.solver_order == 1 or warm < 1 or final_1:
        return 1
    if cfg.solver_order == 2 or warm < 2 or final_2:
        return 2
    return 3


def check(cfg) -> None:
    """Refuse a config this solver cannot run (as diffusers' `DPMSolverMultistepScheduler` does).

    Raises `ConfigError` for an algorithm_type other than dpmsolver++, sde-dpmsolver++, dpmsolver,
    for solver_order outside 1-3, and for `dpmsolver` with final_sigmas_type "zero".
    """
    algorithm = cfg.algorithm_type
    if algorithm not in ALGORITHMS:
        raise ConfigError(
            f"DPM-Solver algorithm_type={algorithm!r} is not supported (dpmsolver++, sde-dpmsolver++, dpmsolver)")
    if cfg.solver_order not in (1, 2, 3):
        raise ConfigError(f"DPM-Solver solver_order must be 1, 2 or 3, got {cfg.solver_order}")
    if algorithm == "dpmsolver" and cfg.final_sigmas_type == "zero":
        raise ConfigError(
            "DPM-Solver algorithm_type='dpmsolver' with final_sigmas_type='zero': the noise-prediction update "
            "cannot step to sigma 0 (diffusers refuses this config). Use final_sigmas_type='sigma_min' or "
            "algorithm_type='dpmsolver++'")


def plan(cfg, n: int, *, begin: int = 0) -> Plan:
    """Multistep DPM-Solver(++) of order `solver_order`: diffusers' `DPMSolverMultistepScheduler`.

    m is the data prediction x0 (dpmsolver++, sde-dpmsolver++) or the noise eps (dpmsolver); the
    warm-up counts from `begin`. Raises `ConfigError` for an unsupported algorithm_type or order,
    and for `dpmsolver` stepping to sigma 0.
    """
    check(cfg)
    sched = noise_schedule(cfg, "dpmsolver_multistep")
    ts, sigmas = multistep_sigmas(cfg, n, sched, final_from_karras=False)
    L = len(ts)
    rows: dict[str, list] = {k: [] for k in ("p", "q", "A", "noise_std", "w", "next_a", "next_b")}
    warm = 0
    for i in range(begin, L):
        order = step_order(cfg, i, L, warm)
        warm = min(warm + 1, cfg.solver_order)
        p, q = conversion(cfg, sigmas[i], to_x0=cfg.algorithm_type != "dpmsolver")
        A, w, noise_std = step_weights(cfg.algorithm_type, cfg.solver_type, order, sigmas, i)
        alpha_next, sigma_next = alpha_sigma(np.float64(sigmas[i + 1]))
        for name, value in zip(rows, (p, q, A, noise_std, w, alpha_next, sigma_next)):
            rows[name].append(value)
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["t"], out["in_div"] = ts[begin:], np.ones(L - begin)
    alpha_0, sigma_0 = alpha_sigma(np.float64(sigmas[begin]))
    return Plan("dpmsolver_multistep", cfg, L - begin, ts[begin:], as_f32(out), 1.0, float(alpha_0), float(sigma_0),
                sigmas, sched, begin)


def init(cfg, x):
    """The scan's initial state: `x` (NHWC float32) and the history m, zeros of shape (3, *x.shape), m_0 first."""
    return {"x": x, "m": jnp.zeros((HISTORY,) + x.shape, x.dtype)}


def update(cfg):
    """The jittable step `(state, model_output, row, noise) -> state`: x_next = A x + w . (m_0, m_1, m_2) + noise_std z.

    Converts the model output to m_0 = p x + q out (x0 for DPM-Solver++, eps for DPM-Solver), shifts
    it into the history, and applies the plan's weights of the order-1/2/3 update (module docstring);
    `noise` is z (standard normal, NHWC), used only by `sde-dpmsolver++`.
    """
    def step(state, out, row, noise):
        x = state["x"]
        m = jnp.concatenate([(row["p"] * x + row["q"] * out)[None], state["m"][:-1]])  # m_0 first
        return {"x": row["A"] * x + jnp.tensordot(row["w"], m, axes=1) + row["noise_std"] * noise, "m": m}

    return step


SOLVER = Solver("dpmsolver_multistep", plan, update, init)
