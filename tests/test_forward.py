"""The one model forward: sampling, training and validation combine residuals in one place."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol import demo
from jaxcontrol import guidance as G
from jaxcontrol.models.forward import ControlNetCall, controlnet_residuals, model_forward

ROOT = pathlib.Path(G.__file__).parent


@pytest.fixture(scope="module")
def nets():
    if not demo.is_built():
        pytest.skip("the embedded model is not installed")
    pipe = demo.load_embedded()
    (cn, cp), = pipe.controlnets
    cp = jax.device_get(cp)  # one device: the pipeline's copies are replicated over the test mesh
    leaves, tree = jax.tree_util.tree_flatten(cp)  # move the zero convolutions off zero
    keys = jax.random.split(jax.random.key(5), len(leaves))
    cp = jax.tree_util.tree_unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return pipe, cn, cp


def _inputs(pipe, b=2):
    k = jax.random.split(jax.random.key(1), 3)
    h = pipe.unet.config.sample_size
    x = jax.random.normal(k[0], (b, h, h, pipe.unet.config.in_channels))
    text = jax.random.normal(k[1], (b, 77, pipe.unet.config.cross_attention_dim))
    image = jax.random.uniform(k[2], (b, h * pipe.vae_scale_factor, h * pipe.vae_scale_factor, 3))
    return x, jnp.full((b,), 500.0), text, image


@pytest.mark.slow
def test_two_controlnets_sum_their_residuals_and_the_scope_wraps_each_network(nets):
    pipe, cn, cp = nets
    x, t, text, image = _inputs(pipe)
    up = jax.device_get(pipe.params["unet"])
    entered = []

    def scope(name):
        import contextlib

        entered.append(name)
        return contextlib.nullcontext()

    calls = [ControlNetCall(cn, cp, image, 0.7), ControlNetCall(cn, cp, 1.0 - image, jnp.asarray([0.2, 0.9]))]
    got = jax.jit(lambda x: model_forward(pipe.unet, up, x, t, text, controlnets=calls, scope=scope))(x)
    assert entered == ["controlnet", "controlnet", "unet"]

    @jax.jit
    def direct(x):
        d0, m0 = cn.apply({"params": cp}, x, t, text, image, conditioning_scale=0.7)
        d1, m1 = cn.apply({"params": cp}, x, t, text, 1.0 - image, conditioning_scale=jnp.asarray([0.2, 0.9]))
        want = pipe.unet.apply({"params": up}, x, t, text, mid_block_additional_residual=m0 + m1,
                               down_block_additional_residuals=[a + b for a, b in zip(d0, d1)])
        return want, pipe.unet.apply({"params": up}, x, t, text)

    want, plain = direct(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-3  # the ControlNets really act


@pytest.mark.slow
def test_mid_block_only_drops_the_down_residuals(nets):
    pipe, cn, cp = nets
    x, t, text, image = _inputs(pipe, b=1)
    down, mid = jax.jit(lambda x: controlnet_residuals([ControlNetCall(cn, cp, image, 1.0, mid_block_only=True)],
                                                       x, t, text))(x)
    assert all(float(jnp.abs(d).max()) == 0.0 for d in down) and float(jnp.abs(mid).max()) > 0.0
    assert controlnet_residuals([], x, t, text) is None


@pytest.mark.slow
def test_sampling_and_training_predictions_agree(nets):
    """guidance.unet_prediction (sampling and validation) and training's model_prediction give the
    same output for the same ControlNet and scale: both are model_forward."""
    from types import SimpleNamespace

    from jaxcontrol.training.step import model_prediction

    pipe, cn, cp = nets
    x, t, text, image = _inputs(pipe)
    up = jax.device_get(pipe.params["unet"])
    sampled = jax.jit(G.unet_prediction(pipe.unet, up, controlnets=[G.ControlNetUnit(cn, cp, 0.8)]))(
        x, t, {"text": text, "control": (image,)})
    config = SimpleNamespace(controlnet=SimpleNamespace(conditioning_scale=0.8, small_scale=False),
                             remat=SimpleNamespace(controlnet="blocks", unet="none", policy="nothing_saveable"))
    nets_ = SimpleNamespace(controlnet=cn, adapter=None, unet=pipe.unet)
    trained = jax.jit(lambda x: model_prediction(nets_, config, {"controlnet": cp, "unet": up}, {}, x, t, text,
                                                 image))(x)
    np.testing.assert_allclose(sampled, trained, rtol=1e-5, atol=1e-5)


def test_residual_keywords_are_passed_in_one_place():
    """Outside the networks (models/) and the PyTorch parity harness (testing/), no module passes
    the U-Net's residual inputs itself: sampling, guidance and training go through model_forward."""
    found = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("models", "testing"):
            continue
        if re.search(r"(down_block_additional_residuals|mid_block_additional_residual|"
                     r"down_intrablock_additional_residuals)\s*=", path.read_text()):
            found.add(str(rel))
    assert found == set(), sorted(found)
