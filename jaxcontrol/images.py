"""Writing images: atomic PNGs and contact-sheet grids."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .atomic import atomic_file, write_bytes


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (H, W), (H, W, 1) or (H, W, 3) image as PNG, atomically (temp file + rename); returns `path`.

    uint8 is written as it is; any other dtype is taken as [0, 1] (clipped, x255, rounded).
    Raises `NonFiniteError` for a non-uint8 image holding NaN or infinity.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if not np.all(np.isfinite(arr)):
            from .errors import NonFiniteError

            raise NonFiniteError(f"{path}: refusing to write an image with NaN or infinite values "
                                 "(they would become black pixels)")
        arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    with atomic_file(path, parents=True) as f:
        Image.fromarray(arr).save(f, format="PNG")
    return Path(path)


def save_json(data: Any, path: str | os.PathLike) -> Path:
    """Write `data` as indented, key-sorted JSON, atomically (values JSON cannot hold become strings)."""
    return write_bytes(path, json.dumps(data, indent=2, sort_keys=True, default=str).encode(), parents=True)


def make_grid(images: Sequence[np.ndarray], columns: int | None = None, pad: int = 2,
              background: int = 255) -> np.ndarray:
    """Tile uint8 images (H, W), (H, W, 1) or (H, W, 3) into one (rows*H + (rows+1)*pad,
    cols*W + (cols+1)*pad, 3) uint8 contact sheet, row by row; H, W are the largest sizes and
    smaller images sit top-left in their cell on `background`. `columns` defaults to
    ceil(sqrt(n)). Raises `ValueError` for an empty list."""
    images = [np.asarray(i) for i in images]
    if not images:
        raise ValueError("no images to tile")
    images = [np.repeat(i, 3, axis=-1) if i.ndim == 3 and i.shape[-1] == 1 else
              (np.repeat(i[..., None], 3, axis=-1) if i.ndim == 2 else i) for i in images]
    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    n = len(images)
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), background, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + img.shape[0], x : x + img.shape[1]] = img[..., :3]
    return grid
