"""New words for the text encoder: textual-inversion embeddings added to a tokenizer and a CLIP
token-embedding table, as diffusers' `load_textual_inversion` adds them.

    tokenizer, text_encoder, params, added = add_embeddings(tokenizer, text_encoder, params,
                                                            [("<teal>", vectors)])   # vectors (n, dim)
    prompt = expand_prompt("a <teal> circle", tokenizer)   # "a <teal> <teal>_1 circle" for n = 2

Nothing is changed in place: the tokenizer is copied, the params get a new table (the rows of
the stored one are kept bit for bit), and the text encoder module is rebuilt only when the table
must grow past its `vocab_size`. A multi-vector embedding becomes tokens `tok`, `tok_1`, ...,
and `expand_prompt` writes them out where the prompt says `tok` (diffusers' `maybe_convert_prompt`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from .errors import ConfigError
from .models.params import flatten, unflatten

TOKEN_TABLE = "text_model/embeddings/token_embedding/embedding"


def token_table(params) -> Any:
    """The CLIP text encoder's token-embedding table (vocab, dim) in `params`."""
    flat = flatten(params)
    if TOKEN_TABLE not in flat:
        raise ConfigError(f"the text encoder params have no token-embedding table {TOKEN_TABLE!r}")
    return flat[TOKEN_TABLE]


def multi_vector_tokens(token: str, n: int) -> list[str]:
    """The tokens an n-vector embedding for `token` occupies: `token`, `token_1`, ..., `token_{n-1}`."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def add_embeddings(tokenizer, text_encoder, params, embeddings: Sequence[tuple[str, Any]]):
    """Add each (token, vectors (n, dim) or (dim,)) to a copy of `tokenizer` and to the table of
    text encoder `params`. Returns (tokenizer, text_encoder, params, {token: [its tokens]}).

    Raises `ConfigError` (nothing changed) for a token already in the vocabulary, as a token or
    as a whole word (`red` when the BPE vocabulary has `red</w>`), or given twice,
    vectors whose width is not the table's, empty or non-finite vectors."""
    table = token_table(params)
    dim = int(table.shape[1])
    vocab = tokenizer.get_vocab()
    plan: list[tuple[str, np.ndarray]] = []
    added: dict[str, list[str]] = {}
    for token, vectors in embeddings:
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise ConfigError(f"an embedding's token must be a non-empty word without surrounding spaces, "
                              f"got {token!r}")
        v = np.asarray(vectors, np.float32)
        v = v[None] if v.ndim == 1 else v
        if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] != dim:
            raise ConfigError(f"embedding {token!r}: vectors of shape {tuple(np.shape(vectors))} do not fit the text "
                              f"encoder, whose token embeddings have width {dim} (expected ({dim},) or (n, {dim}))")
        if not np.all(np.isfinite(v)):
            raise ConfigError(f"embedding {token!r}: its vectors hold NaN or infinity")
        names = multi_vector_tokens(token, v.shape[0])
        # a word the BPE vocabulary has whole ("red</w>") would be taken over in every prompt: refused too
        clash = [t for t in names if t in vocab or f"{t.lower()}</w>" in vocab
                 or any(t in known for known in added.values())]
        if clash or token in added:
            raise ConfigError(f"token {clash[0] if clash else token!r} is already in the tokenizer's vocabulary; "
                              f"choose another token for this embedding")
        added[token] = names
        plan.extend(zip(names, v))
    tokenizer = copy.deepcopy(tokenizer)
    ids = []
    for name, _ in plan:
        tokenizer.add_tokens(name)
        ids.append(int(tokenizer.convert_tokens_to_ids(name)))
    rows = max([int(table.shape[0])] + [i + 1 for i in ids])
    new = np.zeros((rows, dim), np.dtype(table.dtype))
    new[: table.shape[0]] = np.asarray(table)
    for i, (_, v) in zip(ids, plan):
        new[i] = v.astype(new.dtype)
    flat = dict(flatten(params))
    flat[TOKEN_TABLE] = jnp.asarray(new)
    if rows > text_encoder.config.vocab_size:
        text_encoder = dataclasses.replace(text_encoder,
                                           config=dataclasses.replace(text_encoder.config, vocab_size=rows))
    return tokenizer, text_encoder, unflatten(flat), added


def expand_prompt(prompt: str, tokenizer) -> str:
    """`prompt` with each multi-vector token `tok` written as `tok tok_1 ...` (diffusers'
    `_maybe_convert_prompt`, string replacement included)."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt
