"""Low-rank adaptation (LoRA, Hu et al. 2021) as pure functions of parameter pytrees.

A LoRA adds to a layer's weight a product of two thin matrices, `W' = W + s * m * (down @ up)`,
where `m` is the file's `alpha / rank` and `s` the user's scale. It is held as a pytree beside the
model's params, never inside them:

    {"down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q":       # the module, as in params
        {"down": (in, r) or (kh, kw, in, r),  # Flax layout: a Linear's or a Conv's kernel, r outputs
         "up": (r, out),                      # the 1x1 second factor
         "multiplier": () float32,            # alpha / rank (or alpha / sqrt(rank): rsLoRA)
         "bias": (out,)}}                     # optional (PEFT's lora_bias)

one such dict per network ("unet", "text_encoder", "controlnet", ...) in `Lora.weights`.

* `with_loras(params, layers, scales)`: the params with every delta added, in float32 and cast
  back. Under `jit` with `scales` traced, this is the *unmerged* mode: the deltas are recomputed
  in the program, and a scale changes without recompiling. `jax.grad` flows into `down` / `up`,
  which is how LoRA training uses it.
* `merge_loras(params, layers, scales)` returns the merged params and the original leaves it
  replaced; `unmerge_loras(merged, originals)` puts those back, so the result is the original
  params bit for bit (a subtraction would not be).
* `init_lora(params, targets, rank, alpha, seed)`: a fresh, zero-effect LoRA for training
  (`down` as PEFT's Kaiming-uniform, `up` zeros).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from .params import flatten, torch_module_name, unflatten

FACTOR_KEYS = ("down", "up", "multiplier", "bias")


@dataclasses.dataclass(frozen=True)
class Lora:
    """A LoRA read from a file or trained here: `weights` maps a network's name ("unet",
    "text_encoder", "controlnet", "controlnet_1", ...) to its layers (see the module docstring);
    `name` identifies it (the file's stem by default), `source` says where it came from and
    `format` which layout the file had ("peft", "diffusers-legacy", "kohya", "jaxcontrol")."""

    name: str
    weights: Mapping[str, Mapping[str, Mapping[str, Any]]]
    source: str = "<memory>"
    format: str = "jaxcontrol"

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def rank(self) -> int:
        """The largest rank of any layer (files may mix ranks per layer)."""
        return max((int(np.shape(layer["up"])[0]) for comp in self.weights.values() for layer in comp.values()),
                   default=0)

    def num_layers(self) -> int:
        return sum(len(c) for c in self.weights.values())


def lora_delta(layer: Mapping[str, Any], kernel_shape: Sequence[int]) -> jax.Array:
    """`multiplier * down @ up` in float32, shaped like the kernel it adds to.

    A Linear factor pair on a 1x1 convolution (or the reverse) is reshaped: both mean the same
    matrix. Raises `ConfigError` when the product cannot take `kernel_shape`."""
    down = jnp.asarray(layer["down"], jnp.float32)
    up = jnp.asarray(layer["up"], jnp.float32)
    delta = jnp.tensordot(down, up, axes=1) * jnp.asarray(layer["multiplier"], jnp.float32)
    if tuple(delta.shape) != tuple(kernel_shape):
        if int(np.prod(delta.shape)) != int(np.prod(kernel_shape)) or delta.shape[-2:] != tuple(kernel_shape[-2:]):
            raise ConfigError(f"a LoRA delta of shape {tuple(delta.shape)} cannot be added to a kernel of shape "
                              f"{tuple(kernel_shape)}")
        delta = delta.reshape(kernel_shape)
    return delta


def _deltas(params: Mapping, layers: Sequence[Mapping], scales) -> dict[str, jax.Array]:
    """{leaf path: summed float32 delta} over every LoRA in `layers` (one layer dict per LoRA)."""
    flat = flatten(params)
    scales = jnp.asarray(scales, jnp.float32).reshape(-1) if len(layers) else None
    if scales is not None and scales.shape[0] != len(layers):
        raise ConfigError(f"{len(layers)} LoRAs but {scales.shape[0]} scales")
    out: dict[str, jax.Array] = {}
    for i, lora in enumerate(layers):
        for module, layer in lora.items():
            kernel_path = f"{module}/kernel"
            if kernel_path not in flat:
                raise ConfigError(f"a LoRA targets {module!r}, which the model has no kernel for")
            d = scales[i] * lora_delta(layer, flat[kernel_path].shape)
            out[kernel_path] = out[kernel_path] + d if kernel_path in out else d
            if "bias" in layer:
                bias_path = f"{module}/bias"
                if bias_path not in flat:
                    raise ConfigError(f"a LoRA adds a bias to {module!r}, which has none")
                b = scales[i] * jnp.asarray(layer["multiplier"], jnp.float32) * jnp.asarray(layer["bias"], jnp.float32)
                out[bias_path] = out[bias_path] + b if bias_path in out else b
    return out


def with_loras(params: Mapping, layers: Sequence[Mapping], scales) -> dict:
    """`params` with each LoRA's delta (one layer dict per LoRA, for this network) times its scale
    added; the sum is formed in float32 and cast to each leaf's dtype once. Pure: `jit`, `grad`
    and `vmap` apply, and `scales` (one per LoRA) may be traced. No LoRAs: `params` unchanged."""
    if not layers:
        return params
    return merge_loras(params, layers, scales)[0]


def merge_loras(params: Mapping, layers: Sequence[Mapping], scales) -> tuple[dict, dict]:
    """(merged params, {leaf path: original leaf}) — `unmerge_loras(merged, originals)` restores
    `params` exactly. The originals are the replaced arrays themselves, not copies."""
    deltas = _deltas(params, layers, scales)
    flat = dict(flatten(params))
    originals = {path: flat[path] for path in deltas}
    for path, d in deltas.items():
        w = flat[path]
        flat[path] = (jnp.asarray(w, jnp.float32) + d).astype(w.dtype)
    return unflatten(flat), originals


def unmerge_loras(merged: Mapping, originals: Mapping[str, Any]) -> dict:
    """The params `merge_loras` started from: each merged leaf replaced by its original."""
    flat = dict(flatten(merged))
    missing = [p for p in originals if p not in flat]
    if missing:
        raise ConfigError(f"cannot unmerge: the params have no leaves {missing[:5]}")
    flat.update(originals)
    return unflatten(flat)


# ---------------------------------------------------------------------------------------- training
def lora_targets(params: Mapping, target_modules: Sequence[str] | str) -> list[str]:
    """The module paths of `params` a LoRA with PEFT's `target_modules` adapts.

    A list of names matches modules whose diffusers name ends with one of them at a dot boundary
    (`"to_q"`, `"to_out.0"`, `"attn2.to_k"`, `"conv1"`); a string is a regular expression that
    must match the whole diffusers name (PEFT's rule). Only modules with a 2-D (Linear) or 4-D
    (Conv) `kernel` qualify. Raises `ConfigError` when nothing matches."""
    modules = sorted({p.rpartition("/")[0] for p, v in flatten(params).items()
                      if p.endswith("/kernel") and np.ndim(v) in (2, 4)})
    names = {m: torch_module_name(m) for m in modules}
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ConfigError(f"target_modules {target_modules!r} is not a valid regular expression: {e}") from None
        chosen = [m for m in modules if pattern.fullmatch(names[m])]
    else:
        wanted = [str(t) for t in target_modules]
        chosen = [m for m in modules if any(names[m] == t or names[m].endswith("." + t) for t in wanted)]
        unmatched = [t for t in wanted if not any(names[m] == t or names[m].endswith("." + t) for m in modules)]
        if unmatched:
            raise ConfigError(f"target_modules {unmatched} match no Linear or Conv layer of the model")
    if not chosen:
        raise ConfigError(f"target_modules {target_modules!r} match no Linear or Conv layer of the model")
    return chosen


def init_lora(params: Mapping, targets: Sequence[str], rank: int, alpha: float | None = None,
              seed: int = 0, *, use_rslora: bool = False) -> dict:
    """A zero-effect LoRA over the modules `targets` of `params` (see `lora_targets`).

    `down` is drawn as PEFT's default (Kaiming-uniform with a = sqrt(5): uniform in
    ±1/sqrt(fan_in)), `up` is zero, so training starts from the base model; `multiplier` is
    alpha / rank (alpha defaults to rank), or alpha / sqrt(rank) with `use_rslora`. Returns the
    layer dict for one network; factors are float32."""
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"LoRA alpha must be a positive number, got {alpha!r}")
    flat = flatten(params)
    gen = np.random.default_rng(seed)
    out = {}
    for module in targets:
        kernel = flat.get(f"{module}/kernel")
        if kernel is None or np.ndim(kernel) not in (2, 4):
            raise ConfigError(f"LoRA target {module!r} has no Linear or Conv kernel")
        shape = tuple(np.shape(kernel))
        r = int(rank)
        fan_in = int(np.prod(shape[:-1]))
        bound = 1.0 / math.sqrt(fan_in)
        down = gen.uniform(-bound, bound, size=shape[:-1] + (r,)).astype(np.float32)
        out[module] = {"down": jnp.asarray(down), "up": jnp.zeros((r, shape[-1]), jnp.float32),
                       "multiplier": jnp.asarray(alpha / (math.sqrt(r) if use_rslora else r), jnp.float32)}
    return out


def trainable_factors(layers: Mapping) -> dict:
    """The trainable part of a layer dict (`down`, `up`, `bias`), without the fixed multipliers."""
    return {m: {k: v for k, v in layer.items() if k != "multiplier"} for m, layer in layers.items()}


def with_multipliers(factors: Mapping, layers: Mapping) -> dict:
    """`trainable_factors`' inverse: the factors with `layers`' multipliers put back."""
    return {m: {**dict(f), "multiplier": layers[m]["multiplier"]} for m, f in factors.items()}
