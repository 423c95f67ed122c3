"""infer.py with concatenation-conditioned U-Nets (inpainting 9, depth 5, InstructPix2Pix 8 input
channels) on tiny random pipeline folders: --mask, --depth-map, --depth-estimator, --instruct and
--image-guidance-scale end to end, the kind read before loading (`peek_unet_kind`), and the wrong
combinations, which are usage errors before any weights are loaded.

The CLI runs in-process (`infer.main`), so that a test can replace the loader and see whether it
was called; test_infer_cli.py runs the same entry point in a subprocess."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxcontrol.commands import infer
from jaxcontrol.errors import ConfigError
from jaxcontrol.convert.pipeline_kind import LDM_CONV_IN, LDM_VAE_DECODER_IN, peek_unet_kind
from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SIZE = ["--height", "16", "--width", "16"]  # latents 8x8 (the tiny VAE's factor is 2)
FAST = ["--steps", "2", "--no-progress"]


def _rgb(path, h, w, seed):
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _tiny_dpt(folder):
    """A tiny random transformers DPT depth estimator (model + image processor) saved in `folder`."""
    cfg = transformers.DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                                 image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                                 neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(3)
    model = transformers.DPTForDepthEstimation(cfg)
    with torch.no_grad():  # random weights of a size that gives a depth map with a range (not all ~0)
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("concat_cli")
    refs = {}
    for kind in ("sd", "inpaint", "depth", "instruct-pix2pix"):
        refs[kind] = save_tiny_pipeline(root / kind, kind=kind)
    _rgb(root / "init.png", 16, 16, 0)
    _rgb(root / "odd.png", 19, 23, 1)  # InstructPix2Pix: the output is 18x22 (rounded down to the VAE's factor 2)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 3:10] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:12]).save(root / "small_mask.png")
    yy, xx = np.mgrid[0:23, 0:19]
    depth16 = (xx * 2500 + yy * 37 + 5).astype(np.uint16)  # 16-bit values that 8 bits would squash
    Image.fromarray(depth16).save(root / "depth16.png")
    np.save(root / "depth.npy", depth16.astype(np.float32)[..., None])  # the same map, (H, W, 1)
    np.save(root / "depth_nan.npy", np.full((5, 5), np.nan, np.float32))
    np.save(root / "depth_3d.npy", np.random.default_rng(0).random((2, 5, 5)))
    _tiny_dpt(root / "dpt")
    return root, refs


def _models(root):
    return {k: root / k / "pipeline" for k in ("sd", "inpaint", "depth", "instruct-pix2pix")}


def _run(capsys, *argv):
    code = infer.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _sidecar(out):
    return json.loads((out / "image_00000.json").read_text())


def _png(out):
    return np.asarray(Image.open(out / "image_00000.png"))


# ---------------------------------------------------------------------------------- the kind before loading


def test_peek_reads_the_kind_of_each_layout_without_weights(tiny, tmp_path):
    root, _ = tiny
    models = _models(root)
    assert {k: peek_unet_kind(p) for k, p in models.items()} == {
        "sd": "text2image", "inpaint": "inpaint", "depth": "depth", "instruct-pix2pix": "instruct_pix2pix"}
    from jaxcontrol import demo

    assert peek_unet_kind(demo.DEFAULT_MODEL) == "text2image"  # a jaxcontrol checkpoint (jaxcontrol.json)
    # a folder with its weights gone still tells: only the configs are read
    bare = tmp_path / "bare"
    shutil.copytree(models["depth"], bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert peek_unet_kind(bare) == "depth"
    # an LDM single file: the header's shapes
    from jaxcontrol.convert.safetensors_file import save_safetensors

    save_safetensors(tmp_path / "sd-inpaint.safetensors", {LDM_CONV_IN: np.zeros((8, 9, 3, 3), np.float32),
                                                           LDM_VAE_DECODER_IN: np.zeros((8, 4, 3, 3), np.float32)})
    assert peek_unet_kind(tmp_path / "sd-inpaint.safetensors") == "inpaint"
    save_safetensors(tmp_path / "other.safetensors", {"conv_in.weight": np.zeros((8, 4, 3, 3), np.float32)})
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    (tmp_path / "empty").mkdir()
    for unknown in ("other.safetensors", "model.ckpt", "empty", "missing"):
        assert peek_unet_kind(tmp_path / unknown) is None, unknown
    # a contradiction is the loader's ConfigError, sooner
    config = json.loads((bare / "model_index.json").read_text())
    config["_class_name"] = "StableDiffusionInstructPix2PixPipeline"
    (bare / "model_index.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="in_channels=5"):
        peek_unet_kind(bare)


# --------------------------------------------------------------------------------------------- happy paths


def test_mask_with_an_inpainting_model_needs_no_inpaint_method(tiny, tmp_path, capsys):
    root, _ = tiny
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", _models(root)["inpaint"], "--prompt", "a", "--init-image", root / "init.png",
                     "--mask", root / "mask.png", *FAST, "--output", out)
    assert code == 0, err
    side = _sidecar(out)
    assert side["kind"] == "inpaint" and side["mode"] == "inpaint" and side["inpaint_method"] == "partial"
    assert side["strength"] == 1.0 and side["image_guidance_scale"] is None and side["depth_source"] is None
    assert side["inputs"]["mask"]["path"] == str(root / "mask.png") and _png(out).shape == (16, 16, 3)


# The depth runs share one compiled program (img2img from the init image, Euler): only the depth map differs.
DEPTH_RUN = ["--prompt", "a", "--init-image", "init.png", "--strength", "0.75", "--scheduler", "euler", "--seed", "3",
             *FAST]


@pytest.mark.slow
def test_depth_map_png16_and_npy_give_the_same_image(tiny, tmp_path, capsys, monkeypatch):
    """A 16-bit PNG is read at full precision: the same values saved as .npy (H, W, 1) give the same image."""
    root, _ = tiny
    monkeypatch.chdir(root)
    images = {}
    for name in ("depth16.png", "depth.npy"):
        out = tmp_path / name
        code, err = _run(capsys, "--model", _models(root)["depth"], "--depth-map", name, *DEPTH_RUN, "--output", out)
        assert code == 0, err
        side = _sidecar(out)
        assert side["kind"] == "depth" and side["mode"] == "img2img" and side["strength"] == 0.75
        assert side["depth_source"] == name and side["inputs"]["depth_map"]["source"] == name
        assert side["inputs"]["depth_map"]["path"] == name and side["inputs"]["depth_map"]["estimator"] is None
        images[name] = (_png(out), side["inputs"]["depth_map"]["sha256"])
    assert np.array_equal(images["depth16.png"][0], images["depth.npy"][0])
    assert images["depth16.png"][1] == images["depth.npy"][1]  # the same float64 array was used


def test_depth_estimator_runs_on_the_init_image(tiny, tmp_path, capsys, monkeypatch):
    root, _ = tiny
    monkeypatch.chdir(root)
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", _models(root)["depth"], "--depth-estimator", "dpt", *DEPTH_RUN,
                     "--output", out)
    assert code == 0, err
    side = _sidecar(out)
    assert side["kind"] == "depth" and side["mode"] == "img2img"
    assert side["depth_source"] == "estimated" and side["inputs"]["depth_map"]["path"] is None
    assert side["inputs"]["depth_map"]["estimator"]["path"] == "dpt"
    assert len(side["inputs"]["depth_map"]["estimator"]["sha256"]) == 64
    from jaxcontrol.depth import estimate_depth
    from jaxcontrol.provenance import array_sha256

    estimated = estimate_depth(np.asarray(Image.open(root / "init.png")), root / "dpt")
    assert side["inputs"]["depth_map"]["sha256"] == array_sha256(estimated)  # the init image's estimate was used


def test_instruct_edits_the_init_image_at_its_own_size(tiny, tmp_path, capsys):
    root, _ = tiny
    out = tmp_path / "out"
    code, err = _run(capsys, "--model", _models(root)["instruct-pix2pix"], "--instruct", "make it red",
                     "--init-image", root / "odd.png", "--image-guidance-scale", "2.5", *FAST, "--output", out)
    assert code == 0, err
    side = _sidecar(out)
    assert side["kind"] == "instruct_pix2pix" and side["prompt"] == "make it red" and side["mode"] == "edit"
    assert side["image_guidance_scale"] == 2.5 and side["guidance_scale"] == 7.5  # as the pipeline resolved them
    assert (side["height"], side["width"]) == (18, 22)  # 19x23 rounded down to the VAE's factor, as diffusers
    assert _png(out).shape == (18, 22, 3)


# -------------------------------------------------------------------------------- wrong combinations


@pytest.fixture()
def no_loading(monkeypatch):
    """`infer.open_pipeline` fails the test if called: the error must come before any weights load."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the usage error")

    monkeypatch.setattr(infer, "open_pipeline", refuse)


