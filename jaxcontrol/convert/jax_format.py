"""jaxcontrol's own checkpoint format: Orbax parameter trees with diffusers configs beside them.

    DIR/
      jaxcontrol.json              manifest: format version, components, pipeline class, dtype, counts
      unet/config.json             diffusers field names + "_class_name"
      unet/params/                 Orbax StandardCheckpointer directory (the Flax parameter tree)
      vae/..., text_encoder/...    one folder per component
      tokenizer/                   copied tokenizer files (pipelines)
      scheduler/scheduler_config.json

    save_checkpoint("out", {"controlnet": (controlnet, cparams)}, dtype="bfloat16")
    bundle = load_checkpoint("out")                      # a PipelineBundle
    controlnet, cparams = jaxcontrol.load_model("out")   # one-component checkpoints

Parameters are restored straight into the requested dtype and sharding, with no PyTorch layout
to transpose, which is why `train.py` and `infer.py` read this format fastest.

Every writer here works in a temporary directory next to the destination and renames it into
place only when everything is written (`atomic_directory`), so a failed or interrupted write
leaves no partial output and never replaces a good one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from ..atomic import (  # noqa: F401  (re-exported: the writers' home before jaxcontrol.atomic)
    _host_tag, _libc_renameat2, atomic_directory, recover_destination, stale_temporaries)
from ..errors import CheckpointError, ConfigError
from ..models.params import count_params
from ..tokenizer import load_tokenizer
from ..version import __version__
from .components import Checkpoint, Component, dtype_name, normalized_config
from .model_types import read_config
from .orbax_params import restore_params, save_params  # noqa: F401  (save_params re-exported)
from .paths import check_tree, copy_tree, read_json, safe_join
from .pipeline_index import PipelineBundle

MANIFEST = "jaxcontrol.json"
FORMAT_NAME = "jaxcontrol"
FORMAT_VERSION = 1
PARAMS_DIR = "params"


def check_not_overlapping(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Refuse to write `dest` where replacing it would delete or shadow the input `src`."""
    s, d = Path(os.path.realpath(src)), Path(os.path.realpath(dest))
    if s == d or d in s.parents or s in d.parents:
        raise CheckpointError(f"{dest}: the output would overlap the input {src}; choose another destination")


# --- writing -------------------------------------------------------------------------------------


class JaxcontrolWriter:
    """Writes components one at a time into `root` (a temporary directory), then the manifest."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.components: dict[str, dict] = {}

    def add(self, name: str, config: Mapping[str, Any], params: Any, dtype: str) -> int:
        """Write component `name`: `root/name/config.json` (diffusers names) and its Orbax `params/`.

        `dtype` is recorded in the manifest (the params are saved as given). Returns the parameter count.
        Raises `CheckpointError` for a name that is not a plain folder name, `ConfigError` for an invalid config.
        """
        folder = safe_join(self.root, name, f"component name {name!r}", single=True)
        folder.mkdir()
        config = normalized_config(dict(config), f"{name} config")
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_params(folder / PARAMS_DIR, params)
        n = count_params(params)
        self.components[name] = {"class_name": config["_class_name"], "path": name, "dtype": dtype, "param_count": n}
        return n

    def finish(self, *, pipeline_class: str | None = None, tokenizers: Mapping[str, Path] | None = None,
               scheduler_config: Mapping[str, Any] | None = None, prediction_type: str | None = None,
               source: Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None) -> None:
        """Write the manifest `jaxcontrol.json` listing the added components.

        For a pipeline (`pipeline_class` set) also copy the tokenizer folders and write
        `scheduler/scheduler_config.json`. `source` (e.g. the input file and its format) is recorded as
        is. Raises `CheckpointError` when a tokenizer cannot be copied.
        """
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "jaxcontrol_version": __version__,
            "pipeline_class": pipeline_class,
            "components": self.components,
            "prediction_type": prediction_type,
        }
        if pipeline_class:
            toks = {}
            for name, folder in (tokenizers or {}).items():
                copy_tree(folder, safe_join(self.root, name, f"tokenizer name {name!r}", single=True),
                          f"tokenizer {name!r} ({folder})")
                toks[name] = name
            manifest["tokenizers"] = toks
            if scheduler_config is not None:
                (self.root / "scheduler").mkdir()
                (self.root / "scheduler" / "scheduler_config.json").write_text(
                    json.dumps(dict(scheduler_config), indent=2, sort_keys=True) + "\n")
                manifest["scheduler"] = "scheduler/scheduler_config.json"
        if options:
            manifest["options"] = dict(options)
        if source:
            manifest["source"] = dict(source)
        (self.root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def save_checkpoint(
    path: str | os.PathLike,
    components: Mapping[str, tuple[nn.Module, Any]],
    *,
    dtype: Any = None,
    pipeline_class: str | None = None,
    tokenizers: Mapping[str, str | os.PathLike] | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `{name: (module, params)}` in the jaxcontrol format at `path`, atomically.

    `dtype` ("float32", "bfloat16", "float16" or a jnp dtype) casts floating-point parameters;
    None keeps them as they are. Returns the destination path.
    """
    if not components:
        raise ConfigError("save_checkpoint: no components given")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        writer = JaxcontrolWriter(tmp)
        for name, (module, params) in components.items():
            params = _cast(params, dtype)
            writer.add(name, module_config(module), params, _tree_dtype(params))
        if pipeline_class is None and len(components) > 1 and ("tokenizer" in (tokenizers or {}) or scheduler_config):
            pipeline_class = "StableDiffusionPipeline"
        writer.finish(pipeline_class=pipeline_class, tokenizers={k: Path(v) for k, v in (tokenizers or {}).items()},
                      scheduler_config=scheduler_config, prediction_type=prediction_type)
    return Path(os.path.abspath(path))


