"""The model classes a checkpoint can name, and how one diffusers model folder is read.

    module = build_module(read_config("sd15/unet"))                     # a UNet2DConditionModel
    params = load_params(module, open_weights(find_weights("sd15/unet")))

`MODEL_TYPES` maps a diffusers / transformers class name (`_class_name`, or a transformers
`architectures[0]`) to our module, its config dataclass, the checkpoint keys that are buffers and
the key renaming the class's older checkpoints need. `load_model` (`diffusers_folder.py`) puts
these steps together for any path.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from ..errors import CheckpointError, ConfigError
from ..platform import to_dtype
from ..models.adapter import T2IAdapter, T2IAdapterConfig
from ..models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    normalize_clip_keys,
)
from ..models.configs import ControlNetConfig, ModelConfig, UNet2DConditionConfig
from ..models.controlnet import ControlNetModel
from ..models.params import param_shapes
from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL, AutoencoderKLConfig
from .paths import check_inside, read_json, regular_file, safe_join
from .sources import TensorSource
from .state_dict import convert_to_flax


@dataclasses.dataclass(frozen=True)
class ModelType:
    """What a supported class name maps to (one entry of `MODEL_TYPES`).

    Our Flax `module`, its `config` dataclass, the regexes of checkpoint keys that are buffers
    (`ignore`), and an optional key renaming (`normalize`) applied to older checkpoints first.
    """

    module: type[nn.Module]
    config: type[ModelConfig]
    # regexes of checkpoint keys that are not parameters (buffers) and may be ignored
    ignore: tuple[str, ...] = ()
    # renames a checkpoint's keys to the current diffusers/transformers names before conversion
    normalize: Callable[[TensorSource], TensorSource] | None = None


_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_legacy_names(source: TensorSource) -> TensorSource:
    """Old diffusers VAEs name the mid-block attention `query/key/value/proj_attn` (diffusers renames on load)."""
    mapping = {}
    for key in source.keys():
        parts = key.split(".")
        if len(parts) >= 2 and "attentions" in parts and parts[-2] in _LEGACY_VAE_ATTENTION:
            parts[-2] = _LEGACY_VAE_ATTENTION[parts[-2]]
        mapping[key] = ".".join(parts)
    return source.renamed(mapping)


MODEL_TYPES: dict[str, ModelType] = {
    "UNet2DConditionModel": ModelType(UNet2DConditionModel, UNet2DConditionConfig),
    "ControlNetModel": ModelType(ControlNetModel, ControlNetConfig),
    "AutoencoderKL": ModelType(AutoencoderKL, AutoencoderKLConfig, normalize=vae_legacy_names),
    # diffusers' MultiAdapter saves each adapter as its own T2IAdapter folder (path, path_1, ...):
    # see jaxcontrol.convert.diffusers_folder.load_multi_adapter
    "T2IAdapter": ModelType(T2IAdapter, T2IAdapterConfig),
    # transformers folders (config.json "architectures"); CLIP keys may come with or without the
    # text_model./vision_model. prefix (transformers 4.x vs 5.x); position_ids is a buffer
    **{
        cls.__name__: ModelType(cls, config, ignore=(r"position_ids$",), normalize=normalize_clip_keys)
        for cls, config in (
            (CLIPTextModel, CLIPTextConfig),
            (CLIPTextModelWithProjection, CLIPTextConfig),
            (CLIPVisionModel, CLIPVisionConfig),
            (CLIPVisionModelWithProjection, CLIPVisionConfig),
        )
    },
}

WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def read_config(folder: str | os.PathLike) -> dict:
    """The parsed `config.json` of a diffusers/transformers model folder.

    Raises `ConfigError` naming the folder when there is no config.json or it is not a JSON object,
    and `CheckpointError` when the path escapes the folder.
    """
    path = safe_join(folder, "config.json", f"{folder}: config.json")
    if not os.path.lexists(path):
        raise ConfigError(f"{folder}: no config.json (is this a diffusers model folder?)")
    return read_json(path, "config.json", error=ConfigError)


def model_type_of(raw: dict, source: str) -> tuple[str, ModelType]:
    """(class name, `ModelType`) of a config dict, from `_class_name` or transformers' `architectures[0]`.

    Raises `ConfigError` naming `source` when the config is not a dict or its class is not supported.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a JSON object, found a {type(raw).__name__}")
    name = raw.get("_class_name")
    if name is None and raw.get("architectures"):
        archs = raw["architectures"]
        if not isinstance(archs, list) or not isinstance(archs[0], str):
            raise ConfigError(f"{source}: architectures must be a list of class names, found {archs!r}")
        name = archs[0]
    if not isinstance(name, str) or name not in MODEL_TYPES:
        raise ConfigError(f"{source}: model class {name!r} is not supported (supported: {sorted(MODEL_TYPES)})")
    return name, MODEL_TYPES[name]


def find_weights(folder: str | os.PathLike, variant: str | None = None) -> Path:
    """The weights file in a model folder, as diffusers' `from_pretrained` looks for it.

    Tries diffusion_pytorch_model, model, pytorch_model (with `.{variant}` when given), each as
    .safetensors, sharded .safetensors.index.json, .bin, .bin.index.json, in that order. Raises
    `CheckpointError` naming the folder and its contents when none is there, or when the file found
    links outside the folder or is not a regular file.
    """
    folder = Path(folder)
    for base in WEIGHT_BASENAMES:
        for suffix in WEIGHT_SUFFIXES:
            stem = f"{base}.{variant}" if variant else base
            candidate = folder / f"{stem}{suffix}"
            if os.path.lexists(candidate):
                check_inside(candidate, folder, f"{folder}: {candidate.name}")
                return regular_file(candidate, f"{folder}: {candidate.name}")
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    want = f" with variant {variant!r}" if variant else ""
    raise CheckpointError(
        f"{folder}: no weights file{want} (looked for {WEIGHT_BASENAMES[0]}{WEIGHT_SUFFIXES[0]} and the "
        f".bin / sharded forms); the folder holds {found}"
    )


def build_module(
    raw_config: dict,
    *,
    source: str = "config",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    **module_kwargs: Any,
) -> nn.Module:
    """The module for a diffusers `config.json` dict; `dtype` / `param_dtype` are dtypes or names
    ("auto": see `jaxcontrol.platform`)."""
    dtype, param_dtype = to_dtype(dtype), to_dtype(param_dtype)
    _, mtype = model_type_of(raw_config, source)
    config = mtype.config.from_dict(raw_config, source=source)
    return mtype.module(config, dtype=dtype, param_dtype=param_dtype, **module_kwargs)


def load_params(
    module: nn.Module,
    source: TensorSource,
    *,
    param_dtype: Any = jnp.float32,
    ignore: tuple[str, ...] = (),
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Convert a PyTorch-layout `source` into `module`'s parameter tree, checking every key and shape."""
    return convert_to_flax(
        source,
        param_shapes(module),
        dtype=param_dtype,
        ignore=ignore,
        what=type(module).__name__,
        progress=progress,
    )