@pytest.mark.parametrize("model,args,message", [
    ("sd", ["--init-image", "init.png", "--mask", "mask.png"], "needs --inpaint-method"),
    ("default", ["--init-image", "init.png", "--mask", "mask.png"], "a text-to-image model (4-channel U-Net)"),
    ("inpaint", ["--init-image", "init.png", "--mask", "mask.png", "--inpaint-method", "repaint"],
     "--inpaint-method repaint runs 4-channel models"),
    ("inpaint", ["--init-image", "init.png"], "needs --init-image and --mask (missing --mask)"),
    ("sd", ["--depth-map", "depth16.png"], "--depth-map depth16.png is the input of a depth model (5-channel"),
    ("inpaint", ["--init-image", "init.png", "--mask", "mask.png", "--depth-map", "depth16.png"],
     "is an inpainting model (9-channel U-Net)"),
    ("instruct-pix2pix", ["--init-image", "init.png", "--depth-estimator", "dpt"],
     "--depth-estimator dpt is the input of a depth model"),
    ("sd", ["--image-guidance-scale", "1.5"], "--image-guidance-scale 1.5 applies to an InstructPix2Pix model"),
    ("depth", ["--depth-map", "depth16.png", "--image-guidance-scale", "2"], "is a depth model (5-channel U-Net)"),
    ("sd", ["--instruct", "make it red"], "--instruct is the edit instruction of an InstructPix2Pix model"),
    ("depth", [], "give --depth-map FILE, or --depth-estimator DPT_FOLDER"),
    ("depth", ["--depth-map", "depth16.png", "--init-image", "init.png", "--mask", "mask.png"], "does not inpaint"),
    ("instruct-pix2pix", ["--instruct", "x"], "it needs --init-image, the image to edit"),
    ("instruct-pix2pix", ["--init-image", "init.png", "--strength", "0.5"], "--strength 0.5:"),
    ("instruct-pix2pix", ["--init-image", "init.png", "--mask", "mask.png"], "takes --init-image alone"),
    ("inpaint", ["--init-image", "init.png", "--mask", "small_mask.png"],
     "--mask small_mask.png is 12x16 pixels (height x width) but --init-image init.png is 16x16"),
    ("instruct-pix2pix", ["--instruct", "x", "--prompt", "y", "--init-image", "init.png"],
     "give --instruct or --prompt, not both"),
    ("depth", ["--depth-map", "depth_nan.npy"], "depth_nan.npy: the depth map holds NaN"),
    ("depth", ["--depth-map", "depth_3d.npy"], "depth_3d.npy: expected a 2-D depth map (H, W) or (H, W, 1), "
                                               "got shape (2, 5, 5)"),
    ("depth", ["--depth-map", "missing.png"], "--depth-map missing.png: no such file"),
    ("depth", ["--depth-map", "depth16.png", "--depth-estimator", "dpt", "--init-image", "init.png"],
     "give --depth-map or --depth-estimator, not both"),
    ("depth", ["--depth-estimator", "dpt"], "--depth-estimator estimates the depth of --init-image"),
    ("instruct-pix2pix", ["--init-image", "init.png", "--image-guidance-scale", "-1"],
     "--image-guidance-scale -1.0: must be at least 0"),
    ("sd", ["--unet", "inpaint/pipeline/unet"],
     "--unet inpaint/pipeline/unet makes the model an inpainting model (9-channel U-Net): it needs --init-image"),
    ("sd", ["--unet", "inpaint/pipeline"], "--unet inpaint/pipeline is a pipeline folder; give its U-Net"),
    ("sd", ["--unet", "sd/pipeline/vae"], "config.json says AutoencoderKL, not UNet2DConditionModel"),
    ("sd", ["--unet", "missing"], "--unet missing: no such file or folder"),
])
def test_wrong_combinations_are_usage_errors_before_loading(tiny, tmp_path, capsys, monkeypatch, no_loading,
                                                            model, args, message):
    root, _ = tiny
    monkeypatch.chdir(root)  # file names in messages stay short
    argv = [] if model == "default" else ["--model", _models(root)[model]]
    if "--instruct" not in args:
        argv += ["--prompt", "a"]
    code, err = _run(capsys, *argv, *args, *FAST, "--output", tmp_path / "out")
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("infer.py: error: ") and message in lines[-1], lines[-1]
    assert not (tmp_path / "out").exists()


