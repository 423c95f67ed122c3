"""diffusers model and pipeline folders as lazy `Checkpoint`s (what `read_checkpoint` does with a folder).

    ckpt = read_diffusers_pipeline(Path("stable-diffusion-v1-5"))     # unet, vae, text_encoder, ...
    ckpt = read_diffusers_model(Path("control_v11p_sd15_canny"))      # controlnet

Configs are taken as the folders give them (`config.json`); weights stay on disk until a
component's `load_params`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .components import Checkpoint, Component, check_class
from .model_types import MODEL_TYPES, find_weights, read_config
from .paths import check_tree
from .pipeline_index import (MULTI_CLASSES, SCHEDULER, TOKENIZERS, index_components, read_model_index,
                             read_scheduler_config)
from .sources import open_weights

# the component name a lone model folder gets, by class
DEFAULT_NAMES = {
    "UNet2DConditionModel": "unet", "ControlNetModel": "controlnet", "AutoencoderKL": "vae", "T2IAdapter": "adapter",
    "CLIPTextModel": "text_encoder", "CLIPTextModelWithProjection": "text_encoder",
    "CLIPVisionModel": "image_encoder", "CLIPVisionModelWithProjection": "image_encoder",
}


def diffusers_component(folder: Path, name: str | None, unsafe_load_pickle: bool) -> Component:
    """One diffusers / transformers model folder as a `Component` (named `name`, or by its class).

    Raises `ConfigError` for a class not in `MODEL_TYPES` and `CheckpointError` for missing weights.
    """
    config = dict(read_config(folder))
    if "_class_name" not in config and config.get("architectures"):
        config["_class_name"] = config["architectures"][0]
    cls = check_class(config, str(folder / "config.json"))
    mtype = MODEL_TYPES[cls]
    source = open_weights(find_weights(folder), unsafe_load_pickle=unsafe_load_pickle)
    if mtype.normalize is not None:
        source = mtype.normalize(source)
    return Component(name or DEFAULT_NAMES.get(cls, cls), config, source, ignore=mtype.ignore)


def read_diffusers_model(folder: Path, *, unsafe_load_pickle: bool = False, name: str | None = None) -> Checkpoint:
    """A diffusers (or transformers) model folder as a one-component checkpoint."""
    comp = diffusers_component(folder, name, unsafe_load_pickle)
    return Checkpoint(folder, "diffusers-model", {comp.name: comp})


def read_diffusers_pipeline(folder: Path, *, unsafe_load_pickle: bool = False) -> Checkpoint:
    """A diffusers pipeline folder: its supported networks, tokenizers and scheduler config.

    Networks jaxcontrol does not run are listed in the notes; a `Multi*` component is refused
    (`ConfigError`: convert its folders one by one), and so is a pipeline with no network we run.
    """
    index = read_model_index(folder)
    comps: dict[str, Component] = {}
    tokenizers: dict[str, Path] = {}
    scheduler = None
    notes = []
    for name, class_name, sub in index_components(folder, index):
        if name in TOKENIZERS:
            check_tree(sub, f"{folder}: tokenizer {name!r}")
            tokenizers[name] = sub
        elif name == SCHEDULER:
            scheduler = read_scheduler_config(sub)
        elif class_name in MULTI_CLASSES:
            raise ConfigError(f"{folder}: {name} is a {class_name}; convert each of its folders ({name}, {name}_1, "
                              f"...) on its own")
        elif class_name in MODEL_TYPES:
            if not sub.is_dir():
                raise CheckpointError(f"{folder}: model_index.json lists {name!r} but there is no {name}/ folder")
            comps[name] = diffusers_component(sub, name, unsafe_load_pickle)
        else:
            notes.append(f"{name} ({class_name}) is not a network jaxcontrol runs; not converted")
    if not comps:
        raise CheckpointError(f"{folder}: the pipeline has no component jaxcontrol can convert")
    prediction = scheduler.get("prediction_type", "epsilon") if scheduler else None
    return Checkpoint(folder, "diffusers-pipeline", comps, pipeline_class=index.get("_class_name"),
                      tokenizers=tokenizers, scheduler_config=scheduler, prediction_type=prediction, notes=notes)
