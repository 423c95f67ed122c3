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

Pickles are opened with torch's `weights_only` unpickler (memory-mapped where the file allows),
so a crafted file cannot run code. Training bookkeeping objects known to appear in Stable
Diffusion checkpoints (PyTorch Lightning's `ModelCheckpoint` callback) are replaced by inert
placeholders; anything else is refused unless `unsafe_load_pickle=True`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax.numpy as jnp

from ..errors import CheckpointError, ConfigError
from ..models.clip import normalize_clip_keys
from . import ldm
from .components import Checkpoint, Component, check_class, normalized_config
from .diffusers_folder import MODEL_TYPES, find_weights, read_config, vae_legacy_names
from .jax_format import recover_destination
from .paths import check_tree, regular_file
from .sources import PICKLE_SUFFIXES, TensorSource, open_safetensors, open_weights, source_from_state_dict

FORMATS = {
    "ldm-sd1": "LDM single file, Stable Diffusion 1.x",
    "ldm-sd2": "LDM single file, Stable Diffusion 2.x",
    "ldm-unet": "LDM U-Net state dict",
    "ldm-vae": "LDM VAE state dict",
    "controlnet-v1.0": "ControlNet v1.0 (whole ControlLDM)",
    "controlnet-v1.1": "ControlNet v1.1 (control_model.* only)",
    "controlnet-bare": "ControlNet, original names without prefix",
    "t2i-adapter-full": "T2I-Adapter original (full)",
    "t2i-adapter-light": "T2I-Adapter original (light)",
    "diffusers-state-dict": "diffusers state dict without config",
    "diffusers-model": "diffusers model folder",
    "diffusers-pipeline": "diffusers pipeline folder",
    "jaxcontrol": "jaxcontrol checkpoint (Orbax)",
}

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# objects PyTorch Lightning pickles next to the weights of Stable Diffusion checkpoints
# (torch's safe loader refuses them: diffusers#8874); loaded as inert placeholders
KNOWN_BOOKKEEPING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)

# LDM `DDPM` buffers: the noise schedule, derived from betas, not weights of any network
_SCHEDULE_BUFFERS = re.compile(
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$"
)
_CLIP_IGNORE = (r"position_ids$",)

SD_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROL_PREFIX = "control_model."


# --- pickles ------------------------------------------------------------------------------------


class _Inert:
    """Stands in for a pickled bookkeeping object: accepts any arguments and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _inert_globals(names: Iterable[str]) -> list:
    return [(type(name.rpartition(".")[2], (_Inert,), {"__module__": __name__}), name) for name in names]


def load_pickle(path: str | os.PathLike, *, unsafe_load_pickle: bool = False) -> Any:
    """`torch.load` of a checkpoint, safely unless `unsafe_load_pickle`; memory-mapped for zip-format files."""
    from .sources import _torch

    torch = _torch()
    path = Path(path)
    mmap = zipfile.is_zipfile(path)
    safe = not unsafe_load_pickle
    ctx = (torch.serialization.safe_globals(_inert_globals(KNOWN_BOOKKEEPING_GLOBALS)) if safe
           else contextlib.nullcontext())
    try:
        with ctx:
            return torch.load(path, map_location="cpu", weights_only=safe, mmap=mmap)
    except Exception as e:
        text = str(e)
        if safe and ("Weights only load failed" in text or "weights_only" in text or "GLOBAL" in text):
            try:
                found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                         if g not in KNOWN_BOOKKEEPING_GLOBALS]
            except Exception:  # the scan is advisory only
                found = []
            what = f" ({', '.join(found[:8])})" if found else ""
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers"
                f"{what}, which torch's safe loader will not build; a crafted pickle runs code when loaded. "
                f"If you trust this file, pass unsafe_load_pickle=True (--unsafe-load-pickle): that runs whatever "
                f"code the file contains with your permissions. Converting a trusted file once to .safetensors "
                f"avoids the question afterwards."
            ) from None
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint: {text.splitlines()[0] if text else e!r}") from e


def open_single_file(path: str | os.PathLike, *, unsafe_load_pickle: bool = False) -> tuple[TensorSource, dict]:
    """A lazy source over a single-file checkpoint's tensors, and container facts (`global_step`).

    Nested `{"state_dict": {...}}` containers are unwrapped; non-tensor entries are skipped.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such file")
    regular_file(path)  # a FIFO would block open() forever
    facts: dict = {}
    if path.name.endswith(".safetensors"):
        source = open_safetensors(path)
        if not len(source):
            raise CheckpointError(f"{path}: the file holds no tensors")
        return source, facts
    if not path.name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: unknown checkpoint format (expected .safetensors, .ckpt, .pth, .pt or .bin, or a folder)")
    obj = load_pickle(path, unsafe_load_pickle=unsafe_load_pickle)
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        if isinstance(obj.get("global_step"), int):
            facts["global_step"] = obj["global_step"]
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    source = source_from_state_dict(obj, str(path))
    if not len(source):
        raise CheckpointError(f"{path}: the file holds no tensors (top-level entries: {list(obj)[:10]})")
    return source, facts


