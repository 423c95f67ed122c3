"""Solvers against diffusers' schedulers: timesteps and sigmas exact, final samples within 1e-5."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.errors import ConfigError
from jaxcontrol.sampler import initial_latents, noised_latents, sample
from jaxcontrol.schedulers import NoiseSchedule, SchedulerConfig, make_betas, make_plan
from jaxcontrol.testing.solver_parity import (
    SD_BETAS,
    SIGMA_MAX_ULP,
    SOLVER_CASES,
    run_case,
    run_diffusers_loop,
    stand_in,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("case", SOLVER_CASES, ids=lambda c: c.id)
def test_solver_matches_diffusers(case):
    result = run_case(case)
    assert result["timesteps_equal"], "timesteps differ from diffusers'"
    assert result["sigmas_max_ulp"] is None or result["sigmas_max_ulp"] <= SIGMA_MAX_ULP, \
        "sigmas differ from diffusers'"
    assert result["rel_err"] <= case.tolerance, result


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_and_alphas_cumprod_bit_identical(schedule, zero_snr):
    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=schedule)
    ref = diffusers.DDPMScheduler(**kw, rescale_betas_zero_snr=zero_snr)
    betas = make_betas(**kw, rescale_betas_zero_snr=zero_snr)
    if zero_snr:  # torch's float32 sqrt is not always correctly rounded; the rescale cancels near abar=0
        np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=2e-4, atol=2e-6)
    elif schedule == "sigmoid":  # torch's float32 exp is not always correctly rounded
        np.testing.assert_array_max_ulp(betas, ref.betas.numpy(), maxulp=4)
    else:
        np.testing.assert_array_equal(betas, ref.betas.numpy())
        np.testing.assert_array_equal(NoiseSchedule(betas).alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize(
    "class_name,solver,config",
    [
        ("DDIMScheduler", "ddim", {"clip_sample": False}),
        ("EulerDiscreteScheduler", "euler", {}),
        ("DPMSolverMultistepScheduler", "dpmsolver_multistep", {}),
        ("UniPCMultistepScheduler", "unipc", {}),
        ("HeunDiscreteScheduler", "heun", {}),
    ],
)
def test_img2img_start_matches_diffusers(class_name, solver, config):
    """strength < 1: the same start step, the same noised latents and the same result."""
    cfg = {**SD_BETAS, **config, "_class_name": class_name}
    rng = np.random.default_rng(1)
    shape = (1, 4, 6, 6)
    clean, x = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    plan = make_plan(cfg, 10, solver, strength=0.6)
    ref_t, _, ref = run_diffusers_loop(class_name, cfg, 10, x, np.zeros((plan.num_evals,) + shape, np.float32),
                                       strength=0.6, init_latents=clean)
    np.testing.assert_array_equal(np.asarray(plan.timesteps).astype(ref_t.dtype), ref_t)
    to = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    ours = sample(stand_in, plan, noised_latents(plan, to(clean), to(x)), {})
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5


def test_config_file_defaults_follow_the_solver(tmp_path):
    """Unset fields take the running solver's defaults, as diffusers' from_config does."""
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "PNDMScheduler", **SD_BETAS, "skip_prk_steps": True,
                                "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}))
    config = SchedulerConfig.from_file(tmp_path)
    name, resolved = config.resolve()
    assert name == "pndm" and resolved.timestep_spacing == "leading"
    name, resolved = config.resolve("euler")
    assert name == "euler" and resolved.timestep_spacing == "linspace"
    ref = diffusers.EulerDiscreteScheduler.from_config(json.loads(path.read_text()))
    ref.set_timesteps(7)
    np.testing.assert_array_equal(make_plan(config, 7, "euler").timesteps, ref.timesteps.numpy())
    _, resolved = config.resolve("dpmpp_2m_karras")
    assert resolved.use_karras_sigmas and resolved.algorithm_type == "dpmsolver++"


def test_bad_configs_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown solver 'nope'"):
        make_plan(None, 10, "nope")
    with pytest.raises(ConfigError, match="thresholding"):
        make_plan({"_class_name": "DDIMScheduler", "thresholding": True}, 10)
    with pytest.raises(ConfigError, match="num_inference_steps=2000 exceeds"):
        make_plan(None, 2000, "ddim")
    with pytest.raises(ConfigError, match="KDPM2"):
        make_plan({"_class_name": "KDPM2DiscreteScheduler"}, 10)
    with pytest.raises(ConfigError, match="no scheduler_config.json"):
        SchedulerConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="pass key= or noise="):
        sample(stand_in, make_plan(None, 4, "euler_a"), jnp.zeros((1, 2, 2, 1)), {})


def test_compiled_once_per_shape_solver_and_steps():
    """The scan body is traced once, whatever the number of steps."""
    traces = []

    def counting(x, t, cond):
        traces.append(1)
        return stand_in(x, t, cond)

    x = jnp.ones((1, 4, 4, 2))
    for steps in (5, 50):
        traces.clear()
        plan = make_plan({**SD_BETAS, "_class_name": "DDIMScheduler"}, steps)
        jax.jit(lambda x: sample(counting, plan, initial_latents(plan, x), {}))(x).block_until_ready()
        assert len(traces) == 1


def test_callback_reports_every_step_and_is_absent_when_off():
    seen = []
    plan = make_plan({**SD_BETAS, "_class_name": "EulerDiscreteScheduler"}, 6)
    x = jnp.ones((1, 2, 2, 1))
    out = jax.jit(lambda x: sample(stand_in, plan, x, {}, callback=lambda i, v: seen.append(int(i))))(x)
    out.block_until_ready()
    jax.effects_barrier()
    assert seen == list(range(6))
    text = jax.jit(lambda x: sample(stand_in, plan, x, {})).lower(x).as_text()
    assert "callback" not in text