def test_a_kind_unknown_before_loading_is_checked_after(tiny, tmp_path, capsys, monkeypatch):
    """Where the kind cannot be read cheaply (e.g. a .ckpt file), the same usage error comes after loading."""
    root, _ = tiny
    loaded = []
    real = infer.open_pipeline
    monkeypatch.setattr(infer, "_peek_kind", lambda model: None)
    monkeypatch.setattr(infer, "open_pipeline", lambda settings: loaded.append(settings.model) or real(settings))
    code, err = _run(capsys, "--model", _models(root)["sd"], "--prompt", "a", "--depth-map", root / "depth16.png",
                     *FAST, "--output", tmp_path / "out")
    assert code == 2 and loaded == [str(_models(root)["sd"])], err
    assert "is the input of a depth model (5-channel U-Net); --model" in err and "a text-to-image model" in err
    assert not (tmp_path / "out").exists()


def test_a_unet_that_does_not_fit_the_model_is_named(tiny):
    """--unet / `Pipeline.from_pretrained(unet=)`: a U-Net for another text encoder, or a model that
    is no U-Net, is one clear error, not a parameter-shape traceback from inside the network."""
    from jaxcontrol import demo
    from jaxcontrol.pipeline import Pipeline

    root, _ = tiny
    embedded = demo.DEFAULT_MODEL  # its U-Net reads a 64-wide text encoder; the tiny pipeline's is narrower
    with pytest.raises(ConfigError, match=r"has cross_attention_dim=64, but .* needs \d+ \(its text encoder"):
        Pipeline.from_pretrained(_models(root)["sd"], unet=embedded / "unet")
    with pytest.raises(ConfigError, match="is a AutoencoderKL, not a UNet2DConditionModel"):
        Pipeline.from_pretrained(embedded, unet=embedded / "vae")