def module_config(module: nn.Module) -> dict:
    """A module's config as a diffusers-style dict with `_class_name` set to the module's class."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ConfigError(f"{type(module).__name__} has no config; only jaxcontrol models can be saved")
    out = config.to_dict()
    out["_class_name"] = type(module).__name__
    return out


def _cast(params: Any, dtype: Any) -> Any:
    if dtype is None:
        return params
    dt = jnp.dtype(dtype)
    dtype_name(dt)
    return jax.tree_util.tree_map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def _tree_dtype(params: Any) -> str:
    leaves = jax.tree_util.tree_leaves(params)
    kinds = {jnp.dtype(a.dtype).name for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)}
    return kinds.pop() if len(kinds) == 1 else "mixed"


# --- reading -------------------------------------------------------------------------------------


def is_jaxcontrol_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a `jaxcontrol.json` manifest (contents not checked)."""
    return (Path(path) / MANIFEST).is_file()


def is_jaxcontrol_component(path: str | os.PathLike) -> bool:
    """A component folder of a jaxcontrol checkpoint: `config.json` beside an Orbax `params/` directory."""
    params = Path(path) / PARAMS_DIR
    return (Path(path) / "config.json").is_file() and (
        (params / "_CHECKPOINT_METADATA").is_file() or (params / "_METADATA").is_file())


def read_manifest(path: Path) -> dict:
    """The parsed `jaxcontrol.json` of checkpoint folder `path`, its structure checked.

    Raises `CheckpointError` naming the file when it is unreadable, not a jaxcontrol manifest, has a
    component or `tokenizers` entry that is not a JSON object, or a format version newer than this reader's.
    """
    file = path / MANIFEST
    manifest = read_json(file, "jaxcontrol manifest")
    if manifest.get("format") != FORMAT_NAME or not isinstance(manifest.get("components"), dict):
        raise CheckpointError(f"{file}: not a jaxcontrol manifest")
    for name, entry in manifest["components"].items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{file}: components[{name!r}] must be a JSON object, found {entry!r}")
    for key in ("tokenizers",):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise CheckpointError(f"{file}: {key!r} must be a JSON object, found {manifest[key]!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format version {version!r} is newer than this jaxcontrol reads ({FORMAT_VERSION}); upgrade")
    return manifest


def _component_from_folder(folder: Path, name: str) -> Component:

    config = read_config(folder)
    params = safe_join(folder, PARAMS_DIR, f"{folder}: {PARAMS_DIR}/")
    if not params.is_dir():
        raise CheckpointError(f"{folder}: no {PARAMS_DIR}/ (Orbax) directory")
    check_tree(params, f"{folder}: {PARAMS_DIR}/")
    return Component(name, config, params_dir=params)


