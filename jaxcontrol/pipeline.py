"""Text-to-image with ControlNets, T2I-Adapters and guidance: batched, sharded, compiled once.

    pipe = Pipeline.from_pretrained("sd15", controlnets=["control_canny"])
    images = pipe(["a red circle"], controls=[ControlInput(edge_map)], num_inference_steps=20, seed=0)

`images` is uint8 (B, H, W, 3). One call is one jitted program: prompt encoding, sampling and
decoding. The program is compiled once per (shapes, settings) and reused. Guidance and control
scales are traced, so a sweep over them does not recompile. The batch is sharded over a
`jax.sharding.Mesh` along its `data` axis (every device, on every host, by default); parameters are
replicated.

Reproducibility: image `i` of a call starts from `normal(fold_in(key(seed), i))` and, for stochastic
solvers, draws its step noise from its own key. So `(seed, image index)` regenerates an image in
any batch size or device count (`image_indices=` picks the indices).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from . import guidance as G
from .errors import ConfigError, NonFiniteError
from .mesh import named, tracing_mesh
from .platform import to_dtype
from .models.kinds import unet_kind
from .models.unet import attention_layers
from .models.vae import sample_posterior, scale_latents, split_moments, unscale_latents
from .sampler import Inpaint, ddim_invert, first_nonfinite, initial_latents, noised_latents, raise_if_nonfinite, repaint, sample
from .schedulers import SchedulerConfig, make_plan
from .schedulers.solvers import Plan
from .loras import LoraInput, apply_loras, as_lora_input, get_component, lora_targets, set_component  # noqa: F401
from .tokenizer import tokenize



@dataclasses.dataclass(frozen=True)
class ControlInput:
    """One ControlNet's input for a call: its image (NHWC [0, 1], one per prompt or one for all)
    and diffusers' settings (`controlnet_conditioning_scale`, `control_guidance_start` / `_end`)."""

    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    resize_mode: str = "default"  # diffusers' VaeImageProcessor: "default" (stretch), "crop" or "fill"


@dataclasses.dataclass(frozen=True)
class AdapterInput:
    """One T2I-Adapter's input: its condition image and `adapter_conditioning_scale`."""

    image: Any
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class ClipGuidanceInput:
    """CLIP guidance for a call: the models, the target embedding (D,) or (B, D), and the weight."""

    guide: G.ClipGuide
    target: Any
    scale: float = 100.0


@dataclasses.dataclass(frozen=True)
class CallArguments:
    """The keyword arguments of `Pipeline.__call__`, with the same names and defaults (a test keeps
    the two equal). `check_inputs`, `check_call_arguments` and the sidecar's resolved settings all
    read this one object, so a new option is one field here and one parameter of `__call__`."""

    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    scheduler: str | None = None
    scheduler_options: dict | None = None
    seed: int = 0
    num_images_per_prompt: int = 1
    image_indices: Sequence[int] | None = None
    controls: Sequence[ControlInput] = ()
    guess_mode: bool = False
    adapters: Sequence[AdapterInput] = ()
    adapter_conditioning_factor: float = 1.0
    init_image: Any = None
    init_latents: Any = None
    strength: float | None = None  # None: 0.8 for img2img, 1.0 when inpainting (diffusers' defaults)
    mask: Any = None
    masked_image_latents: Any = None
    depth_map: Any = None
    image_guidance_scale: float | None = None
    inpaint_method: str = "partial"
    repaint_jump_length: int = 10
    repaint_jump_n_sample: int = 10
    clip_guidance: ClipGuidanceInput | None = None
    sag_scale: float = 0.0
    pag_scale: float = 0.0
    pag_applied_layers: Sequence[str] = ("mid",)
    pag_adaptive_scale: float = 0.0
    token_indices: Any = None
    max_iter_to_alter: int = 25
    thresholds: dict | None = None
    scale_factor: float = 20.0
    attn_res: tuple[int, int] = (16, 16)
    edit_source: Sequence[str] | None = None
    edit_target: Sequence[str] | None = None
    cross_attention_guidance_amount: float = 0.1
    clip_skip: int | None = None
    lora_scale: float = 1.0
    latents: Any = None
    output_type: str = "uint8"
    # SDXL (diffusers' names): the second encoder's prompts, the micro-conditioning, the hand-off
    prompt_2: str | Sequence[str] | None = None
    negative_prompt_2: str | Sequence[str] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    denoising_start: float | None = None
    denoising_end: float | None = None

    @classmethod
    def of(cls, options: dict) -> "CallArguments":
        """From keyword arguments; an unknown name is a `ConfigError` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(f"unknown pipeline argument(s) {unknown}; known: {sorted(names)}")
        return cls(**options)


def default_mesh(devices: Sequence | None = None) -> Mesh:
    """A one-axis (`data`) mesh over every device of every host."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


@dataclasses.dataclass(frozen=True)
class CallSettings:
    """The static part of one `Pipeline` call: everything its compiled program is specialised on,
    and the key of the pipeline's compile cache. Calls with equal settings run the same compiled
    program; what is not here is traced (guidance, control and adapter scales, the seed, images,
    latents, prompts' token ids), so changing it never recompiles.

    A new option of the pipeline is one field here (if it changes the program's structure) or one
    traced input (if it is a value), plus the one stage that reads it.
    """

    num_inference_steps: int
    latent_shape: tuple[int, int, int]  # (h, w, C) of the latents
    solver: str | None = None  # None: the scheduler config's own class
    scheduler_options: tuple[tuple[str, Any], ...] = ()  # planner options, e.g. (("eta", 0.5),)
    mode: str = "txt2img"  # "txt2img", "img2img", "inpaint" (partial diffusion) or "repaint"
    strength: float = 1.0  # the plan's strength: below 1 only for img2img and partial inpainting
    do_cfg: bool = True  # guidance_scale > 1 (diffusers' rule); the scale itself is traced
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    guess_mode: bool = False  # as run: also on for a global_pool_conditions ControlNet
    control_windows: tuple[tuple[float, float], ...] = ()  # (start, end) per ControlNet
    adapter_conditioning_factor: float = 1.0
    repaint_jump_length: int = 10
    repaint_jump_n_sample: int = 10
    init_from: str | None = None  # "images" (VAE-encoded in the program) or "latents"
    given_noise: bool = False  # initial noise passed as `latents=`, else drawn in the program
    clip_guide: tuple | None = None  # (VAE module, CLIP vision module, image size, cutouts, min fraction)
    output_type: str = "uint8"
    kind: str = "text2image"  # the U-Net's input kind (models.kinds): what `concat` holds
    masked_from: str | None = None  # inpainting models: "images" (VAE-encoded in the program) or "latents"
    sag: bool = False  # Self-Attention Guidance on (sag_scale > 0; the scale is traced)
    pag_layers: tuple[str, ...] = ()  # Perturbed-Attention Guidance's layers (pag_scale > 0; the scale is traced)
    pag_adaptive_scale: float = 0.0
    excite: tuple | None = None  # Attend-and-Excite: (max_iter_to_alter, thresholds items, scale_factor, attn_res)
    zero_negative: bool = False  # SDXL's force_zeros_for_empty_prompt without a negative prompt: zero embeddings
    denoising_start: float | None = None  # SDXL's hand-off: start from the given latents at this fraction
    denoising_end: float | None = None  # stop at this fraction of the schedule (the base's part of a hand-off)

    @property
    def pix2pix_zero(self) -> str | None:
        """Pix2Pix-Zero's start (mode "pix2pix_zero"): "invert" (the input image's inversion) or
        "generate" (from noise); None in the other modes."""
        if self.mode != "pix2pix_zero":
            return None
        return "generate" if self.init_from is None else "invert"

    def plan(self, scheduler_config: SchedulerConfig) -> Plan:
        """The solver's plan for these settings (`schedulers.make_plan`; raises `ConfigError`)."""
        return make_plan(scheduler_config, self.num_inference_steps, self.solver, strength=self.strength,
                         denoising_start=self.denoising_start, denoising_end=self.denoising_end,
                         **dict(self.scheduler_options))


# ---------------------------------------------------------------------------------------------
# The compiled program, in diffusers' stages. Each is a plain function of modules, parameters
# and arrays; `_program` chains them.
# ---------------------------------------------------------------------------------------------


def encode_prompt(text_encoder, params, ids, clip_skip: int | None):
    """CLIP text embeddings (B, 77, D) of token ids; with `clip_skip`, the hidden state that many
    layers from the end, through the final layer norm (diffusers' `encode_prompt`)."""
    out = text_encoder.apply({"params": params}, ids)
    if clip_skip:
        hidden = out.hidden_states[-(clip_skip + 1)]
        return text_encoder.apply({"params": params}, hidden, method=text_encoder.apply_final_layer_norm)
    return out.last_hidden_state


# SDXL's text encoders and the suffix of their token ids in the per-image inputs ("ids", "ids_2")
TEXT_ENCODERS = (("text_encoder", ""), ("text_encoder_2", "_2"))


def encode_prompt_xl(modules: dict, params: dict, ids: dict, clip_skip: int | None):
    """SDXL's text conditioning (diffusers' `StableDiffusionXLPipeline.encode_prompt`): each
    encoder's penultimate hidden state (`clip_skip` more layers back), no final norm, concatenated
    along channels -> (B, 77, D1 + D2), and the pooled, projected embedding of the first encoder
    with a projection (the second, OpenCLIP bigG) -> (B, P). `ids` maps encoder name -> (B, 77)."""
    layer = -((clip_skip or 0) + 2)
    states, pooled = [], None
    for name, _ in TEXT_ENCODERS:
        if modules.get(name) is None:
            continue
        out = modules[name].apply({"params": params[name]}, ids[name])
        states.append(out.hidden_states[layer])
        if pooled is None and out.text_embeds is not None:
            pooled = out.text_embeds
    return jnp.concatenate(states, axis=-1), pooled


def is_xl(unet) -> bool:
    """Whether `unet` is SDXL-type (`addition_embed_type="text_time"`: pooled text and micro-conditioning)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def encode_text(modules: dict, params: dict, source: dict, prefix: str, clip_skip: int | None = None):
    """(text (B, 77, D), pooled (B, P) or None) for the token ids `source[prefix]` (and, for SDXL,
    `source[prefix + "_2"]`): `encode_prompt` for SD-1/2, `encode_prompt_xl` for SDXL."""
    if not is_xl(modules["unet"]):
        return encode_prompt(modules["text_encoder"], params["text_encoder"], source[prefix], clip_skip), None
    ids = {name: source.get(prefix + suffix) for name, suffix in TEXT_ENCODERS}
    return encode_prompt_xl(modules, params, ids, clip_skip)


def text_branch(settings: CallSettings, modules: dict, params: dict, per_image: dict, prefix: str = "ids",
                clip_skip: int | None = None, zero: bool = False) -> dict:
    """One guidance branch's text conditioning from the per-image token ids `prefix` ("ids",
    "neg_ids"): {"text": (B, 77, D)}, and for SDXL also {"added": {"text_embeds", "time_ids"}}
    with the branch's micro-conditioning ids (`per_image["time_ids"]` / `["neg_time_ids"]`).
    `zero`: SDXL's zeroed negative embeddings (`force_zeros_for_empty_prompt`)."""
    text, pooled = encode_text(modules, params, per_image, prefix, clip_skip)
    if pooled is None:
        return {"text": text}
    if zero:
        text, pooled = jnp.zeros_like(text), jnp.zeros_like(pooled)
    time_ids = per_image["neg_time_ids" if prefix.startswith("neg") else "time_ids"]
    return {"text": text, "added": {"text_embeds": pooled, "time_ids": time_ids}}


def image_keys(seed_key, index):
    """Image i's key, `fold_in(key(seed), i)`: an image depends only on (seed, i)."""
    return jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(index)


