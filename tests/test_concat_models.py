"""Concatenation-conditioned U-Nets against diffusers' pipelines on tiny random folders saved with
`save_pretrained`: SD inpainting (9 input channels, also with a ControlNet), Depth2Image (5) and
InstructPix2Pix (8). The same weights, noise and scheduler; final images compared."""

import sys
from contextlib import contextmanager

import numpy as np
import pytest

from jaxcontrol.errors import ConfigError
from jaxcontrol.models.kinds import unet_kind
from jaxcontrol.pipeline import ControlInput, Pipeline
from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle with light blue background", "a green square"]
H = W = 16  # pixels; latents 8x8 (VAE factor 2)
SF = 0.18215  # the tiny VAE's scaling_factor (diffusers' default)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _latents(b, seed):
    return torch.randn(b, 4, H // 2, W // 2, generator=_gen(seed))


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def _images(b, seed):
    return torch.rand(b, 3, H, W, generator=_gen(seed))


def _masks(b):
    m = torch.zeros(b, 1, H, W)
    m[0, :, 3:11, 5:14] = 1.0
    m[-1, :, 8:, :7] = 1.0
    return m


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in ("inpaint", "controlnet-inpaint", "depth", "instruct-pix2pix"):
        root = tmp_path_factory.mktemp(kind)
        pipe = save_tiny_pipeline(root, kind=kind)
        pipe.scheduler = diffusers.DDIMScheduler.from_pretrained(root / "pipeline", subfolder="scheduler")
        out[kind] = (root / "pipeline", pipe)
    return out


@contextmanager
def fixed_draws(pipe, *, encoded=None, noise=None):
    """diffusers' VAE posterior samples (`retrieve_latents`) return `encoded` / scaling_factor and
    its start noise (`randn_tensor`) returns `noise`, so both sides start from the same numbers."""
    module = sys.modules[type(pipe).__module__]
    saved = module.retrieve_latents, module.randn_tensor
    if encoded is not None:
        module.retrieve_latents = lambda *a, **k: encoded[: a[0].latent_dist.mean.shape[0]] / SF
    if noise is not None:
        module.randn_tensor = lambda shape, **k: noise.clone()
    try:
        yield
    finally:
        module.retrieve_latents, module.randn_tensor = saved


def test_kinds_follow_the_input_width_and_the_pipeline_class():
    assert [unet_kind(c) for c in (4, 5, 8, 9)] == ["text2image", "depth", "instruct_pix2pix", "inpaint"]
    assert unet_kind(9, pipeline_class="StableDiffusionInpaintPipeline") == "inpaint"
    assert unet_kind(4, pipeline_class="StableDiffusionInpaintPipeline") == "text2image"  # blends, as diffusers
    with pytest.raises(ConfigError, match="in_channels=7"):
        unet_kind(7)
    with pytest.raises(ConfigError, match="StableDiffusionDepth2ImgPipeline.*in_channels=9"):
        unet_kind(9, pipeline_class="StableDiffusionDepth2ImgPipeline")


@pytest.mark.parametrize("strength", [pytest.param(1.0, marks=pytest.mark.slow), 0.75])
def test_inpainting_model_matches_diffusers(folders, strength):
    path, ref_pipe = folders["inpaint"]
    noise, images, masks, masked = _latents(2, 0), _images(2, 1), _masks(2), _latents(2, 2)
    known = _latents(2, 3)
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=6.0, strength=strength)
    with fixed_draws(ref_pipe, encoded=known, noise=noise), torch.no_grad():
        ref = ref_pipe(PROMPTS, image=images, mask_image=masks, masked_image_latents=masked,
                       latents=noise if strength == 1.0 else None, output_type="np", **kw).images
    pipe = Pipeline.from_pretrained(path)
    assert pipe.kind == "inpaint" and pipe.latent_channels == 4
    start = dict(init_image=_nhwc(images)) if strength == 1.0 else dict(init_latents=_nhwc(known))
    ours = pipe(PROMPTS, mask=_nhwc(masks), masked_image_latents=_nhwc(masked), latents=_nhwc(noise),
                scheduler="ddim", output_type="float", **start, **kw)
    assert _rel(ours, ref) < 1e-4
    assert pipe.last_settings["kind"] == "inpaint" and pipe.last_settings["mode"] == "inpaint"


