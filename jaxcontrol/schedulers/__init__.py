"""Noise schedules, diffusers-compatible scheduler configs and solver plans."""

from .config import ALIASES, CLASS_TO_SOLVER, SOLVER_DEFAULTS, SOLVER_TABLE, SchedulerConfig, SolverSpec
from .noise import NoiseSchedule, make_betas
from .solvers import PLANNERS, SOLVERS, Plan, Solver, make_plan, register, strength_start, unregister

__all__ = [
    "ALIASES",
    "CLASS_TO_SOLVER",
    "NoiseSchedule",
    "PLANNERS",
    "Plan",
    "SOLVERS",
    "SOLVER_DEFAULTS",
    "SOLVER_TABLE",
    "SchedulerConfig",
    "Solver",
    "SolverSpec",
    "make_betas",
    "make_plan",
    "register",
    "strength_start",
    "unregister",
]
