"""Load a whole diffusers pipeline folder (`model_index.json`) into one bundle of modules and params.

    bundle = jaxcontrol.load_pipeline("stable-diffusion-v1-5")
    bundle.unet, bundle.params["unet"], bundle.tokenizer, bundle.scheduler_config

Components are loaded one after another and each tensor is converted as it is read, so host
memory peaks near the size of the converted parameters (measured in `tests/test_pipeline_folder.py`).
What `model_index.json` declares is read by `pipeline_index.py` (re-exported here).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp

from ..platform import to_dtype
from ..errors import CheckpointError, ConfigError
from ..tokenizer import load_tokenizer
from .diffusers_folder import load_model
from .jax_format import is_jaxcontrol_checkpoint, load_checkpoint, recover_destination
from .model_types import MODEL_TYPES, read_config
from .pipeline_index import (  # noqa: F401  (re-exported: this module's public names before pipeline_index.py existed)
    MULTI_CLASSES,
    SCHEDULER,
    SKIPPED,
    TOKENIZERS,
    PipelineBundle,
    index_components,
    index_options,
    multi_folders,
    read_model_index,
    read_scheduler_config,
)
from .single_file import load_single_file


def load_pipeline(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str = "auto",
    component_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    components: tuple[str, ...] | None = None,
    variant: str | None = None,
    unsafe_load_pickle: bool = False,
) -> PipelineBundle:
    """Read a diffusers pipeline folder.

    Args:
      dtype, param_dtype, attention_impl: defaults for every network (dtypes or names, "auto" included).
      component_kwargs: per-component overrides of those, e.g. `{"vae": {"dtype": jnp.float32}}`
        to keep the VAE in float32 while the U-Net runs in bf16.
      components: load only these components (default: all that the folder lists).

    A jaxcontrol checkpoint folder (`jaxcontrol.json`) and a single-file checkpoint (LDM Stable
    Diffusion, ControlNet, T2I-Adapter) load into the same bundle.
    """
    dtype, param_dtype = to_dtype(dtype), to_dtype(param_dtype)
    folder = Path(path)
    if not os.path.lexists(folder):
        recover_destination(folder)
    if folder.is_file():
        return load_single_file(folder, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                component_kwargs=component_kwargs, components=components,
                                unsafe_load_pickle=unsafe_load_pickle)
    if is_jaxcontrol_checkpoint(folder):
        return load_checkpoint(folder, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                               components=components, component_kwargs=component_kwargs)
    index = read_model_index(folder)
    overrides = dict(component_kwargs or {})
    modules: dict[str, Any] = {}
    params: dict[str, Any] = {}
    configs: dict[str, dict] = {}
    tokenizers: dict[str, Any] = {}
    skipped = []
    for name, class_name, sub in index_components(folder, index):
        if components is not None and name not in components:
            continue
        if name in SKIPPED:
            skipped.append(name)
            continue
        if name in TOKENIZERS:
            tokenizers[name] = load_tokenizer(sub)
            continue
        if name == SCHEDULER:
            configs[name] = read_scheduler_config(sub)
            continue
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, variant=variant,
                      unsafe_load_pickle=unsafe_load_pickle)
        kwargs.update(overrides.get(name, {}))
        if class_name in MULTI_CLASSES:
            folders = multi_folders(folder, name)
            loaded = [load_model(f, **kwargs) for f in folders]
            modules[name] = [m for m, _ in loaded]
            params[name] = [p for _, p in loaded]
            configs[name] = [read_config(f) for f in folders]
            continue
        if class_name not in MODEL_TYPES:
            warnings.warn(f"{sub}: component {name!r} of class {class_name} is not supported; skipped", stacklevel=2)
            skipped.append(name)
            continue
        if not sub.is_dir():
            raise CheckpointError(f"{folder}: model_index.json lists {name!r} but there is no {name}/ folder")
        modules[name], params[name] = load_model(sub, **kwargs)
        configs[name] = read_config(sub)
    if components is not None:
        missing = set(components) - set(modules) - set(tokenizers) - set(configs)
        if missing:
            raise ConfigError(f"{folder}: requested components {sorted(missing)} are not in model_index.json")
    return PipelineBundle(folder, index.get("_class_name", ""), modules, params, configs, tokenizers, tuple(skipped),
                          index_options(index))
