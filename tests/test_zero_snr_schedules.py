"""Zero-terminal-SNR schedules: every solver x {epsilon, v_prediction} x {SD schedule, zero-SNR trailing}
against diffusers, the config fields each diffusers class honours, and a ConfigError wherever
diffusers itself returns NaN or fails."""

import inspect
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.errors import ConfigError
from jaxcontrol.sampler import initial_latents, noised_latents, sample
from jaxcontrol.schedulers import SchedulerConfig, make_plan
from jaxcontrol.schedulers.config import CLAMPED_TERMINAL_ALPHA_BAR, SOLVER_TABLE
from jaxcontrol.testing.solver_parity import (
    SD_BETAS,
    SIGMA_MAX_ULP,
    ZERO_SNR_SCHEDULE,
    SolverCase,
    matrix_cases,
    reference_is_finite,
    run_case,
    run_diffusers_float64,
    run_diffusers_loop,
    stand_in,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

EMBEDDED_SCHEDULER = Path(__file__).resolve().parents[1] / "jaxcontrol/assets/default_model/scheduler"
ZERO_SNR = {**SD_BETAS, **ZERO_SNR_SCHEDULE}


def _diffusers_class(solver):
    return getattr(diffusers, SOLVER_TABLE[solver].class_name)


@pytest.mark.parametrize("m", matrix_cases(), ids=lambda m: m.id)
def test_matrix_matches_diffusers_or_refuses_where_it_fails(m):
    """Finite and equal to diffusers (timesteps exact, sigmas within 1 ulp) wherever diffusers is
    finite; where diffusers returns NaN (epsilon at alpha_bar = 0), a ConfigError before sampling."""
    if m.refused:
        assert not reference_is_finite(m.case), "diffusers is finite here: this case must not be refused"
        with pytest.raises(ConfigError, match=r"prediction_type='epsilon'.*rescale_betas_zero_snr=True"):
            run_case(m.case)
        return
    result = run_case(m.case)
    assert result["ref_finite"] and result["ours_finite"], result
    assert result["timesteps_equal"], "timesteps differ from diffusers'"
    assert result["sigmas_max_ulp"] is None or result["sigmas_max_ulp"] <= SIGMA_MAX_ULP, \
        "sigmas differ from diffusers'"
    assert result["rel_err"] <= m.case.tolerance, result


def test_the_table_lists_exactly_the_fields_each_diffusers_class_takes():
    """SOLVER_TABLE is diffusers' `__init__` signature of each class, field for field, with its defaults."""
    for solver, spec in SOLVER_TABLE.items():
        params = inspect.signature(getattr(diffusers, spec.class_name).__init__).parameters
        theirs = {k: p.default for k, p in params.items() if k not in ("self", "kwargs")}
        assert set(spec.fields) == set(theirs), solver
        for key, value in spec.fields.items():
            expected = tuple(theirs[key]) if isinstance(theirs[key], list) else theirs[key]
            assert value == expected, (solver, key)


@pytest.mark.parametrize("solver", sorted(SOLVER_TABLE))
def test_terminal_alpha_bar_follows_the_class(solver):
    """With rescale_betas_zero_snr: 0 (DDIM, DDPM, LCM, inverse), 2**-24 (Euler, Euler a, DPM-Solver,
    UniPC), or the plain schedule's value (PNDM and Heun ignore the field)."""
    config = {**SD_BETAS, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    ref = _diffusers_class(solver).from_config(config).alphas_cumprod[-1].item()
    ours = float(make_plan(config, 10, solver).schedule.alphas_cumprod[-1])
    assert ours == pytest.approx(ref, rel=1e-6, abs=0)
    expected = {None: 0.0, CLAMPED_TERMINAL_ALPHA_BAR: CLAMPED_TERMINAL_ALPHA_BAR}
    if "rescale_betas_zero_snr" in SOLVER_TABLE[solver].fields:
        assert ours == expected[SOLVER_TABLE[solver].terminal_alpha_bar]
    else:
        assert ours > 1e-3  # the SD schedule's own last alpha_bar (0.0047)


def test_heun_first_sigma_on_the_embedded_config_is_diffusers():
    """HeunDiscreteScheduler ignores rescale_betas_zero_snr: its first sigma is 14.6, not 4096."""
    config = SchedulerConfig.from_file(EMBEDDED_SCHEDULER)
    plan = make_plan(config, 10, "heun")
    raw = json.loads((EMBEDDED_SCHEDULER / "scheduler_config.json").read_text())
    ref = diffusers.HeunDiscreteScheduler.from_config(raw)
    ref.set_timesteps(10)
    np.testing.assert_array_max_ulp(plan.sigmas, ref.sigmas.numpy(), maxulp=SIGMA_MAX_ULP)
    assert 14.5 < plan.sigmas[0] < 14.7
    assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("alias,steps", [("dpmpp_2m", 20), ("dpmpp_2m_karras", 25)])
def test_readme_dpmpp_2m_on_the_embedded_config(alias, steps):
    """The README's `--scheduler dpmpp_2m` on the embedded model's scheduler config (DDIMScheduler,
    v-prediction, rescale_betas_zero_snr, trailing): finite and equal to diffusers' DPM-Solver++."""
    raw = json.loads((EMBEDDED_SCHEDULER / "scheduler_config.json").read_text())
    assert raw["rescale_betas_zero_snr"] and raw["prediction_type"] == "v_prediction"
    extra = {"use_karras_sigmas": True} if alias.endswith("karras") else {}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    plan = make_plan(SchedulerConfig.from_dict(raw), steps, alias)
    # Karras sigmas from 4096 map the first two steps to timestep 999: diffusers then starts its step
    # index at the second one and fails (IndexError) from 21 steps on, unless the index is set to 0
    ref_t, ref_sigmas, ref = run_diffusers_loop("DPMSolverMultistepScheduler", {**raw, **extra}, steps, x,
                                                np.zeros((steps, 1, 4, 6, 6), np.float32), begin_at_zero=True)
    np.testing.assert_array_equal(plan.timesteps, ref_t)
    # DPM-Solver's sigmas go through torch's float32 log / exp: on some CPUs (AVX-512) the small ones
    # come out tens of ulp (~2e-6 relative) from numpy's; the samples below are compared as strictly
    np.testing.assert_allclose(plan.sigmas, ref_sigmas.astype(np.float32), rtol=1e-5)
    ours = sample(stand_in, plan, initial_latents(plan, jnp.asarray(x.transpose(0, 2, 3, 1))), {})
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    assert np.isfinite(ref).all() and np.isfinite(ours).all()
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5
    assert np.abs(ours).max() > 0.1  # not collapsed to black


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "lcm"])
def test_epsilon_at_snr_zero_is_refused_before_sampling(solver):
    with pytest.raises(ConfigError, match=r"prediction_type='epsilon'.*rescale_betas_zero_snr=True.*timestep 999"):
        make_plan({**ZERO_SNR, "prediction_type": "epsilon"}, 4, solver)


