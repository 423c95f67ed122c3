"""The trainer's input pipeline: a TFDS source, the grain loader, and global device batches.

Each host reads its own shard of the examples (`jaxcontrol.data.make_dataset` shards by
`jax.process_index()`), batches `batch_size / process_count` of them per optimizer step, and
`device_batch` turns that into global `jax.Array`s of shape (grad_accum_steps, micro_batch, ...)
split over the mesh's batch axes with `jax.make_array_from_process_local_data`. With
`data.precompute`, every host encodes its own share of the dataset on its own devices
(`precomputed_source`).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
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
    For task="dreambooth" the training records carry `dreambooth.instance_prompt` (when set) and,
    with prior preservation, a class image each (`dreambooth.PairedSource`; the class images are
    generated first). Raises `ConfigError` / `ManifestError` as the builders and `open_source` do,
    and `ConfigError` for a ControlNet, adapter or InstructPix2Pix run on manifest lines without a
    "condition"."""
    train, val = _open_sources(config, workdir)
    if config.task == "dreambooth":
        from .dreambooth import CaptionedSource, PairedSource, class_images

        if str(config.dreambooth.instance_prompt).strip():
            train = CaptionedSource(train, str(config.dreambooth.instance_prompt))
        if config.dreambooth.with_prior_preservation:
            from ..data import build_folder

            manifest = class_images(config, workdir)
            classes = _once(lambda: build_folder(data_dir(config, workdir), {"train": manifest},
                                                 image_size=int(config.data.resolution)))
            train = PairedSource(train, classes.as_data_source("train"))
    return train, val


def _check_conditions(config) -> None:
    """Tasks that read the condition image refuse manifest lines without one."""
    from ..data.manifest import read_manifest

    for key in ("train_manifest", "validation_manifest"):
        path = config.data[key]
        if not path:
            continue
        lines = [e.line for e in read_manifest(path, check_files=False) if e.condition is None]
        if lines:
            raise ConfigError(f"config.data.{key}: task={config.task!r} needs a condition image per example, but "
                              f"{path} lines {lines[:10]} have no \"condition\"")


def _open_sources(config, workdir) -> tuple[Sequence, Sequence | None]:
    from ..data import build_fill50k, build_folder, open_source

    d = config.data
    if d.dataset == "fill50k":
        builder = _once(lambda: build_fill50k(
            data_dir(config, workdir), image_size=int(d.resolution), num_train=int(d.fill50k_num_train),
            num_validation=int(d.fill50k_num_validation), seed=int(d.fill50k_seed),
            colors=str(d.fill50k_palette), edits=bool(d.fill50k_edits)))
        splits = builder.info.splits
        val = builder.as_data_source(d.validation_split) if d.validation_split in splits else None
        return builder.as_data_source(d.split), val
    if d.dataset == "folder":
        if config.task in ("controlnet", "adapter", "instruct_pix2pix"):
            _check_conditions(config)
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
    """Encode `source` once with the frozen VAE and text encoder (or reuse an earlier encoding).

    Every process encodes its own contiguous share of the examples (`data.precompute.process_share`)
    with its local devices (each batch split over them), into a folder beside the output that all
    processes see (`data.precomputed_dir` on shared storage for several hosts); process 0 then
    checks the parts and publishes the folder. The records are the same, index for index, whatever
    the process and device counts. Raises `DataError` when a process's share is missing.
    """
    from ..data import PrecomputedSource
    from ..data.precompute import finish_precompute, precompute_share

    out = Path(config.data.precomputed_dir) if config.data.precomputed_dir else Path(workdir) / "precomputed"
    index, count = jax.process_index(), jax.process_count()
    exists = (out / "meta.json").is_file()
    if count > 1:  # process 0 decides for all, so that every process takes the same path below
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if not exists:
        shared = out.parent / f".{out.name}.precompute-parts"
        if index == 0:
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir(parents=True)
        _sync("jaxcontrol_precompute_start")
        encode_images, encode_text, batch_size = local_encoders(nets, frozen)
        precompute_share(source, shared, encode_images=encode_images, encode_text=encode_text,
                         batch_size=batch_size, resolution=int(config.data.resolution), process_index=index,
                         process_count=count, progress=index == 0)
        _sync("jaxcontrol_precompute_written")
        if index == 0:
            finish_precompute(shared, out, count, int(config.data.resolution))
    _sync("jaxcontrol_precompute_done")  # every host, so that none waits alone
    source = PrecomputedSource(out)
    check_precomputed(source.meta, nets, config, out)
    return source


