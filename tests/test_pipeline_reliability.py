"""Pipeline reliability: no silent wrong output (non-finite values, ignored or clamped settings,
guessed input layouts), behaviour diffusers takes from the model config, resolved settings."""

import jax
import numpy as np
import pytest
from PIL import Image

from jaxcontrol.errors import ConfigError, NonFiniteError
from jaxcontrol.images import save_png
from jaxcontrol.pipeline import AdapterInput, ControlInput, Pipeline, default_mesh
from jaxcontrol.preprocess import load_image, prepare_mask
from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

H = W = 16  # pixels; latents 8x8 (VAE factor 2)
ONE_DEVICE = default_mesh(jax.devices()[:1])


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in ("controlnet", "adapter"):
        root = tmp_path_factory.mktemp(kind)
        out[kind] = (root / "pipeline", save_tiny_pipeline(root, kind=kind, scheduler="DDIMScheduler"))
    return out


@pytest.fixture(scope="module")
def cn_pipe(folders):
    return Pipeline.from_pretrained(folders["controlnet"][0], mesh=ONE_DEVICE)


def _control(seed, b=None):
    rng = np.random.default_rng(seed)
    return rng.random((H, W, 3) if b is None else (b, H, W, 3)).astype(np.float32)


KW = dict(height=H, width=W, num_inference_steps=2, guidance_scale=3.0, seed=3, output_type="float")


# ------------------------------------------------------------------------- 2. non-finite values


def _poisoned(pipe, component, path):
    """A copy of `pipe.params` with one bias set to NaN."""
    params = jax.tree_util.tree_map(lambda x: x, pipe.params)
    node = params[component]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = jax.numpy.full_like(node[path[-1]], np.nan)
    return params


def test_nan_latents_raise_naming_solver_step_and_image(cn_pipe):
    good = cn_pipe.params
    cn_pipe.params = _poisoned(cn_pipe, "unet", ("conv_out", "bias"))
    try:
        with pytest.raises(NonFiniteError, match=r"solver 'ddim', first at model evaluation 1 of 2, "
                                                 r"image index\(es\) \[4, 5\]"):
            cn_pipe(["a", "b"], controls=[ControlInput(_control(0))], image_indices=[4, 5], **KW)
    finally:
        cn_pipe.params = good


def test_nan_from_the_vae_decoder_is_named(cn_pipe):
    good = cn_pipe.params
    params = _poisoned(cn_pipe, "vae", ("decoder", "conv_out", "bias"))
    cn_pipe.params = params
    try:
        with pytest.raises(NonFiniteError, match="VAE decode"):
            cn_pipe("a", controls=[ControlInput(_control(0))], **KW)
        # latents themselves are fine, and returned
        latents = cn_pipe("a", controls=[ControlInput(_control(0))], **{**KW, "output_type": "latent"})
        assert np.isfinite(latents).all()
    finally:
        cn_pipe.params = good


def test_save_png_refuses_non_finite_images(tmp_path):
    img = np.zeros((4, 4, 3), np.float32)
    img[1, 1, 0] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        save_png(img, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------- 4. out-of-range values


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=1.5, init_image=np.zeros((H, W, 3))), "strength=1.5"),
    (dict(strength=0.0, init_image=np.zeros((H, W, 3))), "strength=0.0"),
    (dict(guidance_scale=-3.0), "guidance_scale=-3.0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_rescale=1.5), "guidance_rescale=1.5"),
    (dict(seed=10**20), "seed="),
    (dict(num_inference_steps=0), "num_inference_steps=0"),
    (dict(clip_skip=100), "clip_skip=100"),
    (dict(adapter_conditioning_factor=2.0), "adapter_conditioning_factor=2.0"),
    (dict(output_type="pil"), "output_type"),
    (dict(controls=[ControlInput(np.zeros((H, W, 3)), end=1.5)]), r"controls\[0\].end"),
    (dict(controls=[ControlInput(np.zeros((H, W, 3)), start=0.6, end=0.4)]), "must be smaller than"),
    (dict(controls=[ControlInput(np.zeros((H, W, 3)), scale=float("inf"))]), r"controls\[0\].scale"),
])
def test_out_of_range_arguments_are_errors_naming_them(cn_pipe, kwargs, match):
    kw = {**KW, "controls": [ControlInput(np.zeros((H, W, 3)))], **kwargs}
    with pytest.raises(ConfigError, match=match):
        cn_pipe("a", **kw)


