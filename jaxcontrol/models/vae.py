"""`AutoencoderKL`: the KL-regularised VAE of latent diffusion (diffusers' layout), NHWC.

    moments = vae.apply({"params": p}, images, method=vae.encode)       # (B, h, w, 2 * latent_channels)
    mean, logvar = split_moments(moments)
    z = sample_posterior(moments, rng)                                  # or `mean` (the mode)
    images = vae.apply({"params": p}, z, method=vae.decode)

Images are NHWC in [-1, 1]. Latents are unscaled: the pipeline multiplies by `scaling_factor`
(and subtracts `shift_factor`, where a config has one), as diffusers' pipelines do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from ..errors import ConfigError
from .attention import attention, check_attention_impl
from .configs import ModelConfig
from .layers import GroupNorm, conv, get_activation
from .resnet import ResnetBlock2D, Upsample2D
from .unet_blocks import DownBlock

Dtype = Any
VAE_EPS = 1e-6  # every norm in the VAE


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """diffusers `AutoencoderKL` config. Class defaults are diffusers' (tiny); SD uses `SD_VAE`."""

    _class_name: ClassVar[str] = "AutoencoderKL"
    _UNSUPPORTED: ClassVar[dict[str, tuple]] = {}
    _POSITIVE: ClassVar[tuple[str, ...]] = (
        "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
        "sample_size")
    _NON_EMPTY: ClassVar[tuple[str, ...]] = ("down_block_types", "up_block_types", "block_out_channels")
    _POSITIVE_FLOAT: ClassVar[tuple[str, ...]] = ("scaling_factor",)

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def validate(self, source: str = "config") -> None:
        """`ModelConfig.validate`, then: one down and one up block per `block_out_channels` entry, only
        `DownEncoderBlock2D` / `UpDecoderBlock2D`, channels divisible by `norm_num_groups`,
        `latents_mean` / `latents_std` of `latent_channels` entries (std > 0). Raises `ConfigError`."""
        super().validate(source)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"{source}: block_out_channels has {n} entries, down_block_types "
                f"{len(self.down_block_types)} and up_block_types {len(self.up_block_types)}"
            )
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                raise ConfigError(f"{source}: VAE down block type {t!r} is not supported (DownEncoderBlock2D)")
        for t in self.up_block_types:
            if t != "UpDecoderBlock2D":
                raise ConfigError(f"{source}: VAE up block type {t!r} is not supported (UpDecoderBlock2D)")
        for i, ch in enumerate(self.block_out_channels):
            if ch % self.norm_num_groups:
                raise ConfigError(
                    f"{source}: block_out_channels[{i}]={ch} is not divisible by norm_num_groups={self.norm_num_groups}"
                )
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.latent_channels:
                raise ConfigError(f"{source}: {name} has {len(value)} entries but latent_channels is "
                                  f"{self.latent_channels}")
        if self.latents_std is not None and any(not v > 0 for v in self.latents_std):
            raise ConfigError(f"{source}: latents_std={list(self.latents_std)} is invalid: every entry must be > 0")


SD_VAE = AutoencoderKLConfig(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    sample_size=512,
)


class VAEAttentionBlock(nn.Module):
    """Single-head spatial self-attention with a GroupNorm and a residual (`mid_block.attentions.0`,
    diffusers' `Attention` with `upcast_softmax`); (B, H, W, C) -> (B, H, W, C)."""

    norm_num_groups: int
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        hidden = GroupNorm(self.norm_num_groups, VAE_EPS, name="group_norm", **kw)(x).reshape(b, h * w, 1, c)
        q = nn.Dense(c, name="to_q", **kw)(hidden)
        k = nn.Dense(c, name="to_k", **kw)(hidden)
        v = nn.Dense(c, name="to_v", **kw)(hidden)
        out = attention(q, k, v, impl=self.attention_impl, upcast=True).reshape(b, h * w, c)
        out = nn.Dense(c, name="to_out_0", **kw)(out)
        return out.reshape(b, h, w, c) + x


class VAEMidBlock(nn.Module):
    """resnet, [attention], resnet (diffusers' `UNetMidBlock2D` without a time embedding);
    (B, H, W, channels) -> (B, H, W, channels)."""

    channels: int
    norm_num_groups: int
    act_fn: str
    add_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = lambda i: ResnetBlock2D(  # noqa: E731
            self.channels, groups=self.norm_num_groups, eps=VAE_EPS, act_fn=self.act_fn, name=f"resnets_{i}", **kw
        )
        x = res(0)(x)
        if self.add_attention:
            x = VAEAttentionBlock(self.norm_num_groups, self.attention_impl, name="attentions_0", **kw)(x)
        return res(1)(x)


