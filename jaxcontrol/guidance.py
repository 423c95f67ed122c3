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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .errors import ConfigError
from .models.forward import ControlNetCall, model_forward
from .sampler import Stateful, resolve_schedule

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
    model output's shape divided by n on the leading axis ((B, ...) each), in branch order.

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
    out = out.reshape((b, n) + out.shape[1:])
    return [out[:, k] for k in range(n)]


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
    `adapter_features`; they apply while step < int(num_inference_steps * factor)) and
    `cond["concat"]` (the extra input channels of a concatenation-conditioned U-Net).
    """
    controlnets = tuple(controlnets)

    def predict(x, t, cond):
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
                             concat=cond.get("concat"))

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
