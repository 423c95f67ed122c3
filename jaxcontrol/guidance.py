"""Guidance as composable score functions.

A *score function* is a model prediction `f(x_t, t, cond) -> prediction`: `x_t` the
variance-preserving noisy latents (NHWC) the network sees, `t` the timestep (scalar or per
sample), `cond` a dict, and the prediction in the model's parameterisation (the scheduler
config's `prediction_type`; rules that work in epsilon take the plan, which knows it).
A *guidance rule* takes score functions and returns a new one, so rules stack:

    eps = unet_prediction(unet, unet_params, controlnets=[ControlNetUnit(cn, cn_params, scale=0.8)])
    eps = classifier_free(eps, guidance_scale=7.5, guidance_rescale=0.7)
    eps = classifier_guidance(eps, my_log_prob, scale=2.0, schedule=plan)  # plan: prediction type
    latents = sample(eps, plan, x_T, cond, key=key)

Each rule is a plain function of arrays: `jit`, `vmap` and `grad` go through it. Batched branches
(conditional, unconditional, concepts) are evaluated in one model call. See docs/GUIDANCE.md.

Conventions for `cond` (all entries are optional except what a rule reads):

* `text`: encoder hidden states (B, L, D); `control`: a tuple of control images (B, H, W, C) in
  [0, 1], one per ControlNet; `control_mask`: (B,) multiplier of every ControlNet's output (0 in
  the unconditional branch under guess mode); `adapter`: a tuple of T2I-Adapter features (already
  scaled by `adapter_conditioning_scale`); `concat`: (B, h, w, extra) channels appended to the
  latents of a concatenation-conditioned U-Net (inpainting mask + masked-image latents, a depth
  map, InstructPix2Pix's image latents); `step`: the `StepInfo` the sampler adds.
* A rule with branches reads sub-dicts (`cond["cond"]`, `cond["uncond"]`, `cond["concepts"]`,
  `cond["image_cond"]`); entries beside them (such as `step`) are shared by every branch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .errors import ConfigError
from .models.attention import AttentionControl
from .models.forward import ControlNetCall, model_forward
from .models.layers import nearest_resize
from .models.unet import attention_layers
from .sampler import Edited, Stateful, resolve_schedule
from .schedulers.solvers.common import x0_eps

ScoreFn = Callable[[jax.Array, jax.Array, dict], jax.Array]
BRANCH_KEYS = ("cond", "uncond", "concepts", "image_cond")


# ------------------------------------------------------------------------------------------------
# parameterisations
# ------------------------------------------------------------------------------------------------


def _per_sample(v, x):
    v = jnp.asarray(v, jnp.float32)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def to_epsilon(prediction, x, alpha_bar, prediction_type: str):
    """The epsilon a prediction implies at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.

    `prediction_type` ('epsilon', 'v_prediction' or 'sample', the scheduler config's field; a
    plan has it as `plan.prediction_type`) is required here and in `from_epsilon` /
    `shift_epsilon`: a v-prediction output treated as epsilon gives wrong results silently.
    """
    ab = _per_sample(alpha_bar, x)
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        return jnp.sqrt(ab) * prediction + jnp.sqrt(1 - ab) * x
    if prediction_type == "sample":
        return (x - jnp.sqrt(ab) * prediction) / jnp.sqrt(1 - ab)
    raise ConfigError(f"unknown prediction_type {prediction_type!r}")


def from_epsilon(eps, x, alpha_bar, prediction_type: str):
    """The inverse of `to_epsilon`."""
    ab = _per_sample(alpha_bar, x)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return (eps - jnp.sqrt(1 - ab) * x) / jnp.sqrt(ab)
    if prediction_type == "sample":
        return (x - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)
    raise ConfigError(f"unknown prediction_type {prediction_type!r}")


def shift_epsilon(prediction, delta_eps, alpha_bar, prediction_type: str):
    """The prediction whose implied epsilon is moved by `delta_eps` (x_t fixed).

    Exact in each parameterisation (v = (eps - sqrt(1 - abar) x) / sqrt(abar), so dv = d eps /
    sqrt(abar); x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)), and a zero shift returns the
    prediction bit for bit.
    """
    ab = _per_sample(alpha_bar, delta_eps)
    if prediction_type == "epsilon":
        return prediction + delta_eps
    if prediction_type == "v_prediction":
        return prediction + delta_eps / jnp.sqrt(ab)
    if prediction_type == "sample":
        return prediction - jnp.sqrt(1 - ab) / jnp.sqrt(ab) * delta_eps
    raise ConfigError(f"unknown prediction_type {prediction_type!r}")


def predicted_x0(eps, x, alpha_bar):
    """The clean sample x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (DDIM's eq. 12
    "predicted x0"); `alpha_bar` a scalar or one per sample. Infinite at alpha_bar = 0."""
    ab = _per_sample(alpha_bar, x)
    return (x - jnp.sqrt(1 - ab) * eps) / jnp.sqrt(ab)


# ------------------------------------------------------------------------------------------------
# branches
# ------------------------------------------------------------------------------------------------


def _interleave(leaves: Sequence, n: int):
    """(B, ...) arrays, one per branch, as one (B * n, ...) array in sample-major order: row
    b * n + k is branch k of sample b, so each sample's rows stay next to each other."""
    stacked = jnp.stack(leaves, axis=1)  # (B, n, ...)
    return stacked.reshape((stacked.shape[0] * n,) + stacked.shape[2:])


def _branch_leaves(branches: Sequence[dict], batch: int) -> dict:
    """The branches' arrays merged leaf by leaf into sample-major (B * n, ...) arrays.

    Raises `ConfigError` naming the entry when the branches differ in structure, or when an entry
    is not an array with the batch (`batch` rows) on its leading axis and the same shape in every
    branch."""
    structures = [jax.tree_util.tree_structure(b) for b in branches]
    if any(s != structures[0] for s in structures[1:]):
        raise ConfigError(f"guidance branches must have the same structure and shapes: got {structures}")
    flat = [jax.tree_util.tree_flatten_with_path(b)[0] for b in branches]
    merged = []
    for entries in zip(*flat):
        path = jax.tree_util.keystr(entries[0][0])
        shapes = [jnp.shape(v) for _, v in entries]
        if any(s != shapes[0] for s in shapes[1:]) or not shapes[0] or shapes[0][0] != batch:
            raise ConfigError(f"guidance branches must have the same structure and shapes: entry {path} has "
                              f"shapes {shapes} across the branches; each must be ({batch}, ...), one row per "
                              "sample of x")
        merged.append(_interleave([jnp.asarray(v) for _, v in entries], len(entries)))
    return jax.tree_util.tree_unflatten(structures[0], merged)


