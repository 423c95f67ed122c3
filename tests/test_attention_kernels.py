"""The attention kernels against each other: "chunked" computes "plain"'s arithmetic block by block,
and "auto" picks a kernel per platform, dtype and shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.models import UNet2DConditionModel, init_params
from jaxcontrol.models.attention import ATTENTION_IMPLS, CHUNK, CHUNKED_MIN_QUERIES, attention, select_impl
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
    plain = UNet2DConditionModel(cfg, attention_impl="plain")
    params = init_params(plain, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 40, 40, 4))
    ctx = jax.random.normal(jax.random.key(2), (1, 7, 32))
    t = jnp.asarray([500.0])
    want = jax.jit(lambda x: plain.apply({"params": params}, x, t, ctx))(x)
    chunked = UNet2DConditionModel(cfg, attention_impl="chunked")
    got = jax.jit(lambda x: chunked.apply({"params": params}, x, t, ctx))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_auto_is_the_default_everywhere():
    import inspect

    from jaxcontrol import Pipeline
    from jaxcontrol.convert import load_model
    from jaxcontrol.models import ControlNetModel, UNet2DConditionModel
    from jaxcontrol.models.attention import Attention, Transformer2DModel
    from jaxcontrol.training.config import default_config

    assert inspect.signature(attention).parameters["impl"].default == "auto"
    for fn in (load_model, Pipeline.from_pretrained):
        assert inspect.signature(fn).parameters["attention_impl"].default == "auto", fn
    for cls in (UNet2DConditionModel, ControlNetModel, Attention, Transformer2DModel):
        assert cls.__dataclass_fields__["attention_impl"].default == "auto", cls
    assert default_config().model.attention_impl == "auto"


@pytest.mark.parametrize("platform,shape_q,shape_k,dtype,upcast,want", [
    # CPU: chunked from CHUNKED_MIN_QUERIES queries, plain below (short self-attention, CLIP)
    ("cpu", (2, 4096, 8, 40), (2, 4096, 8, 40), jnp.float32, False, "chunked"),
    ("cpu", (2, 4096, 8, 40), (2, 77, 8, 40), jnp.float32, False, "chunked"),
    ("cpu", (2, CHUNKED_MIN_QUERIES - 1, 8, 40), (2, 77, 8, 40), jnp.float32, False, "plain"),
    ("cpu", (2, 77, 12, 64), (2, 77, 12, 64), jnp.float32, False, "plain"),
    # GPU: cuDNN for bf16/fp16 with a head dim multiple of 8 and <= 256, XLA otherwise
    ("gpu", (8, 4096, 8, 40), (8, 4096, 8, 40), jnp.bfloat16, False, "cudnn"),
    ("gpu", (8, 256, 8, 160), (8, 77, 8, 160), jnp.float16, False, "cudnn"),
    ("gpu", (8, 4096, 8, 40), (8, 4096, 8, 40), jnp.float32, False, "plain"),
    ("gpu", (8, 4096, 1, 512), (8, 4096, 1, 512), jnp.bfloat16, False, "plain"),  # the VAE's single head
    ("gpu", (8, 4096, 5, 12), (8, 4096, 5, 12), jnp.bfloat16, False, "plain"),  # head dim not a multiple of 8
    ("gpu", (8, 4096, 8, 40), (8, 4096, 8, 40), jnp.bfloat16, True, "plain"),  # upcast stays on XLA
])
def test_select_impl(platform, shape_q, shape_k, dtype, upcast, want):
    assert select_impl(shape_q, shape_k, dtype, upcast=upcast, platform=platform) == want


def test_auto_runs_what_it_selects_on_this_cpu():
    for lq in (CHUNKED_MIN_QUERIES - 1, CHUNKED_MIN_QUERIES + 5):
        q, k, v = _qkv(2, lq, 77, 2, 8)
        impl = select_impl(q.shape, k.shape, q.dtype)
        np.testing.assert_array_equal(jax.jit(lambda q, k, v: attention(q, k, v))(q, k, v),
                                      jax.jit(lambda q, k, v, i=impl: attention(q, k, v, impl=i))(q, k, v))


@pytest.mark.parametrize("impl", ["cudnn", "tpu_flash"])
def test_platform_kernels_refuse_the_cpu_with_a_clear_error(impl):
    q, k, v = _qkv(1, 16, 16, 2, 8, jnp.bfloat16)
    with pytest.raises(ValueError, match=f"{impl}.*only.*cpu"):
        attention(q, k, v, impl=impl)


def test_sd15_unet_at_64x64_with_auto_attention_holds_no_full_score_tensor():
    """The issue's target: the CPU HLO of the full-size U-Net at 64x64 latents has no 4096x4096
    buffer with "auto" attention (lowered, not run; "plain" is the control that has one)."""
    from jaxcontrol.testing.parity import SD15

    cfg = UNet2DConditionConfig(**{k: v for k, v in SD15.items() if k in UNet2DConditionConfig.__dataclass_fields__})
    x = jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)

    def hlo(impl):
        unet = UNet2DConditionModel(cfg, attention_impl=impl)
        params = jax.eval_shape(lambda: unet.init(jax.random.key(0), jnp.zeros(x.shape), jnp.zeros(1), jnp.zeros(ctx.shape)))
        return jax.jit(lambda p, x, t, c: unet.apply(p, x, t, c)).lower(params, x, t, ctx).as_text()

    assert "4096x4096" not in hlo("auto")
    assert "4096x4096" in hlo("plain")


@pytest.mark.parametrize("mask_kind", [None, "keys", "queries"])
def test_chunked_under_a_mesh_loops_over_heads_only_and_gives_the_same_numbers(mask_kind):
    """Traced under a multi-device mesh, "chunked" keeps the sharded batch whole in every
    iteration (no gather in its loops) and still equals "plain"."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    n = jax.device_count()
    assert n >= 2, "the suite runs with 8 simulated CPU devices (conftest)"
    lq = CHUNK + 37
    q, k, v = _qkv(n, lq, 77, 2, 8)
    mask = None
    if mask_kind == "keys":
        mask = jax.random.bernoulli(jax.random.key(3), 0.8, (n, 1, 1, 77)).at[..., 0].set(True)
    elif mask_kind == "queries":
        mask = jax.random.bernoulli(jax.random.key(4), 0.8, (n, 2, lq, 77)).at[..., 0].set(True)
    want = attention(q, k, v, impl="plain", mask=mask)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    q, k, v = (jax.device_put(t, sharded) for t in (q, k, v))
    fn = jax.jit(lambda q, k, v: attention(q, k, v, impl="chunked", mask=mask))
    with jax.set_mesh(mesh):
        got = fn(q, k, v)
        hlo = fn.lower(q, k, v).compile().as_text()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    assert "all-gather" not in hlo and "collective-permute" not in hlo and "all-to-all" not in hlo