def prepare_latents(settings: CallSettings, plan: Plan, vae, vae_params, per_image: dict, keys):
    """The initial noise (given, or normal draws from each image's key) and, for editing modes,
    the clean latents to keep (`init_latents`, or the VAE posterior sample of `init_images`)."""
    if settings.given_noise:
        noise = per_image["noise"]
    else:
        noise = jax.vmap(lambda k: jax.random.normal(k, settings.latent_shape, jnp.float32))(keys)
    known = None
    if settings.init_from == "latents":
        known = per_image["init_latents"]
    elif settings.init_from == "images":
        moments = vae.apply({"params": vae_params}, per_image["init_images"], method=vae.encode)
        z = jax.vmap(lambda m, k: sample_posterior(m[None], jax.random.fold_in(k, 1 << 20))[0])(moments, keys)
        known = scale_latents(z, vae.config)
    return noise, known


def prepare_concat(settings: CallSettings, vae, vae_params, per_image: dict, keys):
    """The extra U-Net input channels of a concatenation-conditioned model (`models.kinds`), or
    None: the mask and the masked image's scaled latents (a posterior sample from each image's
    key, as diffusers samples it), the normalised depth map, or InstructPix2Pix's unscaled VAE
    mode of the input image."""
    if settings.kind == "inpaint":
        if settings.masked_from == "latents":
            masked = per_image["masked_image_latents"]
        else:
            moments = vae.apply({"params": vae_params}, per_image["masked_images"], method=vae.encode)
            z = jax.vmap(lambda m, k: sample_posterior(m[None], jax.random.fold_in(k, 2 << 20))[0])(moments, keys)
            masked = scale_latents(z, vae.config)
        return jnp.concatenate([per_image["mask"], masked], axis=-1)
    if settings.kind == "depth":
        return per_image["depth"]
    if settings.kind == "instruct_pix2pix":
        moments = vae.apply({"params": vae_params}, per_image["edit_images"], method=vae.encode)
        return split_moments(moments)[0]
    return None


def score_function(settings: CallSettings, plan: Plan, modules: dict, params: dict, per_image: dict, shared: dict,
                   concat=None):
    """The guidance stack and its `cond`: U-Net + ControlNets + adapter features (+ the `concat`
    channels), then CFG (with guess mode; InstructPix2Pix's three branches), then CLIP guidance."""
    branch = text_branch(settings, modules, params, per_image, "ids", settings.clip_skip)
    text = branch["text"]
    if concat is not None:
        branch["concat"] = concat
    units = [G.ControlNetUnit(m, p, shared["control_scales"][k], *settings.control_windows[k], settings.guess_mode)
             for k, (m, p) in enumerate(zip(modules["controlnets"], params["controlnets"]))]
    if units:
        branch["control"] = tuple(per_image["controls"])
    if modules["adapters"]:
        feats = None
        for k, (m, p) in enumerate(zip(modules["adapters"], params["adapters"])):
            f = G.adapter_features(m, p, per_image["adapter_images"][k], 1.0)
            f = tuple(x * shared["adapter_scales"][k] for x in f)
            feats = f if feats is None else tuple(a + b for a, b in zip(feats, f))
        branch["adapter"] = feats
    model = G.unet_prediction(modules["unet"], params["unet"], controlnets=units,
                              adapter_conditioning_factor=settings.adapter_conditioning_factor)
    if settings.do_cfg:
        # diffusers encodes the negative prompt without clip_skip (SD and SDXL alike)
        uncond = dict(branch, **text_branch(settings, modules, params, per_image, "neg_ids",
                                            zero=settings.zero_negative))
        if settings.guess_mode and units:
            b = text.shape[0]
            branch["control_mask"], uncond["control_mask"] = jnp.ones((b,)), jnp.zeros((b,))
        if settings.kind == "instruct_pix2pix":  # diffusers' order: (prompt, image), (negative, image), (negative, 0)
            model = G.instruct_pix2pix(model, shared["guidance_scale"], shared["image_guidance_scale"])
            cond = {"cond": branch, "image_cond": uncond, "uncond": dict(uncond, concat=jnp.zeros_like(concat))}
        else:
            model = attention_rules(settings, plan, model, shared, True)
            cond = {"cond": branch, "uncond": uncond}
    else:
        cond = branch
        if settings.sag or settings.pag_layers or settings.excite:
            model = attention_rules(settings, plan, model, shared, False)
            cond = {"cond": branch}
    if settings.pix2pix_zero:
        directions = [encode_text(modules, params, shared, k, settings.clip_skip)[0]
                      for k in ("edit_source_ids", "edit_target_ids")]
        cond["edit_direction"] = G.edit_direction(*directions)
    if settings.excite:
        cond["excite"] = per_image["excite"]
    if settings.clip_guide is not None:
        vae, clip, size, cutouts, fraction = settings.clip_guide
        guide = G.ClipGuide(vae, shared["clip_params"]["vae"], clip, shared["clip_params"]["clip"], size, cutouts,
                            fraction)
        key = jax.random.fold_in(jax.random.wrap_key_data(shared["seed"]), 1 << 30)
        model = G.clip_guidance(model, guide, shared["clip_scale"], plan, key=key)
        cond = {**cond, "clip_target": per_image["clip_target"]}
    return model, cond


def attention_rules(settings: CallSettings, plan: Plan, base, shared: dict, cfg: bool):
    """CFG (`cfg`: with the traced guidance scale; else the conditional branch alone) with the
    attention techniques the settings turn on: SAG and PAG terms (`guidance.attention_guided`),
    Pix2Pix-Zero's two-pass edit, and Attend-and-Excite's latent updates around whichever of
    those predicts."""
    guidance_scale = shared["guidance_scale"] if cfg else 1.0
    terms = []
    if settings.sag:
        terms.append(G.SAG(shared["sag_scale"], plan))
    if settings.pag_layers:
        terms.append(G.PAG(shared["pag_scale"], settings.pag_layers, settings.pag_adaptive_scale))
    if settings.pix2pix_zero:
        model = G.pix2pix_zero(base, guidance_scale,
                               cross_attention_guidance_amount=shared["cross_attention_guidance_amount"])
    elif terms:
        model = G.attention_guided(base, guidance_scale, terms, guidance_rescale=settings.guidance_rescale)
    elif cfg:
        model = G.classifier_free(base, guidance_scale, guidance_rescale=settings.guidance_rescale)
    else:  # only with Attend-and-Excite, whose default prediction is the conditional branch alone
        model = None
    if settings.excite:
        max_iter, thresholds, scale_factor, attn_res = settings.excite
        model = G.attend_and_excite(base, model, max_iter_to_alter=max_iter, thresholds=dict(thresholds),
                                    scale_factor=scale_factor, attn_res=attn_res)
    return model


def invert_latents(settings: CallSettings, inverse_plan: Plan, modules: dict, params: dict, per_image: dict,
                   known, shared: dict):
    """Pix2Pix-Zero's start: the clean latents DDIM-inverted under the prompt (no CFG) with its
    noise regularisers (`guidance.regularized_inversion`)."""
    branch = text_branch(settings, modules, params, per_image, "ids", settings.clip_skip)
    base = G.unet_prediction(modules["unet"], params["unet"])
    key = jax.random.fold_in(jax.random.wrap_key_data(shared["seed"]), 3 << 20)
    rule = G.regularized_inversion(base, inverse_plan, key=key)
    return ddim_invert(rule, inverse_plan, known, branch)


def denoise(settings: CallSettings, plan: Plan, model, cond, noise, known, per_image: dict, keys):
    """The denoising scan for the call's mode. Returns the final latents and each image's first
    evaluation with non-finite latents (-1 if none)."""
    checked = dict(key=keys, return_nonfinite=True)
    if settings.pix2pix_zero:  # the reference rows, then the edited rows; the images are the edited ones
        # the inverted latents are x_T on the variance-preserving scale: the solver's state holds them
        # times its first input scaling (1 for DDIM; sqrt(sigma^2 + 1) for Euler-type solvers)
        start = known * jnp.asarray(plan.rows["in_div"][0], jnp.float32) if settings.pix2pix_zero == "invert" \
            else initial_latents(plan, noise)
        both = jnp.concatenate([start, start])
        latents, bad = sample(model, plan, both, cond, key=jnp.concatenate([keys, keys]), return_nonfinite=True)
        b = start.shape[0]
        return latents[b:], jnp.maximum(bad[:b], bad[b:])
    if settings.mode == "txt2img":
        return sample(model, plan, initial_latents(plan, noise), cond, **checked)
    if settings.mode == "img2img":
        if settings.denoising_start is not None:  # SDXL's hand-off: the latents are already at the level
            return sample(model, plan, jnp.asarray(known, jnp.float32), cond, **checked)
        return sample(model, plan, noised_latents(plan, known, noise), cond, **checked)
    if settings.mode == "inpaint":
        start = initial_latents(plan, noise) if plan.begin_index == 0 else noised_latents(plan, known, noise)
        if settings.kind == "inpaint":  # the model sees the mask and keeps the rest itself: no blending
            return sample(model, plan, start, cond, **checked)
        return sample(model, plan, start, cond, inpaint=Inpaint(known, per_image["mask"], noise), **checked)
    latents = repaint(model, plan, known, per_image["mask"], keys, cond,
                      num_inference_steps=settings.num_inference_steps, jump_length=settings.repaint_jump_length,
                      jump_n_sample=settings.repaint_jump_n_sample)
    bad = first_nonfinite(jnp.full(latents.shape[:1], -1, jnp.int32), latents, plan.num_evals - 1)
    return latents, bad  # RePaint: only the final latents are checked


def decode(vae, vae_params, latents):
    """Latents to images in [0, 1] (NaN survives the clip, so the host check still sees it)."""
    images = vae.apply({"params": vae_params}, unscale_latents(latents, vae.config), method=vae.decode)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


def _program(settings: CallSettings, plan: Plan, modules: dict, params: dict, per_image: dict, shared: dict,
             inverse_plan: Plan | None = None):
    params = apply_loras(params, shared.get("lora_scales"))  # the unmerged LoRAs, at traced scales
    keys = image_keys(jax.random.wrap_key_data(shared["seed"]), per_image["index"])
    noise, known = prepare_latents(settings, plan, modules["vae"], params["vae"], per_image, keys)
    if settings.pix2pix_zero == "invert":
        known = invert_latents(settings, inverse_plan, modules, params, per_image, known, shared)
    concat = prepare_concat(settings, modules["vae"], params["vae"], per_image, keys)
    model, cond = score_function(settings, plan, modules, params, per_image, shared, concat)
    latents, bad = denoise(settings, plan, model, cond, noise, known, per_image, keys)
    if settings.output_type == "latent":
        return latents, bad
    return decode(modules["vae"], params["vae"], latents), bad


def _expand_per_prompt(img: np.ndarray, batch: int, num_images_per_prompt: int, what: str) -> np.ndarray:
    """One image for all, or one per prompt repeated `num_images_per_prompt` times (interleaved)."""
    n, prompts = img.shape[0], batch // num_images_per_prompt
    if n == 1:
        return np.repeat(img, batch, axis=0)
    if n == prompts:
        return np.repeat(img, num_images_per_prompt, axis=0)
    if n == batch:
        return img
    raise ConfigError(f"{what}: a batch of {n} for {prompts} prompt(s) x {num_images_per_prompt} image(s) "
                      f"each; give 1, {prompts} (one per prompt) or {batch}")


