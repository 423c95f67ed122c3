"""Load a whole diffusers pipeline folder (`model_index.json`) into one bundle of modules and params.

    bundle = jaxcontrol.load_pipeline("stable-diffusion-v1-5")
    bundle.unet, bundle.params["unet"], bundle.tokenizer, bundle.scheduler_config

Components are loaded one after another and each tensor is converted as it is read, so host
memory peaks near the size of the converted parameters (measured in `tests/test_pipeline_folder.py`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp

from ..errors import CheckpointError, ConfigError
from ..tokenizer import load_tokenizer
from .diffusers_folder import MODEL_TYPES, load_model, read_config
from .jax_format import recover_destination
from .paths import read_json, safe_join

# components that are not networks we run: read as configs / tokenizers, or skipped
TOKENIZERS = ("tokenizer", "tokenizer_2")
SCHEDULER = "scheduler"
SKIPPED = ("safety_checker", "feature_extractor", "image_encoder")
# diffusers saves a Multi* wrapper as sibling folders: controlnet, controlnet_1, controlnet_2, ...
MULTI_CLASSES = {"MultiControlNetModel": "ControlNetModel", "MultiAdapter": "T2IAdapter"}


@dataclasses.dataclass
class PipelineBundle:
    """Everything a pipeline folder holds, as JAX modules and parameter trees."""

    path: Path
    class_name: str
    modules: dict[str, Any]  # name -> module (or a list of modules for Multi* components)
    params: dict[str, Any]  # name -> params (or a list)
    configs: dict[str, dict]  # name -> the component's raw config.json / scheduler_config.json
    tokenizers: dict[str, Any]
    skipped: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        modules = self.__dict__.get("modules", {})
        if name in modules:
            return modules[name]
        raise AttributeError(name)

    @property
    def tokenizer(self):
        return self.tokenizers.get("tokenizer")

    @property
    def scheduler_config(self) -> dict | None:
        return self.configs.get(SCHEDULER)


def read_model_index(folder: Path) -> dict:
    path = safe_join(folder, "model_index.json", f"{folder}: model_index.json")
    if not os.path.lexists(path):
        raise ConfigError(f"{folder}: no model_index.json (is this a diffusers pipeline folder?)")
    return read_json(path, "model_index.json", error=ConfigError)


def index_components(folder: Path, index: dict) -> list[tuple[str, str, Path]]:
    """`(name, class name, folder)` of each component `model_index.json` lists, every name checked.

    A component is a `[library, class]` pair; entries starting with `_` are metadata and
    `[null, null]` slots are empty. The name must be a plain folder name inside `folder`: `../x`,
    absolute names and links out are refused with a `CheckpointError` naming the entry.
    """
    where = folder / "model_index.json"
    out = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        if not isinstance(spec[1], str):
            raise ConfigError(f"{where}: entry {name!r} must be [library, class name], found {spec!r}")
        sub = safe_join(folder, name, f"{where}: component {name!r}", single=True)
        out.append((name, spec[1], sub))
    return out


def load_pipeline(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str = "plain",
    component_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    components: tuple[str, ...] | None = None,
    variant: str | None = None,
    unsafe_load_pickle: bool = False,
) -> PipelineBundle:
    """Read a diffusers pipeline folder.

    Args:
      dtype, param_dtype, attention_impl: defaults for every network.
      component_kwargs: per-component overrides of those, e.g. `{"vae": {"dtype": jnp.float32}}`
        to keep the VAE in float32 while the U-Net runs in bf16.
      components: load only these components (default: all that the folder lists).

    A jaxcontrol checkpoint folder (`jaxcontrol.json`) and a single-file checkpoint (LDM Stable
    Diffusion, ControlNet, T2I-Adapter) load into the same bundle.
    """
    folder = Path(path)
    if not os.path.lexists(folder):
        recover_destination(folder)
    if folder.is_file():
        from .single_file import load_single_file

        return load_single_file(folder, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                component_kwargs=component_kwargs, components=components,
                                unsafe_load_pickle=unsafe_load_pickle)
    from .jax_format import is_jaxcontrol_checkpoint, load_checkpoint

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
    return PipelineBundle(folder, index.get("_class_name", ""), modules, params, configs, tokenizers, tuple(skipped))


def multi_folders(folder: Path, name: str) -> list[Path]:
    """`name`, `name_1`, `name_2`, ... as diffusers' Multi* `save_pretrained` writes them."""
    found = []
    i = 0
    while True:
        sub = safe_join(folder, name if i == 0 else f"{name}_{i}", f"{folder}: component {name!r}", single=True)
        if not (sub / "config.json").is_file():
            break
        found.append(sub)
        i += 1
    if not found:
        raise CheckpointError(f"{folder}: no {name}/ folder with a config.json")
    return found


def read_scheduler_config(sub: Path) -> dict:
    """`sub/scheduler_config.json` (a pipeline's scheduler folder), checked like every file a checkpoint names."""
    path = safe_join(sub, "scheduler_config.json", f"{sub}: scheduler_config.json")
    if not os.path.lexists(path):
        raise ConfigError(f"{sub}: no scheduler_config.json")
    return read_json(path, "scheduler config", error=ConfigError)
