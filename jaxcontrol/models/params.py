"""Helpers for parameter pytrees: initialisation, abstract shapes, flat '/'-joined views."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


# std of a standard normal truncated to [-2, 2]; Flax's variance_scaling divides by it
_TRUNC_STD = 0.87962566103423978


def init_params(model: nn.Module, rng: jax.Array) -> dict:
    """Random parameters for a jaxcontrol model, drawn on the host with numpy.

    The distributions are Flax's defaults for each leaf kind: kernels LeCun-normal (truncated
    normal, variance 1/fan_in), biases 0, norm scales 1, embeddings normal with variance
    1/features. Shapes come from `jax.eval_shape`, so nothing is traced through XLA's random
    number generators, whose compilation takes tens of seconds for a U-Net on a CPU.
    `rng` is a JAX key (or an int seed); the result is deterministic in it.
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
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating or computing anything."""
    return jax.eval_shape(lambda r: model.init(r, *model.dummy_inputs())["params"], jax.random.key(0))


def flatten(tree: Any) -> dict[str, Any]:
    """{'a/b/kernel': leaf, ...} for a nested dict of parameters."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(p, "key", p)) for p in path)] = leaf
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def count_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
