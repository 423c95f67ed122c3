"""Scheduler configs: diffusers' `scheduler_config.json`, read without a translation table.

A config is a class name plus the fields it sets. Fields it does not set take the default of the
solver that runs it, exactly as `SomeScheduler.from_config(other.config)` does in diffusers, so a
DDIM config can drive the Euler solver and get Euler's `timestep_spacing` default.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError

_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=0,
)
_COMMON = {**_SCHEDULE, "rescale_betas_zero_snr": False}
_THRESHOLDING = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_FLOW = dict(use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False, time_shift_type="exponential")

# diffusers' fix for sigma-space classes on a zero-terminal-SNR schedule: the last alpha_bar (0) is
# replaced by the smallest positive float16 subnormal, so the first sigma is 4096 instead of inf.
CLAMPED_TERMINAL_ALPHA_BAR = 2.0**-24


@dataclass(frozen=True)
class SolverSpec:
    """What one diffusers scheduler class reads from a config, and what it does at SNR 0.

    `fields` are exactly the fields the class's `__init__` takes (with its defaults): a config field
    outside them is ignored, as diffusers' `from_config` ignores it (PNDM and Heun take no
    `rescale_betas_zero_snr`, so they run a zero-SNR config on the plain schedule). `sigma_fields`
    are read by `set_timesteps` only when present in the config (`hasattr(self.config, ...)`).
    `terminal_alpha_bar` is what the class sets `alphas_cumprod[-1]` to when it honours
    `rescale_betas_zero_snr` (None: the last alpha_bar stays 0).
    """

    class_name: str
    fields: dict[str, Any]
    terminal_alpha_bar: float | None = None
    sigma_fields: tuple[str, ...] = ()


_SIGMA_FIELDS = ("sigma_min", "sigma_max")

# The one table: solver -> diffusers class, the fields it honours, its zero-SNR treatment.
SOLVER_TABLE: dict[str, SolverSpec] = {
    "ddpm": SolverSpec("DDPMScheduler", {
        **_COMMON, **_THRESHOLDING, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0}),
    "ddim": SolverSpec("DDIMScheduler", {
        **_COMMON, **_THRESHOLDING, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True}),
    "ddim_inverse": SolverSpec("DDIMInverseScheduler", {
        **_COMMON, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True}),
    "pndm": SolverSpec("PNDMScheduler", {**_SCHEDULE, "skip_prk_steps": False, "set_alpha_to_one": False}),
    "euler": SolverSpec("EulerDiscreteScheduler", {
        **_COMMON, "timestep_spacing": "linspace", "interpolation_type": "linear", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
        "timestep_type": "discrete", "final_sigmas_type": "zero"}, CLAMPED_TERMINAL_ALPHA_BAR),
    "euler_ancestral": SolverSpec("EulerAncestralDiscreteScheduler", {**_COMMON, "timestep_spacing": "linspace"},
                                  CLAMPED_TERMINAL_ALPHA_BAR),
    "heun": SolverSpec("HeunDiscreteScheduler", {
        **_SCHEDULE, "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "linspace",
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "clip_sample": False, "clip_sample_range": 1.0}, sigma_fields=_SIGMA_FIELDS),
    "dpmsolver_multistep": SolverSpec("DPMSolverMultistepScheduler", {
        **_COMMON, **_THRESHOLDING, **_FLOW, "timestep_spacing": "linspace", "solver_order": 2,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_lu_lambdas": False, "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf, "variance_type": None}, CLAMPED_TERMINAL_ALPHA_BAR, _SIGMA_FIELDS),
    "unipc": SolverSpec("UniPCMultistepScheduler", {
        **_COMMON, **_THRESHOLDING, **_FLOW, "timestep_spacing": "linspace", "solver_order": 2, "predict_x0": True,
        "solver_type": "bh2", "lower_order_final": True, "disable_corrector": (), "solver_p": None,
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "final_sigmas_type": "zero", "sigma_min": None, "sigma_max": None, "shift_terminal": None},
        CLAMPED_TERMINAL_ALPHA_BAR),
    "lcm": SolverSpec("LCMScheduler", {
        **_COMMON, **_THRESHOLDING, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
        "timestep_scaling": 10.0}),
}

# What a class does about a field its `__init__` does not take: the behaviour its code hardcodes.
# Planners read every field as `cfg.<field>`; a field the running class does not take answers with
# this value (see `ResolvedConfig`), so no planner decides for itself whether a field applies.
NOT_TAKEN: dict[str, Any] = {
    "rescale_betas_zero_snr": False,  # PNDM, Heun: the plain schedule
    "clip_sample": False,  # Euler, Euler ancestral, PNDM, DPM-Solver, UniPC: x0 is never clipped
    "use_karras_sigmas": False,  # Euler ancestral: the interpolated sigma ladder
    "final_sigmas_type": "zero",  # Euler ancestral, Heun: the ladder ends at sigma 0
    "lambda_min_clipped": -math.inf,  # UniPC: no log-SNR clipping
    "sigma_min": None,  # classes without Karras sigmas
    "sigma_max": None,
}

# Derived views of the table (`add_solver` keeps them in step with it).
SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {}
CLASS_TO_SOLVER: dict[str, str] = {}
SOLVER_TO_CLASS: dict[str, str] = {}


def _derive(name: str, spec: SolverSpec) -> None:
    SOLVER_DEFAULTS[name] = {**spec.fields, **{k: None for k in spec.sigma_fields}}
    CLASS_TO_SOLVER[spec.class_name] = name
    SOLVER_TO_CLASS[name] = spec.class_name


for _name, _spec in SOLVER_TABLE.items():
    _derive(_name, _spec)

# Short names users type (`infer.py --scheduler`), mapped to solvers and config overrides.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("ddpm", {}),
    "ddim": ("ddim", {}),
    "pndm": ("pndm", {}),
    "plms": ("pndm", {"skip_prk_steps": True}),
    "euler": ("euler", {}),
    "euler_a": ("euler_ancestral", {}),
    "euler_ancestral": ("euler_ancestral", {}),
    "heun": ("heun", {}),
    "dpmpp_2m": ("dpmsolver_multistep", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("dpmsolver_multistep", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "use_karras_sigmas": True}),
    "dpmsolver_multistep": ("dpmsolver_multistep", {}),
    "unipc": ("unipc", {}),
    "lcm": ("lcm", {}),
    "ddim_inverse": ("ddim_inverse", {}),
}


def add_solver(name: str, spec: SolverSpec, aliases: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Add a row to `SOLVER_TABLE` (and its derived views) for a solver defined outside this package.

    `aliases` maps extra short names to config overrides; `name` itself always becomes an alias.
    Raises `ConfigError` when `name` or the spec's class is already in the table, or a name is
    already an alias.
    """
    if name in SOLVER_TABLE or spec.class_name in CLASS_TO_SOLVER:
        raise ConfigError(f"solver {name!r} ({spec.class_name}) is already in the scheduler table")
    taken = sorted({name, *(aliases or {})} & set(ALIASES))
    if taken:
        raise ConfigError(f"solver names {taken} are already aliases of {[ALIASES[a][0] for a in taken]}")
    SOLVER_TABLE[name] = spec
    _derive(name, spec)
    ALIASES[name] = (name, {})
    for alias, overrides in (aliases or {}).items():
        ALIASES[alias] = (name, dict(overrides))


