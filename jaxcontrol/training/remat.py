"""Rematerialisation (`jax.checkpoint`) of U-Net and ControlNet blocks, chosen at training time.

    with remat_scope("blocks", "nothing_saveable"):
        out = unet.apply({"params": p}, x, t, ctx)      # each down/mid/up block is rematerialised

The networks are not rewritten: a Flax method interceptor wraps the `__call__` of the chosen
block classes in `flax.linen.remat` while the model is traced. "blocks" rematerialises the
down, mid and up blocks (the ControlNet's encoder blocks are the same classes); "layers" the
finer units inside them (resnets and transformer blocks), which saves less memory and recomputes
less. Blocks nested inside a rematerialised one are not wrapped again. Only the backward pass
changes: values and gradients are those of the plain model up to floating-point reassociation.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import numpy as np
from flax import linen as nn

from ..errors import ConfigError
from ..models.attention import BasicTransformerBlock
from ..models.resnet import ResnetBlock2D
from ..models.unet_blocks import DownBlock, MidBlock, UpBlock

TARGETS = {
    "blocks": (DownBlock, MidBlock, UpBlock),
    "layers": (ResnetBlock2D, BasicTransformerBlock),
}
POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_INSIDE = contextvars.ContextVar("jaxcontrol_remat_inside", default=False)


def _interceptor(targets: tuple[type, ...], policy):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (_INSIDE.get() or context.method_name != "__call__" or not isinstance(module, targets)
                or module.is_initializing()):
            return next_fun(*args, **kwargs)
        # arrays are traced through jax.checkpoint; everything else (None, static sizes) is closed over
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]

        def run(mdl, *values):
            full = list(leaves)
            for i, v in zip(dynamic, values):
                full[i] = v
            a, k = jax.tree_util.tree_unflatten(treedef, full)
            token = _INSIDE.set(True)
            try:
                return mdl(*a, **k)
            finally:
                _INSIDE.reset(token)

        return nn.remat(run, policy=policy, prevent_cse=True)(module, *[leaves[i] for i in dynamic])

    return intercept


@contextlib.contextmanager
def remat_scope(mode: str, policy: str = "nothing_saveable") -> Iterator[None]:
    """Rematerialise the blocks `mode` names ("none", "blocks", "layers") of models applied inside,
    with the `jax.checkpoint_policies` named `policy`. Raises `ConfigError` for an unknown mode or policy."""
    if mode == "none":
        yield
        return
    if mode not in TARGETS:
        raise ConfigError(f"remat mode {mode!r} is not one of ['none', {', '.join(map(repr, TARGETS))}]")
    if policy not in POLICIES:
        raise ConfigError(f"remat policy {policy!r} is not one of {sorted(POLICIES)}")
    with nn.intercept_methods(_interceptor(TARGETS[mode], POLICIES[policy])):
        yield
