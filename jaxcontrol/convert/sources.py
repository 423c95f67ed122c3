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

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from ..errors import CheckpointError
from .paths import read_json, regular_file, safe_join
from .safetensors_file import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class TensorSource:
    """Keys, shapes and lazy loading over a dict of `(shape, loader)` entries."""

    def __init__(self, entries: Mapping[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]], origin: str):
        self._entries = dict(entries)
        self.origin = origin

    def keys(self) -> list[str]:
        """The PyTorch state-dict keys (diffusers/transformers names), in file order."""
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        """The PyTorch shape of tensor `key` (nothing is loaded); `KeyError` if absent."""
        return self._entries[key][0]

    def load(self, key: str) -> np.ndarray:
        """Load tensor `key` as a numpy array in PyTorch layout and its stored dtype; `KeyError` if absent.

        Reading errors are `CheckpointError`.
        """
        return self._entries[key][1]()

    def renamed(self, mapping: Mapping[str, str], origin: str | None = None) -> "TensorSource":
        """A view with keys renamed by `mapping` (old -> new); keys not in `mapping` are dropped."""
        return TensorSource({new: self._entries[old] for old, new in mapping.items()}, origin or self.origin)

    @staticmethod
    def from_arrays(arrays: Mapping[str, np.ndarray], origin: str = "<arrays>") -> "TensorSource":
        """A source over in-memory arrays (PyTorch layout); `origin` names it in error messages."""
        return TensorSource({k: (tuple(v.shape), (lambda v=v: np.asarray(v))) for k, v in arrays.items()}, origin)

    @staticmethod
    def merge(sources: Iterable["TensorSource"], origin: str) -> "TensorSource":
        """One source over several (the shards of a checkpoint); raises `CheckpointError` for a key in two of them."""
        entries: dict = {}
        for s in sources:
            for k in s.keys():
                if k in entries:
                    raise CheckpointError(f"{origin}: tensor {k!r} appears in more than one shard")
                entries[k] = s._entries[k]
        return TensorSource(entries, origin)


def open_safetensors(path: str | os.PathLike) -> TensorSource:
    """A lazy source over a `.safetensors` file (header parsed now, tensors read on `load`).

    Raises `CheckpointError` naming the file when it is missing, not a regular file or malformed.
    """
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
    """A CPU numpy copy (or view) of a torch tensor; bfloat16 becomes `ml_dtypes.bfloat16`.

    Raises `CheckpointError` when torch is not installed.
    """
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# a storage may back several tensors (tied weights), but the tensors of one file may not add up to
# more than this many times the bytes its storages hold: a bound on what loading can materialise
MAX_VIEWS_PER_BYTE = 4


def check_tensor_layout(t, key: str, origin: str) -> int:
    """Refuse a unpickled tensor that would materialise more bytes than its storage holds.

    torch's safe unpickler rebuilds a tensor from (storage, offset, size, stride) as written in the
    file, so a few bytes of storage with a huge size and stride 0 (an `expand`ed tensor) pass it
    and only become gigabytes when converted. A tensor must lie inside its storage and its elements
    must not overlap (no zero or overlapping strides). Checked before any data is copied; returns
    the tensor's size in bytes.
    """
    shape, strides = tuple(t.shape), tuple(t.stride())
    itemsize = t.element_size()
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        return 0
    if any(s < 0 for s in strides):
        raise CheckpointError(f"{origin}: tensor {key!r} has negative strides {strides}; refused")
    dims = sorted((s, d) for s, d in zip(strides, shape) if d != 1)
    extent = 1  # elements spanned by the dimensions with smaller strides
    for s, d in dims:
        if s < extent:
            raise CheckpointError(
                f"{origin}: tensor {key!r} of shape {shape} has overlapping strides {strides} (an expanded or "
                f"self-overlapping view: {numel} elements from fewer stored ones); refused")
        extent = s * (d - 1) + extent
    storage_bytes = t.untyped_storage().nbytes()
    needed = (t.storage_offset() + extent) * itemsize
    if needed > storage_bytes:
        raise CheckpointError(
            f"{origin}: tensor {key!r} of shape {shape} needs {needed} bytes but its storage holds "
            f"{storage_bytes}; refused")
    return numel * itemsize


def source_from_state_dict(state: Mapping, origin: str) -> TensorSource:
    """A `TensorSource` over an in-memory PyTorch state dict (non-tensor entries are skipped).

    Every tensor's layout is checked against its storage first (`check_tensor_layout`), and all
    tensors together may not exceed `MAX_VIEWS_PER_BYTE` times the distinct storage bytes, so
    memory stays bounded by the file's own size however the pickle describes its tensors.
    """
    torch = _torch()
    entries = {}
    total = 0
    storages: dict[int, int] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            total += check_tensor_layout(v, k, origin)
            storage = v.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            entries[k] = (tuple(v.shape), (lambda v=v: torch_tensor_to_numpy(v)))
    stored = sum(storages.values())
    if total > MAX_VIEWS_PER_BYTE * stored + 2**20:
        raise CheckpointError(
            f"{origin}: the tensors add up to {total} bytes but the file stores only {stored} (views of the same "
            f"data used more than {MAX_VIEWS_PER_BYTE} times); refused")
    return TensorSource(entries, origin)


def open_pickle(path: str | os.PathLike, *, unsafe_load_pickle: bool = False) -> TensorSource:
    """A source over a PyTorch pickle (`.bin`, `.pt`, `.pth`, `.ckpt`) holding a state dict, loaded whole.

    Uses torch's `weights_only` unpickler unless `unsafe_load_pickle`. Raises `CheckpointError` when
    torch is missing, the file is refused or unreadable, it is not a state dict, or a tensor's layout
    would materialise more than its storage holds (see `source_from_state_dict`).
    """
    state = load_pickle_state_dict(path, unsafe_load_pickle=unsafe_load_pickle)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return source_from_state_dict(state, str(path))


def open_weights(path: str | os.PathLike, *, unsafe_load_pickle: bool = False) -> TensorSource:
    """Open one weights file, or a sharded `*.index.json`, by its suffix."""
    path = Path(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such file")
    regular_file(path)  # a FIFO would block open() forever
    name = path.name
    if name.endswith(".index.json"):
        index = read_json(path, "shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: not a valid shard index (\"weight_map\" must be a JSON object, "
                                  f"found {type(weight_map).__name__})")
        bad = {k: v for k, v in weight_map.items() if not isinstance(v, str)}
        if bad:
            k, v = next(iter(bad.items()))
            raise CheckpointError(f"{path}: weight_map[{k!r}] must be a file name, found {v!r}")
        shards = sorted(set(weight_map.values()))
        files = [safe_join(path.parent, s, f"{path}: shard {s!r}") for s in shards]
        for s, f in zip(shards, files):
            if f.name.endswith(".index.json"):
                raise CheckpointError(f"{path}: shard {s!r} is itself an index; shards must be weights files")
            regular_file(f, f"{path}: shard {s!r}")
        sources = [open_weights(f, unsafe_load_pickle=unsafe_load_pickle) for f in files]
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
