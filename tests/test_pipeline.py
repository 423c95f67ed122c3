"""End-to-end: our Pipeline against diffusers' pipelines on tiny random folders; sharding; bad input."""

import jax
import numpy as np
import pytest

from jaxcontrol.errors import ConfigError
from jaxcontrol.pipeline import AdapterInput, ControlInput, Pipeline, default_mesh
from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle with light blue background", "a green square"]
H = W = 16  # pixels; latents 8x8 (VAE factor 2)


def _noise(b, seed=0):
    return torch.randn(b, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def _control(b, seed=1):
    return torch.rand(b, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in ("sd", "multi-controlnet", "adapter"):
        root = tmp_path_factory.mktemp(kind)
        out[kind] = (root / "pipeline", save_tiny_pipeline(root, kind=kind))
    return out


@pytest.mark.parametrize("scheduler,solver", [
    ("DDIMScheduler", "ddim"), pytest.param("EulerDiscreteScheduler", "euler", marks=pytest.mark.slow)])
def test_stable_diffusion_pipeline(folders, scheduler, solver):
    path, ref_pipe = folders["sd"]
    # from the saved folder: an in-memory config also carries `_use_default_values`, which makes
    # diffusers' from_config drop fields (such as timestep_spacing) that the saved JSON does set
    ref_pipe.scheduler = getattr(diffusers, scheduler).from_pretrained(path, subfolder="scheduler")
    noise = _noise(2)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, height=H, width=W, num_inference_steps=4, guidance_scale=6.0, latents=noise,
                       output_type="np").images
    ours = Pipeline.from_pretrained(path)(PROMPTS, height=H, width=W, num_inference_steps=4, guidance_scale=6.0,
                                          scheduler=solver, latents=_nhwc(noise), output_type="float")
    assert _rel(ours, ref) < 1e-4


@pytest.mark.slow  # the same rules are checked at the sampler level in test_sampling_pipelines.py
def test_multi_controlnet_pipeline_guess_mode_and_windows(folders):
    path, ref_pipe = folders["multi-controlnet"]
    noise, c0, c1 = _noise(2, 3), _control(2, 4), _control(1, 5)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, image=[c0, c1.repeat(2, 1, 1, 1)], height=H, width=W, num_inference_steps=5,
                       guidance_scale=5.0, latents=noise, controlnet_conditioning_scale=[0.9, 0.6],
                       control_guidance_start=[0.0, 0.2], control_guidance_end=[0.8, 1.0], guess_mode=True,
                       output_type="np").images
    pipe = Pipeline.from_pretrained(path)
    ours = pipe(PROMPTS, height=H, width=W, num_inference_steps=5, guidance_scale=5.0, latents=_nhwc(noise),
                controls=[ControlInput(_nhwc(c0), 0.9, 0.0, 0.8), ControlInput(_nhwc(c1), 0.6, 0.2, 1.0)],
                guess_mode=True, output_type="float")
    assert _rel(ours, ref) < 1e-4


@pytest.mark.slow
def test_adapter_pipeline(folders):
    path, ref_pipe = folders["adapter"]
    noise, img = _noise(2, 6), _control(2, 7)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, image=img, height=H, width=W, num_inference_steps=4, guidance_scale=5.0,
                       latents=noise, adapter_conditioning_scale=0.8, output_type="np").images
    ours = Pipeline.from_pretrained(path)(PROMPTS, height=H, width=W, num_inference_steps=4, guidance_scale=5.0,
                                          latents=_nhwc(noise), adapters=[AdapterInput(_nhwc(img), 0.8)],
                                          output_type="float")
    assert _rel(ours, ref) < 1e-4


def test_sharded_output_equals_single_device(folders):
    path, _ = folders["sd"]
    assert jax.device_count() == 8
    kw = dict(height=H, width=W, num_inference_steps=3, guidance_scale=4.0, seed=7, output_type="float",
              num_images_per_prompt=3)  # 6 images: padded to 8 on the 8-device mesh
    sharded = Pipeline.from_pretrained(path)(PROMPTS, **kw)
    single = Pipeline.from_pretrained(path, mesh=default_mesh(jax.devices()[:1]))(PROMPTS, **kw)
    assert sharded.shape == (6, H, W, 3)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    # image i depends only on (seed, i), not on its place in the batch
    swapped = Pipeline.from_pretrained(path)(PROMPTS[::-1], image_indices=[3, 4, 5, 0, 1, 2], **kw)
    np.testing.assert_allclose(swapped[:3], sharded[3:], rtol=0, atol=1e-5)


def test_bad_inputs_name_the_problem(folders):
    path, _ = folders["multi-controlnet"]
    pipe = Pipeline.from_pretrained(path)
    with pytest.raises(ConfigError, match="multiples of 2"):
        pipe("a", height=15, width=16)
    with pytest.raises(ConfigError, match="give a control image for each"):
        pipe("a", height=H, width=W, num_inference_steps=2)
    with pytest.raises(ConfigError, match=r"2 ControlNets are loaded \(2 from the pipeline folder's controlnet/, "
                                          r"0 given besides\) but 1"):
        pipe("a", height=H, width=W, controls=[ControlInput(np.zeros((H, W, 3)))])
    with pytest.raises(ConfigError, match="latents must have shape"):
        pipe("a", height=H, width=W, latents=np.zeros((1, 4, 4, 4)),
             controls=[ControlInput(np.zeros((H, W, 3)))] * 2)


@pytest.mark.slow
def test_bf16_unet_with_float32_vae_stays_close(folders):
    path, _ = folders["sd"]
    kw = dict(height=H, width=W, num_inference_steps=3, guidance_scale=4.0, seed=1, output_type="float")
    f32 = Pipeline.from_pretrained(path)(PROMPTS[:1], **kw)
    pipe = Pipeline.from_pretrained(path, dtype="bfloat16", vae_dtype="float32")
    assert pipe.vae.dtype == np.float32 and pipe.unet.dtype != np.float32
    bf16 = pipe(PROMPTS[:1], **kw)
    assert np.isfinite(bf16).all()
    assert np.abs(bf16 - f32).max() < 0.05
