"""Solver parity against diffusers' schedulers, driven by a deterministic stand-in model.

The stand-in prediction is `a x + b (t / 1000) cos(x)`: it depends on the sample and on the
timestep, so a wrong input scaling, timestep or coefficient shows. The diffusers loop is the
textbook one (`scale_model_input`, model, `step`) with `randn_tensor` replaced by a list of
pre-drawn normals, so stochastic solvers see the same injected noise as ours.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..sampler import initial_latents, sample
from ..schedulers import SchedulerConfig, make_plan

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
A, B = 0.3, 0.4


def stand_in_np(x: np.ndarray, t: float) -> np.ndarray:
    """The stand-in model `A x + B (t / 1000) cos(x)` in numpy, float32 (diffusers' side)."""
    return (A * x + B * (np.float32(t) / 1000.0) * np.cos(x)).astype(np.float32)


def stand_in(x, t, cond):
    """The stand-in model as a score function for `sample` (our side); `cond` is ignored."""
    return A * x + B * (jnp.asarray(t, jnp.float32) / 1000.0) * jnp.cos(x)


@dataclass(frozen=True)
class SolverCase:
    """A diffusers scheduler class and config against our solver, with options for `make_plan` and `step`."""

    class_name: str
    solver: str
    config: dict = field(default_factory=dict)
    steps: int = 10
    plan_options: dict = field(default_factory=dict)
    step_options: dict = field(default_factory=dict)
    # zero terminal SNR puts the first sigma at 4096, where one float32 ulp is 2.4e-4: the first
    # Euler step cancels at that magnitude in both implementations, so only that case gets 5e-5
    tolerance: float = 1e-5

    @property
    def id(self) -> str:
        """A test id: solver[steps](config and plan options)."""
        extra = ",".join(f"{k}={v}" for k, v in {**self.config, **self.plan_options}.items())
        return f"{self.solver}[{self.steps}]" + (f"({extra})" if extra else "")


SOLVER_CASES = [
    SolverCase("DDIMScheduler", "ddim", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    SolverCase("DDIMScheduler", "ddim", {"clip_sample": False}, plan_options={"eta": 0.7}, step_options={"eta": 0.7}),
    SolverCase("DDIMScheduler", "ddim", {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                         "clip_sample": True}),
    SolverCase("DDPMScheduler", "ddpm", {"clip_sample": False}, steps=12),
    SolverCase("DDPMScheduler", "ddpm", {"beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_large",
                                         "timestep_spacing": "linspace"}),
    SolverCase("PNDMScheduler", "pndm", {"skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}),
    SolverCase("PNDMScheduler", "pndm", {"skip_prk_steps": False}, steps=12),
    SolverCase("PNDMScheduler", "pndm", {"skip_prk_steps": True, "prediction_type": "v_prediction"}),
    SolverCase("EulerDiscreteScheduler", "euler"),
    SolverCase("EulerDiscreteScheduler", "euler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    SolverCase("EulerDiscreteScheduler", "euler", {"timestep_spacing": "leading", "steps_offset": 1},
               plan_options={"s_churn": 0.5}, step_options={"s_churn": 0.5}),
    SolverCase("EulerDiscreteScheduler", "euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                                   "prediction_type": "v_prediction"}, tolerance=5e-5),
    SolverCase("EulerAncestralDiscreteScheduler", "euler_ancestral"),
    SolverCase("EulerAncestralDiscreteScheduler", "euler_ancestral", {"timestep_spacing": "trailing",
                                                                      "prediction_type": "v_prediction"}),
    SolverCase("HeunDiscreteScheduler", "heun"),
    SolverCase("HeunDiscreteScheduler", "heun", {"use_karras_sigmas": True}),
    SolverCase("DPMSolverMultistepScheduler", "dpmsolver_multistep"),
    SolverCase("DPMSolverMultistepScheduler", "dpmsolver_multistep", {"use_karras_sigmas": True}, steps=20),
    SolverCase("DPMSolverMultistepScheduler", "dpmsolver_multistep", {"solver_order": 3, "solver_type": "heun"},
               steps=20),
    SolverCase("DPMSolverMultistepScheduler", "dpmsolver_multistep", {"algorithm_type": "sde-dpmsolver++"},
               steps=12),
    SolverCase("DPMSolverMultistepScheduler", "dpmsolver_multistep",
               {"prediction_type": "v_prediction", "final_sigmas_type": "sigma_min", "lower_order_final": False},
               steps=16),
    SolverCase("UniPCMultistepScheduler", "unipc"),
    SolverCase("UniPCMultistepScheduler", "unipc", {"solver_order": 3, "use_karras_sigmas": True}, steps=15),
    SolverCase("UniPCMultistepScheduler", "unipc", {"solver_type": "bh1", "predict_x0": False,
                                                    "final_sigmas_type": "sigma_min", "disable_corrector": [2]},
               steps=12),
    SolverCase("LCMScheduler", "lcm", steps=4),
    SolverCase("LCMScheduler", "lcm", {"prediction_type": "v_prediction", "clip_sample": True}, steps=6),
]


# The zero-terminal-SNR matrix: every solver x {epsilon, v_prediction} x {SD schedule, zero-SNR trailing}.
SD_SCHEDULE = {"timestep_spacing": "leading", "steps_offset": 1}
ZERO_SNR_SCHEDULE = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
SCHEDULES = {"sd": SD_SCHEDULE, "zero_snr": ZERO_SNR_SCHEDULE}
MATRIX_SOLVERS = [  # (diffusers class, our solver name, config fields beyond the schedule, steps)
    ("DDIMScheduler", "ddim", {"clip_sample": False, "set_alpha_to_one": False}, 10),
    ("DDPMScheduler", "ddpm", {"clip_sample": False}, 10),
    ("PNDMScheduler", "pndm", {"skip_prk_steps": False}, 10),
    ("PNDMScheduler", "plms", {"skip_prk_steps": True}, 10),
    ("EulerDiscreteScheduler", "euler", {}, 10),
    ("EulerAncestralDiscreteScheduler", "euler_a", {}, 10),
    ("HeunDiscreteScheduler", "heun", {}, 10),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", {}, 10),
    ("DPMSolverMultistepScheduler", "dpmpp_2m_karras", {"use_karras_sigmas": True}, 10),
    ("DPMSolverMultistepScheduler", "dpmsolver_multistep", {"algorithm_type": "sde-dpmsolver++"}, 10),
    ("DPMSolverMultistepScheduler", "dpmsolver_multistep", {"solver_order": 3}, 10),
    ("UniPCMultistepScheduler", "unipc", {}, 10),
    ("LCMScheduler", "lcm", {}, 4),
    ("DDIMInverseScheduler", "ddim_inverse", {"clip_sample": False}, 10),
]
# Where diffusers itself returns NaN (epsilon at alpha_bar = 0); make_plan raises a ConfigError instead.
REFUSED = {("ddim", "epsilon", "zero_snr"), ("ddpm", "epsilon", "zero_snr"), ("lcm", "epsilon", "zero_snr")}
# Euler's first step from sigma 4096 cancels at that magnitude in float32: diffusers itself is 1.1e-5
# away from the same loop run in float64 (ours 1.6e-5), so that one case gets 5e-5.
_LOOSE = {("euler", "v_prediction", "zero_snr"): 5e-5}


@dataclass(frozen=True)
class MatrixCase:
    """One cell of the zero-terminal-SNR matrix; `refused` where `make_plan` must raise `ConfigError`."""

    case: SolverCase
    prediction_type: str
    schedule: str
    refused: bool

    @property
    def id(self) -> str:
        """A test id: solver(extra config)-prediction_type-schedule."""
        extra = ",".join(f"{k}={v}" for k, v in self.case.config.items()
                         if k not in SCHEDULES[self.schedule] and k != "prediction_type")
        return f"{self.case.solver}{f'({extra})' if extra else ''}-{self.prediction_type}-{self.schedule}"


def matrix_cases() -> list[MatrixCase]:
    """Every `MATRIX_SOLVERS` entry x {epsilon, v_prediction} x `SCHEDULES`."""
    cases = []
    for class_name, solver, extra, steps in MATRIX_SOLVERS:
        for prediction_type in ("epsilon", "v_prediction"):
            for schedule, fields in SCHEDULES.items():
                key = (solver, prediction_type, schedule)
                config = {**fields, **extra, "prediction_type": prediction_type}
                case = SolverCase(class_name, solver, config, steps=steps, tolerance=_LOOSE.get(key, 1e-5))
                cases.append(MatrixCase(case, prediction_type, schedule, key in REFUSED))
    return cases


def reference_is_finite(case: SolverCase, *, seed: int = 0, shape=(2, 4, 6, 6)) -> bool:
    """Whether diffusers' loop gives a finite result for `case` (False where it returns NaN or raises)."""
    config = {**SD_BETAS, **case.config, "_class_name": case.class_name}
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    noises = np.zeros((4 * case.steps + 4,) + shape, np.float32)
    try:
        with np.errstate(all="ignore"):
            _, _, ref = run_diffusers_loop(case.class_name, config, case.steps, x, noises, case.step_options)
    except (ValueError, RuntimeError, np.linalg.LinAlgError):  # torch.linalg errors are RuntimeErrors
        return False
    return bool(np.isfinite(ref).all())


def run_diffusers_loop(class_name: str, config: dict, steps: int, x_nchw: np.ndarray, noises: np.ndarray,
                       step_options: dict | None = None, strength: float | None = None, init_latents=None,
                       begin_at_zero: bool = False):
    """diffusers' scheduler loop on the stand-in model; returns (timesteps, sigmas, final).

    `begin_at_zero` calls `set_begin_index(0)` first: without it, a scheduler whose first two
    timesteps are equal (Karras sigmas on a zero-SNR schedule: 999, 999, ...) starts at index 1 and
    runs off its sigmas (IndexError).
    """
    import diffusers
    import torch

    sched = getattr(diffusers, class_name).from_config(config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if strength is not None:  # diffusers' img2img get_timesteps
        init_t = min(int(steps * strength), steps)
        start = max(steps - init_t, 0)
        timesteps = timesteps[start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start * sched.order)
    if begin_at_zero and strength is None:
        sched.set_begin_index(0)
    counter = {"i": 0}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(np.asarray(noises[counter["i"]])).to(dtype or torch.float32)

    module = sys.modules[type(sched).__module__]
    saved = getattr(module, "randn_tensor", None)
    if saved is not None:
        module.randn_tensor = fake_randn
    try:
        if strength is None:
            lat = torch.from_numpy(x_nchw) * sched.init_noise_sigma
        else:
            lat = sched.add_noise(torch.from_numpy(init_latents), torch.from_numpy(x_nchw), timesteps[:1])
        denoised = None
        for i, t in enumerate(timesteps):
            counter["i"] = i
            inp = sched.scale_model_input(lat, t)
            out = torch.from_numpy(stand_in_np(inp.numpy(), float(t)))
            res = sched.step(out, t, lat, **(step_options or {}))
            lat = res.prev_sample
            denoised = getattr(res, "denoised", None)
        final = denoised if class_name == "LCMScheduler" else lat
    finally:
        if saved is not None:
            module.randn_tensor = saved
    sigmas = getattr(sched, "sigmas", None)
    return timesteps.numpy(), None if sigmas is None else np.asarray(sigmas), final.numpy()


def run_diffusers_float64(class_name: str, config: dict, steps: int, x_nchw: np.ndarray) -> np.ndarray:
    """diffusers' loop for a deterministic multistep scheduler (DPM-Solver, UniPC) in float64: its
    sigmas, samples and model outputs all in double, as a reference for ill-conditioned configs."""
    import diffusers
    import torch

    sched = getattr(diffusers, class_name).from_config(config)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.to(torch.float64)
    lat = torch.from_numpy(x_nchw).to(torch.float64) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(lat, t)
        out = A * inp + B * (float(t) / 1000.0) * torch.cos(inp)
        lat = sched.step(out, t, lat).prev_sample
    return lat.numpy()


# torch's vectorised float32 transcendentals on the CPU are not always correctly rounded, and how
# far off they are depends on the instruction set (AVX2 vs AVX-512): diffusers' sigmas differ from
# numpy's by up to a few ulp on some machines, and Karras-type timesteps interpolated from them by
# up to two. The final samples (`rel_err`) are compared as strictly everywhere.
SIGMA_MAX_ULP = 8
TIMESTEP_MAX_ULP = 2


def _timesteps_equal(ours, ref) -> bool:
    """Equal timesteps: exactly for integer ones, to `TIMESTEP_MAX_ULP` float32 ulp for fractional
    (Karras) ones."""
    ours = np.asarray(ours).astype(ref.dtype)
    if len(ours) != len(ref):
        return False
    if not np.issubdtype(ref.dtype, np.floating):
        return bool(np.array_equal(ours, ref))
    a, b = ours.astype(np.float32).view(np.int32).astype(np.int64), ref.astype(np.float32).view(np.int32)
    return bool(np.max(np.abs(a - b), initial=0) <= TIMESTEP_MAX_ULP)


def run_case(case: SolverCase, *, seed: int = 0, shape=(2, 4, 6, 6)) -> dict:
    """Our sampler and diffusers' loop on the same noise; the comparison figures."""
    config = {**SD_BETAS, **case.config, "_class_name": case.class_name}
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    plan = make_plan(SchedulerConfig.from_dict(config), case.steps, case.solver, **case.plan_options)
    noises = rng.standard_normal((plan.num_evals,) + shape).astype(np.float32)
    ref_t, ref_sigmas, ref = run_diffusers_loop(case.class_name, config, case.steps, x, noises, case.step_options)
    nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    z = jnp.asarray(noises.transpose(0, 1, 3, 4, 2))
    ours = jax.jit(lambda x, z: sample(stand_in, plan, initial_latents(plan, x), {}, noise=z))(nhwc, z)
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    return {
        "rel_err": float(np.abs(ours - ref).max() / np.abs(ref).max()),
        "ours_finite": bool(np.isfinite(ours).all()),
        "ref_finite": bool(np.isfinite(ref).all()),
        # Karras-type timesteps are interpolated from those sigmas (float32): one ulp off at most
        "timesteps_equal": _timesteps_equal(plan.timesteps, ref_t),
        "sigmas_equal": None if ref_sigmas is None or plan.sigmas is None else bool(
            np.array_equal(plan.sigmas, ref_sigmas)),
        # within SIGMA_MAX_ULP (see there)
        "sigmas_max_ulp": None if ref_sigmas is None or plan.sigmas is None else int(
            np.max(np.abs(plan.sigmas.view(np.int32).astype(np.int64) - ref_sigmas.astype(np.float32).view(np.int32)))),
        "evals": plan.num_evals,
    }
