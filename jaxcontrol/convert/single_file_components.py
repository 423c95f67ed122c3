"""One reader per network of a single-file checkpoint: original names -> a lazy diffusers-named `Component`.

    part = unet_from_ldm(source, UNET_PREFIX, "sd15.ckpt", ema=False)
    part.component.config, part.component.source      # inferred UNet2DConditionModel config, renamed view
    part.used, part.notes                               # the file's keys it accounts for, summary lines

Every reader is a plain function of (the file's `TensorSource`, where the network sits in it,
options) and returns a `Part`. Nothing is loaded: keys are renamed by `ldm.py` into a lazy view
(`ldm.derive`) and the config is inferred from shapes (`ldm.infer_*_config`), as diffusers'
`single_file_utils.convert_ldm_*_checkpoint` / `create_*_diffusers_config` do eagerly.
"""

from __future__ import annotations

import dataclasses
import re

from ..errors import CheckpointError
from ..models.clip import normalize_clip_keys
from . import ldm
from .components import Component
from .formats import (
    EMA_PREFIX,
    SD2_TEXT_PREFIX,
    SD_TEXT_PREFIX,
    SDXL_REFINER_TEXT_PREFIX,
    SDXL_TEXT2_PREFIX,
    SDXL_TEXT_PREFIX,
    adapter_prefix,
    diffusers_class_of,
)
from .model_types import MODEL_TYPES, vae_legacy_names
from .sources import TensorSource

# a file with more EMA tensors than this holds a whole EMA copy of the U-Net (LDM's `LitEma`)
_MIN_EMA_TENSORS = 100
_CLIP_IGNORE = (r"position_ids$",)

# LDM `DDPM` buffers: the noise schedule, derived from betas, not weights of any network
_SCHEDULE_BUFFERS = re.compile(
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$"
)

_DIFFUSERS_NAMES = {"UNet2DConditionModel": "unet", "ControlNetModel": "controlnet", "AutoencoderKL": "vae",
                    "T2IAdapter": "adapter", "CLIPTextModel": "text_encoder"}


@dataclasses.dataclass(frozen=True)
class Part:
    """A network read out of a single file: the component, the file keys it accounts for, summary notes."""

    component: Component
    used: frozenset[str]
    notes: tuple[str, ...] = ()


def keys_under(source: TensorSource, prefix: str) -> list[str]:
    """The keys of `source` that start with `prefix`, without it, in file order."""
    return [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]


def _renamed(source: TensorSource, prefix: str, mapping: dict[str, str], origin: str) -> TensorSource:
    """`ldm.derive` of a plain renaming `{key under prefix: diffusers key}`."""
    return ldm.derive(source, {new: (prefix + old, None, None) for old, new in mapping.items()}, origin)


def _ema_source(source: TensorSource, mapping: dict[str, str], ema_keys: list[str], origin: str) -> TensorSource:
    """The U-Net's EMA copy: `model_ema.<"diffusion_model." + key without dots>` (LDM's `LitEma` names)."""
    if len(ema_keys) <= _MIN_EMA_TENSORS:
        raise CheckpointError(f"{origin}: EMA weights requested but the file holds none "
                                  f"({len(ema_keys)} model_ema.* keys)")
    spec, missing = {}, []
    for old, new in mapping.items():
        flat = EMA_PREFIX + ("diffusion_model." + old).replace(".", "")
        if flat in source:
            spec[new] = (flat, None, None)
        else:
            missing.append(flat)
    if missing:
        raise CheckpointError(f"{origin}: EMA copy incomplete: no {missing[:5]} ({len(missing)} missing)")
    return ldm.derive(source, spec, f"{origin} [unet]")


