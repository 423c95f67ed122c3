"""The sampling loop: one `lax.scan` over a plan's model evaluations, under one `jit`.

    plan = make_plan(scheduler_config, 20, "dpmpp_2m")
    x = sample(score_fn, plan, noise, cond, key=key)          # jit it, vmap it, grad it

`score_fn(x_t, t, cond) -> prediction` is any model prediction (see `jaxcontrol.guidance`). The
loop adds `cond["step"]`, a `StepInfo` with the index of the model evaluation (diffusers' loop
counter `i`) and the run's length, so rules that depend on the step (ControlNet windows, adapter
factors, SEGA warm-up) read it there. `cond` must therefore be a dict.

Editing (img2img / SDEdit, inpainting by partial diffusion, RePaint, DDIM inversion) is here too,
as functions over the same loop.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .errors import ConfigError, NonFiniteError
from .schedulers.solvers import Plan, _x0_eps

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@struct.dataclass
class StepInfo:
    """What a score function may know about where it is in the run.

    `index` is an array (traced inside the loop); `count` and `num_inference_steps` are static,
    so rules can build host-side tables from them (and a jitted score function recompiles when
    they change).
    """

    index: Any  # int32: this model evaluation's index in the loop (diffusers' loop counter i)
    count: int = struct.field(pytree_node=False)  # model evaluations in the run (len(timesteps))
    num_inference_steps: int = struct.field(pytree_node=False)  # diffusers' num_inference_steps


class Stateful:
    """A score function that carries state across steps (for example SEGA's momentum).

    Subclasses define `init(x) -> state` and `__call__(x, t, cond, state) -> (prediction, state)`.
    """

    def init(self, x):  # pragma: no cover - interface
        """The state before the first step, for the initial latents `x` (a pytree of arrays)."""
        raise NotImplementedError

    def __call__(self, x, t, cond, state):  # pragma: no cover - interface
        raise NotImplementedError


class Edited(NamedTuple):
    """What a score function returns when it moved the latents before predicting (Attend-and-Excite,
    Pix2Pix-Zero): the `prediction` made at the moved latents `x` (in the score function's input
    space, x_t / the plan's input scaling). The sampler continues from them: it adds `x` minus the
    latents it passed (scaled back) to its state before the solver update, so an unmoved `x`
    changes nothing, bit for bit."""

    prediction: Any
    x: Any


def _apply_edit(out, state, x_in, in_div):
    """The prediction of a score function's output and the solver state, moved by an `Edited`."""
    if isinstance(out, Edited):
        state = {**state, "x": state["x"] + (jnp.asarray(out.x, jnp.float32) - x_in) * in_div}
        out = out.prediction
    return out, state


def with_step(cond, step: StepInfo):
    """A copy of the `cond` dict (None: an empty one) with `cond["step"] = step`. Raises
    `ConfigError` when `cond` is not a dict."""
    if cond is None:
        return {"step": step}
    if not isinstance(cond, dict):
        raise ConfigError(f"cond must be a dict (the sampler adds cond['step']), got {type(cond).__name__}")
    return {**cond, "step": step}


class Inpaint(NamedTuple):
    """Partial diffusion: keep `known` where `mask` is 0, regenerate where it is 1.

    After each evaluation the kept region is reset to `known` noised to that evaluation's level
    with `noise` (diffusers' legacy inpainting); after the last one it equals `known` exactly.
    Arrays are NHWC latents; `mask` broadcasts against them (for example (B, H, W, 1)).
    """

    known: Any
    mask: Any
    noise: Any


def sample(
    model: Callable,
    plan: Plan,
    x_init,
    cond: dict | None = None,
    *,
    key=None,
    noise=None,
    inpaint: Inpaint | None = None,
    callback: Callable | None = None,
    rows: dict | None = None,
    return_state: bool = False,
    return_nonfinite: bool = False,
):
    """Run `plan` from `x_init` (already at the first evaluation's level) and return the result.

    `model(x, t, cond) -> prediction`: x float32 of `x_init`'s shape (NHWC latents, divided by the
    plan's input scaling), t a float32 scalar timestep in [0, num_train_timesteps), `cond` with
    "step" added; the prediction (epsilon, v or x0, as the plan's scheduler config says) has x's
    shape. A `Stateful` model also takes and returns its state. Returns float32 latents of
    `x_init`'s shape (then the solver state and the non-finite markers, if asked for).
    `noise`: optional array (num_evals, *x.shape) of the standard-normal noise each evaluation
    injects (stochastic solvers); otherwise drawn from `key` folded with the evaluation index.
    `key` may be one key, or one per sample (shape (B,)) so that each sample's noise depends only
    on its own key, whatever batch it runs in.
    `callback(i, x)`: called on the host after each evaluation through `jax.debug.callback`;
    when it is None nothing is traced for it. `rows`: the plan's arrays, to pass them as jit
    arguments instead of constants.
    `return_nonfinite`: also return, per sample (leading axis), the index of the first model
    evaluation after which that sample's latents held NaN or infinity (-1 if none), so the
    caller can fail loudly naming the step (`raise_if_nonfinite`). Returned last.

    Raises `ConfigError` when a stochastic solver gets neither `key` nor `noise`, `noise` has
    another shape, the number of per-sample keys differs from the batch, or `cond` is not a dict.
    """
    x_init = jnp.asarray(x_init, jnp.float32)
    rows = plan.rows if rows is None else rows
    rows = {k: jnp.asarray(v) for k, v in rows.items()}
    count = plan.num_evals
    update = plan.update_fn()
    stateful = isinstance(model, Stateful)
    needs_noise = plan.stochastic
    if needs_noise and noise is None and key is None:
        raise ConfigError(f"the {plan.solver} solver injects noise: pass key= or noise=")
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != (count,) + x_init.shape:
            raise ConfigError(f"noise must have shape {(count,) + x_init.shape}, got {noise.shape}")

    per_sample_keys = key is not None and jnp.ndim(key) == 1
    if per_sample_keys and key.shape[0] != x_init.shape[0]:
        raise ConfigError(f"{key.shape[0]} keys for a batch of {x_init.shape[0]}: pass one key or one per sample")
    xs = {"row": rows, "index": jnp.arange(count, dtype=jnp.int32)}
    if noise is not None:
        xs["noise"] = noise

    def body(carry, xs):
        state, gstate, bad = carry
        row, i = xs["row"], xs["index"]
        x = state["x"]
        c = with_step(cond, StepInfo(i, count, plan.num_inference_steps))
        x_in = x / row["in_div"]
        if stateful:
            out, gstate = model(x_in, row["t"], c, gstate)
        else:
            out = model(x_in, row["t"], c)
        out, state = _apply_edit(out, state, x_in, row["in_div"])
        out = jnp.asarray(out, jnp.float32)
        if noise is not None:
            z = xs["noise"]
        elif needs_noise and per_sample_keys:
            z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(key)
        elif needs_noise:
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        else:
            z = jnp.zeros((), jnp.float32)
        state = update(state, out, row, z)
        if inpaint is not None:  # after the last evaluation the kept region is the original itself
            last = i == count - 1
            level = jnp.where(last, inpaint.known, row["next_a"] * inpaint.known + row["next_b"] * inpaint.noise)
            state = {**state, "x": inpaint.mask * state["x"] + (1 - inpaint.mask) * level}
        if callback is not None:
            jax.debug.callback(callback, i, plan.output(state))
        if return_nonfinite:
            bad = first_nonfinite(bad, plan.output(state), i)
        return (state, gstate, bad), None

    gstate = model.init(x_init) if stateful else None
    bad = jnp.full(x_init.shape[:1], -1, jnp.int32)
    (state, gstate, bad), _ = jax.lax.scan(body, (plan.init_state(x_init), gstate, bad), xs)
    result = (plan.output(state),)
    if return_state:
        result += (state,)
    if return_nonfinite:
        result += (bad,)
    return result[0] if len(result) == 1 else result


def first_nonfinite(bad, x, i):
    """Update per-sample "first bad step" markers: `bad` (B,) int32, -1 where none yet; samples of
    `x` (leading axis B) holding NaN or infinity that had no marker get step `i`. Returns (B,) int32."""
    finite = jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)
    return jnp.where((bad < 0) & ~finite, jnp.asarray(i, jnp.int32), bad)


def raise_if_nonfinite(bad_steps, *, solver: str, count: int, image_indices=None) -> None:
    """Host side of `return_nonfinite`: raise `NonFiniteError` naming the solver, the first step
    (1-based, of `count` model evaluations) and the images whose latents became non-finite
    (positions in `bad_steps`, or their `image_indices`). Returns None when every marker is -1."""
    bad_steps = np.asarray(bad_steps)
    hit = np.flatnonzero(bad_steps >= 0)
    if hit.size == 0:
        return
    first = int(bad_steps[hit].min())
    names = hit if image_indices is None else np.asarray(image_indices)[hit]
    raise NonFiniteError(
        f"sampling produced NaN or infinite latents: solver {solver!r}, first at model evaluation "
        f"{first + 1} of {count}, image index(es) {names.tolist()}. Nothing was written. Check the "
        "scheduler config (prediction_type, rescale_betas_zero_snr, timestep_spacing), the guidance "
        "scales and the model's dtype")


def initial_latents(plan: Plan, noise):
    """Text-to-image start: standard-normal `noise` (NHWC latents' shape) times the plan's
    `init_noise_sigma`, float32."""
    return jnp.asarray(noise, jnp.float32) * plan.init_noise_sigma


def noised_latents(plan: Plan, latents, noise):
    """img2img / SDEdit start: clean (scaled) `latents` noised with standard-normal `noise` of their
    shape to the plan's first level (its `strength`), as diffusers' `scheduler.add_noise`; float32."""
    return plan.start_a * jnp.asarray(latents, jnp.float32) + plan.start_b * jnp.asarray(noise, jnp.float32)


def img2img(model, plan: Plan, latents, noise, cond=None, **kwargs):
    """SDEdit (Meng et al. 2022): noise `latents` to the plan's start level, then denoise.

    Build the plan with `make_plan(..., strength=s)`; diffusers' img2img pipelines do the same.
    `latents` are clean scaled latents (B, H, W, C), `noise` standard normals of that shape;
    `kwargs` go to `sample`, whose result (float32 latents) is returned.
    """
    return sample(model, plan, noised_latents(plan, latents, noise), cond, **kwargs)


def inpaint(model, plan: Plan, latents, mask, noise, cond=None, **kwargs):
    """Inpainting by partial diffusion with any noise-prediction model (no inpainting U-Net).

    `mask` is 1 where to generate, 0 where to keep `latents`, broadcastable to them (e.g.
    (B, H, W, 1)). `noise` (the latents' shape) starts the run and re-noises the kept region. With
    a full-strength plan the run starts from pure noise; with `make_plan(..., strength=s)` from
    the noised latents. `kwargs` go to `sample`; returns float32 latents.
    """
    latents = jnp.asarray(latents, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    x = initial_latents(plan, noise) if plan.begin_index == 0 else noised_latents(plan, latents, noise)
    return sample(model, plan, x, cond, inpaint=Inpaint(latents, mask, jnp.asarray(noise, jnp.float32)), **kwargs)


def ddim_invert(model, plan: Plan, latents, cond=None, **kwargs):
    """DDIM inversion (diffusers' `DDIMInverseScheduler`): deterministic clean latents x_0 -> x_T with
    a `ddim_inverse` plan; `kwargs` go to `sample`. Raises `ConfigError` for any other plan."""
    if plan.solver != "ddim_inverse":
        raise ConfigError(f"ddim_invert needs a plan for the 'ddim_inverse' solver, got {plan.solver!r}")
    return sample(model, plan, latents, cond, **kwargs)


# ------------------------------------------------------------------------------------------------
# RePaint (Lugmayr et al. 2022): DDPM-style steps with resampling jumps back in time.
# ------------------------------------------------------------------------------------------------


def repaint_schedule(num_inference_steps: int, num_train_timesteps: int = 1000, jump_length: int = 10,
                     jump_n_sample: int = 10) -> np.ndarray:
    """The timestep walk of diffusers' `RePaintScheduler.set_timesteps`: descending, with jumps back up;
    an int array of timesteps in [0, num_train_timesteps). Raises `ConfigError` for a count below 1."""
    if jump_length < 1 or jump_n_sample < 1 or num_inference_steps < 1:
        raise ConfigError(f"repaint: num_inference_steps, jump_length and jump_n_sample must be >= 1, got "
                          f"{num_inference_steps}, {jump_length}, {jump_n_sample}")
    n = min(num_train_timesteps, num_inference_steps)
    jumps = {j: jump_n_sample - 1 for j in range(0, n - jump_length, jump_length)}
    ts, t = [], n
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                ts.append(t)
    return np.array(ts) * (num_train_timesteps // n)


def resolve_schedule(schedule, prediction_type: str | None, where: str):
    """The `NoiseSchedule` and the model's prediction type for a rule given a plan or a schedule.

    A `Plan` knows both: its `prediction_type` (from the scheduler config) is used, and a
    different explicit `prediction_type` is an error. A bare `NoiseSchedule` does not know what
    the model predicts, so `prediction_type` must then be given: no parameterisation is assumed.
    Returns (schedule, prediction_type); raises `ConfigError` naming `where` otherwise.
    """
    if isinstance(schedule, Plan):
        if prediction_type is not None and prediction_type != schedule.prediction_type:
            raise ConfigError(f"{where}: prediction_type={prediction_type!r} but the plan's scheduler config says "
                              f"{schedule.prediction_type!r}; pass the plan alone")
        return schedule.schedule, schedule.prediction_type
    if prediction_type is None:
        raise ConfigError(f"{where}: pass the plan (its prediction_type is read from the scheduler config) or "
                          "prediction_type= ('epsilon', 'v_prediction' or 'sample') with a bare NoiseSchedule")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"{where}: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return schedule, prediction_type


def per_image_keys(key, batch: int, where: str):
    """One PRNG key per image, shape (batch,): from a key array of length `batch` (typed keys or raw
    uint32 data of shape (batch, 2)), or from a single key split into `batch` keys (then an image's
    randomness depends on the batch it runs in; pass one key per image for reproducible images).
    Raises `ConfigError` naming `where` for any other shape or count."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.ndim not in (1, 2) or key.shape[-1] != 2:
            raise ConfigError(f"{where}: key must be a PRNG key, one per image, or raw key data of shape (2,) or "
                              f"({batch}, 2); got shape {tuple(key.shape)}")
        key = jax.random.wrap_key_data(key.astype(jnp.uint32))
    if key.ndim == 0:
        return jax.random.split(key, batch)
    if key.ndim != 1 or key.shape[0] != batch:
        raise ConfigError(f"{where}: {key.shape[0] if key.ndim else 1} keys for a batch of {batch}: pass one key "
                          "or one per image")
    return key


def repaint(model, schedule, latents, mask, key, cond=None, *, prediction_type: str | None = None,
            num_inference_steps: int | None = None, jump_length: int = 10, jump_n_sample: int = 10,
            eta: float = 0.0, noise=None):
    """RePaint inpainting (Lugmayr et al. 2022) with any diffusion model; `mask` is 1 where to generate.

    `schedule`: the `Plan` (its noise schedule, prediction type and number of steps are used) or a
    `NoiseSchedule` with an explicit `prediction_type`. The model output is converted to x0 and
    epsilon by that prediction type (diffusers' RePaintScheduler treats it as epsilon; for other
    parameterisations this is the same update written for what the model predicts). Otherwise
    follows diffusers' RePaintPipeline: at each event of the walk the model denoises one step
    (known region re-noised to the new level with the same draw, which the mask keeps apart from
    the unknown region's) or, on a jump, the sample is re-noised forward by the betas in between.
    Returns the final latents.

    `key`: one PRNG key per image (a key array of length B, or raw data (B, 2)): image i draws all
    its noise from its own key, so it is the same whatever batch it runs in. A single key is
    split into B keys. `noise`: optional (1 + events, *latents.shape) normal draws instead: the
    starting noise, then one per event of the walk (`repaint_schedule`). `latents` are clean
    scaled latents (B, H, W, C); `mask` broadcasts against them.

    Raises `ConfigError` for a missing or contradicting prediction type, a bad key or `noise`
    shape, invalid jump settings, or an epsilon model on a step where alpha_bar is 0.
    """
    plan_steps = schedule.num_inference_steps if isinstance(schedule, Plan) else 50
    schedule, prediction_type = resolve_schedule(schedule, prediction_type, "repaint")
    num_inference_steps = plan_steps if num_inference_steps is None else num_inference_steps
    N = schedule.num_train_timesteps
    ts = repaint_schedule(num_inference_steps, N, jump_length, jump_n_sample)
    ratio = N // min(N, num_inference_steps)
    ac = schedule.alphas_cumprod.astype(np.float64)
    betas = schedule.betas.astype(np.float64)
    # events: (model timestep, kind 0 = denoise / 1 = undo, coefficients)
    rows = {k: [] for k in ("t", "undo", "a_t", "a_prev", "std", "undo_a", "undo_b")}
    t_last = ts[0] + 1
    for t in ts:
        if t < t_last:
            prev = t - ratio
            a_t = ac[t]
            a_prev = ac[prev] if prev >= 0 else 1.0  # diffusers' RePaint: final_alpha_cumprod = 1
            if a_t <= 0 and prediction_type == "epsilon":
                raise ConfigError(f"repaint: alpha_bar is 0 at timestep {t} (a zero-terminal-SNR schedule, "
                                  "rescale_betas_zero_snr) where an epsilon-prediction model gives no x0; use "
                                  "fewer steps than num_train_timesteps or a v_prediction model")
            var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = eta * np.sqrt(var)
            rows["undo"].append(0)
            rows["a_t"].append(a_t)
            rows["a_prev"].append(a_prev)
            rows["std"].append(std)
            rows["undo_a"].append(1.0)
            rows["undo_b"].append(0.0)
        else:
            # undo from t_last to t: x <- sqrt(prod(1-b)) x + sqrt(1-prod(1-b)) z (exact composition)
            keep = np.prod(1 - betas[t_last : t_last + ratio])
            rows["undo"].append(1)
            rows["a_t"].append(1.0)
            rows["a_prev"].append(1.0)
            rows["std"].append(0.0)
            rows["undo_a"].append(np.sqrt(keep))
            rows["undo_b"].append(np.sqrt(1 - keep))
        rows["t"].append(t)
        t_last = t
    rows = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in rows.items()}
    latents = jnp.asarray(latents, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    events = len(ts)
    xs = {"row": rows, "i": jnp.arange(events, dtype=jnp.int32)}
    if noise is None:
        keys = per_image_keys(key, latents.shape[0], "repaint")

        def draw(i):  # image b's draw number i comes from its own key only
            return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), latents.shape[1:], jnp.float32))(keys)

        x_start = draw(0)
    else:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != (events + 1,) + latents.shape:
            raise ConfigError(f"repaint: noise must have shape {(events + 1,) + latents.shape} (the start, then one "
                              f"draw per event of the walk), got {noise.shape}")
        x_start, xs["z"] = noise[0], noise[1:]

    def body(x, xs):
        row, i = xs["row"], xs["i"]
        z = xs["z"] if noise is not None else draw(i + 1)

        def denoise(x):
            c = with_step(cond, StepInfo(i, events, num_inference_steps))
            out = jnp.asarray(model(x, row["t"], c), jnp.float32)
            a_t, a_prev = row["a_t"], row["a_prev"]
            x0_pred, eps = _x0_eps(out, x, jnp.sqrt(a_t), jnp.sqrt(1 - a_t), prediction_type)
            direction = jnp.sqrt(jnp.maximum(1 - a_prev - row["std"] ** 2, 0)) * eps
            unknown = jnp.sqrt(a_prev) * x0_pred + direction + row["std"] * z
            known = jnp.sqrt(a_prev) * latents + jnp.sqrt(1 - a_prev) * z
            return mask * unknown + (1 - mask) * known

        def undo(x):
            return row["undo_a"] * x + row["undo_b"] * z

        return jax.lax.cond(row["undo"] > 0, undo, denoise, x), None

    x, _ = jax.lax.scan(body, x_start, xs)
    return x
