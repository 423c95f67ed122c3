"""Load a diffusers model folder (`config.json` + weights) as `(module, params)`.

    unet, params = jaxcontrol.load_model("path/to/unet")

The folder's `config.json` names the class (`_class_name`); its fields become our config
dataclass unchanged. Weights are `diffusion_pytorch_model[.variant].safetensors` (read without
torch), a sharded `*.safetensors.index.json`, or the `.bin` equivalents (torch's safe unpickler).
`load_model` also takes our own format and single files; the steps for one folder (class table,
config, weights file, conversion) are in `model_types.py` and re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from ..platform import to_dtype
from ..errors import CheckpointError, ConfigError
from ..models.adapter import MultiAdapter, T2IAdapter
from .jax_format import is_jaxcontrol_checkpoint, is_jaxcontrol_component, load_jaxcontrol_model, recover_destination
from .model_types import (  # noqa: F401  (re-exported: this module's public names before model_types.py existed)
    MODEL_TYPES,
    WEIGHT_BASENAMES,
    WEIGHT_SUFFIXES,
    ModelType,
    build_module,
    find_weights,
    load_params,
    model_type_of,
    read_config,
    vae_legacy_names,
)
from .single_file import load_single_file
from .sources import open_weights


def load_model(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    attention_impl: str = "auto",
    variant: str | None = None,
    subfolder: str | None = None,
    unsafe_load_pickle: bool = False,
) -> tuple[nn.Module, dict]:
    """Load a diffusers model folder as `(module, params)`.

    Also accepted: a jaxcontrol checkpoint (`jaxcontrol.json`, one component or `subfolder`), one of
    its component folders, and a single-file checkpoint (LDM, ControlNet, T2I-Adapter; `subfolder`
    names the component of a multi-component file), whose config is inferred from its shapes.

    Args:
      path: the folder holding `config.json` and the weights (or a pipeline folder with `subfolder`).
      dtype: compute dtype of activations (`jnp.bfloat16` for mixed precision; a name, "auto"
        included, is resolved by `jaxcontrol.platform.to_dtype`).
      param_dtype: dtype the parameters are stored in after loading (a dtype or a name).
      attention_impl: one of `models.attention.ATTENTION_IMPLS`; "auto" (default) picks per platform.
      variant: weights variant, e.g. `"fp16"` for `diffusion_pytorch_model.fp16.safetensors`.
      unsafe_load_pickle: allow arbitrary objects in `.bin` pickles. Only for files you trust.
    """
    dtype, param_dtype = to_dtype(dtype), to_dtype(param_dtype)
    if not os.path.lexists(path):
        recover_destination(path)  # a replacement of `path` killed half-way leaves the old output aside
    folder = Path(path) / subfolder if subfolder else Path(path)
    if Path(path).is_file():
        bundle = load_single_file(path, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                  unsafe_load_pickle=unsafe_load_pickle,
                                  components=None if subfolder is None else (subfolder,))
        if len(bundle.modules) != 1:
            raise ConfigError(
                f"{path}: holds {sorted(bundle.modules)}; pick one with subfolder=... (or use load_pipeline)")
        (name,) = bundle.modules
        return bundle.modules[name], bundle.params[name]
    if is_jaxcontrol_component(folder) or is_jaxcontrol_checkpoint(folder):
        return load_jaxcontrol_model(folder, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    raw = read_config(folder)
    _, mtype = model_type_of(raw, str(folder / "config.json"))
    module = build_module(
        raw, source=str(folder / "config.json"), dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
    )
    weights = find_weights(folder, variant)
    source = open_weights(weights, unsafe_load_pickle=unsafe_load_pickle)
    if mtype.normalize is not None:
        source = mtype.normalize(source)
    params = load_params(module, source, param_dtype=param_dtype, ignore=mtype.ignore)
    return module, params


def load_multi_adapter(path: str | os.PathLike, **load_kwargs: Any) -> tuple[MultiAdapter, dict]:
    """Load what diffusers' `MultiAdapter.save_pretrained(path)` wrote: `path`, `path_1`, `path_2`, ...

    Every existing folder in that sequence is read with `load_model(folder, **load_kwargs)` (dtype,
    param_dtype, variant, ...) and must hold a `T2IAdapter`; the pairs become one `MultiAdapter`
    (`MultiAdapter.from_adapters`). Raises `ValueError` when `path` is no folder or a folder holds
    another class.
    """
    base = str(path)
    pairs = []
    candidate, k = base, 0
    while os.path.isdir(candidate):
        module, params = load_model(candidate, **load_kwargs)
        if not isinstance(module, T2IAdapter):
            raise ValueError(f"{candidate}: expected a T2IAdapter folder, found a {type(module).__name__}")
        pairs.append((module, params))
        k += 1
        candidate = f"{base}_{k}"
    if not pairs:
        raise ValueError(f"no T2IAdapter folders at {Path(base)} (expected {base}, {base}_1, ...)")
    return MultiAdapter.from_adapters(pairs)
