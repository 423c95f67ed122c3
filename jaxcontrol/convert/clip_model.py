"""A full transformers `CLIPModel` folder (both towers), as used by CLIP guidance."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ..errors import ConfigError
from ..models.clip import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    select_clip_tower,
)
from .model_types import find_weights, load_params
from .paths import read_json, safe_join
from .sources import open_weights


def load_clip_towers(path: str | os.PathLike, *, dtype: Any = jnp.float32, unsafe_load_pickle: bool = False):
    """`((text_module, text_params), (vision_module, vision_params))` from a `CLIPModel` folder."""
    folder = Path(path)
    config_path = safe_join(folder, "config.json", f"{folder}: config.json")
    if not os.path.lexists(config_path):
        raise ConfigError(f"{folder}: no config.json (expected a transformers CLIPModel folder)")
    raw = read_json(config_path, "config.json", error=ConfigError)
    if "text_config" not in raw or "vision_config" not in raw:
        raise ConfigError(f"{config_path}: not a CLIPModel config (needs text_config and vision_config)")
    source = open_weights(find_weights(folder), unsafe_load_pickle=unsafe_load_pickle)
    towers = []
    for tower, config_cls, module_cls in (("text", CLIPTextConfig, CLIPTextModelWithProjection),
                                          ("vision", CLIPVisionConfig, CLIPVisionModelWithProjection)):
        module = module_cls(config_cls.from_dict(raw, source=str(config_path)), dtype=dtype)
        params = load_params(module, select_clip_tower(source, tower), ignore=(r"position_ids$",))
        towers.append((module, params))
    return tuple(towers)
