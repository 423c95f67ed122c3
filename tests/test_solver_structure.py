"""The solver registry's shape: one home per solver, one table of honoured fields, one place to add a solver."""

import ast
import importlib
import inspect
import pkgutil
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.errors import ConfigError
from jaxcontrol.sampler import initial_latents, sample
from jaxcontrol.schedulers import (
    ALIASES,
    PLANNERS,
    SOLVER_TABLE,
    SOLVERS,
    SchedulerConfig,
    SolverSpec,
    make_plan,
    solvers,
)
from jaxcontrol.schedulers.config import NOT_TAKEN
from jaxcontrol.schedulers.solvers import REGISTRY, Solver, register, unregister
from jaxcontrol.schedulers.solvers.common import noise_schedule, x0_eps
from jaxcontrol.schedulers.solvers.plan import finish
from jaxcontrol.schedulers.timesteps import discrete_timesteps

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ARXIV = re.compile(r"arXiv:\d{4}\.\d{4,5}")


def test_registry_and_table_cover_the_same_solvers():
    assert set(REGISTRY) == set(SOLVER_TABLE)
    assert SOLVERS == tuple(REGISTRY) and list(PLANNERS) == list(REGISTRY)
    assert {target for target, _ in ALIASES.values()} == set(REGISTRY)
    for name, solver in REGISTRY.items():
        assert solver.name == name and PLANNERS[name] is solver.plan


@pytest.mark.parametrize("name", sorted(SOLVER_TABLE))
def test_every_solver_has_a_home_naming_its_paper_and_its_diffusers_class(name):
    solver = REGISTRY[name]
    module = importlib.import_module(solver.plan.__module__)
    assert module.__name__ == f"jaxcontrol.schedulers.solvers.{name}"  # one module per solver, named after it
    assert module.SOLVER is solver
    doc = (module.__doc__ or "") + (solver.plan.__doc__ or "")
    assert ARXIV.search(doc), f"{name}: no arXiv id in its module or planner docstring"
    assert SOLVER_TABLE[name].class_name in (solver.plan.__doc__ or ""), f"{name}: planner does not name its class"


def _string_constants(tree) -> set[str]:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_the_shared_machinery_has_no_special_case_for_a_solver():
    """Plan, finish and make_plan take what differs from the Solver record, never from a solver's name."""
    plan_module = ast.parse(inspect.getsource(importlib.import_module("jaxcontrol.schedulers.solvers.plan")))
    make_plan_source = ast.parse(inspect.getsource(solvers.make_plan))
    for tree, where in ((plan_module, "solvers/plan.py"), (make_plan_source, "make_plan")):
        named = _string_constants(tree) & (set(SOLVER_TABLE) | set(ALIASES))
        assert not named, f"{where} special-cases {sorted(named)}"


def test_planners_read_config_fields_only_through_the_table():
    """No planner decides with `cfg.get(field, default)` whether a field applies: fields a class
    does not take answer with `NOT_TAKEN`'s value through the resolved config."""
    modules = [m.name for m in pkgutil.iter_modules(solvers.__path__)]
    assert set(REGISTRY) <= set(modules)
    for name in modules:
        tree = ast.parse(inspect.getsource(importlib.import_module(f"jaxcontrol.schedulers.solvers.{name}")))
        gets = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and n.func.attr == "get" and isinstance(n.func.value, ast.Name) and n.func.value.id == "cfg"]
        assert not gets, f"solvers/{name}.py reads cfg.get(...) at line {gets[0].lineno}"
    _, heun = SchedulerConfig.from_dict({"clip_sample": True, "rescale_betas_zero_snr": True}).resolve("heun")
    assert "rescale_betas_zero_snr" not in heun and heun.rescale_betas_zero_snr is NOT_TAKEN["rescale_betas_zero_snr"]
    assert heun.clip_sample is True  # Heun takes clip_sample
    _, euler_a = SchedulerConfig.from_dict({"use_karras_sigmas": True}).resolve("euler_a")
    assert "use_karras_sigmas" not in euler_a and euler_a.use_karras_sigmas is False
    with pytest.raises(AttributeError):
        euler_a.no_such_field  # noqa: B018


# ---- a toy solver, added from one place ----


