"""Residual blocks and resamplers of the latent-diffusion U-Net and VAE (NHWC)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import GroupNorm, conv, get_activation, nearest_resize

Dtype = Any


class ResnetBlock2D(nn.Module):
    """norm1 -> act -> conv1 (+ time embedding) -> norm2 -> act -> conv2, plus a (1x1-projected) skip.

    `time_embedding_norm="scale_shift"` applies the time embedding as a FiLM after norm2.
    A block built with `temb=None` at call time (the VAE) has no `time_emb_proj`. diffusers' `ResnetBlock2D`.

    Call: x (B, H, W, Cin), temb (B, T) or None -> (B, H, W, out_channels) in `dtype`, divided by
    `output_scale_factor`. Raises `ValueError` for a `time_embedding_norm` other than "default" /
    "scale_shift", or "scale_shift" without `temb`.
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-5
    act_fn: str = "silu"
    time_embedding_norm: str = "default"
    skip_time_act: bool = False
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = get_activation(self.act_fn)
        h = act(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            t = temb if self.skip_time_act else act(temb)
            width = self.out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
            t = nn.Dense(width, name="time_emb_proj", **kw)(t)[:, None, None, :]
        groups_out = self.groups_out or self.groups
        if self.time_embedding_norm == "default":
            if temb is not None:
                h = h + t
            h = GroupNorm(groups_out, self.eps, name="norm2", **kw)(h)
        elif self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("time_embedding_norm='scale_shift' needs a time embedding")
            t_scale, t_shift = jnp.split(t, 2, axis=-1)
            h = GroupNorm(groups_out, self.eps, name="norm2", **kw)(h)
            h = h * (1 + t_scale) + t_shift
        else:
            raise ValueError(f"unknown time_embedding_norm {self.time_embedding_norm!r}")
        h = act(h)
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution (`downsamplers.0.conv`).

    `padding=1` is the U-Net's symmetric padding; `padding=0` is the VAE's asymmetric
    (0, 1, 0, 1) pad followed by a VALID convolution. diffusers' `Downsample2D` (use_conv=True).
    (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_channels) with padding 1, (B, floor(H/2),
    floor(W/2), out_channels) with padding 0.
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            self.out_channels, 3, stride=2, padding=self.padding, name="conv",
            dtype=self.dtype, param_dtype=self.param_dtype,
        )(x)


class Upsample2D(nn.Module):
    """diffusers' `Upsample2D` (use_conv=True): nearest-neighbour 2x upsampling (or to an explicit
    `size` (h, w)) followed by a 3x3 convolution; (B, H, W, C) -> (B, 2H, 2W, out_channels)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        if size is None:
            size = (2 * x.shape[1], 2 * x.shape[2])
        x = nearest_resize(x, size)
        return conv(self.out_channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
