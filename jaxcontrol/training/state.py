"""The train state (the Flax examples' pattern) and the optimizer built from a config.

`TrainState` holds everything a resumed run needs besides the data-iterator position: the step,
the trainable parameters (float32 master weights), the optax state, the EMA of the trainable
parameters (or nothing) and the RNG key. Frozen networks are not part of it: they are reloaded
from where they came from.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position (a pytree; see the module docstring)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # trainable parameters, {component: tree}
    opt_state: Any
    ema: Any  # EMA of `params` ({} when disabled)
    rng: jax.Array  # uint32 key data (jax.random.key_data), split once per step

    @property
    def key(self) -> jax.Array:
        """`rng` as a typed PRNG key."""
        return jax.random.wrap_key_data(self.rng)


def create_train_state(params: Any, tx: optax.GradientTransformation, seed: int, *, ema: bool) -> TrainState:
    """A fresh state: step 0, `tx.init(params)`, the EMA a copy of `params` (or {}), the key data of
    `jax.random.key(seed)`. Call it under `jax.jit` with out_shardings to create it already sharded."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree_util.tree_map(jnp.copy, params) if ema else {},
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def learning_rate_schedule(optim, steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant or cosine decay to `min_lr_ratio * lr` at `steps`."""
    lr, warmup = float(optim.learning_rate), int(optim.warmup_steps)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
            end_value=lr * float(optim.min_lr_ratio))
    if warmup == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def make_optimizer(optim, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping (unless max_grad_norm is 0), then AdamW on `schedule`."""
    parts = []
    if optim.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim.max_grad_norm)))
    parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                             weight_decay=float(optim.weight_decay)))
    return optax.chain(*parts)


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """diffusers' `EMAModel.get_decay` (no warmup): 0 at the first update, then min(decay, (1+s)/(10+s))
    with s = step - 1; a float32 scalar."""
    s = jnp.maximum(step.astype(jnp.float32) - 1.0, 0.0)
    return jnp.where(s <= 0, 0.0, jnp.minimum(decay, (1.0 + s) / (10.0 + s)))


def update_ema(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """One EMA update after optimizer step `step` (1-based): ema <- d * ema + (1 - d) * params."""
    d = ema_decay(step, decay)
    return jax.tree_util.tree_map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
