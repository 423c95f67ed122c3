"""Prompt tokenisation through transformers' tokenizers (`CLIPTokenizer`), as diffusers' pipelines do it.

    tok = load_tokenizer("sd15/tokenizer")
    ids = tokenize(tok, ["a red circle", "a blue square"])       # (2, 77) int32, padded and truncated
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import CheckpointError

CLIP_MAX_LENGTH = 77
_UNSET = int(1e20)  # transformers' model_max_length when a tokenizer config does not give one


def load_tokenizer(folder: str | os.PathLike):
    """A transformers tokenizer (`AutoTokenizer`, no network) from a local folder
    (`tokenizer_config.json` with `vocab.json` + `merges.txt`, or `tokenizer.json`).

    Raises `CheckpointError` when `folder` is not a directory, holds a link to a folder, a link
    resolving outside it or a non-regular file (FIFO, device), or transformers cannot load it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no tokenizer folder")
    from .convert.paths import check_tree

    # regular files only, none resolving outside the folder (a Hugging Face snapshot's blobs/ excepted):
    # transformers would block on a FIFO and read whatever a link points to
    check_tree(folder, f"tokenizer folder {folder}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/TypeError for broken folders
        raise CheckpointError(f"{folder}: cannot load tokenizer: {e}") from e


def max_length_of(tokenizer) -> int:
    """The tokenizer's `model_max_length`, or 77 (CLIP's) when its config leaves it unset."""
    n = getattr(tokenizer, "model_max_length", None)
    return CLIP_MAX_LENGTH if n is None or n >= _UNSET else int(n)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids padded to `max_length` (the tokenizer's `model_max_length`, 77 for CLIP) and truncated.

    Matches diffusers' `encode_prompt`: `padding="max_length", truncation=True`, so a long prompt
    keeps its BOS and ends in EOS at the last position. Truncation is reported with a warning that
    names the dropped text, as diffusers logs it. Returns (len(prompts), max_length) int32.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    n = max_length or max_length_of(tokenizer)
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="np")["input_ids"]
    for i, prompt in enumerate(prompts):
        full = tokenizer(prompt)["input_ids"]
        if len(full) > n:
            dropped = tokenizer.decode(full[n - 1 : -1])
            warnings.warn(f"prompt {i} was truncated to {n} tokens; dropped: {dropped!r}", stacklevel=2)
    return ids.astype(np.int32)