def test_inpainting_inputs_are_diffusers_mask_and_masked_image(folders):
    """Without `masked_image_latents` the program VAE-encodes the masked image: the mask and the
    masked image it starts from are what diffusers' `prepare_mask_latents` receives."""
    path, ref_pipe = folders["inpaint"]
    images = _images(2, 4)
    masks = torch.rand(2, 1, H, W, generator=_gen(5))  # soft values: binarised at 0.5 on both sides
    seen = {}
    original = ref_pipe.prepare_mask_latents

    def spy(mask, masked_image, *a, **k):
        seen["mask"], seen["masked"] = mask.clone(), masked_image.clone()
        out = original(mask, masked_image, *a, **k)
        seen["latent_mask"] = out[0][: mask.shape[0]].clone()
        return out

    ref_pipe.prepare_mask_latents = spy
    try:
        with torch.no_grad():
            ref_pipe(PROMPTS, image=images, mask_image=masks, height=H, width=W, num_inference_steps=1,
                     output_type="latent")
    finally:
        del ref_pipe.prepare_mask_latents
    pipe = Pipeline.from_pretrained(path)
    settings, per_image, _, _ = pipe.check_inputs(PROMPTS, init_image=_nhwc(images), mask=_nhwc(masks),
                                                  height=H, width=W)
    assert settings.masked_from == "images"
    np.testing.assert_allclose(per_image["masked_images"], _nhwc(seen["masked"]), atol=1e-6)
    np.testing.assert_array_equal(per_image["mask"], _nhwc(seen["latent_mask"]))
    # and the program runs that path end to end
    out = pipe(PROMPTS, init_image=_nhwc(images), mask=_nhwc(masks), height=H, width=W, num_inference_steps=2,
               output_type="float")  # strength 1.0 by default when inpainting, as diffusers (PNDM could not start later)
    assert pipe.last_settings["strength"] == 1.0
    assert out.shape == (2, H, W, 3) and np.isfinite(out).all()


def test_controlnet_with_an_inpainting_model_matches_diffusers(folders):
    path, ref_pipe = folders["controlnet-inpaint"]
    noise, images, masks, masked, control = _latents(2, 6), _images(2, 7), _masks(2), _latents(2, 8), _images(2, 9)
    kw = dict(height=H, width=W, num_inference_steps=3, guidance_scale=5.0)  # diffusers' default strength, 1.0
    with fixed_draws(ref_pipe, encoded=masked), torch.no_grad():
        ref = ref_pipe(PROMPTS, image=images, mask_image=masks, control_image=control, latents=noise,
                       controlnet_conditioning_scale=0.7, output_type="np", **kw).images
    pipe = Pipeline.from_pretrained(path)
    assert pipe.kind == "inpaint" and len(pipe.controlnets) == 1
    ours = pipe(PROMPTS, init_image=_nhwc(images), mask=_nhwc(masks), masked_image_latents=_nhwc(masked),
                controls=[ControlInput(_nhwc(control), 0.7)], latents=_nhwc(noise), scheduler="ddim",
                output_type="float", **kw)
    assert _rel(ours, ref) < 1e-4


def test_depth_model_matches_diffusers(folders):
    path, ref_pipe = folders["depth"]
    noise, images, known = _latents(2, 10), _images(2, 11), _latents(2, 12)
    depth = torch.rand(2, 23, 19, generator=_gen(13)) * 7.0 + 1.0  # any size and scale
    kw = dict(num_inference_steps=4, guidance_scale=6.0, strength=0.75)
    with fixed_draws(ref_pipe, encoded=known, noise=noise), torch.no_grad():
        ref = ref_pipe(PROMPTS, image=images, depth_map=depth, output_type="np", **kw).images
    pipe = Pipeline.from_pretrained(path)
    assert pipe.kind == "depth"
    ours = pipe(PROMPTS, init_latents=_nhwc(known), depth_map=depth.numpy(), latents=_nhwc(noise), height=H,
                width=W, scheduler="ddim", output_type="float", **kw)
    assert _rel(ours, ref) < 1e-4


