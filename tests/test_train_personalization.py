"""train.py's tasks lora, textual_inversion and dreambooth on a tiny random pipeline saved by
diffusers: what trains (and nothing else), exports that diffusers loads and that give our outputs,
DreamBooth's prior-preservation loss and cached class images, sharding, and resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxcontrol.errors import ConfigError
from jaxcontrol.models.params import flatten
from jaxcontrol.training import Run, default_config, train
from jaxcontrol.training import losses
from jaxcontrol.training.networks import text_encoder_params, unet_params
from jaxcontrol.training.step import DEVICE_KEYS
from jaxcontrol.testing.pipeline_parity import save_tiny_pipeline
from _smoke import set_keys

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

RES = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("personal")
    save_tiny_pipeline(root)
    data = root / "data"
    data.mkdir()
    lines = []
    for i in range(4):
        a = np.zeros((RES, RES, 3), np.uint8)
        a[...] = (0, 128, 128)
        a[3 + i:11, 4:12 - i] = (255, 255, 255)
        Image.fromarray(a).save(data / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": "a <teal> square"}))
    (data / "m.jsonl").write_text("\n".join(lines))
    return root


def _config(tiny, task, **overrides):
    c = default_config()
    c.task = task
    c.model.pretrained_path = str(tiny / "pipeline")
    c.data.dataset = "folder"
    c.data.train_manifest = str(tiny / "data" / "m.jsonl")
    c.data.resolution = RES
    c.data.read_threads = 1
    c.data.prefetch = 2
    c.mesh.num_devices = 1
    c.steps, c.batch_size = 3, 2
    c.log.every, c.log.progress_bar, c.log.tensorboard = 1, False, False
    c.checkpoint.every = 2
    c.validation.at_end = False
    c.export.jaxcontrol = False
    c.compiler_options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return set_keys(c, overrides)


def _reference(tiny):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny / "pipeline", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _images(ref, prompts, noise, **kw):
    with torch.no_grad():
        return ref(prompts, latents=noise, height=RES, width=RES, num_inference_steps=3, guidance_scale=5.0,
                   output_type="np", **kw).images


def test_lora_trains_only_factors_and_its_export_loads_in_diffusers_with_our_outputs(tiny, tmp_path):
    from jaxcontrol.pipeline import Pipeline

    c = _config(tiny, "lora", **{"lora.text_encoder": True, "lora.rank": 2, "lora.alpha": 4.0,
                                 "lora.unet_target_modules": ("to_q", "to_v", "conv1"), "optim.learning_rate": 3e-2,
                                 "mesh.num_devices": -1, "mesh.fsdp": 2, "mesh.min_shard_size": 64, "batch_size": 8})
    with Run(c, tmp_path / "run") as run:  # sharded: data=4 x fsdp=2 when 8 devices are simulated
        assert set(run.state.params) == {"lora"} and set(run.state.params["lora"]) == {"unet", "text_encoder"}
        leaves = flatten(run.state.params["lora"])
        assert leaves and all(k.endswith(("/down", "/up")) for k in leaves)  # multipliers stay frozen
        assert all(np.all(np.asarray(v) == 0) for k, v in leaves.items() if k.endswith("/up"))  # starts at the base
    summary = train(c, tmp_path / "run")
    lora_file = summary["exported"]["lora"]
    noise = torch.randn(2, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a green square"]
    ref = _reference(tiny)
    plain = _images(ref, prompts, noise)
    ref.load_lora_weights(lora_file.rsplit("/", 1)[0])
    want = _images(ref, prompts, noise)
    assert np.abs(want - plain).max() > 1e-3  # the training moved something
    ours = Pipeline.from_pretrained(tiny / "pipeline", loras=[lora_file])
    got = ours(prompts, height=RES, width=RES, num_inference_steps=3, guidance_scale=5.0, scheduler="ddim",
               latents=noise.numpy().transpose(0, 2, 3, 1), output_type="float")
    assert np.abs(got - want).max() < 1e-4
    # and the export equals the trained params merged: the run's own U-Net / text encoder with the deltas
    with Run(c, tmp_path / "run") as run:  # restores the final checkpoint
        trained = jax.tree_util.tree_map(np.asarray, run.state.params)
        frozen = jax.tree_util.tree_map(np.asarray, run.frozen)
    merged = flatten(unet_params(trained, frozen))
    ours.fuse_loras()
    for k, v in flatten(ours.params["unet"]).items():
        np.testing.assert_allclose(np.asarray(v), merged[k], atol=1e-6, err_msg=k)
    te = flatten(text_encoder_params(trained, frozen))
    for k, v in flatten(ours.params["text_encoder"]).items():
        np.testing.assert_allclose(np.asarray(v), te[k], atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_textual_inversion_trains_the_new_rows_only_and_resumes_exactly(tiny, tmp_path):
    c = _config(tiny, "textual_inversion", **{"textual_inversion.placeholder_token": "<teal>",
                                              "textual_inversion.initializer_token": "blue",
                                              "textual_inversion.num_vectors": 2, "optim.learning_rate": 5e-2,
                                              "steps": 4})
    full = train(c, tmp_path / "full")
    with Run(c, tmp_path / "full") as run:
        assert set(run.state.params) == {"token_embeddings"} and run.state.params["token_embeddings"].shape[0] == 2
        assert run.nets.placeholder == ("<teal>", ("<teal>", "<teal>_1"))
        ids = run.nets.token_ids(["a <teal> square"])[0]
        pid = np.asarray(run.frozen["placeholder_ids"])
        assert all(i in ids for i in pid)  # the word is written out as its two tokens
        rows = np.asarray(run.state.params["token_embeddings"])
        blue = np.asarray(run.frozen["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])[
            run.nets.tokenizer("blue", add_special_tokens=False)["input_ids"][0]]
        assert np.abs(rows - blue).max() > 1e-3  # trained away from the initializer word
    # resume: two steps, then two more in the same workdir, give the uninterrupted run's weights
    half = _config(tiny, "textual_inversion", **{"textual_inversion.placeholder_token": "<teal>",
                                                 "textual_inversion.initializer_token": "blue",
                                                 "textual_inversion.num_vectors": 2, "optim.learning_rate": 5e-2,
                                                 "steps": 2})
    train(half, tmp_path / "resumed")
    again = train(c, tmp_path / "resumed")
    assert again["restored_from"] == 2 and again["last_loss"] == full["last_loss"]
    from safetensors.numpy import load_file

    a = load_file(full["exported"]["textual_inversion"])["<teal>"]
    b = load_file(again["exported"]["textual_inversion"])["<teal>"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, rows)
    # diffusers loads the export and encodes the word with our rows
    ref = _reference(tiny)
    ref.load_textual_inversion(full["exported"]["textual_inversion"])
    table = ref.text_encoder.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_allclose(table[ref.tokenizer.convert_tokens_to_ids(["<teal>", "<teal>_1"])], rows, atol=1e-7)


def test_prior_preservation_weights_are_diffusers_loss():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(6, 2, 2, 4)), rng.normal(size=(6, 2, 2, 4))
    per = ((pred - target) ** 2).mean(axis=(1, 2, 3))
    want = per[:3].mean() + 0.7 * per[3:].mean()
    got = losses.diffusion_loss(jnp.asarray(pred), jnp.asarray(target), losses.prior_preservation_weights(3, 3, 0.7))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.mark.slow
def test_dreambooth_with_prior_preservation_generates_and_caches_class_images(tiny, tmp_path):
    c = _config(tiny, "dreambooth", **{"dreambooth.instance_prompt": "a sks square",
                                       "dreambooth.with_prior_preservation": True,
                                       "dreambooth.class_prompt": "a square\na red square",
                                       "dreambooth.num_class_images": 10, "dreambooth.class_num_inference_steps": 2,
                                       "dreambooth.prior_loss_weight": 0.5, "steps": 2})
    summary = train(c, tmp_path / "run")
    folder = tmp_path / "run" / "class_images"
    pngs = sorted(folder.glob("class_*.png"))
    assert len(pngs) == 10 and Image.open(pngs[0]).size == (RES, RES)
    manifest = [json.loads(x) for x in (folder / "manifest_10.jsonl").read_text().splitlines()]
    assert [m["text"] for m in manifest[:3]] == ["a square", "a red square", "a square"]
    assert "diffusers/pipeline" in summary["exported"]
    with Run(c, tmp_path / "run") as run:
        assert set(run.state.params) == {"unet"}
        assert {"class_pixel_values", "class_input_ids"} <= set(run.batch_keys) <= set(DEVICE_KEYS)
        batch = next(iter(run.dataset))
        assert batch["class_pixel_values"].shape == batch["pixel_values"].shape
        assert set(batch["caption"].tolist()) == {"a sks square"}
    # cached: a second run regenerates nothing; other settings in the same folder are refused
    stamp = [p.stat().st_mtime_ns for p in pngs]
    c2 = _config(tiny, "dreambooth", **{"dreambooth.instance_prompt": "a sks square",
                                        "dreambooth.with_prior_preservation": True,
                                        "dreambooth.class_prompt": "a square\na red square",
                                        "dreambooth.num_class_images": 10, "dreambooth.class_num_inference_steps": 2,
                                        "dreambooth.class_data_dir": str(folder), "steps": 1})
    train(c2, tmp_path / "again")
    assert [p.stat().st_mtime_ns for p in pngs] == stamp
    c2.dreambooth.class_prompt = "a circle"
    with pytest.raises(ConfigError, match="prompts"):
        train(c2, tmp_path / "third")


@pytest.mark.parametrize("overrides, key", [
    ({"task": "textual_inversion"}, "textual_inversion.placeholder_token"),
    ({"task": "textual_inversion", "textual_inversion.placeholder_token": "<x>"}, "textual_inversion.initializer_token"),
    ({"task": "lora", "lora.rank": 0}, "lora.rank"),
    ({"task": "lora", "lora.unet_target_modules": ()}, "lora.unet_target_modules"),
    ({"task": "dreambooth", "dreambooth.with_prior_preservation": True}, "dreambooth.class_prompt"),
    ({"task": "unet", "dreambooth.use_lora": True}, "dreambooth"),
    ({"task": "lora", "lora.text_encoder": True, "data.precompute": True}, "data.precompute"),
    ({"task": "unet", "textual_inversion.placeholder_token": "<x>"}, "textual_inversion.placeholder_token"),
    ({"task": "dreambooth", "textual_inversion.placeholder_token": "<x>"}, "textual_inversion.placeholder_token"),
    ({"task": "lora", "textual_inversion.placeholder_token": "<x>"}, "textual_inversion.initializer_token"),
    ({"task": "lora", "textual_inversion.placeholder_token": "<x>", "textual_inversion.initializer_token": "blue",
      "data.precompute": True}, "data.precompute"),
])
def test_config_errors_name_the_key(tiny, overrides, key):
    from jaxcontrol.training import check_config

    c = set_keys(_config(tiny, "unet"), overrides)
    with pytest.raises(ConfigError, match=f"config.{key}"):
        check_config(c)


def test_initializer_word_of_several_tokens_and_a_taken_word_are_refused(tiny, tmp_path):
    c = _config(tiny, "textual_inversion", **{"textual_inversion.placeholder_token": "<teal>",
                                              "textual_inversion.initializer_token": "bluegreen"})
    with pytest.raises(ConfigError, match="initializer_token.*tokens"):
        Run(c, tmp_path / "a")
    c.textual_inversion.initializer_token = "blue"
    c.textual_inversion.placeholder_token = "red"
    with pytest.raises(ConfigError, match="placeholder_token.*already"):
        Run(c, tmp_path / "b")


@pytest.mark.slow
def test_dreambooth_variants_train_the_text_encoder_or_lora_and_export_them(tiny, tmp_path):
    from safetensors.numpy import load_file

    from jaxcontrol.convert import load_model

    c = _config(tiny, "dreambooth", **{"dreambooth.instance_prompt": "a sks square",
                                       "dreambooth.train_text_encoder": True, "optim.learning_rate": 1e-2,
                                       "steps": 2, "export.jaxcontrol": True})
    summary = train(c, tmp_path / "full")
    with Run(c, tmp_path / "full") as run:
        assert set(run.state.params) == {"unet", "text_encoder"} and "text_encoder" not in run.frozen
    _, base = load_model(tiny / "pipeline" / "text_encoder")
    _, tuned = load_model(summary["exported"]["jaxcontrol/pipeline"] + "/text_encoder")
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(tuned)))
    assert diff > 1e-4  # the exported pipeline carries the trained text encoder
    c = _config(tiny, "dreambooth", **{"dreambooth.instance_prompt": "a sks square", "dreambooth.use_lora": True,
                                       "dreambooth.train_text_encoder": True, "steps": 2})
    summary = train(c, tmp_path / "lora")
    keys = load_file(summary["exported"]["lora"]).keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)


@pytest.mark.slow
def test_pivotal_tuning_trains_a_new_word_with_the_lora_and_diffusers_loads_both(tiny, tmp_path):
    """A LoRA run naming textual_inversion.placeholder_token trains the word's rows with the factors
    (the text encoder's weights stay frozen); diffusers' load_lora_weights + load_textual_inversion
    of the two exports gives our images for prompts with and without the word."""
    from jaxcontrol.pipeline import Pipeline

    c = _config(tiny, "dreambooth", **{"dreambooth.use_lora": True, "lora.rank": 2,
                                       "textual_inversion.placeholder_token": "<teal>",
                                       "textual_inversion.initializer_token": "blue",
                                       "textual_inversion.num_vectors": 2, "optim.learning_rate": 3e-2, "steps": 3})
    summary = train(c, tmp_path / "run")
    assert set(summary["exported"]) == {"lora", "textual_inversion"}
    with Run(c, tmp_path / "run") as run:
        assert set(run.state.params) == {"lora", "token_embeddings"} and set(run.state.params["lora"]) == {"unet"}
        rows = np.asarray(run.state.params["token_embeddings"])
        blue = np.asarray(run.frozen["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])[
            run.nets.tokenizer("blue", add_special_tokens=False)["input_ids"][0]]
        assert rows.shape[0] == 2 and np.abs(rows - blue).max() > 1e-3  # the word trained
    noise = torch.randn(2, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(1))
    prompts = ["a <teal> square", "a red circle"]
    ref = _reference(tiny)
    ref.load_lora_weights(summary["exported"]["lora"].rsplit("/", 1)[0])
    ref.load_textual_inversion(summary["exported"]["textual_inversion"])
    want = _images(ref, prompts, noise)
    ours = Pipeline.from_pretrained(tiny / "pipeline", loras=[summary["exported"]["lora"]])
    ours.load_textual_inversion(summary["exported"]["textual_inversion"])
    got = ours(prompts, height=RES, width=RES, num_inference_steps=3, guidance_scale=5.0, scheduler="ddim",
               latents=noise.numpy().transpose(0, 2, 3, 1), output_type="float")
    assert np.abs(got - want).max() < 1e-4
