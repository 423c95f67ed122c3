"""Read any checkpoint the converter accepts, detecting its format from its keys.

    ckpt = read_checkpoint("v1-5-pruned-emaonly.safetensors")      # lazy: nothing loaded yet
    ckpt.format, list(ckpt.components)                              # "ldm-sd1", ["unet", "vae", "text_encoder"]
    bundle = load_single_file("control_v11p_sd15_canny.pth")        # modules and params

Single files (`.safetensors`, `.ckpt`, `.pth`, `.pt`, `.bin`):

- LDM / CompVis Stable Diffusion 1.x and 2.x (`model.diffusion_model.*`, `first_stage_model.*`,
  `cond_stage_model.*`), split into `unet`, `vae` and `text_encoder`; nested `state_dict`s are
  unwrapped and EMA weights (`model_ema.*`) are used on request;
- ControlNet v1.0 (`control_sd15_*.pth`, a whole ControlLDM: `control_model.*` plus the SD
  components) and v1.1 (`control_v11*.pth`: `control_model.*` only, or no prefix);
- the original T2I-Adapters (full `Adapter` and `Adapter_light`), with or without `adapter.`;
- a standalone LDM VAE, and bare diffusers state dicts of the supported classes.

Folders: diffusers model folders, diffusers pipeline folders and our own format (`jaxcontrol.json`).

A single file is read in three steps: `checkpoint_file.open_single_file` (a lazy `TensorSource`;
pickles through torch's safe unpickler), `formats.detect_format` (the layout, from key names),
then one reader per network (`single_file_components`). This module puts them together and
applies the user's options (prediction type, config overrides, component selection).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax.numpy as jnp

from ..errors import CheckpointError, ConfigError
from ..tokenizer import load_tokenizer
from . import ldm
from .checkpoint_file import KNOWN_BOOKKEEPING_GLOBALS, load_pickle, open_single_file  # noqa: F401  (re-exported)
from .components import Checkpoint, Component, normalized_config
from .folders import read_diffusers_model, read_diffusers_pipeline
from .formats import (  # noqa: F401  (re-exported: this module's public names before formats.py existed)
    CONTROL_PREFIX,
    DEPTH_PREFIX,
    FORMATS,
    SD2_TEXT_PREFIX,
    SD_TEXT_PREFIX,
    SDXL_FORMATS,
    STABLE_DIFFUSION_FORMATS,
    UNET_PREFIX,
    VAE_PREFIX,
    detect_format,
    diffusers_class_of,
    has_prefix,
)
from .jax_format import read_jaxcontrol, recover_destination
from .model_types import MODEL_TYPES
from .paths import check_tree
from .pipeline_kind import check_kind_name, resolve_kind, width_kind
from .pipeline_index import PipelineBundle
from .single_file_components import (
    Part,
    adapter_from_t2i,
    clip_text_from_ldm,
    controlnet_from_ldm,
    from_diffusers_state_dict,
    openclip_text_from_ldm,
    sdxl_text_encoders,
    skipped_note,
    unet_from_ldm,
    vae_from_ldm,
)
from .sources import TensorSource

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --- single files ----------------------------------------------------------------------------------


def read_parts(fmt: str, source: TensorSource, origin: str, *, ema: bool | None = None,
               file_name: str = "") -> list[Part]:
    """The networks a single file of format `fmt` (from `detect_format`) holds, in diffusers' order.

    `ema` takes the U-Net from the file's EMA copy; `file_name` tells a shuffle ControlNet.
    Raises `CheckpointError` / `ConfigError` from the readers (unknown keys, missing EMA copy, ...).
    """
    keys = source.keys()
    if fmt in STABLE_DIFFUSION_FORMATS:
        parts = []
        if fmt == "controlnet-v1.0":  # a whole ControlLDM: the ControlNet beside the SD networks
            parts.append(controlnet_from_ldm(source, CONTROL_PREFIX, origin, file_name=file_name))
        parts.append(unet_from_ldm(source, UNET_PREFIX, origin, ema=ema))
        if has_prefix(keys, VAE_PREFIX):
            parts.append(vae_from_ldm(source, VAE_PREFIX, origin))
        if has_prefix(keys, SD_TEXT_PREFIX):
            parts.append(clip_text_from_ldm(source, origin))
        elif has_prefix(keys, SD2_TEXT_PREFIX):
            parts.append(openclip_text_from_ldm(source, origin))
        return parts
    if fmt in SDXL_FORMATS:
        parts = [unet_from_ldm(source, UNET_PREFIX, origin, ema=ema, xl=True)]
        if has_prefix(keys, VAE_PREFIX):
            parts.append(vae_from_ldm(source, VAE_PREFIX, origin))
        return parts + sdxl_text_encoders(source, origin, refiner=fmt == "ldm-sdxl-refiner")
    if fmt in ("controlnet-v1.1", "controlnet-bare"):
        prefix = CONTROL_PREFIX if fmt == "controlnet-v1.1" else ""
        return [controlnet_from_ldm(source, prefix, origin, file_name=file_name)]
    if fmt == "ldm-unet":
        return [unet_from_ldm(source, "", origin, ema=ema)]
    if fmt == "ldm-vae":
        return [vae_from_ldm(source, VAE_PREFIX if has_prefix(keys, VAE_PREFIX) else "", origin)]
    if fmt in ("t2i-adapter-full", "t2i-adapter-light"):
        return [adapter_from_t2i(source, origin, light=fmt == "t2i-adapter-light")]
    if fmt == "diffusers-state-dict":
        return [from_diffusers_state_dict(source)]
    raise ValueError(f"{origin}: {fmt!r} is not a single-file format")


def sd_prediction_type(sd2: bool, global_step: int | None) -> tuple[str, list[str]]:
    """The prediction type a Stable Diffusion file was trained for, when the user does not say, and a note.

    diffusers' rule (`single_file_utils`): SD-1.x is epsilon; SD-2.x is v-prediction except the
    512 base model, recognised by its `global_step` of 875000.
    """
    if not sd2:
        return "epsilon", []
    prediction_type = "epsilon" if global_step == 875000 else "v_prediction"
    return prediction_type, [
        f"prediction type {prediction_type} assumed for an SD-2.x file (the weights cannot tell; diffusers' rule: "
        f"epsilon only for global_step 875000, the 512 base); pass --prediction-type to be sure"]


def default_scheduler_config(fmt: str, prediction_type: str) -> dict:
    """The scheduler config diffusers ships with SD-1.5 (PNDM) and SD-2.x (DDIM), for `prediction_type`."""
    config = {
        "_class_name": "DDIMScheduler" if fmt == "ldm-sd2" else "PNDMScheduler",
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "trained_betas": None, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": prediction_type,
        "clip_sample": False, "timestep_spacing": "leading",
    }
    if fmt != "ldm-sd2":
        config["skip_prk_steps"] = True
    return config


def _complete_stable_diffusion(ckpt: Checkpoint, global_step: int | None, prediction_type: str | None,
                               kind: str | None = None) -> None:
    """SD-1 vs SD-2 (by cross-attention width), prediction type, 768-v sample sizes, pipeline and scheduler.

    The pipeline class set here is the text-to-image one; `pipeline_kind.resolve_kind` renames it
    by the U-Net's kind once the components are selected. SD-2's depth and inpainting models
    (`kind`, or the U-Net's width) predict epsilon, whatever their `global_step`.
    """
    comps = ckpt.components
    sd2 = ckpt.format == "ldm-sd2" or comps["unet"].config.get("cross_attention_dim") == 1024
    if sd2 and ckpt.format == "ldm-sd1":
        ckpt.format = "ldm-sd2"
    if kind is None:
        latent = comps["vae"].config.get("latent_channels", 4) if "vae" in comps else \
            comps["unet"].config.get("out_channels", 4)
        kind = width_kind(comps["unet"].config["in_channels"], latent)
    if prediction_type is None and sd2 and kind in ("depth", "inpaint"):
        prediction_type = "epsilon"
        ckpt.notes.append(f"prediction type epsilon assumed for an SD-2.x {kind} model (Stability AI's 512-depth "
                          f"and 512-inpainting models predict epsilon); pass --prediction-type to be sure")
    if prediction_type is None:
        prediction_type, notes = sd_prediction_type(sd2, global_step)
        ckpt.notes.extend(notes)
    ckpt.prediction_type = prediction_type
    if sd2 and prediction_type == "v_prediction":  # SD-2.x 768-v: 96x96 latents, 768x768 images
        comps["unet"].config["sample_size"] = 96
        if "vae" in comps:
            comps["vae"].config["sample_size"] = 768
    if len(comps) > 1:
        controlnet = "controlnet" in comps
        ckpt.pipeline_class = "StableDiffusionControlNetPipeline" if controlnet else "StableDiffusionPipeline"
        ckpt.scheduler_config = default_scheduler_config("ldm-sd2" if sd2 else "ldm-sd1", prediction_type)


def sdxl_scheduler_config() -> dict:
    """The scheduler config SDXL base 1.0 and its refiner ship with (Euler, "leading", epsilon)."""
    return {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None, "steps_offset": 1,
            "prediction_type": "epsilon", "timestep_spacing": "leading", "interpolation_type": "linear",
            "use_karras_sigmas": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
            "clip_sample": False}


def _complete_sdxl(ckpt: Checkpoint, prediction_type: str | None) -> None:
    """SDXL's pipeline class and settings (the base: text-to-image, zero negative embeddings for an
    empty negative prompt; the refiner: img2img with the aesthetic score), its VAE scaling factor
    (0.13025) and Euler scheduler, when the file holds a pipeline (more than the U-Net)."""
    comps = ckpt.components
    refiner = ckpt.format == "ldm-sdxl-refiner"
    ckpt.prediction_type = prediction_type or "epsilon"
    if "vae" in comps:
        comps["vae"].config.update(scaling_factor=0.13025, force_upcast=True, sample_size=1024)
    if len(comps) > 1:
        ckpt.pipeline_class = "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline"
        ckpt.options = {"force_zeros_for_empty_prompt": not refiner, "requires_aesthetics_score": refiner}
        ckpt.scheduler_config = {**sdxl_scheduler_config(), "prediction_type": ckpt.prediction_type}
        ckpt.notes.append("SDXL: VAE scaling_factor 0.13025 (force_upcast), Euler scheduler, "
                          + ("the refiner's aesthetic-score conditioning" if refiner else
                             "zero negative embeddings for an empty negative prompt (force_zeros_for_empty_prompt)")
                          + "; the tokenizers are not in the file: pass them (--tokenizer, tokenizer_2)")


def depth_estimator_note(keys: list[str]) -> tuple[frozenset[str], list[str]]:
    """The `depth_model.*` keys of an LDM depth file (SD-2's 512-depth-ema) and the note saying they are skipped.

    They hold the MiDaS DPT-Hybrid depth estimator the model was trained with, in MiDaS' own names:
    no diffusers `DPTForDepthEstimation` checkpoint, and no network jaxcontrol runs (its depth
    models take `depth_map` as an input). So they are accounted for, not converted.
    """
    depth = frozenset(k for k in keys if k.startswith(DEPTH_PREFIX))
    if not depth:
        return depth, []
    return depth, [f"{DEPTH_PREFIX}* ({len(depth)} tensors): the MiDaS depth estimator of an LDM depth model, not "
                   f"converted (MiDaS names, no diffusers DPTForDepthEstimation); the pipeline's depth_estimator and "
                   f"feature_extractor are left empty: give depth maps yourself (Pipeline depth_map=..., or "
                   f"diffusers' depth_map=)"]


def read_single_file(path: Path, source: TensorSource, facts: dict, *, ema: bool | None = None,
                     prediction_type: str | None = None, kind: str | None = None) -> Checkpoint:
    """A single file's `Checkpoint`: its format, one lazy component per network, and notes.

    `source` and `facts` are what `open_single_file(path)` returns. Keys no network accounts for
    (noise-schedule buffers, the VAE's training loss, ...) are summarised in a note; an LDM depth
    model's MiDaS estimator (`depth_model.*`) gets a note of its own. `kind` (a `models.kinds`
    kind or None) is the U-Net kind the user asked for; `read_checkpoint` checks it.
    """
    origin = str(path)
    fmt = detect_format(source.keys(), origin)
    parts = read_parts(fmt, source, origin, ema=ema, file_name=path.name)
    ckpt = Checkpoint(path, fmt, {p.component.name: p.component for p in parts}, prediction_type=prediction_type,
                      notes=[note for p in parts for note in p.notes])
    used = set().union(*(p.used for p in parts))
    if fmt in SDXL_FORMATS:
        _complete_sdxl(ckpt, prediction_type)
    if fmt in STABLE_DIFFUSION_FORMATS:
        _complete_stable_diffusion(ckpt, facts.get("global_step"), prediction_type, kind)
        depth, notes = depth_estimator_note(source.keys())
        used |= depth
        ckpt.notes.extend(notes)
    skipped = skipped_note(source.keys(), used)
    if skipped:
        ckpt.notes.append(skipped)
    if "global_step" in facts:
        ckpt.notes.append(f"global_step {facts['global_step']}")
    return ckpt


# --- any path --------------------------------------------------------------------------------------


def _read_folder(path: Path, unsafe_load_pickle: bool) -> Checkpoint:
    if (path / "jaxcontrol.json").is_file():
        return read_jaxcontrol(path)
    if (path / "model_index.json").is_file():
        return read_diffusers_pipeline(path, unsafe_load_pickle=unsafe_load_pickle)
    if (path / "config.json").is_file():
        return read_diffusers_model(path, unsafe_load_pickle=unsafe_load_pickle)
    raise CheckpointError(
        f"{path}: a folder, but not a diffusers model folder (config.json), a diffusers pipeline folder "
        f"(model_index.json) or a jaxcontrol checkpoint (jaxcontrol.json)")


def _read_path(path: Path, *, unsafe_load_pickle: bool, ema: bool | None, prediction_type: str | None,
               kind: str | None = None) -> Checkpoint:
    if path.is_dir():
        ckpt = _read_folder(path, unsafe_load_pickle)
        if ema:
            raise ConfigError(f"{path}: --ema applies to LDM single files; a {ckpt.description} has no EMA copy")
        return ckpt
    if path.is_file():
        source, facts = open_single_file(path, unsafe_load_pickle=unsafe_load_pickle)
        return read_single_file(path, source, facts, ema=ema, prediction_type=prediction_type, kind=kind)
    raise CheckpointError(f"{path}: no such file or folder")


# --- options ---------------------------------------------------------------------------------------


def _set_prediction_type(ckpt: Checkpoint, prediction_type: str) -> None:
    if ckpt.prediction_type not in (None, prediction_type):
        ckpt.notes.append(f"prediction type set to {prediction_type} (the checkpoint said {ckpt.prediction_type})")
    ckpt.prediction_type = prediction_type
    if ckpt.scheduler_config is not None:
        ckpt.scheduler_config = {**ckpt.scheduler_config, "prediction_type": prediction_type}


def _tokenizer_folder(tokenizer: str | os.PathLike) -> Path:
    tok = Path(tokenizer)
    if not tok.is_dir():
        raise CheckpointError(f"{tok}: not a tokenizer folder")
    check_tree(tok, f"tokenizer folder {tok}")
    return tok


def _check_names(ckpt: Checkpoint, overrides: Mapping | None, configs: Mapping | None) -> None:
    for kind, table in (("config", configs or {}), ("override", overrides or {})):
        for name in table:
            if name not in ckpt.components:
                raise ConfigError(
                    f"{ckpt.path}: {kind} given for component {name!r}, which this checkpoint does not have "
                    f"(it has {sorted(ckpt.components)})"
                )


def _select(ckpt: Checkpoint, components: Iterable[str] | None) -> None:
    if components is None:
        return
    wanted = list(components)
    missing = [c for c in wanted if c not in ckpt.components]
    if missing:
        raise ConfigError(f"{ckpt.path}: no component {missing} in this {ckpt.description} "
                          f"(it has {sorted(ckpt.components)})")
    ckpt.components = {k: v for k, v in ckpt.components.items() if k in wanted}
    if len(ckpt.components) < 2:
        ckpt.pipeline_class = None


def _replace_config(ckpt: Checkpoint, name: str, config: Mapping[str, Any]) -> None:
    comp = ckpt.components[name]
    new = {k: v for k, v in dict(config).items() if k not in ("architectures", "model_type")}
    new.setdefault("_class_name", comp.class_name)
    if new["_class_name"] != comp.class_name:
        raise ConfigError(f"{ckpt.path}: the config given for {name!r} is a {new['_class_name']}, but the "
                          f"checkpoint's {name} is a {comp.class_name}")
    comp.config = new
    ckpt.notes.append(f"{name}: config given by the user")


def _set_fields(ckpt: Checkpoint, name: str, fields: Mapping[str, Any]) -> None:
    comp = ckpt.components[name]
    known = {f.name for f in dataclasses.fields(MODEL_TYPES[comp.class_name].config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{name}: {comp.class_name} has no config field {unknown} (fields: {sorted(known)})")
    comp.config = {**comp.config, **fields}
    ckpt.notes.append(f"{name}: " + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + " set by the user")


def _validated(ckpt: Checkpoint, name: str, comp: Component) -> dict:
    unknown = {k: v for k, v in comp.config.items() if isinstance(v, ldm.Unknown)}
    if unknown:
        k, v = next(iter(unknown.items()))
        raise ConfigError(f"{ckpt.path} [{name}]: {v.reason}; give it with --set {name}.{k}=N "
                          f"(overrides={{{name!r}: {{{k!r}: N}}}})")
    return normalized_config(comp.config, f"{ckpt.path} [{name}]")


def _apply_overrides(ckpt: Checkpoint, overrides: Mapping[str, Mapping[str, Any]] | None,
                     configs: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Replace inferred configs (`configs`) and set single fields (`overrides`), then validate every config.

    Entries for components not selected are ignored (`_check_names` has checked they exist).
    """
    for name, config in (configs or {}).items():
        if name in ckpt.components:
            _replace_config(ckpt, name, config)
    for name, fields in (overrides or {}).items():
        if name in ckpt.components:
            _set_fields(ckpt, name, fields)
    for name, comp in ckpt.components.items():
        comp.config = _validated(ckpt, name, comp)


def read_checkpoint(
    path: str | os.PathLike,
    *,
    unsafe_load_pickle: bool = False,
    ema: bool | None = None,
    prediction_type: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    components: Iterable[str] | None = None,
    tokenizer: str | os.PathLike | None = None,
    kind: str | None = None,
    tokenizer_2: str | os.PathLike | None = None,
) -> Checkpoint:
    """Open `path` (a single file or a folder), detect its format and describe its components, lazily.

    Args:
      unsafe_load_pickle: let a pickle build arbitrary objects (runs the file's code). Trusted files only.
      ema: use the EMA weights of an LDM file (`model_ema.*`); None/False take the regular weights.
      prediction_type: "epsilon", "v_prediction" or "sample"; the weights cannot tell (SD-2 768 is v).
      overrides: `{component: {config field: value}}` for what the weights do not record (e.g. head counts).
      configs: `{component: config dict}` replacing the inferred config (shapes are still checked).
      components: keep only these components.
      tokenizer: a tokenizer folder to carry along (single files hold none).
      tokenizer_2: SDXL's second tokenizer folder (OpenCLIP bigG's; single files hold none).
      kind: the U-Net's kind ("text2image", "inpaint", "depth", "instruct_pix2pix"; None or "auto":
        from the width of its first convolution, `pipeline_kind.resolve_kind`). A kind the width
        contradicts is refused; the pipeline class written names the kind (StableDiffusionInpaintPipeline, ...).

    Raises `CheckpointError` for unreadable or unknown files and `ConfigError` for options that do
    not fit the checkpoint (unknown component or field, a config value the weights leave open).
    """
    path = Path(path)
    if not os.path.lexists(path):
        recover_destination(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    kind = check_kind_name(kind)
    ckpt = _read_path(path, unsafe_load_pickle=unsafe_load_pickle, ema=ema, prediction_type=prediction_type,
                      kind=kind)
    if prediction_type is not None:
        _set_prediction_type(ckpt, prediction_type)
    if tokenizer is not None:
        ckpt.tokenizers["tokenizer"] = _tokenizer_folder(tokenizer)
    if tokenizer_2 is not None:
        ckpt.tokenizers["tokenizer_2"] = _tokenizer_folder(tokenizer_2)
    _check_names(ckpt, overrides, configs)
    _select(ckpt, components)
    _apply_overrides(ckpt, overrides, configs)
    resolve_kind(ckpt, kind)
    # a tokenizer travels with its text encoder ("tokenizer" with "text_encoder", "tokenizer_2" with "text_encoder_2")
    ckpt.tokenizers = {k: v for k, v in ckpt.tokenizers.items() if "text_encoder" + k[len("tokenizer"):]
                       in ckpt.components}
    missing = [t for t in ("tokenizer", "tokenizer_2") if "text_encoder" + t[len("tokenizer"):] in ckpt.components
               and t not in ckpt.tokenizers]
    if missing and ckpt.pipeline_class:
        flags = " and ".join(f"--{t.replace('_', '-')}" for t in missing)
        ckpt.notes.append(f"no {' / '.join(missing)} in this checkpoint: pass the folder ({flags}) to make the "
                          f"converted pipeline usable for text-to-image")
    return ckpt


# --- loading ---------------------------------------------------------------------------------------


def load_single_file(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str = "auto",
    component_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    **read_options: Any,
) -> PipelineBundle:
    """Read any supported checkpoint (see `read_checkpoint` for the options) into a `PipelineBundle`.

    `bundle.modules[name]` / `bundle.params[name]` per component; `bundle.configs` holds the
    inferred configs and, for Stable Diffusion files, a scheduler config with the prediction type.
    `component_kwargs` overrides `dtype` / `param_dtype` / `attention_impl` per component.
    """
    ckpt = read_checkpoint(path, **read_options)
    modules, params, configs = {}, {}, {}
    for name, comp in ckpt.components.items():
        kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
        kw.update((component_kwargs or {}).get(name, {}))
        module = comp.build(**kw)
        params[name] = comp.load_params(module, param_dtype=kw["param_dtype"])
        modules[name] = module
        configs[name] = comp.config
    if ckpt.scheduler_config is not None:
        configs["scheduler"] = ckpt.scheduler_config
    tokenizers = {k: load_tokenizer(v) for k, v in ckpt.tokenizers.items()}
    return PipelineBundle(ckpt.path, ckpt.pipeline_class or "", modules, params, configs, tokenizers,
                          options=dict(ckpt.options))
