"""Solvers as host-side plans plus pure per-evaluation updates; `make_plan` is the entry point.

One module per solver holds its `plan` and `update` (and `init` / `output` where it carries more
than the sample) and ends in a `Solver` record; the registry below lists them, one line each. The
diffusers config fields each solver's class honours are one table, `config.SOLVER_TABLE`; planners
read fields only from the config it resolves. See `plan.py` for the plan/update split.

Adding a solver: a module here with its `plan`/`update` and `SOLVER = Solver(...)`, a line below
and a `SOLVER_TABLE` row; from outside the package, `register(solver, spec)` does both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterator

import numpy as np

from ...errors import ConfigError
from ..config import SOLVER_TABLE, SchedulerConfig, SolverSpec, add_solver, remove_solver
from . import (
    ddim,
    ddim_inverse,
    ddpm,
    dpmsolver_multistep,
    euler,
    euler_ancestral,
    heun,
    lcm,
    pndm,
    unipc,
)
from .common import x0_eps
from .plan import REGISTRY, Plan, Solver, get_solver

# ---- the registry: one line per solver ----
BUILTIN = (
    ddim.SOLVER,
    ddim_inverse.SOLVER,
    ddpm.SOLVER,
    pndm.SOLVER,
    euler.SOLVER,
    euler_ancestral.SOLVER,
    heun.SOLVER,
    dpmsolver_multistep.SOLVER,
    unipc.SOLVER,
    lcm.SOLVER,
)


def register(solver: Solver, spec: SolverSpec | None = None, aliases: Mapping[str, Mapping[str, Any]] | None = None):
    """Make `solver` available to `make_plan` under `solver.name`; returns it.

    `spec` is its row for `config.SOLVER_TABLE` (the diffusers class it follows and the fields it
    honours), required unless the table has the row already; `aliases` are extra short names with
    config overrides. Raises `ConfigError` when the name is taken or the table row is missing.
    """
    if solver.name in REGISTRY:
        raise ConfigError(f"solver {solver.name!r} is already registered")
    if spec is not None:
        add_solver(solver.name, spec, aliases)
        _ADDED_ROWS.add(solver.name)
    elif solver.name not in SOLVER_TABLE:
        raise ConfigError(f"solver {solver.name!r} has no row in SOLVER_TABLE: pass its SolverSpec")
    REGISTRY[solver.name] = solver
    return solver


def unregister(name: str) -> None:
    """Remove a solver added by `register`, with the table row and aliases `register` added for it."""
    if any(s.name == name for s in BUILTIN):
        raise ConfigError(f"solver {name!r} is built in and cannot be removed")
    del REGISTRY[name]
    if name in _ADDED_ROWS:
        _ADDED_ROWS.discard(name)
        remove_solver(name)


_ADDED_ROWS: set[str] = set()  # table rows added by `register`


for _solver in BUILTIN:
    register(_solver)


class _Planners(Mapping):
    """`PLANNERS[name]`: the registered solvers' plan functions (a live view of the registry)."""

    def __getitem__(self, name: str):
        return REGISTRY[name].plan

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


PLANNERS = _Planners()
SOLVERS = tuple(REGISTRY)  # the built-in solvers, in registry order

# The planners under their former names.
plan_ddim = ddim.plan
plan_ddim_inverse = ddim_inverse.plan
plan_ddpm = ddpm.plan
plan_pndm = pndm.plan
plan_euler = euler.plan
plan_euler_ancestral = euler_ancestral.plan
plan_heun = heun.plan
plan_dpmsolver_multistep = dpmsolver_multistep.plan
plan_unipc = unipc.plan
plan_lcm = lcm.plan
_x0_eps = x0_eps


def strength_start(num_inference_steps: int, strength: float) -> int:
    """diffusers' `get_timesteps`: the first step index for img2img at `strength` in [0, 1].

    Raises `ConfigError` for a strength outside [0, 1].
    """
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must be in [0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0)


