"""The trainer's input pipeline: a TFDS source, the grain loader, and global device batches.

Each host reads its own shard of the examples (`jaxcontrol.data.make_dataset` shards by
`jax.process_index()`), batches `batch_size / process_count` of them per optimizer step, and
`device_batch` turns that into global `jax.Array`s of shape (grad_accum_steps, micro_batch, ...)
split over the mesh's batch axes with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from ..errors import ConfigError
from .sharding import global_batch
from .step import DEVICE_KEYS


def data_dir(config, workdir) -> Path:
    """Where TFDS datasets are built: `config.data.data_dir`, else WORKDIR/tfds."""
    return Path(config.data.data_dir) if config.data.data_dir else Path(workdir) / "tfds"


def open_sources(config, workdir) -> tuple[Sequence, Sequence | None]:
    """(train source, validation source or None): random-access sources of raw records, by
    `config.data.dataset` ("fill50k" and "folder" are built under `data_dir` first, on process 0).
    Raises `ConfigError` / `ManifestError` as the builders and `open_source` do."""
    from ..data import build_fill50k, build_folder, open_source

    d = config.data
    if d.dataset == "fill50k":
        builder = _once(lambda: build_fill50k(
            data_dir(config, workdir), image_size=int(d.resolution), num_train=int(d.fill50k_num_train),
            num_validation=int(d.fill50k_num_validation), seed=int(d.fill50k_seed),
            colors=str(d.fill50k_palette)))
        splits = builder.info.splits
        val = builder.as_data_source(d.validation_split) if d.validation_split in splits else None
        return builder.as_data_source(d.split), val
    if d.dataset == "folder":
        manifests = {"train": d.train_manifest}
        if d.validation_manifest:
            manifests["validation"] = d.validation_manifest
        builder = _once(lambda: build_folder(data_dir(config, workdir), manifests, image_size=int(d.resolution)))
        val = builder.as_data_source("validation") if "validation" in manifests else None
        return builder.as_data_source("train"), val
    train = open_source(d.tfds_path, d.split)
    try:
        val = open_source(d.tfds_path, d.validation_split)
    except ConfigError:
        val = None
    return train, val


def _once(build):
    """Build a dataset on process 0 first (others wait), then open it everywhere."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            build()
        multihost_utils.sync_global_devices("jaxcontrol_dataset")
    return build()


def precomputed_source(config, workdir, source, nets, frozen) -> Any:
    """Encode `source` once with the frozen VAE and text encoder (or reuse an earlier encoding)."""
    from ..data import PrecomputedSource

    out = Path(config.data.precomputed_dir) if config.data.precomputed_dir else Path(workdir) / "precomputed"
    if jax.process_index() == 0 and not (out / "meta.json").is_file():
        _precompute(source, out, nets, frozen, int(config.data.resolution))
    if jax.process_count() > 1:  # every host, so that none waits alone
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxcontrol_precompute")
    return PrecomputedSource(out)


def _precompute(source, out, nets, frozen, resolution):
    from ..data import precompute_latents
    from ..tokenizer import tokenize

    vae, text = nets.vae, nets.text_encoder
    vp, tp = frozen["vae"], frozen["text_encoder"]
    encode_images = jax.jit(lambda x: vae.apply({"params": vp}, x, method=vae.encode))
    encode_ids = jax.jit(lambda ids: text.apply({"params": tp}, ids).last_hidden_state)
    precompute_latents(source, out, encode_images=lambda x: np.asarray(encode_images(x)),
                       encode_text=lambda caps: np.asarray(encode_ids(tokenize(nets.tokenizer, caps))),
                       batch_size=8, resolution=resolution, progress=True)


def make_train_dataset(config, source, tokenizer, *, tokenize_prompts: bool = True):
    """The grain dataset of per-host batches (`batch_size / process_count` examples each), shuffled
    with `config.seed`; with `tokenize_prompts`, batches carry "input_ids" (B, L) int32. Raises
    `ConfigError` when `config.batch_size` is not a multiple of the host count."""
    from ..data import ControlTransform, TokenizeBatch, make_dataset
    from ..tokenizer import tokenize

    hosts = jax.process_count()
    if config.batch_size % hosts:
        raise ConfigError(f"config.batch_size={config.batch_size} is not a multiple of the {hosts} hosts")
    return make_dataset(
        source, batch_size=config.batch_size // hosts, seed=int(config.seed), shuffle=True,
        transform=ControlTransform(resolution=int(config.data.resolution)),
        tokenize_fn=TokenizeBatch(functools.partial(tokenize, tokenizer)) if tokenize_prompts else None,
        read_threads=int(config.data.read_threads), prefetch=int(config.data.prefetch),
        num_workers=int(config.data.num_workers))


def device_batch(batch: dict, accum: int, sharding, keys: Sequence[str] = DEVICE_KEYS) -> dict:
    """This host's batch as global arrays (accum, micro_batch, ...) with `sharding` (batch on dim 1),
    for the `keys` present. Raises `ConfigError` when the host batch does not split into `accum`."""
    out = {}
    for key in keys:
        if key not in batch:
            continue
        value = np.asarray(batch[key])
        if value.shape[0] % accum:
            raise ConfigError(f"a host batch of {value.shape[0]} does not split into grad_accum_steps={accum}")
        out[key] = value.reshape((accum, value.shape[0] // accum) + value.shape[1:])
    return global_batch(out, sharding, batch_dim=1)


def validation_examples(source, count: int, resolution: int | None = None) -> list[dict]:
    """The first `count` examples of `source` (by `index` order when records carry one), transformed."""
    from ..data import ControlTransform

    n = min(count, len(source))
    records = [source[i] for i in range(min(len(source), max(n, 64)))]
    records.sort(key=lambda r: int(np.asarray(r.get("index", 0))))
    transform = ControlTransform(resolution=resolution)
    return [transform(r) for r in records[:n]]
