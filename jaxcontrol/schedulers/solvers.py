"""Solvers as host-side plans plus pure per-evaluation updates.

Every solver is split in two:

* a **plan**, computed once on the host with numpy: the timestep the model sees at each model
  evaluation, the input scaling, and every scalar coefficient of the update (orders, lower-order
  warm-up and final steps, Karras sigmas, PRK/PLMS bookkeeping). These equal the values diffusers'
  scheduler of the same name computes, and the timesteps and sigmas are bit-identical to its own;
* an **update** `(state, model_output, row, noise) -> state`, a short pure function of arrays
  that a `lax.scan` runs once per model evaluation. `row` is the plan's slice for that evaluation.

So one compiled scan body serves every step: nothing is unrolled, and the number of steps only
changes the length of the arrays the scan walks over.

Model outputs are in the model's own parameterisation (`epsilon`, `v_prediction` or `sample`);
the model is always called on the variance-preserving `x_t` (`model_input = x / in_div`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from .config import SOLVER_TABLE, SchedulerConfig, terminal_alpha_bar
from .noise import NoiseSchedule, make_betas
from .timesteps import (
    discrete_timesteps,
    float_timesteps,
    karras_sigmas,
    multistep_timesteps,
    sigmas_to_timesteps,
    train_sigmas,
)

F32 = np.float32


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything a sampling run needs besides the model and the noise.

    `rows` maps names to arrays with one entry per model evaluation (leading axis); the scan walks
    over them. `timesteps` is what diffusers' `scheduler.timesteps` holds for the same run.
    `start_a`, `start_b` put clean latents at the first evaluation's noise level
    (`x = start_a * x0 + start_b * noise`, for img2img); `rows["next_a"]`, `rows["next_b"]` give the
    level after each evaluation (for inpainting by partial diffusion).
    """

    solver: str
    config: Any
    num_inference_steps: int
    timesteps: np.ndarray
    rows: dict[str, np.ndarray]
    init_noise_sigma: float
    start_a: float
    start_b: float
    sigmas: np.ndarray | None
    schedule: NoiseSchedule
    begin_index: int = 0

    def __post_init__(self):
        _check_finite(self)

    @property
    def num_evals(self) -> int:
        return len(self.timesteps)

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type

    @property
    def stochastic(self) -> bool:
        return bool(np.any(self.rows.get("noise_std", np.zeros(1)) != 0))

    def update_fn(self) -> "Callable":
        return UPDATES[self.solver](self.config)

    def init_state(self, x):
        return INITS[self.solver](self.config, x)

    def output(self, state):
        return state["denoised"] if self.solver == "lcm" else state["x"]


def _f32(d: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, F32) for k, v in d.items()}


def _schedule(cfg, solver: str) -> NoiseSchedule:
    """The noise schedule as `solver`'s diffusers class builds it (see `config.SOLVER_TABLE`)."""
    betas = make_betas(
        cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas,
        cfg.get("rescale_betas_zero_snr", False),
    )
    return NoiseSchedule(betas, terminal_alpha_bar=terminal_alpha_bar(solver, cfg))


def _x0_eps(out, x, sa, sb, prediction_type: str):
    """x0 and epsilon from a model output, where x = sa * x0 + sb * eps."""
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x - sb * out, sa * out + sb * x
    return out, (x - sa * out) / sb


def _clip(x0, cfg):
    if cfg.get("clip_sample", False):
        r = cfg.clip_sample_range
        return jnp.clip(x0, -r, r)
    return x0


