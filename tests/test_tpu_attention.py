"""The TPU splash-attention wrapper, run on the CPU through Pallas' interpreter (`interpret=True`
runs the same kernel body the TPU compiles), against `attention(..., impl="plain")`.

Max abs errors measured here (float32 matmuls at "highest", as conftest sets them; outputs are
up to ~0.5 in size): float32 outputs 2e-7 to 7e-7 from "plain" at the default scale (4.5e-6 with
scale 0.3, where the softmax is peakier), float32 gradients 3e-7 to 1.3e-6 (sharded over 8
devices included); bfloat16 outputs 1.3e-3 (D=40) and 1.4e-3 (D=160) from a float32 reference,
where "plain" in bfloat16 is 0.9e-3 and 1.4e-3 from it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcontrol.models.attention import attention
from jaxcontrol.models.tpu_attention import (
    HEAD_DIM_ALIGN,
    MAX_HEAD_DIM,
    TPU_MIN_SEQ,
    default_block_sizes,
    tpu_flash_attention,
    tpu_flash_supported,
    tpu_flash_unsupported_reason,
)

needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")


def _qkv(b, lq, lk, h, d, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (b, lq, h, d), dtype), jax.random.normal(k[1], (b, lk, h, d), dtype),
            jax.random.normal(k[2], (b, lk, h, d), dtype))


def _flash(**kw):
    return jax.jit(lambda q, k, v: tpu_flash_attention(q, k, v, interpret=True, **kw))


def _jaxpr_eqns(jaxpr):
    """Every equation of a (closed) jaxpr, nested jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _jaxpr_eqns(sub)


@pytest.mark.parametrize("b,lq,lk,h,d", [
    (2, 1024, 1024, 8, 40),   # 32x32 latent, SD-1.5's first-level heads
    (1, 4096, 4096, 2, 40),   # 64x64 latent (512 px), the self-attention the kernel is for (2 of its 8 heads)
    (1, 1024, 1024, 2, 80),   # SD-1.5 at 32x32: 640 channels in 8 heads of 80
    (1, 1024, 1024, 2, 64),   # SD-2.x / SDXL heads
    (1, 1024, 1024, 2, 160),  # SD-1.5's deepest heads (1280 / 8, at 1024 tokens for 1024 px): 256 lanes
    (1, 1600, 1300, 2, 40),   # lengths that no block divides: padded queries, padded (excluded) keys
])
def test_float32_equals_plain(b, lq, lk, h, d):
    q, k, v = _qkv(b, lq, lk, h, d)
    got = _flash()(q, k, v)
    want = attention(q, k, v, impl="plain")
    assert got.shape == want.shape == (b, lq, h, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-6)


def test_the_kernel_really_runs():
    """The result comes from a `pallas_call` (the splash kernel), not from an XLA fallback."""
    q, k, v = _qkv(1, 1024, 1024, 2, 40)
    prims = {e.primitive.name for e in _jaxpr_eqns(jax.make_jaxpr(lambda *a: tpu_flash_attention(*a, interpret=True))(
        q, k, v))}
    assert "pallas_call" in prims
    top = {e.primitive.name for e in jax.make_jaxpr(lambda *a: tpu_flash_attention(*a, interpret=True))(
        q, k, v).jaxpr.eqns}
    assert "dot_general" not in top  # no attention einsum outside the kernel


def test_scale_and_default_scale():
    q, k, v = _qkv(1, 1024, 1024, 2, 64, seed=1)
    for scale in (None, 0.3):
        got = _flash(scale=scale)(q, k, v)
        np.testing.assert_allclose(got, attention(q, k, v, impl="plain", scale=scale), rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("d", [40, pytest.param(160, marks=pytest.mark.slow)])
def test_bfloat16_error_is_that_of_plain(d):
    """The kernel's bf16 error against a float32 reference, next to "plain"'s own in bf16. The kernel
    rounds q * scale to bf16 (splash takes pre-scaled queries) but applies softmax weights to v in
    float32; measured 1.3e-3 (d=40) and 1.4e-3 (d=160) against 0.9e-3 and 1.4e-3 for "plain"."""
    q, k, v = _qkv(2, 1024, 1024, 2, d, jnp.bfloat16)
    ref = attention(*(t.astype(jnp.float32) for t in (q, k, v)), impl="plain")
    got = _flash()(q, k, v)
    plain = attention(q, k, v, impl="plain")
    assert got.dtype == jnp.bfloat16
    err = lambda x: float(jnp.abs(x.astype(jnp.float32) - ref).max())
    assert err(got) <= 2 * err(plain) + 1e-3, (err(got), err(plain))
    assert err(got) < 4e-3


def test_upcast_inputs_run_in_float32_and_return_vs_dtype():
    """diffusers' `upcast_attention`: float32 q and k with bf16 v -> float32 kernel, bf16 result."""
    q, k, v = _qkv(1, 1024, 1024, 2, 64, jnp.bfloat16)
    got = _flash()(q.astype(jnp.float32), k.astype(jnp.float32), v)
    want = attention(q, k, v, impl="plain", upcast=True)
    assert got.dtype == jnp.bfloat16
    ref = attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), impl="plain")
    assert float(jnp.abs(got.astype(jnp.float32) - ref).max()) <= float(
        jnp.abs(want.astype(jnp.float32) - ref).max()) + 2e-3