def _image01(image, what: str) -> np.ndarray:
    """An image or batch as float32 in [0, 1]: PIL images and uint8 arrays are scaled from
    0..255; float arrays must already be finite and in [0, 1] (never guessed)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    elif isinstance(image, (list, tuple)) and image and isinstance(image[0], Image.Image):
        image = np.stack([np.asarray(i.convert("RGB")) for i in image])
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ConfigError(f"{what}: expected a PIL image, uint8 (0..255) or float [0, 1] array, got dtype {a.dtype}")
    a = a.astype(np.float32)
    if a.size and (not np.all(np.isfinite(a)) or a.min() < -1e-3 or a.max() > 1 + 1e-3):
        raise ConfigError(f"{what}: float images must be finite and in [0, 1]; got values in "
                          f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}] (pass uint8 for 0..255 data)")
    return a


def _device_memory_bytes(device) -> int | None:
    """The memory a device can allocate: its allocator limit on accelerators, RAM on the CPU."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def _prompt_batch(prompt, negative_prompt, num_images_per_prompt: int) -> tuple[list[str], list[str]]:
    """The call's prompts and negative prompts, each repeated `num_images_per_prompt` times in a row."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ConfigError("no prompt given")
    negatives = negative_prompt if negative_prompt is not None else ""
    negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
    if len(negatives) != len(prompts):
        raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return ([p for p in prompts for _ in range(num_images_per_prompt)],
            [n for n in negatives for _ in range(num_images_per_prompt)])


# the `CallArguments` only SDXL models take (diffusers' SDXL pipelines' names)
XL_ARGUMENTS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
                "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
                "aesthetic_score", "negative_aesthetic_score")


def given_xl_arguments(values: Any) -> dict:
    """The SDXL-only arguments of `values` (a `CallArguments`, or anything with those attributes,
    such as infer.py's settings) that differ from `CallArguments`' defaults (pairs compared as
    tuples), by name."""
    defaults = {f.name: f.default for f in dataclasses.fields(CallArguments) if f.name in XL_ARGUMENTS}
    out = {}
    for name, default in defaults.items():
        value = getattr(values, name)
        if value != default and not (isinstance(value, list | tuple) and isinstance(default, tuple)
                                     and tuple(value) == default):
            out[name] = value
    return out


def _second_prompts(value, n: int, num_images_per_prompt: int, what: str) -> list[str]:
    """SDXL's `prompt_2` / `negative_prompt_2`: one string for all `n` prompts or one per prompt,
    each repeated `num_images_per_prompt` times as the prompts are."""
    texts = [value] * n if isinstance(value, str) else list(value)
    if len(texts) != n or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"{what} must be a string or {n} strings (one per prompt), got {value!r}")
    return [t for t in texts for _ in range(num_images_per_prompt)]


def _image_indices(image_indices, b: int) -> list[int]:
    """Each image's index (its noise and step keys derive from (seed, index)); 0..b-1 by default."""
    indices = list(range(b)) if image_indices is None else list(image_indices)
    if len(indices) != b:
        raise ConfigError(f"{len(indices)} image indices for {b} images")
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < 2**31 for i in indices):
        raise ConfigError(f"image_indices must be integers in [0, 2^31), got {indices}")
    return indices


def _mode(init_image, init_latents, mask, inpaint_method: str) -> str:
    """"txt2img", "img2img", "inpaint" (partial diffusion) or "repaint", from the inputs given."""
    if inpaint_method not in ("partial", "repaint"):
        raise ConfigError(f"inpaint_method must be 'partial' or 'repaint', got {inpaint_method!r}")
    if init_image is None and init_latents is None:
        if mask is not None:
            raise ConfigError("a mask needs an init image to inpaint")
        return "txt2img"
    if mask is None:
        return "img2img"
    return "inpaint" if inpaint_method == "partial" else "repaint"


def _strength(strength: float | None, mode: str) -> float:
    """The plan's strength: the given one for img2img and partial inpainting (diffusers' defaults,
    0.8 and 1.0, when None), 1.0 for the other modes."""
    if mode not in ("img2img", "inpaint"):
        return 1.0
    value = (1.0 if mode == "inpaint" else 0.8) if strength is None else float(strength)
    return min(value, 1.0)


def _clip_inputs(per_image: dict, shared: dict, clip_guidance: ClipGuidanceInput, b: int) -> tuple:
    """CLIP guidance's target (per image) and scale and parameters (shared); returns the static
    part of the guide (its modules and sizes), which is part of `CallSettings`."""
    guide = clip_guidance.guide
    target = np.asarray(clip_guidance.target, np.float32)
    per_image["clip_target"] = np.broadcast_to(target, (b, target.shape[-1])).copy()
    shared["clip_scale"] = np.float32(clip_guidance.scale)
    shared["clip_params"] = {"vae": guide.vae_params, "clip": guide.clip_params}
    return (guide.vae, guide.clip, int(guide.image_size), int(guide.num_cutouts), float(guide.cutout_min_fraction))


