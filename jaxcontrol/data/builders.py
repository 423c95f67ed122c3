"""tensorflow-datasets builders: procedural fill50k and a user's folder of (image, condition, caption) triples.

Both write array_record files (random access, what grain reads) under a `data_dir` the caller
chooses; nothing goes to TFDS' home default. TensorFlow is not needed: images are PNG-encoded with
PIL before TFDS sees them, and reading decodes with OpenCV or PIL.

    builder = build_fill50k(data_dir, image_size=64, num_train=1000, num_validation=100, seed=0)
    train = builder.as_data_source("train")           # len(train), train[i] -> dict of numpy
    builder = build_folder(data_dir, {"train": "data/train.jsonl"}, image_size=512)

Records hold "image" and "conditioning_image" (uint8 HWC RGB), "text" (bytes) and "index"
(the example's number, or the manifest line); fill50k adds its circle's colours, centre and radius.
TFDS stores examples in a fixed pseudo-random order of their keys, so use "index" to identify one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from ..errors import ConfigError
from ..preprocess import ImageLoadError, load_image
from . import fill50k as f50k
from .manifest import ManifestError, encode_png, read_manifest, resize_center_crop

FILE_FORMAT = "array_record"


def _check_data_dir(data_dir) -> str:
    if data_dir is None or str(data_dir) == "":
        raise ConfigError("data_dir is required: TFDS datasets are written where the caller says, never to ~/")
    return os.fspath(data_dir)


# ------------------------------------------------------------------------------------------ fill50k


@dataclasses.dataclass(eq=False)
class Fill50kConfig(tfds.core.BuilderConfig):
    """A `Fill50k` build: image side in pixels, split sizes, seed and colour vocabulary. Make it with
    `fill50k_config`, which checks the values and names the config after them."""

    image_size: int = 512
    num_train: int = 50_000
    num_validation: int = 1_000
    seed: int = 0
    colors: tuple = dataclasses.field(default=f50k.DEFAULT_COLORS, repr=False)
    edits: bool = False  # instruction-edit triples (`fill50k.fill50k_edit_example`) instead of outlines


def fill50k_config(
    *,
    image_size: int = 512,
    num_train: int = 50_000,
    num_validation: int = 1_000,
    seed: int = 0,
    colors: Sequence[tuple[str, Sequence[int]]] | None = None,
    edits: bool = False,
) -> Fill50kConfig:
    """A config whose name encodes every setting, so different settings never share a folder.

    `edits=True` builds instruction-edit triples instead: "conditioning_image" is the image to edit,
    "text" the instruction ("make the circle red") and "image" the edited image, whose colours
    "circle_color" / "background_color" name (see `fill50k.fill50k_edit_example`).

    Raises `ConfigError` for image_size < 8, num_train < 1, num_validation < 0, seed < 0 or an
    invalid `colors` (see `fill50k.check_colors`).
    """
    colors = f50k.check_colors(colors)
    if image_size < 8:
        raise ConfigError(f"fill50k: image_size must be at least 8, got {image_size}")
    if num_train < 1 or num_validation < 0:
        raise ConfigError(f"fill50k: need num_train >= 1 and num_validation >= 0, got {num_train}, {num_validation}")
    if seed < 0:
        raise ConfigError(f"fill50k: seed must be >= 0, got {seed}")
    vocab = "default" if colors == f50k.DEFAULT_COLORS else f50k.colors_fingerprint(colors)
    name = f"s{image_size}_n{num_train}_v{num_validation}_seed{seed}_colors-{vocab}" + ("_edits" if edits else "")
    return Fill50kConfig(
        name=name,
        description=f"{image_size}px, {num_train} train / {num_validation} validation, seed {seed}, {len(colors)} colours",
        image_size=image_size,
        num_train=num_train,
        num_validation=num_validation,
        seed=seed,
        colors=colors,
        edits=bool(edits),
    )


class Fill50k(tfds.core.GeneratorBasedBuilder):
    """fill50k drawn on this machine: coloured circles, captions naming both colours, outline conditions.

    Splits "train" and (when num_validation > 0) "validation". Features: "image" and
    "conditioning_image" (S, S, 3) uint8 PNG, "text", "circle_color", "background_color",
    "center" (2,) float32 (x, y) pixels, "radius" float32 pixels, "index" int64.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Procedural fill50k: anti-aliased circles, outline conditions."}

    def __init__(self, *, config: Fill50kConfig | None = None, **kwargs):
        super().__init__(config=config if config is not None else fill50k_config(), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="Filled circles of named colours on named backgrounds; the condition is the outline.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "conditioning_image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "text": tfds.features.Text(),
                    "circle_color": tfds.features.Text(),
                    "background_color": tfds.features.Text(),
                    "center": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                    "radius": tfds.features.Scalar(dtype=np.float32),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        splits = {"train": self._generate_examples("train", cfg.num_train)}
        if cfg.num_validation:
            splits["validation"] = self._generate_examples("validation", cfg.num_validation)
        return splits

    def _generate_examples(self, split: str, count: int):
        cfg = self.builder_config
        kw = dict(split=split, seed=cfg.seed, image_size=cfg.image_size, colors=cfg.colors)
        for i in range(count):
            if cfg.edits:  # the edited image is the target, the image to edit its condition
                ex = f50k.fill50k_edit_example(i, **kw)
                fields = (ex.edited, ex.source, ex.instruction, *ex.edited_colors)
            else:
                ex = f50k.fill50k_example(i, **kw)
                fields = (ex.image, ex.condition, ex.caption, ex.circle_color, ex.background_color)
            image, condition, text, circle, background = fields
            yield i, {
                "image": encode_png(image),
                "conditioning_image": encode_png(condition),
                "text": text,
                "circle_color": circle,
                "background_color": background,
                "center": np.asarray(ex.center, np.float32),
                "radius": np.float32(ex.radius),
                "index": i,
            }


def fill50k_builder(data_dir, **config) -> Fill50k:
    """The builder for `fill50k_config(**config)` under `data_dir` (not built yet; see `build_fill50k`).
    Raises `ConfigError` when `data_dir` is None or empty, or for an invalid config."""
    return Fill50k(config=fill50k_config(**config), data_dir=_check_data_dir(data_dir), file_format=FILE_FORMAT)


def build_fill50k(data_dir, **config) -> Fill50k:
    """Generate (once; later calls reuse the files) and return the fill50k builder. See `fill50k_config`."""
    builder = fill50k_builder(data_dir, **config)
    builder.download_and_prepare()
    return builder


# ------------------------------------------------------------------------------------ user's folder


@dataclasses.dataclass(eq=False)
class ControlFolderConfig(tfds.core.BuilderConfig):
    """A `ControlFolder` build: ((split, absolute manifest path), ...) and the square image side
    (None keeps each image's size). Make it with `folder_config`."""

    manifests: tuple = ()  # ((split, manifest path), ...)
    image_size: int | None = None


def folder_config(
    manifests: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    image_size: int | None = None,
    name: str | None = None,
) -> ControlFolderConfig:
    """`manifests`: one JSONL path (the "train" split) or {split: path}. `image_size` resizes the
    shorter side (bilinear) and centre-crops both images to a square at build time; None keeps each
    image's size (the loader's `resolution` can resize later). The default `name` hashes the
    manifests' absolute paths and the size.

    Raises `ConfigError` for no manifests, a split name that is not an identifier or
    image_size < 8, and `ManifestError` for a manifest file that does not exist.
    """
    if isinstance(manifests, (str, os.PathLike)):
        manifests = {"train": manifests}
    if not manifests:
        raise ConfigError("folder dataset: no manifests given")
    pairs = tuple((str(split), str(Path(p).resolve())) for split, p in sorted(manifests.items()))
    for split, p in pairs:
        if not split.isidentifier():
            raise ConfigError(f"folder dataset: split name {split!r} must be a plain identifier (letters, digits, _)")
        if not Path(p).is_file():
            raise ManifestError(f"{p}: manifest file not found (split {split!r})")
    if image_size is not None and image_size < 8:
        raise ConfigError(f"folder dataset: image_size must be at least 8, got {image_size}")
    if name is None:
        digest = hashlib.sha256(repr((pairs, image_size)).encode()).hexdigest()[:12]
        name = f"{'s' + str(image_size) if image_size else 'native'}_{digest}"
    return ControlFolderConfig(name=name, manifests=pairs, image_size=image_size)


class ControlFolder(tfds.core.GeneratorBasedBuilder):
    """(image, condition image, caption) triples listed in JSONL manifests, one split per manifest.

    Features: "image" and "conditioning_image" uint8 RGB PNG ((S, S, 3), or (H, W, 3) without
    `image_size`), "text", "index" (the manifest line, int64) and "image_path" (relative to the
    manifest's folder when under it). Building raises `ManifestError` naming `manifest:line` for an
    invalid manifest, an unreadable image, or an image and condition of different sizes.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JSONL manifests of image / condition / text."}

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        shape = (s, s, 3) if s else (None, None, 3)
        return tfds.core.DatasetInfo(
            builder=self,
            description="A user's own (image, condition image, caption) triples.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=shape, encoding_format="png"),
                    "conditioning_image": tfds.features.Image(shape=shape, encoding_format="png"),
                    "text": tfds.features.Text(),
                    "index": tfds.features.Scalar(dtype=np.int64),
                    "image_path": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        # parse and check every manifest before anything is written
        parsed = {split: (Path(p), read_manifest(p)) for split, p in self.builder_config.manifests}
        return {split: self._generate_examples(path, entries) for split, (path, entries) in parsed.items()}

    def _generate_examples(self, manifest: Path, entries):
        size = self.builder_config.image_size
        for e in entries:
            images = {}
            for key, p in (("image", e.image), ("conditioning_image", e.condition or e.image)):
                try:
                    im = load_image(p, "RGB")
                except ImageLoadError as err:
                    raise ManifestError(f"{manifest}:{e.line}: {err}") from err
                images[key] = im
            if images["image"].size != images["conditioning_image"].size:
                raise ManifestError(
                    f"{manifest}:{e.line}: image {e.image} is {images['image'].size[0]}x{images['image'].size[1]} "
                    f"but condition {e.condition} is "
                    f"{images['conditioning_image'].size[0]}x{images['conditioning_image'].size[1]} (W x H); "
                    "they must match pixel for pixel"
                )
            if size:
                images = {k: resize_center_crop(v, size) for k, v in images.items()}
            try:
                rel = str(e.image.relative_to(manifest.parent))
            except ValueError:
                rel = str(e.image)
            yield e.line, {
                "image": encode_png(images["image"]),
                "conditioning_image": encode_png(images["conditioning_image"]),
                "text": e.text,
                "index": e.line,
                "image_path": rel,
            }


def folder_builder(data_dir, manifests, *, image_size: int | None = None, name: str | None = None) -> ControlFolder:
    """The builder for `folder_config(...)` under `data_dir` (not built yet; see `build_folder`)."""
    cfg = folder_config(manifests, image_size=image_size, name=name)
    return ControlFolder(config=cfg, data_dir=_check_data_dir(data_dir), file_format=FILE_FORMAT)


def build_folder(data_dir, manifests, *, image_size: int | None = None, name: str | None = None) -> ControlFolder:
    """Check the manifests, convert the folder into a TFDS dataset (once) and return the builder.
    Raises `ConfigError` / `ManifestError` as `folder_config` and `ControlFolder` do."""
    builder = folder_builder(data_dir, manifests, image_size=image_size, name=name)
    builder.download_and_prepare()
    return builder


def open_source(path: str | os.PathLike, split: str):
    """Random-access source of a built dataset folder (`<data_dir>/<name>/<config>/<version>`), without
    the builder class: `tfds.builder_from_directory(path).as_data_source(split)`. Records are
    dicts of numpy values (images uint8 (H, W, 3)). Raises `ConfigError` when `path` has no
    `dataset_info.json` or the dataset has no such split."""
    path = Path(path)
    if not (path / "dataset_info.json").is_file():
        raise ConfigError(f"{path}: not a built TFDS dataset folder (no dataset_info.json)")
    builder = tfds.builder_from_directory(os.fspath(path))
    if split not in builder.info.splits:
        raise ConfigError(f"{path}: no split {split!r}; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split)
