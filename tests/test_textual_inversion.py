"""Textual inversion: diffusers' `learned_embeds` files, A1111 `.pt` (multi-vector) and
`.safetensors` give the same text embeddings as diffusers' `load_textual_inversion`; the stored
weights are untouched; bad files are refused naming the problem."""

import pickle

import jax
import numpy as np
import pytest

from jaxcontrol.convert.embedding_file import read_embedding, save_embedding
from jaxcontrol.convert.safetensors_file import save_safetensors
from jaxcontrol.errors import CheckpointError, ConfigError
from jaxcontrol.pipeline import Pipeline, encode_prompt
from jaxcontrol.testing.pipeline_parity import TINY_TEXT, save_tiny_pipeline
from jaxcontrol.vocabulary import TOKEN_TABLE, expand_prompt

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

DIM = TINY_TEXT["hidden_size"]
PROMPTS = ["a <cat-toy> circle with <style> background", "my-word green <style> square, <cat-toy>"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti")
    save_tiny_pipeline(root)
    rng = np.random.default_rng(0)
    single = root / "cat" / "learned_embeds.safetensors"
    single.parent.mkdir()
    save_embedding(single, "<cat-toy>", rng.normal(0, 0.3, (1, DIM)))  # what train_textual_inversion writes
    a1111_pt = root / "style.pt"
    torch.save({"string_to_param": {"*": torch.nn.Parameter(torch.tensor(rng.normal(0, 0.3, (3, DIM)),
                                                                        dtype=torch.float32))},
                "name": "<style>", "string_to_token": {"*": 265}, "step": 1500, "sd_checkpoint": "925997e9",
                "sd_checkpoint_name": "model"}, a1111_pt)
    a1111_st = root / "my-word.safetensors"
    save_safetensors(a1111_st, {"emb_params": rng.normal(0, 0.3, (2, DIM)).astype(np.float32)})
    return root, [single.parent, a1111_pt, a1111_st]


def _diffusers_embeddings(root, files):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(root / "pipeline", safety_checker=None,
                                                            requires_safety_checker=False)
    for f, token in zip(files, (None, None, "my-word")):
        ref.load_textual_inversion(str(f), token=token)
    with torch.no_grad():
        embeds, _ = ref.encode_prompt(PROMPTS, "cpu", 1, False)
    return ref, embeds.numpy()


def test_embeddings_match_diffusers_load_textual_inversion(files):
    root, paths = files
    ref, want = _diffusers_embeddings(root, paths)
    pipe = Pipeline.from_pretrained(root / "pipeline")
    table_before = np.asarray(jax.tree_util.tree_leaves(pipe.bundle.params["text_encoder"])[0]).copy()
    stored = {k: np.asarray(v).copy() for k, v in pipe.bundle.params["text_encoder"]["text_model"]["embeddings"][
        "token_embedding"].items()}
    added = pipe.load_textual_inversion(paths)
    assert added == ["<cat-toy>", "<style>", "my-word"]
    assert pipe.embeddings["<style>"] == ["<style>", "<style>_1", "<style>_2"]
    ids = pipe.token_ids(PROMPTS)
    ref_ids = ref.tokenizer([ref.maybe_convert_prompt(p, ref.tokenizer) for p in PROMPTS], padding="max_length",
                            max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, ref_ids)
    got = np.asarray(encode_prompt(pipe.text_encoder, pipe.params["text_encoder"], ids, None))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # the new words change the embeddings, and the stored weights are untouched
    assert expand_prompt("a <style>", pipe.tokenizer) == "a <style> <style>_1 <style>_2"
    for k, v in stored.items():
        assert np.asarray(pipe.bundle.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"][k]
                          ).tobytes() == v.tobytes()
    assert np.asarray(jax.tree_util.tree_leaves(pipe.bundle.params["text_encoder"])[0]).tobytes() == \
        table_before.tobytes()
    # a call runs with them, and unloading restores the table and the tokenizer
    out = pipe(PROMPTS[:1], height=16, width=16, num_inference_steps=2, output_type="float")
    assert out.shape == (1, 16, 16, 3) and pipe.last_settings["embeddings"]["my-word"] == ["my-word", "my-word_1"]
    pipe.unload_textual_inversion()
    assert pipe.embeddings == {} and "<style>" not in pipe.tokenizer.get_vocab()
    table = np.asarray(pipe.params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    assert table.tobytes() == stored["embedding"].tobytes()


def test_the_table_grows_when_the_vocabulary_is_full(files, tmp_path):
    """SD's tokenizer fills its 49408-row table: new tokens append rows (and the module's vocab_size)."""
    root, paths = files
    pipe = Pipeline.from_pretrained(root / "pipeline")
    n = len(pipe.tokenizer)
    from jaxcontrol.models.params import flatten

    flat = flatten(pipe.params["text_encoder"])
    small = dict(flat)
    small[TOKEN_TABLE] = flat[TOKEN_TABLE][:n]
    import dataclasses

    from jaxcontrol.models.params import unflatten
    from jaxcontrol.vocabulary import add_embeddings

    te = dataclasses.replace(pipe.text_encoder, config=dataclasses.replace(pipe.text_encoder.config, vocab_size=n))
    tok, te2, params, _ = add_embeddings(pipe.tokenizer, te, unflatten(small), [("<new>", np.ones((2, DIM)))])
    assert te2.config.vocab_size == n + 2 and flatten(params)[TOKEN_TABLE].shape == (n + 2, DIM)
    ids = tok(["<new>"])["input_ids"][0]
    assert n in ids
    out = te2.apply({"params": params}, np.asarray([tok(expand_prompt("<new>", tok), padding="max_length",
                                                        max_length=77)["input_ids"]]))
    assert np.isfinite(np.asarray(out.last_hidden_state)).all()


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_bad_embeddings_are_refused(files, tmp_path):
    root, paths = files
    pipe = Pipeline.from_pretrained(root / "pipeline")
    with pytest.raises(ConfigError, match="'red' is already in the tokenizer"):
        pipe.load_textual_inversion(paths[0], token="red")
    wide = tmp_path / "wide.safetensors"
    save_safetensors(wide, {"<wide>": np.zeros((1, DIM + 8), np.float32)})
    with pytest.raises(ConfigError, match=rf"shape \(1, {DIM + 8}\) do not fit .* width {DIM}"):
        pipe.load_textual_inversion(wide)
    two = tmp_path / "two.safetensors"
    save_safetensors(two, {"a": np.zeros((DIM,), np.float32), "b": np.zeros((DIM,), np.float32)})
    with pytest.raises(CheckpointError, match="holds one tensor"):
        read_embedding(two)
    sdxl = tmp_path / "xl.safetensors"
    save_safetensors(sdxl, {"clip_l": np.zeros((1, 768), np.float32), "clip_g": np.zeros((1, 1280), np.float32)})
    with pytest.raises(CheckpointError, match="SDXL"):
        read_embedding(sdxl)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"string_to_param": {"*": _Boom()}}, f)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        pipe.load_textual_inversion(evil)
    nan = tmp_path / "nan.safetensors"
    save_safetensors(nan, {"<nan>": np.full((DIM,), np.nan, np.float32)})
    with pytest.raises(CheckpointError, match="NaN"):
        read_embedding(nan)
    # one bad file among good ones: nothing is added
    with pytest.raises(ConfigError):
        pipe.load_textual_inversion([paths[0], (paths[1], "red")])
    assert pipe.embeddings == {} and "<cat-toy>" not in pipe.tokenizer.get_vocab()
