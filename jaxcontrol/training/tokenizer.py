"""A small word-level CLIP tokenizer for models trained from scratch.

A text encoder trained from scratch does not need CLIP's 49,408-token vocabulary: this trains a
byte-pair encoding with the `tokenizers` library on a dataset's caption words and writes it as a
`CLIPTokenizer` folder (the on-disk layout of Stable Diffusion's `tokenizer/`). Its vocabulary is
every printable ASCII character plus the merges up to whole words, so that the words of the
captions are one token each and anything else still tokenizes, in pieces.

    folder = write_word_tokenizer("tok", ["red", "circle", "with", "background"])
    tok = jaxcontrol.tokenizer.load_tokenizer(folder)
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path
from typing import Iterable

from ..atomic import atomic_directory

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"  # CLIP marks a word's last piece


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
    """(vocab, merges) of a CLIP-style BPE trained by the `tokenizers` library on `words`, in which
    each of them is exactly one token.

    The trainer sees every printable ASCII character (alone and word-final, CLIP's `</w>` form) as
    its alphabet and merges with no frequency floor and no size limit, so it keeps merging until
    every training word is whole. BOS and EOS come last, as in CLIP's vocabulary (the highest ids).
    Raises `AssertionError` if a word still splits (a guard against changes in `tokenizers`).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    words = list(dict.fromkeys(w for w in words if w))
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    bpe = Tokenizer(models.BPE(end_of_word_suffix=SUFFIX))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1 << 20, min_frequency=1, show_progress=False,
                                  initial_alphabet=chars + [c + SUFFIX for c in chars], end_of_word_suffix=SUFFIX)
    bpe.train_from_iterator(words, trainer)
    broken = [w for w in words if len(bpe.encode(w).tokens) != 1]
    if broken:  # the trainer stops only when no pair is left to merge; a guard against changes there
        raise AssertionError(f"words split by the word-level tokenizer: {broken}")
    learned = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(dict.fromkeys([t for t, _ in learned] + [BOS, EOS]))}
    with tempfile.TemporaryDirectory() as tmp:  # the trainer's merges, in rank order
        bpe.model.save(tmp)
        merges = [m for m in (Path(tmp) / "merges.txt").read_text().splitlines() if m and not m.startswith("#")]
    return vocab, merges


def write_word_tokenizer(folder: str | os.PathLike, words: Iterable[str], *, max_length: int = 77,
                         overwrite: bool = False) -> Path:
    """Write the tokenizer folder atomically and return its absolute path. `len(vocab.json)` is its
    vocabulary size. Raises `CheckpointError` when `folder` exists and not `overwrite`."""
    vocab, merges = word_vocabulary(list(words))
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **special}))
    return Path(os.path.abspath(folder))
