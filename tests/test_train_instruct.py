"""task="instruct_pix2pix": a U-Net widened to take the image to edit, trained on edit triples.

The networks are configs/smoke.py's one-block models on 8x8 fill50k edit triples; the widening,
the conditioning dropout and the edit data are also checked on their own.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.data.fill50k import BASIC_COLORS, MIN_COLOR_DISTANCE, fill50k_edit_example, fill50k_example
from jaxcontrol.errors import ConfigError, NonFiniteError
from jaxcontrol.models import UNet2DConditionConfig, UNet2DConditionModel, init_params
from jaxcontrol.models.kinds import widen_unet_input
from jaxcontrol.training import Run, check_config, losses
from jaxcontrol.training.config import TINY_UNET
from _smoke import smoke_config as _smoke_config


def instruct_config(data_dir, **overrides):
    base = {"task": "instruct_pix2pix", "data.fill50k_edits": True, "loss.proportion_empty_prompts": 0.0,
            "instruct_pix2pix.conditioning_dropout_prob": 0.2}
    return _smoke_config(data_dir, **{**base, **overrides})


# --------------------------------------------------------------------------------------------------
# the pieces, without a run
# --------------------------------------------------------------------------------------------------

def test_edit_triples_change_exactly_the_named_part():
    rgb = dict(BASIC_COLORS)
    parts = set()
    for i in range(40):
        ex = fill50k_edit_example(i, split="validation", seed=3, image_size=32, colors="basic")
        again = fill50k_edit_example(i, split="validation", seed=3, image_size=32, colors="basic")
        assert np.array_equal(ex.edited, again.edited) and ex.instruction == again.instruction
        src = fill50k_example(i, split="validation", seed=3, image_size=32, colors="basic")
        assert np.array_equal(ex.source, src.image)
        assert ex.source_colors == (src.circle_color, src.background_color)
        k = 0 if ex.part == "circle" else 1
        new = ex.edited_colors[k]
        assert ex.instruction == f"make the {ex.part} {new}"
        assert ex.edited_colors[1 - k] == ex.source_colors[1 - k]  # the other part is kept
        for other in (ex.source_colors[k], ex.edited_colors[1 - k]):
            assert np.linalg.norm(np.subtract(rgb[new], rgb[other], dtype=float)) >= MIN_COLOR_DISTANCE
        # pixels: the corner is background, the centre pixel is circle
        cx, cy = (int(v) for v in ex.center)
        assert tuple(ex.edited[cy, cx]) == rgb[ex.edited_colors[0]]
        corner = (0, 0) if np.hypot(cx, cy) > ex.radius + 2 else (31, 31)
        assert tuple(ex.edited[corner]) == rgb[ex.edited_colors[1]]
        parts.add(ex.part)
    assert parts == {"circle", "background"}


def test_instruct_dropout_draws_the_papers_three_bands():
    drop_text, drop_image = losses.instruct_dropout(jax.random.key(0), 200_000, 0.05)
    t, i = np.asarray(drop_text), np.asarray(drop_image)
    for got, want in (((t & ~i).mean(), 0.05), ((t & i).mean(), 0.05), ((~t & i).mean(), 0.05),
                      ((~t & ~i).mean(), 0.85)):
        assert abs(got - want) < 0.004, (got, want)
    none_t, none_i = losses.instruct_dropout(jax.random.key(1), 1000, 0.0)
    assert not np.any(np.asarray(none_t)) and not np.any(np.asarray(none_i))
    rows = losses.replace_rows(jnp.asarray([True, False]), jnp.ones((2, 3, 2)), jnp.zeros(()))
    np.testing.assert_array_equal(np.asarray(rows), [[[0, 0]] * 3, [[1, 1]] * 3])


def test_widened_unet_starts_as_the_base_model():
    unet = UNet2DConditionModel(UNet2DConditionConfig.from_dict({**TINY_UNET, "block_out_channels": (8, 16),
                                                                 "norm_num_groups": 4}))
    params = init_params(unet, 0)
    wide, wide_p = widen_unet_input(unet, params, "instruct_pix2pix")
    assert wide.config.in_channels == 8 and unet.config.in_channels == 4
    kernel = np.asarray(wide_p["conv_in"]["kernel"])
    assert kernel.shape[2] == 8 and not np.any(kernel[:, :, 4:]) and np.array_equal(
        kernel[:, :, :4], np.asarray(params["conv_in"]["kernel"]))
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    image = 3.0 * jax.random.normal(jax.random.key(2), (2, 16, 16, 4))
    ctx = jax.random.normal(jax.random.key(3), (2, 77, 32))
    base = unet.apply({"params": params}, x, jnp.asarray([10, 900]), ctx)
    widened = wide.apply({"params": wide_p}, jnp.concatenate([x, image], -1), jnp.asarray([10, 900]), ctx)
    # the weights are exact (above); the outputs agree to float32 rounding, not bit for bit: XLA may
    # sum a conv over 8 input channels in another order than over 4 (seen: 1.4e-6 on a loaded machine)
    np.testing.assert_allclose(np.asarray(base), np.asarray(widened), rtol=0, atol=1e-5)
    # inpainting's width too; an already-wide U-Net is returned as it is; a 9-channel one is not narrowed
    nine, nine_p = widen_unet_input(unet, params, "inpaint")
    assert nine.config.in_channels == 9 and nine_p["conv_in"]["kernel"].shape[2] == 9
    assert widen_unet_input(wide, wide_p, "instruct_pix2pix")[1] is wide_p
    with pytest.raises(ConfigError, match="in_channels=9 to 8"):
        widen_unet_input(nine, nine_p, "instruct_pix2pix")
    with pytest.raises(ConfigError, match="'sketch' is not one of"):
        widen_unet_input(unet, params, "sketch")


def test_check_config_names_the_instruct_keys(tmp_path):
    cfg = instruct_config(tmp_path, **{"loss.proportion_empty_prompts": 0.1})
    with pytest.raises(ConfigError, match="loss.proportion_empty_prompts.*conditioning_dropout_prob"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"conditioning_dropout_prob: must be in \[0, 1/3\]"):
        check_config(instruct_config(tmp_path, **{"instruct_pix2pix.conditioning_dropout_prob": 0.4}))
    with pytest.raises(ConfigError, match="fill50k_edits.*no outline condition for task='controlnet'"):
        check_config(instruct_config(tmp_path, task="controlnet"))
    for key, bad in (("validation.image_guidance_scale", -1.0), ("validation.image_guidance_scale", float("nan")),
                     ("validation.guidance_scale", float("inf"))):
        with pytest.raises(ConfigError, match=f"{key}: must be a finite number >= 0"):
            check_config(instruct_config(tmp_path, **{key: bad}))


# --------------------------------------------------------------------------------------------------
# a run
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tmp_path_factory.mktemp("tfds")
    r = Run(instruct_config(data), tmp_path_factory.mktemp("run"), restore=False)
    yield r
    r.close()


def test_run_widens_the_unet_and_reads_edit_triples(run):
    assert run.nets.unet.config.in_channels == 8
    kernel = np.asarray(run.state.params["unet"]["conv_in"]["kernel"])
    assert not np.any(kernel[:, :, 4:]) and np.any(kernel[:, :, :4])
    assert "conditioning_pixel_values" in run.batch_keys
    batch = next(iter(run.dataset))
    src = np.asarray(batch["conditioning_pixel_values"])
    assert src.min() >= 0.0 and src.max() <= 1.0 and src.std() > 0.05  # the image to edit, not an outline


def test_the_image_channels_learn_from_the_first_step(run):
    """Zero weights on the image channels still get a gradient (input x output gradient), so the
    widened model starts to read the image at step one; the loss then depends on it."""
    from jaxcontrol.training.data import device_batch
    from jaxcontrol.training.step import make_loss_fn

    host = next(iter(run.dataset))
    batch = device_batch(host, run.accum, run.batch_sharding, run.batch_keys)
    state, _ = run.step_fn(jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), run.state), run.frozen, batch)
    kernel = np.asarray(state.params["unet"]["conv_in"]["kernel"])
    assert np.abs(kernel[:, :, 4:]).max() > 1e-5
    loss_fn = jax.jit(make_loss_fn(run.nets, run.config), compiler_options=run.compiler_options)
    mb = jax.tree_util.tree_map(lambda a: a[0], batch)
    other = {**mb, "conditioning_pixel_values": 1.0 - mb["conditioning_pixel_values"]}
    key = jax.random.key(5)
    a = float(loss_fn(state.params, run.frozen, mb, key)[0])
    b = float(loss_fn(state.params, run.frozen, other, key)[0])
    assert a != b


def test_run_validates_and_exports_an_instruct_pix2pix_pipeline(run, tmp_path, monkeypatch):
    """What a run's end does (validation grid, export), on the fixture's run; the export loads as an
    InstructPix2Pix pipeline in diffusers' layout and ours, and edits."""
    import json

    from jaxcontrol.pipeline import Pipeline
    from jaxcontrol.training.export import export_trained

    grid = run.validation_images()  # rows: the images to edit, their edits
    assert grid is not None and grid.shape[0] == 2 * 8 and grid.std() > 0  # two rows of 8-px images
    nan = jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), run.state.params)
    with pytest.raises(NonFiniteError, match=r"validation sampling produced NaN .* image\(s\) \[0, 1\]"):
        run.validation_images(nan)  # never a black validation PNG
    export = tmp_path / "export"
    export_trained(run.nets, run.export_params(), run.frozen, export)
    index = json.loads((export / "diffusers" / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    unet_cfg = json.loads((export / "diffusers" / "pipeline" / "unet" / "config.json").read_text())
    assert unet_cfg["in_channels"] == 8
    pipe = Pipeline.from_pretrained(export / "jaxcontrol" / "pipeline")
    assert pipe.kind == "instruct_pix2pix"
    src = fill50k_edit_example(0, image_size=8).source
    images = pipe("make the circle red", init_image=src, num_inference_steps=2, height=8, width=8,
                  guidance_scale=2.0, image_guidance_scale=1.5, seed=0)
    assert np.asarray(images).shape[-3:] == (8, 8, 3)

    # `python -m jaxcontrol.demo install` takes the edit run's U-Net alone as the embedded editor
    from jaxcontrol import demo
    from jaxcontrol.convert import load_model

    runs = tmp_path / "runs"
    for src in list(demo.EXPORTS)[:2]:  # stand-ins for the base model and ControlNet exports
        (runs / src).mkdir(parents=True)
    (runs / demo.EDIT_EXPORT).parent.mkdir(parents=True)
    (runs / demo.EDIT_EXPORT).symlink_to(export / "jaxcontrol" / "pipeline", target_is_directory=True)
    assets = tmp_path / "assets"
    assets.mkdir()
    monkeypatch.setattr(demo, "EXPORTS", {src: assets / Path(dest).name for src, dest in demo.EXPORTS.items()})
    monkeypatch.setattr(demo, "DEFAULT_EDITOR", assets / "default_editor")
    assert demo.install(runs)[-1] == assets / "default_editor"
    module, params = load_model(assets / "default_editor")
    assert module.config.in_channels == 8 and not list((assets / "default_editor").rglob("commit_success.txt"))
