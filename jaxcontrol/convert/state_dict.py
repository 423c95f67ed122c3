"""PyTorch state dict <-> Flax parameter tree, by one mechanical naming rule.

Our modules are named after diffusers' PyTorch modules, with list indices joined by `_`:

    down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight
    down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0/kernel

Leaves: `weight` is `kernel` (Conv: (O,I,kh,kw) -> (kh,kw,I,O); Linear: (O,I) -> (I,O)),
`scale` (norms) or `embedding` (embeddings); `bias` is `bias`. A Linear stored as a 1x1 conv
(old VAE attention) is squeezed. The expected tree (from `jax.eval_shape`) drives the conversion,
so every missing, unexpected or wrongly shaped key is found before any tensor is read.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax.numpy as jnp
import numpy as np

from ..errors import CheckpointError
from ..models.params import flatten, torch_module_name, unflatten
from .sources import TensorSource

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
MAX_LISTED = 25


def torch_module_to_flax(module_key: str) -> str:
    """'down_blocks.0.resnets.1.conv1' -> 'down_blocks_0/resnets_1/conv1'."""
    out: list[str] = []
    for part in module_key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return "/".join(out)


def flax_path_to_torch_key(path: str) -> str:
    """Best-effort inverse of the naming rule, for error messages and export."""
    module, _, leaf = path.rpartition("/")
    name = _LEAF_TO_TORCH.get(leaf, leaf)
    return f"{torch_module_name(module)}.{name}" if module else name


def torch_layout_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a parameter whose Flax shape is `flax_shape`."""
    if leaf == "kernel" and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if leaf == "kernel" and len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    return tuple(flax_shape)


def _transform(leaf: str, torch_shape: tuple[int, ...], flax_shape: tuple[int, ...]) -> Callable | None:
    """The function taking the torch array to the flax array, or None if the shapes cannot match."""
    if leaf == "kernel":
        if len(torch_shape) == 4 and len(flax_shape) == 4:
            if (torch_shape[2], torch_shape[3], torch_shape[1], torch_shape[0]) == tuple(flax_shape):
                return lambda a: np.transpose(a, (2, 3, 1, 0))
            return None
        if len(torch_shape) == 2 and len(flax_shape) == 2:
            return (lambda a: a.T) if (torch_shape[1], torch_shape[0]) == tuple(flax_shape) else None
        if len(torch_shape) == 4 and len(flax_shape) == 2 and torch_shape[2:] == (1, 1):
            if (torch_shape[1], torch_shape[0]) == tuple(flax_shape):
                return lambda a: a[:, :, 0, 0].T
        return None
    return (lambda a: a) if tuple(torch_shape) == tuple(flax_shape) else None


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


def convert_to_flax(
    source: TensorSource,
    expected: Any,
    *,
    dtype: Any = jnp.float32,
    ignore: Iterable[str] = (),
    what: str = "model",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Read `source` into a Flax parameter tree shaped like `expected` (a tree of ShapeDtypeStructs).

    `ignore` holds regexes of source keys that are allowed to be left over (e.g. buffers).
    Raises `CheckpointError` listing every missing, unexpected and wrongly shaped key.
    """
    by_module: dict[tuple[str, str], str] = {}
    for key in source.keys():
        module, _, pname = key.rpartition(".")
        by_module[(torch_module_to_flax(module), pname)] = key

    expected_flat = flatten(expected)
    plan: dict[str, tuple[str, Callable]] = {}
    missing, mismatched = [], []
    for path, struct in expected_flat.items():
        module, _, leaf = path.rpartition("/")
        torch_key = by_module.get((module, _LEAF_TO_TORCH.get(leaf, leaf)))
        if torch_key is None:
            missing.append(
                f"{flax_path_to_torch_key(path)} (expected shape {torch_layout_shape(leaf, struct.shape)})"
            )
            continue
        fn = _transform(leaf, source.shape(torch_key), struct.shape)
        if fn is None:
            mismatched.append(
                f"{torch_key}: expected shape {torch_layout_shape(leaf, struct.shape)}, "
                f"found {tuple(source.shape(torch_key))}"
            )
            continue
        plan[path] = (torch_key, fn)

    used = {k for k, _ in plan.values()}
    patterns = [re.compile(p) for p in ignore]
    unexpected = [
        f"{k} (shape {tuple(source.shape(k))})"
        for k in source.keys()
        if k not in used and not any(p.search(k) for p in patterns)
    ]
    # a key that is present but has the wrong shape is reported once, as mismatched
    mismatched_keys = {m.split(":")[0] for m in mismatched}
    unexpected = [u for u in unexpected if u.split(" ")[0] not in mismatched_keys]
    if missing or unexpected or mismatched:
        parts = [f"{source.origin}: the weights do not match the {what}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}):{_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}):{_listing(unexpected)}")
        if mismatched:
            parts.append(f"wrongly shaped keys ({len(mismatched)}):{_listing(mismatched)}")
        raise CheckpointError("\n".join(parts))

    out = {}
    for path, (torch_key, fn) in plan.items():
        array = fn(source.load(torch_key))
        if dtype is not None and jnp.issubdtype(array.dtype, jnp.floating):
            array = array.astype(dtype)
        out[path] = jnp.asarray(array)
        del array
        if progress is not None:
            progress(1)
    return unflatten(out)


def flax_to_torch_state_dict(params: Any) -> dict[str, np.ndarray]:
    """The inverse mapping: a Flax tree back to PyTorch-layout numpy arrays keyed by torch names."""
    out = {}
    for path, leaf in flatten(params).items():
        a = np.asarray(leaf)
        name = path.rpartition("/")[2]
        if name == "kernel" and a.ndim == 4:
            a = np.transpose(a, (3, 2, 0, 1))
        elif name == "kernel" and a.ndim == 2:
            a = a.T
        out[flax_path_to_torch_key(path)] = np.ascontiguousarray(a)
    return out
