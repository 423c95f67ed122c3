"""A full transformers `CLIPModel` folder (both towers), as used by CLIP guidance."""

from __future__ import annotations

import json
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
from .diffusers_folder import find_weights, load_params
from .sources import open_weights


def load_clip_towers(path: str | os.PathLike, *, dtype: Any = jnp.float32, unsafe_load_pickle: bool = False):
    """`((text_module, text_params), (vision_module, vision_params))` from a `CLIPModel` folder."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder}: no config.json (expected a transformers CLIPModel folder)")
    raw = json.loads(config_path.read_text())
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
