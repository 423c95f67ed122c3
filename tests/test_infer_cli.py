"""infer.py end to end on a tiny random pipeline folder, and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("diffusers")


def _infer(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    save_tiny_pipeline(root, kind="controlnet")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / "control.png")
    (root / "broken.png").write_text("not an image")
    return root


def test_help_documents_every_option():
    out = _infer("--help")
    assert out.returncode == 0
    for flag in ("--model", "--prompt", "--prompt-file", "--negative-prompt", "--controlnet", "--control-image",
                 "--control-scale", "--control-start", "--control-end", "--guess-mode", "--adapter",
                 "--adapter-image", "--adapter-scale", "--adapter-factor", "--preprocess", "--scheduler", "--steps",
                 "--guidance-scale", "--guidance-rescale", "--seed", "--num-images", "--batch-size", "--height",
                 "--width", "--init-image", "--strength", "--mask", "--inpaint-method", "--clip-guidance-scale",
                 "--dtype", "--output"):
        assert flag in out.stdout, flag


def test_generates_pngs_grid_and_sidecars(tiny, tmp_path):
    out_dir = tmp_path / "out"
    res = _infer("--model", tiny / "pipeline", "--prompt", "a red circle", "--prompt", "a blue square",
                 "--num-images", "2", "--batch-size", "3", "--steps", "2", "--height", "16", "--width", "16",
                 "--control-image", tiny / "control.png", "--preprocess", "canny", "--scheduler", "euler",
                 "--seed", "5", "--output", out_dir, "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    pngs = sorted(p.name for p in out_dir.glob("image_0*.png"))
    assert pngs == [f"image_{i:05d}.png" for i in range(4)]
    assert (out_dir / "image_grid.png").is_file()
    side = json.loads((out_dir / "image_00003.json").read_text())
    assert side["prompt"] == "a blue square" and side["image_index"] == 3 and side["seed"] == 5
    assert side["scheduler"] == "euler" and side["steps"] == 2
    img = np.asarray(Image.open(out_dir / "image_00003.png"))
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert not list(out_dir.glob(".*tmp"))  # no temporary files left behind


@pytest.mark.parametrize("args,message", [
    (["--height", "20", "--width", "16"], "multiple of 8"),
    (["--control-image", "missing.png"], "missing.png"),
    (["--control-image", "broken.png"], "broken.png"),
    (["--model", "no_such_model"], "no_such_model"),
])
def test_errors_are_clear_and_write_nothing(tiny, tmp_path, args, message):
    base = {"--model": str(tiny / "pipeline"), "--prompt": "a", "--output": str(tmp_path / "out")}
    argv = []
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    res = _infer(*argv, *args, cwd=tiny)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