def strength_start(num_inference_steps: int, strength: float) -> int:
    """diffusers' `get_timesteps`: the first step index for img2img at `strength`."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0)


# ----------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021), with eta; and DDIM inversion
# ----------------------------------------------------------------------------------------------


def plan_ddim(cfg, n: int, *, eta: float = 0.0, begin: int = 0) -> Plan:
    sched = _schedule(cfg, "ddim")
    ac = sched.alphas_cumprod
    final = F32(1.0) if cfg.set_alpha_to_one else ac[0]
    ts = discrete_timesteps(cfg, n)
    ratio = cfg.num_train_timesteps // n
    a_t = ac[ts]
    prev = ts - ratio
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(F32)
    variance = (F32(1) - a_prev) / (F32(1) - a_t) * (F32(1) - a_t / a_prev)
    std = F32(eta) * np.sqrt(variance)
    rows = dict(
        t=ts, in_div=np.ones(n), sa=np.sqrt(a_t), sb=np.sqrt(F32(1) - a_t), sa_prev=np.sqrt(a_prev),
        direction=np.sqrt(np.maximum(F32(1) - a_prev - std**2, 0)), noise_std=std,
        next_a=np.sqrt(a_prev), next_b=np.sqrt(F32(1) - a_prev),
    )
    return _finish("ddim", cfg, n, ts, rows, sched, begin, init_noise_sigma=1.0,
                   start=(np.sqrt(a_t[begin]), np.sqrt(1 - a_t[begin])))


def plan_ddim_inverse(cfg, n: int, *, begin: int = 0) -> Plan:
    """DDIM run backwards (x_0 -> x_T): diffusers' DDIMInverseScheduler."""
    sched = _schedule(cfg, "ddim_inverse")
    ac = sched.alphas_cumprod
    _ = discrete_timesteps(cfg, n)  # validates n
    N = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (N // n)).round().copy().astype(np.int64) + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(N, 0, -N / n)[::-1]).astype(np.int64) - 1
    else:
        raise ConfigError("DDIM inversion supports timestep_spacing 'leading' or 'trailing' (as diffusers does)")
    initial = F32(1.0) if cfg.set_alpha_to_one else ac[0]
    src = np.minimum(ts - N // n, N - 1)
    a_from = np.where(src >= 0, ac[np.clip(src, 0, None)], initial).astype(F32)
    a_to = ac[ts]
    rows = dict(
        t=ts, in_div=np.ones(n), sa=np.sqrt(a_from), sb=np.sqrt(F32(1) - a_from), sa_prev=np.sqrt(a_to),
        direction=np.sqrt(F32(1) - a_to), noise_std=np.zeros(n), next_a=np.sqrt(a_to), next_b=np.sqrt(F32(1) - a_to),
    )
    return _finish("ddim_inverse", cfg, n, ts, rows, sched, begin, init_noise_sigma=1.0, start=(1.0, 0.0))


def _update_ddim(cfg):
    def update(state, out, row, noise):
        x = state["x"]
        x0, eps = _x0_eps(out, x, row["sa"], row["sb"], cfg.prediction_type)
        x0 = _clip(x0, cfg)
        x = row["sa_prev"] * x0 + row["direction"] * eps + row["noise_std"] * noise
        return {"x": x}

    return update


# ----------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020)
# ----------------------------------------------------------------------------------------------


def plan_ddpm(cfg, n: int, *, begin: int = 0) -> Plan:
    if cfg.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ConfigError(f"DDPM variance_type={cfg.variance_type!r} is not supported "
                          "(fixed_small, fixed_small_log, fixed_large)")
    sched = _schedule(cfg, "ddpm")
    ac = sched.alphas_cumprod
    ts = discrete_timesteps(cfg, n)
    prev = np.append(ts[1:], -1)
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], F32(1)).astype(F32)
    beta_t, beta_prev = F32(1) - a_t, F32(1) - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = F32(1) - cur_alpha
    if cfg.variance_type == "fixed_large":
        std = np.sqrt(cur_beta)
    else:
        std = np.sqrt(np.maximum(beta_prev / beta_t * cur_beta, F32(1e-20)))
    std = np.where(ts > 0, std, 0)
    rows = dict(
        t=ts, in_div=np.ones(n), sa=np.sqrt(a_t), sb=np.sqrt(beta_t),
        c_x0=np.sqrt(a_prev) * cur_beta / beta_t, c_x=np.sqrt(cur_alpha) * beta_prev / beta_t,
        noise_std=std, next_a=np.sqrt(a_prev), next_b=np.sqrt(beta_prev),
    )
    return _finish("ddpm", cfg, n, ts, rows, sched, begin, init_noise_sigma=1.0,
                   start=(np.sqrt(a_t[begin]), np.sqrt(1 - a_t[begin])))


def _update_ddpm(cfg):
    def update(state, out, row, noise):
        x = state["x"]
        x0, _ = _x0_eps(out, x, row["sa"], row["sb"], cfg.prediction_type)
        x0 = _clip(x0, cfg)
        return {"x": row["c_x0"] * x0 + row["c_x"] * x + row["noise_std"] * noise}

    return update


# ----------------------------------------------------------------------------------------------
# PNDM (Liu et al. 2022): Runge-Kutta warm-up (PRK) then linear multistep (PLMS)
# ----------------------------------------------------------------------------------------------


