"""The single-file reader's parts on their own: format detection, one reader per network, the notes.

Key names and tiny arrays only (no diffusers model is built), so this runs in seconds; the
conversions against diffusers' own `from_single_file` are in `test_convert.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jaxcontrol.convert import TensorSource, load_params
from jaxcontrol.convert.formats import FORMATS, STABLE_DIFFUSION_FORMATS, detect_format, diffusers_class_of
from jaxcontrol.convert.single_file import read_parts, read_single_file, sd_prediction_type
from jaxcontrol.convert.single_file_components import Part, adapter_from_t2i, skipped_note
from jaxcontrol.errors import CheckpointError, ConfigError
from jaxcontrol.models.adapter import T2IAdapter, T2IAdapterConfig

LDM = ["model.diffusion_model.time_embed.0.weight", "first_stage_model.encoder.conv_in.weight"]


@pytest.mark.parametrize("keys, fmt", [
    (LDM + ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"], "ldm-sd1"),
    (LDM + ["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"], "ldm-sd2"),
    (LDM + ["control_model.time_embed.0.weight"], "controlnet-v1.0"),
    (["control_model.time_embed.0.weight"], "controlnet-v1.1"),
    (["time_embed.0.weight", "input_hint_block.0.weight"], "controlnet-bare"),
    (["time_embed.0.weight", "out.2.weight"], "ldm-unet"),
    (["encoder.down.0.block.0.conv1.weight"], "ldm-vae"),
    (["first_stage_model.encoder.conv_in.weight"], "ldm-vae"),
    (["conv_in.weight", "body.0.block1.weight"], "t2i-adapter-full"),
    (["adapter.conv_in.weight", "adapter.body.0.block1.weight"], "t2i-adapter-full"),
    (["body.0.in_conv.weight", "body.0.body.0.block1.weight"], "t2i-adapter-light"),
    (["controlnet_cond_embedding.conv_in.weight"], "diffusers-state-dict"),
])
def test_detect_format_from_key_names(keys, fmt):
    assert detect_format(keys) == fmt
    assert fmt in FORMATS


def test_detect_format_refuses_sdxl_and_unknown_layouts():
    with pytest.raises(ConfigError, match="SDXL"):
        detect_format(["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"], "x.ckpt")
    with pytest.raises(CheckpointError, match=r"x\.ckpt: unknown checkpoint format.*1 keys, e\.g\. foo"):
        detect_format(["foo"], "x.ckpt")


def test_diffusers_class_of():
    assert diffusers_class_of({"time_embedding.linear_1.weight", "conv_out.weight"}) == "UNet2DConditionModel"
    assert diffusers_class_of({"encoder.conv_in.weight", "decoder.conv_out.weight"}) == "AutoencoderKL"
    assert diffusers_class_of({"embeddings.token_embedding.weight"}) == "CLIPTextModel"
    assert diffusers_class_of({"something.else"}) is None
    assert set(STABLE_DIFFUSION_FORMATS) <= set(FORMATS)


def test_sd_prediction_type_follows_diffusers_rule():
    assert sd_prediction_type(False, None) == ("epsilon", [])
    assert sd_prediction_type(True, 875000)[0] == "epsilon"  # the SD-2 512 base
    ptype, notes = sd_prediction_type(True, 110000)
    assert ptype == "v_prediction" and "pass --prediction-type" in notes[0]


def test_skipped_note_groups_what_no_network_took():
    keys = ["betas", "alphas_cumprod", "first_stage_model.loss.logvar", "first_stage_model.loss.w", "unet.x"]
    note = skipped_note(keys, {"unet.x"})
    assert note == "not part of any component, skipped: 2 noise-schedule buffers; 2 first_stage_model.loss.*"
    assert skipped_note(keys, set(keys)) is None


def _full_adapter(prefix: str = "") -> dict[str, np.ndarray]:
    """TencentARC `Adapter(channels=[8, 16], nums_rb=2, cin=64)` (1-channel input, 8x8 unshuffle) state dict."""
    rng = np.random.default_rng(0)
    shapes = {"conv_in.weight": (8, 64, 3, 3), "conv_in.bias": (8,), "body.2.in_conv.weight": (16, 8, 1, 1),
              "body.2.in_conv.bias": (16,)}
    for i, c in enumerate((8, 8, 16, 16)):
        shapes.update({f"body.{i}.block1.weight": (c, c, 3, 3), f"body.{i}.block1.bias": (c,),
                       f"body.{i}.block2.weight": (c, c, 1, 1), f"body.{i}.block2.bias": (c,)})
    return {prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("prefix", ["", "adapter."])
def test_adapter_reader_renames_lazily_and_accounts_for_every_key(prefix):
    arrays = _full_adapter(prefix)
    source = TensorSource.from_arrays(arrays, "t2i.pth")
    part = adapter_from_t2i(source, "t2i.pth", light=False)
    assert isinstance(part, Part)
    assert part.used == frozenset(arrays)
    assert part.component.name == "adapter"
    assert part.component.config == {"_class_name": "T2IAdapter", "in_channels": 1, "channels": [8, 16],
                                     "num_res_blocks": 2, "downscale_factor": 8, "adapter_type": "full_adapter"}
    renamed = part.component.source
    assert renamed.shape("adapter.body.1.in_conv.weight") == (16, 8, 1, 1)
    np.testing.assert_array_equal(renamed.load("adapter.body.1.resnets.1.block2.bias"),
                                  arrays[prefix + "body.3.block2.bias"])
    config = T2IAdapterConfig.from_dict(part.component.config)
    params = load_params(T2IAdapter(config), renamed)
    np.testing.assert_allclose(params["adapter"]["conv_in"]["kernel"],
                               arrays[prefix + "conv_in.weight"].transpose(2, 3, 1, 0))


def test_read_parts_and_read_single_file_agree_on_the_adapter():
    source = TensorSource.from_arrays(_full_adapter(), "t2i.pth")
    (part,) = read_parts("t2i-adapter-full", source, "t2i.pth")
    ckpt = read_single_file(Path("t2i.pth"), source, {"global_step": 7})
    assert ckpt.format == "t2i-adapter-full" and list(ckpt.components) == ["adapter"]
    assert ckpt.components["adapter"].config == part.component.config
    assert ckpt.pipeline_class is None and ckpt.scheduler_config is None
    assert ckpt.notes == list(part.notes) + ["global_step 7"]


def test_read_parts_refuses_a_format_that_is_no_single_file():
    with pytest.raises(ValueError, match="diffusers-pipeline"):
        read_parts("diffusers-pipeline", TensorSource.from_arrays({}, "x"), "x")
