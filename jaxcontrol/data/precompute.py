"""Precomputed VAE latents and text embeddings, so a training step does not re-encode them.

    encode_images = jax.jit(lambda x: vae.apply({"params": vp}, x, method=vae.encode))   # (B,H,W,3) -> (B,h,w,8)
    encode_text = lambda caps: text_encoder_fn(tokenize(tok, caps))                      # -> (B,77,768)
    src = precompute_latents(builder.as_data_source("train"), out_dir, encode_images=encode_images,
                             encode_text=encode_text, batch_size=8)
    ds = make_dataset(src, batch_size=8)    # latents, encoder_hidden_states, conditioning_pixel_values, caption

The callbacks get fixed-size batches (the last one padded by repeating its final example, the
padding dropped afterwards), so a jitted function compiles once. What `encode_images` returns is
stored as "latents" unchanged: return the posterior moments to sample per step as diffusers does, or
scaled samples to train on fixed latents. Conditioning images stay pixels (PNG), since the
ControlNet takes them in pixel space.

Layout of `out_dir`: `meta.json` plus `records-XXXXX-of-YYYYY.array_record`, one record per example
(an uncompressed .npz). The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..atomic import atomic_directory
from ..errors import ConfigError
from .loader import ControlTransform
from .manifest import DataError, encode_png

FORMAT_VERSION = 1


def _record_bytes(fields: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **fields)
    return buf.getvalue()


def _check_batch(name: str, out, n: int) -> np.ndarray:
    a = np.asarray(out)
    if a.ndim < 1 or a.shape[0] != n:
        raise DataError(f"{name} returned shape {a.shape} for a batch of {n}; the first axis must be the batch")
    return a


def precompute_latents(
    source: Sequence,
    out_dir: str | os.PathLike,
    *,
    encode_images: Callable[[np.ndarray], Any],
    encode_text: Callable[[list[str]], Any] | None = None,
    batch_size: int = 8,
    resolution: int | None = None,
    records_per_shard: int = 1024,
    overwrite: bool = False,
    progress: bool = False,
) -> "PrecomputedSource":
    """Encode every example of `source` (in index order) and write a derived dataset to `out_dir`.

    `encode_images` takes pixel values (B, H, W, 3) float32 in [-1, 1] with B = `batch_size`;
    `encode_text` the captions (a list of B strings). Each must return an array whose first axis
    is B; what follows is stored per example as it is (any shape and dtype). `resolution` is
    `ControlTransform`'s. Returns a `PrecomputedSource` over the result.

    Raises `ConfigError` when batch_size or records_per_shard < 1, or `out_dir` is not empty and
    not `overwrite`; `DataError` when the source is empty, a callback's first axis is not B, or
    the folder cannot be written.
    """
    out_dir = Path(out_dir)
    if batch_size < 1 or records_per_shard < 1:
        raise ConfigError("batch_size and records_per_shard must be >= 1")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out_dir}: already exists and is not empty (pass overwrite=True to replace it)")
    n = len(source)
    if n == 0:
        raise DataError("precompute_latents: the source is empty")
    from array_record.python.array_record_module import ArrayRecordWriter

    transform = ControlTransform(resolution=resolution)
    num_shards = -(-n // records_per_shard)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    with atomic_directory(out_dir, overwrite=True, error=DataError) as tmp:
        writer = None
        shard = -1
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc="precompute", unit="ex")
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            examples = [transform(source[i]) for i in idx]
            real = len(examples)
            examples += [examples[-1]] * (batch_size - real)  # fixed batch shape for jitted encoders
            pixels = np.stack([e["pixel_values"] for e in examples])
            latents = _check_batch("encode_images", encode_images(pixels), batch_size)[:real]
            captions = [e["caption"] for e in examples]
            text = None
            if encode_text is not None:
                text = _check_batch("encode_text", encode_text(captions), batch_size)[:real]
            if not meta:
                meta = {
                    "format_version": FORMAT_VERSION,
                    "count": n,
                    "num_shards": num_shards,
                    "latents": {"shape": list(latents.shape[1:]), "dtype": str(latents.dtype)},
                    "text_embeddings": None
                    if text is None
                    else {"shape": list(text.shape[1:]), "dtype": str(text.dtype)},
                    "conditioning_image": {"shape": list(examples[0]["conditioning_pixel_values"].shape)},
                    "resolution": resolution,
                }
            for j in range(real):
                i = idx[j]
                if i // records_per_shard != shard:
                    if writer is not None:
                        writer.close()
                    shard = i // records_per_shard
                    path = tmp / f"records-{shard:05d}-of-{num_shards:05d}.array_record"
                    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
                cond = np.round(examples[j]["conditioning_pixel_values"] * 255.0).astype(np.uint8)
                fields = {
                    "latents": latents[j],
                    "conditioning_png": np.frombuffer(encode_png(cond), np.uint8),
                    "text": np.asarray(captions[j]),
                    "index": np.asarray(examples[j]["index"], np.int64),
                }
                if text is not None:
                    fields["text_embeddings"] = text[j]
                writer.write(_record_bytes(fields))
            if bar is not None:
                bar.update(real)
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return PrecomputedSource(out_dir)


class PrecomputedSource:
    """Random access over a `precompute_latents` folder: records with "latents", "text_embeddings"
    (if encoded), "conditioning_image" (uint8 (H, W, 3)), "text" (str) and "index" (int).
    Picklable (reopens lazily). Raises `DataError` when `meta.json` is missing, unreadable or of
    another format version, a record file is missing, or the record count differs from
    `meta.json`; `IndexError` for an index outside [-len, len)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.directory}: not a precomputed dataset (no meta.json)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{meta_path}: cannot read: {e}") from e
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{meta_path}: format_version {self.meta.get('format_version')}, expected {FORMAT_VERSION}")
        k = self.meta["num_shards"]
        self.paths = [self.directory / f"records-{i:05d}-of-{k:05d}.array_record" for i in range(k)]
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise DataError(f"{self.directory}: missing record file(s): {[p.name for p in missing]}")
        self._reader = None

    def _open(self):
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource([os.fspath(p) for p in self.paths])
            if len(self._reader) != self.meta["count"]:
                raise DataError(
                    f"{self.directory}: {len(self._reader)} records on disk but meta.json says {self.meta['count']}"
                )
        return self._reader

    def __getstate__(self):
        return {"directory": self.directory, "meta": self.meta, "paths": self.paths, "_reader": None}

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _decode(self, raw: bytes) -> dict:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            rec = {k: z[k] for k in z.files}
        with Image.open(io.BytesIO(rec.pop("conditioning_png").tobytes())) as im:
            rec["conditioning_image"] = np.asarray(im.convert("RGB"))
        rec["text"] = str(rec["text"])
        rec["index"] = int(rec["index"])
        return rec

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} precomputed records")
        return self._decode(self._open()[i % n])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self._decode(r) for r in self._open().__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"PrecomputedSource({self.directory.name!r}, count={len(self)})"
