"""Fingerprints for sidecars: which weights and which input images made an output.

`path_sha256(path)` is the SHA-256 of a file's bytes, or for a folder the SHA-256 of the sorted
list of (relative path, file SHA-256) of every regular file under it (links are followed only
inside the folder), so one folder always gets the same fingerprint wherever it lies.
`array_sha256(a)` fingerprints an image as the pipeline received it (dtype, shape and bytes).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, 64 hex digits, read in 1 MiB chunks. Raises `OSError` if unreadable."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def path_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents), hex."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    root = path.resolve()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            real = full.resolve()
            if not real.is_file() or not real.is_relative_to(root):
                continue
            entries.append(f"{full.relative_to(root).as_posix()}\0{file_sha256(real)}\n")
    return hashlib.sha256("".join(entries).encode()).hexdigest()


def array_sha256(a) -> str:
    """SHA-256 (hex) of an array's dtype, shape and C-order bytes: equal values in another dtype or
    shape hash differently."""
    a = np.ascontiguousarray(np.asarray(a))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def hash_paths_in_background(paths) -> dict[str, Future]:
    """Start hashing each path on a worker thread (hashlib releases the GIL, so this overlaps
    with loading and compiling); `.result()` of each future is its `path_sha256`."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    futures = {str(p): pool.submit(path_sha256, p) for p in dict.fromkeys(str(p) for p in paths)}
    pool.shutdown(wait=False)
    return futures
