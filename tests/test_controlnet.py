"""ControlNet specifics: from_unet, guess mode, pooled conditions, channel order, per-sample scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet

import jaxcontrol as jc
from jaxcontrol.models.params import flatten
from jaxcontrol.testing.reference import randomize_, rel_err

UNET = dict(
    block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, cross_attention_dim=24,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
)
CN_FIELDS = {k: v for k, v in UNET.items() if k != "up_block_types"}


def _inputs(batch=2, hw=8, factor=2, cond_channels=3):
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (batch, hw, hw, 4))
    ctx = jax.random.normal(k[1], (batch, 5, 24))
    cond = jax.random.uniform(k[2], (batch, hw * factor, hw * factor, cond_channels))
    return x, jnp.array([7, 640][:batch]), ctx, cond


def test_fresh_controlnet_leaves_unet_bit_identical():
    unet = jc.UNet2DConditionModel(jc.UNet2DConditionConfig(**UNET))
    params = jc.init_params(unet, jax.random.key(0))
    cn, cparams = jc.controlnet_from_unet(unet, params, jax.random.key(1), conditioning_embedding_out_channels=(8, 16))
    x, t, ctx, cond = _inputs()

    # the encoder is a copy of the U-Net's, the zero convolutions are zero
    flat_u, flat_c = flatten(params), flatten(cparams)
    for key, value in flat_c.items():
        if key.startswith(("down_blocks_", "mid_block/", "conv_in/", "time_embedding/")):
            np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_u[key]))
        if key.startswith(("controlnet_down_blocks_", "controlnet_mid_block/", "controlnet_cond_embedding/conv_out/")):
            assert not np.any(np.asarray(value))

    down, mid = jax.jit(lambda p: cn.apply({"params": p}, x, t, ctx, cond))(cparams)
    assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
    run = jax.jit(lambda p, d, m: unet.apply(
        {"params": p}, x, t, ctx, down_block_additional_residuals=d, mid_block_additional_residual=m))
    alone = jax.jit(lambda p: unet.apply({"params": p}, x, t, ctx))(params)
    np.testing.assert_array_equal(np.asarray(run(params, down, mid)), np.asarray(alone))


def test_from_unet_matches_diffusers_layout(tmp_path):
    """The ControlNet built by from_unet has exactly the parameters of diffusers' ControlNetModel.from_unet."""
    from diffusers import UNet2DConditionModel as TorchUNet

    tu = TorchUNet(**UNET)
    tcn = TorchControlNet.from_unet(tu, conditioning_embedding_out_channels=(8, 16))
    unet = jc.UNet2DConditionModel(jc.UNet2DConditionConfig(**UNET))
    params = jc.init_params(unet, jax.random.key(0))
    cn, cparams = jc.controlnet_from_unet(unet, params, jax.random.key(1), conditioning_embedding_out_channels=(8, 16))
    tcn.save_pretrained(tmp_path)
    loaded, loaded_params = jc.load_model(tmp_path)
    assert loaded.config == cn.config
    assert jax.tree_util.tree_structure(loaded_params) == jax.tree_util.tree_structure(cparams)


@pytest.mark.parametrize(
    "extra,kwargs",
    [
        ({}, dict(guess_mode=True)),
        (dict(global_pool_conditions=True), {}),
        (dict(controlnet_conditioning_channel_order="bgr"), {}),
        (dict(conditioning_channels=1), {}),
    ],
    ids=["guess-mode", "global-pool", "bgr", "one-channel-hint"],
)
def test_controlnet_options_parity(extra, kwargs, tmp_path):
    fields = {**CN_FIELDS, "conditioning_embedding_out_channels": (8, 16), **extra}
    tcn = randomize_(TorchControlNet(**fields))
    tcn.save_pretrained(tmp_path)
    cn, cparams = jc.load_model(tmp_path)
    x, t, ctx, cond = _inputs(cond_channels=fields.get("conditioning_channels", 3))
    with torch.no_grad():
        down_ref, mid_ref = tcn(
            torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.array(t)),
            torch.from_numpy(np.asarray(ctx)), torch.from_numpy(np.asarray(cond).transpose(0, 3, 1, 2).copy()),
            conditioning_scale=0.6, return_dict=False, **kwargs,
        )
    down, mid = jax.jit(lambda p: cn.apply({"params": p}, x, t, ctx, cond, conditioning_scale=0.6, **kwargs))(cparams)
    assert len(down) == len(down_ref)
    for ours, ref in zip(list(down) + [mid], list(down_ref) + [mid_ref]):
        assert rel_err(ours, ref)[2] <= 1e-4


def test_per_sample_conditioning_scale():
    unet = jc.UNet2DConditionModel(jc.UNet2DConditionConfig(**UNET))
    params = jc.init_params(unet, jax.random.key(0))
    cn, cparams = jc.controlnet_from_unet(unet, params, jax.random.key(1), conditioning_embedding_out_channels=(8, 16))
    cparams = jax.tree_util.tree_map(lambda a: a + 0.01, cparams)
    x, t, ctx, cond = _inputs()
    run = jax.jit(lambda s: cn.apply({"params": cparams}, x, t, ctx, cond, conditioning_scale=s))
    down, mid = run(jnp.array([0.0, 1.0]))
    ref_down, ref_mid = run(1.0)
    assert not np.any(np.asarray(mid[0]))
    np.testing.assert_allclose(np.asarray(mid[1]), np.asarray(ref_mid[1]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(down[3][1]), np.asarray(ref_down[3][1]), rtol=1e-6)


def test_wrong_control_image_size_is_named():
    cn = jc.ControlNetModel(jc.ControlNetConfig(**CN_FIELDS, conditioning_embedding_out_channels=(8, 16)))
    cparams = jc.init_params(cn, jax.random.key(0))
    x, t, ctx, _ = _inputs()
    with pytest.raises(ValueError, match="2x the latent size"):
        jax.eval_shape(lambda: cn.apply({"params": cparams}, x, t, ctx, jnp.zeros((2, 8, 8, 3))))
    with pytest.raises(ValueError, match="3 channels"):
        jax.eval_shape(lambda: cn.apply({"params": cparams}, x, t, ctx, jnp.zeros((2, 16, 16, 1))))
