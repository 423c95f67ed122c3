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
(an uncompressed .npz), the files holding consecutive examples in index order. The folder is
written under a temporary name and renamed when complete.

Several processes (hosts) can share the work: `precompute_plan` gives process p of P a
contiguous block of the examples and the record files that hold it, `precompute_share` encodes
and writes one process's files (plus a `part-XXXXX.json` of what it wrote) into a shared folder,
and `finish_precompute` (one process, after all are done) checks the parts and publishes the
folder. Every index reads back the same record whichever the process count; with one process the
files are those `precompute_latents` writes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

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


def _layout(a: np.ndarray | None) -> dict | None:
    """What meta.json records of an encoded field: its per-example shape and dtype."""
    return None if a is None else {"shape": list(a.shape[1:]), "dtype": str(a.dtype)}


def _check_batch(name: str, out, n: int) -> np.ndarray:
    a = np.asarray(out)
    if a.ndim < 1 or a.shape[0] != n:
        raise DataError(f"{name} returned shape {a.shape} for a batch of {n}; the first axis must be the batch")
    return a


class PlannedFile(NamedTuple):
    """One record file of a precomputed dataset: `records-{index:05d}-of-{total:05d}.array_record`,
    written by `process`, holding examples `start` .. `stop - 1`."""

    index: int
    total: int
    process: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"records-{self.index:05d}-of-{self.total:05d}.array_record"


def process_share(count: int, process_index: int, process_count: int) -> range:
    """The examples process `process_index` of `process_count` encodes: a contiguous block, the
    blocks in process order, their sizes differing by at most one (the first `count % process_count`
    processes take one more). Raises `ConfigError` for a count < 0 or an index outside the processes."""
    if count < 0 or process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f"process {process_index} of {process_count}, {count} examples: not a valid share")
    base, extra = divmod(count, process_count)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))


def precompute_plan(count: int, records_per_shard: int = 1024, process_count: int = 1) -> list[PlannedFile]:
    """The record files for `count` examples written by `process_count` processes, in file (and so
    example) order: each process's `process_share` cut into files of at most `records_per_shard`
    examples. With one process the cuts fall at multiples of `records_per_shard`. Raises `ConfigError`
    as `process_share`, or when `records_per_shard` < 1."""
    if records_per_shard < 1:
        raise ConfigError("records_per_shard must be >= 1")
    pieces = []
    for p in range(process_count):
        share = process_share(count, p, process_count)
        for start in range(share.start, share.stop, records_per_shard):
            pieces.append((p, start, min(start + records_per_shard, share.stop)))
    return [PlannedFile(i, len(pieces), p, a, b) for i, (p, a, b) in enumerate(pieces)]