# --- format detection -----------------------------------------------------------------------------


def _has(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_format(keys: Iterable[str], origin: str = "checkpoint") -> str:
    """The format of a single-file checkpoint, from its key names alone (see `FORMATS`)."""
    keys = list(keys)
    ks = set(keys)
    if _has(keys, "conditioner.embedders.") or _has(keys, UNET_PREFIX + "label_emb."):
        raise ConfigError(
            f"{origin}: this is an SDXL (or other class-conditioned) checkpoint; jaxcontrol converts SD-1.x / SD-2.x "
            f"U-Nets, their ControlNets and T2I-Adapters"
        )
    if _has(keys, UNET_PREFIX):
        if _has(keys, CONTROL_PREFIX):
            return "controlnet-v1.0"
        # refined by the U-Net's cross-attention width once shapes are read (read_single_file)
        return "ldm-sd2" if _has(keys, SD2_TEXT_PREFIX + "transformer.") else "ldm-sd1"
    if _has(keys, CONTROL_PREFIX):
        return "controlnet-v1.1"
    if "time_embed.0.weight" in ks and "input_hint_block.0.weight" in ks:
        return "controlnet-bare"
    if "time_embed.0.weight" in ks and "out.2.weight" in ks:
        return "ldm-unet"
    bare = [k.removeprefix("adapter.") for k in keys] if all(k.startswith("adapter.") for k in keys) else keys
    if "conv_in.weight" in bare and "body.0.block1.weight" in bare:
        return "t2i-adapter-full"
    if "body.0.in_conv.weight" in bare and "body.0.body.0.block1.weight" in bare:
        return "t2i-adapter-light"
    if "encoder.down.0.block.0.conv1.weight" in ks or "first_stage_model.encoder.conv_in.weight" in ks:
        return "ldm-vae"
    if diffusers_class_of(ks) is not None:
        return "diffusers-state-dict"
    shown = ", ".join(sorted(keys)[:12])
    raise CheckpointError(
        f"{origin}: unknown checkpoint format: its keys match no supported layout (LDM Stable Diffusion 1.x/2.x, "
        f"ControlNet v1.0/v1.1, T2I-Adapter full/light, diffusers). {len(keys)} keys, e.g. {shown}"
    )


def diffusers_class_of(keys: set[str]) -> str | None:
    """The diffusers class of a state dict already in diffusers naming, or None."""
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "ControlNetModel"
    if "time_embedding.linear_1.weight" in keys and "conv_out.weight" in keys:
        return "UNet2DConditionModel"
    if "encoder.conv_in.weight" in keys and "decoder.conv_out.weight" in keys:
        return "AutoencoderKL"
    if any(k.startswith("adapter.body.0.") for k in keys):
        return "T2IAdapter"
    if "text_model.embeddings.token_embedding.weight" in keys or "embeddings.token_embedding.weight" in keys:
        return "CLIPTextModel"
    return None


# --- options -------------------------------------------------------------------------------------


def _apply_overrides(ckpt: Checkpoint, overrides: Mapping[str, Mapping[str, Any]] | None,
                     configs: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Replace inferred configs (`configs`) and set single fields (`overrides`), then validate every config.

    Entries for components not selected are ignored (`_check_names` has checked they exist).
    """
    for name, config in (configs or {}).items():
        if name not in ckpt.components:
            continue
        comp = ckpt.components[name]
        new = {k: v for k, v in dict(config).items() if k not in ("architectures", "model_type")}
        new.setdefault("_class_name", comp.class_name)
        if new["_class_name"] != comp.class_name:
            raise ConfigError(f"{ckpt.path}: the config given for {name!r} is a {new['_class_name']}, but the "
                              f"checkpoint's {name} is a {comp.class_name}")
        comp.config = new
        ckpt.notes.append(f"{name}: config given by the user")
    for name, fields in (overrides or {}).items():
        if name not in ckpt.components:
            continue
        comp = ckpt.components[name]
        known = {f.name for f in dataclasses.fields(MODEL_TYPES[comp.class_name].config)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"{name}: {comp.class_name} has no config field {unknown} (fields: {sorted(known)})")
        comp.config = {**comp.config, **fields}
        ckpt.notes.append(f"{name}: " + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + " set by the user")
    for name, comp in ckpt.components.items():
        unknown = {k: v for k, v in comp.config.items() if isinstance(v, ldm.Unknown)}
        if unknown:
            k, v = next(iter(unknown.items()))
            raise ConfigError(f"{ckpt.path} [{name}]: {v.reason}; give it with --set {name}.{k}=N "
                              f"(overrides={{{name!r}: {{{k!r}: N}}}})")
        comp.config = normalized_config(comp.config, f"{ckpt.path} [{name}]")


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


# --- readers ---------------------------------------------------------------------------------------


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
    """
    path = Path(path)
    if not os.path.lexists(path):
        recover_destination(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if path.is_dir():
        if (path / "jaxcontrol.json").is_file():
            from .jax_format import read_jaxcontrol

            ckpt = read_jaxcontrol(path)
        elif (path / "model_index.json").is_file():
            ckpt = read_diffusers_pipeline(path, unsafe_load_pickle=unsafe_load_pickle)
        elif (path / "config.json").is_file():
            ckpt = read_diffusers_model(path, unsafe_load_pickle=unsafe_load_pickle)
        else:
            raise CheckpointError(
                f"{path}: a folder, but not a diffusers model folder (config.json), a diffusers pipeline folder "
                f"(model_index.json) or a jaxcontrol checkpoint (jaxcontrol.json)")
        if ema:
            raise ConfigError(f"{path}: --ema applies to LDM single files; a {ckpt.description} has no EMA copy")
    elif path.is_file():
        source, facts = open_single_file(path, unsafe_load_pickle=unsafe_load_pickle)
        ckpt = read_single_file(path, source, facts, ema=ema, prediction_type=prediction_type)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    if prediction_type is not None:
        if ckpt.prediction_type not in (None, prediction_type):
            ckpt.notes.append(f"prediction type set to {prediction_type} (the checkpoint said {ckpt.prediction_type})")
        ckpt.prediction_type = prediction_type
        if ckpt.scheduler_config is not None:
            ckpt.scheduler_config = {**ckpt.scheduler_config, "prediction_type": prediction_type}
    if tokenizer is not None:
        tok = Path(tokenizer)
        if not tok.is_dir():
            raise CheckpointError(f"{tok}: not a tokenizer folder")
        check_tree(tok, f"tokenizer folder {tok}")
        ckpt.tokenizers["tokenizer"] = tok
    _check_names(ckpt, overrides, configs)
    _select(ckpt, components)
    _apply_overrides(ckpt, overrides, configs)
    if "text_encoder" not in ckpt.components:
        ckpt.tokenizers = {}
    elif not ckpt.tokenizers and ckpt.pipeline_class:
        ckpt.notes.append("no tokenizer in this checkpoint: pass a tokenizer folder (--tokenizer) to make the "
                          "converted pipeline usable for text-to-image")
    return ckpt


def read_single_file(path: Path, source: TensorSource, facts: dict, *, ema: bool | None = None,
                     prediction_type: str | None = None) -> Checkpoint:
    keys = source.keys()
    origin = str(path)
    fmt = detect_format(keys, origin)
    comps: dict[str, Component] = {}
    notes: list[str] = []
    used: set[str] = set()

    def take(prefix: str) -> list[str]:
        sub = [k for k in keys if k.startswith(prefix)]
        return [k[len(prefix):] for k in sub]

    def add_unet(prefix: str) -> None:
        inner = take(prefix)
        mapping = ldm.ldm_unet_to_diffusers(inner, f"{origin} [{prefix}*]")
        ema_keys = [k for k in keys if k.startswith("model_ema.")]
        used.update(prefix + k for k in inner)
        used.update(ema_keys)  # the EMA copy (or the regular one) is accounted for by the notes below
        if ema:
            if len(ema_keys) <= 100:
                raise CheckpointError(f"{origin}: EMA weights requested but the file holds none "
                                      f"({len(ema_keys)} model_ema.* keys)")
            spec = {}
            missing = []
            for old, new in mapping.items():
                flat = "model_ema." + ("diffusion_model." + old).replace(".", "")
                if flat in source:
                    spec[new] = (flat, None, None)
                else:
                    missing.append(flat)
            if missing:
                raise CheckpointError(f"{origin}: EMA copy incomplete: no {missing[:5]} ({len(missing)} missing)")
            notes.append(f"unet: EMA weights ({len(spec)} tensors from model_ema.*)")
        else:
            spec = {new: (prefix + old, None, None) for old, new in mapping.items()}
            if len(ema_keys) > 100:
                notes.append(f"unet: the file also holds EMA weights ({len(ema_keys)} model_ema.* tensors), not "
                             f"used; pass --ema for them")
        sub = ldm.derive(source, spec, f"{origin} [unet]")
        config, n = ldm.infer_unet_config(sub)
        notes.extend(n)
        comps["unet"] = Component("unet", config, sub)

    def add_controlnet(prefix: str) -> None:
        inner = take(prefix)
        used.update(prefix + k for k in inner)
        mapping = ldm.ldm_unet_to_diffusers(inner, f"{origin} [{prefix or 'no prefix'}]", controlnet=True)
        sub = ldm.derive(source, {new: (prefix + old, None, None) for old, new in mapping.items()},
                         f"{origin} [controlnet]")
        config, n = ldm.infer_unet_config(sub, controlnet=True)
        notes.extend(n)
        if "shuffle" in path.name.lower():
            config["global_pool_conditions"] = True
            notes.append("controlnet: global_pool_conditions=True from the file name (shuffle's "
                         "global_average_pooling); override with --set controlnet.global_pool_conditions=false")
        comps["controlnet"] = Component("controlnet", config, sub)

    def add_vae(prefix: str) -> None:
        inner = [k for k in take(prefix) if not k.startswith("loss.")]
        used.update(prefix + k for k in inner)
        spec = ldm.ldm_vae_to_diffusers(source.renamed({prefix + k: k for k in inner}), inner,
                                        f"{origin} [{prefix or 'VAE'}]")
        sub = ldm.derive(source, {new: (prefix + old, shape, fn) for new, (old, shape, fn) in spec.items()},
                         f"{origin} [vae]")
        config, n = ldm.infer_vae_config(sub)
        notes.extend(n)
        comps["vae"] = Component("vae", config, sub)

    def add_text_encoder() -> None:
        if _has(keys, SD_TEXT_PREFIX):
            inner = take(SD_TEXT_PREFIX)
            used.update(SD_TEXT_PREFIX + k for k in inner)
            sub = normalize_clip_keys(
                source.renamed({SD_TEXT_PREFIX + k: k for k in inner}, f"{origin} [text_encoder]"))
            config, n = ldm.infer_clip_text_config(sub, hidden_act="quick_gelu")
        elif _has(keys, SD2_TEXT_PREFIX):
            inner = take(SD2_TEXT_PREFIX)
            used.update(SD2_TEXT_PREFIX + k for k in inner)
            spec, n0 = ldm.openclip_text_to_diffusers(source.renamed({SD2_TEXT_PREFIX + k: k for k in inner}), inner,
                                                      f"{origin} [{SD2_TEXT_PREFIX}*]")
            sub = ldm.derive(source, {new: (SD2_TEXT_PREFIX + old, s, fn) for new, (old, s, fn) in spec.items()},
                             f"{origin} [text_encoder]")
            config, n = ldm.infer_clip_text_config(sub, hidden_act="gelu")
            n = n0 + n
        else:
            return
        notes.extend(n)
        comps["text_encoder"] = Component("text_encoder", config, sub, ignore=_CLIP_IGNORE)

    pipeline_class = None
    scheduler = None
    if fmt in ("ldm-sd1", "ldm-sd2", "controlnet-v1.0"):
        if fmt == "controlnet-v1.0":
            add_controlnet(CONTROL_PREFIX)
        add_unet(UNET_PREFIX)
        if _has(keys, VAE_PREFIX):
            add_vae(VAE_PREFIX)
        add_text_encoder()
        sd2 = fmt == "ldm-sd2" or comps["unet"].config.get("cross_attention_dim") == 1024
        if sd2 and fmt == "ldm-sd1":
            fmt = "ldm-sd2"
        if prediction_type is None:
            if sd2:
                # diffusers' rule: SD-2.x files are v-prediction except the 512 base (trained 875000 steps)
                prediction_type = "epsilon" if facts.get("global_step") == 875000 else "v_prediction"
                notes.append(f"prediction type {prediction_type} assumed for an SD-2.x file (the weights cannot tell; "
                             f"diffusers' rule: epsilon only for global_step 875000, the 512 base); "
                             f"pass --prediction-type to be sure")
            else:
                prediction_type = "epsilon"
        if sd2 and prediction_type == "v_prediction":
            comps["unet"].config["sample_size"] = 96
            if "vae" in comps:
                comps["vae"].config["sample_size"] = 768
        if len(comps) > 1:
            pipeline_class = "StableDiffusionControlNetPipeline" if "controlnet" in comps else "StableDiffusionPipeline"
            scheduler = default_scheduler_config("ldm-sd2" if sd2 else "ldm-sd1", prediction_type)
    elif fmt == "controlnet-v1.1":
        add_controlnet(CONTROL_PREFIX)
    elif fmt == "controlnet-bare":
        add_controlnet("")
    elif fmt == "ldm-unet":
        add_unet("")
    elif fmt == "ldm-vae":
        add_vae(VAE_PREFIX if _has(keys, VAE_PREFIX) else "")
    elif fmt in ("t2i-adapter-full", "t2i-adapter-light"):
        prefix = "adapter." if all(k.startswith("adapter.") for k in keys) else ""
        inner = take(prefix)
        used.update(prefix + k for k in inner)
        bare = source.renamed({prefix + k: k for k in inner})
        convert = ldm.t2i_full_to_diffusers if fmt == "t2i-adapter-full" else ldm.t2i_light_to_diffusers
        mapping, config, n = convert(bare, inner, origin)
        notes.extend(n)
        spec = {new: (prefix + old, None, None) for old, new in mapping.items()}
        comps["adapter"] = Component("adapter", config, ldm.derive(source, spec, f"{origin} [adapter]"))
    elif fmt == "diffusers-state-dict":
        cls = diffusers_class_of(set(keys))
        name = {"UNet2DConditionModel": "unet", "ControlNetModel": "controlnet", "AutoencoderKL": "vae",
                "T2IAdapter": "adapter", "CLIPTextModel": "text_encoder"}[cls]
        used.update(keys)
        if cls == "CLIPTextModel":
            sub = normalize_clip_keys(source)
            config, n = ldm.infer_clip_text_config(sub, hidden_act="quick_gelu")
            notes.append("text encoder: hidden_act quick_gelu assumed (CLIP-L); OpenCLIP needs "
                         "--set text_encoder.hidden_act=gelu")
        elif cls == "AutoencoderKL":
            sub = vae_legacy_names(source)
            config, n = ldm.infer_vae_config(sub)
        elif cls == "T2IAdapter":
            sub = source
            config, n = ldm.infer_adapter_config(sub)
        else:
            sub = source
            config, n = ldm.infer_unet_config(sub, controlnet=cls == "ControlNetModel")
        notes.extend(n)
        comps[name] = Component(name, config, sub, ignore=MODEL_TYPES[cls].ignore)

    left = [k for k in keys if k not in used]
    if left:
        schedule = [k for k in left if _SCHEDULE_BUFFERS.match(k)]
        other = [k for k in left if not _SCHEDULE_BUFFERS.match(k)]
        parts = []
        if schedule:
            parts.append(f"{len(schedule)} noise-schedule buffers")
        if other:
            groups: dict[str, int] = {}
            for k in other:
                parts2 = k.split(".")
                head = ".".join(parts2[:2]) if parts2[0] in ("first_stage_model", "cond_stage_model") else parts2[0]
                groups[head] = groups.get(head, 0) + 1
            parts.append(", ".join(f"{n} {g}.*" for g, n in sorted(groups.items())))
        notes.append("not part of any component, skipped: " + "; ".join(parts))
    if "global_step" in facts:
        notes.append(f"global_step {facts['global_step']}")
    return Checkpoint(path, fmt, comps, pipeline_class=pipeline_class, scheduler_config=scheduler,
                      prediction_type=prediction_type, notes=notes)


def read_diffusers_model(folder: Path, *, unsafe_load_pickle: bool = False, name: str | None = None) -> Checkpoint:
    """A diffusers (or transformers) model folder as a one-component checkpoint."""
    comp = _diffusers_component(folder, name, unsafe_load_pickle)
    return Checkpoint(folder, "diffusers-model", {comp.name: comp})


_DEFAULT_NAMES = {
    "UNet2DConditionModel": "unet", "ControlNetModel": "controlnet", "AutoencoderKL": "vae", "T2IAdapter": "adapter",
    "CLIPTextModel": "text_encoder", "CLIPTextModelWithProjection": "text_encoder",
    "CLIPVisionModel": "image_encoder", "CLIPVisionModelWithProjection": "image_encoder",
}


def _diffusers_component(folder: Path, name: str | None, unsafe_load_pickle: bool) -> Component:
    raw = read_config(folder)
    config = dict(raw)
    if "_class_name" not in config and config.get("architectures"):
        config["_class_name"] = config["architectures"][0]
    cls = check_class(config, str(folder / "config.json"))
    mtype = MODEL_TYPES[cls]
    source = open_weights(find_weights(folder), unsafe_load_pickle=unsafe_load_pickle)
    if mtype.normalize is not None:
        source = mtype.normalize(source)
    return Component(name or _DEFAULT_NAMES.get(cls, cls), config, source, ignore=mtype.ignore)


def read_diffusers_pipeline(folder: Path, *, unsafe_load_pickle: bool = False) -> Checkpoint:
    """A diffusers pipeline folder: its supported networks, tokenizers and scheduler config."""
    from .pipeline_folder import (MULTI_CLASSES, SCHEDULER, TOKENIZERS, index_components, read_model_index,
                                  read_scheduler_config)

    index = read_model_index(folder)
    comps: dict[str, Component] = {}
    tokenizers: dict[str, Path] = {}
    scheduler = None
    notes = []
    for name, class_name, sub in index_components(folder, index):
        spec = [None, class_name]
        if name in TOKENIZERS:
            check_tree(sub, f"{folder}: tokenizer {name!r}")
            tokenizers[name] = sub
        elif name == SCHEDULER:
            scheduler = read_scheduler_config(sub)
        elif spec[1] in MULTI_CLASSES:
            raise ConfigError(f"{folder}: {name} is a {spec[1]}; convert each of its folders ({name}, {name}_1, ...) "
                              f"on its own")
        elif spec[1] in MODEL_TYPES:
            if not sub.is_dir():
                raise CheckpointError(f"{folder}: model_index.json lists {name!r} but there is no {name}/ folder")
            comps[name] = _diffusers_component(sub, name, unsafe_load_pickle)
        else:
            notes.append(f"{name} ({spec[1]}) is not a network jaxcontrol runs; not converted")
    if not comps:
        raise CheckpointError(f"{folder}: the pipeline has no component jaxcontrol can convert")
    prediction = scheduler.get("prediction_type", "epsilon") if scheduler else None
    return Checkpoint(folder, "diffusers-pipeline", comps, pipeline_class=index.get("_class_name"),
                      tokenizers=tokenizers, scheduler_config=scheduler, prediction_type=prediction, notes=notes)


# --- loading ---------------------------------------------------------------------------------------


def load_single_file(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str = "plain",
    component_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    **read_options: Any,
):
    """Read any supported checkpoint (see `read_checkpoint` for the options) into a `PipelineBundle`.

    `bundle.modules[name]` / `bundle.params[name]` per component; `bundle.configs` holds the
    inferred configs and, for Stable Diffusion files, a scheduler config with the prediction type.
    `component_kwargs` overrides `dtype` / `param_dtype` / `attention_impl` per component.
    """
    from ..tokenizer import load_tokenizer
    from .pipeline_folder import PipelineBundle

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
    return PipelineBundle(ckpt.path, ckpt.pipeline_class or "", modules, params, configs, tokenizers)