class UpDecoderBlock(nn.Module):
    """resnets without time embedding, then an optional nearest-2x upsampler (`UpDecoderBlock2D`);
    (B, H, W, C) -> (B, 2H, 2W, out_channels), or (B, H, W, out_channels) without the upsampler."""

    out_channels: int
    num_layers: int
    norm_num_groups: int
    act_fn: str
    add_upsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.norm_num_groups, eps=VAE_EPS, act_fn=self.act_fn,
                              name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """diffusers' VAE `Encoder`: `conv_in`, `DownEncoderBlock2D`s, mid block, norm, `conv_out`.

    Call: images (B, H, W, in_channels) -> (B, H / f, W / f, 2 * latent_channels) moments (before
    `quant_conv`), f = 2 ** (len(block_out_channels) - 1) (each downsampler floors odd sizes).
    """

    config: AutoencoderKLConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = cfg.norm_num_groups
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        n = len(cfg.block_out_channels)
        for i, ch in enumerate(cfg.block_out_channels):
            # DownEncoderBlock2D: resnets without time embedding, asymmetric-pad downsampler
            x, _ = DownBlock(
                out_channels=ch, num_layers=cfg.layers_per_block, with_attention=False, norm_num_groups=groups,
                norm_eps=VAE_EPS, act_fn=cfg.act_fn, add_downsample=i < n - 1, downsample_padding=0,
                name=f"down_blocks_{i}", **kw,
            )(x, None)
        x = VAEMidBlock(cfg.block_out_channels[-1], groups, cfg.act_fn, cfg.mid_block_add_attention,
                        self.attention_impl, name="mid_block", **kw)(x)
        x = get_activation(cfg.act_fn)(GroupNorm(groups, VAE_EPS, name="conv_norm_out", **kw)(x))
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """diffusers' VAE `Decoder`: `conv_in`, mid block, `UpDecoderBlock2D`s, norm, `conv_out`.

    Call: z (B, h, w, latent_channels) (after `post_quant_conv`) -> (B, h * f, w * f, out_channels).
    """

    config: AutoencoderKLConfig
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = cfg.norm_num_groups
        channels = cfg.block_out_channels[::-1]
        x = conv(channels[0], 3, name="conv_in", **kw)(z)
        x = VAEMidBlock(channels[0], groups, cfg.act_fn, cfg.mid_block_add_attention, self.attention_impl,
                        name="mid_block", **kw)(x)
        for i, ch in enumerate(channels):
            x = UpDecoderBlock(ch, cfg.layers_per_block + 1, groups, cfg.act_fn, add_upsample=i < len(channels) - 1,
                               name=f"up_blocks_{i}", **kw)(x)
        x = get_activation(cfg.act_fn)(GroupNorm(groups, VAE_EPS, name="conv_norm_out", **kw)(x))
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL` (Rombach et al. 2022): encoder + `quant_conv` to posterior moments;
    `post_quant_conv` + decoder back to pixels. Spatial factor f = 2 ** (len(block_out_channels) - 1).
    Raises `ValueError` at init / apply for an `attention_impl` not in `ATTENTION_IMPLS`."""

    config: AutoencoderKLConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self) -> None:
        """Flax: build `encoder`, `decoder` and the (post-)quant convolutions the config enables."""
        check_attention_impl(self.attention_impl)
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, self.attention_impl, **kw)
        self.decoder = Decoder(cfg, self.attention_impl, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), **kw)

    def encode(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, in_channels) in [-1, 1] -> posterior moments (B, H / f, W / f,
        2 * latent_channels) float32: mean and log-variance concatenated on channels (`split_moments`).
        Raises `ValueError` for input that is not NHWC with `in_channels` channels."""
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"images must be NHWC with {cfg.in_channels} channels, got shape {tuple(images.shape)}")
        moments = self.encoder(images.astype(self.dtype))
        if cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        return moments.astype(jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h * f, w * f, out_channels) float32,
        nominally in [-1, 1] (not clipped). Raises `ValueError` for input that is not NHWC with
        `latent_channels` channels."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(
                f"latents must be NHWC with {cfg.latent_channels} channels, got shape {tuple(latents.shape)}"
            )
        z = latents.astype(self.dtype)
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruct (B, H, W, C) images in [-1, 1]: encode, take the posterior mode (or a sample
        with `rng`), decode; (B, H, W, out_channels) float32 when H and W are multiples of f."""
        moments = self.encode(images)
        z = split_moments(moments)[0] if rng is None else sample_posterior(moments, rng)
        return self.decode(z)

    def dummy_inputs(self) -> tuple:
        """Smallest valid inputs, for `init` and `jax.eval_shape`: one zero image (1, f, f, in_channels)."""
        down = 2 ** (len(self.config.block_out_channels) - 1)
        return (jnp.zeros((1, down, down, self.config.in_channels)),)


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, logvar), each (..., latent_channels), of the diagonal Gaussian posterior whose
    (..., 2 * latent_channels) `moments` `encode` returns; logvar clamped to [-30, 20] as in
    diffusers' `DiagonalGaussianDistribution`."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


def sample_posterior(moments: jax.Array, rng: jax.Array) -> jax.Array:
    """One draw mean + exp(logvar / 2) * N(0, 1) from the posterior of `moments` (see `split_moments`),
    with `rng` a JAX key; unscaled latents in `moments`' dtype (diffusers' `latent_dist.sample()`)."""
    mean, logvar = split_moments(moments)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def scale_latents(z: jax.Array, config: AutoencoderKLConfig) -> jax.Array:
    """VAE latents -> diffusion-model latents: `(z - shift_factor) * scaling_factor`."""
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(latents: jax.Array, config: AutoencoderKLConfig) -> jax.Array:
    """Diffusion-model latents -> VAE latents, the inverse of `scale_latents`."""
    return latents / config.scaling_factor + (config.shift_factor or 0.0)
