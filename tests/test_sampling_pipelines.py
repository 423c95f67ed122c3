"""Our sampler + guidance rules against diffusers' ControlNet and T2I-Adapter pipelines (tiny models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol import guidance as G
from jaxcontrol.sampler import img2img, initial_latents, sample
from jaxcontrol.schedulers import make_plan
from jaxcontrol.testing.pipeline_parity import (
    build_tiny_models,
    diffusers_latents,
    load_ours,
    reference_loop,
    to_nhwc,
)
from jaxcontrol.testing.solver_parity import SD_BETAS

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD15_SCHEDULER = {**SD_BETAS, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                  "skip_prk_steps": True}
SOLVERS = [
    ("DDIMScheduler", "ddim"),
    ("DDPMScheduler", "ddpm"),
    ("PNDMScheduler", "pndm"),
    ("EulerDiscreteScheduler", "euler"),
    ("EulerAncestralDiscreteScheduler", "euler_ancestral"),
    ("HeunDiscreteScheduler", "heun"),
    ("DPMSolverMultistepScheduler", "dpmsolver_multistep"),
    ("UniPCMultistepScheduler", "unipc"),
    ("LCMScheduler", "lcm"),
]
STEPS, SCALE = 4, 5.0


def _inputs(seed=0, batch=1, latent=8, seq=6, dim=32, images=2):
    g = torch.Generator().manual_seed(seed)
    pe, ne = torch.randn(batch, seq, dim, generator=g), torch.randn(batch, seq, dim, generator=g)
    lat = torch.randn(batch, 4, latent, latent, generator=g)
    imgs = [torch.rand(batch, 3, 2 * latent, 2 * latent, generator=g) for _ in range(images)]
    return pe, ne, lat, imgs


def _rel(ours_nhwc, ref_nchw):
    ours = np.asarray(ours_nhwc).transpose(0, 3, 1, 2)
    return float(np.abs(ours - ref_nchw).max() / np.abs(ref_nchw).max())


@pytest.fixture(scope="module")
def tiny_cn(tmp_path_factory):
    tiny = build_tiny_models(tmp_path_factory.mktemp("cn"))
    return tiny, {k: load_ours(tiny, k) for k in ("unet", "controlnet_0", "controlnet_1")}


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    tiny = build_tiny_models(tmp_path_factory.mktemp("ad"), adapter=True)
    return tiny, {k: load_ours(tiny, k) for k in ("unet", "adapter", "adapter_2")}


def test_every_solver_matches_the_controlnet_pipeline(tiny_cn):
    """CFG + one ControlNet with a guidance window, each solver, against diffusers' pipeline loop."""
    tiny, ours = tiny_cn
    (unet, up), (cn, cp) = ours["unet"], ours["controlnet_0"]
    pe, ne, lat, imgs = _inputs()
    unit = G.ControlNetUnit(cn, cp, scale=0.8, start=0.0, end=0.75)
    model = jax.jit(G.classifier_free(G.unet_prediction(unet, up, controlnets=[unit]), SCALE))
    img = to_nhwc(imgs[0])
    cond = {"cond": {"text": jnp.asarray(pe.numpy()), "control": (img,)},
            "uncond": {"text": jnp.asarray(ne.numpy()), "control": (img,)}}
    errors = {}
    for class_name, solver in SOLVERS:
        config = {**SD15_SCHEDULER, "_class_name": class_name}
        plan = make_plan(config, STEPS, solver)
        noises = np.random.default_rng(1).standard_normal((plan.num_evals,) + tuple(lat.shape)).astype(np.float32)
        ref = diffusers_latents(
            tiny, getattr(diffusers, class_name).from_config(config), prompt_embeds=pe, negative_prompt_embeds=ne,
            latents=lat, steps=STEPS, guidance_scale=SCALE, noises=noises, controlnets=["controlnet_0"],
            images=imgs[:1], controlnet_conditioning_scale=0.8, control_guidance_start=0.0, control_guidance_end=0.75)
        x = initial_latents(plan, to_nhwc(lat))
        ours_out = reference_loop(model, plan, x, cond, noises=noises.transpose(0, 1, 3, 4, 2))
        errors[solver] = _rel(ours_out, ref)
    assert all(e <= 1e-4 for e in errors.values()), errors


