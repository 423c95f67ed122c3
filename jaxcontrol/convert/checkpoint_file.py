"""Open one checkpoint file (`.safetensors`, `.ckpt`, `.pth`, `.pt`, `.bin`) as a lazy `TensorSource`.

    source, facts = open_single_file("v1-5-pruned-emaonly.ckpt")     # facts: {"global_step": 840000}

Pickles are opened with torch's `weights_only` unpickler (memory-mapped where the file is a zip),
so a crafted file cannot run code. Training bookkeeping objects known to appear in Stable
Diffusion checkpoints (PyTorch Lightning's `ModelCheckpoint` callback) are replaced by inert
placeholders; anything else is refused unless `unsafe_load_pickle=True`.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import CheckpointError
from .paths import regular_file
from .sources import PICKLE_SUFFIXES, TensorSource, _torch, open_safetensors, source_from_state_dict

# objects PyTorch Lightning pickles next to the weights of Stable Diffusion checkpoints
# (torch's safe loader refuses them: diffusers#8874); loaded as inert placeholders
KNOWN_BOOKKEEPING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)


class _Inert:
    """Stands in for a pickled bookkeeping object: accepts any arguments and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _inert_globals(names: Iterable[str]) -> list:
    return [(type(name.rpartition(".")[2], (_Inert,), {"__module__": __name__}), name) for name in names]


def load_pickle(path: str | os.PathLike, *, unsafe_load_pickle: bool = False) -> Any:
    """`torch.load` of a checkpoint, safely unless `unsafe_load_pickle`; memory-mapped for zip-format files.

    Raises `CheckpointError` naming the file (and the refused globals, where torch can list them)
    when the safe unpickler refuses the file or torch cannot read it.
    """
    torch = _torch()
    path = Path(path)
    mmap = zipfile.is_zipfile(path)
    safe = not unsafe_load_pickle
    ctx = (torch.serialization.safe_globals(_inert_globals(KNOWN_BOOKKEEPING_GLOBALS)) if safe
           else contextlib.nullcontext())
    try:
        with ctx:
            return torch.load(path, map_location="cpu", weights_only=safe, mmap=mmap)
    except Exception as e:
        text = str(e)
        if safe and ("Weights only load failed" in text or "weights_only" in text or "GLOBAL" in text):
            raise _refused(path, torch) from None
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint: {text.splitlines()[0] if text else e!r}") from e


def _refused(path: Path, torch: Any) -> CheckpointError:
    try:
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                 if g not in KNOWN_BOOKKEEPING_GLOBALS]
    except Exception:  # the scan is advisory only
        found = []
    what = f" ({', '.join(found[:8])})" if found else ""
    return CheckpointError(
        f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers"
        f"{what}, which torch's safe loader will not build; a crafted pickle runs code when loaded. "
        f"If you trust this file, pass unsafe_load_pickle=True (--unsafe-load-pickle): that runs whatever "
        f"code the file contains with your permissions. Converting a trusted file once to .safetensors "
        f"avoids the question afterwards."
    )


def open_single_file(path: str | os.PathLike, *, unsafe_load_pickle: bool = False) -> tuple[TensorSource, dict]:
    """A lazy source over a single-file checkpoint's tensors, and container facts (`global_step`).

    Nested `{"state_dict": {...}}` containers are unwrapped; non-tensor entries are skipped.
    Raises `CheckpointError` for a missing or special file, an unknown suffix, a pickle that is
    not a state dict, and a file without tensors.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such file")
    regular_file(path)  # a FIFO would block open() forever
    if path.name.endswith(".safetensors"):
        source = open_safetensors(path)
        if not len(source):
            raise CheckpointError(f"{path}: the file holds no tensors")
        return source, {}
    if not path.name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path}: unknown checkpoint format (expected .safetensors, .ckpt, .pth, .pt or .bin, or a folder)")
    obj = load_pickle(path, unsafe_load_pickle=unsafe_load_pickle)
    facts: dict = {}
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        if isinstance(obj.get("global_step"), int):
            facts["global_step"] = obj["global_step"]
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    source = source_from_state_dict(obj, str(path))
    if not len(source):
        raise CheckpointError(f"{path}: the file holds no tensors (top-level entries: {list(obj)[:10]})")
    return source, facts