@pytest.mark.parametrize("shape", [
    (2, 1024, 1024, 2, 40),
    pytest.param((1, 1024, 1100, 1, 160), marks=pytest.mark.slow),  # ~5 s more; padded keys, 256 lanes
])
def test_gradients_equal_plain(shape):
    """The kernel's own backward (splash's dq and dkv kernels), padded keys and head dims included."""
    b, lq, _, h, d = shape
    q, k, v = _qkv(*shape)
    w = jax.random.normal(jax.random.key(7), (b, lq, h, d))
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))
    got = jax.jit(jax.grad(loss(lambda *a: tpu_flash_attention(*a, interpret=True)), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda *a: attention(*a, impl="plain")), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", got, want):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def _shard_map_inputs(fn, *args):
    """Shapes of the arguments each device sees inside the shard_maps of fn's jaxpr."""
    return [[v.aval.shape for v in e.params["jaxpr"].invars if v.aval.ndim == 4]  # not the kernel's mask tables
            for e in _jaxpr_eqns(jax.make_jaxpr(fn)(*args)) if e.primitive.name == "shard_map"]


@needs_8_devices
def test_mesh_splits_the_batch_and_gives_the_same_numbers():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    q, k, v = _qkv(8, 1024, 1024, 2, 40, seed=2)
    want = attention(q, k, v, impl="plain")
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    args = [jax.device_put(t, sharding) for t in (q, k, v)]
    fn = lambda *a: tpu_flash_attention(*a, interpret=True, mesh=mesh)
    got = jax.jit(fn)(*args)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-6)
    # every device runs the kernel on one example (batch 8 over data x fsdp = 4 x 2), heads first, padded lanes
    assert _shard_map_inputs(fn, *args) == [[(1, 2, 1024, HEAD_DIM_ALIGN)] * 3]
    # the mesh set with jax.set_mesh is found without mesh=
    with jax.set_mesh(mesh):
        ctx = lambda *a: tpu_flash_attention(*a, interpret=True)
        np.testing.assert_allclose(jax.jit(ctx)(*args), want, rtol=1e-5, atol=5e-6)
        assert _shard_map_inputs(ctx, *args) == [[(1, 2, 1024, HEAD_DIM_ALIGN)] * 3]
    # batch_axes=("data",): split over data only, replicated over fsdp
    only_data = lambda *a: tpu_flash_attention(*a, interpret=True, mesh=mesh, batch_axes=("data",))
    assert _shard_map_inputs(only_data, *args) == [[(2, 2, 1024, HEAD_DIM_ALIGN)] * 3]
    with pytest.raises(ValueError, match="model"):
        tpu_flash_attention(q, k, v, interpret=True, mesh=mesh, batch_axes=("model",))