def read_jaxcontrol(path: str | os.PathLike) -> Checkpoint:
    """A jaxcontrol checkpoint directory as a lazy `Checkpoint` (no parameters read yet)."""
    path = Path(path)
    manifest = read_manifest(path)
    where = path / MANIFEST
    comps = {}
    for name, entry in manifest["components"].items():
        folder = safe_join(path, entry.get("path", name), f"{where}: components[{name!r}].path")
        comp = _component_from_folder(folder, name)
        if comp.class_name != entry.get("class_name"):
            raise CheckpointError(f"{folder / 'config.json'}: class {comp.class_name!r} but "
                                  f"the manifest says {entry.get('class_name')!r}")
        comp.stored_dtype = entry.get("dtype")
        comps[name] = comp
    tokenizers = {k: safe_join(path, v, f"{where}: tokenizers[{k!r}]")
                  for k, v in (manifest.get("tokenizers") or {}).items()}
    scheduler = None
    if manifest.get("scheduler"):
        file = safe_join(path, manifest["scheduler"], f"{where}: scheduler")
        scheduler = read_json(file, "scheduler config")
    options = manifest.get("options") or {}
    if not isinstance(options, dict):
        raise CheckpointError(f"{where}: options must be a JSON object, got {options!r}")
    return Checkpoint(path, "jaxcontrol", comps, pipeline_class=manifest.get("pipeline_class"), tokenizers=tokenizers,
                      scheduler_config=scheduler, prediction_type=manifest.get("prediction_type"), options=options)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    attention_impl: str = "auto",
    components: tuple[str, ...] | None = None,
    component_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    sharding: Any = None,
):
    """Load a jaxcontrol checkpoint as a `PipelineBundle` (modules, params, configs, tokenizers).

    Args:
      dtype: compute dtype of the modules.
      param_dtype: dtype of the restored parameters; None keeps the stored one.
      components: load only these.
      component_kwargs: per-component overrides of `dtype`, `param_dtype`, `attention_impl`, `sharding`.
      sharding: a `jax.sharding.Sharding` for every parameter (default: the first local device).
    """

    ckpt = read_jaxcontrol(path)
    if components is not None:
        missing = sorted(set(components) - set(ckpt.components))
        if missing:
            raise ConfigError(f"{path}: no component {missing} (it has {sorted(ckpt.components)})")
    modules, params, configs = {}, {}, {}
    for name, comp in ckpt.components.items():
        if components is not None and name not in components:
            continue
        kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, sharding=sharding)
        kw.update((component_kwargs or {}).get(name, {}))
        known = comp.stored_dtype in ("float32", "bfloat16", "float16")
        stored = jnp.dtype(comp.stored_dtype) if known else jnp.float32
        module = comp.build(dtype=kw["dtype"], param_dtype=kw["param_dtype"] or stored,
                            attention_impl=kw["attention_impl"])
        params[name] = comp.load_params(module, param_dtype=kw["param_dtype"], sharding=kw["sharding"])
        modules[name] = module
        configs[name] = comp.config
    if ckpt.scheduler_config is not None:
        configs["scheduler"] = ckpt.scheduler_config
    tokenizers = {k: load_tokenizer(v) for k, v in ckpt.tokenizers.items()}
    return PipelineBundle(ckpt.path, ckpt.pipeline_class or "", modules, params, configs, tokenizers,
                          options=dict(ckpt.options))


def load_jaxcontrol_model(path: str | os.PathLike, *, subfolder: str | None = None, dtype: Any = jnp.float32,
                          param_dtype: Any = jnp.float32, attention_impl: str = "auto") -> tuple[nn.Module, dict]:
    """`(module, params)` of a one-component jaxcontrol checkpoint, of a component folder, or of `subfolder`."""
    path = Path(path)
    if subfolder is None and is_jaxcontrol_component(path):
        comp = _component_from_folder(path, path.name)
    else:
        ckpt = read_jaxcontrol(path)
        if subfolder is None:
            if len(ckpt.components) != 1:
                raise ConfigError(f"{path}: holds {sorted(ckpt.components)}; pick one with subfolder=... "
                                  f"(or load them all with load_pipeline)")
            comp = next(iter(ckpt.components.values()))
        elif subfolder in ckpt.components:
            comp = ckpt.components[subfolder]
        else:
            raise ConfigError(f"{path}: no component {subfolder!r} (it has {sorted(ckpt.components)})")
    module = comp.build(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    return module, comp.load_params(module, param_dtype=param_dtype)