def unet_from_ldm(source: TensorSource, prefix: str, origin: str, *, ema: bool | None = False,
                  xl: bool = False) -> Part:
    """An LDM `openaimodel.UNetModel` under `prefix` as a diffusers `UNet2DConditionModel` named "unet".

    With `ema`, the weights are the file's EMA copy (`model_ema.*`; `CheckpointError` if it has
    none or only part of one); without, a note says when the file holds one. The EMA keys are
    accounted for either way. Unknown keys under `prefix` raise `CheckpointError` naming them.
    `xl`: SDXL's U-Net (its `label_emb` is the text_time embedding).
    """
    inner = keys_under(source, prefix)
    mapping = ldm.ldm_unet_to_diffusers(inner, f"{origin} [{prefix}*]", xl=xl)
    ema_keys = [k for k in source.keys() if k.startswith(EMA_PREFIX)]
    notes = []
    if ema:
        sub = _ema_source(source, mapping, ema_keys, origin)
        notes.append(f"unet: EMA weights ({len(sub)} tensors from model_ema.*)")
    else:
        sub = _renamed(source, prefix, mapping, f"{origin} [unet]")
        if len(ema_keys) > _MIN_EMA_TENSORS:
            notes.append(f"unet: the file also holds EMA weights ({len(ema_keys)} model_ema.* tensors), not "
                         f"used; pass --ema for them")
    config, inferred = ldm.infer_unet_config(sub)
    used = frozenset(prefix + k for k in inner) | frozenset(ema_keys)
    return Part(Component("unet", config, sub), used, tuple(notes + inferred))


def controlnet_from_ldm(source: TensorSource, prefix: str, origin: str, *, file_name: str = "") -> Part:
    """A lllyasviel `cldm.ControlNet` under `prefix` ("" for none) as a diffusers `ControlNetModel`.

    Shapes do not record shuffle's global average pooling, so a `file_name` containing "shuffle"
    sets `global_pool_conditions=True` (diffusers' `from_single_file` leaves it to the user).
    """
    inner = keys_under(source, prefix)
    mapping = ldm.ldm_unet_to_diffusers(inner, f"{origin} [{prefix or 'no prefix'}]", controlnet=True)
    sub = _renamed(source, prefix, mapping, f"{origin} [controlnet]")
    config, notes = ldm.infer_unet_config(sub, controlnet=True)
    if "shuffle" in file_name.lower():
        config["global_pool_conditions"] = True
        notes.append("controlnet: global_pool_conditions=True from the file name (shuffle's "
                     "global_average_pooling); override with --set controlnet.global_pool_conditions=false")
    return Part(Component("controlnet", config, sub), frozenset(prefix + k for k in inner), tuple(notes))


def vae_from_ldm(source: TensorSource, prefix: str, origin: str) -> Part:
    """An LDM `autoencoder.AutoencoderKL` under `prefix` as a diffusers `AutoencoderKL` named "vae".

    The training loss (`loss.*`, LPIPS and discriminator) is no part of it and stays unaccounted for.
    """
    inner = [k for k in keys_under(source, prefix) if not k.startswith("loss.")]
    spec = ldm.ldm_vae_to_diffusers(source.renamed({prefix + k: k for k in inner}), inner,
                                    f"{origin} [{prefix or 'VAE'}]")
    sub = ldm.derive(source, {new: (prefix + old, shape, fn) for new, (old, shape, fn) in spec.items()},
                     f"{origin} [vae]")
    config, notes = ldm.infer_vae_config(sub)
    return Part(Component("vae", config, sub), frozenset(prefix + k for k in inner), tuple(notes))


def clip_text_from_ldm(source: TensorSource, origin: str, prefix: str = SD_TEXT_PREFIX) -> Part:
    """A CLIP ViT-L text encoder in transformers names under `prefix` (SD-1.x's `FrozenCLIPEmbedder`
    at `cond_stage_model.transformer.`, SDXL base's first encoder), quick_gelu, as "text_encoder"."""
    inner = keys_under(source, prefix)
    sub = normalize_clip_keys(source.renamed({prefix + k: k for k in inner}, f"{origin} [text_encoder]"))
    config, notes = ldm.infer_clip_text_config(sub, hidden_act="quick_gelu")
    used = frozenset(prefix + k for k in inner)
    return Part(Component("text_encoder", config, sub, ignore=_CLIP_IGNORE), used, tuple(notes))


def openclip_text_from_ldm(source: TensorSource, origin: str, prefix: str = SD2_TEXT_PREFIX, *,
                           sdxl: bool = False) -> Part:
    """An OpenCLIP text tower under `prefix`, gelu: SD-2.x's `FrozenOpenCLIPEmbedder`
    (`cond_stage_model.model.`) as a "text_encoder" `CLIPTextModel` one layer short; with `sdxl`,
    SDXL's bigG with every layer and its projection as a "text_encoder_2"
    `CLIPTextModelWithProjection` (see `ldm.openclip_text_to_diffusers`)."""
    name = "text_encoder_2" if sdxl else "text_encoder"
    inner = keys_under(source, prefix)
    spec, notes = ldm.openclip_text_to_diffusers(source.renamed({prefix + k: k for k in inner}), inner,
                                                 f"{origin} [{prefix}*]", sdxl=sdxl)
    sub = ldm.derive(source, {new: (prefix + old, s, fn) for new, (old, s, fn) in spec.items()},
                     f"{origin} [{name}]")
    config, inferred = ldm.infer_clip_text_config(sub, hidden_act="gelu")
    if sdxl:
        config["_class_name"] = "CLIPTextModelWithProjection"
        inferred = [n.replace("text encoder:", "text_encoder_2:") for n in inferred]
    used = frozenset(prefix + k for k in inner)
    return Part(Component(name, config, sub, ignore=_CLIP_IGNORE), used, tuple(notes + inferred))