def test_help_documents_the_concat_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        infer.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--instruct", "--depth-map", "--depth-estimator", "--image-guidance-scale", "--mask",
                 "--inpaint-method", "9-channel", "5-channel", "8-channel", "16-bit", ".npy"):
        assert flag in text, flag


# ------------------------------------------------------------------------------------ the library parts


def test_load_depth_map_keeps_full_precision_and_names_the_file(tiny, tmp_path):
    from jaxcontrol.depth import DepthMapError, load_depth_map

    root, _ = tiny
    d16 = load_depth_map(root / "depth16.png")
    raw = np.asarray(Image.open(root / "depth16.png"))
    assert d16.dtype == np.float64 and d16.shape == (23, 19) and np.array_equal(d16, raw)
    assert len(np.unique(d16)) > 256  # not squashed to 8 bits
    np.testing.assert_array_equal(load_depth_map(root / "depth.npy"), d16)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "d8.png")
    np.testing.assert_array_equal(load_depth_map(tmp_path / "d8.png"), np.arange(64).reshape(8, 8))
    Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), mode="F").save(tmp_path / "f.tiff")
    np.testing.assert_allclose(load_depth_map(tmp_path / "f.tiff"), np.linspace(0, 1, 12).reshape(3, 4), rtol=1e-7)
    np.save(tmp_path / "const.npy", np.ones((4, 4)))
    np.save(tmp_path / "inf.npy", np.array([[0.0, np.inf], [1.0, 2.0]]))
    np.save(tmp_path / "obj.npy", np.array(["a", "b"]))
    for name, match in (("const.npy", "constant"), ("inf.npy", "NaN or infinite"), ("obj.npy", "numeric"),
                        ("missing.npy", "no such file")):
        with pytest.raises(DepthMapError, match=match) as e:
            load_depth_map(tmp_path / name)
        assert name in str(e.value)


def test_estimated_depth_matches_transformers_and_diffusers_depth2img(tiny):
    """`estimate_depth` is DPT's predicted_depth as transformers computes it, and after the pipeline's
    own resize and normalisation it is what diffusers' Depth2Img pipeline feeds its U-Net."""
    from jaxcontrol.depth import estimate_depth
    from jaxcontrol.preprocess import prepare_depth_map

    root, refs = tiny
    image = Image.open(root / "odd.png").convert("RGB")
    ours = estimate_depth(np.asarray(image), root / "dpt")
    processor = transformers.DPTImageProcessor.from_pretrained(root / "dpt")
    model = transformers.DPTForDepthEstimation.from_pretrained(root / "dpt").eval()
    with torch.no_grad():
        ref = model(processor(images=image, return_tensors="pt").pixel_values).predicted_depth[0].numpy()
    assert ours.shape == ref.shape == (64, 64) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert float(ref.max() - ref.min()) > 1e-3  # a map with a range, so the normalisation is tested too
    pipe = refs["depth"]
    pipe.depth_estimator, pipe.feature_extractor = model, processor
    try:
        with torch.no_grad():
            want = pipe.prepare_depth_map(image, None, 1, False, torch.float32, torch.device("cpu"))
    finally:
        pipe.depth_estimator = pipe.feature_extractor = None
    got = prepare_depth_map(ours, 1, 19 // 2, 23 // 2)  # diffusers: the image's size // the VAE's factor
    np.testing.assert_allclose(got[..., 0], want[:, 0].numpy(), atol=1e-5)
