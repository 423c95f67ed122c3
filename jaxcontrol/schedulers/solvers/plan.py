"""`Plan`, the host-side table a sampling run walks, and `Solver`, the record that names a solver's parts.

A solver is split in two:

* its **plan** function, run once on the host with numpy: the timestep the model sees at each model
  evaluation, the input scaling, and every scalar coefficient of the update (orders, warm-up and
  final steps, Karras sigmas, PRK/PLMS bookkeeping). These equal the values diffusers' scheduler
  of the same name computes; the timesteps and sigmas are bit-identical to its own;
* its **update** `(state, model_output, row, noise) -> state`, a short pure function of arrays that
  a `lax.scan` runs once per model evaluation. `row` is the plan's slice for that evaluation.

So one compiled scan body serves every step: nothing is unrolled, and the number of steps only
changes the length of the arrays the scan walks over.

Every plan has the rows the sampler reads: `t` (the model's timestep), `in_div` (the model is
called on `x / in_div`, the variance-preserving x_t), `next_a`, `next_b` (the noise level after
the evaluation, `x = next_a * x0 + next_b * noise`, for inpainting) and, for a stochastic solver,
`noise_std` (the weight of the injected standard-normal noise). The other rows are the solver's
own coefficients, named after its paper.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from ...errors import ConfigError
from ..config import SOLVER_TABLE
from ..noise import NoiseSchedule

F32 = np.float32

# Config fields that decide whether a schedule has a step at SNR 0 or a singular coefficient.
_SNR_FIELDS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "trained_betas",
               "final_sigmas_type", "lower_order_final", "solver_order")


def x_only(cfg, x) -> dict:
    """The state of a solver that carries nothing but the sample."""
    return {"x": x}


def final_x(state):
    """The sample a run returns by default: `state["x"]` (NHWC float32)."""
    return state["x"]


@dataclasses.dataclass(frozen=True)
class Solver:
    """One solver: what `make_plan` and the sampler call, all in one place.

    `plan(cfg, num_inference_steps, *, begin=0, **options) -> Plan` builds the host-side table from
    the resolved config (`config.SchedulerConfig.resolve`); `begin` is the first step (img2img).
    `update(cfg) -> (state, model_output, row, noise) -> state` is the jittable step.
    `init(cfg, x) -> state` is the scan's initial state (x: the first evaluation's latents, NHWC
    float32); `output(state)` is the sample the run returns.
    `strength_sets_timesteps`: img2img `strength` goes to `plan` (LCM picks its timesteps from the
    first `strength` fraction of its original schedule) instead of skipping the first steps.
    """

    name: str
    plan: Callable[..., Plan]
    update: Callable[[Any], Callable]
    init: Callable[[Any, Any], dict] = x_only
    output: Callable[[dict], Any] = final_x
    strength_sets_timesteps: bool = False


# The registry: solver name -> Solver. `jaxcontrol.schedulers.solvers` fills it, one line per solver.
REGISTRY: dict[str, Solver] = {}


def get_solver(name: str) -> Solver:
    """The registered `Solver` called `name` (e.g. "ddim"); raises `ConfigError` if there is none."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown solver {name!r}; registered: {sorted(REGISTRY)}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything a sampling run needs besides the model and the noise.

    `rows` maps names to arrays with one entry per model evaluation (leading axis); the scan walks
    over them. `timesteps` is what diffusers' `scheduler.timesteps` holds for the same run.
    `start_a`, `start_b` put clean latents at the first evaluation's noise level
    (`x = start_a * x0 + start_b * noise`, for img2img); `rows["next_a"]`, `rows["next_b"]` give the
    level after each evaluation (for inpainting by partial diffusion). Raises `ConfigError` when a
    scalar or a row holds NaN or infinity.
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
        _check_rows(self)
        _check_finite(self)

    @property
    def num_evals(self) -> int:
        """Model evaluations in the run: len(timesteps) (2 per step but the last for Heun, n for the others)."""
        return len(self.timesteps)

    @property
    def prediction_type(self) -> str:
        """The model output the plan expects: "epsilon", "v_prediction" or "sample" (from the resolved config)."""
        return self.config.prediction_type

    @property
    def stochastic(self) -> bool:
        """True when some evaluation injects noise (a nonzero `noise_std` row), so a run needs a PRNG key."""
        return bool(np.any(self.rows.get("noise_std", np.zeros(1)) != 0))

    def update_fn(self) -> Callable:
        """The solver's jittable step `(state, model_output, row, noise) -> state` for this plan's config."""
        return get_solver(self.solver).update(self.config)

    def init_state(self, x):
        """The scan's initial state dict for latents `x` (NHWC float32, at the first evaluation's noise level)."""
        return get_solver(self.solver).init(self.config, x)

    def output(self, state):
        """The sample the run returns from the scan's final state (NHWC float32; LCM's denoised sample)."""
        return get_solver(self.solver).output(state)


