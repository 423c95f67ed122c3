"""Tokenisation as diffusers' pipelines do it, with a CLIP tokenizer built offline from a tiny vocab."""

import numpy as np
import pytest

from jaxcontrol import CheckpointError
from jaxcontrol.testing.reference import tiny_clip_tokenizer
from jaxcontrol.tokenizer import load_tokenizer, tokenize

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


def test_word_tokenizer_keeps_every_caption_word_whole(tmp_path):
    """Each caption word is one token even when words share letter pairs (r-e in "red" / "green",
    g-r in "background"), which a merge list built word by word got wrong."""
    from jaxcontrol.data.fill50k import DEFAULT_COLORS
    from jaxcontrol.tokenizer import load_tokenizer
    from jaxcontrol.training.tokenizer import caption_words, write_word_tokenizer

    words = caption_words([n for n, _ in DEFAULT_COLORS] + ["circle with background", "greenery reds"])
    tok = load_tokenizer(write_word_tokenizer(tmp_path / "tok", words))
    for w in words:
        assert len(tok(w)["input_ids"]) == 3, (w, tok(w)["input_ids"])  # BOS, the word, EOS
    ids = tok("green circle with red background")["input_ids"]
    assert len(ids) == 7 and len(set(ids[1:-1])) == 5
    assert len(tok("zebra")["input_ids"]) > 3  # other words still tokenize, in pieces
    assert ids[0] == len(tok) - 2 and ids[-1] == len(tok) - 1  # BOS, EOS last, as in CLIP's vocabulary