def evaluate_branches(model: ScoreFn, x, t, branches: Sequence[dict], shared: dict | None = None) -> list:
    """Evaluate `model` on several conditionings in one batched call; one prediction per branch.

    `x` is (B, ...); each branch is a dict with the same structure whose arrays have the batch on
    their leading axis ((B, ...), the same shape in every branch). The call sees B * n rows in
    sample-major order: row b * n + k is sample b under branch k, for `x`, a per-sample `t` (B,)
    and every branch array alike (a scalar `t` and the `shared` entries, such as `step`, go to
    the call unchanged). Sample b's rows are thus contiguous, so with the batch sharded over a
    mesh axis each device evaluates both (all) branches of its own samples and the batching
    moves no data between devices (`tests/test_cfg_layout.py`). Returns n predictions of the
    model output's shape divided by n on the leading axis ((B, ...) each), in branch order. An
    output that is a pytree (a score function `with_attention` returns (prediction, maps)) is
    split leaf by leaf: n pytrees.

    Raises `ConfigError` when the branches differ in structure or shapes, or an array's leading
    axis is not the batch.
    """
    n = len(branches)
    if n == 1:
        out = model(x, t, {**(shared or {}), **branches[0]})
        return [out]
    b = x.shape[0]
    merged = _branch_leaves(branches, b)
    t = jnp.asarray(t)
    out = model(_interleave([x] * n, n), t if t.ndim == 0 else _interleave([t] * n, n), {**(shared or {}), **merged})
    out = jax.tree_util.tree_map(lambda o: o.reshape((b, n) + o.shape[1:]), out)
    return [jax.tree_util.tree_map(lambda o: o[:, k], out) for k in range(n)]


def _shared(cond: dict) -> dict:
    return {k: v for k, v in cond.items() if k not in BRANCH_KEYS}


# ------------------------------------------------------------------------------------------------
# classifier-free guidance and its relatives
# ------------------------------------------------------------------------------------------------


