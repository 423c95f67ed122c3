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


# ------------------------------------------------------------------------- reliability (issue: no silent wrong output)


@pytest.fixture(scope="module")
def tiny_ddim(tmp_path_factory):
    """A tiny ControlNet pipeline whose own scheduler is DDIM (so --eta applies without --scheduler)."""
    root = tmp_path_factory.mktemp("infer_ddim")
    save_tiny_pipeline(root, kind="controlnet", scheduler="DDIMScheduler")
    return root / "pipeline"


@pytest.mark.parametrize("args,flag", [
    (["--strength", "1.5", "--init-image", "control.png"], "--strength"),
    (["--guidance-scale", "-3"], "--guidance-scale"),
    (["--control-end", "1.5"], "--control-end"),
    (["--control-start", "0.6", "--control-end", "0.4"], "--control-start"),
    (["--eta", "0.5", "--scheduler", "euler"], "--eta"),
    (["--seed", "12345678901234567890"], "--seed"),
    (["--image-indices", "a,b"], "--image-indices"),
    (["--clip-skip", "100"], "--clip-skip"),
    (["--steps", "0"], "--steps"),
])
def test_out_of_range_flags_are_usage_errors_naming_the_flag(tiny, tmp_path, args, flag):
    res = _infer("--model", tiny / "pipeline", "--prompt", "a", "--control-image", "control.png", "--steps", "2",
                 "--height", "16", "--width", "16", "--output", tmp_path / "out", "--no-progress", *args, cwd=tiny)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("infer.py: error: ") and flag in lines[-1]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_size_that_cannot_fit_is_a_one_line_runtime_error(tiny, tmp_path):
    res = _infer("--model", tiny / "pipeline", "--prompt", "a", "--control-image", tiny / "control.png",
                 "--height", "1048576", "--width", "1048576", "--output", tmp_path / "out", "--no-progress")
    assert res.returncode == 1, res.stderr[-2000:]
    assert "GiB" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_nan_weights_fail_loudly_and_write_nothing(tiny, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "nan_pipeline"
    shutil.copytree(tiny / "pipeline", bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_out.bias"] = np.full_like(tensors["conv_out.bias"], np.nan)
    save_file(tensors, weights)
    res = _infer("--model", bad, "--prompt", "a", "--control-image", tiny / "control.png", "--steps", "2",
                 "--height", "16", "--width", "16", "--output", tmp_path / "out", "--no-progress")
    assert res.returncode == 1, res.stderr[-2000:]
    assert "NaN" in res.stderr and "solver 'pndm', first at model evaluation 1 of 3" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_eta_applies_to_the_models_own_ddim_scheduler_and_sidecar_is_resolved(tiny, tiny_ddim, tmp_path):
    from jaxcontrol.provenance import path_sha256

    outs = {}
    for eta in ("0", "1"):
        out = tmp_path / f"eta{eta}"
        res = _infer("--model", tiny_ddim, "--prompt", "a", "--control-image", tiny / "control.png", "--steps", "3",
                     "--height", "16", "--width", "16", "--eta", eta, "--seed", "2", "--output", out, "--no-progress")
        assert res.returncode == 0, res.stderr[-2000:]
        outs[eta] = (np.asarray(Image.open(out / "image_00000.png")), json.loads((out / "image_00000.json").read_text()))
    assert np.abs(outs["0"][0].astype(int) - outs["1"][0].astype(int)).max() > 0  # eta was used, not ignored
    side = outs["1"][1]
    assert side["solver"] == "ddim" and side["scheduler_options"] == {"eta": 1.0}
    assert side["scheduler_config"]["set_alpha_to_one"] is False  # the folder's config, resolved
    assert side["prediction_type"] == "epsilon" and side["num_inference_steps"] == 3
    assert side["timesteps"] == [667, 334, 1]
    assert side["controlnets"] == [{"scale": 1.0, "start": 0.0, "end": 1.0, "resize_mode": "default"}]
    assert side["model"]["sha256"] == path_sha256(tiny_ddim)
    assert len(side["inputs"]["control_images"][0]["sha256"]) == 64
    assert side["jaxcontrol_version"] and side["guidance_scale"] == 7.5 and side["guess_mode"] is False


@pytest.mark.parametrize("args,message", [
    (["--name", "../escape"], "--name"),
    (["--name", "/tmp/abs"], "--name"),
    (["--name", ""], "--name"),
    (["--strength", "0.5"], "--strength only applies with --init-image"),
    (["--repaint-jump-length", "3"], "--repaint-jump-length only applies"),
    (["--num-images", "2", "--image-indices", "1,1"], "repeated"),
    (["--init-image", "fifo"], "not a regular file"),
])
def test_escaping_names_ignored_flags_and_special_files_are_usage_errors(tiny, tmp_path, args, message):
    import os

    if "fifo" in args and not (tmp_path / "fifo").exists():
        os.mkfifo(tmp_path / "fifo")
    args = [str(tmp_path / "fifo") if a == "fifo" else a for a in args]
    res = _infer("--model", tiny / "pipeline", "--prompt", "a", "--control-image", tiny / "control.png",
                 "--output", tmp_path / "out", "--no-progress", *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["fifo"] if "fifo" in res.stderr else [])


# ------------------------------------------------------------------------- inputs diffusers prepares on PIL images


@pytest.mark.slow
def test_crop_and_fill_resize_modes_work_from_files(tiny, tmp_path):
    """--control-resize-mode crop / fill resize the file's image as diffusers does for PIL images."""
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((24, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "tall.png")
    outputs = {}
    for mode in ("crop", "fill"):
        out_dir = tmp_path / mode
        res = _infer("--model", tiny / "pipeline", "--prompt", "a", "--steps", "1", "--height", "16", "--width", "16",
                     "--control-image", tmp_path / "tall.png", "--control-resize-mode", mode, "--output", out_dir,
                     "--no-progress")
        assert res.returncode == 0, res.stderr[-2000:]
        side = json.loads((out_dir / "image_00000.json").read_text())
        assert side["controlnets"][0]["resize_mode"] == mode
        outputs[mode] = np.asarray(Image.open(out_dir / "image_00000.png"))
    assert not np.array_equal(outputs["crop"], outputs["fill"])  # the modes really differ


@pytest.mark.slow
def test_the_same_controlnet_file_twice_is_fingerprinted_in_both_entries(tiny, tmp_path):
    cn = tiny / "_models" / "controlnet_0"
    res = _infer("--model", tiny / "pipeline", "--prompt", "a", "--steps", "1", "--height", "16", "--width", "16",
                 "--controlnet", cn, "--controlnet", cn, "--control-image", tiny / "control.png",
                 "--control-image", tiny / "control.png", "--control-image", tiny / "control.png",
                 "--output", tmp_path / "out", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    entries = json.loads((tmp_path / "out" / "image_00000.json").read_text())["controlnets"]
    assert len(entries) == 3
    assert "path" not in entries[0]  # the pipeline's own ControlNet: fingerprinted with the model
    assert entries[1]["path"] == entries[2]["path"] == str(cn)
    assert entries[1]["sha256"] == entries[2]["sha256"] and len(entries[1]["sha256"]) == 64


@pytest.mark.slow
def test_an_adapter_image_of_another_size_is_resized_like_diffusers(tmp_path):
    from jaxcontrol import demo

    if not demo.DEFAULT_ADAPTER.is_dir():
        pytest.skip("the embedded model has no T2I-Adapter")
    Image.fromarray(demo.circle_outline(96)).save(tmp_path / "big.png")  # the model samples 64x64
    res = _infer("--prompt", "a red circle", "--steps", "1", "--adapter-image", tmp_path / "big.png",
                 "--output", tmp_path / "out", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out" / "image_00000.png").is_file()