def check_precomputed(meta: dict, nets, config, where) -> None:
    """An earlier encoding reused must fit this run: the resolution, the VAE's latent channels,
    the text width the U-Net takes and, for SDXL, the pooled embeddings. `ConfigError` naming
    the folder and what differs (delete it, or set data.precomputed_dir elsewhere, to re-encode)."""
    problems = []
    res = meta.get("resolution")
    if res is not None and int(res) != int(config.data.resolution):
        problems.append(f"resolution {res}, the run's data.resolution is {config.data.resolution}")
    latents = (meta.get("latents") or {}).get("shape")
    channels = 2 * int(nets.vae.config.latent_channels)
    if latents and int(latents[-1]) != channels:
        problems.append(f"latent moments of {latents[-1]} channels, the VAE gives {channels}")
    text = (meta.get("text_embeddings") or {}).get("shape")
    width = int(nets.unet.config.cross_attention_dims[0])
    if text and int(text[-1]) != width:
        problems.append(f"text embeddings {int(text[-1])} wide, the U-Net takes {width}")
    if text and nets.xl and not meta.get("pooled_text_embeddings"):
        problems.append("no pooled text embeddings, which SDXL's U-Net takes")
    if problems:
        raise ConfigError(f"{where}: the precomputed dataset does not fit this run ({'; '.join(problems)}); "
                          "delete it or set config.data.precomputed_dir to another folder to encode again")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_encoders(nets, frozen, batch_per_device: int = 0) -> tuple[Callable, Callable, int]:
    """(encode_images, encode_text, batch_size) for precomputation on this process's devices.

    `encode_images`: pixels (B, H, W, 3) float32 in [-1, 1] -> VAE posterior moments (B, h, w, 2C)
    float32; `encode_text`: B captions -> last hidden states (B, 77, D) float32 (SDXL: the pair
    (states, pooled (B, P)) of `step.encode_prompts_xl`); both numpy in and out. Both are jitted once over a one-axis mesh of `jax.local_devices()` with the batch split
    over it and the encoders' parameters replicated; B = `batch_size` is the smallest multiple of
    the local device count that is at least 8 (or `batch_per_device` per device when given).
    """
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from ..tokenizer import tokenize

    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("batch",))
    split, whole = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    per_device = batch_per_device or -(-8 // len(devices))
    batch_size = per_device * len(devices)
    vae = nets.vae
    vp = jax.device_put(frozen["vae"], whole)
    images = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode).astype(jnp.float32),
                     in_shardings=(whole, split), out_shardings=split)

    def put(a):  # placed explicitly: with several processes jit refuses numpy inputs for a sharding that splits them
        return jax.device_put(np.asarray(a), split)

    if nets.xl:  # (states, pooled) of both encoders
        from .step import encode_prompts_xl

        names = ("text_encoder", "text_encoder_2")
        tp = jax.device_put({k: frozen[k] for k in names}, whole)
        xl = jax.jit(lambda p, i, i2: encode_prompts_xl(nets, p, i, i2), in_shardings=(whole, split, split),
                     out_shardings=split)

        def encode_text(caps):
            text, pooled = xl(tp, put(tokenize(nets.tokenizer, caps)), put(tokenize(nets.tokenizer_2, caps)))
            return np.asarray(text), np.asarray(pooled)
    else:
        text_encoder = nets.text_encoder
        tp = jax.device_put(frozen["text_encoder"], whole)
        ids = jax.jit(lambda p, i: text_encoder.apply({"params": p}, i).last_hidden_state.astype(jnp.float32),
                      in_shardings=(whole, split), out_shardings=split)

        def encode_text(caps):
            return np.asarray(ids(tp, put(tokenize(nets.tokenizer, caps))))
    return (lambda x: np.asarray(images(vp, put(np.asarray(x, np.float32)))), encode_text, batch_size)


def make_train_dataset(config, source, tokenizer, *, tokenize_prompts: bool = True, tokenizer_2=None):
    """The grain dataset of per-host batches (`batch_size / process_count` examples each), shuffled
    with `config.seed`; with `tokenize_prompts`, batches carry "input_ids" (B, L) int32 (and, given
    SDXL's `tokenizer_2`, "input_ids_2"). Raises `ConfigError` when `config.batch_size` is not a
    multiple of the host count."""
    from ..data import ControlTransform, TokenizeBatch, make_dataset
    from .networks import caption_ids

    hosts = jax.process_count()
    if config.batch_size % hosts:
        raise ConfigError(f"config.batch_size={config.batch_size} is not a multiple of the {hosts} hosts")
    return make_dataset(
        source, batch_size=config.batch_size // hosts, seed=int(config.seed), shuffle=True,
        transform=ControlTransform(resolution=int(config.data.resolution)),
        tokenize_fn=TokenizeBatch(functools.partial(caption_ids, tokenizer),
                                  None if tokenizer_2 is None else functools.partial(caption_ids, tokenizer_2))
        if tokenize_prompts else None,
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
