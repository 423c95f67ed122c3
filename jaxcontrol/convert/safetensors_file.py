"""Read and write `.safetensors` files with numpy alone (no torch), one tensor at a time.

Format: 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the header),
an optional `"__metadata__"` dict of strings, then the raw little-endian data.

Reading validates the whole header against the file size up front, so a truncated or corrupted
file fails at open with an error naming the file and the tensor, never half-way through a load.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from ..atomic import atomic_file
from ..errors import CheckpointError
from .paths import regular_file

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Lazy reader: `keys()`, `shape(k)`, `dtype(k)`, and `load(k)` reading just that tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        regular_file(self.path)  # open() on a FIFO would block forever
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: corrupted or truncated safetensors header "
                        f"(header length {n}, file size {size})"
                    )
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read file: {e}") from e
        try:
            header = json.loads(raw.decode("utf-8").rstrip(" "))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupted safetensors header (not JSON: {e})") from e
        except RecursionError:
            raise CheckpointError(f"{self.path}: corrupted safetensors header (nested too deeply)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupted safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError(f"{self.path}: corrupted safetensors header (__metadata__ is not a JSON object)")
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(_int(d) for d in entry["shape"])
                begin, end = (_int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry {entry!r}") from e
            if any(d < 0 for d in shape):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a negative dimension in shape {shape}")
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} of shape {shape} and dtype {entry['dtype']} needs "
                    f"{expected} bytes but its offsets span {end - begin}"
                )
            if end > data_len:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {end} of the data section, "
                    f"which has only {data_len} bytes"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._check_layout(data_len)

    def _check_layout(self, data_len: int) -> None:
        """The safetensors rule: the tensors tile the data section exactly, with no overlap and no hole.

        Overlapping offsets would let a small file describe many times its size in tensors."""
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self._entries.items())
        pos = 0
        previous = None
        for begin, end, name in spans:
            if begin < pos:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} (bytes {begin}..{end}) overlaps tensor {previous!r}, which ends at "
                    f"byte {pos} of the data section; safetensors tensors may not share bytes")
            if begin > pos:
                raise CheckpointError(
                    f"{self.path}: bytes {pos}..{begin} of the data section belong to no tensor (before {name!r}); "
                    f"a safetensors file must index its whole data section")
            pos = end
            previous = name
        if pos != data_len:
            raise CheckpointError(
                f"{self.path}: the tensors end at byte {pos} but the data section has {data_len} bytes; a safetensors "
                f"file must index its whole data section")

    def keys(self) -> list[str]:
        """The tensor names, in header order."""
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor `key` (from the header, nothing is read); `KeyError` if absent."""
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        """The numpy dtype of tensor `key` (bfloat16 and float8 as ml_dtypes types); `KeyError` if absent."""
        return self._entries[key][0]

    def load(self, key: str) -> np.ndarray:
        """Read tensor `key` alone from disk: a numpy array of its shape and dtype (little-endian, as stored).

        Raises `KeyError` if absent, `CheckpointError` if the file is truncated.
        """
        dtype, shape, begin, end = self._entries[key]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.path}: truncated while reading tensor {key!r}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` to `path` atomically (a temporary file in the same folder, then a rename)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, array in items:
        a = np.asarray(array)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        kind = _NAMES.get(np.dtype(a.dtype))
        if kind is None:
            raise CheckpointError(f"cannot store tensor {name!r} of dtype {a.dtype} in safetensors")
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(np.ascontiguousarray(a).tobytes())
