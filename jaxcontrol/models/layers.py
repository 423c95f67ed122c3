"""Small building blocks shared by every network: norms, activations, resampling, time embeddings.

All tensors are NHWC (images) or (batch, length, channels) (token sequences).
Normalisation statistics are always computed in float32, whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation named by a diffusers config (`act_fn`) or transformers' `hidden_act`: "silu" /
    "swish", "mish", "gelu" (exact erf), "relu", "quick_gelu" (x * sigmoid(1.702 x)). Raises
    `ValueError` for any other name."""
    table = {
        "silu": nn.silu,
        "swish": nn.silu,
        "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
        "gelu": lambda x: nn.gelu(x, approximate=False),
        "relu": nn.relu,
        "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(table)}")
    return table[name]


class GroupNorm(nn.Module):
    """`torch.nn.GroupNorm` over NHWC (or N...C) input, statistics in float32, PyTorch's biased variance.

    Call: x (B, ..., C) -> same shape in `dtype`. Raises `ValueError` when C is not divisible by
    `num_groups`.
    """

    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        grouped = x32.reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return out.astype(self.dtype)


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm` over the last axis, statistics in float32 (two-pass variance, like PyTorch);
    (..., C) -> same shape in `dtype`."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        out = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        out = out * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return out.astype(self.dtype)


# On the CPU, stride-1 convolutions over at most this many pixels run as one matrix product of
# their 3x3 patches (`_cpu_conv`): measured on 2 cores at batch 2, 8x8x1280 -> 1280 went from 74 to
# 20 ms and 16x16x1280 from 165 to 141 ms, while at 32x32x640 XLA's own convolution was faster.
# Where XLA:CPU's convolution is slow and one matrix product is not (3x3, NHWC, float32, 2 cores):
# 8x8x1280 74 -> 20 ms, 16x16x1280 110 -> 67 ms, 8x8x640 7.3 -> 5.8 ms; from 32x32, or under 512
# channels, XLA's own convolution is as fast or faster, and the patches only cost compile time.
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 512


def _cpu_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` for `nn.Conv`, which on the CPU computes a small (≤ IM2COL_MAX_PIXELS),
    wide (≥ IM2COL_MIN_CHANNELS inputs) NHWC, stride-1, undilated, ungrouped convolution as patches
    (B*H*W, kh*kw*Cin) @ kernel (kh*kw*Cin, Cout)."""
    from ..platform import backend

    b, h, w, c = lhs.shape if lhs.ndim == 4 else (0, 0, 0, 0)
    kh, kw = rhs.shape[:2] if rhs.ndim == 4 else (0, 0)
    nhwc = dimension_numbers is not None and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2) and \
        tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1) and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2)
    plain = all(s == 1 for s in window_strides) and all(d == 1 for d in (lhs_dilation or (1, 1))) and \
        all(d == 1 for d in (rhs_dilation or (1, 1))) and feature_group_count == 1 and not isinstance(padding, str)
    if not (nhwc and plain and 0 < h * w <= IM2COL_MAX_PIXELS and c >= IM2COL_MIN_CHANNELS and kh * kw > 1
            and backend() == "cpu"):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision,
                                            preferred_element_type=preferred_element_type)
    (top, bottom), (left, right) = padding
    padded = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh, ow = h + top + bottom - kh + 1, w + left + right - kw + 1
    patches = jnp.concatenate([padded[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
    out = jnp.dot(patches.reshape(b * oh * ow, kh * kw * c), rhs.reshape(kh * kw * c, rhs.shape[-1]),
                  precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(b, oh, ow, rhs.shape[-1])


def conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | tuple | str | None = None,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    use_bias: bool = True,
) -> nn.Conv:
    """A PyTorch-style Conv2d in NHWC (an `nn.Conv`, kernel HWIO): `kernel` x `kernel`, `stride`,
    symmetric integer padding (default `(kernel - 1) // 2`; a pair of pairs or a string passes through).
    On the CPU, small wide stride-1 convolutions run as one patch matrix product (`IM2COL_MAX_PIXELS`,
    `IM2COL_MIN_CHANNELS`)."""
    if padding is None:
        padding = (kernel - 1) // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        conv_general_dilated=_cpu_conv,
    )


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of NHWC `x` (B, H, W, C) to (B, *size, C) with PyTorch's
    `F.interpolate(mode="nearest")` index rule, src = min(floor(dst * in / out), in - 1)."""
    in_h, in_w = x.shape[1], x.shape[2]
    out_h, out_w = size
    for axis, n_in, n_out in ((1, in_h, out_h), (2, in_w, out_w)):
        if n_out == n_in:
            continue
        if n_out == 2 * n_in:
            x = jnp.repeat(x, 2, axis=axis)
            continue
        # torch: src = min(floor(dst * (in / out)), in - 1), computed in float32
        scale = np.float32(n_in) / np.float32(n_out)
        idx = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)
        x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps (any real values) -> (B, dim) float32, as diffusers'
    `get_timestep_embedding`: [sin, cos] of scale * t * max_period**(-i / (dim // 2 - freq_shift)),
    i < dim // 2; `flip_sin_to_cos` puts cos first; an odd `dim` is zero-padded."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    freqs = jnp.exp(exponent)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    args = scale * args
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers' `TimestepEmbedding`: `linear_1 -> act -> linear_2` (then `post_act_fn`), with the
    optional `cond_proj` of LCM-distilled models (added to the input before `linear_1`).

    Call: sample (B, in) and, when `cond_proj_dim` is set, condition (B, cond_proj_dim) ->
    (B, time_embed_dim). Raises `ValueError` when `cond_proj_dim` is set and `condition` is None.
    """

    time_embed_dim: int
    act_fn: str = "silu"
    cond_proj_dim: int | None = None
    post_act_fn: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        if self.cond_proj_dim is not None:
            if condition is None:
                raise ValueError(
                    f"this model has time_cond_proj_dim={self.cond_proj_dim}: pass timestep_cond "
                    f"of shape (batch, {self.cond_proj_dim})"
                )
            sample = sample + nn.Dense(
                sample.shape[-1], use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="cond_proj"
            )(condition)
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(sample)
        sample = get_activation(self.act_fn)(sample)
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(sample)
        if self.post_act_fn is not None:
            sample = get_activation(self.post_act_fn)(sample)
        return sample


def broadcast_timesteps(timesteps: jax.Array | float | int, batch: int) -> jax.Array:
    """A scalar, (1,) or (batch,) timestep argument as a (batch,) array (its dtype kept). Raises
    `ValueError` for any other shape."""
    t = jnp.asarray(timesteps)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"timesteps must be a scalar or have shape ({batch},); got shape {t.shape}")
    return jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (batch,))
