"""JSONL manifests of (image, condition image, caption) triples, and the image helpers the builders use.

One JSON object per line, paths relative to the manifest's folder (absolute paths also work):

    {"image": "images/0001.png", "condition": "edges/0001.png", "text": "a red car on a bridge"}

"condition" may be left out for text-to-image training (fine-tuning, LoRA, textual inversion,
DreamBooth): such a record's condition image is the image itself, and the ControlNet, adapter and
InstructPix2Pix tasks refuse manifests with such lines. Blank lines are skipped; other keys are ignored. Every problem is reported with the manifest's path
and the 1-based line number.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import JaxControlError

REQUIRED_KEYS = ("image", "text")
OPTIONAL_KEYS = ("condition",)
MAX_REPORTED = 20


class DataError(JaxControlError, ValueError):
    """A dataset, manifest or data file is invalid; the message names the file (and line)."""


class ManifestError(DataError):
    """A manifest line is not valid JSON, lacks a key, or names a missing or unreadable file."""


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One manifest line: the image and condition paths (joined to the manifest's folder) and the caption."""

    line: int  # 1-based line number in the manifest
    image: Path
    condition: Path | None  # None: the line has no condition (text-to-image data)
    text: str


def read_manifest(path: str | os.PathLike, *, check_files: bool = True) -> list[ManifestEntry]:
    """Parse and check a JSONL manifest; returns its entries in file order.

    Raises one `ManifestError` listing every problem (the first 20, each as `path:line`): the file
    missing or not UTF-8, a line that is not a JSON object, lacks "image" / "condition" / "text" or
    has a non-string value among them (or a non-string "condition"), an image or condition file that does not exist (only when
    `check_files`), or no example at all.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read manifest: {e}") from e
    base = path.parent
    entries: list[ManifestEntry] = []
    errors: list[str] = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{where}: expected a JSON object with keys {list(REQUIRED_KEYS)}, got {type(obj).__name__}")
            continue
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            errors.append(f"{where}: missing key(s) {missing} (has {sorted(obj)})")
            continue
        bad = [k for k in REQUIRED_KEYS + OPTIONAL_KEYS if k in obj and not isinstance(obj[k], str)]
        if bad:
            errors.append(f"{where}: {bad} must be strings")
            continue
        files: dict = {"condition": None}
        for key in ("image", "condition"):
            if key not in obj:
                continue
            p = base / obj[key]
            if check_files and not p.is_file():
                errors.append(f"{where}: {key} file not found: {p}")
            files[key] = p
        entries.append(ManifestEntry(lineno, files["image"], files["condition"], obj["text"]))
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise ManifestError(f"{len(errors)} problem(s) in manifest {path}:\n" + "\n".join(errors[:MAX_REPORTED]) + more)
    if not entries:
        raise ManifestError(f"{path}: manifest has no examples")
    return entries


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shortest side to `size` (bilinear) then a centre crop to size x size: torchvision's
    `Resize(size)` + `CenterCrop(size)`, the transforms of diffusers' ControlNet training script.
    A PIL image in, a PIL image of `size` x `size` out (the same object when it already is)."""
    w, h = image.size
    if (w, h) != (size, size):
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return image


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of an image: PIL, or a uint8 array (H, W), (H, W, 1) or (H, W, 3)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