@needs_8_devices
def test_mesh_with_a_batch_it_cannot_split_and_inside_shard_map():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    q, k, v = _qkv(2, 1024, 1024, 2, 40, seed=3)
    want = attention(q, k, v, impl="plain")
    # batch 2 is not divisible by data=4: the kernel runs replicated (still under shard_map)
    fn = lambda *a: tpu_flash_attention(*a, interpret=True, mesh=mesh)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), want, rtol=1e-5, atol=5e-6)
    assert _shard_map_inputs(fn, q, k, v) == [[(2, 2, 1024, HEAD_DIM_ALIGN)] * 3]
    # called inside the caller's own shard_map over every axis: no second shard_map
    q8, k8, v8 = _qkv(8, 1024, 1024, 2, 40, seed=3)
    spec = P(("data", "fsdp"))
    inner = jax.shard_map(lambda *a: tpu_flash_attention(*a, interpret=True), mesh=mesh, in_specs=spec,
                          out_specs=spec, check_vma=False)
    np.testing.assert_allclose(jax.jit(inner)(q8, k8, v8), attention(q8, k8, v8, impl="plain"), rtol=1e-5, atol=5e-6)
    assert len(_shard_map_inputs(inner, q8, k8, v8)) == 1
    # inside the caller's shard_map over "data" only: the kernel's own shard_map splits over "fsdp"
    inner = jax.shard_map(lambda *a: tpu_flash_attention(*a, interpret=True), mesh=mesh, in_specs=P("data"),
                          out_specs=P("data"), axis_names={"data"}, check_vma=False)
    np.testing.assert_allclose(jax.jit(inner)(q8, k8, v8), attention(q8, k8, v8, impl="plain"), rtol=1e-5, atol=5e-6)
    assert _shard_map_inputs(inner, q8, k8, v8) == [[(2, 1024, 2, 40)] * 3, [(1, 2, 1024, HEAD_DIM_ALIGN)] * 3]


@needs_8_devices
def test_gradients_through_the_sharded_kernel():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    q, k, v = _qkv(8, 1024, 1024, 1, 40, seed=4)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    got = jax.jit(jax.grad(loss(lambda *a: tpu_flash_attention(*a, interpret=True, mesh=mesh)), argnums=(0, 1, 2)))(
        q, k, v)
    want = jax.grad(loss(lambda *a: attention(*a, impl="plain")), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_refuses_masks_and_bad_shapes():
    q, k, v = _qkv(1, 1024, 1024, 2, 40)
    with pytest.raises(ValueError, match="mask"):
        tpu_flash_attention(q, k, v, mask=jnp.ones((1, 1, 1, 1024), bool), interpret=True)
    with pytest.raises(ValueError, match=r"\(1, 1024, 2, 40\)"):
        tpu_flash_attention(q, k[:, :, :1], v[:, :, :1], interpret=True)
    with pytest.raises(ValueError, match="heads, D"):
        tpu_flash_attention(q[0], k[0], v[0], interpret=True)


def test_predicate():
    d = 40
    ok = lambda lq, lk, d=d, dtype=jnp.float32, mask=None: tpu_flash_supported(
        (2, lq, 8, d), (2, lk, 8, d), dtype, mask)
    assert TPU_MIN_SEQ == 1024
    assert ok(4096, 4096) and ok(1024, 1024) and ok(1600, 1300)  # 64x64, 32x32, odd lengths (padded)
    assert ok(4096, 4096, dtype=jnp.bfloat16) and ok(1024, 1024, d=160) and ok(1024, 1024, d=MAX_HEAD_DIM)
    assert not ok(4096, 77)  # cross-attention to CLIP's 77 tokens stays on XLA
    assert not ok(256, 256) and not ok(TPU_MIN_SEQ - 1, 4096)  # 16x16 latents
    assert not ok(4096, 4096, mask=jnp.ones((2, 1, 1, 4096), bool))
    assert not ok(4096, 4096, d=MAX_HEAD_DIM + 1) and not ok(4096, 4096, dtype=jnp.float16)
    assert "77" in tpu_flash_unsupported_reason((2, 4096, 8, d), (2, 77, 8, d), jnp.float32, None)
    assert "mask" in tpu_flash_unsupported_reason((2, 4096, 8, d), (2, 4096, 8, d), jnp.float32, True)
    assert "float16" in tpu_flash_unsupported_reason((2, 4096, 8, d), (2, 4096, 8, d), jnp.float16, None)
    assert "nonsense" in tpu_flash_unsupported_reason((2, 4096, 8, d), (2, 4096, 8, d), "nonsense", None)
    assert "head dim" in tpu_flash_unsupported_reason((2, 4096, 8, d), (2, 4096, 4, d), jnp.float32, None)
    assert tpu_flash_unsupported_reason((2, 4096, 8, d), (2, 4096, 8, d), jnp.float32, None) is None


def test_default_block_sizes():
    bs = default_block_sizes(4096, 1100)
    assert (bs.block_q, bs.block_kv) == (512, 128)  # 1100 pads to 1152 = 9 x 128
    assert (default_block_sizes(1024, 1280).block_kv, default_block_sizes(1600, 1600).block_q) == (256, 128)
    assert bs.has_backward_blocks