def rescale_noise_cfg(guided, cond_pred, guidance_rescale: float):
    """Lin et al. 2023, section 3.4: match the guided prediction's std to the conditional one's."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond_pred, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def classifier_free(model: ScoreFn, guidance_scale, *, guidance_rescale: float = 0.0) -> ScoreFn:
    """Ho & Salimans 2022: uncond + s (cond - uncond), both branches in one batched call.

    `cond` holds `cond["cond"]` and `cond["uncond"]` (the negative prompt goes in `uncond`). A
    Python `guidance_scale` <= 1 runs the conditional branch alone (as diffusers' pipelines do);
    a traced scale always runs both.
    """
    static = isinstance(guidance_scale, int | float)

    def guided(x, t, cond):
        if static and guidance_scale <= 1.0:
            return model(x, t, {**_shared(cond), **cond["cond"]})
        uncond, text = evaluate_branches(model, x, t, [cond["uncond"], cond["cond"]], _shared(cond))
        out = uncond + guidance_scale * (text - uncond)
        if guidance_rescale > 0:
            out = rescale_noise_cfg(out, text, guidance_rescale)
        return out

    return guided


def instruct_pix2pix(model: ScoreFn, guidance_scale, image_guidance_scale) -> ScoreFn:
    """InstructPix2Pix's two-scale guidance (Brooks et al. 2023, eq. 3), as diffusers computes it:

        uncond + s_T (cond - image_cond) + s_I (image_cond - uncond)

    with three branches in one batched call: `cond["cond"]` (the instruction and the input image's
    latents in `concat`), `cond["image_cond"]` (the negative prompt with the image) and
    `cond["uncond"]` (the negative prompt with zero image latents). Both scales may be traced.
    """

    def guided(x, t, cond):
        text, image, uncond = evaluate_branches(model, x, t, [cond["cond"], cond["image_cond"], cond["uncond"]],
                                                _shared(cond))
        return uncond + guidance_scale * (text - image) + image_guidance_scale * (image - uncond)

    return guided


def composable(model: ScoreFn, weights: Sequence[float]) -> ScoreFn:
    """Composable Diffusion (Liu et al. 2022): uncond + sum_k w_k (concept_k - uncond).

    Positive weights are AND, negative weights NOT. `cond["concepts"]` is a list of branch dicts,
    one per weight; `cond["uncond"]` the unconditional branch.
    """
    weights = tuple(weights)

    def guided(x, t, cond):
        concepts = list(cond["concepts"])
        if len(concepts) != len(weights):
            raise ConfigError(f"composable: {len(weights)} weights but {len(concepts)} concepts")
        preds = evaluate_branches(model, x, t, [cond["uncond"], *concepts], _shared(cond))
        uncond = preds[0]
        out = uncond
        for w, p in zip(weights, preds[1:]):
            out = out + w * (p - uncond)
        return out

    return guided


@dataclasses.dataclass(frozen=True)
class SegaConcept:
    """One semantic-guidance edit (Brack et al. 2023), with diffusers' parameter names.

    The concept acts from model evaluation `edit_warmup_steps` on and stops at
    `edit_cooldown_steps` (None: never), both counted like diffusers' loop index.
    """

    edit_guidance_scale: float = 5.0
    edit_warmup_steps: int = 10
    edit_threshold: float = 0.9
    reverse_editing_direction: bool = False
    edit_weight: float = 1.0
    edit_cooldown_steps: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.edit_threshold <= 1.0:
            raise ConfigError(f"SegaConcept.edit_threshold must be in [0, 1] (a quantile), got {self.edit_threshold}")
        if self.edit_warmup_steps < 0:
            raise ConfigError(f"SegaConcept.edit_warmup_steps must be >= 0, got {self.edit_warmup_steps}")
        if self.edit_cooldown_steps is not None and self.edit_cooldown_steps < 0:
            raise ConfigError(f"SegaConcept.edit_cooldown_steps must be >= 0 or None, got {self.edit_cooldown_steps}")


def sega_edit(delta, concept: SegaConcept):
    """One concept's edit direction: +-s (eps_c - eps_uncond), kept only where its magnitude reaches
    the `edit_threshold` quantile of the magnitudes over each sample's channel (linear interpolation,
    as torch.quantile)."""
    g = delta * (-1.0 if concept.reverse_editing_direction else 1.0) * concept.edit_guidance_scale
    b, c = g.shape[0], g.shape[-1]
    q = jnp.quantile(jnp.abs(g).reshape(b, -1, c), concept.edit_threshold, axis=1)  # (B, C)
    return jnp.where(jnp.abs(g) >= q[:, None, None, :], g, 0.0)


class sega(Stateful):
    """Semantic guidance (SEGA), step for step diffusers' `SemanticStableDiffusionPipeline`.

    At model evaluation i, with u, c, e_k the unconditional, conditional and concept predictions:

    * g = s (c - u) (classifier-free guidance);
    * each concept's edit d_k = `sega_edit(e_k - u)`, or 0 (and weight 0) once i >= its
      `edit_cooldown_steps`; its weight w_k = max(`edit_weight`, 0);
    * while some but not all concepts are past their warm-up, g += sum over those k of
      w_k d_k / sum(w_k) (weights normalised over the warmed-up concepts; where they sum to 0,
      which makes NaN in diffusers, nothing is added);
    * e = sum over all concepts of w_k d_k + `edit_momentum_scale` m, then the momentum
      m <- `edit_mom_beta` m + (1 - `edit_mom_beta`) e: accumulated from the first step, warm-up
      or not;
    * once every concept is past its warm-up, g += e;
    * the prediction is u + g (+ `sem_guidance[i]` when given: precomputed edit guidance, one
      (B, H, W, C) array per model evaluation, diffusers' `sem_guidance`).

    Like diffusers, which runs no guidance at all when `guidance_scale <= 1`, edits need CFG: a
    Python `guidance_scale` <= 1 with concepts is an error rather than edits silently dropped.
    Stateful (the momentum), so it is the outermost rule of a stack.
    """

    def __init__(self, model: ScoreFn, guidance_scale: float, concepts: Sequence[SegaConcept], *,
                 edit_momentum_scale: float = 0.1, edit_mom_beta: float = 0.4, sem_guidance=None):
        if isinstance(guidance_scale, int | float) and guidance_scale <= 1.0 and (concepts or sem_guidance is not None):
            raise ConfigError(f"sega: guidance_scale={guidance_scale} turns classifier-free guidance off, and with it "
                              "every edit (diffusers' SemanticStableDiffusionPipeline applies edits only when "
                              "guidance_scale > 1)")
        if not 0.0 <= edit_mom_beta <= 1.0:
            raise ConfigError(f"sega: edit_mom_beta must be in [0, 1], got {edit_mom_beta}")
        self.model, self.guidance_scale, self.concepts = model, guidance_scale, tuple(concepts)
        self.momentum_scale, self.mom_beta = edit_momentum_scale, edit_mom_beta
        self.sem_guidance = None if sem_guidance is None else jnp.asarray(sem_guidance, jnp.float32)

    def init(self, x):
        """The initial edit momentum: zeros like the latents, float32."""
        return jnp.zeros_like(x, jnp.float32)

    def __call__(self, x, t, cond, momentum):
        concepts = list(cond.get("concepts", ()))
        if len(concepts) != len(self.concepts):
            raise ConfigError(f"sega: {len(self.concepts)} concept settings but {len(concepts)} concept branches")
        step = cond["step"]
        if self.sem_guidance is not None and (self.sem_guidance.shape[0] < step.count
                                              or self.sem_guidance.shape[1:] != x.shape):
            raise ConfigError(f"sega: sem_guidance must have shape ({step.count}, *{tuple(x.shape)}) (one edit per "
                              f"model evaluation), got {tuple(self.sem_guidance.shape)}")
        preds = evaluate_branches(self.model, x, t, [cond["uncond"], cond["cond"], *concepts], _shared(cond))
        uncond, text = preds[0], preds[1]
        guidance = self.guidance_scale * (text - uncond)
        i = step.index
        if self.concepts:
            guidance, momentum = self._edit(guidance, uncond, preds[2:], i, momentum)
        if self.sem_guidance is not None:
            guidance = guidance + self.sem_guidance[i]
        return uncond + guidance, momentum

    def _edit(self, guidance, uncond, concept_preds, i, momentum):
        edits, weights, warm = [], [], []
        for c, p in zip(self.concepts, concept_preds):
            cooled = False if c.edit_cooldown_steps is None else i >= c.edit_cooldown_steps
            edits.append(jnp.where(cooled, 0.0, sega_edit(p - uncond, c)))
            weights.append(jnp.where(cooled, 0.0, max(float(c.edit_weight), 0.0)))
            warm.append(i >= c.edit_warmup_steps)
        edits, weights, warm = jnp.stack(edits), jnp.stack(weights), jnp.stack(warm)
        n_warm = jnp.sum(warm)
        # some concepts warmed up, not all: their normalised weighted edit, without momentum
        w_warm = jnp.where(warm, weights, 0.0)
        total = jnp.sum(w_warm)
        w_warm = jnp.where(total > 0, w_warm / jnp.where(total > 0, total, 1.0), 0.0)
        partial = (n_warm > 0) & (n_warm < len(self.concepts))
        guidance = guidance + jnp.where(partial, jnp.einsum("c,cbhwk->bhwk", w_warm, edits), 0.0)
        edit = jnp.einsum("c,cbhwk->bhwk", weights, edits) + self.momentum_scale * momentum
        momentum = self.mom_beta * momentum + (1 - self.mom_beta) * edit
        guidance = guidance + jnp.where(n_warm == len(self.concepts), edit, 0.0)
        return guidance, momentum


# ------------------------------------------------------------------------------------------------
# gradient guidance
# ------------------------------------------------------------------------------------------------


def classifier_guidance(model: ScoreFn, log_prob: Callable, scale, schedule, *,
                        prediction_type: str | None = None) -> ScoreFn:
    """Dhariwal & Nichol 2021: eps' = eps - w sqrt(1 - abar_t) grad_x log p(y | x_t, t).

    `log_prob(x_t, t, cond) -> (B,)` is any differentiable JAX classifier (it reads its labels
    from `cond`). `schedule` is the sampling `Plan`, whose scheduler config gives the model's
    prediction type, or a `NoiseSchedule` together with an explicit `prediction_type` (its
    `alpha_bar_at` handles fractional t). The shift is applied to the model's own
    parameterisation so that the implied epsilon moves by exactly the formula's amount.
    """
    schedule, prediction_type = resolve_schedule(schedule, prediction_type, "classifier_guidance")

    def guided(x, t, cond):
        out = model(x, t, cond)
        ab = _per_sample(schedule.alpha_bar_at(t), x)
        grad = jax.grad(lambda z: jnp.sum(log_prob(z, t, cond)))(x)
        return shift_epsilon(out, -scale * jnp.sqrt(1 - ab) * grad, ab, prediction_type)

    return guided


def spherical_distance(a, b):
    """Squared great-circle distance between directions (the CLIP-guidance loss of Crowson)."""
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return 2.0 * jnp.arcsin(jnp.clip(jnp.linalg.norm(a - b, axis=-1) / 2, 0.0, 1.0)) ** 2


def random_cutouts(images, key, num_cutouts: int, size: int, min_fraction: float = 0.5):
    """`num_cutouts` random square crops of each NHWC image, resized to `size` (bilinear, differentiable)."""
    b, h, w, c = images.shape
    k1, k2, k3 = jax.random.split(key, 3)
    side = jnp.minimum(h, w) * jax.random.uniform(k1, (num_cutouts,), minval=min_fraction, maxval=1.0)
    oy = jax.random.uniform(k2, (num_cutouts,)) * (h - side)
    ox = jax.random.uniform(k3, (num_cutouts,)) * (w - side)

    def one(s, y, x_):
        scale = jnp.stack([size / s, size / s])
        return jax.image.scale_and_translate(images, (b, size, size, c), (1, 2), scale,
                                             jnp.stack([-y * size / s, -x_ * size / s]), method="linear")

    return jax.vmap(one)(side, oy, ox)  # (num_cutouts, B, size, size, C)


@dataclasses.dataclass(frozen=True)
class ClipGuide:
    """What CLIP guidance needs: the VAE, the CLIP vision tower, and their parameters."""

    vae: Any
    vae_params: Any
    clip: Any  # CLIPVisionModelWithProjection
    clip_params: Any
    image_size: int = 224
    num_cutouts: int = 0
    cutout_min_fraction: float = 0.5


def clip_image_embeds(guide: ClipGuide, latents, key=None):
    """Decode diffusion latents and embed them with CLIP (differentiable); (K, B, D) over cutouts."""
    from .models.clip import clip_preprocess
    from .models.vae import unscale_latents

    images = guide.vae.apply({"params": guide.vae_params}, unscale_latents(latents, guide.vae.config),
                             method=guide.vae.decode)
    images = jnp.clip((images + 1) / 2, 0, 1)
    if guide.num_cutouts:
        if key is None:
            raise ConfigError("CLIP guidance with cutouts needs a key")
        crops = random_cutouts(images, key, guide.num_cutouts, guide.image_size, guide.cutout_min_fraction)
        crops = crops.reshape((-1,) + crops.shape[2:])
        pixels = clip_preprocess(crops, guide.image_size, clamp=False)
    else:
        pixels = clip_preprocess(images, guide.image_size, clamp=False)
    embeds = guide.clip.apply({"params": guide.clip_params}, pixels).image_embeds
    return embeds.reshape(-1, latents.shape[0], embeds.shape[-1])


def clip_guidance(model: ScoreFn, guide: ClipGuide, scale, schedule, *, key=None,
                  prediction_type: str | None = None, through_model: bool = False) -> ScoreFn:
    """CLIP guidance: follow -grad of the spherical distance between the CLIP embedding of the
    decoded predicted x0 and `cond["clip_target"]` (B, D), a text or image embedding.

    eps' = eps + scale sqrt(1 - abar) grad_x dist (classifier guidance with log p = -dist). The
    gradient flows through the VAE decoder and the CLIP vision tower; with `through_model` also
    through the score function (as the original CLIP-guided pipeline does; much more costly).
    Cutouts (`guide.num_cutouts`) draw from `key` folded with the step index. `schedule`: the
    `Plan` (prediction type from its scheduler config) or a `NoiseSchedule` with `prediction_type`.
    """
    schedule, prediction_type = resolve_schedule(schedule, prediction_type, "clip_guidance")

    def guided(x, t, cond):
        ab = _per_sample(schedule.alpha_bar_at(t), x)
        target = cond["clip_target"]
        step_key = None if key is None else jax.random.fold_in(key, cond["step"].index)

        def loss(z, eps):
            x0 = predicted_x0(eps, z, ab)
            emb = clip_image_embeds(guide, x0, step_key)
            return jnp.sum(jnp.mean(spherical_distance(emb, target[None]), axis=0)) * scale

        if through_model:
            def total(z):
                out = model(z, t, cond)
                eps = to_epsilon(out, z, ab, prediction_type)
                return loss(z, eps), out

            grad, out = jax.grad(total, has_aux=True)(x)
        else:
            out = model(x, t, cond)
            eps_fixed = jax.lax.stop_gradient(to_epsilon(out, x, ab, prediction_type))
            grad = jax.grad(lambda z: loss(z, eps_fixed))(x)
        return shift_epsilon(out, jnp.sqrt(1 - ab) * grad, ab, prediction_type)

    return guided


# ------------------------------------------------------------------------------------------------
# ControlNet and T2I-Adapter conditioning of a U-Net
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet with diffusers' pipeline settings.

    `scale` is `controlnet_conditioning_scale`; the net acts for evaluation i of n when
    not (i / n < start or (i + 1) / n > end) (`control_guidance_start` / `_end`, diffusers' rule).
    `guess_mode` uses the 0.825^(12 - k) ramp; pair it with `control_mask` 0 in the
    unconditional branch to act only on the conditional one, as diffusers does.
    """

    module: Any
    params: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False


def window_keep(step, start: float, end: float):
    """1.0 while a control window is open at this step, else 0.0 (diffusers' controlnet_keep)."""
    n = step.count
    open_steps = np.array([not (i / n < start or (i + 1) / n > end) for i in range(n)], np.float32)
    return jnp.asarray(open_steps)[step.index]


def unet_prediction(unet, params, *, controlnets: Sequence[ControlNetUnit] = (),
                    adapter_conditioning_factor: float = 1.0) -> ScoreFn:
    """The U-Net as a score function, optionally steered by ControlNets and T2I-Adapter features.

    Reads `cond["text"]`, `cond["control"]` (one image per unit), `cond["control_mask"]`
    (optional, per sample), `cond["adapter"]` (optional features, computed once per sample by
    `adapter_features`; they apply while step < int(num_inference_steps * factor)),
    `cond["concat"]` (the extra input channels of a concatenation-conditioned U-Net) and
    `cond["added"]` (SDXL's {"text_embeds", "time_ids"}, for a text_time U-Net and ControlNet-XL).

    The returned function also has `with_attention(control)`: the same score function with an
    `AttentionControl` on the U-Net's attention layers, returning (prediction, maps) (`maps`:
    {diffusers layer name: (B, heads, Lq, Lk) probabilities} of the captured layers), and
    `unet_config`. The attention rules below (`attend_and_excite`, `attention_guided`,
    `pix2pix_zero`) need them.
    """
    controlnets = tuple(controlnets)

    def forward(x, t, cond, attention=None):
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        step = cond.get("step")
        calls = []
        if controlnets:
            images = cond.get("control")
            if images is None or len(images) != len(controlnets):
                raise ConfigError(f"{len(controlnets)} ControlNets need cond['control'] with as many images")
            mask = jnp.asarray(cond.get("control_mask", 1.0), jnp.float32)
            for unit, image in zip(controlnets, images):
                scale = jnp.broadcast_to(jnp.asarray(unit.scale, jnp.float32) * mask, (b,))
                if step is not None and (unit.start > 0.0 or unit.end < 1.0):
                    scale = scale * window_keep(step, unit.start, unit.end)
                calls.append(ControlNetCall(unit.module, unit.params, image, scale, unit.guess_mode))
        feats = cond.get("adapter")
        if feats is not None and step is not None and adapter_conditioning_factor < 1.0:
            active = (step.index < int(step.num_inference_steps * adapter_conditioning_factor)).astype(jnp.float32)
            feats = tuple(f * active for f in feats)
        return model_forward(unet, params, x, t, cond["text"], controlnets=calls, adapter_features=feats,
                             concat=cond.get("concat"), attention=attention, added=cond.get("added"))

    def predict(x, t, cond):
        return forward(x, t, cond)

    def with_attention(control: AttentionControl):
        def predict_with_maps(x, t, cond):
            return forward(x, t, cond, attention=control)

        return predict_with_maps

    predict.with_attention = with_attention
    predict.unet_config = unet.config
    return predict


def adapter_features(adapter, params, images, scale: float | Sequence[float] = 1.0):
    """T2I-Adapter features for NHWC condition images, scaled by `adapter_conditioning_scale`.

    Computed once per sample and passed in `cond["adapter"]`, not recomputed at each step.
    A MultiAdapter takes a list of images and a list of scales (its adapter weights).
    """
    if isinstance(images, list | tuple):  # a MultiAdapter: the scales are its adapter weights
        n = len(images)
        weights = jnp.full((n,), scale, jnp.float32) if isinstance(scale, int | float) else jnp.asarray(scale, jnp.float32)
        return tuple(adapter.apply({"params": params}, list(images), adapter_weights=weights))
    return tuple(f * scale for f in adapter.apply({"params": params}, images))


# ------------------------------------------------------------------------------------------------
# steering through the U-Net's attention
# ------------------------------------------------------------------------------------------------


def _attention_source(model, where: str):
    """`model` if it can return attention maps (`unet_prediction`'s `with_attention`), else ConfigError."""
    if not callable(getattr(model, "with_attention", None)) or getattr(model, "unet_config", None) is None:
        raise ConfigError(f"{where} reads the U-Net's attention: pass the score function made by "
                          f"guidance.unet_prediction (it has with_attention), got {model!r}")
    return model


def gaussian_kernel(size: int, sigma: float, *, squared_width: bool = False) -> np.ndarray:
    """A normalised (size, size) Gaussian: the outer product of exp(-0.5 (x / sigma)^2) over x in
    [-(size-1)/2, (size-1)/2] (SAG's blur), or with `squared_width` exp(-((x - mean) / (2 sigma))^2),
    the form Attend-and-Excite's `GaussianSmoothing` uses."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-((x / (2 * sigma)) ** 2)) if squared_width else np.exp(-0.5 * (x / sigma) ** 2)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def blur(x, kernel: np.ndarray):
    """Depthwise convolution of NHWC `x` with a square `kernel` after reflect padding (size // 2 on
    each side), so the output keeps x's size. Each side must exceed the padding."""
    pad = kernel.shape[0] // 2
    if min(x.shape[1], x.shape[2]) <= pad:
        raise ConfigError(f"a {kernel.shape[0]}x{kernel.shape[0]} blur with reflect padding needs maps larger than "
                          f"{pad} pixels, got {x.shape[1]}x{x.shape[2]}")
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    c = x.shape[-1]
    w = jnp.broadcast_to(jnp.asarray(kernel, x.dtype)[:, :, None, None], kernel.shape + (1, c))
    return jax.lax.conv_general_dilated(xp, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c, precision=jax.lax.Precision.HIGHEST)


def pag_layers(config, layer_ids: Sequence[str]) -> tuple[str, ...]:
    """The self-attention layers Perturbed-Attention Guidance replaces, as diffusers'
    `pag_applied_layers` selects them: every self-attention layer whose diffusers name matches
    the regular expression `layer_id` (`re.search`), except "fake integral" matches (an id ending
    in a number matches only a name whose last part is that number... as diffusers). "mid" is
    the mid block's self-attention; "down_blocks.1", "up_blocks.0.attentions.1" pick blocks.
    Raises `ConfigError` naming an id that selects nothing, listing the self-attention layers."""
    selfs = [layer.name for layer in attention_layers(config) if not layer.cross]
    out = []
    for layer_id in layer_ids:
        try:
            pattern = re.compile(layer_id)
        except re.error as e:
            raise ConfigError(f"PAG layer {layer_id!r} is not a valid regular expression: {e}") from None

        def fake_integral(name, layer_id=layer_id):
            a, b = layer_id.split(".")[-1], name.split(".")[-1]
            return a.isnumeric() and b.isnumeric() and a == b

        hits = [n for n in selfs if pattern.search(n) and not fake_integral(n)]
        if not hits:
            raise ConfigError(f"PAG layer {layer_id!r} matches no self-attention layer of this U-Net; they are "
                              f"{selfs}")
        out.extend(h for h in hits if h not in out)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What a guidance term sees at one evaluation: the latents `x` (B, h, w, C), `t`, the full
    `cond`, the unconditional and conditional predictions of the batched CFG call (`uncond` is None
    without CFG), their captured attention maps, and the attention-capable base `model`."""

    x: Any
    t: Any
    cond: dict
    uncond: Any
    text: Any
    uncond_maps: dict
    text_maps: dict
    model: Any

    @property
    def cfg(self) -> bool:
        return self.uncond is not None

    def branch(self, name: str) -> dict:
        """The dict a model call for branch `name` ("cond" / "uncond") takes (shared entries added)."""
        return {**_shared(self.cond), **self.cond[name]}


@dataclasses.dataclass(frozen=True)
class SAG:
    """Self-Attention Guidance (Hong et al. 2023) as diffusers' `StableDiffusionSAGPipeline`: with
    CFG, blur the unconditional branch's predicted x0 where the mid block's self-attention map
    attends (summed attention received, averaged over heads, > 1), re-noise it with that branch's
    epsilon, predict again, and add `scale` (uncond - degraded) (without CFG: the conditional
    branch). `schedule`: the sampling `Plan` (or a NoiseSchedule and `prediction_type`)."""

    scale: Any
    schedule: Any
    prediction_type: str | None = None
    kernel_size: int = 9
    sigma: float = 1.0
    layer: str = "mid_block.attentions.0.transformer_blocks.0.attn1"

    def capture(self, config) -> tuple[str, ...]:
        if self.layer not in {layer.name for layer in attention_layers(config) if not layer.cross}:
            raise ConfigError(f"self-attention guidance reads the self-attention map of {self.layer}, which this "
                              "U-Net does not have (a mid block without attention: mid_block_type "
                              f"{getattr(config, 'mid_block_type', None)!r})")
        return (self.layer,)

    def delta(self, ctx: AttentionContext):
        schedule, pt = resolve_schedule(self.schedule, self.prediction_type, "self-attention guidance")
        pred, maps, name = (ctx.uncond, ctx.uncond_maps, "uncond") if ctx.cfg else (ctx.text, ctx.text_maps, "cond")
        x = ctx.x
        ab = _per_sample(schedule.alpha_bar_at(ctx.t), x)
        # x0 and eps straight from the parameterisation (a v-prediction model at a zero-SNR step,
        # alpha_bar = 0, has a finite x0; going through epsilon would divide by zero)
        x0, eps = x0_eps(pred, x, jnp.sqrt(ab), jnp.sqrt(1 - ab), pt)
        degraded = sag_degrade(x0, maps[self.layer], ctx.model.unet_config, kernel_size=self.kernel_size,
                               sigma=self.sigma)
        noised = jnp.sqrt(ab) * degraded + jnp.sqrt(1 - ab) * eps
        degraded_pred = ctx.model(noised, ctx.t, ctx.branch(name))
        return self.scale * (pred - degraded_pred)


def sag_mask(probs, size: tuple[int, int]):
    """SAG's attended regions: a self-attention map (B, heads, L, L) averaged over heads, summed
    over queries (attention each position receives), > 1, as a (B, h, w, 1) float mask at `size`
    (the map's own height and width)."""
    received = probs.mean(axis=1).sum(axis=1)  # (B, L)
    return (received > 1.0).astype(jnp.float32).reshape(probs.shape[0], size[0], size[1], 1)


def sag_degrade(x0, probs, config, *, kernel_size: int = 9, sigma: float = 1.0):
    """x0 (B, h, w, C) blurred (Gaussian `kernel_size`, `sigma`, reflect padding) where `sag_mask`
    of the mid-block map `probs` is 1, nearest-resized to the latents."""
    mid = next(layer for layer in attention_layers(config) if layer.place == "mid")
    mask = sag_mask(probs, mid.size(x0.shape[1], x0.shape[2]))
    mask = nearest_resize(mask, (x0.shape[1], x0.shape[2]))
    blurred = blur(x0, gaussian_kernel(kernel_size, sigma))
    return blurred * mask + x0 * (1 - mask)


@dataclasses.dataclass(frozen=True)
class PAG:
    """Perturbed-Attention Guidance (Ahn et al. 2024) as diffusers' PAG pipelines: the conditional
    branch again with the self-attention of `layers` (ids as diffusers' `pag_applied_layers`,
    resolved by `pag_layers`) replaced by the identity, and `scale` (cond - perturbed) added.
    `adaptive_scale` > 0 lowers the scale with the timestep: max(scale - adaptive_scale (1000 - t), 0)."""

    scale: Any
    layers: tuple[str, ...] = ("mid",)
    adaptive_scale: float = 0.0

    def capture(self, config) -> tuple[str, ...]:
        pag_layers(config, self.layers)  # fails early, naming the id
        return ()

    def delta(self, ctx: AttentionContext):
        names = pag_layers(ctx.model.unet_config, self.layers)
        perturbed, _ = ctx.model.with_attention(AttentionControl(identity=names))(ctx.x, ctx.t, ctx.branch("cond"))
        scale = self.scale
        if self.adaptive_scale:
            scale = jnp.maximum(scale - self.adaptive_scale * (1000.0 - jnp.asarray(ctx.t, jnp.float32)), 0.0)
            scale = _per_sample(scale, ctx.x)
        return scale * (ctx.text - perturbed)


def attention_guided(model: ScoreFn, guidance_scale, terms: Sequence, *, guidance_rescale: float = 0.0) -> ScoreFn:
    """Classifier-free guidance plus attention-based terms (`SAG`, `PAG`), in one rule:

        out = uncond + s (cond - uncond) + sum_k term_k

    The unconditional and conditional branches run in one batched call that also captures the
    attention maps the terms read; each term then adds its own evaluations (SAG's degraded
    prediction, PAG's perturbed one). With a Python `guidance_scale` <= 1 only the conditional
    branch runs (cond + sum_k term_k), as diffusers does. `guidance_rescale` is applied last (as
    diffusers' PAG pipeline). `model` must come from `unet_prediction` (it returns attention maps);
    ControlNets and adapters inside it steer every evaluation.
    """
    model = _attention_source(model, "attention_guided")
    terms = tuple(terms)
    static_off = isinstance(guidance_scale, int | float) and guidance_scale <= 1.0
    capture = tuple(sorted({n for term in terms for n in term.capture(model.unet_config)}))
    probe = model.with_attention(AttentionControl(capture=capture))

    def guided(x, t, cond):
        shared = _shared(cond)
        if static_off:
            text, text_maps = probe(x, t, {**shared, **cond["cond"]})
            uncond, uncond_maps, out = None, {}, text
        else:
            (uncond, uncond_maps), (text, text_maps) = evaluate_branches(probe, x, t, [cond["uncond"], cond["cond"]],
                                                                         shared)
            out = uncond + guidance_scale * (text - uncond)
        ctx = AttentionContext(x, t, cond, uncond, text, uncond_maps, text_maps, model)
        for term in terms:
            out = out + term.delta(ctx)
        if guidance_rescale > 0 and not static_off:  # diffusers rescales only under CFG
            out = rescale_noise_cfg(out, text, guidance_rescale)
        return out

    return guided


def self_attention_guidance(model: ScoreFn, sag_scale, schedule, *, guidance_scale=7.5,
                            prediction_type: str | None = None) -> ScoreFn:
    """diffusers' `StableDiffusionSAGPipeline` guidance: `attention_guided` with one `SAG` term."""
    return attention_guided(model, guidance_scale, [SAG(sag_scale, schedule, prediction_type)])


def perturbed_attention_guidance(model: ScoreFn, pag_scale, *, layers: Sequence[str] = ("mid",),
                                 guidance_scale=7.5, guidance_rescale: float = 0.0,
                                 adaptive_scale: float = 0.0) -> ScoreFn:
    """diffusers' `StableDiffusionPAGPipeline` guidance (`pag_scale`, `pag_applied_layers`,
    `pag_adaptive_scale`): `attention_guided` with one `PAG` term."""
    return attention_guided(model, guidance_scale, [PAG(pag_scale, tuple(layers), adaptive_scale)],
                            guidance_rescale=guidance_rescale)


# Attend-and-Excite ---------------------------------------------------------------------------------


def token_mask(token_indices, batch: int, length: int = 77) -> np.ndarray:
    """Attend-and-Excite's subject tokens as a (batch, length) float mask: `token_indices` is one
    list of positions in the tokenized prompt (0 is the start token) for every sample, or one list
    per sample. Positions must be 1..length-2 (the start and last positions are not text).
    Raises `ConfigError` naming a bad index or count."""
    def is_index(i):
        return isinstance(i, int | np.integer) and not isinstance(i, bool | np.bool_)

    rows = list(token_indices)
    if rows and all(is_index(i) for i in rows):
        rows = [rows] * batch
    elif not all(isinstance(r, list | tuple | np.ndarray) for r in rows):
        raise ConfigError(f"attend-and-excite: token_indices must be integer positions, or one list of them per "
                          f"sample; got {token_indices!r}")
    if len(rows) != batch:
        raise ConfigError(f"attend-and-excite: {len(rows)} lists of token indices for {batch} samples")
    mask = np.zeros((batch, length), np.float32)
    for b, row in enumerate(rows):
        row = list(row)
        if not row:
            raise ConfigError(f"attend-and-excite: sample {b} has no token indices")
        for i in row:
            if not is_index(i) or not 1 <= int(i) <= length - 2:
                raise ConfigError(f"attend-and-excite: token index {i!r} is outside 1..{length - 2} (0 is the start "
                                  "token; the prompt's words start at 1)")
            mask[b, int(i)] = 1.0
    return mask


def attend_and_excite_loss(maps: Sequence, mask, res: tuple[int, int], *, kernel_size: int = 3, sigma: float = 0.5):
    """Attend-and-Excite's loss per sample (B,): cross-attention maps (a list of (B, heads, Lq, Lk)
    with Lq = res[0] * res[1]) averaged over layers and heads; the text tokens (all but the first
    and last key) soft-maxed over tokens after x100; each subject token's map (`mask` (B, Lk))
    Gaussian-smoothed (A&E's kernel, reflect padding); loss = max over subject tokens of
    max(0, 1 - its largest value). Also returns those largest values (B, Lk - 2)."""
    stacked = jnp.stack([m.astype(jnp.float32) for m in maps], axis=1)  # (B, n, heads, Lq, Lk)
    b, lk = stacked.shape[0], stacked.shape[-1]
    avg = stacked.mean(axis=(1, 2)).reshape(b, res[0], res[1], lk)
    text = jax.nn.softmax(avg[..., 1:-1] * 100.0, axis=-1)
    smoothed = blur(text, gaussian_kernel(kernel_size, sigma, squared_width=True))
    peaks = smoothed.max(axis=(1, 2))  # (B, Lk - 2)
    losses = jnp.maximum(0.0, 1.0 - peaks)
    subject = jnp.asarray(mask, jnp.float32)[:, 1:-1] > 0
    return jnp.max(jnp.where(subject, losses, -jnp.inf), axis=-1), peaks


def attend_and_excite(model: ScoreFn, guided: ScoreFn | None = None, *, max_iter_to_alter: int = 25,
                      thresholds: dict | None = None, scale_factor: float = 20.0, attn_res=(16, 16),
                      max_refinement_steps: int = 20) -> ScoreFn:
    """Attend-and-Excite (Chefer et al. 2023) as diffusers' `StableDiffusionAttendAndExcitePipeline`.

    Before each prediction the latents move down the gradient of `attend_and_excite_loss` (the
    conditional branch's `attn_res` cross-attention maps, subject tokens from `cond["excite"]`,
    a (B, 77) mask made by `token_mask`) by step size scale_factor * sqrt(linspace(1, 0.5, n))[i]
    while i < `max_iter_to_alter`; at the steps of `thresholds` ({step: threshold}, default {0:
    0.05, 10: 0.5, 20: 0.8}) a sample whose loss exceeds 1 - threshold first takes up to
    `max_refinement_steps` such steps until it does not. Then `guided` (default: `model` on the
    conditional branch; usually CFG, SAG or PAG over the same model) predicts at the moved latents.
    Returns `sampler.Edited` (the sampler continues from the moved latents), all inside the scan.
    The latents are moved in the score function's input space (x_t / input scaling); with DDIM or
    PNDM that is diffusers' latents.
    """
    model = _attention_source(model, "attend_and_excite")
    thresholds = {0: 0.05, 10: 0.5, 20: 0.8} if thresholds is None else dict(thresholds)
    res = tuple(int(r) for r in attn_res)
    layers = [layer for layer in attention_layers(model.unet_config) if layer.cross]
    if guided is None:
        def guided(x, t, cond):
            return model(x, t, {**_shared(cond), **cond["cond"]} if "cond" in cond else cond)
    if scale_factor == 0 and not thresholds:
        return guided

    def rule(x, t, cond):
        step = cond["step"]
        mask = cond.get("excite")
        if mask is None:
            raise ConfigError("attend_and_excite needs cond['excite'], a (B, 77) subject-token mask (token_mask)")
        names = tuple(layer.name for layer in layers if layer.size(x.shape[1], x.shape[2]) == res)
        if not names:
            sizes = sorted({layer.size(x.shape[1], x.shape[2]) for layer in layers})
            raise ConfigError(f"attend_and_excite: no cross-attention layer works at attn_res={res} for latents "
                              f"{x.shape[1]}x{x.shape[2]}; the cross-attention maps are {sizes}")
        probe = model.with_attention(AttentionControl(capture=names))
        branch = {**_shared(cond), **cond["cond"]} if "cond" in cond else cond

        def loss_fn(z):
            _, maps = probe(z, t, branch)
            losses, _ = attend_and_excite_loss([maps[n] for n in names], mask, res)
            return jnp.sum(losses), losses

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        n = step.count
        sizes = jnp.asarray(scale_factor * np.sqrt(np.linspace(1.0, 0.5, n)), jnp.float32)[step.index]
        thr = np.full(n, np.nan, np.float32)
        for k, v in thresholds.items():
            if 0 <= int(k) < n:
                thr[int(k)] = v
        thr_i = jnp.asarray(thr)[step.index]
        (_, losses), g = grad_fn(x)
        target = 1.0 - thr_i
        refine = ~jnp.isnan(thr_i) & (losses > target)

        def refined(args):
            z, losses, g = args

            def body(carry, k):
                z, active = carry
                skip = lambda z: ((jnp.zeros((), jnp.float32), jnp.zeros_like(losses)), jnp.zeros_like(z))  # noqa: E731
                (_, lk), gk = jax.lax.cond(jnp.any(active), grad_fn, skip, z)
                z = jnp.where(_per_sample(active, z), z - sizes * gk, z)
                active = active & (lk > target) & (k + 1 < max_refinement_steps)
                return (z, active), None

            (z, _), _ = jax.lax.scan(body, (z, refine), jnp.arange(max_refinement_steps))
            (_, losses), g = grad_fn(z)
            return z, losses, g

        if any(0 <= int(k) < n for k in thresholds):  # no refinement step in this run: nothing to compile
            z, losses, g = jax.lax.cond(jnp.any(refine), refined, lambda a: a, (x, losses, g))
        else:
            z = x
        z = z - jnp.where(step.index < max_iter_to_alter, sizes, 0.0) * g
        return Edited(guided(z, t, cond), z)

    return rule


# Pix2Pix-Zero ------------------------------------------------------------------------------------


def edit_direction(source_embeds, target_embeds):
    """Pix2Pix-Zero's edit direction: the mean of the target sentences' text embeddings minus the
    mean of the source sentences' ((N, 77, D) each) -> (1, 77, D)."""
    return (jnp.mean(jnp.asarray(target_embeds, jnp.float32), axis=0)
            - jnp.mean(jnp.asarray(source_embeds, jnp.float32), axis=0))[None]


def pix2pix_zero(model: ScoreFn, guidance_scale, *, cross_attention_guidance_amount=0.1) -> ScoreFn:
    """Pix2Pix-Zero (Parmar et al. 2023) as diffusers' `StableDiffusionPix2PixZeroPipeline`, both of
    its passes in one scan.

    The latents hold 2B rows: the B reference rows (the source prompt's trajectory from the start
    latents, e.g. `ddim_invert`ed ones), then the B edited rows (started from the same latents).
    `cond` holds one row per image: `cond["uncond"]`, `cond["cond"]` (the source prompt) and
    `cond["edit_direction"]` ((B, 77, D), `edit_direction`). Each evaluation:

    1. the reference rows: CFG with the source prompt, capturing every cross-attention map;
    2. the edited rows, one copy per CFG branch (negative prompt; prompt + edit direction): one
       SGD step of size `cross_attention_guidance_amount` on the copies down the gradient of
       sum over layers of mean over branches and heads of sum((maps - reference maps)^2);
    3. CFG at the moved copies; the sampler continues from the unconditional copy (diffusers'
       `x_in.chunk(2)[0]`).

    The reference rows do not depend on the edited ones, so running them in lockstep equals
    diffusers' two passes without storing every step's maps. Returns `sampler.Edited`. Take the
    edited image from rows B..2B of the result.
    """
    model = _attention_source(model, "pix2pix_zero")
    names = tuple(layer.name for layer in attention_layers(model.unet_config) if layer.name.endswith("attn2"))
    probe = model.with_attention(AttentionControl(capture=names))
    off = isinstance(cross_attention_guidance_amount, int | float) and cross_attention_guidance_amount == 0

    def rule(x, t, cond):
        b2 = x.shape[0]
        if b2 % 2:
            raise ConfigError(f"pix2pix_zero runs the reference and the edited rows together: the latents need 2B "
                              f"rows, got {b2}")
        b = b2 // 2
        x_ref, x_edit = x[:b], x[b:]
        shared = {k: v for k, v in _shared(cond).items() if k != "edit_direction"}
        direction = jnp.asarray(cond["edit_direction"], jnp.float32)
        edit_cond = {**cond["cond"], "text": cond["cond"]["text"] + direction.astype(cond["cond"]["text"].dtype)}
        if off:  # no cross-attention guidance: two plain CFG samples, the source and the moved prompt
            cfg = classifier_free(model, guidance_scale)
            return jnp.concatenate([cfg(x_ref, t, {**shared, "uncond": cond["uncond"], "cond": cond["cond"]}),
                                    cfg(x_edit, t, {**shared, "uncond": cond["uncond"], "cond": edit_cond})])
        tt = jnp.asarray(t)
        t_ref = tt if tt.ndim == 0 else tt[:b]
        (u, u_maps), (c, c_maps) = evaluate_branches(probe, x_ref, t_ref, [cond["uncond"], cond["cond"]], shared)
        ref_out = u + guidance_scale * (c - u)
        # the reference maps in the edited call's row order (sample-major, unconditional first)
        ref_maps = {n: jax.lax.stop_gradient(_interleave([u_maps[n], c_maps[n]], 2)) for n in names}
        t2 = tt if tt.ndim == 0 else _interleave([t_ref, t_ref], 2)
        edit_merged = {**shared, **_branch_leaves([cond["uncond"], edit_cond], b)}

        def loss_fn(z2):  # z2 (B*2, ...): the unconditional and conditional copies, sample-major
            _, m = probe(z2, t2, edit_merged)
            total = 0.0
            for n in names:
                d = (m[n] - ref_maps[n]) ** 2  # (B*2, heads, Lq, Lk)
                per_row = d.sum(axis=(2, 3)).reshape(b, -1)  # (B, 2 * heads)
                total = total + jnp.sum(per_row.mean(axis=1))
            return total

        z2 = _interleave([x_edit, x_edit], 2)
        z2 = z2 - cross_attention_guidance_amount * jax.grad(loss_fn)(z2)
        pred = model(z2, t2, edit_merged).reshape((b, 2) + x.shape[1:])
        edit_out = pred[:, 0] + guidance_scale * (pred[:, 1] - pred[:, 0])
        moved = z2.reshape((b, 2) + x.shape[1:])[:, 0]
        return Edited(jnp.concatenate([ref_out, edit_out]), jnp.concatenate([x_ref, moved]))

    return rule


def auto_corr_loss(eps, rolls):
    """Pix2Pix-Zero's auto-correlation regulariser of a noise map (B, h, w, C): for each sample,
    channel and pyramid level (average-pooled by 2 while the side exceeds 8), the squared mean of
    the map times itself rolled by `rolls[b, c, level]` along height, plus the same along width.
    `rolls` (B, C, levels) int; `noise_pyramid_levels` gives the level count."""
    total = 0.0
    x = jnp.moveaxis(eps, -1, 1)  # (B, C, h, w)
    for level in range(len(noise_pyramid_levels(x.shape[2]))):
        if level:  # average-pooled by 2, odd edges dropped (PyTorch's avg_pool2d)
            h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
            x = x[:, :, :h, :w].reshape(x.shape[0], x.shape[1], h // 2, 2, w // 2, 2).mean(axis=(3, 5))
        r = rolls[:, :, level]
        rolled_h = jax.vmap(jax.vmap(lambda m, k: jnp.roll(m, k, axis=0)))(x, r)
        rolled_w = jax.vmap(jax.vmap(lambda m, k: jnp.roll(m, k, axis=1)))(x, r)
        total = total + jnp.sum(jnp.mean(x * rolled_h, axis=(2, 3)) ** 2) + jnp.sum(jnp.mean(x * rolled_w, axis=(2, 3)) ** 2)
    return total


def noise_pyramid_levels(height: int) -> list[int]:
    """The heights `auto_corr_loss` visits for maps `height` tall (a roll at a level is drawn from
    [0, that height // 2))."""
    out = [height]
    while height > 8:
        height //= 2
        out.append(height)
    return out


def kl_regularizer(eps):
    """Pix2Pix-Zero's KL term toward N(0, 1) per sample: var + mean^2 - 1 - log(var + 1e-7), with
    the unbiased variance over the sample's values."""
    flat = eps.reshape(eps.shape[0], -1)
    mean, var = flat.mean(axis=1), flat.var(axis=1, ddof=1)
    return var + mean**2 - 1 - jnp.log(var + 1e-7)


def regularized_inversion(model: ScoreFn, schedule, *, lambda_auto_corr: float = 20.0, lambda_kl: float = 20.0,
                          num_reg_steps: int = 5, num_auto_corr_rolls: int = 5, key=None,
                          prediction_type: str | None = None) -> ScoreFn:
    """The prediction Pix2Pix-Zero's `invert` steps with: the model's output pushed toward i.i.d.
    standard normal noise, `num_reg_steps` times: `num_auto_corr_rolls` gradient steps of
    `auto_corr_loss` (each / rolls, times `lambda_auto_corr`), then one of `kl_regularizer`
    (times `lambda_kl`), gradients taken through the output's epsilon. Use with a
    `ddim_inverse` plan (`sampler.ddim_invert`). Roll amounts come from `key` folded with the step
    index, or from `cond["rolls"]` (num_evals, num_reg_steps, num_auto_corr_rolls, B, C, levels)
    when given. Per sample (diffusers takes the KL statistics over the whole batch: the same for one
    image)."""
    schedule, pt = resolve_schedule(schedule, prediction_type, "regularized_inversion")

    def rule(x, t, cond):
        out = model(x, t, cond)
        ab = _per_sample(schedule.alpha_bar_at(t), x)
        levels = noise_pyramid_levels(x.shape[1])
        step = cond["step"]
        if "rolls" in cond:
            rolls = jnp.asarray(cond["rolls"], jnp.int32)[step.index]
        else:
            if key is None:
                raise ConfigError("regularized_inversion draws roll amounts: pass key= (or cond['rolls'])")
            k = jax.random.fold_in(key, step.index)
            shape = (num_reg_steps, num_auto_corr_rolls, x.shape[0], x.shape[-1])
            rolls = jnp.stack([jax.random.randint(jax.random.fold_in(k, i), shape, 0, max(h // 2, 1))
                               for i, h in enumerate(levels)], axis=-1)
        eps_of = lambda v: to_epsilon(v, x, ab, pt)  # noqa: E731
        for r in range(num_reg_steps):
            if lambda_auto_corr > 0:
                for j in range(num_auto_corr_rolls):
                    g = jax.grad(lambda v: auto_corr_loss(eps_of(v), rolls[r, j]))(out)
                    out = out - lambda_auto_corr * (g / num_auto_corr_rolls)
            if lambda_kl > 0:
                out = out - lambda_kl * jax.grad(lambda v: jnp.sum(kl_regularizer(eps_of(v))))(out)
        return out

    return rule
