"""grain input pipeline over random-access sources (TFDS array_record sources, precomputed latents).

    ds = make_dataset(builder.as_data_source("train"), batch_size=8, seed=0, tokenize_fn=TokenizeBatch(tok))
    it = iter(ds)
    batch = next(it)   # pixel_values (8,H,W,3) in [-1,1], conditioning_pixel_values (8,H,W,3) in [0,1],
                       # caption (8,) str, index (8,) int64, input_ids (8,77) int32
    state = it.get_state()          # JSON-serialisable; or save_iterator_state(it, path)
    it2 = iter(ds); it2.set_state(state)   # continues with exactly the batches `it` would give

Sharding is per host, on examples, before shuffling: host i of n reads examples i, i+n, i+2n, ...
of the first n*floor(N/n), so every host has the same number of examples (and steps per epoch) and
the hosts' shards are disjoint. `batch_size` is the per-host batch; the global batch is
batch_size * shard_count. Each host shuffles its shard with `seed`, reshuffling every epoch.

Resuming needs the same pipeline (source, seed, shard, batch size, `num_workers`): the state is
positions in that pipeline. For Orbax, `grain.checkpoint.CheckpointSave(it)` /
`grain.checkpoint.CheckpointRestore(it)` save the same state inside a CheckpointManager.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

from ..atomic import write_text
from ..errors import ConfigError
from .manifest import DataError, resize_center_crop


def host_shard() -> tuple[int, int]:
    """(jax.process_index(), jax.process_count()): this host's shard of the examples."""
    import jax

    return jax.process_index(), jax.process_count()


def _text(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        v = v.item()
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return str(v)


@dataclasses.dataclass(frozen=True)
class ControlTransform:
    """One record -> training example, with diffusers' ControlNet training conventions.

    "image" (uint8) -> "pixel_values" float32 in [-1, 1]; "conditioning_image" (uint8) ->
    "conditioning_pixel_values" float32 in [0, 1]; "text" -> "caption" (str); "index" kept.
    Precomputed records: "latents" kept, "text_embeddings" -> "encoder_hidden_states" (and SDXL's
    "pooled_text_embeddings" -> "text_embeds").
    `resolution` resizes (shorter side, bilinear) and centre-crops images that are not already
    resolution x resolution, as torchvision's Resize + CenterCrop in diffusers' script.
    1-channel images are repeated to RGB; a missing "text" gives "", a missing "index" -1.
    Raises `DataError` when a record has no "conditioning_image" or an image that is not uint8
    (H, W, 1 or 3).
    """

    resolution: int | None = None

    def _image(self, a: np.ndarray, what: str) -> np.ndarray:
        a = np.asarray(a)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] not in (1, 3):
            raise DataError(f"record field {what!r}: expected uint8 (H, W, 1 or 3), got {a.dtype} {a.shape}")
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        if self.resolution is not None and a.shape[:2] != (self.resolution, self.resolution):
            a = np.asarray(resize_center_crop(Image.fromarray(a), self.resolution))
        return a

    def __call__(self, record: dict) -> dict:
        out: dict[str, Any] = {}
        if "image" in record:
            out["pixel_values"] = self._image(record["image"], "image").astype(np.float32) / 127.5 - 1.0
        if "latents" in record:
            out["latents"] = np.asarray(record["latents"])
        if "text_embeddings" in record:
            out["encoder_hidden_states"] = np.asarray(record["text_embeddings"])
        if "pooled_text_embeddings" in record:  # SDXL
            out["text_embeds"] = np.asarray(record["pooled_text_embeddings"])
        if "conditioning_image" not in record:
            raise DataError(f"record has no 'conditioning_image' (keys: {sorted(record)})")
        out["conditioning_pixel_values"] = (
            self._image(record["conditioning_image"], "conditioning_image").astype(np.float32) / 255.0
        )
        out["caption"] = _text(record.get("text", ""))
        out["index"] = np.int64(record.get("index", -1))
        if "class_image" in record:  # DreamBooth's prior preservation pairs (training.data.PairedSource)
            out["class_pixel_values"] = self._image(record["class_image"], "class_image").astype(np.float32) / 127.5 - 1.0
            out["class_caption"] = _text(record.get("class_text", ""))
        return out


@dataclasses.dataclass(frozen=True)
class TokenizeBatch:
    """Adds "input_ids" to a batch: `tokenize_fn(list_of_captions) -> (B, L) ints` (and
    "class_input_ids" of "class_caption" when a batch has them).

    With a transformers tokenizer: `TokenizeBatch(functools.partial(jaxcontrol.tokenizer.tokenize, tok))`.
    The callable must be picklable when `num_workers > 0` (module-level functions, partials and
    transformers tokenizers are). The ids are stored as int32; raises `DataError` when
    `tokenize_fn` does not return (B, L).
    """

    tokenize_fn: Callable[[list[str]], Any]
    tokenize_fn_2: Callable[[list[str]], Any] | None = None  # SDXL's second tokenizer: "input_ids_2"

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        jobs = [("caption", "input_ids", self.tokenize_fn), ("class_caption", "class_input_ids", self.tokenize_fn)]
        if self.tokenize_fn_2 is not None:
            jobs.append(("caption", "input_ids_2", self.tokenize_fn_2))
        for caption_key, ids_key, fn in jobs:
            if caption_key not in batch:
                continue
            captions = [str(c) for c in np.asarray(batch[caption_key]).reshape(-1)]
            ids = np.asarray(fn(captions))
            if ids.ndim != 2 or ids.shape[0] != len(captions):
                raise DataError(f"tokenize_fn returned shape {ids.shape} for {len(captions)} captions; expected (B, L)")
            out[ids_key] = ids.astype(np.int32)
        return out


