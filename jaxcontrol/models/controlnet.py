"""`ControlNetModel` (Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion Models"), NHWC.

    down, mid = controlnet.apply({"params": cparams}, sample, timesteps, encoder_hidden_states,
                                 cond, conditioning_scale=1.0)

`cond` is the control image, (B, H, W, conditioning_channels) in [0, 1] at 8x the latent size.
`down` is a tuple with one residual per U-Net skip connection and `mid` the mid-block residual,
ready for the U-Net's `down_block_additional_residuals` / `mid_block_additional_residual`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..errors import ConfigError
from .attention import AttentionControl, check_attention_impl
from .configs import ControlNetConfig, controlnet_config_from_unet
from .layers import conv
from .params import flatten, init_params, unflatten
from .unet import dummy_added_conditions, embed_added_conditions, embed_time, encoder_blocks

Dtype = Any

if TYPE_CHECKING:
    from .unet import UNet2DConditionModel

# subtrees a ControlNet copies from its U-Net (diffusers' `ControlNetModel.from_unet`)
SHARED_WITH_UNET = ("conv_in", "time_embedding", "add_embedding", "mid_block")
# layers that start at zero so a fresh ControlNet leaves the U-Net unchanged
ZERO_INITIALISED = ("controlnet_down_blocks_", "controlnet_mid_block", "controlnet_cond_embedding/conv_out")


class ControlNetConditioningEmbedding(nn.Module):
    """diffusers' `ControlNetConditioningEmbedding`: a small conv encoder (SiLU, stride-2 convs) from the
    control image down to latent resolution; (B, H, W, C) -> (B, H / f, W / f,
    conditioning_embedding_channels) with f = 2 ** (len(block_out_channels) - 1), sizes rounding up."""

    conditioning_embedding_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = self.block_out_channels
        x = nn.silu(conv(channels[0], 3, name="conv_in", **kw)(cond))
        for i in range(len(channels) - 1):
            x = nn.silu(conv(channels[i], 3, name=f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(conv(channels[i + 1], 3, stride=2, name=f"blocks_{2 * i + 1}", **kw)(x))
        return conv(self.conditioning_embedding_channels, 3, name="conv_out", **kw)(x)


class ControlNetModel(nn.Module):
    """diffusers' `ControlNetModel`: a trainable copy of the U-Net encoder fed with the control image,
    plus zero 1x1 convs.

    Call:
      sample, timesteps, encoder_hidden_states: as for `UNet2DConditionModel`.
      controlnet_cond: (B, h * f, w * f, conditioning_channels) in [0, 1] for latents h x w, with
        f = 2 ** (len(conditioning_embedding_out_channels) - 1) (8 for SD); RGB (flipped for "bgr").
      conditioning_scale: scalar or (B,), multiplies every residual.
      guess_mode: scale the residuals by logspace(-1, 0) from the first skip (0.1) to mid (1.0)
        (ignored with `global_pool_conditions`).
      added_cond_kwargs: SDXL's {"text_embeds", "time_ids"} for addition_embed_type="text_time"
        (ControlNet-XL), as for the U-Net.
    Returns (down, mid) in `dtype`: a tuple with one residual per U-Net skip connection (the skip's
    shape) and the mid-block residual, for the U-Net's `down_block_additional_residuals` /
    `mid_block_additional_residual`; with `global_pool_conditions`, spatial means (B, 1, 1, C).
    Raises `ValueError` for sample or controlnet_cond that are not NHWC with the configured
    channels, a control image of the wrong size, or an unknown `attention_impl`.
    """

    config: ControlNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    attention_control: AttentionControl | None = None  # see `attention.AttentionControl`

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: float | jax.Array = 1.0,
        guess_mode: bool = False,
        added_cond_kwargs: dict | None = None,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        cfg = self.config
        check_attention_impl(self.attention_impl)
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be NHWC with {cfg.in_channels} channels, got shape {tuple(sample.shape)}")
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[-1] != cfg.conditioning_channels:
            raise ValueError(
                f"controlnet_cond must be NHWC with {cfg.conditioning_channels} channels, "
                f"got shape {tuple(controlnet_cond.shape)}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = sample.shape[0]
        cond = controlnet_cond.astype(self.dtype)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        context = encoder_hidden_states.astype(self.dtype)

        emb = embed_time(self, cfg, timesteps, batch, None)
        added = embed_added_conditions(self, cfg, batch, added_cond_kwargs)
        if added is not None:
            emb = emb + added
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(sample.astype(self.dtype))
        hint = ControlNetConditioningEmbedding(
            cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
            name="controlnet_cond_embedding", **kw,
        )(cond)
        if hint.shape[1:3] != x.shape[1:3]:
            factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
            raise ValueError(
                f"controlnet_cond of spatial size {tuple(controlnet_cond.shape[1:3])} embeds to "
                f"{tuple(hint.shape[1:3])}, but the latents are {tuple(x.shape[1:3])}: "
                f"the control image must be {factor}x the latent size"
            )
        x = x + hint

        downs, mid = encoder_blocks(self, cfg)
        skips = [x]
        for block in downs:
            x, res = block(x, emb, context)
            skips.extend(res)
        if mid is not None:
            x = mid(x, emb, context)

        down = [
            conv(s.shape[-1], 1, padding=0, name=f"controlnet_down_blocks_{i}", **kw)(s) for i, s in enumerate(skips)
        ]
        mid_res = conv(x.shape[-1], 1, padding=0, name="controlnet_mid_block", **kw)(x)

        scale = jnp.asarray(conditioning_scale, dtype=jnp.float32)
        if scale.ndim == 1:  # one scale per batch element
            scale = scale[:, None, None, None]
        if guess_mode and not cfg.global_pool_conditions:
            # diffusers: torch.logspace(-1, 0, n + 1), from 0.1 for the first skip to 1.0 for mid
            ramp = np.logspace(-1, 0, len(down) + 1).astype(np.float32)
            down = [(d * (r * scale)).astype(d.dtype) for d, r in zip(down, ramp[:-1])]
            mid_res = (mid_res * (ramp[-1] * scale)).astype(mid_res.dtype)
        else:
            down = [(d * scale).astype(d.dtype) for d in down]
            mid_res = (mid_res * scale).astype(mid_res.dtype)
        if cfg.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid_res = jnp.mean(mid_res, axis=(1, 2), keepdims=True)
        return tuple(down), mid_res

    def dummy_inputs(self) -> tuple:
        """Smallest valid inputs, for `init` and `jax.eval_shape` (parameter shapes do not depend on them)."""
        cfg = self.config
        down = 2 ** (cfg.num_blocks - 1)
        hint = down * 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        args = (
            jnp.zeros((1, down, down, cfg.in_channels)),
            jnp.zeros((1,)),
            jnp.zeros((1, 1, cfg.cross_attention_dim)),
            jnp.zeros((1, hint, hint, cfg.conditioning_channels)),
        )
        added = dummy_added_conditions(cfg)
        return args if added is None else args + (1.0, False, added)


def controlnet_from_unet(
    unet: "UNet2DConditionModel",
    unet_params: Any,
    rng: jax.Array,
    *,
    conditioning_channels: int = 3,
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    controlnet_conditioning_channel_order: str = "rgb",
    global_pool_conditions: bool = False,
) -> tuple[ControlNetModel, dict]:
    """A fresh ControlNet for `unet`: the U-Net's encoder weights, zero convolutions, random hint encoder.

    The result added to the U-Net leaves its output unchanged (all residuals are exactly zero).
    `unet_params` is the U-Net's params tree, `rng` a JAX key or int seed. Returns (model, params).
    Raises `ConfigError` when the U-Net's config cannot have a ControlNet (see
    `controlnet_config_from_unet`).
    """
    config = controlnet_config_from_unet(
        unet.config,
        conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
        global_pool_conditions=global_pool_conditions,
    )
    model = ControlNetModel(config, dtype=unet.dtype, param_dtype=unet.param_dtype, attention_impl=unet.attention_impl)
    params = init_params(model, rng)
    params = dict(params)
    for name in params:
        if name in SHARED_WITH_UNET or name.startswith("down_blocks_"):
            if name == "time_embedding":
                params[name] = {k: v for k, v in unet_params[name].items() if k in params[name]}
            else:
                params[name] = unet_params[name]
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return model, zero_controlnet_outputs(params)


def check_controlnet_fits(unet_config, controlnet_config, where: str) -> None:
    """Raise `ConfigError` naming `where` and the field when a ControlNet cannot steer a U-Net:
    its residuals' layout (`block_out_channels`, `layers_per_block`) is not the U-Net's skip
    connections', it reads another text width (`cross_attention_dim`), or it takes SDXL's pooled
    text and micro-conditioning (`addition_embed_type="text_time"`) that the U-Net has no inputs for."""
    u, c = unet_config, controlnet_config
    for field, want, got in (("block_out_channels", tuple(u.block_out_channels), tuple(c.block_out_channels)),
                             ("layers_per_block", u.layers_per_block_list, c.layers_per_block_list),
                             ("cross_attention_dim", u.cross_attention_dims[0], c.cross_attention_dims[0])):
        if want != got:
            raise ConfigError(f"{where}: the ControlNet's {field} is {got}, the U-Net's {want}; it was made for "
                              f"another base model")
    if c.addition_embed_type == "text_time" and u.addition_embed_type != "text_time":
        raise ConfigError(f"{where}: a ControlNet-XL (addition_embed_type='text_time') needs an SDXL U-Net; this "
                          f"U-Net's addition_embed_type is {u.addition_embed_type!r}")


def zero_controlnet_outputs(params: dict) -> dict:
    """`params` with the zero convolutions and the hint encoder's last conv set to zero."""
    flat = flatten(params)
    return unflatten(
        {k: jnp.zeros_like(v) if k.startswith(ZERO_INITIALISED) else v for k, v in flat.items()}
    )
