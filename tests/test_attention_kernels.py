"""The attention kernels against each other: "chunked" computes "plain"'s arithmetic block by block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.models import UNet2DConditionModel, init_params
from jaxcontrol.models.attention import ATTENTION_IMPLS, CHUNK, attention
from jaxcontrol.models.configs import UNet2DConditionConfig


def _qkv(b, lq, lk, h, d, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (b, lq, h, d), dtype), jax.random.normal(k[1], (b, lk, h, d), dtype),
            jax.random.normal(k[2], (b, lk, h, d), dtype))


@pytest.mark.parametrize("lq,lk", [(CHUNK, CHUNK), (CHUNK + 37, CHUNK + 37), (2 * CHUNK + 5, 77), (130, 130)])
@pytest.mark.parametrize("mask_kind", [None, "keys", "queries"])
def test_chunked_equals_plain(lq, lk, mask_kind):
    q, k, v = _qkv(2, lq, lk, 2, 8)
    mask = None
    if mask_kind == "keys":  # a key-padding mask (B, 1, 1, Lk)
        mask = jax.random.bernoulli(jax.random.key(3), 0.8, (2, 1, 1, lk)).at[..., 0].set(True)
    elif mask_kind == "queries":  # one row per query and head (a causal mask is one)
        mask = jax.random.bernoulli(jax.random.key(4), 0.8, (2, 2, lq, lk)).at[..., 0].set(True)
    for upcast in (False, True):
        want = attention(q, k, v, impl="plain", mask=mask, upcast=upcast)
        got = jax.jit(lambda q, k, v: attention(q, k, v, impl="chunked", mask=mask, upcast=upcast))(q, k, v)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_chunked_keeps_bf16_and_its_error():
    q, k, v = _qkv(1, CHUNK + 3, CHUNK + 3, 2, 16, jnp.bfloat16)
    ref = attention(*(t.astype(jnp.float32) for t in (q, k, v)), impl="plain")
    plain = attention(q, k, v, impl="plain")
    chunked = attention(q, k, v, impl="chunked")
    assert chunked.dtype == jnp.bfloat16
    err = lambda x: float(jnp.abs(x.astype(jnp.float32) - ref).max())  # noqa: E731
    assert err(chunked) <= 2 * err(plain) + 1e-3


def test_chunked_never_builds_the_whole_score_tensor():
    lq = 4 * CHUNK
    q, k, v = _qkv(1, lq, lq, 2, 8)
    hlo = jax.jit(lambda q, k, v: attention(q, k, v, impl="chunked")).lower(q, k, v).compile().as_text()
    assert f"{lq},{lq}]" not in hlo and f"[{CHUNK},{lq}]" in hlo
    hlo_plain = jax.jit(lambda q, k, v: attention(q, k, v, impl="plain")).lower(q, k, v).compile().as_text()
    assert f"{lq},{lq}]" in hlo_plain


def test_a_unet_with_chunked_attention_equals_plain_past_one_block():
    """40x40 latents: 1600 tokens, two blocks of queries, the second one padded."""
    assert "chunked" in ATTENTION_IMPLS
    cfg = UNet2DConditionConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, layers_per_block=1, norm_num_groups=8, sample_size=40)
    plain = UNet2DConditionModel(cfg)
    params = init_params(plain, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 40, 40, 4))
    ctx = jax.random.normal(jax.random.key(2), (1, 7, 32))
    t = jnp.asarray([500.0])
    want = jax.jit(lambda x: plain.apply({"params": params}, x, t, ctx))(x)
    chunked = UNet2DConditionModel(cfg, attention_impl="chunked")
    got = jax.jit(lambda x: chunked.apply({"params": params}, x, t, ctx))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