def _allow_grain_workers() -> None:
    # grain 0.2.18 reads an absl flag in mp_prefetch and fails with UnparsedFlagAccessError unless flags
    # were parsed (google/grain#1355, fixed upstream after 0.2.18). Programs not using absl.app never
    # parse them; marking them parsed keeps every flag at its default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def shard_indices(num_examples: int, shard_index: int, shard_count: int) -> range:
    """Source indices of one shard: shard_index, shard_index + shard_count, ... of the first
    shard_count * floor(num_examples / shard_count). Raises `ConfigError` unless
    0 <= shard_index < shard_count and every shard gets at least one example."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ConfigError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, shard_count={shard_count}")
    per_shard = num_examples // shard_count
    if per_shard == 0:
        raise ConfigError(f"{num_examples} examples cannot be split over {shard_count} hosts")
    return range(shard_index, per_shard * shard_count, shard_count)


def make_dataset(
    source: Sequence,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    transform: Callable[[dict], dict] | None = None,
    tokenize_fn: Callable[[list[str]], Any] | TokenizeBatch | None = None,
    drop_remainder: bool = True,
    read_threads: int = 4,
    prefetch: int = 16,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
) -> grain.IterDataset:
    """A grain IterDataset of batches from a random-access `source` (len + getitem).

    Args:
      source: e.g. `builder.as_data_source("train")`, `open_source(...)`, `PrecomputedSource(...)`.
      batch_size: examples per batch on this host.
      seed: shuffle seed (0 <= seed < 2**32); epochs are reshuffled with seed + epoch.
      num_epochs: None repeats forever; batches run across epoch boundaries.
      shard_index, shard_count: this host's shard; default `host_shard()`.
      transform: record -> example (default `ControlTransform()`); must be picklable for workers.
      tokenize_fn: captions -> token ids, added to each batch as "input_ids".
      read_threads, prefetch: grain ReadOptions (threads reading records, elements read ahead).
      num_workers: >0 runs the pipeline in that many spawned processes (`mp_prefetch`); batch order
        then depends on num_workers, and a saved state restores only into the same num_workers.
        Each worker imports `jaxcontrol` (and so JAX) when it starts: seconds, once per iterator.
      worker_buffer_size: batches each worker prefetches.

    Returns:
      The dataset; its iterator yields dicts of numpy arrays with leading dimension `batch_size`
      (the module docstring lists the keys `ControlTransform` gives), and has `get_state` /
      `set_state`.

    Raises:
      ConfigError: batch_size < 1, seed outside [0, 2**32), num_epochs < 1, a negative worker,
        thread or prefetch count, only one of shard_index / shard_count, an invalid shard, or
        (with `drop_remainder` and finite epochs) fewer examples than one batch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
    if num_workers < 0 or read_threads < 0 or prefetch < 0:
        raise ConfigError("num_workers, read_threads and prefetch must be >= 0")
    if (shard_index is None) != (shard_count is None):
        raise ConfigError("give both shard_index and shard_count, or neither (then jax.process_index/count)")
    if shard_index is None:
        shard_index, shard_count = host_shard()
    idx = shard_indices(len(source), shard_index, shard_count)
    if drop_remainder and num_epochs is not None and len(idx) * num_epochs < batch_size:
        raise ConfigError(f"shard has {len(idx)} examples x {num_epochs} epoch(s), fewer than one batch of {batch_size}")

    ds = grain.MapDataset.source(source)
    ds = ds[idx.start : idx.stop : idx.step]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(transform if transform is not None else ControlTransform())
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if tokenize_fn is not None:
        ds = ds.map(tokenize_fn if isinstance(tokenize_fn, TokenizeBatch) else TokenizeBatch(tokenize_fn))
    if num_workers > 0:
        _allow_grain_workers()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=worker_buffer_size)
        )
    return ds


def save_iterator_state(iterator, path: str | os.PathLike) -> None:
    """Write `iterator.get_state()` as JSON, atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    write_text(path, json.dumps(iterator.get_state(), indent=1, sort_keys=True), parents=True)


def load_iterator_state(iterator, path: str | os.PathLike) -> None:
    """Restore a state written by `save_iterator_state` into a fresh iterator of the same pipeline.
    Raises `DataError` naming `path` when the file is missing, not JSON, or does not fit the pipeline."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(f"{path}: iterator state file not found") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read iterator state: {e}") from e
    try:
        iterator.set_state(state)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: iterator state does not fit this pipeline: {e}") from e
