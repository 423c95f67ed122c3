"""Noise schedules, diffusers-compatible scheduler configs and solver plans."""

from .config import ALIASES, CLASS_TO_SOLVER, SOLVER_DEFAULTS, SOLVER_TABLE, SchedulerConfig, SolverSpec
from .noise import NoiseSchedule, make_betas
from .solvers import PLANNERS, SOLVERS, Plan, make_plan, strength_start

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
    "SolverSpec",
    "make_betas",
    "make_plan",
    "strength_start",
]
