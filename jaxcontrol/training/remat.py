"""Rematerialisation (`jax.checkpoint`) of U-Net and ControlNet blocks, chosen at training time.

    with remat_scope("blocks", "nothing_saveable"):
        out = unet.apply({"params": p}, x, t, ctx)      # each down/mid/up block is rematerialised
    with remat_scope("none", attention=True):
        out = unet.apply({"params": p}, x, t, ctx)      # only each attention layer's inside is

The networks are not rewritten: a Flax method interceptor wraps the `__call__` of the chosen
block classes in `flax.linen.remat` while the model is traced. "blocks" rematerialises the
down, mid and up blocks (the ControlNet's encoder blocks are the same classes); "layers" the
finer units inside them (resnets and transformer blocks), which saves less memory and recomputes
less. Blocks nested inside a rematerialised one are not wrapped again. `policy` says what a
wrapped block may keep for the backward pass: a `jax.checkpoint_policies` name, or
"convs_and_dense_saveable" (the outputs of convolutions and of dense layers, the products with
weights; not the normalisations and activations, which are cheap to recompute, nor attention's
products of activations).

`attention=True` wraps every `Attention` layer on its own with `nothing_saveable`, and removes
attention's products of activations (q k^T, probabilities x v) from the blocks' policy: its
(heads, Lq, Lk) scores and softmax probabilities are recomputed in the backward pass instead of
being stored, whatever the kernel (`attention_impl`) and the blocks' policy.

Only the backward pass changes: values and gradients are those of the plain model up to
floating-point reassociation.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import numpy as np
from flax import linen as nn

from ..errors import ConfigError
from ..models.attention import Attention, BasicTransformerBlock
from ..models.resnet import ResnetBlock2D
from ..models.unet_blocks import DownBlock, MidBlock, UpBlock

TARGETS = {
    "blocks": (DownBlock, MidBlock, UpBlock),
    "layers": (ResnetBlock2D, BasicTransformerBlock),
}


def _is_weight_product(prim, *args, **params) -> bool:
    """A dense layer's product: a `dot_general` without batch dimensions whose right operand is a
    matrix contracted on its first axis (Flax's `Dense`: inputs (..., in) x kernel (in, out))."""
    if prim is not jax.lax.dot_general_p:
        return False
    (_, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    rhs = args[1] if len(args) > 1 else None
    return not lhs_batch and not rhs_batch and tuple(rhs_contract) == (0,) and getattr(rhs, "ndim", 2) == 2


def _is_activation_product(prim, *args, **params) -> bool:
    """A `dot_general` that is not a dense layer's: attention's q k^T and probabilities x v, in any kernel
    (batched einsums in "plain", per-block products of two activations in "chunked")."""
    return prim is jax.lax.dot_general_p and not _is_weight_product(prim, *args, **params)


def convs_and_dense_saveable(prim, *args, **params) -> bool:
    """A `jax.checkpoint` policy for a convolutional U-Net: keep the outputs of convolutions and of
    dense layers (products with a weight matrix); recompute everything else: group and layer norms,
    activations, additions, and attention's products of activations (scores, probabilities x values)."""
    return prim is jax.lax.conv_general_dilated_p or _is_weight_product(prim, *args, **params)


def _without_attention_products(policy):
    def filtered(prim, *args, **params):
        return not _is_activation_product(prim, *args, **params) and policy(prim, *args, **params)

    return filtered


POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "convs_and_dense_saveable": convs_and_dense_saveable,
}

_INSIDE = contextvars.ContextVar("jaxcontrol_remat_inside", default=False)
_INSIDE_ATTENTION = contextvars.ContextVar("jaxcontrol_remat_inside_attention", default=False)


def _interceptor(targets: tuple[type, ...], policy, inside: contextvars.ContextVar = _INSIDE):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (inside.get() or context.method_name != "__call__" or not isinstance(module, targets)
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
            token = inside.set(True)
            try:
                return mdl(*a, **k)
            finally:
                inside.reset(token)

        return nn.remat(run, policy=policy, prevent_cse=True)(module, *[leaves[i] for i in dynamic])

    return intercept


@contextlib.contextmanager
def remat_scope(mode: str, policy: str = "nothing_saveable", *, attention: bool = False) -> Iterator[None]:
    """Rematerialise the blocks `mode` names ("none", "blocks", "layers") of models applied inside,
    with the policy named `policy` (a key of `POLICIES`), and with `attention` every `Attention`
    layer on its own (its scores are never kept for the backward pass). Raises `ConfigError` for an
    unknown mode or policy."""
    if mode != "none" and mode not in TARGETS:
        raise ConfigError(f"remat mode {mode!r} is not one of ['none', {', '.join(map(repr, TARGETS))}]")
    if mode != "none" and policy not in POLICIES:
        raise ConfigError(f"remat policy {policy!r} is not one of {sorted(POLICIES)}")
    with contextlib.ExitStack() as stack:
        if attention:
            stack.enter_context(nn.intercept_methods(_interceptor(
                (Attention,), jax.checkpoint_policies.nothing_saveable, _INSIDE_ATTENTION)))
        if mode != "none":
            # an enclosing checkpoint's policy also rules the checkpoints nested in it (JAX applies the
            # outer policy to the inner jaxpr), so attention's products are filtered out of it here
            block_policy = _without_attention_products(POLICIES[policy]) if attention else POLICIES[policy]
            stack.enter_context(nn.intercept_methods(_interceptor(TARGETS[mode], block_policy)))
        yield
