"""A small word-level CLIP tokenizer for models trained from scratch.

A text encoder trained from scratch does not need CLIP's 49,408-token vocabulary: this writes a
`CLIPTokenizer` folder (the on-disk layout of Stable Diffusion's `tokenizer/`) whose vocabulary is
every printable ASCII character plus whole words, so that the words of a dataset's captions are
one token each and anything else still tokenizes, character by character.

    folder = write_word_tokenizer("tok", ["red", "circle", "with", "background"])
    tok = jaxcontrol.tokenizer.load_tokenizer(folder)
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Iterable

from ..convert.jax_format import atomic_directory

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def caption_words(captions: Iterable[str]) -> list[str]:
    """The distinct lower-case words of `captions`, in first-seen order."""
    seen: dict[str, None] = {}
    for caption in captions:
        for word in str(caption).lower().split():
            word = "".join(ch for ch in word if ch in string.ascii_lowercase + string.digits)
            if word:
                seen.setdefault(word, None)
    return list(seen)


def word_vocabulary(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a CLIP BPE whose merges build each word left to right."""
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    tokens = ["!"] + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for w in words:
        if len(w) < 2:
            continue
        cur = w[0]
        for j, c in enumerate(w[1:], start=1):
            nxt = c + "</w>" if j == len(w) - 1 else c
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            tokens.append(cur)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, list(dict.fromkeys(merges))


def write_word_tokenizer(folder: str | os.PathLike, words: Iterable[str], *, max_length: int = 77,
                         overwrite: bool = False) -> Path:
    """Write the tokenizer folder atomically and return its path. `len(vocab.json)` is its vocabulary size."""
    vocab, merges = word_vocabulary(list(words))
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **special}))
    return Path(os.path.abspath(folder))
