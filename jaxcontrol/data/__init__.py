"""Training data: procedural fill50k, a user's folder of triples, a grain loader, precomputed latents.

Submodules are imported on first use, so `jaxcontrol.data.fill50k` (numpy only) does not pull in
tensorflow-datasets or grain:

| module | contents |
| --- | --- |
| `fill50k` | `fill50k_example` / `draw_circle`: one fill50k example as numpy, a pure function of (seed, split, index). |
| `manifest` | `read_manifest` (JSONL checks naming file and line), `ManifestError`, `DataError`, `resize_center_crop`. |
| `builders` | TFDS builders `Fill50k` and `ControlFolder`, `build_fill50k`, `build_folder`, `open_source`. |
| `loader` | `make_dataset` (grain: host sharding, shuffling, batching, prefetch, workers), iterator state save/restore. |
| `precompute` | `precompute_latents`: VAE latents and text embeddings into array_record shards, `PrecomputedSource`. |
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Fill50kExample": "fill50k",
    "fill50k_example": "fill50k",
    "draw_circle": "fill50k",
    "DEFAULT_COLORS": "fill50k",
    "BASIC_COLORS": "fill50k",
    "PALETTES": "fill50k",
    "DataError": "manifest",
    "ManifestError": "manifest",
    "ManifestEntry": "manifest",
    "read_manifest": "manifest",
    "resize_center_crop": "manifest",
    "Fill50k": "builders",
    "Fill50kConfig": "builders",
    "ControlFolder": "builders",
    "ControlFolderConfig": "builders",
    "fill50k_config": "builders",
    "fill50k_builder": "builders",
    "build_fill50k": "builders",
    "folder_config": "builders",
    "folder_builder": "builders",
    "build_folder": "builders",
    "open_source": "builders",
    "make_dataset": "loader",
    "host_shard": "loader",
    "ControlTransform": "loader",
    "TokenizeBatch": "loader",
    "save_iterator_state": "loader",
    "load_iterator_state": "loader",
    "precompute_latents": "precompute",
    "PrecomputedSource": "precompute",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