def _toy_plan(cfg, n, *, begin=0):
    """Deterministic DDIM written from scratch (Song et al., arXiv:2010.02502, eq. 12 with eta = 0): `ToyScheduler`."""
    sched = noise_schedule(cfg, "toy")
    ts = discrete_timesteps(cfg, n)
    abar = sched.alphas_cumprod[ts]
    abar_next = np.append(abar[1:], np.float32(1))
    rows = dict(t=ts, in_div=np.ones(n), alpha_t=np.sqrt(abar), sigma_t=np.sqrt(1 - abar),
                alpha_next=np.sqrt(abar_next), sigma_next=np.sqrt(1 - abar_next),
                next_a=np.sqrt(abar_next), next_b=np.sqrt(1 - abar_next))
    return finish("toy", cfg, ts, rows, sched, begin, num_inference_steps=n - begin, init_noise_sigma=1.0,
                  start=(rows["alpha_t"][begin], rows["sigma_t"][begin]))


def _toy_update(cfg):
    def step(state, out, row, noise):
        x0, eps = x0_eps(out, state["x"], row["alpha_t"], row["sigma_t"], cfg.prediction_type)
        return {"x": row["alpha_next"] * x0 + row["sigma_next"] * eps, "steps": state["steps"] + 1}

    return step


TOY = Solver("toy", _toy_plan, _toy_update, init=lambda cfg, x: {"x": x, "steps": jnp.zeros((), jnp.int32)})
TOY_FIELDS = {k: SOLVER_TABLE["ddim"].fields[k] for k in (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "timestep_spacing", "steps_offset")}


def _model(x, t, cond):
    return 0.3 * x + 0.4 * (jnp.asarray(t, jnp.float32) / 1000.0) * jnp.cos(x)


@pytest.fixture
def toy():
    register(TOY, SolverSpec("ToyScheduler", TOY_FIELDS), aliases={"toy_v": {"prediction_type": "v_prediction"}})
    try:
        yield TOY
    finally:
        unregister("toy")


def test_a_new_solver_is_added_by_one_register_call(toy):
    assert "toy" in REGISTRY and "toy" in SOLVER_TABLE and "toy" in PLANNERS
    assert SchedulerConfig.from_dict({"_class_name": "ToyScheduler"}).default_solver == "toy"
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 3)), jnp.float32)
    for strength in (1.0, 0.5):
        plan = make_plan(SD_BETAS, 10, "toy", strength=strength)
        ref = make_plan({**SD_BETAS, "clip_sample": False}, 10, "ddim", strength=strength)
        assert plan.solver == "toy" and plan.num_evals == ref.num_evals == 10 * strength
        np.testing.assert_array_equal(plan.timesteps, ref.timesteps)
        ours, state = sample(_model, plan, initial_latents(plan, x), {}, return_state=True)
        assert int(state["steps"]) == plan.num_evals  # the toy's own init and update ran
        np.testing.assert_allclose(ours, sample(_model, ref, initial_latents(ref, x), {}), rtol=0, atol=1e-5)
    assert make_plan(SD_BETAS, 4, "toy_v").prediction_type == "v_prediction"  # its alias
    with pytest.raises(ConfigError, match="does not take options"):
        make_plan(SD_BETAS, 4, "toy", eta=0.5)


def test_unregistering_removes_every_trace(toy):
    unregister("toy")
    try:
        assert "toy" not in REGISTRY and "toy" not in SOLVER_TABLE and "toy_v" not in ALIASES
        with pytest.raises(ConfigError, match="unknown solver 'toy'"):
            make_plan(SD_BETAS, 4, "toy")
        with pytest.raises(ConfigError, match="ToyScheduler"):
            make_plan({"_class_name": "ToyScheduler"}, 4)
    finally:
        register(TOY, SolverSpec("ToyScheduler", TOY_FIELDS))  # for the fixture's unregister


def test_registering_needs_a_table_row_and_a_free_name():
    with pytest.raises(ConfigError, match="no row in SOLVER_TABLE"):
        register(Solver("untabled", _toy_plan, _toy_update))
    with pytest.raises(ConfigError, match="already registered"):
        register(REGISTRY["ddim"])
    with pytest.raises(ConfigError, match="built in"):
        unregister("ddim")
    with pytest.raises(ConfigError, match="already aliases"):
        register(Solver("plms", _toy_plan, _toy_update), SolverSpec("PlmsToy", TOY_FIELDS))
    assert "untabled" not in REGISTRY and ALIASES["plms"][0] == "pndm" and "PlmsToy" not in str(SOLVER_TABLE)