def as_f32(rows: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each row as a float32 numpy array (the dtype the scan carries the plan in)."""
    return {k: np.asarray(v, F32) for k, v in rows.items()}


def finish(solver: str, cfg, timesteps, rows: dict, schedule: NoiseSchedule, begin: int, *,
           num_inference_steps: int, init_noise_sigma: float, start, sigmas=None) -> Plan:
    """The plan from rows computed for the whole run: `timesteps` and `rows` are cut at `begin`."""
    rows = {k: np.asarray(v)[begin:] for k, v in rows.items()}
    return Plan(solver, cfg, num_inference_steps, np.asarray(timesteps)[begin:], as_f32(rows),
                float(init_noise_sigma), float(start[0]), float(start[1]), sigmas, schedule, begin)


def refuse_epsilon_at_snr_zero(solver: str, cfg, timesteps, alpha_t) -> None:
    """An epsilon model at alpha_bar = 0 (SNR 0) gives x0 = (x - eps) / 0: diffusers returns NaN there.

    For the solvers that recover x0 as (x_t - sigma_t * eps) / alpha_t; raises `ConfigError` naming
    the first such timestep and the config field that caused it.
    """
    if cfg.prediction_type != "epsilon":
        return
    zero = np.flatnonzero(np.asarray(alpha_t) == 0)
    if zero.size == 0:
        return
    k = int(zero[0])
    cause = "rescale_betas_zero_snr=True" if cfg.rescale_betas_zero_snr else "the beta schedule (trained_betas)"
    raise ConfigError(
        f"prediction_type='epsilon' cannot run on this schedule with the {solver} solver: {cause} gives "
        f"alpha_bar=0 (SNR 0) at timestep {int(timesteps[k])} (model evaluation {k + 1} of {len(timesteps)}), "
        "where x0 = (x - sqrt(1 - alpha_bar) * epsilon) / sqrt(alpha_bar) divides by zero (diffusers' "
        f"{SOLVER_TABLE[solver].class_name} returns NaN there). Use prediction_type='v_prediction' (a model "
        "trained for it), rescale_betas_zero_snr=False, or a solver that clamps the last alpha_bar to 2**-24 "
        "(euler, euler_a, dpmpp_2m, unipc)")


# The rows `sampler.sample` reads at every evaluation, whatever the solver: the timestep, the input
# scaling, and the noise level after the evaluation (for inpainting by partial diffusion).
REQUIRED_ROWS = ("t", "in_div", "next_a", "next_b")


def _check_rows(plan: Plan) -> None:
    """A plan names every row the sampler reads, and its rows have one entry per evaluation."""
    missing = [r for r in REQUIRED_ROWS if r not in plan.rows]
    if missing:
        raise ConfigError(f"the {plan.solver} plan has no rows {missing}: every plan needs {list(REQUIRED_ROWS)} "
                          f"(see jaxcontrol.schedulers.solvers.plan.Plan)")
    lengths = {name: len(np.asarray(v)) for name, v in plan.rows.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"the {plan.solver} plan's rows differ in length (one entry per model evaluation): {lengths}")


def _check_finite(plan: Plan) -> None:
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
