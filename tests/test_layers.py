"""The CPU's patch-matrix convolution (`layers._cpu_conv`) computes what `lax.conv_general_dilated` does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.models import layers

DN = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _reference(x, k, padding):
    return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=DN,
                                        precision=jax.lax.Precision.HIGHEST)


def _taken(x, k, padding) -> bool:
    """Whether `_cpu_conv` lowered to a dot (the patch path) rather than a convolution."""
    text = jax.jit(lambda a, b: layers._cpu_conv(a, b, (1, 1), padding, dimension_numbers=DN)).lower(x, k).as_text()
    return "convolution" not in text


@pytest.mark.parametrize("hw,cin,cout,kernel,padding", [
    ((4, 4), 512, 8, 3, ((1, 1), (1, 1))),      # SD's smallest maps, 3x3 "same"
    ((5, 3), 520, 4, 3, ((1, 1), (1, 1))),      # odd, non-square
    ((6, 6), 512, 8, 3, ((0, 0), (0, 0))),      # "valid"
    ((7, 5), 512, 8, 3, ((2, 0), (1, 2))),      # asymmetric padding
    ((4, 4), 512, 8, 2, ((0, 1), (0, 1))),      # an even kernel
])
def test_patch_convolution_equals_xla_and_its_gradients_too(hw, cin, cout, kernel, padding):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, *hw, cin))
    k = jax.random.normal(kk, (kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin)
    assert _taken(x, k, padding)
    ours = layers._cpu_conv(x, k, (1, 1), padding, dimension_numbers=DN, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(_reference(x, k, padding)), atol=2e-5, rtol=1e-5)

    def loss(f):
        return lambda a, b: jnp.sum(jnp.sin(f(a, b)))

    ours_g = jax.grad(loss(lambda a, b: layers._cpu_conv(a, b, (1, 1), padding, dimension_numbers=DN,
                                                         precision=jax.lax.Precision.HIGHEST)), (0, 1))(x, k)
    ref_g = jax.grad(loss(lambda a, b: _reference(a, b, padding)), (0, 1))(x, k)
    for a, b in zip(ours_g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


def test_only_small_wide_stride_one_convolutions_take_the_patch_path():
    pad = ((1, 1), (1, 1))
    x, k = jnp.zeros((1, 8, 8, 512)), jnp.zeros((3, 3, 512, 4))
    assert _taken(x, k, pad)
    assert not _taken(jnp.zeros((1, 8, 8, 256)), jnp.zeros((3, 3, 256, 4)), pad)    # narrow: XLA is as fast
    assert not _taken(jnp.zeros((1, 32, 32, 512)), k, pad)                          # large map
    assert not _taken(x, jnp.zeros((1, 1, 512, 4)), ((0, 0), (0, 0)))                # 1x1 is a matmul already
    strided = jax.jit(lambda a, b: layers._cpu_conv(a, b, (2, 2), pad, dimension_numbers=DN)).lower(x, k).as_text()
    assert "convolution" in strided


def test_a_sd_sized_conv_layer_uses_it_and_matches():
    """`layers.conv` (what every network builds) at SD's 8x8x1280 bottleneck."""
    module = layers.conv(16, 3, name="c", dtype=jnp.float32, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 1280))
    params = module.init(jax.random.key(2), x)
    assert "convolution" not in jax.jit(module.apply).lower(params, x).as_text()
    k, b = params["params"]["kernel"], params["params"]["bias"]
    ref = _reference(x, k, ((1, 1), (1, 1))) + b
    np.testing.assert_allclose(np.asarray(module.apply(params, x)), np.asarray(ref), atol=1e-4, rtol=1e-4)
