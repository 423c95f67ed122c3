"""The U-Net's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D`, `DownBlock2D`, ...).

One class per direction: `with_attention` turns a `DownBlock2D` into a `CrossAttnDownBlock2D`
(a spatial transformer after every resnet), and likewise for the up and mid blocks.
Parameter names follow diffusers: `resnets_{i}`, `attentions_{i}`, `downsamplers_0`, `upsamplers_0`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from .attention import AttentionControl, Transformer2DModel
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any


class _BlockOptions(nn.Module):
    """Fields every block shares."""

    out_channels: int
    num_layers: int
    with_attention: bool
    heads: int = 8
    transformer_layers: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    time_embedding_norm: str = "default"
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    attention_impl: str = "auto"
    attention_control: AttentionControl | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, i: int, *, output_scale_factor: float = 1.0) -> ResnetBlock2D:
        """The block's `resnets_{i}`, with `out_channels` outputs."""
        return ResnetBlock2D(
            self.out_channels,
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            act_fn=self.act_fn,
            time_embedding_norm=self.time_embedding_norm,
            output_scale_factor=output_scale_factor,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=f"resnets_{i}",
        )

    def transformer(self, i: int) -> Transformer2DModel:
        """The block's `attentions_{i}`: `heads` heads of width out_channels // heads."""
        return Transformer2DModel(
            heads=self.heads,
            dim_head=self.out_channels // self.heads,
            num_layers=self.transformer_layers,
            norm_num_groups=self.norm_num_groups,
            use_linear_projection=self.use_linear_projection,
            only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention,
            attention_impl=self.attention_impl,
            attention_control=self.attention_control,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=f"attentions_{i}",
        )


class DownBlock(_BlockOptions):
    """`num_layers` x (resnet [+ transformer]) then an optional stride-2 downsampler.

    Call: x (B, H, W, Cin), temb (B, T), context (B, S, D) (used with attention), optional
    additional_residual (B, H, W, out_channels). Returns `(hidden, skips)`: hidden (B, H', W',
    out_channels) with H' = ceil(H / 2) after a U-Net downsampler (floor(H / 2) with
    `downsample_padding=0`, the VAE's), and one skip per layer plus one after the downsampler.
    `additional_residual` (a T2I-Adapter feature) is added after the last layer, before the
    downsampler, as diffusers' `CrossAttnDownBlock2D` does.
    """

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        temb: jax.Array,
        context: jax.Array | None = None,
        additional_residual: jax.Array | None = None,
    ) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(i)(x, temb)
            if self.with_attention:
                x = self.transformer(i)(x, context)
            if additional_residual is not None and i == self.num_layers - 1:
                x = x + additional_residual.astype(x.dtype)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels, padding=self.downsample_padding,
                dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0",
            )(x)
            skips.append(x)
        return x, skips


class MidBlock(_BlockOptions):
    """diffusers' `UNetMidBlock2DCrossAttn`: resnet, then `num_layers` x (transformer, resnet);
    `num_layers=0` is `UNetMidBlock2D` without attention. (B, H, W, C) -> (B, H, W, out_channels)."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None) -> jax.Array:
        x = self.resnet(0, output_scale_factor=self.output_scale_factor)(x, temb)
        for i in range(self.num_layers):
            if self.with_attention:
                x = self.transformer(i)(x, context)
            x = self.resnet(i + 1, output_scale_factor=self.output_scale_factor)(x, temb)
        return x


class UpBlock(_BlockOptions):
    """`num_layers` x (concat skip, resnet [+ transformer]) then an optional nearest-2x upsampler
    (diffusers' `UpBlock2D` / `CrossAttnUpBlock2D`).

    Call: x (B, H, W, C), skips (the last `num_layers` down-path outputs, consumed from the end,
    each (B, H, W, Ci)), temb (B, T), context (B, S, D) -> (B, H, W, out_channels), or
    (B, 2H, 2W, out_channels) / `upsample_size` with the upsampler.
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: Sequence[jax.Array],
        temb: jax.Array,
        context: jax.Array | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self.resnet(i)(x, temb)
            if self.with_attention:
                x = self.transformer(i)(x, context)
        if self.add_upsample:
            x = Upsample2D(
                self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0"
            )(x, upsample_size)
        return x