@pytest.mark.parametrize("guidance_scale,image_guidance_scale", [pytest.param(6.0, 1.7, marks=pytest.mark.slow), (1.0, 1.5)])
def test_instruct_pix2pix_matches_diffusers(folders, guidance_scale, image_guidance_scale):
    path, ref_pipe = folders["instruct-pix2pix"]
    noise, images = _latents(2, 14), _images(2, 15)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, image=images, num_inference_steps=4, guidance_scale=guidance_scale,
                       image_guidance_scale=image_guidance_scale, latents=noise, output_type="np").images
    pipe = Pipeline.from_pretrained(path)
    assert pipe.kind == "instruct_pix2pix"
    ours = pipe(PROMPTS, init_image=_nhwc(images), num_inference_steps=4, guidance_scale=guidance_scale,
                image_guidance_scale=image_guidance_scale, latents=_nhwc(noise), height=H, width=W,
                scheduler="ddim", output_type="float")
    assert _rel(ours, ref) < 1e-4
    resolved = pipe.last_settings
    assert resolved["kind"] == "instruct_pix2pix" and resolved["image_guidance_scale"] == image_guidance_scale
    assert resolved["classifier_free_guidance"] == (guidance_scale > 1.0)


def test_wrong_inputs_for_the_kind_are_named(folders):
    inpaint = Pipeline.from_pretrained(folders["inpaint"][0])
    depth = Pipeline.from_pretrained(folders["depth"][0])
    ip2p = Pipeline.from_pretrained(folders["instruct-pix2pix"][0])
    img, mask = _nhwc(_images(1, 0)), _nhwc(_masks(1))
    kw = dict(height=H, width=W)
    cases = [
        (inpaint, dict(), "needs `mask` and `init_image`"),
        (inpaint, dict(init_image=img, mask=mask, inpaint_method="repaint"), "use inpaint_method='partial'"),
        (inpaint, dict(init_image=img, mask=mask, depth_map=np.ones((4, 4))), "depth_map is an input of 'depth'"),
        (inpaint, dict(init_image=img, mask=mask, image_guidance_scale=1.5), "image_guidance_scale is an input"),
        (depth, dict(), "needs `depth_map`"),
        (depth, dict(depth_map=np.ones((4, 4))), "constant"),
        (depth, dict(depth_map=np.random.rand(4, 4), init_image=img, mask=mask), "does not inpaint"),
        (ip2p, dict(), "needs the image to edit"),
        (ip2p, dict(init_image=img, image_guidance_scale=-1.0), "image_guidance_scale=-1.0 is out of range"),
        (ip2p, dict(init_image=img, guidance_rescale=0.5), "guidance_rescale"),
        (ip2p, dict(init_image=img, mask=mask), "takes `init_image` alone"),
        (inpaint, dict(init_image=img, mask=mask, masked_image_latents=np.zeros((3, 3, 4))), "masked_image_latents"),
        (inpaint, dict(init_image=img, mask=mask, masked_image_latents=np.full((1, 8, 8, 4), np.nan, np.float32)),
         "masked_image_latents holds NaN"),
        (ip2p, dict(init_image=img, strength=0.5), "strength does not apply"),
        (ip2p, dict(init_image=img, image_guidance_scale=True), "image_guidance_scale must be a finite number"),
        (depth, dict(depth_map=np.random.rand(3, 5, 5)), r"3 depth maps .* give 1$"),
    ]
    for pipe, options, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe.check_inputs("a", **kw, **options)
    # an RGB rendering of a depth map is read as its luma, like an RGB PIL image
    rgb = np.random.default_rng(0).random((20, 24, 3))
    per_image = depth.check_inputs("a", depth_map=rgb, **kw)[1]
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(per_image["depth"], depth.check_inputs("a", depth_map=luma, **kw)[1]["depth"], atol=1e-6)


def test_strength_defaults_follow_the_mode_as_in_diffusers(folders):
    img, mask = _nhwc(_images(1, 0)), _nhwc(_masks(1))
    depth = Pipeline.from_pretrained(folders["depth"][0])
    settings = depth.check_inputs("a", init_image=img, depth_map=np.random.rand(5, 5), height=H, width=W)[0]
    assert settings.mode == "img2img" and settings.strength == 0.8  # Depth2Img / img2img: 0.8
    inpaint = Pipeline.from_pretrained(folders["inpaint"][0])
    settings = inpaint.check_inputs("a", init_image=img, mask=mask, height=H, width=W)[0]
    assert settings.mode == "inpaint" and settings.strength == 1.0  # the inpainting pipelines: 1.0
    assert inpaint.check_inputs("a", init_image=img, mask=mask, strength=0.6, height=H, width=W)[0].strength == 0.6
