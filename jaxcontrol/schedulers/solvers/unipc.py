"""UniPC: Zhao, Bai, Rao, Zhou & Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models", arXiv:2302.04867.

Each model evaluation first corrects the sample it was made at with UniC (the new output refines
the previous step, no extra evaluation), then predicts the next one with UniP, both of order p
from the history of converted outputs m (data prediction x0 with `predict_x0`, else the noise):

    h = lambda_t - lambda_s,   r_k = (lambda_{s_k} - lambda_s) / h,   D_k = (m_k - m_0) / r_k
    x_t = A x_s - alpha_t h phi_1 m_0 - alpha_t B(h) sum_k rho_k D_k          (UniP; UniC adds rho_p (m_t - m_0))

with B(h) = h (`bh1`) or e^h - 1 (`bh2`), the rho solving R rho = b (the paper's order conditions).
The plan's rows: `keep`, `cx`, `wc`, `wt` the corrector (x_c = keep x + cx x_last + wc . m + wt m_t),
`px`, `wp` the predictor (x_next = px x_c + wp . m); `p`, `q` the conversion m = p x + q out.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ...errors import ConfigError
from .common import noise_schedule
from .multistep import alpha_sigma, conversion, lambda_, multistep_sigmas
from .plan import Plan, Solver, as_f32

ROWS = ("p", "q", "keep", "cx", "wc", "wt", "px", "wp", "next_a", "next_b")


def check_final_step(cfg, order: int, i: int, L: int) -> None:
    """A UniPC step that lands on sigma 0 is finite only as a first-order data-prediction step.

    At sigma 0, lambda is infinite: the higher-order terms divide by it (diffusers returns NaN at
    order 2 and fails on a singular matrix at order 3), and the noise-prediction form multiplies
    0 by inf (NaN). The first-order data-prediction step is exactly the converted output x0.
    Raises `ConfigError` otherwise.
    """
    if not cfg.predict_x0:
        raise ConfigError(
            f"UniPC with predict_x0=False and final_sigmas_type={cfg.final_sigmas_type!r}: the last step "
            f"(model evaluation {i + 1} of {L}) lands on sigma 0, where the noise-prediction update is 0 * inf "
            "(diffusers returns NaN). Use predict_x0=True or final_sigmas_type='sigma_min'")
    if order > 1:
        raise ConfigError(
            f"UniPC with lower_order_final={cfg.lower_order_final} and solver_order={cfg.solver_order}: the last "
            f"step (model evaluation {i + 1} of {L}) is of order {order} and lands on sigma 0 "
            f"(final_sigmas_type={cfg.final_sigmas_type!r}), where the order-{order} coefficients divide by an "
            "infinite log-SNR step (diffusers returns NaN at order 2 and fails on a singular matrix at order 3). "
            "Use lower_order_final=True or final_sigmas_type='sigma_min'")


def basis(cfg, sigmas, t_idx: int, s0_idx: int, past: list[int], order: int, *, corrector: bool):
    """The shared UniP/UniC algebra from s0 to t: (A, weight on m_0, alpha_t B(h) factor, rho, r).

    `past` are the indices of the earlier outputs m_k; rho solves the order conditions R rho = b.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha_t, sigma_t = alpha_sigma(np.float64(sigmas[t_idx]))
        alpha_s0, sigma_s0 = alpha_sigma(np.float64(sigmas[s0_idx]))
        lambda_t, lambda_s0 = lambda_(sigmas[t_idx]), lambda_(sigmas[s0_idx])
        h = lambda_t - lambda_s0
        rks = np.array([(lambda_(sigmas[si]) - lambda_s0) / h for si in past] + [1.0])
        hh = -h if cfg.predict_x0 else h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        B_h = hh if cfg.solver_type == "bh1" else np.expm1(hh)
        R, b, factorial = [], [], 1
        for k in range(1, order + 1):
            R.append(rks ** (k - 1))
            b.append(h_phi_k * factorial / B_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R, b = np.stack(R), np.array(b)
        if corrector:
            rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        elif past:
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            rhos = np.array([])
        scale_out = alpha_t if cfg.predict_x0 else sigma_t
        A = sigma_t / sigma_s0 if cfg.predict_x0 else alpha_t / alpha_s0
        if sigma_t == 0 and cfg.predict_x0:
            A = 0.0
        return A, -scale_out * h_phi_1, -scale_out * B_h, rhos, rks


def predictor(cfg, sigmas, i: int, order: int, K: int):
    """UniP-p from sigmas[i] to sigmas[i + 1]: (px, wp) with x_next = px x + wp . (m_0, m_1, ...)."""
    past = [i - k for k in range(1, order)]
    A, w_m0, w_res, rhos, rks = basis(cfg, sigmas, i + 1, i, past, order, corrector=False)
    w = np.zeros(K)
    w[0] = w_m0
    for k in range(1, order):  # D_k = (m_k - m_0) / r_k
        if w_res == 0 or rhos[k - 1] == 0:
            continue
        coef = w_res * rhos[k - 1] / rks[k - 1]
        w[k] += coef
        w[0] -= coef
    return A, w


def corrector(cfg, sigmas, i: int, order: int, K: int):
    """UniC-p of the step sigmas[i - 1] -> sigmas[i], with m_t the new output: (cx, wc, wt)."""
    past = [i - (k + 1) for k in range(1, order)]
    A, w_m0, w_res, rhos, rks = basis(cfg, sigmas, i, i - 1, past, order, corrector=True)
    w = np.zeros(K)
    w[0] = w_m0
    for k in range(1, order):
        coef = w_res * rhos[k - 1] / rks[k - 1]
        w[k] += coef
        w[0] -= coef
    wt = w_res * rhos[-1]
    w[0] -= wt
    return A, w, wt


def step_rows(cfg, sigmas, i: int, order: int, corrector_order: int | None, L: int) -> tuple:
    """Evaluation i's row values, in `ROWS` order; `corrector_order` None: no correction at i."""
    p, q = conversion(cfg, sigmas[i], to_x0=cfg.predict_x0)
    keep, cx, wc, wt = 1.0, 0.0, np.zeros(cfg.solver_order), 0.0
    if corrector_order is not None:
        keep = 0.0
        cx, wc, wt = corrector(cfg, sigmas, i, corrector_order, cfg.solver_order)
    if sigmas[i + 1] == 0:
        check_final_step(cfg, order, i, L)
    px, wp = predictor(cfg, sigmas, i, order, cfg.solver_order)
    alpha_next, sigma_next = alpha_sigma(np.float64(sigmas[i + 1]))
    return p, q, keep, cx, wc, wt, px, wp, alpha_next, sigma_next


def plan(cfg, n: int, *, begin: int = 0) -> Plan:
    """UniP-p with UniC-p after every step but those in `disable_corrector`: diffusers' `UniPCMultistepScheduler`.

    The order p is `solver_order`, lower while the history fills (counted from `begin`) and, with
    `lower_order_final`, in the last steps. Raises `ConfigError` for a `solver_type` other than
    bh1/bh2 and for a last step to sigma 0 that is not first-order data prediction.
    """
    if cfg.solver_type not in ("bh1", "bh2"):
        raise ConfigError(f"UniPC solver_type must be bh1 or bh2, got {cfg.solver_type!r}")
    sched = noise_schedule(cfg, "unipc")
    ts, sigmas = multistep_sigmas(cfg, n, sched, final_from_karras=True)
    L, K = len(ts), cfg.solver_order
    disabled = set(cfg.disable_corrector or ())
    rows: dict[str, list] = {k: [] for k in ROWS}
    warm, prev_order = 0, None
    for i in range(begin, L):
        order = min(min(K, L - i) if cfg.lower_order_final else K, warm + 1)
        corrector_order = prev_order if i > begin and (i - 1) not in disabled else None
        for name, value in zip(ROWS, step_rows(cfg, sigmas, i, order, corrector_order, L)):
            rows[name].append(value)
        warm, prev_order = min(warm + 1, K), order
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["t"], out["in_div"] = ts[begin:], np.ones(L - begin)
    alpha_0, sigma_0 = alpha_sigma(np.float64(sigmas[begin]))
    return Plan("unipc", cfg, L - begin, ts[begin:], as_f32(out), 1.0, float(alpha_0), float(sigma_0), sigmas,
                sched, begin)


def init(cfg, x):
    """The scan's initial state: `x` (NHWC float32), history `hist` zeros (solver_order, *x.shape), x_last zeros."""
    return {"x": x, "hist": jnp.zeros((cfg.solver_order,) + x.shape, x.dtype), "x_last": jnp.zeros_like(x)}


def update(cfg):
    """The jittable step `(state, model_output, row, noise) -> state`: UniC correction, then UniP prediction.

    Converts the output to m_t = p x + q out, corrects the current sample
    x_c = keep x + cx x_last + wc . m + wt m_t, pushes m_t into the history and returns
    x_next = px x_c + wp . m (module docstring), keeping x_c as x_last. Deterministic: `noise` is unused.
    """
    def step(state, out, row, noise):
        x, hist = state["x"], state["hist"]
        m_t = row["p"] * x + row["q"] * out
        # UniC: correct the sample this output was made at (x_last: the previous corrected sample)
        x = row["keep"] * x + row["cx"] * state["x_last"] + jnp.tensordot(row["wc"], hist, axes=1) + row["wt"] * m_t
        hist = jnp.concatenate([m_t[None], hist[:-1]])
        # UniP: predict the next sample
        return {"x": row["px"] * x + jnp.tensordot(row["wp"], hist, axes=1), "hist": hist, "x_last": x}

    return step


SOLVER = Solver("unipc", plan, update, init)