def plan_pndm(cfg, n: int, *, begin: int = 0) -> Plan:
    if cfg.prediction_type == "sample":
        raise ConfigError("PNDM supports prediction_type epsilon or v_prediction")
    sched = _schedule(cfg, "pndm")
    ac = sched.alphas_cumprod
    N = cfg.num_train_timesteps
    final = F32(1.0) if cfg.set_alpha_to_one else ac[0]
    if cfg.timestep_spacing == "linspace":
        base = np.linspace(0, N - 1, n).round().astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        base = (np.arange(0, n) * (N // n)).round().astype(np.int64) + cfg.steps_offset
    else:
        base = np.round(np.arange(N, 0, -N / n))[::-1].astype(np.int64) - 1
    if cfg.skip_prk_steps:
        prk = np.array([], np.int64)
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
    else:
        if n < 4:
            raise ConfigError("PNDM with PRK warm-up needs at least 4 steps; set skip_prk_steps=True (PLMS)")
        prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, N // n // 2]), 4)
        prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
        plms = base[:-3][::-1].copy()
    ts = np.concatenate([prk, plms]).astype(np.int64)
    if begin:
        raise ConfigError("PNDM cannot start part-way (img2img); use DDIM, Euler, DPM-Solver or UniPC")

    rows: dict[str, list] = {k: [] for k in (
        "t", "push", "w_out", "w_acc", "acc_keep", "acc_add", "use_cur", "set_cur", "c_s", "c_m", "sa", "sb")}
    rows["w_e"] = []
    ets_len, acc_live = 0, False
    for k, timestep in enumerate(ts):
        timestep = int(timestep)
        w_out, w_e, w_acc, acc_keep, acc_add, push, use_cur, set_cur = 0.0, [0.0] * 4, 0.0, 1.0, 0.0, 0, 0, 0
        if k < len(prk):
            diff = 0 if k % 2 else N // n // 2
            prev_t = timestep - diff
            t_used = int(prk[k // 4 * 4])
            phase = k % 4
            use_cur = 1
            if phase == 0:
                acc_add, push, set_cur, w_out = 1 / 6, 1, 1, 1.0
                ets_len += 1
            elif phase in (1, 2):
                acc_add, w_out = 1 / 3, 1.0
            else:
                w_acc, w_out, acc_keep = 1.0, 1 / 6, 0.0
            acc_live = True
        else:
            c = k  # diffusers' counter runs on from the PRK warm-up
            prev_t = timestep - N // n
            t_used = timestep
            if c != 1:
                push = 1
                ets_len = min(ets_len + 1, 4)
            else:
                prev_t, t_used = timestep, timestep + N // n
            if ets_len == 1 and c == 0:
                w_out, set_cur = 1.0, 1
            elif ets_len == 1 and c == 1:
                w_out, w_e[0], use_cur = 0.5, 0.5, 1
            elif ets_len == 2:
                w_e[:2] = [3 / 2, -1 / 2]
            elif ets_len == 3:
                w_e[:3] = [23 / 12, -16 / 12, 5 / 12]
            else:
                w_e[:4] = [55 / 24, -59 / 24, 37 / 24, -9 / 24]
            acc_keep = 1.0 if acc_live else 0.0
        a_t = ac[t_used]
        a_prev = ac[prev_t] if prev_t >= 0 else final
        denom = a_t * (F32(1) - a_prev) ** 0.5 + (a_t * (F32(1) - a_t) * a_prev) ** 0.5
        for name, value in (("t", timestep), ("push", push), ("w_out", w_out), ("w_acc", w_acc),
                            ("acc_keep", acc_keep), ("acc_add", acc_add), ("use_cur", use_cur),
                            ("set_cur", set_cur), ("c_s", (a_prev / a_t) ** 0.5), ("c_m", (a_prev - a_t) / denom),
                            ("sa", a_t**0.5), ("sb", (1 - a_t) ** 0.5)):
            rows[name].append(value)
        rows["w_e"].append(w_e)
    level = np.array([ac[t] for t in ts[1:]] + [1.0])
    rows["next_a"], rows["next_b"] = np.sqrt(level), np.sqrt(1 - level)
    rows["in_div"] = np.ones(len(ts))
    rows = {k: np.asarray(v) for k, v in rows.items()}
    return _finish("pndm", cfg, n, ts, rows, sched, 0, init_noise_sigma=1.0, start=(np.sqrt(ac[ts[0]]), np.sqrt(1 - ac[ts[0]])))


def _init_pndm(cfg, x):
    z = jnp.zeros_like(x)
    return {"x": x, "cur": z, "acc": z, "ets": jnp.zeros((4,) + x.shape, x.dtype)}


def _update_pndm(cfg):
    def update(state, out, row, noise):
        x = state["x"]
        ets = jnp.where(row["push"] > 0, jnp.concatenate([out[None], state["ets"][:-1]]), state["ets"])
        eff = row["w_out"] * out + jnp.tensordot(row["w_e"], ets, axes=1) + row["w_acc"] * state["acc"]
        acc = row["acc_keep"] * state["acc"] + row["acc_add"] * out
        cur = jnp.where(row["set_cur"] > 0, x, state["cur"])
        sample = jnp.where(row["use_cur"] > 0, cur, x)
        if cfg.prediction_type == "v_prediction":
            eff = row["sa"] * eff + row["sb"] * sample
        x = row["c_s"] * sample - row["c_m"] * eff
        return {"x": x, "cur": cur, "acc": acc, "ets": ets}

    return update


# ----------------------------------------------------------------------------------------------
# Sigma-space solvers: Euler, Euler ancestral, Heun (Karras et al. 2022)
# ----------------------------------------------------------------------------------------------


def _euler_sigmas(cfg, n: int, solver: str, *, karras: bool) -> tuple[np.ndarray, np.ndarray, NoiseSchedule]:
    sched = _schedule(cfg, solver)
    ts = float_timesteps(cfg, n)
    base = train_sigmas(sched.alphas_cumprod)
    log_sigmas = np.log(base)
    sigmas = np.interp(ts, np.arange(0, len(base)), base)
    if karras:
        sigmas = karras_sigmas(sigmas, n, cfg.get("sigma_min"), cfg.get("sigma_max"))
        ts = sigmas_to_timesteps(sigmas, log_sigmas)
    if cfg.get("final_sigmas_type", "zero") == "sigma_min":
        ac0 = sched.alphas_cumprod[0]
        last = ((F32(1) - ac0) / ac0) ** F32(0.5)
    else:
        last = 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(F32)
    return ts.astype(F32), sigmas, sched


def _sigma_init(cfg, sigmas) -> float:
    m = sigmas.max()
    return float(m) if cfg.timestep_spacing in ("linspace", "trailing") else float((m**2 + F32(1)) ** F32(0.5))


def plan_euler(cfg, n: int, *, begin: int = 0, s_churn: float = 0.0, s_tmin: float = 0.0,
               s_tmax: float = float("inf"), s_noise: float = 1.0) -> Plan:
    ts, sigmas, sched = _euler_sigmas(cfg, n, "euler", karras=cfg.use_karras_sigmas)
    s = sigmas[:-1]
    gamma = np.where((s_tmin <= s) & (s <= s_tmax), min(s_churn / (len(sigmas) - 1), 2**0.5 - 1), 0.0)
    s_hat = (s * (gamma + 1)).astype(F32)
    rows = dict(
        t=ts, in_div=(s**2 + F32(1)) ** F32(0.5), sigma=s, sigma_hat=s_hat, dt=sigmas[1:] - s_hat,
        noise_std=np.where(gamma > 0, s_noise * np.sqrt(np.maximum(s_hat**2 - s**2, 0)), 0),
        next_a=np.ones(n), next_b=sigmas[1:],
    )
    return _finish("euler", cfg, n, ts, rows, sched, begin, init_noise_sigma=_sigma_init(cfg, sigmas),
                   start=(1.0, sigmas[begin]), sigmas=sigmas)


def _x0_sigma(out, x, sigma, sigma_hat, prediction_type):
    if prediction_type == "epsilon":
        return x - sigma_hat * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return out


def _update_euler(cfg):
    def update(state, out, row, noise):
        x = state["x"] + row["noise_std"] * noise
        x0 = _x0_sigma(out, x, row["sigma"], row["sigma_hat"], cfg.prediction_type)
        derivative = (x - x0) / row["sigma_hat"]
        return {"x": x + derivative * row["dt"]}

    return update


def plan_euler_ancestral(cfg, n: int, *, begin: int = 0) -> Plan:
    if cfg.prediction_type == "sample":
        raise ConfigError("Euler ancestral supports prediction_type epsilon or v_prediction (as diffusers does)")
    ts, sigmas, sched = _euler_sigmas(cfg, n, "euler_ancestral", karras=False)
    s_from, s_to = sigmas[:-1], sigmas[1:]
    up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** F32(0.5)
    down = (s_to**2 - up**2) ** F32(0.5)
    rows = dict(t=ts, in_div=(s_from**2 + F32(1)) ** F32(0.5), sigma=s_from, dt=down - s_from, noise_std=up,
                next_a=np.ones(n), next_b=s_to)
    return _finish("euler_ancestral", cfg, n, ts, rows, sched, begin, init_noise_sigma=_sigma_init(cfg, sigmas),
                   start=(1.0, sigmas[begin]), sigmas=sigmas)


def _update_euler_ancestral(cfg):
    def update(state, out, row, noise):
        x = state["x"]
        x0 = _x0_sigma(out, x, row["sigma"], row["sigma"], cfg.prediction_type)
        derivative = (x - x0) / row["sigma"]
        return {"x": x + derivative * row["dt"] + noise * row["noise_std"]}

    return update


def plan_heun(cfg, n: int, *, begin: int = 0) -> Plan:
    ts, sigmas, sched = _euler_sigmas(cfg, n, "heun", karras=cfg.use_karras_sigmas)
    S = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]).astype(F32)
    T = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(F32)
    m = len(T)
    second = np.arange(m) % 2 == 1
    sigma_x0 = S[:m]  # first order: sigma_hat = S[j]; second order: sigma_next = S[j]
    dt = np.where(second, 0, S[1 : m + 1] - S[:m])
    rows = dict(t=T, in_div=(S[:m] ** 2 + F32(1)) ** F32(0.5), sigma=sigma_x0, dt=dt, second=second,
                next_a=np.ones(m), next_b=S[1 : m + 1])
    start = 2 * begin
    return _finish("heun", cfg, n, T, rows, sched, start, init_noise_sigma=_sigma_init(cfg, S),
                   start=(1.0, S[start]), sigmas=S)


def _init_heun(cfg, x):
    return {"x": x, "x_prev": jnp.zeros_like(x), "d_prev": jnp.zeros_like(x), "dt_prev": jnp.zeros((), x.dtype)}


def _update_heun(cfg):
    def update(state, out, row, noise):
        x = state["x"]
        x0 = _clip(_x0_sigma(out, x, row["sigma"], row["sigma"], cfg.prediction_type), cfg)
        d = (x - x0) / row["sigma"]
        second = row["second"] > 0
        x_new = jnp.where(second, state["x_prev"] + (state["d_prev"] + d) / 2 * state["dt_prev"], x + d * row["dt"])
        return {
            "x": x_new,
            "x_prev": jnp.where(second, state["x_prev"], x),
            "d_prev": jnp.where(second, state["d_prev"], d),
            "dt_prev": jnp.where(second, state["dt_prev"], row["dt"]),
        }

    return update


# ----------------------------------------------------------------------------------------------
# Multistep exponential integrators: DPM-Solver(++) (Lu et al. 2022) and UniPC (Zhao et al. 2023)
# Both are linear in the sample and the history of converted model outputs, so the plan holds
# the coefficients and the update is a weighted sum.
# ----------------------------------------------------------------------------------------------


def _alpha_sigma(sigma):
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def _lam(sigma):
    alpha, s = _alpha_sigma(np.float64(sigma))
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(s)


def _multistep_sigmas(cfg, n: int, sched: NoiseSchedule, *, final_from_karras: bool):
    ac = sched.alphas_cumprod
    base = train_sigmas(ac)
    log_sigmas = np.log(base)
    lambda_min = cfg.get("lambda_min_clipped", -np.inf)
    if lambda_min != -np.inf:
        alpha_t, sigma_t = np.sqrt(ac), np.sqrt(F32(1) - ac)
        lambdas = np.log(alpha_t) - np.log(sigma_t)
        clipped = int(np.searchsorted(lambdas[::-1], lambda_min))
        ts = multistep_timesteps(cfg, n, cfg.num_train_timesteps - clipped)
    else:
        ts = multistep_timesteps(cfg, n)
    if cfg.use_karras_sigmas:
        sigmas = karras_sigmas(np.flip(base).copy(), n, cfg.get("sigma_min"), cfg.get("sigma_max"))
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


def _conversion(cfg, sigma, *, to_x0: bool):
    """(p, q) with converted = p * x + q * model_output, at noise level `sigma`."""
    a, s = _alpha_sigma(np.float64(sigma))
    kind = cfg.prediction_type
    if to_x0:
        return {"epsilon": (1 / a, -s / a), "v_prediction": (a, -s), "sample": (0.0, 1.0)}[kind]
    return {"epsilon": (0.0, 1.0), "v_prediction": (s, a), "sample": (1 / s, -a / s)}[kind]


def plan_dpmsolver_multistep(cfg, n: int, *, begin: int = 0) -> Plan:
    algo = cfg.algorithm_type
    if algo not in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"):
        raise ConfigError(f"DPM-Solver algorithm_type={algo!r} is not supported (dpmsolver++, sde-dpmsolver++, dpmsolver)")
    if cfg.solver_order not in (1, 2, 3):
        raise ConfigError(f"DPM-Solver solver_order must be 1, 2 or 3, got {cfg.solver_order}")
    if algo == "dpmsolver" and cfg.final_sigmas_type == "zero":
        raise ConfigError(
            "DPM-Solver algorithm_type='dpmsolver' with final_sigmas_type='zero': the noise-prediction update "
            "cannot step to sigma 0 (diffusers refuses this config). Use final_sigmas_type='sigma_min' or "
            "algorithm_type='dpmsolver++'")
    sched = _schedule(cfg, "dpmsolver_multistep")
    ts, sigmas = _multistep_sigmas(cfg, n, sched, final_from_karras=False)
    L = len(ts)
    K = 3
    rows: dict[str, list] = {k: [] for k in ("p", "q", "A", "C", "w", "next_a", "next_b")}
    lower = 0
    for i in range(begin, L):
        final_1 = i == L - 1 and (cfg.euler_at_final or (cfg.lower_order_final and L < 15)
                                  or cfg.final_sigmas_type == "zero")
        final_2 = i == L - 2 and cfg.lower_order_final and L < 15
        if cfg.solver_order == 1 or lower < 1 or final_1:
            order = 1
        elif cfg.solver_order == 2 or lower < 2 or final_2:
            order = 2
        else:
            order = 3
        lower = min(lower + 1, cfg.solver_order) if lower < cfg.solver_order else lower
        p, q = _conversion(cfg, sigmas[i], to_x0=algo != "dpmsolver")
        A, w, C = _dpm_coefficients(algo, cfg.solver_type, order, sigmas, i)
        a_next, s_next = _alpha_sigma(np.float64(sigmas[i + 1]))
        for name, value in (("p", p), ("q", q), ("A", A), ("C", C), ("w", w), ("next_a", a_next), ("next_b", s_next)):
            rows[name].append(value)
    a0, s0 = _alpha_sigma(np.float64(sigmas[begin]))
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["t"], out["in_div"] = ts[begin:], np.ones(L - begin)
    out["noise_std"] = out["C"]
    assert out["w"].shape[1] == K
    return Plan("dpmsolver_multistep", cfg, L - begin, ts[begin:], _f32(out), 1.0, float(a0), float(s0), sigmas,
                sched, begin)


def _dpm_coefficients(algo: str, solver_type: str, order: int, sigmas, i: int):
    """x_next = A x + sum_k w[k] m_k + C noise, with m_0 the newest converted output."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a_t, s_t = _alpha_sigma(np.float64(sigmas[i + 1]))
        a_s, s_s = _alpha_sigma(np.float64(sigmas[i]))
        lam_t, lam_s0 = _lam(sigmas[i + 1]), _lam(sigmas[i])
        h = lam_t - lam_s0
        em, ep = np.exp(-h), np.exp(h)
        noise = 0.0
        if algo == "dpmsolver++":
            A, b0 = s_t / s_s, -a_t * (em - 1.0)
        elif algo == "sde-dpmsolver++":
            A, b0 = s_t / s_s * em, a_t * (1 - np.exp(-2.0 * h))
            noise = s_t * np.sqrt(1.0 - np.exp(-2.0 * h))
        else:
            A, b0 = a_t / a_s, -s_t * (ep - 1.0)
        w = np.zeros(3)
        w[0] = b0
        if order == 1:
            if s_t == 0:  # the last step to sigma 0 lands exactly on the converted output
                A = 0.0
            return A, w, noise
        lam_s1 = _lam(sigmas[i - 1])
        r0 = (lam_s0 - lam_s1) / h
        # D1 = (m0 - m1) / r0
        d1 = np.array([1 / r0, -1 / r0, 0.0])
        if order == 2:
            if algo == "dpmsolver++":
                b1 = -0.5 * a_t * (em - 1.0) if solver_type == "midpoint" else a_t * ((em - 1.0) / h + 1.0)
            elif algo == "sde-dpmsolver++":
                b1 = 0.5 * a_t * (1 - np.exp(-2.0 * h)) if solver_type == "midpoint" else \
                    a_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            else:
                b1 = -0.5 * s_t * (ep - 1.0) if solver_type == "midpoint" else -s_t * ((ep - 1.0) / h - 1.0)
            return A, w + b1 * d1, noise
        lam_s2 = _lam(sigmas[i - 2])
        r1 = (lam_s1 - lam_s2) / h
        d1_0 = d1
        d1_1 = np.array([0.0, 1 / r1, -1 / r1])
        D1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        D2 = (d1_0 - d1_1) / (r0 + r1)
        if algo == "dpmsolver++":
            b1, b2 = a_t * ((em - 1.0) / h + 1.0), -a_t * ((em - 1.0 + h) / h**2 - 0.5)
        elif algo == "sde-dpmsolver++":
            e2 = np.exp(-2.0 * h)
            b1 = a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
            b2 = a_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        else:
            b1, b2 = -s_t * ((ep - 1.0) / h - 1.0), -s_t * ((ep - 1.0 - h) / h**2 - 0.5)
        return A, w + b1 * D1 + b2 * D2, noise


def _init_history(cfg, x, k: int):
    return {"x": x, "hist": jnp.zeros((k,) + x.shape, x.dtype)}


def _update_dpm(cfg):
    def update(state, out, row, noise):
        x = state["x"]
        m = row["p"] * x + row["q"] * out
        hist = jnp.concatenate([m[None], state["hist"][:-1]])
        x = row["A"] * x + jnp.tensordot(row["w"], hist, axes=1) + row["C"] * noise
        return {"x": x, "hist": hist}

    return update


def plan_unipc(cfg, n: int, *, begin: int = 0) -> Plan:
    if cfg.solver_type not in ("bh1", "bh2"):
        raise ConfigError(f"UniPC solver_type must be bh1 or bh2, got {cfg.solver_type!r}")
    sched = _schedule(cfg, "unipc")
    ts, sigmas = _multistep_sigmas(cfg, n, sched, final_from_karras=True)
    L, K = len(ts), cfg.solver_order
    predict_x0 = cfg.predict_x0
    disabled = set(cfg.disable_corrector or ())
    names = ("p", "q", "keep", "cx", "wc", "wt", "px", "wp", "next_a", "next_b")
    rows: dict[str, list] = {k: [] for k in names}
    lower, prev_order = 0, None
    for i in range(begin, L):
        p, q = _conversion(cfg, sigmas[i], to_x0=predict_x0)
        use_corrector = i > begin and (i - 1) not in disabled
        keep, cx, wc, wt = 1.0, 0.0, np.zeros(K), 0.0
        if use_corrector:
            keep = 0.0
            cx, wc, wt = _unipc_corrector(cfg, sigmas, i, prev_order, K)
        order = min(K, L - i) if cfg.lower_order_final else K
        order = min(order, lower + 1)
        if sigmas[i + 1] == 0:
            _check_unipc_final_step(cfg, order, i, L)
        px, wp = _unipc_predictor(cfg, sigmas, i, order, K)
        lower = lower + 1 if lower < K else lower
        prev_order = order
        a_next, s_next = _alpha_sigma(np.float64(sigmas[i + 1]))
        for name, value in zip(names, (p, q, keep, cx, wc, wt, px, wp, a_next, s_next)):
            rows[name].append(value)
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["t"], out["in_div"] = ts[begin:], np.ones(L - begin)
    a0, s0 = _alpha_sigma(np.float64(sigmas[begin]))
    return Plan("unipc", cfg, L - begin, ts[begin:], _f32(out), 1.0, float(a0), float(s0), sigmas, sched, begin)


def _check_unipc_final_step(cfg, order: int, i: int, L: int) -> None:
    """A UniPC step that lands on sigma 0 is finite only as a first-order data-prediction step.

    At sigma 0, lambda is infinite: the higher-order terms divide by it (diffusers returns NaN at
    order 2 and fails on a singular matrix at order 3), and the noise-prediction form multiplies
    0 by inf (NaN). The first-order data-prediction step is exactly the converted output x0.
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


def _unipc_basis(cfg, sigmas, t_idx: int, s0_idx: int, past: list[int], order: int, *, corrector: bool):
    """Shared UniPC algebra: (A, base weight on m0, weights on past D1 terms, weight on model_t)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a_t, s_t = _alpha_sigma(np.float64(sigmas[t_idx]))
        a_s0, s_s0 = _alpha_sigma(np.float64(sigmas[s0_idx]))
        lam_t, lam_s0 = _lam(sigmas[t_idx]), _lam(sigmas[s0_idx])
        h = lam_t - lam_s0
        rks = [(_lam(sigmas[si]) - lam_s0) / h for si in past] + [1.0]
        rks = np.array(rks)
        hh = -h if cfg.predict_x0 else h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        B_h = hh if cfg.solver_type == "bh1" else np.expm1(hh)
        R, b, fact = [], [], 1
        for k in range(1, order + 1):
            R.append(rks ** (k - 1))
            b.append(h_phi_k * fact / B_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        R, b = np.stack(R), np.array(b)
        if corrector:
            rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        elif past:
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            rhos = np.array([])
        scale_out = a_t if cfg.predict_x0 else s_t
        A = s_t / s_s0 if cfg.predict_x0 else a_t / a_s0
        if s_t == 0 and cfg.predict_x0:
            A = 0.0
        return A, -scale_out * h_phi_1, -scale_out * B_h, rhos, rks


def _unipc_predictor(cfg, sigmas, i: int, order: int, K: int):
    past = [i - k for k in range(1, order)]
    A, w_m0, w_res, rhos, rks = _unipc_basis(cfg, sigmas, i + 1, i, past, order, corrector=False)
    w = np.zeros(K)
    w[0] = w_m0
    for k in range(1, order):  # D1_k = (m_k - m_0) / rk_k
        if w_res == 0 or rhos[k - 1] == 0:
            continue
        coef = w_res * rhos[k - 1] / rks[k - 1]
        w[k] += coef
        w[0] -= coef
    return A, w


def _unipc_corrector(cfg, sigmas, i: int, order: int, K: int):
    past = [i - (k + 1) for k in range(1, order)]
    A, w_m0, w_res, rhos, rks = _unipc_basis(cfg, sigmas, i, i - 1, past, order, corrector=True)
    w = np.zeros(K)
    w[0] = w_m0
    for k in range(1, order):
        coef = w_res * rhos[k - 1] / rks[k - 1]
        w[k] += coef
        w[0] -= coef
    wt = w_res * rhos[-1]
    w[0] -= wt
    return A, w, wt


def _init_unipc(cfg, x):
    return {"x": x, "hist": jnp.zeros((cfg.solver_order,) + x.shape, x.dtype)}


def _update_unipc(cfg):
    def update(state, out, row, noise):
        x, hist = state["x"], state["hist"]
        m = row["p"] * x + row["q"] * out
        # corrector: refine this sample using the new output (x_last is the previous corrected sample)
        x = row["keep"] * x + row["cx"] * state.get("x_last", x) + jnp.tensordot(row["wc"], hist, axes=1) + row["wt"] * m
        hist = jnp.concatenate([m[None], hist[:-1]])
        return {"x": row["px"] * x + jnp.tensordot(row["wp"], hist, axes=1), "hist": hist, "x_last": x}

    return update


def _init_unipc_full(cfg, x):
    state = _init_unipc(cfg, x)
    state["x_last"] = jnp.zeros_like(x)
    return state


# ----------------------------------------------------------------------------------------------
# LCM (Luo et al. 2023): consistency-model multistep sampling
# ----------------------------------------------------------------------------------------------


def plan_lcm(cfg, n: int, *, begin: int = 0, strength: float = 1.0, original_inference_steps: int | None = None) -> Plan:
    sched = _schedule(cfg, "lcm")
    ac = sched.alphas_cumprod
    N = cfg.num_train_timesteps
    original = original_inference_steps or cfg.original_inference_steps
    if original > N:
        raise ConfigError(f"original_inference_steps={original} exceeds num_train_timesteps={N}")
    k = N // original
    origin = np.asarray(list(range(1, int(original * strength) + 1))) * k - 1
    if len(origin) // n < 1:
        raise ConfigError(f"LCM: {n} steps is more than the {len(origin)} original timesteps allow")
    if n > original:
        raise ConfigError(f"LCM: num_inference_steps={n} exceeds original_inference_steps={original}")
    origin = origin[::-1].copy()
    ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    final = F32(1.0) if cfg.set_alpha_to_one else ac[0]
    prev = np.append(ts[1:], ts[-1])
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(F32)
    scaled = ts * cfg.timestep_scaling
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / (scaled**2 + 0.25) ** 0.5
    last = np.arange(n) == n - 1
    rows = dict(t=ts, in_div=np.ones(n), sa=np.sqrt(a_t), sb=np.sqrt(F32(1) - a_t), c_skip=c_skip, c_out=c_out,
                sa_prev=np.sqrt(a_prev), noise_std=np.where(last, 0, np.sqrt(F32(1) - a_prev)), last=last,
                next_a=np.where(last, 1, np.sqrt(a_prev)), next_b=np.where(last, 0, np.sqrt(F32(1) - a_prev)))
    return _finish("lcm", cfg, n, ts, rows, sched, begin, init_noise_sigma=1.0,
                   start=(np.sqrt(a_t[begin]), np.sqrt(1 - a_t[begin])))


def _init_lcm(cfg, x):
    return {"x": x, "denoised": x}


def _update_lcm(cfg):
    def update(state, out, row, noise):
        x = state["x"]
        x0, _ = _x0_eps(out, x, row["sa"], row["sb"], cfg.prediction_type)
        x0 = _clip(x0, cfg)
        denoised = row["c_out"] * x0 + row["c_skip"] * x
        x = jnp.where(row["last"] > 0, denoised, row["sa_prev"] * denoised + row["noise_std"] * noise)
        return {"x": x, "denoised": denoised}

    return update


# ----------------------------------------------------------------------------------------------


# Solvers whose update recovers x0 as (x - sb * out) / sa (the timestep-space ones).
_X0_FROM_ROWS = ("ddim", "ddim_inverse", "ddpm", "lcm")

# Config fields that decide whether a schedule has a step at SNR 0 or a singular coefficient.
_SNR_FIELDS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "trained_betas",
               "final_sigmas_type", "lower_order_final", "solver_order")


def _check_x0_recoverable(solver: str, cfg, ts, sa) -> None:
    """An epsilon model at alpha_bar = 0 (SNR 0) gives x0 = (x - eps) / 0: diffusers returns NaN there."""
    if cfg.prediction_type != "epsilon":
        return
    zero = np.flatnonzero(np.asarray(sa) == 0)
    if zero.size == 0:
        return
    k = int(zero[0])
    cause = ("rescale_betas_zero_snr=True" if cfg.get("rescale_betas_zero_snr", False)
             else "the beta schedule (trained_betas)")
    raise ConfigError(
        f"prediction_type='epsilon' cannot run on this schedule with the {solver} solver: {cause} gives "
        f"alpha_bar=0 (SNR 0) at timestep {int(ts[k])} (model evaluation {k + 1} of {len(ts)}), where "
        "x0 = (x - sqrt(1 - alpha_bar) * epsilon) / sqrt(alpha_bar) divides by zero (diffusers' "
        f"{SOLVER_TABLE[solver].class_name} returns NaN there). Use prediction_type='v_prediction' (a model "
        "trained for it), rescale_betas_zero_snr=False, or a solver that clamps the last alpha_bar to 2**-24 "
        "(euler, euler_a, dpmpp_2m, unipc)")


def _check_finite(plan: "Plan") -> None:
    """The last host-side guard: a plan with a NaN or infinite coefficient never reaches the sampler."""
    fields = ", ".join(f for f in _SNR_FIELDS if f in plan.config)
    scalars = {"init_noise_sigma": plan.init_noise_sigma, "start_a": plan.start_a, "start_b": plan.start_b}
    for name, value in scalars.items():
        if not np.isfinite(value):
            raise ConfigError(f"the {plan.solver} plan's {name} is {value}: this scheduler config cannot be "
                              f"sampled by {plan.solver} (check {fields})")
    for name, values in plan.rows.items():
        values = np.asarray(values)
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1) if values.size else np.zeros(0, bool)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ConfigError(
                f"the {plan.solver} plan's coefficient {name!r} is not finite ({values[k].tolist()}) at model "
                f"evaluation {k + 1} of {len(values)} (timestep {plan.timesteps[k]}): sampling would return "
                f"NaN. This scheduler config cannot be sampled by {plan.solver} (check {fields})")


def _finish(solver, cfg, n, ts, rows, sched, begin, *, init_noise_sigma, start, sigmas=None) -> Plan:
    rows = {k: np.asarray(v)[begin:] for k, v in rows.items()}
    if solver in _X0_FROM_ROWS:
        _check_x0_recoverable(solver, cfg, np.asarray(ts)[begin:], rows["sa"])
    return Plan(solver, cfg, n - begin if solver != "heun" else n - begin // 2, np.asarray(ts)[begin:], _f32(rows),
                float(init_noise_sigma), float(start[0]), float(start[1]), sigmas, sched, begin)


def _simple_init(cfg, x):
    return {"x": x}


PLANNERS: dict[str, Callable[..., Plan]] = {
    "ddim": plan_ddim,
    "ddim_inverse": plan_ddim_inverse,
    "ddpm": plan_ddpm,
    "pndm": plan_pndm,
    "euler": plan_euler,
    "euler_ancestral": plan_euler_ancestral,
    "heun": plan_heun,
    "dpmsolver_multistep": plan_dpmsolver_multistep,
    "unipc": plan_unipc,
    "lcm": plan_lcm,
}

UPDATES = {
    "ddim": _update_ddim,
    "ddim_inverse": _update_ddim,
    "ddpm": _update_ddpm,
    "pndm": _update_pndm,
    "euler": _update_euler,
    "euler_ancestral": _update_euler_ancestral,
    "heun": _update_heun,
    "dpmsolver_multistep": _update_dpm,
    "unipc": _update_unipc,
    "lcm": _update_lcm,
}

INITS = {
    "ddim": _simple_init,
    "ddim_inverse": _simple_init,
    "ddpm": _simple_init,
    "pndm": _init_pndm,
    "euler": _simple_init,
    "euler_ancestral": _simple_init,
    "heun": _init_heun,
    "dpmsolver_multistep": lambda cfg, x: _init_history(cfg, x, 3),
    "unipc": _init_unipc_full,
    "lcm": _init_lcm,
}

SOLVERS = tuple(PLANNERS)


def make_plan(
    config: SchedulerConfig | dict | None,
    num_inference_steps: int,
    solver: str | None = None,
    *,
    strength: float = 1.0,
    **options: Any,
) -> Plan:
    """The plan for `num_inference_steps` steps of `solver` under a diffusers scheduler config.

    `solver` defaults to the config's own class (`PNDMScheduler` -> "pndm"); aliases such as
    "dpmpp_2m_karras" or "euler_a" are accepted. `strength` < 1 starts part-way, as diffusers'
    img2img pipelines do. Extra `options` go to the planner (`eta` for DDIM; `s_churn`... for Euler).
    """
    if config is None:
        config = SchedulerConfig()
    elif isinstance(config, dict):
        config = SchedulerConfig.from_dict(config)
    name, cfg = config.resolve(solver)
    begin = 0
    if strength != 1.0:
        if name == "lcm":
            options["strength"] = strength
        else:
            begin = strength_start(num_inference_steps, strength)
            if begin >= num_inference_steps:
                raise ConfigError(f"strength={strength} with {num_inference_steps} steps leaves no step to run")
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # Plan refuses non-finite rows
            return PLANNERS[name](cfg, num_inference_steps, begin=begin, **options)
    except TypeError as e:
        raise ConfigError(f"solver {name!r} does not take options {sorted(options)}: {e}") from e
