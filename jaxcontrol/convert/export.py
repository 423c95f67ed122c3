"""Export to diffusers / transformers folders that their `from_pretrained` loads.

    export_diffusers("controlnet-torch", {"controlnet": (controlnet, cparams)})
    # controlnet-torch/config.json + diffusion_pytorch_model.safetensors
    diffusers.ControlNetModel.from_pretrained("controlnet-torch")

One component gives a model folder; several give a pipeline folder (`model_index.json`, one
subfolder per component, the tokenizers and the scheduler config). CLIP encoders are written as
transformers folders (`config.json` with `architectures`, `model.safetensors`). Tensors are
converted back to PyTorch layout (names by `flax_path_to_torch_key`, kernels transposed) and
streamed into the file one at a time, so writing needs no second copy of the parameters.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import linen as nn

from ..errors import CheckpointError, ConfigError
from ..models.params import count_params, flatten
from .components import normalized_config
from .jax_format import _cast, _tree_dtype, atomic_directory, module_config
from .paths import copy_tree, read_json, safe_join
from .safetensors_file import _NAMES
from .state_dict import flax_path_to_torch_key

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
_TRANSFORMERS_MODEL_TYPES = {
    "CLIPTextModel": "clip_text_model", "CLIPTextModelWithProjection": "clip_text_model",
    "CLIPVisionModel": "clip_vision_model", "CLIPVisionModelWithProjection": "clip_vision_model",
}
# pipeline slots diffusers' SD pipelines declare that a converted checkpoint leaves empty
_EMPTY_SLOTS = ("safety_checker", "feature_extractor", "image_encoder")
# pipelines whose slots differ: Depth2Img has a depth estimator (MiDaS in an LDM file, not converted)
# and no safety checker, so no requires_safety_checker either
# SDXL's pipelines have no safety checker; the refiner (img2img) has no first text encoder either
_CLASS_SLOTS = {"StableDiffusionDepth2ImgPipeline": ("depth_estimator", "feature_extractor"),
                "StableDiffusionXLPipeline": ("image_encoder", "feature_extractor"),
                "StableDiffusionXLImg2ImgPipeline": ("text_encoder", "tokenizer", "image_encoder", "feature_extractor"),
                "StableDiffusionXLInpaintPipeline": ("text_encoder", "tokenizer", "image_encoder", "feature_extractor")}
# model_index.json's `_diffusers_version`: the release this layout was checked against (diffusers'
# StableDiffusionInpaintPipeline.from_pretrained fails without the field)
DIFFUSERS_VERSION = "0.42.1"


def write_safetensors_streaming(
    path: str | os.PathLike,
    entries: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time by `entries`' loaders.

    The header is built from the declared names, shapes and dtypes first; each produced array is
    checked against its declaration.
    """
    entries = list(entries)
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, shape, dtype, _ in entries:
        kind = _NAMES.get(np.dtype(dtype))
        if kind is None:
            raise CheckpointError(f"cannot store tensor {name!r} of dtype {dtype} in safetensors")
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, load in entries:
            a = np.ascontiguousarray(load())
            if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: tensor {name!r} came out as {a.dtype}{a.shape}, "
                                      f"declared {np.dtype(dtype)}{tuple(shape)}")
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(a.tobytes())


def torch_entries(params: Any) -> list:
    """(torch name, torch shape, dtype, loader) per parameter, in PyTorch layout."""
    out = []
    for path, leaf in flatten(params).items():
        name = flax_path_to_torch_key(path)
        shape = tuple(leaf.shape)
        kind = path.rpartition("/")[2]
        if kind == "kernel" and len(shape) == 4:
            tshape, perm = (shape[3], shape[2], shape[0], shape[1]), (3, 2, 0, 1)
        elif kind == "kernel" and len(shape) == 2:
            tshape, perm = (shape[1], shape[0]), (1, 0)
        else:
            tshape, perm = shape, None
        out.append((name, tshape, np.dtype(leaf.dtype),
                    (lambda leaf=leaf, perm=perm: np.transpose(np.asarray(leaf), perm) if perm else np.asarray(leaf))))
    return out


