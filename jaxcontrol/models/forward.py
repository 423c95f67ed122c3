"""The one model forward: a U-Net steered by ControlNet residuals and T2I-Adapter features.

    eps = model_forward(unet, unet_params, x, t, text,
                        controlnets=[ControlNetCall(cn, cn_params, image, scale=0.8)],
                        adapter_features=features)

Sampling (`guidance.unet_prediction`), training (`training.step.model_prediction`) and the
validation sampler all call this function, so how the residuals combine is written once, as
diffusers' ControlNet and T2I-Adapter pipelines combine them:

- each ControlNet returns 12 down-block residuals and one mid-block residual, already multiplied by
  its `conditioning_scale` (and, in guess mode, by the 0.825^(12-k) ramp); the residuals of several
  ControlNets are summed (diffusers' `MultiControlNetModel`) and added to the U-Net's skip
  connections and mid block (`down_block_additional_residuals`, `mid_block_additional_residual`);
- T2I-Adapter features (already scaled, one per down level) are added inside the down blocks
  (`down_intrablock_additional_residuals`);
- a concatenation-conditioned U-Net (inpainting: 9 input channels, depth: 5, InstructPix2Pix: 8)
  gets `concat` (B, h, w, extra) appended to the latents along channels, after the solver's input
  scaling, while ControlNets see the latents alone (diffusers' inpainting ControlNet pipeline).

Shapes: `x` (B, h, w, C) latents (NHWC), `t` (B,) or scalar timesteps, `text` (B, 77, D) encoder
hidden states, `added` SDXL's pooled text embeddings and micro-conditioning ids, control images
(B, H, W, 3) in [0, 1] at pixel size. Returns the U-Net's output (B, h, w, C) in its
`prediction_type` (epsilon, v or sample).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Sequence

import flax
import jax
import jax.numpy as jnp

from .attention import ATTENTION_MAPS, AttentionControl, layer_name
from .unet import attention_layers


@dataclasses.dataclass(frozen=True)
class ControlNetCall:
    """One ControlNet's part of a forward pass.

    `scale` is diffusers' `controlnet_conditioning_scale`: a scalar or one value per sample (B,),
    which is how a closed control window or the unconditional branch of guess mode switches a
    ControlNet off without recompiling. `mid_block_only` keeps only the mid-block residual (the
    ControlNet paper's small-scale training).
    """

    module: Any
    params: Any
    image: jax.Array
    scale: Any = 1.0
    guess_mode: bool = False
    mid_block_only: bool = False


def _no_scope(name: str) -> ContextManager:
    del name
    return contextlib.nullcontext()


def controlnet_residuals(controlnets: Sequence[ControlNetCall], x, t, text, *,
                         scope: Callable[[str], ContextManager] = _no_scope, concat: jax.Array | None = None,
                         added: dict | None = None):
    """The summed (down residuals, mid residual) of `controlnets` for this step; None for none.

    A ControlNet sees the latents `x`, or `x` with the `concat` channels when it was made with
    that input width (`in_channels`), e.g. copied from an inpainting U-Net. `added`: SDXL's
    `added_cond_kwargs`, given to the ControlNets that have an additional embedding (ControlNet-XL)."""
    down, mid = None, None
    for c in controlnets:
        sample = x
        config = getattr(c.module, "config", None)
        width = getattr(config, "in_channels", x.shape[-1])
        if concat is not None and width == x.shape[-1] + concat.shape[-1]:
            sample = jnp.concatenate([x, concat.astype(x.dtype)], axis=-1)
        extra = {}
        if added is not None and getattr(config, "addition_embed_type", None):
            extra["added_cond_kwargs"] = added
        with scope("controlnet"):
            d, m = c.module.apply({"params": c.params}, sample, t, text, c.image, conditioning_scale=c.scale,
                                  guess_mode=c.guess_mode, **extra)
        if c.mid_block_only:
            d = tuple(jnp.zeros_like(r) for r in d)
        down = d if down is None else tuple(a + r for a, r in zip(down, d))
        mid = m if mid is None else mid + m
    return None if down is None else (down, mid)


def concat_channels(unet, x, concat) -> jax.Array:
    """The U-Net's input: `x` with the `concat` channels appended (NHWC), checked against its
    `in_channels`. Raises `ValueError` naming both widths when they do not add up."""
    want = int(unet.config.in_channels)
    have = x.shape[-1] + (0 if concat is None else concat.shape[-1])
    if have != want:
        extra = "no concatenated condition" if concat is None else f"a {concat.shape[-1]}-channel condition"
        raise ValueError(f"the U-Net takes {want} input channels; got {x.shape[-1]}-channel latents and {extra}"
                         + (" (a concatenation-conditioned model: inpainting, depth or InstructPix2Pix needs its "
                            "extra input)" if concat is None else ""))
    if concat is None:
        return x
    if concat.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"the concatenated condition has shape {tuple(concat.shape)}; expected "
                         f"{tuple(x.shape[:-1]) + (concat.shape[-1],)} to match the latents {tuple(x.shape)}")
    return jnp.concatenate([x, concat.astype(x.dtype)], axis=-1)


def model_forward(unet, params, x, t, text, *, controlnets: Sequence[ControlNetCall] = (),
                  adapter_features: Sequence[jax.Array] | None = None,
                  scope: Callable[[str], ContextManager] = _no_scope, concat: jax.Array | None = None,
                  attention: AttentionControl | None = None, added: dict | None = None):
    """The U-Net's prediction for latents `x` at timesteps `t`, steered by `controlnets` and
    T2I-Adapter `adapter_features`, with `concat` channels for concatenation-conditioned U-Nets
    (see the module docstring for shapes).

    `scope(name)` returns a context manager entered around each network's application, with name
    "controlnet" or "unet"; training passes one that rematerialises the chosen blocks
    (`training.remat.remat_scope`). It does not change values.

    `added`: SDXL's `added_cond_kwargs` ({"text_embeds": (B, P), "time_ids": (B, K)}) for a U-Net
    (and ControlNets) with `addition_embed_type="text_time"`.

    `attention`: an `AttentionControl` for the U-Net's attention layers (not the ControlNets'):
    then the result is (prediction, maps), `maps` a dict from each captured layer's diffusers
    name to its probabilities (B, heads, Lq, Lk) float32 (empty when nothing is captured). Names
    the U-Net does not have raise `ValueError` listing its layers.
    """
    kwargs: dict[str, Any] = {}
    residuals = controlnet_residuals(controlnets, x, t, text, scope=scope, concat=concat, added=added)
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    if residuals is not None:
        kwargs.update(down_block_additional_residuals=residuals[0], mid_block_additional_residual=residuals[1])
    if adapter_features is not None:
        kwargs["down_intrablock_additional_residuals"] = tuple(adapter_features)
    sample = concat_channels(unet, x, concat)
    if attention is None:
        with scope("unet"):
            return unet.apply({"params": params}, sample, t, text, **kwargs)
    check_attention_control(unet.config, attention)
    with scope("unet"):
        out, state = unet.clone(attention_control=attention).apply(
            {"params": params}, sample, t, text, mutable=[ATTENTION_MAPS], **kwargs)
    return out, collect_attention_maps(state)


def check_attention_control(config, control: AttentionControl) -> None:
    """Raise `ValueError` naming any layer of `control` that a model of `config` does not have, and
    any `identity` layer that is cross-attention."""
    layers = {layer.name: layer for layer in attention_layers(config)}
    for field in ("capture", "identity"):
        unknown = [n for n in getattr(control, field) if n not in layers]
        if unknown:
            raise ValueError(f"AttentionControl.{field} names {unknown}, which this model does not have; its "
                             f"attention layers are {sorted(layers)}")
    cross = [n for n in control.identity if layers[n].cross]
    if cross:
        raise ValueError(f"AttentionControl.identity names cross-attention layers {cross}; only self-attention "
                         "can be replaced by the identity")


def collect_attention_maps(state) -> dict:
    """The `ATTENTION_MAPS` collection of an apply as {diffusers layer name: probs}."""
    maps = {}
    for path, value in flax.traverse_util.flatten_dict(dict(state.get(ATTENTION_MAPS, {}))).items():
        maps[layer_name(path[:-1])] = value[-1] if isinstance(value, tuple) else value
    return maps


__all__ = ["ControlNetCall", "check_attention_control", "collect_attention_maps", "concat_channels",
           "controlnet_residuals", "model_forward"]
