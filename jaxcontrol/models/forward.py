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
  (`down_intrablock_additional_residuals`).

Shapes: `x` (B, h, w, C) latents (NHWC), `t` (B,) or scalar timesteps, `text` (B, 77, D) encoder
hidden states, control images (B, H, W, 3) in [0, 1] at pixel size. Returns the U-Net's output
(B, h, w, C) in its `prediction_type` (epsilon, v or sample).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Sequence

import jax
import jax.numpy as jnp


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
                         scope: Callable[[str], ContextManager] = _no_scope):
    """The summed (down residuals, mid residual) of `controlnets` for this step; None for none."""
    down, mid = None, None
    for c in controlnets:
        with scope("controlnet"):
            d, m = c.module.apply({"params": c.params}, x, t, text, c.image, conditioning_scale=c.scale,
                                  guess_mode=c.guess_mode)
        if c.mid_block_only:
            d = tuple(jnp.zeros_like(r) for r in d)
        down = d if down is None else tuple(a + r for a, r in zip(down, d))
        mid = m if mid is None else mid + m
    return None if down is None else (down, mid)


def model_forward(unet, params, x, t, text, *, controlnets: Sequence[ControlNetCall] = (),
                  adapter_features: Sequence[jax.Array] | None = None,
                  scope: Callable[[str], ContextManager] = _no_scope) -> jax.Array:
    """The U-Net's prediction for latents `x` at timesteps `t`, steered by `controlnets` and
    T2I-Adapter `adapter_features` (see the module docstring for shapes).

    `scope(name)` returns a context manager entered around each network's application, with name
    "controlnet" or "unet"; training passes one that rematerialises the chosen blocks
    (`training.remat.remat_scope`). It does not change values.
    """
    kwargs: dict[str, Any] = {}
    residuals = controlnet_residuals(controlnets, x, t, text, scope=scope)
    if residuals is not None:
        kwargs.update(down_block_additional_residuals=residuals[0], mid_block_additional_residual=residuals[1])
    if adapter_features is not None:
        kwargs["down_intrablock_additional_residuals"] = tuple(adapter_features)
    with scope("unet"):
        return unet.apply({"params": params}, x, t, text, **kwargs)


__all__ = ["ControlNetCall", "controlnet_residuals", "model_forward"]