def test_epsilon_on_zero_snr_img2img_starting_below_snr_zero_runs_like_diffusers():
    """The refusal is about the timesteps actually evaluated: strength < 1 never reaches t = 999."""
    cfg = {**ZERO_SNR, "prediction_type": "epsilon", "clip_sample": False, "_class_name": "DDIMScheduler"}
    rng = np.random.default_rng(1)
    shape = (1, 4, 6, 6)
    clean, x = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    plan = make_plan(cfg, 10, "ddim", strength=0.6)
    _, _, ref = run_diffusers_loop("DDIMScheduler", cfg, 10, x, np.zeros((10,) + shape, np.float32),
                                   strength=0.6, init_latents=clean)
    to = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    ours = np.asarray(sample(stand_in, plan, noised_latents(plan, to(clean), to(x)), {})).transpose(0, 3, 1, 2)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("schedule", ["sd", "zero_snr"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_without_lower_order_final_to_sigma_zero(order, schedule):
    """diffusers: NaN at order 2, a singular matrix at order 3; ours: a ConfigError naming the fields.
    With final_sigmas_type='sigma_min' the same config runs and matches diffusers."""
    base = {"timestep_spacing": "leading", "steps_offset": 1} if schedule == "sd" else ZERO_SNR_SCHEDULE
    config = {**base, "prediction_type": "v_prediction", "solver_order": order, "lower_order_final": False}
    case = SolverCase("UniPCMultistepScheduler", "unipc", config, steps=10)
    assert not reference_is_finite(case)
    with pytest.raises(ConfigError, match=r"lower_order_final=False.*final_sigmas_type='zero'"):
        make_plan({**SD_BETAS, **config}, 10, "unipc")
    case = SolverCase("UniPCMultistepScheduler", "unipc", {**config, "final_sigmas_type": "sigma_min"}, steps=10)
    result = run_case(case)
    assert result["ref_finite"] and result["rel_err"] <= 1e-5, result


def test_unipc_noise_prediction_to_sigma_zero_is_refused():
    config = {**SD_BETAS, "predict_x0": False}
    assert not reference_is_finite(SolverCase("UniPCMultistepScheduler", "unipc", {"predict_x0": False}))
    with pytest.raises(ConfigError, match=r"predict_x0=False.*final_sigmas_type='zero'"):
        make_plan(config, 10, "unipc")


def test_unipc_bh1_last_step_lands_on_the_data_prediction():
    """bh1's first-order step to sigma 0 is 0 * inf in diffusers (NaN); its limit is the converted
    output x0, which is what bh2 computes there: our last row equals bh2's."""
    bh1 = make_plan({**SD_BETAS, "solver_type": "bh1"}, 10, "unipc")
    bh2 = make_plan({**SD_BETAS, "solver_type": "bh2"}, 10, "unipc")
    for name in ("px", "wp"):
        np.testing.assert_array_equal(bh1.rows[name][-1], bh2.rows[name][-1])
    assert bh1.rows["px"][-1] == 0 and bh1.rows["wp"][-1][0] == 1


def test_dpmsolver_noise_prediction_to_sigma_zero_is_refused():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="zero")
    with pytest.raises(ConfigError, match=r"algorithm_type='dpmsolver' with final_sigmas_type='zero'"):
        make_plan({**SD_BETAS, "algorithm_type": "dpmsolver"}, 10, "dpmsolver_multistep")


def test_plan_with_a_non_finite_coefficient_never_reaches_the_sampler():
    """Order 3 without lower-order final, Karras sigmas ending at sigma_min twice: the last step has
    h = 0 and diffusers returns NaN; the plan is refused naming the solver, the step and the row."""
    config = {**SD_BETAS, "solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min",
              "use_karras_sigmas": True}
    assert not reference_is_finite(SolverCase("DPMSolverMultistepScheduler", "dpmsolver_multistep", config))
    with pytest.raises(ConfigError, match=r"dpmsolver_multistep plan's coefficient 'w'.*model evaluation 10 of 10"):
        make_plan(config, 10, "dpmsolver_multistep")


@pytest.mark.parametrize("solver", ["euler", "pndm", "heun"])
def test_trained_betas_reaching_snr_zero_are_refused(solver):
    """A schedule whose last beta is 1 (alpha_bar = 0 without the rescale flag): an infinite sigma or
    coefficient is a ConfigError, not NaN latents."""
    betas = np.linspace(0.0001, 0.02, 1000)
    betas[-1] = 1.0
    config = {"trained_betas": betas.tolist(), "timestep_spacing": "trailing"}
    with pytest.raises(ConfigError, match=rf"the {solver} plan's (coefficient '\w+' is not finite|\w+ is inf)"):
        make_plan(config, 10, solver)


def test_zero_snr_sampling_is_finite_for_every_accepted_solver():
    """The embedded model's config (v-prediction, zero SNR, trailing) through every solver: finite."""
    config = SchedulerConfig.from_file(EMBEDDED_SCHEDULER)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 4, 2)), jnp.float32)
    for solver in ("ddim", "ddpm", "pndm", "plms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras",
                   "unipc", "lcm"):
        plan = make_plan(config, 4, solver)
        out = sample(stand_in, plan, initial_latents(plan, x), {}, key=jax.random.key(0))
        assert np.isfinite(np.asarray(out)).all(), solver