def remove_solver(name: str) -> None:
    """Undo `add_solver`: the table row, its derived views and every alias that names it."""
    spec = SOLVER_TABLE.pop(name)
    SOLVER_DEFAULTS.pop(name)
    CLASS_TO_SOLVER.pop(spec.class_name)
    SOLVER_TO_CLASS.pop(name)
    for alias in [a for a, (target, _) in ALIASES.items() if target == name]:
        del ALIASES[alias]

# Values we read but do not implement: anything but these raises a ConfigError naming the field.
_SUPPORTED_ONLY = {
    "thresholding": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "timestep_type": ("discrete",),
    "solver_p": (None,),
    "interpolation_type": ("linear",),
    "use_dynamic_shifting": (False,),
    "shift_terminal": (None,),
}


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler config: the class it names and the fields it sets."""

    class_name: str | None = None
    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SchedulerConfig":
        """A config from a parsed scheduler_config.json (a dict, as diffusers' `ConfigMixin` writes it).

        `_class_name` becomes `class_name`, the other `_`-prefixed keys are dropped, lists become tuples.
        Nothing is validated until `resolve`.
        """
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if not k.startswith("_")}
        return cls(raw.get("_class_name"), values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SchedulerConfig":
        """Read a diffusers scheduler_config.json, or the one in folder `path` or its `scheduler/` subfolder.

        Raises `ConfigError` naming the path when no such file is found, or it cannot be read or parsed as JSON.
        """
        path = Path(path)
        if path.is_dir():
            for candidate in (path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
                if candidate.is_file():
                    path = candidate
                    break
            else:
                raise ConfigError(f"{path}: no scheduler_config.json in this folder or its scheduler/ subfolder")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the scheduler config: {e}") from e
        return cls.from_dict(raw)

    def replace(self, **changes: Any) -> "SchedulerConfig":
        """A copy with the fields in `changes` set (same class_name); not validated until `resolve`."""
        return SchedulerConfig(self.class_name, {**self.values, **changes})

    @property
    def default_solver(self) -> str:
        """The solver for `class_name` (e.g. `EulerDiscreteScheduler` -> "euler"); "ddim" when none is named.

        Raises `ConfigError` for a diffusers scheduler class that is not implemented.
        """
        if self.class_name is None:
            return "ddim"
        if self.class_name not in CLASS_TO_SOLVER:
            raise ConfigError(
                f"scheduler class {self.class_name!r} is not implemented; choose a solver from {sorted(ALIASES)}"
            )
        return CLASS_TO_SOLVER[self.class_name]

    def resolve(self, solver: str | None = None) -> tuple[str, "ResolvedConfig"]:
        """The solver name (an alias such as `dpmpp_2m_karras` is expanded) and its full settings."""
        solver = solver or self.default_solver
        if solver not in ALIASES:
            raise ConfigError(f"unknown solver {solver!r}; expected one of {sorted(ALIASES)}")
        name, overrides = ALIASES[solver]
        # only the fields the solver's diffusers class honours; the others are ignored, as there
        settings = dict(SOLVER_DEFAULTS[name])
        settings.update({k: v for k, v in self.values.items() if k in settings})
        settings.update(overrides)
        for key, allowed in _SUPPORTED_ONLY.items():
            if key in settings and settings[key] not in allowed:
                raise ConfigError(
                    f"scheduler config field {key}={settings[key]!r} is not supported by the {name} solver "
                    f"(supported: {allowed})"
                )
        if settings["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"prediction_type={settings['prediction_type']!r} is not supported")
        if settings["timestep_spacing"] not in ("leading", "trailing", "linspace"):
            raise ConfigError(f"timestep_spacing={settings['timestep_spacing']!r} is not one of leading, trailing, linspace")
        _check_numbers(settings)
        return name, ResolvedConfig(settings)


def _check_numbers(settings: Mapping[str, Any]) -> None:
    """The numeric fields every schedule is built from: a `ConfigError` naming the field."""

    def integer(key, lo):
        v = settings.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ConfigError(f"scheduler config field {key}={v!r} must be an integer >= {lo}")

    integer("num_train_timesteps", 2)
    integer("steps_offset", 0)
    integer("solver_order", 1)
    integer("original_inference_steps", 1)
    for key in ("beta_start", "beta_end"):
        v = settings.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
            raise ConfigError(f"scheduler config field {key}={v!r} must be a number in [0, 1)")


def terminal_alpha_bar(solver: str, cfg: Mapping[str, Any]) -> float | None:
    """The value `solver`'s diffusers class gives `alphas_cumprod[-1]` under `cfg` (None: unchanged)."""
    if not cfg.get("rescale_betas_zero_snr", False):
        return None
    return SOLVER_TABLE[solver].terminal_alpha_bar


class ResolvedConfig(dict):
    """The fields a solver's diffusers class takes, with attribute access (`cfg.beta_schedule`).

    The dict holds exactly the fields the class honours (`SOLVER_TABLE`), which is what a plan
    records. Attribute access also answers the fields of `NOT_TAKEN` the class does not take, with
    the behaviour the class hardcodes (`cfg.clip_sample` is False for Euler); any other missing
    field raises AttributeError.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            if name in NOT_TAKEN:
                return NOT_TAKEN[name]
            raise AttributeError(name) from e
