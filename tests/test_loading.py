"""load_model: formats (safetensors, sharded, .bin, variants, bf16) and the errors bad input gets."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet

import jaxcontrol as jc
from jaxcontrol.convert import SafetensorsFile, flax_to_torch_state_dict, save_safetensors
from jaxcontrol.models.params import flatten
from jaxcontrol.testing.reference import nchw_to_nhwc, randomize_, rel_err

TINY = dict(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def torch_unet():
    return randomize_(TorchUNet(**TINY))


def _forward_err(torch_unet, unet, params):
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 12, generator=g), torch.tensor([99])
    with torch.no_grad():
        ref = torch_unet(x, t, ctx).sample
    out = unet.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), 99, jnp.asarray(ctx.numpy()))
    return rel_err(out, ref)[2]


def _state(path):
    f = SafetensorsFile(path)
    return {k: f.load(k) for k in f.keys()}


def test_safetensors_and_roundtrip(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path)
    unet, params = jc.load_model(tmp_path)
    assert isinstance(unet, jc.UNet2DConditionModel)
    assert _forward_err(torch_unet, unet, params) <= 1e-5
    # our writer and inverse mapping reproduce the file bit for bit (keys and values)
    original = _state(tmp_path / WEIGHTS)
    back = flax_to_torch_state_dict(params)
    assert set(back) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back[k], v)


def test_pickle_bin(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    unet, params = jc.load_model(tmp_path)
    assert _forward_err(torch_unet, unet, params) <= 1e-5


def test_sharded_safetensors(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    unet, params = jc.load_model(tmp_path)
    assert _forward_err(torch_unet, unet, params) <= 1e-5


def test_bf16_variant(torch_unet, tmp_path):
    torch_unet.to(torch.bfloat16).save_pretrained(tmp_path, variant="bf16")
    with pytest.raises(jc.CheckpointError, match="no weights file"):
        jc.load_model(tmp_path)
    unet, params = jc.load_model(tmp_path, variant="bf16")
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    _, bf16_params = jc.load_model(tmp_path, variant="bf16", param_dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(bf16_params))
    # the bf16 values arrive exactly
    stored = _state(tmp_path / "diffusion_pytorch_model.bf16.safetensors")
    assert stored["conv_in.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params["conv_in"]["kernel"]), stored["conv_in.weight"].astype(np.float32).transpose(2, 3, 1, 0)
    )


def test_subfolder_of_pipeline(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path / "unet")
    unet, _ = jc.load_model(tmp_path, subfolder="unet")
    assert unet.config.block_out_channels == (8, 16)


def test_controlnet_folder(tmp_path):
    fields = {k: v for k, v in TINY.items() if k != "up_block_types"}
    randomize_(TorchControlNet(**fields, conditioning_embedding_out_channels=(8, 16))).save_pretrained(tmp_path)
    cn, cparams = jc.load_model(tmp_path)
    assert isinstance(cn, jc.ControlNetModel)
    assert len([k for k in cparams if k.startswith("controlnet_down_blocks_")]) == 4


# --- errors ----------------------------------------------------------------------------------


def _resave(path, state):
    save_safetensors(path, state)


def test_missing_key_is_named_with_shape(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path)
    state = _state(tmp_path / WEIGHTS)
    del state["down_blocks.0.resnets.0.conv1.weight"]
    _resave(tmp_path / WEIGHTS, state)
    with pytest.raises(jc.CheckpointError) as e:
        jc.load_model(tmp_path)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "down_blocks.0.resnets.0.conv1.weight" in msg
    assert "(8, 8, 3, 3)" in msg and WEIGHTS in msg


def test_wrong_shape_is_named_with_both_shapes(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path)
    state = _state(tmp_path / WEIGHTS)
    state["time_embedding.linear_1.weight"] = np.zeros((32, 7), np.float32)
    _resave(tmp_path / WEIGHTS, state)
    with pytest.raises(jc.CheckpointError) as e:
        jc.load_model(tmp_path)
    msg = str(e.value)
    assert "time_embedding.linear_1.weight: expected shape (32, 8), found (32, 7)" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_unexpected_key_is_named(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path)
    state = _state(tmp_path / WEIGHTS)
    state["extra_head.weight"] = np.zeros((3, 3), np.float32)
    _resave(tmp_path / WEIGHTS, state)
    with pytest.raises(jc.CheckpointError, match=r"unexpected keys \(1\):\s+extra_head.weight \(shape \(3, 3\)\)"):
        jc.load_model(tmp_path)


def test_config_weights_mismatch(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_out_channels"] = [8, 32]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(jc.CheckpointError, match="wrongly shaped keys"):
        jc.load_model(tmp_path)


def test_truncated_and_corrupted_safetensors(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(jc.CheckpointError, match="truncated"):
        jc.load_model(tmp_path)
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(jc.CheckpointError, match="corrupted or truncated safetensors header"):
        jc.load_model(tmp_path)
    n = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    with pytest.raises(jc.CheckpointError, match="not JSON"):
        jc.load_model(tmp_path)
    path.write_bytes(b"abc")
    with pytest.raises(jc.CheckpointError, match="not a safetensors file"):
        jc.load_model(tmp_path)


def test_folder_errors(torch_unet, tmp_path):
    with pytest.raises(jc.CheckpointError, match="not a directory"):
        jc.load_model(tmp_path / "nope")
    with pytest.raises(jc.ConfigError, match="no config.json"):
        jc.load_model(tmp_path)
    torch_unet.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(jc.CheckpointError, match="no weights file"):
        jc.load_model(tmp_path)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(_class_name="UNet3DConditionModel"), "model class 'UNet3DConditionModel' is not supported"),
        (dict(class_embed_type="timestep"), "class_embed_type='timestep' is not supported"),
        (dict(addition_embed_type="text_image"), "addition_embed_type='text_image' is not supported"),
        (dict(addition_embed_type="text_time"), "'text_time' \\(SDXL\\) needs addition_time_embed_dim"),
        (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), "down block type"),
        (dict(block_out_channels=[8, 16, 32]), "block_out_channels has 3 entries"),
        (dict(norm_num_groups=3), "not divisible by norm_num_groups=3"),
    ],
)
def test_unsupported_config_values_are_named(torch_unet, tmp_path, change, match):
    torch_unet.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(jc.ConfigError, match=match):
        jc.load_model(tmp_path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_run(torch_unet, tmp_path):
    marker = tmp_path / "pwned.txt"
    state = dict(torch_unet.state_dict())
    state["payload"] = _Exploit(marker)
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    torch_unet.save_config(tmp_path)
    with pytest.raises(jc.CheckpointError, match="refused to unpickle"):
        jc.load_model(tmp_path)
    assert not marker.exists()


def test_safetensors_writer_matches_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64),
              "c": np.ones((2, 2), np.float16)}
    save_safetensors(tmp_path / "ours.safetensors", arrays, metadata={"format": "pt"})
    theirs = load_file(tmp_path / "ours.safetensors")
    for k in arrays:
        np.testing.assert_array_equal(theirs[k], arrays[k])
    save_file(arrays, tmp_path / "theirs.safetensors")
    f = SafetensorsFile(tmp_path / "theirs.safetensors")
    for k in arrays:
        np.testing.assert_array_equal(f.load(k), arrays[k])
    # atomic: no temporary files left behind
    assert sorted(os.listdir(tmp_path)) == ["ours.safetensors", "theirs.safetensors"]


def test_loaded_tree_matches_init_tree(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path)
    unet, params = jc.load_model(tmp_path)
    init = jc.init_params(unet, jax.random.key(0))
    assert {k: v.shape for k, v in flatten(params).items()} == {k: v.shape for k, v in flatten(init).items()}
