"""CLIP text and vision encoders: parity with transformers, checkpoint layouts, configs, preprocessing."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jaxcontrol as jc
from jaxcontrol.convert import (
    SafetensorsFile,
    TensorSource,
    convert_to_flax,
    flax_to_torch_state_dict,
    open_weights,
    save_safetensors,
)
from jaxcontrol.models.clip import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    clip_preprocess,
    normalize_clip_keys,
    select_clip_tower,
)
from jaxcontrol.models.params import flatten, init_params, param_shapes
from jaxcontrol.testing.clip_parity import (
    CLIP_CASES,
    QUICK_CLIP_CASES,
    TINY_TEXT,
    TINY_VISION,
    run_clip_case,
)
from jaxcontrol.testing.parity import format_table
from jaxcontrol.testing.reference import randomize_

WEIGHTS = "model.safetensors"
SLOW_CLIP_CASES = tuple(n for n, c in CLIP_CASES.items() if c.slow)


def _assert_rows(rows):
    assert rows and all(r.ok for r in rows), "\n" + format_table(rows)


@pytest.mark.parametrize("name", QUICK_CLIP_CASES)
def test_parity(name):
    _assert_rows(run_clip_case(CLIP_CASES[name]))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_CLIP_CASES)
def test_parity_full_size(name):
    _assert_rows(run_clip_case(CLIP_CASES[name]))


# --- checkpoint layouts ----------------------------------------------------------------------------

TORCH_CLASSES = {
    "CLIPTextModel": (transformers.CLIPTextModel, transformers.CLIPTextConfig, TINY_TEXT, "text_model."),
    "CLIPTextModelWithProjection": (
        transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig, TINY_TEXT, "text_model."),
    "CLIPVisionModel": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig, TINY_VISION, "vision_model."),
    "CLIPVisionModelWithProjection": (
        transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig, TINY_VISION, "vision_model."),
}


def _state(path):
    f = SafetensorsFile(path)
    return {k: f.load(k) for k in f.keys()}


@pytest.mark.parametrize("name", list(TORCH_CLASSES))
def test_keys_with_and_without_tower_prefix(name, tmp_path):
    """transformers 5.x saves a bare CLIP{Text,Vision}Model unprefixed, 4.x (and *WithProjection) prefixed."""
    cls, config_cls, fields, prefix = TORCH_CLASSES[name]
    model = randomize_(cls(config_cls(**fields)))
    native = tmp_path / "native"
    model.save_pretrained(native)
    state = _state(native / WEIGHTS)
    bare_tower = not any(k.startswith(prefix) for k in state)
    assert bare_tower == (not name.endswith("WithProjection"))  # what this transformers version writes

    # the other layout: add the prefix to a bare tower, strip it from a prefixed one (heads stay put),
    # plus the position_ids buffer older transformers versions saved
    def toggle(k):
        if k.startswith(("text_projection.", "visual_projection.")):
            return k
        return prefix + k if bare_tower else k.removeprefix(prefix)

    other = {toggle(k): v for k, v in state.items()}
    n_pos = fields.get("max_position_embeddings") or (fields["image_size"] // fields["patch_size"]) ** 2 + 1
    other[toggle(prefix + "embeddings.position_ids")] = np.arange(n_pos, dtype=np.int64)[None]
    assert set(other) != set(state)
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    (flipped / "config.json").write_text((native / "config.json").read_text())
    save_safetensors(flipped / WEIGHTS, other)

    module, params = jc.load_model(native)
    module2, params2 = jc.load_model(flipped)
    assert type(module).__name__ == name and type(module2) is type(module)
    flat, flat2 = flatten(params), flatten(params2)
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(flat2[k]), err_msg=k)
    # every parameter arrives, bit for bit, under its transformers name (prefixed layout)
    back = flax_to_torch_state_dict(params)
    expected = {k if k.startswith((prefix, "text_projection.", "visual_projection.")) else prefix + k: v
                for k, v in state.items()}
    assert set(back) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # the loaded tree is the tree init_params builds
    init = init_params(module, jax.random.key(0))
    assert {k: v.shape for k, v in flatten(init).items()} == {k: v.shape for k, v in flat.items()}


def test_normalize_refuses_mixed_layouts():
    ones = np.ones(4, np.float32)
    source = TensorSource.from_arrays({"final_layer_norm.weight": ones, "text_model.final_layer_norm.weight": ones})
    with pytest.raises(jc.CheckpointError, match="both with and without"):
        normalize_clip_keys(source)


def test_wrong_tower_is_reported(tmp_path):
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(TINY_TEXT, architectures=["CLIPTextModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(jc.CheckpointError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jc.load_model(tmp_path)
    msg = str(e.value)
    assert "missing keys" in msg and "text_model.embeddings.token_embedding.weight" in msg
    assert "unexpected keys" in msg and "vision_model.embeddings.class_embedding" in msg


def test_full_clip_model_towers(tmp_path):
    """A `CLIPModel` folder: nested config.json and both towers in one checkpoint."""
    config = transformers.CLIPConfig(
        text_config=TINY_TEXT, vision_config=TINY_VISION | dict(num_hidden_layers=2), projection_dim=24
    )
    model = randomize_(transformers.CLIPModel(config))
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["CLIPModel"]
    state = _state(tmp_path / WEIGHTS)
    for tower, config_cls, module_cls in (
        ("text", CLIPTextConfig, CLIPTextModelWithProjection),
        ("vision", CLIPVisionConfig, CLIPVisionModelWithProjection),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the nested config is read without unknown keys
            cfg = config_cls.from_dict(raw, source="config.json")
        assert cfg.projection_dim == 24  # CLIPModel's projections use the top-level value
        module = module_cls(cfg)
        source = select_clip_tower(open_weights(tmp_path / WEIGHTS), tower)
        params = convert_to_flax(source, param_shapes(module), ignore=(r"position_ids$",))
        back = flax_to_torch_state_dict(params)
        head = "text_projection." if tower == "text" else "visual_projection."
        assert set(back) == {k for k in state if k.startswith((f"{tower}_model.", head))}
        for k, v in back.items():
            np.testing.assert_array_equal(v, state[k], err_msg=k)


# --- configs ---------------------------------------------------------------------------------------


def test_config_reads_transformers_json_without_warnings(tmp_path):
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    # transformers 4.x configs (SD-1.5's text_encoder) also carry these
    raw.update(dropout=0.0, torch_dtype="float32", _name_or_path="openai/clip-vit-large-patch14")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = CLIPTextConfig.from_dict(raw)
    assert config.hidden_size == 32 and config.eos_token_id == 2 and config.legacy_pooling
    assert not CLIPTextConfig().legacy_pooling  # transformers' defaults: eos 49407
    with pytest.warns(UserWarning, match="ignoring config keys \\['rope_theta'\\]"):
        CLIPTextConfig.from_dict(raw | {"rope_theta": 1.0})


@pytest.mark.parametrize(
    "cls,change,match",
    [
        (CLIPTextConfig, dict(hidden_act="gelu_new"), "hidden_act='gelu_new' is not supported"),
        (CLIPTextConfig, dict(hidden_size=30), "not a multiple of num_attention_heads"),
        (CLIPTextConfig, dict(eos_token_id=[2, 3]), "eos_token_id=.* is not supported"),
        (CLIPVisionConfig, dict(image_size=[32, 32]), "image_size=.* is not supported"),
        (CLIPVisionConfig, dict(patch_size=64), "patch_size=64 does not fit"),
    ],
)
def test_unsupported_config_values_are_named(cls, change, match):
    base = TINY_TEXT if cls is CLIPTextConfig else TINY_VISION
    with pytest.raises(jc.ConfigError, match=match):
        cls.from_dict(base | change, source="config.json")


def test_input_errors():
    text = CLIPTextModel(CLIPTextConfig.from_dict(TINY_TEXT))
    vision = CLIPVisionModel(CLIPVisionConfig.from_dict(TINY_VISION))
    tshapes, vshapes = param_shapes(text), param_shapes(vision)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=77"):
        jax.eval_shape(lambda p: text.apply({"params": p}, jnp.zeros((1, 78), jnp.int32)), tshapes)
    with pytest.raises(ValueError, match=r"must have shape \(batch, 32, 32, 3\) \(NHWC\)"):
        jax.eval_shape(lambda p: vision.apply({"params": p}, jnp.zeros((1, 3, 32, 32))), vshapes)
    with pytest.raises(jc.ConfigError, match="needs projection_dim"):
        param_shapes(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(TINY_TEXT | dict(projection_dim=None))))


def test_bf16_compute_mode():
    """bf16 activations (norm statistics and softmax in float32) stay close to the float32 model."""
    config = CLIPTextConfig.from_dict(TINY_TEXT)
    f32, bf16 = CLIPTextModelWithProjection(config), CLIPTextModelWithProjection(config, dtype=jnp.bfloat16)
    params = init_params(f32, 0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 77)), jnp.int32)
    a = jax.jit(lambda p, i: f32.apply({"params": p}, i))(params, ids)
    b = jax.jit(lambda p, i: bf16.apply({"params": p}, i))(params, ids)
    assert b.last_hidden_state.dtype == jnp.bfloat16
    for x, y in ((a.last_hidden_state, b.last_hidden_state), (a.text_embeds, b.text_embeds)):
        x, y = np.asarray(x), np.asarray(y, np.float32)
        assert np.abs(x - y).max() <= 3e-2 * np.abs(x).max()


# --- image preprocessing ---------------------------------------------------------------------------


def _smooth_image(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    img = 127.5 + 120 * np.sin(xx[..., None] / 7.0 + np.arange(3)) * np.cos(yy[..., None] / 5.0)
    return img.astype(np.uint8)


@pytest.mark.parametrize("hw", [(50, 70), (90, 41), (300, 400), (20, 24), (32, 32)])
def test_preprocess_against_transformers_pil(hw):
    """Same geometry (shortest side, floor centre crop) and normalisation as CLIPImageProcessor.

    The bicubic filter equals PIL's; PIL computes on 8-bit values, rounds and clamps between its
    two passes, so on a smooth image the results agree to about one 8-bit level, and on white noise
    (maximal overshoot, where PIL clamps its intermediate image) to a fraction of a level on average.
    """
    size = 32
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    rng = np.random.default_rng(0)
    for kind, img in (("smooth", _smooth_image(*hw)), ("noise", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))):
        ref = proc(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = np.asarray(clip_preprocess(jnp.asarray(img[None] / 255.0, jnp.float32), size))[0]
        assert ours.shape == ref.shape == (size, size, 3)
        levels = np.abs(ours - ref) * np.asarray(CLIP_STD) * 255
        if hw == (size, size):  # nothing to resample: exact up to float rounding
            assert levels.max() < 1e-3
        elif kind == "smooth":
            assert levels.max() <= 1.5, (kind, levels.max())
        else:
            assert levels.mean() <= 0.5, (kind, levels.mean())


def test_preprocess_normalisation_and_crop_exact():
    """No resampling when the short side already has the size: a pure crop and normalisation."""
    x = np.random.default_rng(1).random((2, 32, 45, 3)).astype(np.float32)
    out = np.asarray(clip_preprocess(jnp.asarray(x), 32))
    left = (45 - 32) // 2
    np.testing.assert_allclose(out, (x[:, :, left:left + 32] - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD), rtol=1e-6,
                               atol=1e-6)


def test_preprocess_is_differentiable_through_the_vision_model():
    model = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(TINY_VISION))
    params = init_params(model, 0)
    image = jnp.asarray(np.random.default_rng(2).uniform(0.1, 0.9, (2, 48, 40, 3)), jnp.float32)
    target = jnp.ones((TINY_VISION["projection_dim"],))

    def loss(img):
        embeds = model.apply({"params": params}, clip_preprocess(img, 32)).image_embeds
        embeds = embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)
        return -jnp.sum(embeds @ target)

    value, grad = jax.jit(jax.value_and_grad(loss))(image)
    grad = np.asarray(grad)
    assert np.isfinite(float(value)) and grad.shape == image.shape
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    # every input pixel inside the crop's footprint reaches the output
    assert (np.abs(grad).sum(axis=(0, 3)) > 0).mean() > 0.5
