"""Tensor sources: a uniform, lazy view of the weights in one or more checkpoint files.

A `TensorSource` maps PyTorch state-dict keys to shapes and loads one tensor at a time, so a
converter can check every key and shape before reading any data, and peak memory stays near
the size of the converted parameters.

* `.safetensors` files are read with numpy alone.
* PyTorch pickles (`.bin`, `.pt`, `.pth`, `.ckpt`) need torch and are opened with torch's
  `weights_only=True` unpickler, which refuses to build arbitrary objects, so a malicious file
  cannot run code. Pass `unsafe_load_pickle=True` only for files you trust.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from ..errors import CheckpointError
from .safetensors_file import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class TensorSource:
    """Keys, shapes and lazy loading over a dict of `(shape, loader)` entries."""

    def __init__(self, entries: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]], origin: str):
        self._entries = dict(entries)
        self.origin = origin

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][0]

    def load(self, key: str) -> np.ndarray:
        return self._entries[key][1]()

    def renamed(self, mapping: Mapping[str, str], origin: str | None = None) -> "TensorSource":
        """A view with keys renamed by `mapping` (old -> new); keys not in `mapping` are dropped."""
        return TensorSource({new: self._entries[old] for old, new in mapping.items()}, origin or self.origin)

    def transformed(self, key: str, shape: tuple[int, ...], fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """Replace `key`'s loader by `fn(original)` with the given resulting shape."""
        _, loader = self._entries[key]
        self._entries[key] = (tuple(shape), lambda: fn(loader()))

    @staticmethod
    def from_arrays(arrays: Mapping[str, np.ndarray], origin: str = "<arrays>") -> "TensorSource":
        return TensorSource({k: (tuple(v.shape), (lambda v=v: np.asarray(v))) for k, v in arrays.items()}, origin)

    @staticmethod
    def merge(sources: Iterable["TensorSource"], origin: str) -> "TensorSource":
        entries: dict = {}
        for s in sources:
            for k in s.keys():
                if k in entries:
                    raise CheckpointError(f"{origin}: tensor {k!r} appears in more than one shard")
                entries[k] = s._entries[k]
        return TensorSource(entries, origin)


def open_safetensors(path: str | os.PathLike) -> TensorSource:
    f = SafetensorsFile(path)
    return TensorSource({k: (f.shape(k), (lambda k=k: f.load(k))) for k in f.keys()}, str(path))


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise CheckpointError(
            "reading PyTorch pickle checkpoints needs torch: pip install 'jaxcontrol[torch]' "
            "(or convert the file to .safetensors)"
        ) from e
    return torch


def load_pickle_state_dict(path: str | os.PathLike, *, unsafe_load_pickle: bool = False) -> dict:
    """`torch.load` with the safe `weights_only` unpickler unless `unsafe_load_pickle` is set."""
    torch = _torch()
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_load_pickle, mmap=False)
    except Exception as e:
        text = str(e)
        if not unsafe_load_pickle and ("Weights only load failed" in text or "weights_only" in text):
            raise CheckpointError(
                f"{path}: refused to unpickle: the file contains objects other than tensors and plain "
                f"containers, which torch's safe loader will not build (a crafted pickle can run code). "
                f"If you trust this file, load it with unsafe_load_pickle=True (--unsafe-load-pickle). "
                f"Details: {text.splitlines()[0] if text else type(e).__name__}"
            ) from e
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint: {e}") from e


def torch_tensor_to_numpy(t) -> np.ndarray:
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def source_from_state_dict(state: Mapping, origin: str) -> TensorSource:
    """A `TensorSource` over an in-memory PyTorch state dict (non-tensor entries are skipped)."""
    torch = _torch()
    entries = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            entries[k] = (tuple(v.shape), (lambda v=v: torch_tensor_to_numpy(v)))
    return TensorSource(entries, origin)


def open_pickle(path: str | os.PathLike, *, unsafe_load_pickle: bool = False) -> TensorSource:
    state = load_pickle_state_dict(path, unsafe_load_pickle=unsafe_load_pickle)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return source_from_state_dict(state, str(path))


def open_weights(path: str | os.PathLike, *, unsafe_load_pickle: bool = False) -> TensorSource:
    """Open one weights file, or a sharded `*.index.json`, by its suffix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    name = path.name
    if name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid shard index ({e})") from e
        shards = sorted(set(weight_map.values()))
        sources = [open_weights(path.parent / s, unsafe_load_pickle=unsafe_load_pickle) for s in shards]
        merged = TensorSource.merge(sources, str(path))
        missing = sorted(set(weight_map) - set(merged.keys()))
        if missing:
            raise CheckpointError(f"{path}: the index lists tensors no shard holds: {missing[:10]}")
        return merged
    if name.endswith(".safetensors"):
        return open_safetensors(path)
    if name.endswith(PICKLE_SUFFIXES):
        return open_pickle(path, unsafe_load_pickle=unsafe_load_pickle)
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .bin, .pt, .pth or .ckpt)")
