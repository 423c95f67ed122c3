"""The diffusion training objective, term by term, as pure functions of arrays.

The forward process comes from `jaxcontrol.schedulers.NoiseSchedule` (diffusers-identical
`alphas_cumprod`); these functions add what training scripts put around it, with the semantics of
diffusers' `train_controlnet.py`, `train_t2i_adapter_sdxl.py` and `train_text_to_image.py`:

- `sample_timesteps`: uniform integers in [0, T), or the adapters' cubic sampling
  `t = floor((1 - u**3) * T)`, which favours early (noisy) timesteps;
- `offset_noise`: `noise + noise_offset * N(0, 1)` drawn per sample and channel;
- `drop_prompts`: replaces a fraction of the prompts by the empty prompt (classifier-free guidance);
- `prediction_target`: the noise (epsilon) or the velocity sqrt(abar) eps - sqrt(1 - abar) x0;
- `min_snr_weights`: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v (Hang et al. 2023);
- `diffusion_loss`: per-sample mean squared error in float32, weighted, averaged over the batch;
- `prior_preservation_weights`: DreamBooth's instance loss + prior_loss_weight x class loss as row weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from ..schedulers.noise import NoiseSchedule


def sample_timesteps(rng: jax.Array, batch: int, num_train_timesteps: int, method: str = "uniform") -> jax.Array:
    """(batch,) int32 training timesteps in [0, num_train_timesteps): "uniform" or "cubic" (see the
    module docstring). Raises `ConfigError` for another `method`."""
    if method == "uniform":
        return jax.random.randint(rng, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
    if method == "cubic":
        u = jax.random.uniform(rng, (batch,), jnp.float32)
        t = jnp.floor((1.0 - u**3) * num_train_timesteps).astype(jnp.int32)
        return jnp.clip(t, 0, num_train_timesteps - 1)
    raise ConfigError(f"timestep sampling {method!r} is not one of ['uniform', 'cubic']")


def offset_noise(rng: jax.Array, noise: jax.Array, noise_offset: float) -> jax.Array:
    """diffusers' `noise += noise_offset * randn(B, C, 1, 1)`, NHWC: one offset per sample and channel.
    `noise` (B, ..., C) is returned unchanged when `noise_offset` is 0, else a new array of its shape
    and dtype."""
    if not noise_offset:
        return noise
    b, c = noise.shape[0], noise.shape[-1]
    offset = jax.random.normal(rng, (b,) + (1,) * (noise.ndim - 2) + (c,), noise.dtype)
    return noise + noise_offset * offset


def drop_prompts(rng: jax.Array, prompts: jax.Array, empty: jax.Array, proportion: float) -> jax.Array:
    """Each row of `prompts` (B, ...), token ids or embeddings, replaced by `empty` (broadcastable to
    `prompts`, e.g. (1, L)) with probability `proportion`; dtype of `prompts`."""
    if not proportion:
        return prompts
    return replace_rows(jax.random.uniform(rng, (prompts.shape[0],)) < proportion, prompts, empty)


def replace_rows(drop: jax.Array, values: jax.Array, empty: jax.Array) -> jax.Array:
    """`values` (B, ...) with the rows where `drop` (B,) bool is set replaced by `empty`
    (broadcastable to a row or to `values`); dtype of `values`."""
    drop = drop.reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.where(drop, jnp.broadcast_to(empty.astype(values.dtype), values.shape), values)


def instruct_dropout(rng: jax.Array, batch: int, p: float) -> tuple[jax.Array, jax.Array]:
    """(drop_text, drop_image), each (B,) bool: InstructPix2Pix's conditioning dropout (Brooks et al.
    2023, as diffusers' training script draws it). One uniform u per example: u < p drops the text
    alone, p <= u < 2p both, 2p <= u < 3p the image alone."""
    u = jax.random.uniform(rng, (batch,))
    return u < 2.0 * p, (u >= p) & (u < 3.0 * p)


def prediction_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                      prediction_type: str) -> jax.Array:
    """What the model is trained to predict, of `x0`'s shape: `noise` for "epsilon", the velocity
    sqrt(abar_t) noise - sqrt(1 - abar_t) x0 for "v_prediction" (t (B,) timesteps). Raises
    `ConfigError` for another prediction type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return schedule.velocity(x0, noise, t)
    raise ConfigError(f"prediction_type {prediction_type!r} cannot be trained (use 'epsilon' or 'v_prediction')")


def min_snr_weights(schedule: NoiseSchedule, t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """(B,) loss weights of min-SNR-gamma (Hang et al. 2023) for timesteps `t` (B,), as diffusers'
    training scripts compute them. Raises `ConfigError` for a prediction type other than
    "epsilon" / "v_prediction"."""
    snr = schedule.snr(t)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ConfigError(f"min-SNR weighting is defined for 'epsilon' and 'v_prediction', not {prediction_type!r}")


def prior_preservation_weights(n_instance: int, n_class: int, prior_loss_weight: float) -> jax.Array:
    """Per-row weights (n_instance + n_class,) under which `diffusion_loss`'s batch mean is
    DreamBooth's mean(instance losses) + prior_loss_weight x mean(class losses)."""
    b = n_instance + n_class
    return jnp.concatenate([jnp.full((n_instance,), b / n_instance, jnp.float32),
                            jnp.full((n_class,), prior_loss_weight * b / n_class, jnp.float32)])


def diffusion_loss(prediction: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Scalar float32: mean over the batch of (weight x per-sample MSE); `weights` (B,) or None.
    Raises `ValueError` when `prediction` and `target` differ in shape."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction has shape {prediction.shape}, target {target.shape}")
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    per_sample = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    return jnp.mean(per_sample)
