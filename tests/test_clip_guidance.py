"""CLIP guidance through a tiny VAE decoder and CLIP vision tower (random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol import guidance as G
from jaxcontrol.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from jaxcontrol.models.params import init_params
from jaxcontrol.models.vae import AutoencoderKL, AutoencoderKLConfig
from jaxcontrol.sampler import StepInfo
from jaxcontrol.schedulers import NoiseSchedule, make_betas
from jaxcontrol.testing.solver_parity import SD_BETAS

SCHEDULE = NoiseSchedule(make_betas(**SD_BETAS))


@pytest.fixture(scope="module")
def guide():
    vae = AutoencoderKL(AutoencoderKLConfig(block_out_channels=(8,), norm_num_groups=4))
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=4, image_size=16, patch_size=4,
                                                          projection_dim=12))
    return G.ClipGuide(vae, init_params(vae, jax.random.key(0)), clip, init_params(clip, jax.random.key(1)),
                       image_size=16)


def _model(x, t, cond):
    return 0.5 * x  # a stand-in epsilon model


def _cond(batch, target):
    return {"clip_target": target, "step": StepInfo(jnp.int32(3), 10, 10)}


def _descent_check(guide, through_model):
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 4))
    target = jax.random.normal(jax.random.key(3), (2, 12))
    t = jnp.float32(500.0)
    ab = SCHEDULE.alpha_bar_at(t)
    distance = jax.jit(lambda eps: jnp.sum(G.spherical_distance(
        G.clip_image_embeds(guide, G.predicted_x0(eps, x, ab)), target[None])))
    plain = _model(x, t, {})
    rule = jax.jit(G.clip_guidance(_model, guide, 50.0, SCHEDULE, prediction_type="epsilon",
                                   through_model=through_model))
    assert float(distance(rule(x, t, _cond(2, target)))) < float(distance(plain))
    return x, t, target, plain


def test_clip_guidance_descends_the_spherical_distance(guide):
    x, t, target, plain = _descent_check(guide, through_model=False)
    # weight 0 (traced) leaves the prediction bit for bit
    zero = G.clip_guidance(_model, guide, jnp.float32(0.0), SCHEDULE, prediction_type="epsilon")
    np.testing.assert_array_equal(jax.jit(zero)(x, t, _cond(2, target)), plain)


@pytest.mark.slow
def test_clip_guidance_through_the_model_descends(guide):
    _descent_check(guide, through_model=True)


def test_cutouts_are_random_per_step_and_differentiable(guide):
    x = jax.random.normal(jax.random.key(4), (1, 16, 16, 4))
    target = jax.random.normal(jax.random.key(5), (1, 12))
    cut = G.ClipGuide(guide.vae, guide.vae_params, guide.clip, guide.clip_params, image_size=16, num_cutouts=3)
    rule = jax.jit(G.clip_guidance(_model, cut, 10.0, SCHEDULE, prediction_type="epsilon", key=jax.random.key(6)))
    a = rule(x, jnp.float32(400.0), {"clip_target": target, "step": StepInfo(jnp.int32(1), 10, 10)})
    b = rule(x, jnp.float32(400.0), {"clip_target": target, "step": StepInfo(jnp.int32(2), 10, 10)})
    assert np.isfinite(np.asarray(a)).all() and np.abs(np.asarray(a) - np.asarray(b)).max() > 0
    crops = G.random_cutouts(jnp.ones((2, 16, 16, 3)), jax.random.key(0), 4, 8)
    assert crops.shape == (4, 2, 8, 8, 3)
    np.testing.assert_allclose(crops, 1.0, atol=1e-5)  # a constant image stays constant
