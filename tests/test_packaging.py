"""What `pip install .` gives a user: a wheel built from the checkout ships every asset file (the
embedded model's Orbax `.zarray` dotfiles included), declares the three command-line tools, and the
library loads and samples the embedded model from it without the training stack installed."""

from __future__ import annotations

import ast
import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "jaxcontrol" / "assets"
# the `train` extra: only jaxcontrol.training, jaxcontrol.data and train.py import these
TRAINING_STACK = ("optax", "grain", "tensorflow_datasets", "array_record", "ml_collections", "tensorboardX")
TRAINING_DISTRIBUTIONS = ("optax", "grain", "tensorflow-datasets", "array-record", "ml-collections", "tensorboardX")
CONSOLE_SCRIPTS = {"jaxcontrol-infer", "jaxcontrol-train", "jaxcontrol-convert"}


def _asset_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in ASSETS.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (no network: the venv's setuptools, no isolation)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "jaxcontrol", src / "jaxcontrol", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(tmp / "dist")], cwd=src, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("jaxcontrol-*.whl")
    return whl


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
    return dest


def test_wheel_contains_every_asset_file(wheel):
    expected = _asset_files()
    assert any(Path(p).name == ".zarray" for p in expected), "the embedded model has no Orbax .zarray files?"
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("jaxcontrol/assets/")}
    missing = sorted(expected - shipped)
    assert not missing, f"{len(missing)} of {len(expected)} asset files are not in the wheel, e.g. {missing[:5]}"


def test_wheel_declares_the_three_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as z:
        (ep_name,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(z.read(ep_name).decode())
        scripts = dict(parser["console_scripts"])
        assert set(scripts) == CONSOLE_SCRIPTS
        for name, target in scripts.items():
            module, func = target.split(":")
            path = module.replace(".", "/") + ".py"
            assert path in z.namelist(), f"{name} = {target}: {path} is not in the wheel"
            tree = ast.parse(z.read(path))
            assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{name}: no {func} in {path}"


def test_training_stack_is_the_train_extra(wheel):
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [line.split(":", 1)[1].strip() for line in z.read(name).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    core = [r.split(";")[0].lower() for r in requires if ";" not in r]
    train = [r.split(";")[0].lower() for r in requires if r.replace(" ", "").endswith('extra=="train"')]
    for dist in TRAINING_DISTRIBUTIONS:
        assert not any(r.startswith(dist.lower()) for r in core), f"{dist} is a core dependency; the core never imports it"
        assert any(r.startswith(dist.lower()) for r in train), f"{dist} is missing from the train extra"


# A child process that sees only the unpacked wheel (not the checkout) and cannot import the
# training stack, as after `pip install jaxcontrol` without the `train` extra.
_PROBE = r"""
import json, sys
from pathlib import Path

BLOCKED = set(sys.argv[2].split(","))


class Hidden:
    # wraps each finder so that the training stack looks not installed (find_spec -> None)
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return self.inner.find_spec(name, path, target)


sys.meta_path[:] = [Hidden(f) for f in sys.meta_path if "editable" not in type(f).__module__]
import numpy as np

import jaxcontrol
from jaxcontrol import demo

site = Path(sys.argv[1]).resolve()
assert Path(jaxcontrol.__file__).resolve().is_relative_to(site), jaxcontrol.__file__
pipe = demo.load_embedded()
outline = demo.circle_outline()
image = np.asarray(pipe(["red circle with white background"], num_inference_steps=1, guidance_scale=1.0, seed=0,
                        controls=[jaxcontrol.ControlInput(outline, 1.0)],
                        adapters=[jaxcontrol.AdapterInput(outline, 1.0)] if pipe.adapters else []))
help_exits = {}
for name in ("infer", "convert"):
    module = __import__(f"jaxcontrol.commands.{name}", fromlist=["console_main"])
    sys.argv = [f"jaxcontrol-{name}", "--help"]
    try:
        module.console_main()
    except SystemExit as e:
        help_exits[name] = e.code
print(json.dumps({"shape": image.shape, "dtype": str(image.dtype), "std": float(image.std()),
                  "assets": str(demo.ASSETS.resolve().relative_to(site)), "help": help_exits,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_unpacked_wheel_samples_the_embedded_model_without_the_training_stack(unpacked, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(unpacked)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(unpacked), ",".join(TRAINING_STACK)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["assets"] == "jaxcontrol/assets"
    assert result["shape"] == [1, 64, 64, 3] and result["dtype"] == "uint8" and result["std"] > 0
    assert result["help"] == {"infer": 0, "convert": 0}, result["help"]
    assert result["loaded"] == []
