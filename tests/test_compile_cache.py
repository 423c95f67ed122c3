"""The persistent compilation cache of the CLIs, and compile cost that does not grow with the steps."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxcontrol import compile_cache

ROOT = Path(__file__).resolve().parent.parent


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCONTROL_COMPILE_CACHE", str(tmp_path / "here"))
    assert compile_cache.cache_dir() == tmp_path / "here"
    for off in ("", "off", "OFF", "0", "false", "none"):
        monkeypatch.setenv("JAXCONTROL_COMPILE_CACHE", off)
        assert compile_cache.cache_dir() is None
        assert compile_cache.enable() is None
    monkeypatch.delenv("JAXCONTROL_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "jaxcontrol" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.cache_dir() == tmp_path / "home" / ".cache" / "jaxcontrol" / "xla"


def test_an_uncreatable_cache_dir_turns_the_cache_off_with_a_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert compile_cache.enable(blocker / "xla") is None
    assert "compilation cache off" in caplog.text


def _infer(model, out, cache, *extra):
    env = {**os.environ, "JAXCONTROL_COMPILE_CACHE": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model", model, "--prompt", "a red circle",
                           "--steps", "2", "--height", "16", "--width", "16", "--output", out, "--no-progress",
                           *extra], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

    root = tmp_path_factory.mktemp("cache")
    save_tiny_pipeline(root, kind="controlnet")
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(root / "c.png")
    return root


@pytest.mark.slow  # two full infer.py runs (70 s); the cache directory and its off switch stay in the fast set
def test_a_second_infer_run_compiles_nothing(tiny, tmp_path):
    """The first run writes compiled programs; the second, with the same settings, finds every one
    (a miss would write its entry again or add one: the listing and mtimes stay the same)."""
    pytest.importorskip("diffusers")
    cache = tmp_path / "xla"
    first = _infer(tiny / "pipeline", tmp_path / "a", cache, "--control-image", tiny / "c.png")
    assert first.returncode == 0, first.stderr[-2000:]
    entries = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert entries, "the first run cached nothing"
    second = _infer(tiny / "pipeline", tmp_path / "b", cache, "--control-image", tiny / "c.png")
    assert second.returncode == 0, second.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == entries
    assert (tmp_path / "b" / "image_00000.png").read_bytes() == (tmp_path / "a" / "image_00000.png").read_bytes()


@pytest.mark.slow
def test_cache_off_writes_nothing(tiny, tmp_path):
    cache = Path("off").absolute()
    res = _infer(tiny / "pipeline", tmp_path / "a", "off", "--control-image", tiny / "c.png")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not cache.exists()


def test_sampler_program_does_not_grow_with_steps(tiny):
    """The sampler is one `lax.scan`: the lowered program for 50 steps is the size of the one for
    20 (only the per-step tables differ), so compile time stays flat in the step count."""
    from jaxcontrol import ControlInput, Pipeline

    pipe = Pipeline.from_pretrained(tiny / "pipeline")
    control = ControlInput(np.asarray(Image.open(tiny / "c.png"), np.float32) / 255)
    sizes = {}
    for steps in (20, 50):
        text = pipe.lower("a red circle", controls=[control], num_inference_steps=steps, height=16,
                          width=16).as_text()
        sizes[steps] = len(text)
    assert abs(sizes[50] - sizes[20]) < 0.01 * sizes[20], sizes