def write_model_folder(folder: Path, config: Mapping[str, Any], params: Any) -> int:
    """Write one diffusers (or transformers, for CLIP) model folder; returns the parameter count."""
    folder.mkdir(parents=True, exist_ok=True)
    config = normalized_config(dict(config), f"{folder.name} config")
    cls = config["_class_name"]
    if cls in _TRANSFORMERS_MODEL_TYPES:
        out = {k: v for k, v in config.items() if k != "_class_name"}
        out.update(architectures=[cls], model_type=_TRANSFORMERS_MODEL_TYPES[cls], dtype=_torch_dtype_name(params))
        (folder / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        weights = folder / TRANSFORMERS_WEIGHTS
    else:
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        weights = folder / DIFFUSERS_WEIGHTS
    write_safetensors_streaming(weights, torch_entries(params), metadata={"format": "pt"})
    return count_params(params)


def _torch_dtype_name(params: Any) -> str:
    name = _tree_dtype(params)
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _tokenizer_class(folder: Path) -> str:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return "CLIPTokenizer"
    name = read_json(path, "tokenizer config").get("tokenizer_class")
    return name if isinstance(name, str) and name else "CLIPTokenizer"


class DiffusersWriter:
    """Writes components one at a time into `root`: a model folder for one, a pipeline folder for several."""

    def __init__(self, root: Path, single: bool):
        self.root = Path(root)
        self.single = single
        self.classes: dict[str, str] = {}

    def add(self, name: str, config: Mapping[str, Any], params: Any) -> int:
        """Write component `name` (config with `_class_name`, Flax params) as a diffusers model folder.

        The folder is `root` itself for a single component, else `root/name`; weights are written as
        PyTorch-layout safetensors in the params' dtype. Returns the parameter count. Raises
        `CheckpointError` for a name that is not a plain folder name, `ConfigError` for an invalid config.
        """
        folder = self.root if self.single else safe_join(self.root, name, f"component name {name!r}", single=True)
        n = write_model_folder(folder, config, params)
        self.classes[name] = dict(config)["_class_name"]
        return n

    def finish(self, *, pipeline_class: str | None, tokenizers: Mapping[str, Path] | None = None,
               scheduler_config: Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None) -> None:
        """Write the pipeline's `model_index.json`, the tokenizer folders and `scheduler/scheduler_config.json`.

        Does nothing for a single component. `pipeline_class` defaults to "DiffusionPipeline"; a
        StableDiffusion* pipeline gets empty safety_checker/feature_extractor/image_encoder slots,
        StableDiffusionDepth2ImgPipeline empty depth_estimator/feature_extractor ones; `options` (the
        pipeline's settings, e.g. SDXL's force_zeros_for_empty_prompt) go in as they are. Raises
        `CheckpointError` for a tokenizer name that is not a plain folder name, or a tokenizer folder
        that cannot be copied.
        """
        if self.single:
            return
        index: dict[str, Any] = {"_class_name": pipeline_class or "DiffusionPipeline",
                                 "_diffusers_version": DIFFUSERS_VERSION}
        for name, cls in self.classes.items():
            index[name] = ["transformers" if cls in _TRANSFORMERS_MODEL_TYPES else "diffusers", cls]
        for name, folder in (tokenizers or {}).items():
            copy_tree(folder, safe_join(self.root, name, f"tokenizer name {name!r}", single=True),
                      f"tokenizer {name!r} ({folder})")
            index[name] = ["transformers", _tokenizer_class(folder)]
        if scheduler_config is not None:
            (self.root / "scheduler").mkdir()
            (self.root / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(dict(scheduler_config), indent=2, sort_keys=True) + "\n")
            index["scheduler"] = ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")]
        if pipeline_class in _CLASS_SLOTS:
            for slot in _CLASS_SLOTS[pipeline_class]:
                index.setdefault(slot, [None, None])
        elif pipeline_class and pipeline_class.startswith("StableDiffusion"):
            for slot in _EMPTY_SLOTS:
                index.setdefault(slot, [None, None])
            index["requires_safety_checker"] = False
        index.update(options or {})
        (self.root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_diffusers(
    path: str | os.PathLike,
    components: Mapping[str, tuple[nn.Module, Any]],
    *,
    dtype: Any = None,
    pipeline_class: str | None = None,
    tokenizers: Mapping[str, str | os.PathLike] | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `{name: (module, params)}` as a diffusers model folder (one) or pipeline folder (several), atomically.

    `dtype` casts floating-point parameters ("float32", "bfloat16", "float16"); None keeps them.
    """
    if not components:
        raise ConfigError("export_diffusers: no components given")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        writer = DiffusersWriter(tmp, single=len(components) == 1)
        for name, (module, params) in components.items():
            writer.add(name, module_config(module), _cast(params, dtype))
        writer.finish(pipeline_class=pipeline_class, tokenizers={k: Path(v) for k, v in (tokenizers or {}).items()},
                      scheduler_config=scheduler_config)
    return Path(os.path.abspath(path))
