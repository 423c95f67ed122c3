"""The converter's common currency: a checkpoint read from any format, as named components.

A `Component` is one network: its diffusers config (with `_class_name`) and where its weights
come from (a lazy `TensorSource` in PyTorch layout with diffusers names, or an Orbax directory).
Nothing is read until `load_params` is called, so a converter can take one component at a time
and keep memory near the size of the largest one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from ..errors import ConfigError
from ..models.params import param_shapes
from ..platform import DTYPES
from .formats import FORMATS
from .orbax_params import restore_params
from .model_types import MODEL_TYPES, build_module
from .sources import TensorSource
from .state_dict import convert_to_flax

# a progress factory: (description, total) -> an object with update(n) and close() (tqdm fits)
Progress = Callable[[str, int], Any]


def dtype_name(dtype: Any) -> str:
    """The name of a parameter dtype ("float32", "bfloat16" or "float16"); raises `ConfigError` for any other."""
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported (supported: {list(DTYPES)})")
    return name


@dataclasses.dataclass
class Component:
    """One network of a checkpoint, not yet loaded."""

    name: str
    config: dict  # diffusers / transformers field names, plus "_class_name"
    source: TensorSource | None = None  # PyTorch layout, diffusers names
    params_dir: Path | None = None  # an Orbax directory (jaxcontrol format)
    ignore: tuple[str, ...] = ()  # regexes of source keys that are not parameters
    stored_dtype: str | None = None

    @property
    def class_name(self) -> str:
        """The config's `_class_name`, e.g. "UNet2DConditionModel"."""
        return self.config["_class_name"]

    def build(self, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              attention_impl: str = "auto") -> nn.Module:
        """The Flax module for this component's config (see `model_types.build_module`), not yet initialised.

        Raises `ConfigError` for an unsupported class or an invalid config. `dtype` is the compute
        dtype, `param_dtype` the parameters' dtype, `attention_impl` the attention kernel ("auto": chosen per platform).
        """
        return build_module(self.config, source=f"{self.name} config", dtype=dtype, param_dtype=param_dtype,
                            attention_impl=attention_impl)

    def load_params(self, module: nn.Module, *, param_dtype: Any = None, progress: Progress | None = None,
                    sharding: Any = None) -> dict:
        """The Flax parameters, checked key by key and shape by shape against `module`.

        `param_dtype=None` keeps the stored dtype of floating-point tensors.
        """
        if self.params_dir is not None:
            return restore_params(self.params_dir, module, param_dtype=param_dtype, sharding=sharding)
        if self.source is None:  # pragma: no cover - every reader sets one of the two
            raise ConfigError(f"component {self.name!r} has no weights")
        expected = param_shapes(module)
        bar = progress(self.name, len(jax.tree_util.tree_leaves(expected))) if progress else None
        try:
            return convert_to_flax(self.source, expected, dtype=param_dtype, ignore=self.ignore,
                                   what=f"{self.name} ({self.class_name})", progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()


@dataclasses.dataclass
class Checkpoint:
    """What `read_checkpoint` found: the detected format, the components and what a pipeline needs besides."""

    path: Path
    format: str
    components: dict[str, Component]
    pipeline_class: str | None = None
    tokenizers: dict[str, Path] = dataclasses.field(default_factory=dict)
    scheduler_config: dict | None = None
    prediction_type: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    # the pipeline's settings, written into model_index.json (SDXL's force_zeros_for_empty_prompt, ...)
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def description(self) -> str:
        """A readable name of the detected `format` (e.g. "LDM single file, Stable Diffusion 1.x"), else `format`."""
        return FORMATS.get(self.format, self.format)


def check_class(config: dict, where: str) -> str:
    """The config's `_class_name`; raises `ConfigError` naming `where` if it is not in `MODEL_TYPES`."""
    name = config.get("_class_name")
    if name not in MODEL_TYPES:
        raise ConfigError(f"{where}: model class {name!r} is not supported (supported: {sorted(MODEL_TYPES)})")
    return name


def normalized_config(config: dict, where: str) -> dict:
    """`config` validated by our config class and written back with every field (diffusers names)."""
    name = check_class(config, where)
    parsed = MODEL_TYPES[name].config.from_dict(config, source=where)
    out = parsed.to_dict()
    out["_class_name"] = name
    return out
