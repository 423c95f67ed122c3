"""Textual-inversion embedding files: read the layouts in use, write diffusers'.

* diffusers (`learned_embeds.safetensors` / `.bin`, written by `train_textual_inversion.py`): one
  tensor named by its token, (dim,) or (n, dim).
* A1111 `.pt` / `.bin`: a dict with `string_to_param: {"*": (n, dim)}` and `name`; its `.safetensors`:
  one tensor `emb_params` (n, dim), named by the file (A1111 uses the file name as the word).
* A bare tensor pickle, with the token given.

* SDXL (`read_embedding_xl`): `clip_l` (n, 768) and `clip_g` (n, 1280), one per text encoder, in a
  `.safetensors` or a pickle, named by the file (or the token given).

Pickles go through torch's safe loader (tensors and plain containers only). `read_embedding`
refuses SDXL files by name, and `read_embedding_xl` single-encoder ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import CheckpointError
from .paths import file_or_named_in_folder
from .safetensors_file import SafetensorsFile, save_safetensors
from .sources import PICKLE_SUFFIXES, load_pickle_state_dict, torch_tensor_to_numpy

EMBEDDING_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


def _array(value, path: Path, what: str) -> np.ndarray:
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = torch_tensor_to_numpy(value)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"{path}: {what} is a {type(value).__name__}, not a tensor")
    a = np.asarray(value, np.float32)
    if a.ndim not in (1, 2) or a.size == 0:
        raise CheckpointError(f"{path}: {what} has shape {a.shape}; an embedding is (dim,) or (vectors, dim)")
    if not np.all(np.isfinite(a)):
        raise CheckpointError(f"{path}: {what} holds NaN or infinity")
    return a if a.ndim == 2 else a[None]


def read_embedding(path: str | os.PathLike, token: str | None = None, *,
                   unsafe_load_pickle: bool = False) -> tuple[str, np.ndarray]:
    """(token, vectors (n, dim) float32) from a textual-inversion file (or a folder holding
    `learned_embeds.safetensors`). `token` replaces the file's own word.

    Raises `CheckpointError` naming the file for a layout it is not, an SDXL embedding, several
    tensors where one is expected, a tensor of the wrong rank, NaN, or an unsafe pickle."""
    path = file_or_named_in_folder(path, EMBEDDING_NAMES, "embedding")
    if path.name.endswith(".safetensors"):
        f = SafetensorsFile(path)
        keys = f.keys()
        if {"clip_l", "clip_g"} & set(keys):
            raise CheckpointError(f"{path}: an SDXL embedding (clip_l / clip_g, one per text encoder); this model "
                                  f"has one CLIP text encoder")
        if keys == ["emb_params"]:
            return token or path.stem, _array(f.load("emb_params"), path, "emb_params")
        if len(keys) != 1:
            raise CheckpointError(f"{path}: a textual-inversion file holds one tensor named by its token (or A1111's "
                                  f"emb_params), found {len(keys)}: {keys[:8]}")
        return token or keys[0], _array(f.load(keys[0]), path, f"tensor {keys[0]!r}")
    if not path.name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: an embedding is a .safetensors, .bin or .pt file")
    state = load_pickle_state_dict(path, unsafe_load_pickle=unsafe_load_pickle)
    if not isinstance(state, Mapping):
        if token is None:
            raise CheckpointError(f"{path}: holds a bare tensor; give the token it stands for")
        return token, _array(state, path, "the tensor")
    if "string_to_param" in state:  # A1111
        params = state["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise CheckpointError(f"{path}: string_to_param must map '*' to the vectors")
        name = state.get("name")
        return token or (name if isinstance(name, str) and name else path.stem), _array(
            params["*"], path, "string_to_param['*']")
    if {"clip_l", "clip_g"} & set(state):
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l / clip_g); this model has one CLIP text encoder")
    if len(state) != 1:
        raise CheckpointError(f"{path}: a textual-inversion file holds one tensor named by its token (or A1111's "
                              f"string_to_param), found keys {sorted(map(str, state))[:8]}")
    (key, value), = state.items()
    return token or str(key), _array(value, path, f"tensor {key!r}")


def save_embedding(path: str | os.PathLike, token: str, vectors) -> Path:
    """Write diffusers' `learned_embeds.safetensors` layout ({token: (n, dim) float32}), atomically;
    a folder gets `learned_embeds.safetensors` inside."""
    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDING_NAMES[0]
    if not path.name.endswith(".safetensors"):
        raise CheckpointError(f"{path}: an embedding is written as a .safetensors file")
    save_safetensors(path, {token: np.asarray(vectors, np.float32)})
    return path


# SDXL embeddings: the keys for text_encoder (CLIP-L) and text_encoder_2 (OpenCLIP bigG)
XL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def read_embedding_xl(path: str | os.PathLike, token: str | None = None, *,
                      unsafe_load_pickle: bool = False) -> tuple[str, dict[str, np.ndarray]]:
    """(token, {"text_encoder": clip_l (n, D1), "text_encoder_2": clip_g (n, D2)}) from an SDXL
    textual-inversion file (or a folder holding `learned_embeds.safetensors`); the token is the
    file's name unless given. Raises `CheckpointError` naming the file for a file without both
    tensors, tensors of different vector counts, a bad tensor, or an unsafe pickle."""
    path = file_or_named_in_folder(path, EMBEDDING_NAMES, "embedding")
    if path.name.endswith(".safetensors"):
        f = SafetensorsFile(path)
        state = {k: f.load(k) for k in f.keys() if k in XL_KEYS.values()}
        keys = f.keys()
    elif path.name.endswith(PICKLE_SUFFIXES):
        loaded = load_pickle_state_dict(path, unsafe_load_pickle=unsafe_load_pickle)
        keys = sorted(map(str, loaded)) if isinstance(loaded, Mapping) else []
        state = {k: loaded[k] for k in XL_KEYS.values() if isinstance(loaded, Mapping) and k in loaded}
    else:
        raise CheckpointError(f"{path}: an embedding is a .safetensors, .bin or .pt file")
    missing = [k for k in XL_KEYS.values() if k not in state]
    if missing:
        raise CheckpointError(f"{path}: an SDXL embedding holds clip_l and clip_g (one per text encoder); "
                              f"missing {missing} (keys: {list(keys)[:8]}); an SD-1/2 embedding does not fit SDXL")
    vectors = {name: _array(state[key], path, f"tensor {key!r}") for name, key in XL_KEYS.items()}
    counts = {k: v.shape[0] for k, v in vectors.items()}
    if len(set(counts.values())) != 1:
        raise CheckpointError(f"{path}: clip_l and clip_g have different vector counts {counts}")
    return token or path.stem, vectors
