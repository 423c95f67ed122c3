"""Helpers for parameter pytrees: initialisation, abstract shapes, flat '/'-joined views."""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn


def init_params(model: nn.Module, rng: jax.Array) -> dict:
    """Random parameters for a jaxcontrol model (its `dummy_inputs` fix the shapes)."""
    return jax.jit(lambda r: model.init(r, *model.dummy_inputs())["params"])(rng)


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
