"""Config options beyond the stock SD configs, each checked against diffusers on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

import jaxcontrol as jc
from jaxcontrol.testing.reference import nchw_to_nhwc, randomize_, rel_err

BASE = dict(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
)

VARIANTS = {
    "lcm-time-cond-proj": dict(time_cond_proj_dim=12),
    "scale-shift-resnets": dict(resnet_time_scale_shift="scale_shift"),
    "two-transformer-layers": dict(transformer_layers_per_block=(2, 1), layers_per_block=(2, 1)),
    "kernel-1-in-out": dict(conv_in_kernel=1, conv_out_kernel=1),
    "no-mid-block": dict(mid_block_type=None),
    "plain-mid-block": dict(mid_block_type="UNetMidBlock2D"),
    "center-input-mish": dict(center_input_sample=True, act_fn="mish", freq_shift=1, flip_sin_to_cos=False),
    "time-act-fns": dict(time_embedding_act_fn="silu", timestep_post_act="gelu"),
    "mid-scale-eps-padding": dict(mid_block_scale_factor=1.414, norm_eps=1e-6, downsample_padding=0),
    "only-cross-attention": dict(only_cross_attention=True),
    "three-blocks-attention-last": dict(
        block_out_channels=(8, 16, 32), down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=(2, 2, 8),
    ),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_parity(name, tmp_path):
    config = {**BASE, **VARIANTS[name]}
    torch_unet = randomize_(TorchUNet(**config))
    torch_unet.save_pretrained(tmp_path)
    unet, params = jc.load_model(tmp_path)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 24, generator=g)
    t = torch.tensor([3, 801])
    kwargs, jkwargs = {}, {}
    if config.get("time_cond_proj_dim"):
        cond = torch.randn(2, config["time_cond_proj_dim"], generator=g)
        kwargs["timestep_cond"], jkwargs["timestep_cond"] = cond, jnp.asarray(cond.numpy())
    with torch.no_grad():
        ref = torch_unet(x, t, ctx, **kwargs).sample
    out = unet.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                     jnp.asarray(ctx.numpy()), **jkwargs)
    _, _, rel = rel_err(out, ref)
    assert rel <= 1e-4, rel


def test_scalar_timestep_equals_broadcast(tmp_path):
    unet = jc.UNet2DConditionModel(jc.UNet2DConditionConfig(**BASE))
    params = jc.init_params(unet, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(2), (3, 5, 24))
    run = jax.jit(lambda p, t: unet.apply({"params": p}, x, t, ctx))
    a = run(params, 250)
    b = run(params, jnp.full((3,), 250))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.eval_shape(run, params, jnp.array([250.0])).shape == (3, 8, 8, 4)
    with pytest.raises(ValueError, match="timesteps"):
        jax.eval_shape(run, params, jnp.zeros((2,)))


@pytest.mark.slow
def test_jit_vmap_grad(tmp_path):
    """The model is a plain function of arrays: jit, vmap and grad all apply."""
    unet = jc.UNet2DConditionModel(jc.UNet2DConditionConfig(**BASE))
    params = jc.init_params(unet, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(2), (2, 5, 24))
    f = lambda p, x, t, c: unet.apply({"params": p}, x, t, c)  # noqa: E731
    full = jax.jit(f)(params, x, jnp.array([10, 20]), ctx)
    per_example = jax.jit(jax.vmap(lambda xi, ti, ci: f(params, xi[None], ti, ci[None])[0]))(
        x, jnp.array([10, 20]), ctx
    )
    np.testing.assert_allclose(np.asarray(full), np.asarray(per_example), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(f(p, x, 10, ctx) ** 2)))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_bad_inputs_are_named():
    unet = jc.UNet2DConditionModel(jc.UNet2DConditionConfig(**BASE))
    params = jc.init_params(unet, jax.random.key(0))
    x = jnp.zeros((1, 8, 8, 4))
    ctx = jnp.zeros((1, 5, 24))
    with pytest.raises(ValueError, match="NHWC with 4 channels"):
        jax.eval_shape(lambda: unet.apply({"params": params}, jnp.zeros((1, 4, 8, 8)), 1, ctx))
    with pytest.raises(ValueError, match="come in pairs"):
        jax.eval_shape(lambda: unet.apply({"params": params}, x, 1, ctx, down_block_additional_residuals=[x]))
