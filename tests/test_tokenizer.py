"""Tokenisation as diffusers' pipelines do it, with a CLIP tokenizer built offline from a tiny vocab."""

import json

import numpy as np
import pytest

from jaxcontrol import CheckpointError
from jaxcontrol.tokenizer import load_tokenizer, tokenize

WORDS = ["a", "red", "blue", "circle", "square", "with", "light", "background", "green"]


def tiny_clip_tokenizer(folder, pad_token="<|endoftext|>"):
    """A CLIP BPE tokenizer folder over characters and whole words, in the on-disk layout of SD's
    `tokenizer/` (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    chars = sorted({c for w in WORDS for c in w})
    vocab_tokens = ["!"] + chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:  # merge left to right into the whole word
        cur = w[0]
        for j, c in enumerate(w[1:], start=1):
            nxt = c + "</w>" if j == len(w) - 1 else c
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            vocab_tokens.append(cur)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special})
    )


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"], ids=["sd1-pad-eos", "sd2-pad-bang"])
def test_padding_and_truncation(tmp_path, pad_token):
    tiny_clip_tokenizer(tmp_path, pad_token)
    tok = load_tokenizer(tmp_path)
    ids = tokenize(tok, ["a red circle with light blue background", "green square"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    n = len(tok("a red circle with light blue background")["input_ids"])
    assert ids[0, 0] == bos and ids[0, n - 1] == eos and (ids[0, n:] == pad).all()
    assert tok.decode(ids[1], skip_special_tokens=True).strip() == "green square"
    # identical to diffusers' encode_prompt call
    ref = tok(["green square"], padding="max_length", max_length=77, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids[1], ref["input_ids"][0])
    with pytest.warns(UserWarning, match="truncated to 77 tokens; dropped: 'red red"):
        long = tokenize(tok, " ".join(["a"] * 75 + ["red"] * 3))
    assert long.shape == (1, 77) and long[0, -1] == eos and long[0, 0] == bos


def test_broken_tokenizer_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer folder"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)