@pytest.mark.parametrize("class_name,solver,fields", [
    ("UniPCMultistepScheduler", "unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", "dpmsolver_multistep",
     {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
])
def test_noise_prediction_forms_from_sigma_4096_are_closer_to_float64_than_diffusers(class_name, solver, fields):
    """The noise-prediction forms start at sigma 4096 on a zero-SNR schedule, where float32 loses
    digits (ours and diffusers' differ by up to 4e-3 there). Against the same loop run in float64,
    ours (float64 coefficients) is at least as close as diffusers' float32 run."""
    config = {**ZERO_SNR, "prediction_type": "v_prediction", **fields, "_class_name": class_name}
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
    exact = run_diffusers_float64(class_name, config, 10, x)
    _, _, theirs = run_diffusers_loop(class_name, config, 10, x, np.zeros((10, 2, 4, 6, 6), np.float32))
    plan = make_plan(config, 10, solver)
    ours = sample(stand_in, plan, initial_latents(plan, jnp.asarray(x.transpose(0, 2, 3, 1))), {})
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    scale = np.abs(exact).max()
    err_ours, err_theirs = np.abs(ours - exact).max() / scale, np.abs(theirs - exact).max() / scale
    assert err_ours <= err_theirs and err_ours < 5e-3, (err_ours, err_theirs)


@pytest.mark.parametrize("field,value", [("num_train_timesteps", 0), ("num_train_timesteps", 1.5),
                                         ("beta_end", float("nan")), ("beta_start", -0.1), ("steps_offset", -1)])
def test_bad_numeric_scheduler_fields_are_config_errors_naming_them(field, value):
    with pytest.raises(ConfigError, match=field):
        make_plan({"_class_name": "DDIMScheduler", field: value}, 4)