def make_plan(
    config: SchedulerConfig | dict | None,
    num_inference_steps: int,
    solver: str | None = None,
    *,
    strength: float = 1.0,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    **options: Any,
) -> Plan:
    """The plan for `num_inference_steps` steps of `solver` under a diffusers scheduler config.

    `solver` defaults to the config's own class (`PNDMScheduler` -> "pndm"); aliases such as
    "dpmpp_2m_karras" or "euler_a" are accepted. `strength` < 1 starts part-way, as diffusers'
    img2img pipelines do. `denoising_end` / `denoising_start` (fractions in (0, 1), SDXL's base ->
    refiner hand-off) keep only the evaluations at timesteps >= / < the cutoff
    round(N * (1 - fraction)), as diffusers' SDXL pipelines do (see `hand_off`).
    Extra `options` go to the planner (`eta` for DDIM; `s_churn`... for Euler).
    Raises `ConfigError` for an unknown solver or option, a field value the solver does not
    support, or a schedule it cannot sample.
    """
    if config is None:
        config = SchedulerConfig()
    elif isinstance(config, dict):
        config = SchedulerConfig.from_dict(config)
    name, cfg = config.resolve(solver)
    hooks = get_solver(name)
    begin = 0
    if strength != 1.0:
        if hooks.strength_sets_timesteps:
            options["strength"] = strength
        else:
            begin = strength_start(num_inference_steps, strength)
            if begin >= num_inference_steps:
                raise ConfigError(f"strength={strength} with {num_inference_steps} steps leaves no step to run")
    if denoising_start is not None:
        if strength != 1.0:
            raise ConfigError("strength and denoising_start do not combine: denoising_start sets the start")
        if hooks.strength_sets_timesteps:
            raise ConfigError(f"denoising_start is not supported by the {name} solver (it picks its own timesteps)")
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # Plan refuses non-finite rows
            plan = hooks.plan(cfg, num_inference_steps, begin=begin, **options)
            if denoising_start is None and denoising_end is None:
                return plan
            return hand_off(plan, hooks, cfg, num_inference_steps, options, denoising_start, denoising_end)
    except TypeError as e:
        raise ConfigError(f"solver {name!r} does not take options {sorted(options)}: {e}") from e


def _cutoff(plan: Plan, fraction: float) -> int:
    n = plan.schedule.num_train_timesteps
    return int(round(n - fraction * n))


def hand_off(plan: Plan, hooks, cfg, num_inference_steps: int, options: dict, start: float | None,
             end: float | None) -> Plan:
    """`plan` cut for SDXL's ensemble of expert denoisers (diffusers' `denoising_start` /
    `denoising_end`): with the cutoff c = round(N - fraction * N), `end` keeps the evaluations at
    timesteps >= c (the base's part), `start` those at timesteps < c (the refiner's; for a
    second-order solver an even count grows by one, as diffusers does). Raises `ConfigError`
    when nothing is left to run."""
    ts = np.asarray(plan.timesteps)
    begin, stop = 0, len(ts)
    if start is not None:
        count = int(np.sum(ts < _cutoff(plan, start)))
        if hooks.name == "heun" and count % 2 == 0:  # diffusers: scheduler.order == 2
            count += 1
        begin = len(ts) - count
    if end is not None:
        stop = int(np.sum(ts >= _cutoff(plan, end)))
    if stop <= begin:
        raise ConfigError(f"denoising_start={start} / denoising_end={end} leave no step of the "
                          f"{num_inference_steps} to run")
    if begin:
        # the step whose first evaluation is `begin` (Heun's steps take two evaluations): its plan
        # starts there with the solver's own start-up (multistep solvers restart at first order)
        count, late = len(ts) - begin, plan
        for step in range(1, num_inference_steps):  # (make_plan's np.errstate is in force here)
            late = hooks.plan(cfg, num_inference_steps, begin=step, **options)
            if len(late.timesteps) <= count:
                break
        if len(late.timesteps) != count:
            raise ConfigError(f"denoising_start={start}: the {hooks.name} solver cannot start at evaluation "
                              f"{begin} of {len(ts)} (no step begins there)")
        plan = late
        stop -= begin
    if stop < len(plan.timesteps):
        plan = dataclasses.replace(plan, timesteps=np.asarray(plan.timesteps)[:stop],
                                   rows={k: np.asarray(v)[:stop] for k, v in plan.rows.items()})
    return plan

