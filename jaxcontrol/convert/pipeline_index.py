"""What a diffusers pipeline folder declares: `model_index.json`, its component folders, the scheduler config.

    index = read_model_index(folder)
    for name, class_name, sub in index_components(folder, index): ...

`PipelineBundle` is what every pipeline loader returns (`load_pipeline`, `load_single_file`,
`load_checkpoint`). Reading the networks themselves is `pipeline_folder.load_pipeline`'s job.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
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
    # the pipeline's own settings from model_index.json (SDXL's force_zeros_for_empty_prompt,
    # requires_aesthetics_score): its entries that are not components and not "_"-prefixed
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        modules = self.__dict__.get("modules", {})
        if name in modules:
            return modules[name]
        raise AttributeError(name)

    @property
    def tokenizer(self):
        """The main tokenizer (the "tokenizer" entry), or None if the pipeline has none."""
        return self.tokenizers.get("tokenizer")

    @property
    def scheduler_config(self) -> dict | None:
        """The raw `scheduler_config.json` dict (diffusers field names, `_class_name` kept), or None."""
        return self.configs.get(SCHEDULER)


def index_options(index: dict) -> dict:
    """`model_index.json`'s settings: the entries that are neither components ([library, class]
    pairs) nor "_"-prefixed metadata, e.g. {"force_zeros_for_empty_prompt": True}."""
    return {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}


def read_model_index(folder: Path) -> dict:
    """The parsed `model_index.json` of a diffusers pipeline folder.

    Raises `ConfigError` naming the folder when there is none or it is not a JSON object, and
    `CheckpointError` when the path escapes the folder.
    """
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
