"""jaxcontrol.preprocess: Canny in JAX against OpenCV / scikit-image, control and adapter images against diffusers."""

import numpy as np
import pytest
import torch
from PIL import Image

from jaxcontrol.preprocess import (
    ImageLoadError,
    _canny,
    canny,
    default_height_width,
    edge_agreement,
    load_image,
    load_images,
    prepare_adapter_image,
    prepare_control_image,
)

cv2 = pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")

# photographs shipped inside scikit-image (no download): astronaut, camera (gray), coffee, chelsea, rocket
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket")
CROP = 256


@pytest.fixture(scope="module")
def photos():
    """(5, 256, 256, 3) uint8: centre crops, the gray camera replicated over RGB."""
    out = []
    for name in PHOTOS:
        im = getattr(skdata, name)()
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=-1)
        h, w = im.shape[:2]
        top, left = (h - CROP) // 2, (w - CROP) // 2
        out.append(im[top : top + CROP, left : left + CROP, :3])
    return np.ascontiguousarray(np.stack(out))


def _opencv(img, low, high, *, gray=False, sigma=0.0, l2=False):
    x = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if gray else img
    if sigma > 0:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    return cv2.Canny(np.ascontiguousarray(x), low, high, L2gradient=l2) > 0


CASES = {
    "diffusers default (100, 200)": dict(low=100, high=200),
    "(50, 150)": dict(low=50, high=150),
    "L2 gradient": dict(low=100, high=200, l2=True),
    "gray": dict(low=100, high=200, gray=True),
    "gray + blur sigma 1.4": dict(low=40, high=100, gray=True, sigma=1.4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_canny_agrees_with_opencv_on_bundled_photos(photos, case):
    c = CASES[case]
    ours = np.asarray(
        canny(photos, c["low"], c["high"], sigma=c.get("sigma", 0.0), l2_gradient=c.get("l2", False),
              color="gray" if c.get("gray") else "max", channels=1)
    )[..., 0] > 0
    for name, img, mine in zip(PHOTOS, photos, ours):
        ref = _opencv(img, c["low"], c["high"], gray=c.get("gray", False), sigma=c.get("sigma", 0.0), l2=c.get("l2", False))
        a = edge_agreement(mine, ref)
        assert ref.sum() > 500, name  # a real edge map, not a blank one
        # measured: identical to OpenCV 4.10 and 5.0 on every photo and case (F1 = IoU = 1.0)
        assert a["f1"] >= 0.999 and a["iou"] >= 0.998, (name, case, a)


def test_canny_float_input_agrees_with_uint8(photos):
    ours = np.asarray(canny(photos.astype(np.float32) / 255.0, 100, 200, channels=1))[..., 0] > 0
    for name, img, mine in zip(PHOTOS, photos, ours):
        a = edge_agreement(mine, _opencv(img, 100, 200))
        # float gradients break OpenCV's integer ties differently at a few pixels (measured F1 >= 0.996)
        assert a["f1"] >= 0.99, (name, a)


def test_canny_agreement_with_scikit_image(photos):
    feature = pytest.importorskip("skimage.feature")
    gray = np.stack([cv2.cvtColor(p, cv2.COLOR_RGB2GRAY) for p in photos])
    ours = np.asarray(canny(gray[..., None], 50, 100, sigma=1.0, l2_gradient=True, channels=1))[..., 0] > 0
    for name, g, mine in zip(PHOTOS, gray, ours):
        ref = feature.canny(g / 255.0, sigma=1.0, low_threshold=50 / 255, high_threshold=100 / 255)
        # scikit-image interpolates the gradient in its non-maximum suppression and blurs with a
        # different border, so only near-agreement is expected (measured F1 0.88-0.93; 0.95-0.98 within 1 px)
        exact, near = edge_agreement(mine, ref), edge_agreement(mine, ref, tolerance=1)
        assert exact["f1"] >= 0.8 and near["f1"] >= 0.92, (name, exact, near)


def test_canny_output_format_batching_and_one_compile(photos):
    x = photos  # the shape and settings of the OpenCV test above, so its compile is reused
    out1 = np.asarray(canny(x, 100, 200, channels=1))
    out3 = canny(x, 100, 200)
    assert out3.shape == x.shape and out3.dtype == np.float32 and out1.shape == x.shape[:3] + (1,)
    o = np.asarray(out3)
    assert set(np.unique(o)) <= {0.0, 1.0} and (o[..., 0] == o[..., 2]).all() and o.any()
    np.testing.assert_array_equal(out1[..., 0], o[..., 0])
    before = _canny._cache_size()
    lower = np.asarray(canny(x, 20, 60, channels=1))  # thresholds and the hysteresis bound are traced:
    bounded = np.asarray(canny(x, 20, 60, channels=1, max_iterations=1))  # no new compile
    assert _canny._cache_size() == before
    assert lower.sum() > out1.sum() and bounded.sum() < lower.sum()
    # RGBA: the alpha channel is ignored
    rgba = np.concatenate([x, np.full(x.shape[:3] + (1,), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(np.asarray(canny(rgba, 100, 200, channels=1)), out1)


def test_canny_hysteresis_follows_weak_chains_up_to_the_bound():
    img = np.zeros((1, 16, 40, 1), np.uint8)
    img[0, 8:, 2:4] = 255  # a strong step at the left end
    img[0, 8:, 4:36] = 40  # a long weak step (above low, below high) continuing it
    full = np.asarray(canny(img, 100, 400, channels=1))[0, ..., 0] > 0
    ref = cv2.Canny(img[0, ..., 0], 100, 400) > 0
    np.testing.assert_array_equal(full, ref)
    assert full[:, 30:].any()  # reached by hysteresis only
    strong_only = np.asarray(canny(img, 100, 400, channels=1, max_iterations=0))[0, ..., 0] > 0
    assert strong_only.sum() < full.sum() and not strong_only[:, 30:].any()
    assert (strong_only <= full).all()
    partial = np.asarray(canny(img, 100, 400, channels=1, max_iterations=5))[0, ..., 0] > 0
    assert strong_only.sum() < partial.sum() < full.sum()


def test_canny_rejects_bad_input():
    with pytest.raises(ValueError, match="NHWC"):
        canny(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="NHWC"):
        canny(np.zeros((1, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        canny(np.zeros((1, 8, 8, 1), bool))
    with pytest.raises(ValueError, match="uint8"):
        canny(np.zeros((1, 8, 8, 1), np.uint16))
    with pytest.raises(ValueError, match="color"):
        canny(np.zeros((1, 8, 8, 1), np.uint8), color="hsv")
    with pytest.raises(ValueError, match="too large"):
        canny(np.zeros((1, 4, 4, 1), np.uint8), sigma=3.0)


def test_edge_agreement_counts():
    a = np.zeros((5, 5), bool)
    b = np.zeros((5, 5), bool)
    a[2, 1:4] = True
    b[3, 1:4] = True  # the same line one pixel lower
    assert edge_agreement(a, b)["f1"] == 0.0
    assert edge_agreement(a, b, tolerance=1)["f1"] == 1.0
    assert edge_agreement(a, a)["iou"] == 1.0


# ------------------------------------------------------------------------------------- diffusers parity


def _rand_pil(rng, h, w, mode):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def control_processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)


@pytest.mark.parametrize("resize_mode", ["default", "crop", "fill"])
def test_prepare_control_image_equals_diffusers_for_pil(control_processor, resize_mode):
    rng = np.random.default_rng(0)
    sizes = [(37, 53, None, None), (37, 53, 24, 40), (60, 30, 32, 48), (30, 60, 48, 32), (64, 64, 40, 43)]
    for h, w, height, width in sizes:
        for mode in ("RGB", "L", "RGBA", "P"):
            images = [_rand_pil(rng, h, w, mode) for _ in range(2)]
            ref = control_processor.preprocess(images, height=height, width=width, resize_mode=resize_mode)
            ours = prepare_control_image(images, height, width, batch_size=2, resize_mode=resize_mode)
            np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy(), err_msg=f"{mode} {h}x{w}->{height}x{width}")


def test_prepare_control_image_equals_diffusers_for_arrays(control_processor):
    rng = np.random.default_rng(1)
    for shape, height, width in [((2, 37, 53, 3), 24, 40), ((1, 16, 16, 3), 40, 24), ((1, 20, 24, 3), None, None)]:
        a = rng.random(shape).astype(np.float32)
        ref = control_processor.preprocess(a, height=height, width=width).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(prepare_control_image(a, height, width, batch_size=shape[0]), ref)
    # uint8 arrays are scaled to [0, 1] (diffusers would keep 0..255); gray arrays become RGB
    u8 = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    out = prepare_control_image(u8)
    assert out.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(out[0, ..., 1], u8 / np.float32(255))
    with pytest.raises(ValueError, match="needs PIL images"):
        prepare_control_image(u8, resize_mode="crop")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        prepare_control_image(np.full((8, 8, 3), 2.0, np.float32))


@pytest.mark.parametrize(
    "n_images,prompts,per_prompt,cfg,guess",
    [(1, 1, 1, False, False), (1, 2, 3, True, False), (2, 2, 3, True, False), (2, 2, 2, True, True), (3, 3, 1, False, False)],
)
def test_prepare_control_image_batch_rules_equal_the_pipeline(control_processor, n_images, prompts, per_prompt, cfg, guess):
    from diffusers import StableDiffusionControlNetPipeline

    rng = np.random.default_rng(2)
    images = [_rand_pil(rng, 24, 32, "RGB") for _ in range(n_images)]

    class Stub:  # prepare_image only touches control_image_processor
        control_image_processor = control_processor

    ref = StableDiffusionControlNetPipeline.prepare_image(
        Stub(), images if n_images > 1 else images[0], 32, 24, prompts * per_prompt, per_prompt,
        torch.device("cpu"), torch.float32, do_classifier_free_guidance=cfg, guess_mode=guess,
    )
    ours = prepare_control_image(
        images if n_images > 1 else images[0], 24, 32, batch_size=prompts * per_prompt,
        num_images_per_prompt=per_prompt, do_classifier_free_guidance=cfg, guess_mode=guess,
    )
    np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy())


def test_prepare_control_image_rejects_mismatched_batches():
    img = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="must be 1 or equal to the prompt batch size 3"):
        prepare_control_image(img, batch_size=3)
    with pytest.raises(ValueError, match="multiple of num_images_per_prompt"):
        prepare_control_image(img, batch_size=3, num_images_per_prompt=2)


def test_prepare_adapter_image_equals_diffusers():
    from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image

    rng = np.random.default_rng(3)
    for mode, channels in (("RGB", 3), ("L", 1)):
        images = [_rand_pil(rng, 37, 53, mode) for _ in range(2)]
        ref = _preprocess_adapter_image(images, 32, 48).permute(0, 2, 3, 1).numpy()
        ours = prepare_adapter_image(images, 32, 48)
        assert ours.shape == (2, 32, 48, channels)
        np.testing.assert_array_equal(ours, ref)
    # a 1-channel (sketch / canny) adapter given an RGB image: as diffusers on the image converted to "L"
    rgb = _rand_pil(rng, 40, 40, "RGB")
    ref = _preprocess_adapter_image(rgb.convert("L"), 32, 32).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(prepare_adapter_image(rgb, 32, 32, in_channels=1), ref)
    # and a 3-channel adapter given a gray image
    gray = _rand_pil(rng, 40, 40, "L")
    ref = _preprocess_adapter_image(gray.convert("RGB"), 32, 32).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(prepare_adapter_image(gray, 32, 32, in_channels=3), ref)
    # arrays: channel conversion, no resizing
    arr = rng.random((1, 16, 16, 3)).astype(np.float32)
    assert prepare_adapter_image(arr, in_channels=1).shape == (1, 16, 16, 1)
    with pytest.raises(ValueError, match="resize them first"):
        prepare_adapter_image(arr, 32, 32)


def test_default_height_width_rounding_rules():
    im = Image.new("RGB", (53, 37))  # W x H
    assert default_height_width(im, None, None, 8) == (32, 48)
    assert default_height_width(im, 30, 45, 8) == (24, 40)  # VaeImageProcessor rounds given sizes too
    assert default_height_width(im, 30, 45, 8, round_given=False) == (30, 45)  # the adapter pipeline does not
    assert default_height_width(im, None, None, 16, round_given=False) == (32, 48)


# ------------------------------------------------------------------------------------------- loading


def test_load_image_reads_and_converts(tmp_path):
    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    im = load_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.size == (5, 4)
    np.testing.assert_array_equal(np.asarray(im), arr)
    assert load_image(tmp_path / "a.png", "L").mode == "L"
    assert len(load_images([tmp_path / "a.png"] * 2)) == 2
    with pytest.raises(ValueError, match="empty"):  # a 4x5 image rounds down to 0x0 at multiples of 8
        prepare_control_image(load_image(tmp_path / "a.png"))


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match=f"{tmp_path / 'missing.png'}: image file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
    (tmp_path / "junk.png").write_bytes(b"definitely not an image")
    with pytest.raises(ImageLoadError, match=f"{tmp_path / 'junk.png'}: cannot open as an image"):
        load_image(tmp_path / "junk.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    assert isinstance(ImageLoadError("x"), ValueError)


def test_depth_maps_near_float64s_range_stay_finite_and_scale_free():
    """Depth is normalised per map, so scaling a map changes nothing; values near float64's limit
    (whose range overflows) come out the same as the scaled-down map, not NaN."""
    from jaxcontrol.preprocess import prepare_depth_map

    base = np.random.default_rng(0).normal(size=(1, 5, 7))
    want = prepare_depth_map(base, 1, 8, 8)
    for scale in (2.0 ** 1000, 2.0 ** -40):
        np.testing.assert_array_equal(prepare_depth_map(base * scale, 1, 8, 8), want)
    extreme = prepare_depth_map(np.float64([[1e308, -1e308], [0.0, 1.0]]), 1, 8, 8)
    assert np.isfinite(extreme).all() and extreme.min() == -1.0 and extreme.max() == 1.0
