"""Helpers for parameter pytrees: initialisation, abstract shapes, flat '/'-joined views."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util


# std of a standard normal truncated to [-2, 2]; Flax's variance_scaling divides by it
_TRUNC_STD = 0.87962566103423978


def init_params(model: nn.Module, rng: jax.Array) -> dict:
    """Random parameters for a jaxcontrol model, drawn on the host with numpy.

    The distributions are Flax's defaults for each leaf kind: kernels LeCun-normal (truncated
    normal, variance 1/fan_in), biases 0, norm scales 1, embeddings normal with variance
    1/features. Shapes come from `jax.eval_shape`, so nothing is traced through XLA's random
    number generators, whose compilation takes tens of seconds for a U-Net on a CPU.
    `rng` is a JAX key, raw key data (uint32) or an int seed; the result is deterministic in it.
    Returns the `"params"` tree (nested dicts of `jax.Array`s in the module's `param_dtype`);
    `model` must define `dummy_inputs()`.
    """
    if isinstance(rng, int):
        seed = np.array([rng], np.uint32)
    else:
        data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
        seed = np.asarray(data, np.uint32).ravel()
    gen = np.random.default_rng(seed)
    out = {}
    for path, struct in flatten(param_shapes(model)).items():
        out[path] = jnp.asarray(_draw(gen, path.rpartition("/")[2], struct.shape), dtype=struct.dtype)
    return unflatten(out)


def _draw(gen: np.random.Generator, leaf: str, shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    if leaf == "scale":
        return np.ones(shape, np.float32)
    if leaf == "kernel":
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        z = gen.standard_normal(shape, dtype=np.float32)
        bad = np.abs(z) > 2
        while bad.any():
            z[bad] = gen.standard_normal(int(bad.sum()), dtype=np.float32)
            bad = np.abs(z) > 2
        return z * np.float32(np.sqrt(1.0 / fan_in) / _TRUNC_STD)
    if leaf == "embedding":
        return gen.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
    return gen.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


def param_shapes(model: nn.Module) -> dict:
    """The `"params"` tree of `model.init(key, *model.dummy_inputs())` as `jax.ShapeDtypeStruct`s,
    without allocating or computing anything."""
    return jax.eval_shape(lambda r: model.init(r, *model.dummy_inputs())["params"], jax.random.key(0))


def flatten(tree: Any) -> dict[str, Any]:
    """A nested dict (or `FrozenDict`) of parameters as {"a/b/kernel": leaf}, keys sorted level by level.

    `flax.traverse_util.flatten_dict` joined with "/" (keys through `str()`). The order is
    `jax.tree_util.tree_leaves(tree)`'s, so the values line up with the leaves of a dict-only
    tree. Empty dicts and None values give no entry, as in `jax.tree_util`; any other non-dict
    value (arrays, ShapeDtypeStructs, Orbax metadata, but also lists) is one leaf. Raises
    `AssertionError` when `tree` itself is not a dict.
    """
    flat = traverse_util.flatten_dict(tree)
    return {"/".join(map(str, path)): flat[path] for path in sorted(flat) if flat[path] is not None}


# module names that really end in _<digit> in PyTorch too (TimestepEmbedding's linear_1 / linear_2)
UNDERSCORE_NAMES = frozenset({"linear_1", "linear_2"})


def torch_module_name(module_path: str) -> str:
    """A "/"-joined Flax module path as the PyTorch module name it mirrors (list indices joined by
    "_" become ".k"): 'down_blocks_0/attentions_1/.../to_out_0' -> 'down_blocks.0.attentions.1.....to_out.0'."""
    parts = []
    for m in module_path.split("/"):
        match = re.fullmatch(r"(.+)_(\d+)", m)
        parts.append(m if (match is None or m in UNDERSCORE_NAMES) else f"{match[1]}.{match[2]}")
    return ".".join(parts)


def unflatten(flat: dict[str, Any]) -> dict:
    """The inverse of `flatten`: {"a/b/kernel": leaf} -> {"a": {"b": {"kernel": leaf}}}, in `flat`'s order."""
    return traverse_util.unflatten_dict(flat, sep="/")


def count_params(tree: Any) -> int:
    """Total number of elements over the array leaves of `tree` (parameters, or their ShapeDtypeStructs)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