def sdxl_text_encoders(source: TensorSource, origin: str, *, refiner: bool) -> list[Part]:
    """SDXL's text encoders: the base's CLIP ViT-L (`conditioner.embedders.0.transformer.`) as
    "text_encoder" and OpenCLIP bigG (`conditioner.embedders.1.model.`) as "text_encoder_2"; the
    refiner has bigG alone (`conditioner.embedders.0.model.`)."""
    if refiner:
        return [openclip_text_from_ldm(source, origin, SDXL_REFINER_TEXT_PREFIX, sdxl=True)]
    return [clip_text_from_ldm(source, origin, SDXL_TEXT_PREFIX),
            openclip_text_from_ldm(source, origin, SDXL_TEXT2_PREFIX, sdxl=True)]


def adapter_from_t2i(source: TensorSource, origin: str, *, light: bool) -> Part:
    """A TencentARC `Adapter` (or `Adapter_light`), with or without `adapter.`, as a diffusers `T2IAdapter`."""
    prefix = adapter_prefix(source.keys())
    inner = keys_under(source, prefix)
    to_diffusers = ldm.t2i_light_to_diffusers if light else ldm.t2i_full_to_diffusers
    mapping, config, notes = to_diffusers(source.renamed({prefix + k: k for k in inner}), inner, origin)
    sub = _renamed(source, prefix, mapping, f"{origin} [adapter]")
    return Part(Component("adapter", config, sub), frozenset(prefix + k for k in inner), tuple(notes))


def from_diffusers_state_dict(source: TensorSource) -> Part:
    """A state dict already in diffusers / transformers names, without its config (inferred from shapes).

    The class comes from marker keys (`formats.diffusers_class_of`); a CLIP text encoder is
    assumed to be CLIP-L (quick_gelu), which a note says.
    """
    cls = diffusers_class_of(set(source.keys()))
    notes: list[str] = []
    sub = source
    if cls == "CLIPTextModel":
        sub = normalize_clip_keys(source)
        config, inferred = ldm.infer_clip_text_config(sub, hidden_act="quick_gelu")
        notes.append("text encoder: hidden_act quick_gelu assumed (CLIP-L); OpenCLIP needs "
                     "--set text_encoder.hidden_act=gelu")
    elif cls == "AutoencoderKL":
        sub = vae_legacy_names(source)
        config, inferred = ldm.infer_vae_config(sub)
    elif cls == "T2IAdapter":
        config, inferred = ldm.infer_adapter_config(sub)
    else:
        config, inferred = ldm.infer_unet_config(sub, controlnet=cls == "ControlNetModel")
    name = _DIFFUSERS_NAMES[cls]
    component = Component(name, config, sub, ignore=MODEL_TYPES[cls].ignore)
    return Part(component, frozenset(source.keys()), tuple(notes + inferred))


def skipped_note(keys: list[str], used: set[str]) -> str | None:
    """The summary line for the file's keys no component accounts for (grouped), or None if there are none."""
    left = [k for k in keys if k not in used]
    if not left:
        return None
    schedule = [k for k in left if _SCHEDULE_BUFFERS.match(k)]
    other = [k for k in left if not _SCHEDULE_BUFFERS.match(k)]
    parts = []
    if schedule:
        parts.append(f"{len(schedule)} noise-schedule buffers")
    if other:
        groups: dict[str, int] = {}
        for k in other:
            head = k.split(".")
            group = ".".join(head[:2]) if head[0] in ("first_stage_model", "cond_stage_model") else head[0]
            groups[group] = groups.get(group, 0) + 1
        parts.append(", ".join(f"{n} {g}.*" for g, n in sorted(groups.items())))
    return "not part of any component, skipped: " + "; ".join(parts)