def precompute_share(
    source: Sequence,
    directory: str | os.PathLike,
    *,
    encode_images: Callable[[np.ndarray], Any],
    encode_text: Callable[[list[str]], Any] | None = None,
    batch_size: int = 8,
    resolution: int | None = None,
    records_per_shard: int = 1024,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = False,
) -> dict:
    """Encode this process's share of `source` (`precompute_plan`) into its record files in
    `directory` (an existing folder, shared by the processes), and write `part-{process_index:05d}.json`
    describing them. The callbacks are `precompute_latents`'; batches run over the share in index
    order. Returns the part's description. Raises `ConfigError` for a batch_size < 1 or a bad
    share, `DataError` when a callback's first axis is not the batch.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    directory = Path(directory)
    n = len(source)
    files = [f for f in precompute_plan(n, records_per_shard, process_count) if f.process == process_index]
    share = process_share(n, process_index, process_count)
    transform = ControlTransform(resolution=resolution)
    part: dict[str, Any] = {"process": process_index, "process_count": process_count, "count": n,
                            "records_per_shard": records_per_shard, "files": [f.name for f in files],
                            "start": share.start, "stop": share.stop}
    bar = None
    if progress and len(share):
        from tqdm import tqdm

        bar = tqdm(total=len(share), desc="precompute", unit="ex")
    writer, current = None, None
    try:
        for start in range(share.start, share.stop, batch_size):
            idx = list(range(start, min(start + batch_size, share.stop)))
            examples = [transform(source[i]) for i in idx]
            real = len(examples)
            examples += [examples[-1]] * (batch_size - real)  # fixed batch shape for jitted encoders
            pixels = np.stack([e["pixel_values"] for e in examples])
            latents = _check_batch("encode_images", encode_images(pixels), batch_size)[:real]
            captions = [e["caption"] for e in examples]
            text = pooled = None
            if encode_text is not None:
                encoded = encode_text(captions)
                if isinstance(encoded, tuple):  # SDXL: (states, pooled)
                    encoded, pooled = encoded
                    pooled = _check_batch("encode_text (pooled)", pooled, batch_size)[:real]
                text = _check_batch("encode_text", encoded, batch_size)[:real]
            if "latents" not in part:
                part.update({
                    "latents": _layout(latents), "text_embeddings": _layout(text),
                    "conditioning_image": {"shape": list(examples[0]["conditioning_pixel_values"].shape)},
                })
                if pooled is not None:
                    part["pooled_text_embeddings"] = _layout(pooled)
            for j, i in enumerate(idx):
                if current is None or not current.start <= i < current.stop:
                    if writer is not None:
                        writer.close()
                    current = next(f for f in files if f.start <= i < f.stop)
                    writer = ArrayRecordWriter(os.fspath(directory / current.name), "group_size:1")
                cond = np.round(examples[j]["conditioning_pixel_values"] * 255.0).astype(np.uint8)
                fields = {
                    "latents": latents[j],
                    "conditioning_png": np.frombuffer(encode_png(cond), np.uint8),
                    "text": np.asarray(captions[j]),
                    "index": np.asarray(examples[j]["index"], np.int64),
                }
                if text is not None:
                    fields["text_embeddings"] = text[j]
                if pooled is not None:
                    fields["pooled_text_embeddings"] = pooled[j]
                writer.write(_record_bytes(fields))
            if bar is not None:
                bar.update(real)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    (directory / f"part-{process_index:05d}.json").write_text(json.dumps(part, indent=1))
    return part


def merge_parts(directory: str | os.PathLike, process_count: int, resolution: int | None = None) -> dict:
    """Check the `part-*.json` of `process_count` processes in `directory` (every file of the plan
    present, the shapes and dtypes the same in every part), write `meta.json`, delete the parts and
    return the meta. Raises `DataError` naming what is missing or inconsistent."""
    directory = Path(directory)
    parts = []
    for p in range(process_count):
        path = directory / f"part-{p:05d}.json"
        if not path.is_file():
            raise DataError(f"{directory}: process {p} of {process_count} did not finish its share ({path.name} missing)")
        parts.append(json.loads(path.read_text()))
    n, per_file = parts[0]["count"], parts[0]["records_per_shard"]
    names = [f.name for f in precompute_plan(n, per_file, process_count)]
    if [name for part in parts for name in part["files"]] != names:
        raise DataError(f"{directory}: the parts do not describe one plan of {n} examples over {process_count} "
                        "processes (were they written with the same source and records_per_shard?)")
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise DataError(f"{directory}: missing record file(s) {missing}")
    described = [part for part in parts if "latents" in part]
    if not described:
        raise DataError(f"{directory}: no process encoded any example")
    keys = ("latents", "text_embeddings", "conditioning_image", "pooled_text_embeddings")
    parts = [{"pooled_text_embeddings": None, **part} for part in parts]
    described = [{"pooled_text_embeddings": None, **part} for part in described]
    if any(part["count"] != n or part["records_per_shard"] != per_file for part in parts):
        raise DataError(f"{directory}: the parts disagree on the example count or records_per_shard")
    for part in described[1:]:
        if any(part[k] != described[0][k] for k in keys):
            raise DataError(f"{directory}: process {part['process']} encoded {[part[k] for k in keys]}, "
                            f"process {described[0]['process']} {[described[0][k] for k in keys]}")
    meta = {"format_version": FORMAT_VERSION, "count": n, "num_shards": len(names),
            **{k: described[0][k] for k in keys if described[0][k] is not None or k != "pooled_text_embeddings"},
            "resolution": resolution}
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
    for p in range(process_count):
        (directory / f"part-{p:05d}.json").unlink()
    return meta


def finish_precompute(shared: str | os.PathLike, out_dir: str | os.PathLike, process_count: int,
                      resolution: int | None = None) -> PrecomputedSource:
    """After every process ran `precompute_share` into `shared`: `merge_parts`, then move the files
    into `out_dir` atomically (`atomic.atomic_directory`) and remove `shared`. Call it from one
    process. Raises `DataError` as `merge_parts`, or when `out_dir` exists already."""
    shared, out_dir = Path(shared), Path(out_dir)
    merge_parts(shared, process_count, resolution)
    with atomic_directory(out_dir, error=DataError) as tmp:
        for path in sorted(shared.iterdir()):
            shutil.move(path, tmp / path.name)  # a rename within the filesystem, into the atomic folder
    shutil.rmtree(shared, ignore_errors=True)
    return PrecomputedSource(out_dir)


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
    is B; what follows is stored per example as it is (any shape and dtype). `encode_text` may
    return a pair (states, pooled) instead, as SDXL's two encoders give: the pooled embeddings are
    stored as "pooled_text_embeddings". `resolution` is
    `ControlTransform`'s. Returns a `PrecomputedSource` over the result. (One process; see
    `precompute_share` to split the work over several.)

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
    if len(source) == 0:
        raise DataError("precompute_latents: the source is empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out_dir, overwrite=True, error=DataError) as tmp:
        precompute_share(source, tmp, encode_images=encode_images, encode_text=encode_text, batch_size=batch_size,
                         resolution=resolution, records_per_shard=records_per_shard, progress=progress)
        merge_parts(tmp, 1, resolution)
    return PrecomputedSource(out_dir)


_NPY_HEADER_LOCK = threading.Lock()


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
        # one thread at a time: numpy parses .npy headers with ast.literal_eval, and concurrent AST
        # construction in threads can fail in CPython 3.11 ("AST constructor recursion depth
        # mismatch", python/cpython#106905), which killed a grain reader thread mid-run
        with _NPY_HEADER_LOCK, np.load(io.BytesIO(raw), allow_pickle=False) as z:
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
