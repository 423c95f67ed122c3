"""infer.py's `resolve`: flags -> InferSettings as a pure step, with no weights and no images read."""

import dataclasses
import types
from pathlib import Path

import pytest

from jaxcontrol.commands import infer
from jaxcontrol.errors import UsageError


@pytest.fixture()
def model(tmp_path, monkeypatch):
    """An empty folder as --model (resolve only checks that it exists), the working directory."""
    folder = tmp_path / "sd15"
    folder.mkdir()
    (tmp_path / "cn").mkdir()
    monkeypatch.chdir(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("resolve loaded weights")

    monkeypatch.setattr(infer, "open_pipeline", no_loading)
    monkeypatch.setattr(infer, "_load", no_loading)
    return "sd15"


def resolve(*argv):
    return infer.resolve(infer.parse_args([str(a) for a in argv]))


def test_defaults_are_resolved_without_reading_the_model_or_the_images(model):
    s = resolve("--model", model, "--prompt", "a cat", "--control-image", "not_read.png")
    assert isinstance(s, infer.InferSettings)
    assert s.model == model and s.prompts == ("a cat",) and s.steps == 30 and s.guidance_scale == 7.5
    assert s.controls == (infer.ControlSpec("not_read.png", 1.0, 0.0, 1.0),) and s.adapters == ()
    assert s.image_indices == (0,) and s.output == Path("outputs") and s.progress
    assert s.height is None and s.width is None and s.solver is None  # decided by the model, in run
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3
    assert hash(s) == hash(resolve("--model", model, "--prompt", "a cat", "--control-image", "not_read.png"))


def test_resolve_leaves_the_parsed_flags_unchanged(model):
    args = infer.parse_args(["--model", model, "--prompt", "a", "--num-images", "2", "--image-indices", "1,0"])
    before = dict(vars(args))
    assert infer.resolve(args).image_indices == (1, 0)
    assert vars(args) == before


@pytest.mark.parametrize("one,other", [
    (["--prompt", "a", "--prompt", "b"], ["--prompt-file", "prompts.txt"]),
    (["--prompt", "a", "--num-images", "2"], ["--prompt", "a", "--num-images", "2", "--image-indices", "0,1"]),
    (["--prompt", "a"], ["--prompt", "a", "--steps", "30", "--guidance-scale", "7.5", "--seed", "0"]),
    (["--prompt", "a", "--output", "out"], ["--prompt=a", "--output", "out/"]),
    (["--prompt", "a", "--controlnet", "cn", "--control-image", "x.png", "--control-image", "y.png",
      "--control-scale", "0.5"],
     ["--prompt", "a", "--controlnet", "cn", "--control-image", "x.png", "--control-image", "y.png",
      "--control-scale", "0.5", "--control-scale", "0.5", "--control-start", "0", "--control-end", "1"]),
])
def test_equivalent_spellings_resolve_equal(model, one, other):
    Path("prompts.txt").write_text("a\n\n  b \n")
    assert resolve("--model", model, *one) == resolve("--model", model, *other)


@pytest.mark.parametrize("argv,flag", [
    (["--strength", "0.5"], "--strength only applies with --init-image"),
    (["--control-start", "0.6", "--control-end", "0.4", "--control-image", "x.png"], "--control-start"),
    (["--control-scale", "1", "--control-scale", "2", "--control-image", "x.png"], "--control-scale"),
    (["--num-images", "2", "--image-indices", "2"], "--image-indices"),
    (["--mask", "m.png"], "--mask needs --init-image"),
    (["--controlnet", "cn"], "1 --controlnet but 0 --control-image"),
    (["--height", "20"], "--height"),
])
def test_bad_combinations_are_usage_errors_naming_the_flag(model, argv, flag):
    with pytest.raises(UsageError, match=flag.replace("-", r"\-")):
        resolve("--model", model, "--prompt", "a", *argv)


def test_flag_errors_come_before_the_model_path_is_looked_at(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="--strength only applies with --init-image"):
        resolve("--model", "no_such_model", "--prompt", "a", "--strength", "0.5")
    with pytest.raises(UsageError, match="--model no_such_model: no such file or folder"):
        resolve("--model", "no_such_model", "--prompt", "a")


def test_jobs_pair_each_index_with_its_prompt(model):
    s = resolve("--model", model, "--prompt", "a", "--prompt", "b", "--num-images", "2", "--image-indices", "3,0")
    assert s.jobs() == [(3, "b"), (0, "a")]


def test_demo_resolves_the_demo_defaults(model):
    from jaxcontrol import demo

    s = resolve("--demo", "--model", model, "--controlnet", "cn")
    assert s.demo and s.prompts == (demo.DEMO_PROMPT,) and s.controlnet_paths == ("cn",)
    assert s.steps == demo.DEMO_STEPS and s.guidance_scale == demo.DEMO_GUIDANCE
    with pytest.raises(UsageError, match="--demo needs one --controlnet"):
        resolve("--demo", "--model", model)


def _fake_pipe(solver="pndm", layers=12):
    return types.SimpleNamespace(
        text_encoder=types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=layers)),
        max_clip_skip=lambda: layers,
        scheduler_config=types.SimpleNamespace(resolve=lambda name: (name or solver, {})),
        vae_scale_factor=8, unet=types.SimpleNamespace(config=types.SimpleNamespace(sample_size=64)))


def test_fit_to_model_fills_size_and_solver_and_checks_what_needs_the_model(model):
    import numpy as np

    s = infer.fit_to_model(resolve("--model", model, "--prompt", "a"), _fake_pipe(), None)
    assert (s.height, s.width, s.solver) == (512, 512, "pndm")
    s = infer.fit_to_model(resolve("--model", model, "--prompt", "a", "--width", "64"), _fake_pipe(),
                           np.zeros((40, 48, 3), np.float32))
    assert (s.height, s.width) == (40, 64)
    with pytest.raises(UsageError, match="--clip-skip 13: the text encoder has 12 layers"):
        infer.fit_to_model(resolve("--model", model, "--prompt", "a", "--clip-skip", "13"), _fake_pipe(), None)
    with pytest.raises(UsageError, match="--eta 0.5 applies to the DDIM solver only"):
        infer.fit_to_model(resolve("--model", model, "--prompt", "a", "--eta", "0.5"), _fake_pipe(), None)
    assert infer.fit_to_model(resolve("--model", model, "--prompt", "a", "--eta", "0.5", "--scheduler", "ddim"),
                              _fake_pipe(), None).solver == "ddim"
    with pytest.raises(UsageError, match="image size 36x48 is not a multiple of 8"):
        infer.fit_to_model(resolve("--model", model, "--prompt", "a"), _fake_pipe(), np.zeros((36, 48, 3)))
