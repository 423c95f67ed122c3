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


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word: characters (the last one with `</w>`), then repeatedly the
    lowest-ranked adjacent pair merged everywhere it occurs, until no ranked pair is left."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_vocabulary(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a CLIP BPE in which each of `words` is exactly one token.

    Words are added in order. For each, BPE runs with the merges so far, and while the word is
    still in several pieces the merge of its first two pieces is appended (lowest priority). A
    merge appended later never fires inside a word that earlier merges already join into one
    token, so every word stays whole (checked by `_bpe` on the finished list).
    """
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    tokens = ["!"] + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    words = list(dict.fromkeys(w for w in words if w))
    for w in words:
        parts = _bpe(w, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            parts = _bpe(w, ranks)
    broken = [w for w in words if len(_bpe(w, ranks)) != 1]
    if broken:  # cannot happen by the argument above; a guard against regressions
        raise AssertionError(f"words split by the word-level tokenizer: {broken}")
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in merges]


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