def test_too_large_a_size_is_refused_before_allocating(cn_pipe):
    with pytest.raises(ConfigError, match="GiB"):
        cn_pipe("a", height=1 << 20, width=1 << 20, controls=[ControlInput(np.zeros((8, 8, 3)))])


# ------------------------------------------------------------------------- 5. global_pool_conditions


def test_global_pool_controlnet_gets_guess_mode_as_in_diffusers(tmp_path):
    ref = save_tiny_pipeline(tmp_path, kind="controlnet", scheduler="DDIMScheduler")
    ref.controlnet.register_to_config(global_pool_conditions=True)
    ref.save_pretrained(tmp_path / "pipeline")
    noise = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    control = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # guess_mode=False: diffusers turns it on from the ControlNet's config
        expected = ref("a red circle", image=control, height=H, width=W, num_inference_steps=3, guidance_scale=5.0,
                       latents=noise, output_type="np").images
    pipe = Pipeline.from_pretrained(tmp_path / "pipeline", mesh=ONE_DEVICE)
    ours = pipe("a red circle", height=H, width=W, num_inference_steps=3, guidance_scale=5.0,
                latents=noise.numpy().transpose(0, 2, 3, 1),
                controls=[ControlInput(control.numpy().transpose(0, 2, 3, 1))], output_type="float")
    assert pipe.last_settings["guess_mode"] is True
    assert _rel(ours, expected) < 1e-4


# ------------------------------------------------------------------------- 6. input layouts


@pytest.mark.parametrize("layout", ["hw", "hw1", "hw3_rgb", "1hw", "11hw", "pil_L", "pil_RGB", "pil_16bit",
                                    "uint8_hw", "bool_hw"])