def test_multi_controlnet_guess_mode_windows_in_the_scan(tiny_cn):
    tiny, ours = tiny_cn
    (unet, up), (cn0, p0), (cn1, p1) = ours["unet"], ours["controlnet_0"], ours["controlnet_1"]
    pe, ne, lat, imgs = _inputs(seed=3)
    config = {**SD15_SCHEDULER, "_class_name": "DPMSolverMultistepScheduler"}
    steps = 5
    ref = diffusers_latents(
        tiny, diffusers.DPMSolverMultistepScheduler.from_config(config), prompt_embeds=pe, negative_prompt_embeds=ne,
        latents=lat, steps=steps, guidance_scale=SCALE, controlnets=["controlnet_0", "controlnet_1"], images=imgs,
        controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.3],
        control_guidance_end=[0.6, 1.0], guess_mode=True)
    units = [G.ControlNetUnit(cn0, p0, 0.8, 0.0, 0.6, guess_mode=True),
             G.ControlNetUnit(cn1, p1, 0.5, 0.3, 1.0, guess_mode=True)]
    model = G.classifier_free(G.unet_prediction(unet, up, controlnets=units), SCALE)
    images = tuple(to_nhwc(i) for i in imgs)
    cond = {"cond": {"text": jnp.asarray(pe.numpy()), "control": images, "control_mask": jnp.ones((1,))},
            "uncond": {"text": jnp.asarray(ne.numpy()), "control": images, "control_mask": jnp.zeros((1,))}}
    plan = make_plan(config, steps)
    out = jax.jit(lambda x: sample(model, plan, initial_latents(plan, x), cond))(to_nhwc(lat))
    assert _rel(out, ref) <= 1e-4


@pytest.mark.parametrize("class_name,solver", [
    ("DDIMScheduler", "ddim"), pytest.param("UniPCMultistepScheduler", "unipc", marks=pytest.mark.slow)])
def test_controlnet_img2img_pipeline_in_the_scan(tiny_cn, class_name, solver):
    tiny, ours = tiny_cn
    (unet, up), (cn, cp) = ours["unet"], ours["controlnet_0"]
    pe, ne, noise, imgs = _inputs(seed=5)
    init = torch.randn(noise.shape, generator=torch.Generator().manual_seed(6))
    config = {**SD15_SCHEDULER, "_class_name": class_name}
    steps, strength = 6, 0.6
    ref = diffusers_latents(
        tiny, getattr(diffusers, class_name).from_config(config), prompt_embeds=pe, negative_prompt_embeds=ne,
        latents=noise, steps=steps, guidance_scale=SCALE, controlnets=["controlnet_0"], images=imgs[:1],
        init_latents=init, strength=strength, controlnet_conditioning_scale=0.9)
    model = G.classifier_free(G.unet_prediction(unet, up, controlnets=[G.ControlNetUnit(cn, cp, 0.9)]), SCALE)
    img = to_nhwc(imgs[0])
    cond = {"cond": {"text": jnp.asarray(pe.numpy()), "control": (img,)},
            "uncond": {"text": jnp.asarray(ne.numpy()), "control": (img,)}}
    plan = make_plan(config, steps, strength=strength)
    out = jax.jit(lambda a, z: img2img(model, plan, a, z, cond))(to_nhwc(init), to_nhwc(noise))
    assert _rel(out, ref) <= 1e-4


def _adapter_setup(tiny_adapter, multi, scale):
    tiny, ours = tiny_adapter
    (ad, ap), (ad2, ap2) = ours["adapter"], ours["adapter_2"]
    pe, ne, lat, imgs = _inputs(seed=4, latent=8, images=2)
    if multi:
        from jaxcontrol.models.adapter import MultiAdapter

        multi_adapter, mparams = MultiAdapter.from_adapters([(ad, ap), (ad2, ap2)])
        feats = G.adapter_features(multi_adapter, mparams, [to_nhwc(i) for i in imgs], scale)
    else:
        feats = G.adapter_features(ad, ap, to_nhwc(imgs[0]), scale)
    cond = {"cond": {"text": jnp.asarray(pe.numpy()), "adapter": feats},
            "uncond": {"text": jnp.asarray(ne.numpy()), "adapter": feats}}
    return pe, ne, lat, imgs, cond


