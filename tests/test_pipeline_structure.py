"""The pipeline's call arguments, compile cache and plans, as a maintainer extends them."""

import dataclasses
import inspect

import jax
import numpy as np
import pytest

from jaxcontrol import demo
from jaxcontrol.commands import infer
from jaxcontrol.errors import ConfigError, UsageError
from jaxcontrol.pipeline import AdapterInput, CallArguments, ControlInput, Pipeline
from jaxcontrol.schedulers import make_plan
from jaxcontrol.schedulers.solvers.plan import REQUIRED_ROWS, Plan


def test_call_keywords_and_call_arguments_are_the_same_list():
    """A new option is a field of CallArguments and a parameter of __call__; neither can be forgotten."""
    params = {n: p.default for n, p in inspect.signature(Pipeline.__call__).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
    fields = {f.name: f.default for f in dataclasses.fields(CallArguments)}
    assert params == fields


def test_unknown_or_doubled_options_are_named():
    with pytest.raises(ConfigError, match=r"unknown pipeline argument\(s\) \['guidance'\]"):
        CallArguments.of({"guidance": 3.0})


@pytest.fixture(scope="module")
def pipe():
    if not demo.is_built():
        pytest.skip("the embedded model is not installed")
    return demo.load_embedded(mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))


@pytest.mark.slow
def test_a_new_scheduler_config_empties_the_compile_cache(pipe):
    cond = demo.circle_outline(64).astype(np.float32) / 255.0
    kw = dict(num_inference_steps=3, seed=0, scheduler="dpmsolver_multistep", controls=[ControlInput(cond)],
              adapters=[AdapterInput(cond, 0.0)] if pipe.adapters else [])
    before = pipe("a red circle", **kw)
    assert pipe.last_settings["scheduler_config"]["solver_order"] == 2
    original = pipe.scheduler_config
    try:
        pipe.scheduler_config = original.replace(solver_order=1)
        assert not pipe._programs
        after = pipe("a red circle", **kw)
        assert pipe.last_settings["scheduler_config"]["solver_order"] == 1
        assert np.abs(before.astype(int) - after.astype(int)).max() > 0
        with pytest.raises(ConfigError, match="must be a SchedulerConfig"):
            pipe.scheduler_config = {"_class_name": "DDIMScheduler"}
    finally:
        pipe.scheduler_config = original
    with pytest.raises(ConfigError, match="unknown pipeline argument"):
        pipe.check_inputs("a", guidance=2.0)


def test_a_plan_without_a_row_the_sampler_reads_is_refused(pipe):
    plan = make_plan(pipe.scheduler_config, 4, "ddim")
    for row in REQUIRED_ROWS:
        rows = {k: v for k, v in plan.rows.items() if k != row}
        with pytest.raises(ConfigError, match=f"has no rows \\['{row}'\\]"):
            dataclasses.replace(plan, rows=rows)
    with pytest.raises(ConfigError, match="differ in length"):
        dataclasses.replace(plan, rows={**plan.rows, "t": plan.rows["t"][:-1]})
    assert isinstance(dataclasses.replace(plan), Plan)


@pytest.mark.parametrize("flags,named", [
    (["--guidance-rescale", "0.7"], "--guidance-rescale"),
    (["--negative-prompt", "blurry", "--num-images", "3"], "--negative-prompt, --num-images"),
    (["--init-image", "x.png"], "--init-image"),
])
def test_demo_refuses_the_flags_it_would_ignore(flags, named):
    with pytest.raises(UsageError, match=f"does not use {named}"):
        infer.resolve(infer.parse_args(["--demo", *flags]))
    with pytest.raises(UsageError, match="one prompt"):
        infer.resolve(infer.parse_args(["--demo", "--prompt", "a", "--prompt", "b"]))


def test_scheduler_choices_come_from_the_schedulers():
    from jaxcontrol.schedulers import ALIASES

    choices = set(infer.solver_choices())
    assert {"ddim", "euler_a", "dpmpp_2m_karras", "euler_ancestral", "dpmsolver_multistep"} <= choices
    assert choices == set(ALIASES) - {"ddim_inverse"}
