"""LoRAs on a pipeline's networks: which params each file's part adapts, and the program's step
that adds the unmerged ones.

A pipeline's params are {"unet", "text_encoder", "vae", "controlnets": [...], "adapters": [...]};
a LoRA names its networks as diffusers does: "unet", "text_encoder", and "controlnet",
"controlnet_1", ... for the pipeline's ControlNets in order. Unmerged LoRAs ride along as
`params["loras"]` (one weights dict per LoRA) and are added in the program by `apply_loras` with
traced scales, so changing a scale reuses the compiled program; merged ones are already in the
params (`Pipeline.fuse_loras`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from .errors import ConfigError
from .models.lora import Lora, with_loras


@dataclasses.dataclass(frozen=True)
class LoraInput:
    """A LoRA to load: `source` (a file, a folder holding `pytorch_lora_weights.safetensors`, or a
    `models.lora.Lora`), its `scale` (diffusers' adapter weight), and a `name` (default: the file's
    stem) by which `Pipeline.set_lora_scale` and the sidecar refer to it."""

    source: Any
    scale: float = 1.0
    name: str | None = None


def as_lora_input(spec: Any) -> LoraInput:
    """A `LoraInput` from one, from a path or `Lora`, or from a (source, scale) pair."""
    if isinstance(spec, LoraInput):
        return spec
    if isinstance(spec, (str, os.PathLike, Lora)):
        return LoraInput(spec)
    if isinstance(spec, tuple) and len(spec) == 2:
        return LoraInput(*spec)
    raise ConfigError(f"a LoRA is a path, a Lora, a (path, scale) pair or a LoraInput; got {spec!r}")


def _controlnet_index(component: str) -> int | None:
    m = re.fullmatch(r"controlnet(?:_(\d+))?", component)
    return None if m is None else int(m[1] or 0)


def lora_targets(params: Mapping) -> dict[str, Any]:
    """The networks of pipeline `params` a LoRA may adapt, by diffusers' component name."""
    out = {name: params[name] for name in ("unet", "text_encoder", "text_encoder_2") if name in params}
    for k, p in enumerate(params.get("controlnets", ())):
        out["controlnet" if k == 0 else f"controlnet_{k}"] = p
    return out


def get_component(params: Mapping, component: str):
    k = _controlnet_index(component)
    if k is not None:
        return params["controlnets"][k]
    if component in ("unet", "text_encoder", "text_encoder_2") and component in params:
        return params[component]
    raise ConfigError(f"a pipeline has no network {component!r} for a LoRA")


def set_component(params: dict, component: str, value) -> dict:
    """A shallow copy of pipeline `params` with one network replaced."""
    out = dict(params)
    k = _controlnet_index(component)
    if k is not None:
        cns = list(out["controlnets"])
        cns[k] = value
        out["controlnets"] = cns
    else:
        out[component] = value
    return out


def apply_loras(params: Mapping, scales) -> dict:
    """Pipeline `params` with the unmerged LoRAs of `params["loras"]` added, LoRA i times
    `scales[i]` (traced). Without LoRAs, `params` itself."""
    loras: Sequence[Mapping] = params.get("loras") or ()
    if not loras:
        return dict(params)
    out = {k: v for k, v in params.items() if k != "loras"}
    components = sorted({c for lora in loras for c in lora})
    for comp in components:
        idx = [i for i, lora in enumerate(loras) if comp in lora]
        layers = [loras[i][comp] for i in idx]
        out = set_component(out, comp, with_loras(get_component(out, comp), layers, jnp.asarray(scales)[jnp.asarray(idx)]))
    return out