@pytest.mark.parametrize("multi", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_adapter_pipeline_in_the_scan(tiny_adapter, multi):
    tiny, ours = tiny_adapter
    unet, up = ours["unet"]
    scale = [0.7, 0.4] if multi else 0.7
    pe, ne, lat, imgs, cond = _adapter_setup(tiny_adapter, multi, scale)
    config = {**SD15_SCHEDULER, "_class_name": "EulerDiscreteScheduler"}
    names = ["adapter", "adapter_2"] if multi else ["adapter"]
    ref = diffusers_latents(
        tiny, diffusers.EulerDiscreteScheduler.from_config(config), prompt_embeds=pe, negative_prompt_embeds=ne,
        latents=lat, steps=STEPS, guidance_scale=SCALE, adapters=names, images=imgs[: len(names)],
        adapter_conditioning_scale=scale)
    model = G.classifier_free(G.unet_prediction(unet, up), SCALE)
    plan = make_plan(config, STEPS)
    out = jax.jit(lambda x: sample(model, plan, initial_latents(plan, x), cond))(to_nhwc(lat))
    assert _rel(out, ref) <= 1e-4


@pytest.mark.slow
def test_adapter_conditioning_factor_stops_the_adapter_part_way(tiny_adapter):
    """factor 0.5 of 4 steps: adapter for steps 0-1 (SDXL adapter pipeline rule), then the plain U-Net."""
    tiny, ours = tiny_adapter
    unet, up = ours["unet"]
    _, _, lat, _, cond = _adapter_setup(tiny_adapter, False, 0.7)
    config = {**SD15_SCHEDULER, "_class_name": "EulerDiscreteScheduler"}
    plan = make_plan(config, STEPS)
    x = initial_latents(plan, to_nhwc(lat))
    seen = {}

    def run(factor):
        steps = []
        model = G.classifier_free(G.unet_prediction(unet, up, adapter_conditioning_factor=factor), SCALE)
        out = sample(model, plan, x, cond, callback=lambda i, v: steps.append(np.asarray(v)))
        jax.effects_barrier()
        return np.asarray(out), steps

    full, full_steps = run(1.0)
    half, half_steps = run(0.5)
    np.testing.assert_allclose(half_steps[1], full_steps[1], rtol=1e-6, atol=1e-6)
    assert np.abs(half - full).max() > 1e-3
    # the second half is the unconditioned-by-adapter U-Net from the step-2 sample
    plain = G.classifier_free(G.unet_prediction(unet, up), SCALE)
    rest = make_plan(config, STEPS, strength=0.5)
    no_adapter = {k: {"text": v["text"]} for k, v in cond.items()}
    np.testing.assert_allclose(sample(plain, rest, jnp.asarray(half_steps[1]), no_adapter), half, rtol=1e-5,
                               atol=1e-5)
    seen["ok"] = True


@pytest.mark.slow
def test_controlnet_and_adapter_together_equal_the_direct_unet_call(tiny_adapter):
    """unet_prediction with a ControlNet and adapter features = the U-Net called with both residuals."""
    import jaxcontrol as jc

    _, ours = tiny_adapter
    (unet, up), (adapter, ap) = ours["unet"], ours["adapter"]
    cn, cp = jc.controlnet_from_unet(unet, up, jax.random.key(0), conditioning_embedding_out_channels=(16, 32))
    leaves, tree = jax.tree_util.tree_flatten(cp)  # move the zero convolutions off zero
    keys = jax.random.split(jax.random.key(5), len(leaves))
    cp = jax.tree_util.tree_unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (1, 8, 8, 4))
    text = jax.random.normal(k[1], (1, 6, 32))
    image = jax.random.uniform(k[2], (1, 16, 16, 3))
    feats = G.adapter_features(adapter, ap, jax.random.uniform(k[3], (1, 16, 16, 3)), 0.6)
    t = jnp.float32(400.0)
    unit = G.ControlNetUnit(cn, cp, 0.7)
    got = jax.jit(G.unet_prediction(unet, up, controlnets=[unit]))(x, t, {"text": text, "control": (image,),
                                                                         "adapter": feats})

    def direct(x):
        tt = jnp.full((1,), t)
        down, mid = cn.apply({"params": cp}, x, tt, text, image, conditioning_scale=jnp.full((1,), 0.7))
        with_cn = unet.apply({"params": up}, x, tt, text, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid, down_intrablock_additional_residuals=feats)
        with_adapter_only = unet.apply({"params": up}, x, tt, text, down_intrablock_additional_residuals=feats)
        return with_cn, with_adapter_only

    both, adapter_only = jax.jit(direct)(x)
    np.testing.assert_allclose(got, both, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(got) - np.asarray(adapter_only)).max() > 1e-4  # the ControlNet really acts