def check_call_arguments(args: CallArguments, *, clip_layers: int) -> None:
    """Range checks of `Pipeline.__call__`'s arguments: out-of-range values are `ConfigError`s
    naming the argument, never clamped or ignored. `clip_layers`: the text encoder's depth."""

    def number(name, v, lo=None, hi=None, *, lo_open=False):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number, got {v!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise ConfigError(f"{name}={v} is out of range: must be {'>' if lo_open else '>='} {lo}"
                              + (f" and <= {hi}" if hi is not None else ""))
        if hi is not None and v > hi:
            raise ConfigError(f"{name}={v} is out of range: must be <= {hi}")

    def integer(name, v, lo, hi=None):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        number(name, v, lo, hi)

    integer("num_inference_steps", args.num_inference_steps, 1)
    number("guidance_scale", args.guidance_scale, 0.0)
    number("guidance_rescale", args.guidance_rescale, 0.0, 1.0)
    integer("seed", args.seed, 0, 2**63 - 1)
    integer("num_images_per_prompt", args.num_images_per_prompt, 1)
    if args.strength is not None:
        number("strength", args.strength, 0.0, 1.0, lo_open=True)
    if args.image_guidance_scale is not None:
        number("image_guidance_scale", args.image_guidance_scale, 0.0)
    number("adapter_conditioning_factor", args.adapter_conditioning_factor, 0.0, 1.0)
    number("sag_scale", args.sag_scale, 0.0)
    number("pag_scale", args.pag_scale, 0.0)
    number("pag_adaptive_scale", args.pag_adaptive_scale, 0.0)
    integer("max_iter_to_alter", args.max_iter_to_alter, 0)
    number("scale_factor", args.scale_factor, 0.0)
    number("cross_attention_guidance_amount", args.cross_attention_guidance_amount, 0.0)
    number("lora_scale", args.lora_scale)
    integer("repaint_jump_length", args.repaint_jump_length, 1)
    integer("repaint_jump_n_sample", args.repaint_jump_n_sample, 1)
    if args.clip_skip is not None:
        integer("clip_skip", args.clip_skip, 0, clip_layers)
    number("aesthetic_score", args.aesthetic_score)
    number("negative_aesthetic_score", args.negative_aesthetic_score)
    for name in ("denoising_start", "denoising_end"):
        v = getattr(args, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                              or not 0.0 < float(v) < 1.0):
            raise ConfigError(f"{name} must be a fraction strictly between 0 and 1 (or None), got {v!r}")
    if args.output_type not in ("uint8", "float", "latent"):
        raise ConfigError(f"output_type must be 'uint8', 'float' or 'latent', got {args.output_type!r}")
    for k, c in enumerate(args.controls):
        number(f"controls[{k}].scale", c.scale)
        number(f"controls[{k}].start (control_guidance_start)", c.start, 0.0, 1.0)
        number(f"controls[{k}].end (control_guidance_end)", c.end, 0.0, 1.0)
        if c.start >= c.end:
            raise ConfigError(f"controls[{k}]: control_guidance_start={c.start} must be smaller than "
                              f"control_guidance_end={c.end}")
    for k, a in enumerate(args.adapters):
        number(f"adapters[{k}].scale", a.scale)


class Pipeline:
    """A Stable Diffusion pipeline (U-Net, VAE, CLIP text encoder, tokenizer, scheduler config)
    plus any number of ControlNets and T2I-Adapters, as pure JAX functions of their parameters."""

    def __init__(self, bundle, *, controlnets: Sequence[tuple] = (), adapters: Sequence[tuple] = (),
                 mesh: Mesh | None = None, loras: Sequence[Any] = (), fuse_loras: bool = False,
                 embeddings: Sequence[Any] = (), unsafe_load_pickle: bool = False):
        for name in ("unet", "vae"):
            if name not in bundle.modules:
                raise ConfigError(f"{bundle.path}: the pipeline has no {name} (found {sorted(bundle.modules)})")
        self.bundle = bundle
        self.unet, self.vae = bundle.unet, bundle.vae
        self.text_encoder = bundle.modules.get("text_encoder")
        self.text_encoder_2 = bundle.modules.get("text_encoder_2")
        self.tokenizer = bundle.tokenizers.get("tokenizer")
        self.tokenizer_2 = bundle.tokenizers.get("tokenizer_2")
        self.xl = is_xl(self.unet)
        options = getattr(bundle, "options", {})  # model_index.json's settings
        self.requires_aesthetics_score = self._check_text_encoders(bundle, options)
        self.force_zeros_for_empty_prompt = bool(options.get("force_zeros_for_empty_prompt", self.xl))
        self._programs: dict[CallSettings, tuple[Callable, Plan]] = {}  # the compile cache
        self.scheduler_config = SchedulerConfig.from_dict(bundle.scheduler_config or {"_class_name": "PNDMScheduler"})
        own_cn = bundle.modules.get("controlnet")
        own_ad = bundle.modules.get("adapter")
        self.controlnets = list(controlnets)
        self._own_networks = {"controlnet": 0, "adapter": 0}  # how many came with the pipeline folder itself
        if own_cn is not None:
            pairs = list(zip(own_cn, bundle.params["controlnet"])) if isinstance(own_cn, list) else [
                (own_cn, bundle.params["controlnet"])]
            self.controlnets = pairs + self.controlnets
            self._own_networks["controlnet"] = len(pairs)
        from .models.controlnet import check_controlnet_fits

        for k, (module, _) in enumerate(self.controlnets):
            check_controlnet_fits(self.unet.config, module.config, f"{bundle.path}: ControlNet {k}")
        self.adapters = list(adapters)
        if own_ad is not None:
            pairs = list(zip(own_ad, bundle.params["adapter"])) if isinstance(own_ad, list) else [
                (own_ad, bundle.params["adapter"])]
            self.adapters = pairs + self.adapters
            self._own_networks["adapter"] = len(pairs)
        self.kind = unet_kind(self.unet.config.in_channels, self.vae.config.latent_channels, bundle.class_name,
                              where=f"{bundle.path}: unet")
        self.mesh = mesh or default_mesh()
        replicated = named(self.mesh, P())
        place = lambda tree: jax.device_put(tree, replicated)  # noqa: E731
        self.params = {
            "unet": place(bundle.params["unet"]),
            "vae": place(bundle.params["vae"]),
            **{name: place(bundle.params[name]) for name, _ in TEXT_ENCODERS if bundle.modules.get(name) is not None},
            "controlnets": [place(p) for _, p in self.controlnets],
            "adapters": [place(p) for _, p in self.adapters],
        }
        self.last_settings: dict | None = None  # the resolved settings of the latest call (JSON-able)
        self._loras: list[dict] = []  # {"lora": Lora, "scale": float, "fused": bool}, in load order
        self._unfused_originals: dict[str, dict] = {}  # network -> {leaf path: its array before fuse_loras}
        self._vocabulary: dict[str, list[str]] = {}  # textual-inversion token -> the tokens it occupies
        self._vocabulary_base: dict = {}  # encoder name -> (tokenizer, text encoder, its table) before any embedding
        if embeddings:
            self.load_textual_inversion(embeddings, unsafe_load_pickle=unsafe_load_pickle)
        for spec in loras:
            self.load_lora(spec, unsafe_load_pickle=unsafe_load_pickle)
        if fuse_loras:
            self.fuse_loras()

    def _check_text_encoders(self, bundle, options: Mapping) -> bool:
        """The text encoders and tokenizers the U-Net needs, their widths checked against it (a
        `ConfigError` naming the fields). Returns SDXL's `requires_aesthetics_score`: whether the
        micro-conditioning is (original size, crop, aesthetic score) (the refiner) rather than
        (original size, crop, target size) (the base): `model_index.json`'s flag, else the width
        of the U-Net's `add_embedding` says which."""
        where = bundle.path
        if not self.xl:
            if self.text_encoder is None:
                raise ConfigError(f"{where}: the pipeline has no text_encoder (found {sorted(bundle.modules)})")
            if self.tokenizer is None:
                raise ConfigError(f"{where}: the pipeline has no tokenizer")
            if self.text_encoder_2 is not None:
                raise ConfigError(f"{where}: a text_encoder_2 is an SDXL component, but the U-Net has no SDXL "
                                  f"text_time embedding (addition_embed_type={self.unet.config.addition_embed_type!r})")
            return False
        encoders = [(n, bundle.modules.get(n)) for n, _ in TEXT_ENCODERS if bundle.modules.get(n) is not None]
        if not encoders:
            raise ConfigError(f"{where}: an SDXL U-Net needs text_encoder_2 (and text_encoder for the base model); "
                              f"found {sorted(bundle.modules)}")
        for name, _ in encoders:
            tok = "tokenizer" + name[len("text_encoder"):]
            if bundle.tokenizers.get(tok) is None:
                raise ConfigError(f"{where}: {name} has no {tok}")
        pooled = [m for _, m in encoders if getattr(m, "with_projection", False)]
        if not pooled:
            raise ConfigError(f"{where}: an SDXL U-Net needs a text encoder with a projection "
                              f"(CLIPTextModelWithProjection, text_encoder_2) for its pooled text embedding")
        cfg = self.unet.config
        width = sum(int(m.config.hidden_size) for _, m in encoders)
        if width != cfg.cross_attention_dims[0]:
            raise ConfigError(f"{where}: the text encoders' hidden sizes add up to {width} "
                              f"({', '.join(f'{n} {m.config.hidden_size}' for n, m in encoders)}), but the U-Net's "
                              f"cross_attention_dim is {cfg.cross_attention_dim}")
        room = cfg.projection_class_embeddings_input_dim - int(pooled[0].config.projection_dim)
        flag = options.get("requires_aesthetics_score")
        count = 5 if flag else 6
        if flag is None:
            count = 5 if room == 5 * cfg.addition_time_embed_dim else 6
        if room != count * cfg.addition_time_embed_dim:
            raise ConfigError(
                f"{where}: the U-Net's projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}"
                f" should be the pooled width {pooled[0].config.projection_dim} plus {count} time ids x "
                f"addition_time_embed_dim={cfg.addition_time_embed_dim} = "
                f"{int(pooled[0].config.projection_dim) + count * cfg.addition_time_embed_dim}"
                + ("" if flag is None else f" (requires_aesthetics_score={flag})"))
        return count == 5

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path, *, dtype: Any = "auto", vae_dtype: Any = "float32", param_dtype: Any = "float32",
                        controlnets: Sequence[str] = (), adapters: Sequence[str] = (),
                        attention_impl: str = "auto", mesh: Mesh | None = None,
                        unsafe_load_pickle: bool = False, unet: str | os.PathLike | None = None,
                        loras: Sequence[Any] = (), fuse_loras: bool = False,
                        embeddings: Sequence[Any] = (), vae: str | os.PathLike | None = None,
                        variant: str | None = None) -> "Pipeline":
        """Load a pipeline folder, single file or jaxcontrol checkpoint, plus extra ControlNets /
        adapters by path. `unet` replaces the pipeline's U-Net by another one's folder or file (a
        fine-tune, or a concatenation-conditioned U-Net over the same VAE and text encoder: the
        pipeline's kind follows its input width). Raises `ConfigError` when that is not a U-Net.
        `vae` replaces the VAE likewise (e.g. SDXL's fp16-fix VAE); it must have the latent channels
        of the one it replaces (`ConfigError` otherwise). `variant` ("fp16", ...) reads a diffusers
        folder's variant weights (`diffusion_pytorch_model.fp16.safetensors`), as diffusers'
        `from_pretrained(variant=)` does.

        `dtype` is the compute dtype of the U-Net, ControlNets, adapters and text encoder: "auto"
        (default) is bfloat16 on a GPU or TPU and float32 on the CPU (`jaxcontrol.platform`);
        `vae_dtype` the VAE's (float32 by default, also in bf16 mode); `param_dtype` the dtype the
        weights are held in (float32 by default; "bfloat16" halves their memory). Names or dtypes;
        a name not in `platform.DTYPE_CHOICES` raises `ConfigError`. `attention_impl`: see
        `models.attention.ATTENTION_IMPLS` ("auto" picks per platform). `loras` / `fuse_loras`:
        see `load_lora` and `fuse_loras`; `embeddings`: see `load_textual_inversion`."""
        from .convert import load_model
        from .convert.pipeline_folder import load_pipeline

        dtype, vae_dtype, param_dtype = to_dtype(dtype), to_dtype(vae_dtype), to_dtype(param_dtype)
        bundle = load_pipeline(path, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                               component_kwargs={"vae": {"dtype": vae_dtype}}, unsafe_load_pickle=unsafe_load_pickle,
                               variant=variant)
        kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                  unsafe_load_pickle=unsafe_load_pickle)
        if unet is not None:
            from .models import UNet2DConditionModel

            module, params = load_model(unet, **kw)
            if not isinstance(module, UNet2DConditionModel):
                raise ConfigError(f"unet={os.fspath(unet)!r} is a {type(module).__name__}, not a UNet2DConditionModel")
            text_width = int(bundle.modules["text_encoder"].config.hidden_size)
            latent = int(bundle.modules["vae"].config.latent_channels)
            for field, have, want in (("cross_attention_dim", module.config.cross_attention_dim, text_width),
                                      ("out_channels", module.config.out_channels, latent)):
                if isinstance(have, int) and have != want:  # (a per-block cross_attention_dim is checked on use)
                    raise ConfigError(f"unet={os.fspath(unet)!r} has {field}={have}, but {os.fspath(path)!r} needs "
                                      f"{want} (its text encoder's width / its VAE's latent channels)")
            bundle.modules["unet"], bundle.params["unet"] = module, params
        if vae is not None:
            from .models import AutoencoderKL

            module, params = load_model(vae, dtype=vae_dtype, param_dtype=param_dtype,
                                        unsafe_load_pickle=unsafe_load_pickle)
            if not isinstance(module, AutoencoderKL):
                raise ConfigError(f"vae={os.fspath(vae)!r} is a {type(module).__name__}, not an AutoencoderKL")
            have, want = module.config.latent_channels, bundle.modules["vae"].config.latent_channels
            if have != want:
                raise ConfigError(f"vae={os.fspath(vae)!r} has latent_channels={have}, but {os.fspath(path)!r}'s "
                                  f"U-Net works on {want}-channel latents")
            bundle.modules["vae"], bundle.params["vae"] = module, params
        cns = [load_model(p, **kw) for p in controlnets]
        ads = [load_model(p, dtype=dtype, param_dtype=param_dtype, unsafe_load_pickle=unsafe_load_pickle)
               for p in adapters]
        return cls(bundle, controlnets=cns, adapters=ads, mesh=mesh, loras=loras, fuse_loras=fuse_loras,
                   embeddings=embeddings, unsafe_load_pickle=unsafe_load_pickle)

    # ------------------------------------------------------------------ textual inversion
    def load_textual_inversion(self, embeddings: Any, token: str | None = None, *,
                               unsafe_load_pickle: bool = False) -> list[str]:
        """Add textual-inversion embeddings to the tokenizer and the text encoder's token table
        (copies: the loaded weights are not touched). `embeddings`: a file or folder (diffusers'
        `learned_embeds.safetensors`, A1111 `.pt` / `.safetensors`, see `convert.embedding_file`)
        with an optional `token` replacing its word, a (file, token) pair, a (token, vectors)
        pair, or a list of these. A multi-vector embedding occupies `tok`, `tok_1`, ..., written
        out wherever a prompt says `tok`. Returns the words added.

        SDXL: each embedding has vectors for both text encoders (`clip_l` / `clip_g` files, or a
        (token, {"text_encoder": ..., "text_encoder_2": ...}) pair), added to both tokenizers and
        tables (a refiner, with the second encoder alone, takes `clip_g`), as diffusers' two
        `load_textual_inversion` calls with `text_encoder_2` / `tokenizer_2` do.

        Raises `CheckpointError` for an unreadable file and `ConfigError` for a word already in the
        vocabulary or vectors of the wrong width; nothing is added then."""
        from .convert.embedding_file import read_embedding, read_embedding_xl
        from .vocabulary import add_embeddings, token_table

        specs = list(embeddings) if isinstance(embeddings, list) else [embeddings]
        if token is not None and len(specs) != 1:
            raise ConfigError("token= names one embedding; give (file, token) pairs for several")
        read = read_embedding_xl if self.xl else read_embedding
        pairs = []
        for spec in specs:
            if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and not isinstance(
                    spec[1], (str, os.PathLike)):
                pairs.append(spec)
                continue
            source, word = (spec if isinstance(spec, tuple) and len(spec) == 2 else (spec, None))
            pairs.append(read(source, word or token, unsafe_load_pickle=unsafe_load_pickle))
        slots = [(name, "tokenizer" + suffix) for name, suffix in TEXT_ENCODERS if getattr(self, name) is not None]
        updates, added = {}, {}
        for name, tok_name in slots:  # every encoder first, so that a refusal changes nothing
            if self.xl:
                for word, vectors in pairs:
                    if not isinstance(vectors, Mapping) or name not in vectors:
                        raise ConfigError(f"embedding {word!r}: an SDXL pipeline needs vectors for {name} (SDXL "
                                          "embeddings hold clip_l and clip_g, one per text encoder)")
            encoder_pairs = [(w, np.asarray(v[name] if self.xl else v, np.float32)) for w, v in pairs]
            try:
                updates[name] = add_embeddings(getattr(self, tok_name), getattr(self, name), self.params[name],
                                               encoder_pairs)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}" if self.xl else str(e)) from None
            added = updates[name][3]
        for name, tok_name in slots:
            tokenizer, text_encoder, params, _ = updates[name]
            self._vocabulary_base.setdefault(name, (getattr(self, tok_name), getattr(self, name),
                                                    token_table(self.params[name])))
            setattr(self, tok_name, tokenizer)
            if text_encoder is not getattr(self, name):
                setattr(self, name, text_encoder)
                self._programs.clear()  # the programs hold the module
            self.params = dict(self.params, **{name: jax.device_put(params, named(self.mesh, P()))})
        self._vocabulary.update(added)
        return list(added)

    def unload_textual_inversion(self) -> None:
        """Remove every embedding: the tokenizers and the token tables as they were before the first."""
        from .models.params import flatten, unflatten
        from .vocabulary import TOKEN_TABLE

        for name, (tokenizer, text_encoder, table) in self._vocabulary_base.items():
            setattr(self, "tokenizer" + name[len("text_encoder"):], tokenizer)
            if text_encoder is not getattr(self, name):
                setattr(self, name, text_encoder)
                self._programs.clear()
            flat = dict(flatten(self.params[name]))
            flat[TOKEN_TABLE] = table  # the other leaves may carry a fused LoRA since: only the table goes back
            self.params = dict(self.params, **{name: unflatten(flat)})
        self._vocabulary, self._vocabulary_base = {}, {}

    @property
    def embeddings(self) -> dict[str, list[str]]:
        """The textual-inversion words loaded and the tokens each occupies."""
        return {k: list(v) for k, v in self._vocabulary.items()}

    # ------------------------------------------------------------------ LoRAs
    def load_lora(self, source: Any, scale: float | None = None, *, name: str | None = None,
                  unsafe_load_pickle: bool = False) -> str:
        """Add a LoRA, unmerged: its deltas are added in the program at a traced scale, so
        `set_lora_scale` and the call's `lora_scale` never recompile. `source`: a file (diffusers/
        PEFT, older diffusers or kohya layout, see `convert.lora_file`), a folder holding
        `pytorch_lora_weights.safetensors`, a `Lora`, a (source, scale) pair or a `LoraInput`.
        Returns its name: `name`, else the file's stem (the folder's name for diffusers' default
        `pytorch_lora_weights.*`), with "_2", "_3", ... added when another LoRA has it.

        Raises `CheckpointError` for a file that does not fit these networks (every unknown key
        listed, every wrong shape named with both shapes) and `ConfigError` for a duplicate name or
        a non-finite scale; nothing is loaded then."""
        from .convert.lora_file import read_lora
        from .models.lora import Lora

        spec = as_lora_input(source)
        if scale is not None:
            spec = dataclasses.replace(spec, scale=scale)
        if name is not None:
            spec = dataclasses.replace(spec, name=name)
        self._check_lora_scale(spec.scale, "scale")
        if isinstance(spec.source, Lora):
            lora = spec.source
            if spec.name:
                lora = dataclasses.replace(lora, name=spec.name)
            targets = lora_targets(self.params)
            unknown = sorted(set(lora.weights) - set(targets))
            if unknown:
                raise ConfigError(f"LoRA {lora.name!r} adapts {unknown}, which this pipeline lacks (it has "
                                  f"{sorted(targets)})")
            from .convert.lora_file import check_lora

            check_lora(lora, targets)
        else:
            lora = read_lora(spec.source, lora_targets(self.params), name=spec.name,
                             unsafe_load_pickle=unsafe_load_pickle)
        taken = {e["lora"].name for e in self._loras}
        if lora.name in taken:
            if spec.name is not None:
                raise ConfigError(f"a LoRA named {lora.name!r} is already loaded; choose another name")
            n = 2
            while f"{lora.name}_{n}" in taken:
                n += 1
            lora = dataclasses.replace(lora, name=f"{lora.name}_{n}")
        self._loras.append({"lora": lora, "scale": float(spec.scale), "fused": False})
        self._place_loras()
        return lora.name

    @staticmethod
    def _check_lora_scale(scale, what: str) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) or \
                not math.isfinite(scale):
            raise ConfigError(f"LoRA {what} must be a finite number, got {scale!r}")

    def _entry(self, name: str) -> dict:
        for e in self._loras:
            if e["lora"].name == name:
                return e
        raise ConfigError(f"no LoRA named {name!r} is loaded (loaded: {[e['lora'].name for e in self._loras]})")

    @property
    def loras(self) -> list[dict]:
        """The loaded LoRAs in order: {"name", "source", "format", "scale", "fused", "rank", "layers"}."""
        return [{"name": e["lora"].name, "source": e["lora"].source, "format": e["lora"].format,
                 "scale": e["scale"], "fused": e["fused"], "rank": e["lora"].rank(),
                 "layers": e["lora"].num_layers()} for e in self._loras]

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change an unmerged LoRA's scale (no recompilation). A merged one must be unfused first."""
        self._check_lora_scale(scale, "scale")
        e = self._entry(name)
        if e["fused"]:
            raise ConfigError(f"LoRA {name!r} is merged into the weights; call unfuse_loras() to change its scale")
        e["scale"] = float(scale)

    def fuse_loras(self) -> None:
        """Merge every unmerged LoRA into the weights at its current scale (faster sampling: no
        delta in the program). The replaced arrays are kept, so `unfuse_loras` restores the
        original weights bit for bit."""
        from .models.lora import merge_loras

        todo = [e for e in self._loras if not e["fused"]]
        if not todo:
            return
        params = {k: v for k, v in self.params.items() if k != "loras"}
        for comp in sorted({c for e in todo for c in e["lora"].weights}):
            entries = [e for e in todo if comp in e["lora"].weights]
            merged, originals = merge_loras(get_component(params, comp),
                                            [e["lora"].weights[comp] for e in entries],
                                            np.asarray([e["scale"] for e in entries], np.float32))
            kept = self._unfused_originals.setdefault(comp, {})
            for path, leaf in originals.items():
                kept.setdefault(path, leaf)  # the first fuse holds the true originals
            params = set_component(params, comp, merged)
        for e in todo:
            e["fused"] = True
        self.params = params
        self._place_loras()

    def unfuse_loras(self) -> None:
        """Put back the weights `fuse_loras` replaced (bit for bit); the LoRAs stay loaded, unmerged."""
        from .models.lora import unmerge_loras

        params = {k: v for k, v in self.params.items() if k != "loras"}
        for comp, originals in self._unfused_originals.items():
            params = set_component(params, comp, unmerge_loras(get_component(params, comp), originals))
        self._unfused_originals = {}
        for e in self._loras:
            e["fused"] = False
        self.params = params
        self._place_loras()

    def unload_loras(self, names: Sequence[str] | None = None) -> None:
        """Remove LoRAs (all by default). Merged ones are unfused first; others that were merged
        with them stay loaded, unmerged."""
        drop = {e["lora"].name for e in self._loras} if names is None else {self._entry(n)["lora"].name for n in names}
        if any(e["fused"] for e in self._loras if e["lora"].name in drop):
            self.unfuse_loras()
        self._loras = [e for e in self._loras if e["lora"].name not in drop]
        self._place_loras()

    def _place_loras(self) -> None:
        replicated = named(self.mesh, P())
        unfused = [e["lora"].weights for e in self._loras if not e["fused"]]
        params = {k: v for k, v in self.params.items() if k != "loras"}
        if unfused:
            params["loras"] = [jax.device_put(jax.tree_util.tree_map(jnp.asarray, w), replicated) for w in unfused]
        self.params = params

    def _lora_scales(self, lora_scale: float) -> np.ndarray | None:
        scales = [e["scale"] * float(lora_scale) for e in self._loras if not e["fused"]]
        return np.asarray(scales, np.float32) if scales else None

    @property
    def scheduler_config(self) -> SchedulerConfig:
        """The scheduler config every call plans with (the model's `scheduler_config.json`).
        Assigning another one empties the compile cache: its plans are part of each program."""
        return self._scheduler_config

    @scheduler_config.setter
    def scheduler_config(self, config: SchedulerConfig) -> None:
        if not isinstance(config, SchedulerConfig):
            raise ConfigError(f"scheduler_config must be a SchedulerConfig, got {type(config).__name__}")
        self._scheduler_config = config
        self._programs.clear()

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: 2^(VAE levels - 1), 8 for Stable Diffusion."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the U-Net denoises (the VAE's `latent_channels`; a
        concatenation-conditioned U-Net takes more inputs than that, see `kind`)."""
        return self.vae.config.latent_channels

    # ------------------------------------------------------------------ inputs
    def token_ids(self, prompts: Sequence[str], tokenizer: Any = None) -> np.ndarray:
        """CLIP token ids (B, 77) int32, padded and truncated as diffusers' `encode_prompt` does, by
        `tokenizer` (default: the pipeline's first; SDXL's second is `tokenizer_2`)."""
        prompts = list(prompts)
        tokenizer = tokenizer or self.tokenizer or self.tokenizer_2
        if any(len(v) > 1 for v in self._vocabulary.values()) and any(tokenizer is t for t in (self.tokenizer, self.tokenizer_2)):
            from .vocabulary import expand_prompt

            prompts = [expand_prompt(p, tokenizer) for p in prompts]
        return tokenize(tokenizer, prompts).astype(np.int32)

    def prompt_ids(self, prompts: Sequence[str], key: str = "ids", prompts_2: Sequence[str] | None = None) -> dict:
        """{key: ids} for SD-1/2; for SDXL the ids of each text encoder the pipeline has, under
        `key` (tokenizer, `prompts`) and `key + "_2"` (tokenizer_2, `prompts_2`, default `prompts`)."""
        if not self.xl:
            return {key: self.token_ids(prompts)}
        out = {}
        if self.text_encoder is not None:
            out[key] = self.token_ids(prompts, self.tokenizer)
        if self.text_encoder_2 is not None:
            out[key + "_2"] = self.token_ids(prompts if prompts_2 is None else prompts_2, self.tokenizer_2)
        return out

    def prepare_controls(self, controls: Sequence[ControlInput], batch: int, height: int, width: int,
                         num_images_per_prompt: int = 1) -> list:
        """Each ControlNet's images as (batch, height, width, 3) float32 in [0, 1]. An image (or a
        batch of one) serves every image; a batch of one per prompt is repeated
        `num_images_per_prompt` times each, interleaved like the prompts (diffusers'
        `prepare_image`)."""
        from .preprocess import prepare_control_image

        if len(controls) != len(self.controlnets):
            raise ConfigError(f"{len(self.controlnets)} ControlNets are loaded{self._origin('controlnet')} but "
                              f"{len(controls)} control images were given (one per ControlNet)")
        return [prepare_control_image(c.image, height, width, batch_size=batch,
                                      num_images_per_prompt=num_images_per_prompt,
                                      vae_scale_factor=self.vae_scale_factor, resize_mode=c.resize_mode)
                for c in controls]

    def _origin(self, kind: str) -> str:
        """Where the loaded ControlNets / adapters came from, when the pipeline folder brought some."""
        own = self._own_networks[kind]
        total = len(self.controlnets if kind == "controlnet" else self.adapters)
        if not own:
            return ""
        return f" ({own} from the pipeline folder's {kind}/, {total - own} given besides)"

    def prepare_adapter_images(self, adapters: Sequence[AdapterInput], batch: int, height: int, width: int,
                               num_images_per_prompt: int = 1) -> list:
        """Each adapter's images as (batch, height, width, C) float32 in [0, 1], expanded like the
        control images. (diffusers' adapter pipeline tiles a per-prompt batch instead, which pairs
        a prompt's second image with the next prompt's condition; we keep each prompt's own.)"""
        from .models.adapter import adapter_in_channels
        from .preprocess import prepare_adapter_image

        if len(adapters) != len(self.adapters):
            raise ConfigError(f"{len(self.adapters)} adapters are loaded{self._origin('adapter')} but {len(adapters)} "
                              "adapter images were given (one per adapter)")
        out = []
        for a, (module, params) in zip(adapters, self.adapters):
            factor = module.config.downscale_factor
            img = prepare_adapter_image(a.image, height, width, in_channels=adapter_in_channels(params, factor))
            out.append(_expand_per_prompt(img, batch, num_images_per_prompt, "adapter image"))
        return out

    def check_memory(self, batch: int, height: int, width: int, *, do_cfg: bool = True) -> None:
        """Refuse sizes whose activations cannot fit, before anything is allocated or compiled.

        A lower bound of the peak: the largest of the VAE decoder's full-resolution activation
        and the U-Net's first self-attention score tensor (batch x heads x L x L, L = latent
        pixels, doubled with CFG), against the device's memory (host RAM on the CPU)."""
        f = self.vae_scale_factor
        lat = (height // f) * (width // f)
        rows = batch * (2 if do_cfg else 1)
        vae_bytes = batch * height * width * max(self.vae.config.block_out_channels) * 4
        heads = max(self.unet.config.heads_per_block)
        attn_bytes = rows * heads * lat * lat * 4
        need = max(vae_bytes, attn_bytes)
        have = _device_memory_bytes(self.mesh.devices.flat[0])
        if have and need > have * self.mesh.devices.size:
            raise ConfigError(
                f"{batch} image(s) of {height}x{width} need at least {need / 2**30:.1f} GiB of activations "
                f"(one {'VAE decoder activation' if vae_bytes >= attn_bytes else 'attention score tensor'}); "
                f"the device has {have / 2**30:.1f} GiB. Use a smaller height/width or batch size")

    # ------------------------------------------------------------------ the program
    def compiled(self, settings: CallSettings) -> tuple[Callable, Plan]:
        """The jitted program for `settings` and its plan, compiled on first use and cached by
        `settings` (a frozen dataclass): calls that differ only in traced values reuse it."""
        if settings not in self._programs:
            plan = settings.plan(self.scheduler_config)
            inverse = None
            if settings.pix2pix_zero == "invert":
                inverse = make_plan(self.scheduler_config, settings.num_inference_steps, "ddim_inverse")
            program = functools.partial(_program, settings, plan, self._modules(), inverse_plan=inverse)
            out = named(self.mesh, P("data"))
            self._programs[settings] = (jax.jit(program, out_shardings=(out, out)), plan)
        return self._programs[settings]

    def lower(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
              **options) -> jax.stages.Lowered:
        """The program a call with these arguments would run, lowered for its sharded inputs;
        nothing runs. Takes `__call__`'s arguments; the batch is padded to the mesh as a call pads
        it. `.as_text()` is the StableHLO, `.compile().as_text()` the optimised per-device HLO
        (where the mesh's collectives show), `.compile().cost_analysis()` XLA's estimates.

        Raises `ConfigError` for invalid arguments, as `check_inputs` does."""
        settings, per_image, shared, indices = self.check_inputs(prompt, negative_prompt, **options)
        program, _ = self.compiled(settings)
        with tracing_mesh(self.mesh):
            return program.lower(self.params, self._shard(per_image, len(indices)), self._replicate(shared))

    def _modules(self) -> dict:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2,
                "controlnets": tuple(m for m, _ in self.controlnets), "adapters": tuple(m for m, _ in self.adapters)}

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        scheduler: str | None = None,
        scheduler_options: dict | None = None,
        seed: int = 0,
        num_images_per_prompt: int = 1,
        image_indices: Sequence[int] | None = None,
        controls: Sequence[ControlInput] = (),
        guess_mode: bool = False,
        adapters: Sequence[AdapterInput] = (),
        adapter_conditioning_factor: float = 1.0,
        init_image: Any = None,
        init_latents: Any = None,
        strength: float | None = None,
        mask: Any = None,
        masked_image_latents: Any = None,
        depth_map: Any = None,
        image_guidance_scale: float | None = None,
        inpaint_method: str = "partial",
        repaint_jump_length: int = 10,
        repaint_jump_n_sample: int = 10,
        clip_guidance: ClipGuidanceInput | None = None,
        sag_scale: float = 0.0,
        pag_scale: float = 0.0,
        pag_applied_layers: Sequence[str] = ("mid",),
        pag_adaptive_scale: float = 0.0,
        token_indices: Any = None,
        max_iter_to_alter: int = 25,
        thresholds: dict | None = None,
        scale_factor: float = 20.0,
        attn_res: tuple[int, int] = (16, 16),
        edit_source: Sequence[str] | None = None,
        edit_target: Sequence[str] | None = None,
        cross_attention_guidance_amount: float = 0.1,
        clip_skip: int | None = None,
        lora_scale: float = 1.0,
        latents: Any = None,
        output_type: str = "uint8",
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> np.ndarray:
        """Generate images. Returns uint8 (B, H, W, 3), float [0, 1] with `output_type="float"`,
        or the final latents with `output_type="latent"`.

        `init_image` (NHWC in [0, 1]) or `init_latents` selects img2img (SDEdit) at `strength`
        (default 0.8, and 1.0 when inpainting, as diffusers' pipelines default);
        with `mask` (1 = regenerate; image- or latent-sized) inpainting by partial diffusion
        (`inpaint_method="partial"`) or RePaint (`"repaint"`). `latents` replaces the initial
        noise (B, h, w, C) for exact reproduction of another implementation's run.

        Concatenation-conditioned U-Nets (`self.kind`, see `models.kinds`) take their extra input
        from the call: an inpainting model (9 channels) inpaints `init_image` under `mask` (the
        masked image is VAE-encoded in the program, or given as `masked_image_latents`, scaled,
        (B, h, w, 4)); a depth model (5) takes `depth_map` (any size, see
        `preprocess.prepare_depth_map`), from noise or from `init_image` at `strength`;
        InstructPix2Pix (8) edits `init_image` with the prompt as the instruction, guided by
        `guidance_scale` (text) and `image_guidance_scale` (default 1.5; both branches run when
        guidance_scale > 1 and image_guidance_scale >= 1, as in diffusers).

        Steering through the U-Net's attention (docs/GUIDANCE.md; names as diffusers' pipelines):
        `sag_scale` > 0 adds Self-Attention Guidance; `pag_scale` > 0 Perturbed-Attention Guidance
        in `pag_applied_layers` (diffusers' layer ids, e.g. "mid", "down_blocks.1"), lowered with
        the timestep by `pag_adaptive_scale`; both may be on together and with ControlNets and
        adapters. `token_indices` (positions in the tokenized prompt, one list for all prompts or
        one per prompt) turns on Attend-and-Excite (`max_iter_to_alter`, `thresholds`,
        `scale_factor`, `attn_res`). `edit_source` / `edit_target` (sentences describing the
        concept to replace and its replacement) turn on Pix2Pix-Zero with
        `cross_attention_guidance_amount`: the prompt is the caption; from `init_image` (or
        `init_latents`) the start is its regularised DDIM inversion, else the generated image is
        edited.

        SDXL models (a U-Net with `addition_embed_type="text_time"`; diffusers' names and
        defaults): `prompt_2` / `negative_prompt_2` go to the second text encoder (default: the
        prompt / negative prompt); without a negative prompt the negative embeddings are zeros
        when the model says `force_zeros_for_empty_prompt` (SDXL base does). The micro-conditioning
        `original_size`, `crops_coords_top_left`, `target_size` (the refiner's
        `aesthetic_score`) and their `negative_*` counterparts default to the image size and (0, 0).
        The base -> refiner hand-off: `denoising_end=f` with `output_type="latent"` stops after the
        first f of the schedule; the refiner called with those latents as `init_latents` and
        `denoising_start=f` runs the rest, without adding noise.

        Raises `ConfigError` for invalid arguments (naming the argument) and `NonFiniteError`
        when sampling or decoding produced NaN or infinity (naming solver, step and images).
        """
        options = locals()
        args = CallArguments(**{f.name: options[f.name] for f in dataclasses.fields(CallArguments)})
        settings, per_image, shared, indices = self.check_inputs(prompt, negative_prompt, args)
        b = len(indices)
        program, plan = self.compiled(settings)
        with tracing_mesh(self.mesh):
            out, bad = program(self.params, self._shard(per_image, b), self._replicate(shared))
        out, bad = self._gather(out)[:b], self._gather(bad)[:b]
        raise_if_nonfinite(bad, solver=plan.solver, count=plan.num_evals, image_indices=indices)
        if not np.all(np.isfinite(out)):
            which = [indices[i] for i in np.flatnonzero(~np.isfinite(out.reshape(b, -1)).all(axis=1))]
            raise NonFiniteError(
                f"the VAE decode produced NaN or infinite pixels for image index(es) {which} from finite "
                f"latents (VAE dtype {jnp.dtype(self.vae.dtype).name}; float16 VAEs overflow: use float32)")
        self.last_settings = self._resolved(settings, plan, indices, args)
        if args.output_type in ("latent", "float"):
            return out
        return np.round(out * 255.0).astype(np.uint8)

    def check_inputs(self, prompt, negative_prompt=None, args: CallArguments | None = None, **options):
        """Validate a call's arguments and split them into the `CallSettings` (static), the
        per-image inputs (leading batch axis, sharded over the mesh) and the shared inputs
        (replicated). Returns `(settings, per_image, shared, image_indices)`.

        The options come as `args` or as `__call__`'s keyword arguments. Raises `ConfigError`
        naming the argument for anything invalid, before any compilation."""
        if args is None:
            args = CallArguments.of(options)
        elif options:
            raise ConfigError(f"pass the options as `args` or as keywords, not both (got {sorted(options)})")
        check_call_arguments(args, clip_layers=self.max_clip_skip())
        self._check_xl_arguments(args)
        prompts, negatives = _prompt_batch(prompt, negative_prompt, args.num_images_per_prompt)
        b = len(prompts)
        height, width = self._image_size(args.height, args.width, args.init_latents)
        f = self.vae_scale_factor
        latent_shape = (height // f, width // f, self.latent_channels)
        self.check_memory(b, height, width, do_cfg=args.guidance_scale > 1.0)
        indices = _image_indices(args.image_indices, b)
        mode = self._check_kind(args, _mode(args.init_image, args.init_latents, args.mask, args.inpaint_method))
        pix2pix_zero = args.edit_source is not None or args.edit_target is not None
        if pix2pix_zero:
            if mode not in ("txt2img", "img2img"):
                raise ConfigError("Pix2Pix-Zero (edit_source / edit_target) edits a generated image or init_image / "
                                  "init_latents; it does not inpaint: drop `mask`")
            if args.strength is not None:
                raise ConfigError("strength does not apply to Pix2Pix-Zero: it inverts init_image all the way "
                                  "(diffusers' invert) or edits a generated image")
            mode = "pix2pix_zero"
        do_cfg = args.guidance_scale > 1.0
        if self.kind == "instruct_pix2pix":
            do_cfg = do_cfg and self._image_guidance_scale(args) >= 1.0
        if self.controlnets and not args.controls:
            raise ConfigError(f"{len(self.controlnets)} ControlNets are loaded: give a control image for each")
        if self.adapters and not args.adapters:
            raise ConfigError(f"{len(self.adapters)} adapters are loaded: give an adapter image for each")

        per_image: dict[str, Any] = {"index": np.asarray(indices, np.int32)}
        if self.xl:  # diffusers: prompt_2 defaults to prompt, negative_prompt_2 to negative_prompt
            n = len(prompts) // args.num_images_per_prompt
            prompts_2 = prompts if args.prompt_2 is None else _second_prompts(
                args.prompt_2, n, args.num_images_per_prompt, "prompt_2")
            negatives_2 = negatives if args.negative_prompt_2 is None else _second_prompts(
                args.negative_prompt_2, n, args.num_images_per_prompt, "negative_prompt_2")
            per_image.update(self.prompt_ids(prompts, "ids", prompts_2))
            per_image.update(self.prompt_ids(negatives, "neg_ids", negatives_2))
            per_image["time_ids"], per_image["neg_time_ids"] = self._time_ids(args, mode, height, width, b)
        else:
            per_image.update(self.prompt_ids(prompts, "ids"))
            per_image.update(self.prompt_ids(negatives, "neg_ids"))
        shared: dict[str, Any] = {"seed": np.asarray(jax.random.key_data(jax.random.key(args.seed))),
                                  "guidance_scale": np.float32(args.guidance_scale)}
        lora_scales = self._lora_scales(args.lora_scale)
        if lora_scales is not None:
            shared["lora_scales"] = lora_scales
        if args.latents is not None:
            noise = np.asarray(args.latents, np.float32)
            if noise.shape != (b,) + latent_shape:
                raise ConfigError(f"latents must have shape {(b,) + latent_shape}, got {noise.shape}")
            per_image["noise"] = noise
        size = (b, height, width)
        self._control_inputs(per_image, shared, args.controls, args.adapters, size, args.num_images_per_prompt)
        starts_from_input = args.init_image is not None or args.init_latents is not None
        if mode != "txt2img" and starts_from_input:
            per_image.update(self._edit_inputs(args.init_image, args.init_latents, args.mask, size, latent_shape,
                                               args.num_images_per_prompt))
        self._kind_inputs(per_image, shared, args, size, latent_shape)
        clip_key = None
        if args.clip_guidance is not None:
            clip_key = _clip_inputs(per_image, shared, args.clip_guidance, b)
        attention = self._attention_inputs(per_image, shared, args, b, mode, do_cfg, latent_shape)

        settings = CallSettings(
            num_inference_steps=int(args.num_inference_steps), latent_shape=latent_shape, solver=args.scheduler,
            scheduler_options=tuple(sorted((args.scheduler_options or {}).items())), mode=mode,
            strength=1.0 if args.denoising_start is not None else _strength(args.strength, mode),
            do_cfg=do_cfg, guidance_rescale=float(args.guidance_rescale),
            clip_skip=args.clip_skip,
            guess_mode=self._guess_mode(args.guess_mode),
            control_windows=tuple((float(ctl.start), float(ctl.end)) for ctl in args.controls),
            adapter_conditioning_factor=float(args.adapter_conditioning_factor),
            repaint_jump_length=int(args.repaint_jump_length),
            repaint_jump_n_sample=int(args.repaint_jump_n_sample),
            init_from=None if mode == "txt2img" or not starts_from_input else (
                "latents" if args.init_latents is not None else "images"),
            given_noise=args.latents is not None, clip_guide=clip_key, output_type=args.output_type,
            kind=self.kind, masked_from=None if self.kind != "inpaint" else (
                "latents" if args.masked_image_latents is not None else "images"),
            zero_negative=self.xl and negative_prompt is None and self.force_zeros_for_empty_prompt,
            denoising_start=None if args.denoising_start is None else float(args.denoising_start),
            denoising_end=None if args.denoising_end is None else float(args.denoising_end), **attention)
        return settings, per_image, shared, indices

    def max_clip_skip(self) -> int:
        """The largest `clip_skip`: the text encoder's depth (SD), one less for SDXL, whose
        embeddings already come from the penultimate layer of the shallower encoder."""
        if not self.xl:
            return self.text_encoder.config.num_hidden_layers
        return min(m.config.num_hidden_layers for m in (self.text_encoder, self.text_encoder_2) if m is not None) - 1

    def _check_xl_arguments(self, args: CallArguments) -> None:
        """SDXL-only arguments on an SD-1/2 pipeline, the micro-conditioning's types, and what the
        hand-off's fractions need besides (`check_call_arguments` checks their ranges):
        `ConfigError` naming the argument."""
        if not self.xl:
            given = list(given_xl_arguments(args))
            if given:
                raise ConfigError(f"{given} apply to SDXL models only (a U-Net with addition_embed_type='text_time'); "
                                  f"this U-Net has addition_embed_type={self.unet.config.addition_embed_type!r}")
        for name in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size"):
            value = getattr(args, name)
            if value is None:
                continue
            ok = isinstance(value, list | tuple) and len(value) == 2 and all(
                isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
                and np.isfinite(v) and v >= 0 for v in value)
            if not ok:
                raise ConfigError(f"{name} must be a (height, width) / (top, left) pair of numbers >= 0, got {value!r}")
        if args.denoising_start is not None and args.init_image is None and args.init_latents is None:
            raise ConfigError("denoising_start continues from given latents (the base model's output with "
                              "denoising_end, output_type='latent'): pass them as init_latents (or init_image)")
        if args.denoising_start is not None and args.denoising_end is not None \
                and float(args.denoising_end) <= float(args.denoising_start):
            raise ConfigError(f"denoising_end={args.denoising_end} must be greater than "
                              f"denoising_start={args.denoising_start}")
        if args.denoising_start is not None and args.strength is not None:
            raise ConfigError("strength does not apply with denoising_start: the start is the fraction itself "
                              "(diffusers ignores strength there)")

    def _time_ids(self, args: CallArguments, mode: str, height: int, width: int, b: int) -> tuple:
        """SDXL's micro-conditioning, (b, 6) (original size, crop top-left, target size) or, with
        `requires_aesthetics_score` (the refiner), (b, 5) (original size, crop, aesthetic score),
        for the prompt and for the negative branch, float32, by diffusers' rules: sizes default
        to (height, width); in text-to-image the negative ids are the positive ones unless both
        negative sizes are given; from an image (img2img, inpainting) each negative size defaults
        to the positive one."""
        size = (int(height), int(width))
        original = tuple(args.original_size or size)
        target = tuple(args.target_size or size)
        crop, neg_crop = tuple(args.crops_coords_top_left), tuple(args.negative_crops_coords_top_left)
        if self.requires_aesthetics_score:
            pos = original + crop + (float(args.aesthetic_score),)
            neg = tuple(args.negative_original_size or original) + neg_crop + (float(args.negative_aesthetic_score),)
        elif mode == "txt2img":
            pos = original + crop + target
            neg = pos
            if args.negative_original_size is not None and args.negative_target_size is not None:
                neg = tuple(args.negative_original_size) + neg_crop + tuple(args.negative_target_size)
        else:  # diffusers' img2img / inpainting pipelines pair the negative sizes with the positive crop
            pos = original + crop + target
            neg = tuple(args.negative_original_size or original) + crop + tuple(args.negative_target_size or target)
        return (np.tile(np.asarray(pos, np.float32), (b, 1)), np.tile(np.asarray(neg, np.float32), (b, 1)))

    def _attention_inputs(self, per_image: dict, shared: dict, args: CallArguments, b: int, mode: str,
                          do_cfg: bool, latent_shape: tuple) -> dict:
        """The attention techniques' settings (`CallSettings` fields) and traced inputs, each checked
        against this U-Net before anything compiles (`ConfigError` naming the argument)."""
        out: dict[str, Any] = {}
        h, w, _ = latent_shape
        sag, pag = args.sag_scale > 0, args.pag_scale > 0
        excite = args.token_indices is not None
        p2p = mode == "pix2pix_zero"
        used = [n for n, on in (("sag_scale", sag), ("pag_scale", pag), ("token_indices", excite),
                                ("edit_source/edit_target", p2p)) if on]
        if used and self.kind == "instruct_pix2pix":
            raise ConfigError(f"{', '.join(used)}: the attention techniques build on classifier-free guidance; "
                              "InstructPix2Pix's two-scale guidance does not take them")
        if used and mode == "repaint":
            raise ConfigError(f"{', '.join(used)} do not run inside RePaint's resampling walk: use "
                              "inpaint_method='partial'")
        if args.clip_guidance is not None and (excite or p2p):
            raise ConfigError("token_indices / edit_source move the latents inside the sampler; combine CLIP guidance "
                              "with sag_scale or pag_scale instead")
        if sag:
            G.SAG(0.0, None).capture(self.unet.config)  # a mid block with self-attention
            if min(h, w) <= 4:
                raise ConfigError(f"sag_scale: self-attention guidance blurs with a 9x9 kernel and needs latents larger "
                                  f"than 4x4, got {h}x{w}")
            out["sag"] = True
            shared["sag_scale"] = np.float32(args.sag_scale)
        if pag or tuple(args.pag_applied_layers) != ("mid",):  # layers given are checked even at scale 0
            layers = args.pag_applied_layers
            if isinstance(layers, str) or not layers or not all(isinstance(x, str) for x in layers):
                raise ConfigError(f"pag_applied_layers must be a list of layer ids (e.g. ['mid']), got {layers!r}")
            names = G.pag_layers(self.unet.config, list(layers))
            if pag:
                out["pag_layers"] = names
                out["pag_adaptive_scale"] = float(args.pag_adaptive_scale)
                shared["pag_scale"] = np.float32(args.pag_scale)
        if excite:
            if p2p:
                raise ConfigError("token_indices (Attend-and-Excite) and edit_source (Pix2Pix-Zero) both move the "
                                  "latents: use one of them")
            res = args.attn_res
            if (not isinstance(res, (tuple, list)) or len(res) != 2
                    or not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r > 1 for r in res)):
                raise ConfigError(f"attn_res must be two integers >= 2 (height, width; the maps are smoothed with a "
                                  f"3x3 kernel), got {res!r}")
            res = (int(res[0]), int(res[1]))
            sizes = sorted({layer.size(h, w) for layer in attention_layers(self.unet.config) if layer.cross})
            if res not in sizes:
                raise ConfigError(f"attn_res={res}: no cross-attention layer of this U-Net works at that size for "
                                  f"{h}x{w} latents; its cross-attention maps are {sizes}")
            thresholds = {0: 0.05, 10: 0.5, 20: 0.8} if args.thresholds is None else args.thresholds

            def real(v, integer=False):
                kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
                return isinstance(v, kinds) and not isinstance(v, (bool, np.bool_))

            if not isinstance(thresholds, dict) or not all(
                    real(k, True) and k >= 0 and real(v) and 0 <= v <= 1 for k, v in thresholds.items()):
                raise ConfigError(f"thresholds must map step indices (>= 0) to thresholds in [0, 1], got {thresholds!r}")
            per_image["excite"] = self._token_mask(args.token_indices, b, args.num_images_per_prompt)
            out["excite"] = (int(args.max_iter_to_alter), tuple(sorted((int(k), float(v)) for k, v in thresholds.items())),
                             float(args.scale_factor), res)
        if p2p:
            if not do_cfg:
                raise ConfigError("Pix2Pix-Zero needs classifier-free guidance: guidance_scale > 1")
            if self.kind != "text2image":
                raise ConfigError(f"Pix2Pix-Zero runs text-to-image U-Nets; this one's kind is {self.kind!r}")
            if sag or pag:
                raise ConfigError("sag_scale / pag_scale do not combine with Pix2Pix-Zero (its guidance is its own "
                                  "two-pass rule)")
            if args.guidance_rescale:
                raise ConfigError("guidance_rescale does not apply to Pix2Pix-Zero (diffusers' pipeline has none)")
            for name in ("edit_source", "edit_target"):
                sentences = getattr(args, name)
                if (sentences is None or isinstance(sentences, str) or not len(sentences)
                        or not all(isinstance(x, str) for x in sentences)):
                    raise ConfigError(f"{name} must be a non-empty list of sentences (Pix2Pix-Zero needs both "
                                      f"edit_source and edit_target), got {sentences!r}")
                shared.update(self.prompt_ids(list(sentences), f"{name}_ids"))
            shared["cross_attention_guidance_amount"] = np.float32(args.cross_attention_guidance_amount)
        return out

    def _token_mask(self, token_indices, b: int, n: int) -> np.ndarray:
        """Attend-and-Excite's (b, 77) subject-token mask: one list of indices for every prompt, or
        one per prompt (repeated for its `num_images_per_prompt` images)."""
        rows = list(token_indices) if isinstance(token_indices, (list, tuple)) else token_indices
        if not isinstance(rows, list) or not rows:
            raise ConfigError(f"token_indices must be a list of token positions (or one list per prompt), got "
                              f"{token_indices!r}")
        if not all(isinstance(i, (int, np.integer)) for i in rows):
            if len(rows) * n != b:
                raise ConfigError(f"token_indices has {len(rows)} lists for {b // n} prompts")
            rows = [r for r in rows for _ in range(n)]
        return G.token_mask(rows, b, (self.tokenizer or self.tokenizer_2).model_max_length)

    def _image_guidance_scale(self, args: CallArguments) -> float:
        return 1.5 if args.image_guidance_scale is None else float(args.image_guidance_scale)

    def _check_kind(self, args: CallArguments, mode: str) -> str:
        """The inputs a concatenation-conditioned U-Net needs, and only those (`ConfigError` naming
        the argument and the model's kind); returns the call's mode (InstructPix2Pix samples from
        noise: its `init_image` is the condition, not a start)."""
        kind = self.kind
        for name, wants in (("image_guidance_scale", "instruct_pix2pix"), ("depth_map", "depth"),
                            ("masked_image_latents", "inpaint")):
            if getattr(args, name) is not None and kind != wants:
                raise ConfigError(f"{name} is an input of {wants!r} models; this U-Net's kind is {kind!r} "
                                  f"(in_channels={self.unet.config.in_channels})")
        if kind == "inpaint":
            if args.mask is None or mode not in ("inpaint", "repaint"):
                raise ConfigError("an inpainting model (9 input channels) needs `mask` and `init_image` (or "
                                  "`init_latents` with `masked_image_latents`)")
            if mode == "repaint":
                raise ConfigError("inpaint_method='repaint' runs 4-channel models; an inpainting model (9 input "
                                  "channels) inpaints by itself: use inpaint_method='partial'")
            if args.init_image is None and args.masked_image_latents is None:
                raise ConfigError("an inpainting model needs the image to mask: give `init_image`, or "
                                  "`masked_image_latents` beside `init_latents`")
        elif kind == "depth":
            if args.depth_map is None:
                raise ConfigError("a depth model (5 input channels) needs `depth_map` (a depth map of any size)")
            if args.mask is not None:
                raise ConfigError("a depth model does not inpaint: `mask` works with 4- and 9-channel models")
        elif kind == "instruct_pix2pix":
            if args.init_image is None:
                raise ConfigError("an InstructPix2Pix model (8 input channels) needs the image to edit as "
                                  "`init_image`" + (" (not init_latents)" if args.init_latents is not None else ""))
            if args.init_latents is not None or args.mask is not None:
                raise ConfigError("an InstructPix2Pix model takes `init_image` alone: not `init_latents` or `mask`")
            if args.guidance_rescale:
                raise ConfigError("guidance_rescale is not defined for InstructPix2Pix's two-scale guidance")
            if args.strength is not None:
                raise ConfigError("strength does not apply to InstructPix2Pix: it samples from noise, with "
                                  "`init_image` as its condition (diffusers' pipeline has no strength either)")
            return "txt2img"
        return mode

    def _kind_inputs(self, per_image: dict, shared: dict, args: CallArguments, size: tuple[int, int, int],
                     latent_shape: tuple) -> None:
        """The per-image inputs of `prepare_concat` for this U-Net's kind."""
        b, height, width = size
        h, w, c = latent_shape
        n = args.num_images_per_prompt
        if self.kind == "inpaint":
            from .preprocess import prepare_mask

            # diffusers: binarised at the image size, the masked image from that, then nearest to latent size
            pixels = prepare_mask(args.mask, b, height, width, num_images_per_prompt=n)
            per_image["mask"] = prepare_mask(pixels, b, h, w)
            if args.masked_image_latents is not None:
                per_image["masked_image_latents"] = self._batch(
                    np.asarray(args.masked_image_latents, np.float32), b, latent_shape, "masked_image_latents")
            else:
                per_image["masked_images"] = per_image["init_images"] * (pixels < 0.5)
        elif self.kind == "depth":
            from .preprocess import prepare_depth_map

            per_image["depth"] = prepare_depth_map(args.depth_map, b, h, w, num_images_per_prompt=n)
        elif self.kind == "instruct_pix2pix":
            img = self._batch(_image01(args.init_image, "init_image"), b, (height, width, 3), "init_image")
            per_image["edit_images"] = img * 2.0 - 1.0
            shared["image_guidance_scale"] = np.float32(self._image_guidance_scale(args))

    def _image_size(self, height, width, init_latents=None) -> tuple[int, int]:
        """The call's pixel size: the size of `init_latents` (B, h, w, C) x the VAE factor when
        they are given (diffusers' img2img takes the size of its latents), else the U-Net's
        `sample_size` x the VAE factor, unless given."""
        f = self.vae_scale_factor
        sample_size = getattr(self.unet.config, "sample_size", 64) or 64
        shape = np.shape(init_latents) if init_latents is not None else ()
        if len(shape) in (3, 4):
            sample_h, sample_w = shape[-3:-1]
        else:
            sample_h = sample_w = sample_size
        height = height or sample_h * f
        width = width or sample_w * f
        if height % f or width % f:
            raise ConfigError(f"height and width must be multiples of {f}, got {height}x{width}")
        if height <= 0 or width <= 0:
            raise ConfigError(f"height and width must be positive, got {height}x{width}")
        return height, width

    def _guess_mode(self, guess_mode: bool) -> bool:
        """diffusers' ControlNet pipelines: guess_mode or <first ControlNet>.global_pool_conditions."""
        first = self.controlnets[0][0] if self.controlnets else None
        return bool(guess_mode) or bool(first is not None and getattr(first.config, "global_pool_conditions", False))

    def _control_inputs(self, per_image: dict, shared: dict, controls, adapters, size: tuple[int, int, int],
                        num_images_per_prompt: int) -> None:
        """ControlNet and adapter images (per image) and their scales (shared, traced)."""
        b, height, width = size
        if self.controlnets:
            per_image["controls"] = self.prepare_controls(controls, b, height, width, num_images_per_prompt)
            shared["control_scales"] = np.asarray([ctl.scale for ctl in controls], np.float32)
        if self.adapters:
            per_image["adapter_images"] = self.prepare_adapter_images(adapters, b, height, width,
                                                                      num_images_per_prompt)
            shared["adapter_scales"] = np.asarray([a.scale for a in adapters], np.float32)

    def _edit_inputs(self, init_image, init_latents, mask, size: tuple[int, int, int], latent_shape: tuple,
                     num_images_per_prompt: int) -> dict:
        """img2img and inpainting inputs: the clean latents or images to keep ([-1, 1] pixels) and
        the mask at latent size."""
        b, height, width = size
        h, w, _ = latent_shape
        out = {}
        if init_latents is not None:
            out["init_latents"] = self._batch(np.asarray(init_latents, np.float32), b, latent_shape, "init_latents")
        else:
            img = self._batch(_image01(init_image, "init_image"), b, (height, width, 3), "init_image")
            out["init_images"] = img * 2.0 - 1.0
        if mask is not None:
            from .preprocess import prepare_mask

            out["mask"] = prepare_mask(mask, b, h, w, num_images_per_prompt=num_images_per_prompt)
        return out

    def _resolved(self, settings: CallSettings, plan: Plan, indices, args: CallArguments) -> dict:
        """The settings a call actually ran with, JSON-able (what `infer.py`'s sidecars record)."""
        h, w, _ = settings.latent_shape
        f = self.vae_scale_factor
        return {
            "solver": plan.solver, "scheduler_config": _jsonable(dict(plan.config)),
            "prediction_type": plan.prediction_type, "num_inference_steps": settings.num_inference_steps,
            "model_evaluations": int(plan.num_evals), "timesteps": np.asarray(plan.timesteps).tolist(),
            # InstructPix2Pix samples from noise with the image as its condition: an edit, not txt2img
            "mode": "edit" if settings.kind == "instruct_pix2pix" else settings.mode, "strength": settings.strength, "guidance_scale": float(args.guidance_scale),
            "classifier_free_guidance": settings.do_cfg, "guidance_rescale": settings.guidance_rescale,
            "guess_mode": settings.guess_mode, "clip_skip": settings.clip_skip, "height": h * f, "width": w * f,
            "seed": int(args.seed), "image_indices": [int(i) for i in indices],
            "controlnets": [{"scale": float(ctl.scale), "start": float(ctl.start), "end": float(ctl.end),
                             "resize_mode": ctl.resize_mode} for ctl in args.controls],
            "adapters": [{"scale": float(a.scale)} for a in args.adapters],
            "adapter_conditioning_factor": settings.adapter_conditioning_factor,
            "scheduler_options": _jsonable(dict(settings.scheduler_options)),
            "inpaint_method": args.inpaint_method if settings.mode in ("inpaint", "repaint") else None,
            "repaint": {"jump_length": settings.repaint_jump_length, "jump_n_sample": settings.repaint_jump_n_sample}
            if settings.mode == "repaint" else None,
            "clip_guidance_scale": None if args.clip_guidance is None else float(args.clip_guidance.scale),
            "kind": settings.kind,
            "image_guidance_scale": self._image_guidance_scale(args) if settings.kind == "instruct_pix2pix" else None,
            "sag_scale": float(args.sag_scale) if settings.sag else None,
            "pag": {"scale": float(args.pag_scale), "applied_layers": list(args.pag_applied_layers),
                    "layers": list(settings.pag_layers), "adaptive_scale": settings.pag_adaptive_scale}
            if settings.pag_layers else None,
            "attend_and_excite": None if settings.excite is None else {
                "token_indices": _jsonable(args.token_indices), "max_iter_to_alter": settings.excite[0],
                "thresholds": {str(k): v for k, v in settings.excite[1]}, "scale_factor": settings.excite[2],
                "attn_res": list(settings.excite[3])},
            "pix2pix_zero": None if settings.pix2pix_zero is None else {
                "start": settings.pix2pix_zero, "edit_source": list(args.edit_source),
                "edit_target": list(args.edit_target),
                "cross_attention_guidance_amount": float(args.cross_attention_guidance_amount)},
            "loras": [{k: e[k] for k in ("name", "source", "format", "scale", "fused")} for e in self.loras],
            "lora_scale": float(args.lora_scale) if self._loras else None,
            "embeddings": self.embeddings or None,
            "sdxl": None if not self.xl else self._resolved_xl(settings, args),
            "denoising_start": settings.denoising_start, "denoising_end": settings.denoising_end,
            "dtype": jnp.dtype(self.unet.dtype).name, "vae_dtype": jnp.dtype(self.vae.dtype).name,
            "devices": int(self.mesh.devices.size),
        }

    def _resolved_xl(self, settings: CallSettings, args: CallArguments) -> dict:
        """The SDXL part of `_resolved`: the micro-conditioning the call ran with (as `check_inputs`
        computed it) and how its negative branch was made."""
        h, w, _ = settings.latent_shape
        f = self.vae_scale_factor
        pos, neg = self._time_ids(args, settings.mode, h * f, w * f, 1)
        return {"time_ids": [float(v) for v in pos[0]], "negative_time_ids": [float(v) for v in neg[0]],
                "zero_negative": settings.zero_negative, "requires_aesthetics_score": self.requires_aesthetics_score}

    # ------------------------------------------------------------------ sharding helpers
    @staticmethod
    def _batch(x: np.ndarray, b: int, shape: tuple, name: str) -> np.ndarray:
        if x.ndim == len(shape):
            x = x[None]
        if x.shape[0] == 1 and b > 1:
            x = np.repeat(x, b, axis=0)
        if x.shape != (b,) + tuple(shape):
            raise ConfigError(f"{name} must have shape {(b,) + tuple(shape)} (or one for all), got {x.shape}")
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            raise ConfigError(f"{name} holds NaN or infinite values")
        return x

    def _shard(self, per_image: dict, b: int) -> dict:
        """Per-image arrays (leading axis = the batch) onto the mesh's `data` axis, the batch padded
        to a multiple of its size with copies of the last image. Every host passes the same values
        (they derive from the call's arguments), and each device takes its slice, so this is
        multi-host safe."""
        n = self.mesh.devices.size
        pad = (-b) % n
        sharding = named(self.mesh, P("data"))

        def put(x):
            x = np.asarray(x)
            if x.shape[:1] != (b,):
                raise ConfigError(f"a per-image input of shape {x.shape} for a batch of {b}")
            if pad:
                x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
            return jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])

        return jax.tree_util.tree_map(put, per_image)

    def _replicate(self, shared: dict) -> dict:
        """Inputs every device sees whole (scales, the seed's key, CLIP-guidance parameters)."""
        replicated = named(self.mesh, P())
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda i, x=np.asarray(x): x[i]), shared)

    @staticmethod
    def _gather(x) -> np.ndarray:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
