"""infer.py --lora PATH[:SCALE] (merged or unmerged: the same images) and --embedding PATH[:TOKEN]
on a tiny random pipeline folder, recorded in the sidecar; their usage errors before any load."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxcontrol.commands import infer
from jaxcontrol.convert.embedding_file import save_embedding
from jaxcontrol.convert.lora_file import save_lora
from jaxcontrol.models.lora import Lora, init_lora, lora_targets
from jaxcontrol.pipeline import Pipeline
from jaxcontrol.testing.pipeline_parity import TINY_TEXT, save_tiny_pipeline

pytest.importorskip("torch")
pytest.importorskip("diffusers")

FAST = ["--steps", "2", "--no-progress", "--height", "16", "--width", "16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_cli")
    save_tiny_pipeline(root)
    pipe = Pipeline.from_pretrained(root / "pipeline")
    unet = pipe.params["unet"]
    layers = init_lora(unet, lora_targets(unet, ["to_q", "to_k", "conv1"]), rank=2, alpha=4, seed=0)
    rng = np.random.default_rng(0)
    layers = {m: {**v, "up": jnp.asarray(rng.normal(0, 0.3, v["up"].shape), jnp.float32)} for m, v in layers.items()}
    save_lora(Lora("style", {"unet": layers}), root / "style.safetensors")
    save_embedding(root / "word.safetensors", "<word>", rng.normal(0, 0.3, (2, TINY_TEXT["hidden_size"])))
    return root


def _run(capsys, *argv):
    code = infer.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_lora_fused_and_unmerged_give_the_same_image_and_are_recorded(tiny, tmp_path, capsys):
    images = {}
    for mode in ("merged", "unmerged"):
        out = tmp_path / mode
        code, err = _run(capsys, "--model", tiny / "pipeline", "--prompt", "a red <word> circle",
                         "--lora", f"{tiny / 'style.safetensors'}:0.7", "--lora-mode", mode,
                         "--embedding", f"{tiny / 'word.safetensors'}", *FAST, "--output", out)
        assert code == 0, err
        side = json.loads((out / "image_00000.json").read_text())
        assert side["loras"] == [{"name": "style", "source": str(tiny / "style.safetensors"), "format": "peft",
                                  "scale": 0.7, "fused": mode == "merged"}]
        assert side["lora_files"][0]["scale"] == 0.7 and len(side["lora_files"][0]["sha256"]) == 64
        assert side["lora_mode"] == mode and side["embeddings"] == {"<word>": ["<word>", "<word>_1"]}
        assert side["embedding_files"][0]["token"] is None
        images[mode] = np.asarray(Image.open(out / "image_00000.png"), np.int16)
    assert np.abs(images["merged"] - images["unmerged"]).max() <= 1


@pytest.mark.parametrize("flags, message", [
    (["--lora", "missing.safetensors"], "--lora missing.safetensors: no such file"),
    (["--lora", "{root}/style.safetensors:strong"], "'strong' is not a scale"),
    (["--lora", "{root}/style.safetensors:nan"], "finite"),
    (["--embedding", "{root}/word.safetensors:"], "empty token"),
    (["--embedding", "nope.pt:<x>"], "--embedding nope.pt: no such file"),
])
def test_usage_errors(tiny, tmp_path, capsys, flags, message):
    flags = [f.replace("{root}", str(tiny)) for f in flags]
    code, err = _run(capsys, "--model", tiny / "pipeline", "--prompt", "x", *flags, *FAST, "--output", tmp_path)
    assert code == 2 and message in err, err


def test_a_lora_for_another_model_is_a_runtime_error_naming_the_key(tiny, tmp_path, capsys):
    from jaxcontrol.convert.safetensors_file import save_safetensors

    bad = tmp_path / "bad.safetensors"
    save_safetensors(bad, {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": np.zeros((2, 8), np.float32),
                           "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": np.zeros((8, 2), np.float32)})
    code, err = _run(capsys, "--model", tiny / "pipeline", "--prompt", "x", "--lora", bad, *FAST,
                     "--output", tmp_path / "o")
    assert code == 1 and "down_blocks_7_attentions_0_proj_in" in err and not (tmp_path / "o").exists()
