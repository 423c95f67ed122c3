"""bf16 compute mode, and the U-Net / ControlNet sharded over a simulated 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcontrol as jc
from jaxcontrol.testing.precision import bf16_error_rows

SMALL = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


@pytest.mark.slow
def test_bf16_mode_error_is_small():
    # the full matrix (bf16 params, dot_product attention) is in `benchmarks/parity.py --bf16`
    rows = bf16_error_rows(param_dtypes=(jnp.float32,), attention_impls=("plain",))
    assert len(rows) == 3
    for r in rows:
        # measured about 1e-2 (see docs/PRECISION.md); a wrong cast or a bf16 softmax lands far above
        assert r["rel_err"] < 5e-2, r


def test_bf16_mode_keeps_norms_and_output_in_f32():
    unet = jc.UNet2DConditionModel(jc.UNet2DConditionConfig(**SMALL), dtype=jnp.bfloat16)
    params = jc.init_params(unet, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
    out = jax.eval_shape(lambda p: unet.apply({"params": p}, x, 1, jnp.zeros((1, 3, 32))), params)
    assert out.dtype == jnp.float32
    # activations really are bf16 inside: the compiled program contains bf16 convolutions
    hlo = jax.jit(lambda p: unet.apply({"params": p}, x, 1, jnp.zeros((1, 3, 32)))).lower(params).as_text()
    assert "bf16" in hlo


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_sharded_batch_equals_single_device():
    unet = jc.UNet2DConditionModel(jc.UNet2DConditionConfig(**SMALL))
    params = jc.init_params(unet, jax.random.key(0))
    cn, cparams = jc.controlnet_from_unet(unet, params, jax.random.key(1), conditioning_embedding_out_channels=(8, 16))
    cparams = jax.tree_util.tree_map(lambda a: a + 0.01 * jnp.ones_like(a), cparams)
    k = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(k[0], (8, 8, 8, 4))
    ctx = jax.random.normal(k[1], (8, 5, 32))
    cond = jax.random.uniform(k[2], (8, 16, 16, 3))
    t = jnp.arange(8) * 100

    def step(p, cp, x, t, ctx, cond):
        down, mid = cn.apply({"params": cp}, x, t, ctx, cond)
        return unet.apply({"params": p}, x, t, ctx, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)

    single = jax.jit(step)(params, cparams, x, t, ctx, cond)

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sharded_step = jax.jit(step, in_shardings=(repl, repl, data, data, data, data), out_shardings=data)
    args = [jax.device_put(a, s) for a, s in ((x, data), (t, data), (ctx, data), (cond, data))]
    out = sharded_step(jax.device_put(params, repl), jax.device_put(cparams, repl), *args)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-5, atol=1e-5)