def test_mask_layouts_give_the_same_latent_mask(layout):
    rng = np.random.default_rng(0)
    m = (rng.random((H, W)) > 0.5).astype(np.float32)
    given = {
        "hw": m, "hw1": m[..., None], "hw3_rgb": np.repeat(m[..., None], 3, -1), "1hw": m[None],
        "11hw": m[None, None], "pil_L": Image.fromarray((m * 255).astype(np.uint8), "L"),
        "pil_RGB": Image.fromarray((m * 255).astype(np.uint8), "L").convert("RGB"),
        "pil_16bit": Image.fromarray((m * 65535).astype(np.uint16)), "uint8_hw": (m * 255).astype(np.uint8),
        "bool_hw": m > 0.5,
    }[layout]
    expected = m[::2, ::2][None, :, :, None]  # PyTorch's nearest rule at factor 2
    out = prepare_mask(given, 2, H // 2, W // 2)
    assert out.shape == (2, H // 2, W // 2, 1)
    np.testing.assert_array_equal(out, np.repeat(expected, 2, axis=0))


def test_mask_binarised_at_half_like_diffusers():
    m = np.full((4, 4), 0.5, np.float32)  # diffusers' binarize: < 0.5 -> 0, >= 0.5 -> 1
    assert prepare_mask(m, 1, 4, 4).min() == 1.0
    with pytest.raises(ValueError, match="cannot tell the layout"):
        prepare_mask(np.zeros((2, 5, 6, 7)), 1, 4, 4)


def test_rgb_and_channels_first_masks_inpaint_like_a_plain_mask(cn_pipe):
    rng = np.random.default_rng(1)
    m = np.zeros((H, W), np.float32)
    m[:, W // 2:] = 1
    init = rng.random((H, W, 3)).astype(np.float32)
    kw = dict(KW, controls=[ControlInput(_control(0))], init_image=init, strength=1.0)
    plain = cn_pipe("a", mask=m, **kw)
    for layout in (np.repeat(m[..., None], 3, -1), m[None, None]):
        np.testing.assert_array_equal(cn_pipe("a", mask=layout, **kw), plain)


def test_per_prompt_control_images_with_several_images_per_prompt(cn_pipe):
    ca, cb = _control(10), _control(11)
    both = cn_pipe(["a", "b"], num_images_per_prompt=2, controls=[ControlInput(np.stack([ca, cb]))], **KW)
    alone_a = cn_pipe(["a"], num_images_per_prompt=2, controls=[ControlInput(ca)], image_indices=[0, 1], **KW)
    alone_b = cn_pipe(["b"], num_images_per_prompt=2, controls=[ControlInput(cb)], image_indices=[2, 3], **KW)
    np.testing.assert_allclose(both, np.concatenate([alone_a, alone_b]), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_per_prompt_adapter_images_with_several_images_per_prompt(folders):
    pipe = Pipeline.from_pretrained(folders["adapter"][0], mesh=ONE_DEVICE)
    ca, cb = _control(12), _control(13)
    both = pipe(["a", "b"], num_images_per_prompt=2, adapters=[AdapterInput(np.stack([ca, cb]))], **KW)
    alone_b = pipe(["b"], num_images_per_prompt=2, adapters=[AdapterInput(cb)], image_indices=[2, 3], **KW)
    np.testing.assert_allclose(both[2:], alone_b, rtol=0, atol=1e-6)


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16, dtype=np.float64).reshape(16, 16) / 255.0 * 65535).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth16.png")
    loaded = np.asarray(load_image(tmp_path / "depth16.png", mode="L")).astype(np.int64)
    expected = np.round(ramp / 65535.0 * 255.0).astype(np.int64)
    assert np.abs(loaded - expected).max() <= 1
    assert len(np.unique(loaded)) > 200  # PIL's own conversion clips almost all of it to 255
    rgb = np.asarray(load_image(tmp_path / "depth16.png", mode="RGB"))
    assert rgb.shape == (16, 16, 3) and np.abs(rgb[..., 0].astype(np.int64) - expected).max() <= 1


# ------------------------------------------------------------------------- 16. resolved settings


def test_last_settings_are_the_resolved_ones(cn_pipe):
    cn_pipe("a", controls=[ControlInput(_control(0), 0.7, 0.1, 0.9)], scheduler="dpmpp_2m", **KW)
    s = cn_pipe.last_settings
    assert s["solver"] == "dpmsolver_multistep" and s["scheduler_config"]["algorithm_type"] == "dpmsolver++"
    assert s["prediction_type"] == "epsilon" and s["classifier_free_guidance"] is True
    assert s["controlnets"] == [{"scale": 0.7, "start": 0.1, "end": 0.9, "resize_mode": "default"}]
    assert len(s["timesteps"]) == s["model_evaluations"] == 2


def test_init_images_are_scaled_like_other_images_and_floats_checked(cn_pipe):
    rng = np.random.default_rng(4)
    u8 = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    kw = dict(KW, controls=[ControlInput(_control(0))], strength=0.6)
    as_float = cn_pipe("a", init_image=u8.astype(np.float32) / 255.0, **kw)
    np.testing.assert_array_equal(cn_pipe("a", init_image=u8, **kw), as_float)
    np.testing.assert_array_equal(cn_pipe("a", init_image=Image.fromarray(u8), **kw), as_float)
    with pytest.raises(ConfigError, match="init_image: float images must be finite and in"):
        cn_pipe("a", init_image=u8.astype(np.float32), **kw)


@pytest.mark.slow
def test_compile_cache_is_keyed_by_the_settings(folders):
    from jaxcontrol.pipeline import CallSettings

    pipe = Pipeline.from_pretrained(folders["controlnet"][0], mesh=ONE_DEVICE)
    pipe("a", controls=[ControlInput(_control(0), 1.0)], **KW)
    assert len(pipe._programs) == 1 and all(isinstance(k, CallSettings) for k in pipe._programs)
    # traced values only: a scale, the seed, the guidance scale (same side of 1), the prompt
    pipe("b", controls=[ControlInput(_control(1), 0.3)], **{**KW, "seed": 9, "guidance_scale": 6.0})
    assert len(pipe._programs) == 1
    # a static field: the control window, CFG on/off, the step count
    pipe("a", controls=[ControlInput(_control(0), 1.0, 0.0, 0.5)], **KW)
    pipe("a", controls=[ControlInput(_control(0))], **{**KW, "guidance_scale": 1.0})
    pipe("a", controls=[ControlInput(_control(0))], **{**KW, "num_inference_steps": 3})
    assert len(pipe._programs) == 4
