"""T2I-Adapter: resampling primitives, diffusers parity (alone, MultiAdapter, feeding the U-Net), config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import T2IAdapter as TorchT2IAdapter

import jaxcontrol as jc
from jaxcontrol.errors import ConfigError
from jaxcontrol.models.adapter import (
    MultiAdapter,
    T2IAdapter,
    T2IAdapterConfig,
    adapter_in_channels,
    avg_pool_2x2_ceil,
    pixel_unshuffle,
)
from jaxcontrol.models.params import param_shapes
from jaxcontrol.testing.adapter_parity import (
    ADAPTER_CASES,
    ADAPTER_ONLY_CASES,
    UNET_ADAPTER_CASES,
    run_adapter_case,
)
from jaxcontrol.testing.parity import format_table
from jaxcontrol.testing.reference import nchw_to_nhwc, nhwc_to_nchw, randomize_

ADAPTER_TYPES = ("full_adapter", "light_adapter", "full_adapter_xl")


# --- primitives --------------------------------------------------------------------------------
@pytest.mark.parametrize("factor,hw,channels", [(2, (4, 6), 3), (3, (6, 9), 2), (8, (16, 8), 1), (1, (3, 5), 3)])
def test_pixel_unshuffle_matches_torch(factor, hw, channels):
    x = torch.randn(2, channels, *hw)
    ref = torch.nn.PixelUnshuffle(factor)(x).numpy()
    ours = nhwc_to_nchw(pixel_unshuffle(jnp.asarray(nchw_to_nhwc(x)), factor))
    np.testing.assert_array_equal(ours, ref)  # a permutation: bit-identical


def test_pixel_unshuffle_refuses_indivisible_size():
    with pytest.raises(ValueError, match="not divisible by the adapter's downscale_factor=4"):
        pixel_unshuffle(jnp.zeros((1, 8, 6, 3)), 4)


@pytest.mark.parametrize("hw", [(4, 6), (5, 7), (3, 2), (1, 1), (9, 4)])
def test_avg_pool_ceil_mode_matches_torch(hw):
    x = torch.randn(2, 5, *hw)
    ref = torch.nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)(x).numpy()
    ours = nhwc_to_nchw(jax.jit(avg_pool_2x2_ceil)(jnp.asarray(nchw_to_nhwc(x))))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


# --- structure -----------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_type", ADAPTER_TYPES)
@pytest.mark.parametrize("channels,factor", [((8, 16, 32, 32), 8), ((8, 16), 2), ((8, 16, 16), 16)])
def test_downscale_factors_and_feature_shapes_match_diffusers(adapter_type, channels, factor):
    kw = dict(in_channels=3, channels=list(channels), num_res_blocks=1, downscale_factor=factor,
              adapter_type=adapter_type)
    torch_adapter = TorchT2IAdapter(**kw)
    adapter = T2IAdapter(T2IAdapterConfig(**kw))
    assert adapter.downscale_factor == torch_adapter.downscale_factor == factor
    assert adapter.total_downscale_factor == torch_adapter.total_downscale_factor

    size = 4 * adapter.total_downscale_factor
    with torch.no_grad():
        ref_shapes = [tuple(f.shape) for f in torch_adapter(torch.zeros(1, 3, size, size))]
    shapes = jax.eval_shape(
        lambda p, x: adapter.apply({"params": p}, x), param_shapes(adapter), jax.ShapeDtypeStruct((1, size, size, 3),
                                                                                                  jnp.float32)
    )
    assert [(s.shape[0], s.shape[3], s.shape[1], s.shape[2]) for s in shapes] == ref_shapes
    assert len(shapes) == adapter.config.num_features
    assert tuple(s.shape[-1] for s in shapes) == adapter.config.feature_channels
    # diffusers' test_total_downscale_factor; an XL adapter with fewer than 3 levels has no downsampling
    # block, but diffusers (and so we) still report total_downscale_factor = 2 * downscale_factor
    if not (adapter_type == "full_adapter_xl" and len(channels) < 3):
        assert shapes[-1].shape[1] == size // adapter.total_downscale_factor


@pytest.mark.parametrize("adapter_type", ADAPTER_TYPES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_in_channels_inferred_from_weights(adapter_type, in_channels, tmp_path):
    kw = dict(in_channels=in_channels, channels=[8, 16], num_res_blocks=1, downscale_factor=4,
              adapter_type=adapter_type)
    TorchT2IAdapter(**kw).save_pretrained(tmp_path)
    adapter, params = jc.load_model(tmp_path)
    assert isinstance(adapter, T2IAdapter) and adapter.config == T2IAdapterConfig.from_dict(kw)
    assert adapter_in_channels(params, 4) == in_channels
    assert adapter_in_channels(params["adapter"], 4) == in_channels
    if in_channels == 1:
        with pytest.raises(ValueError, match="not a multiple of downscale_factor"):
            adapter_in_channels(params, 3)


# --- parity with diffusers -----------------------------------------------------------------------
def _check(name, tmp_path):
    rows = run_adapter_case(ADAPTER_CASES[name], workdir=tmp_path)
    assert rows
    bad = [r for r in rows if not r.ok]
    assert not bad, "\n" + format_table(rows)
    return rows


@pytest.mark.parametrize("name", ADAPTER_ONLY_CASES)
def test_adapter_parity(name, tmp_path):
    """Every feature within 1e-4 * max|torch| of diffusers (full, light, XL, 1-channel, MultiAdapter, odd sizes)."""
    _check(name, tmp_path)


# the SDXL-layout case covers the XL-style one; the tiny adapter test's U-Net is the adapter pipeline's own
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in ("unet-xl-style", "unet-tiny-adapter-test")
                                               else []) for n in UNET_ADAPTER_CASES])
def test_unet_with_adapter_parity(name, tmp_path):
    """The adapter's features through `down_intrablock_additional_residuals`, against diffusers' U-Net."""
    rows = _check(name, tmp_path)
    assert [r.component for r in rows][-1] == "unet+adapter"


def test_multi_adapter_is_the_weighted_sum_and_jits_with_traced_weights():
    cfg_a = T2IAdapterConfig(in_channels=3, channels=(8, 16), num_res_blocks=1, downscale_factor=2)
    cfg_b = cfg_a.replace(in_channels=1)
    a, b = T2IAdapter(cfg_a), T2IAdapter(cfg_b)
    pa, pb = jc.init_params(a, 0), jc.init_params(b, 1)
    multi, mparams = MultiAdapter.from_adapters([(a, pa), (b, pb)])
    assert multi.downscale_factor == 2 and multi.total_downscale_factor == 4
    assert jax.tree_util.tree_structure(mparams) == jax.tree_util.tree_structure(jc.init_params(multi, 0))
    rng = np.random.default_rng(0)
    xa, xb = (jnp.asarray(rng.uniform(size=(2, 12, 8, c)), jnp.float32) for c in (3, 1))

    run = jax.jit(lambda p, xs, w: multi.apply({"params": p}, xs, adapter_weights=w))
    fa = jax.jit(lambda p, x: a.apply({"params": p}, x))(pa, xa)
    fb = jax.jit(lambda p, x: b.apply({"params": p}, x))(pb, xb)
    for w in ([0.3, 0.7], [1.0, 0.0]):
        out = run(mparams, [xa, xb], jnp.asarray(w))  # same compilation for both weight vectors
        for o, ya, yb in zip(out, fa, fb):
            np.testing.assert_allclose(np.asarray(o), w[0] * np.asarray(ya) + w[1] * np.asarray(yb),
                                       rtol=1e-5, atol=1e-6)


# --- errors --------------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ConfigError, match="adapter_type='medium_adapter'"):
        T2IAdapterConfig.from_dict({"adapter_type": "medium_adapter"})
    with pytest.raises(ConfigError, match=r"channels\[3\] == channels\[2\]"):
        T2IAdapterConfig(channels=(32, 64, 64, 128), adapter_type="full_adapter_xl").validate()
    with pytest.raises(ConfigError, match="too small"):
        T2IAdapterConfig(channels=(8, 2), adapter_type="light_adapter").validate()
    cfg = T2IAdapterConfig.from_dict({"_class_name": "T2IAdapter", "channels": [32, 64], "in_channels": 1})
    assert cfg.channels == (32, 64) and cfg.to_dict()["_class_name"] == "T2IAdapter"


def test_input_errors_are_named():
    adapter = T2IAdapter(T2IAdapterConfig(in_channels=1, channels=(8, 16), num_res_blocks=1, downscale_factor=4))
    shapes = param_shapes(adapter)
    with pytest.raises(ValueError, match="1 channels"):
        jax.eval_shape(lambda p: adapter.apply({"params": p}, jnp.zeros((1, 8, 8, 3))), shapes)
    with pytest.raises(ValueError, match="10x8 is not divisible"):
        jax.eval_shape(lambda p: adapter.apply({"params": p}, jnp.zeros((1, 10, 8, 1))), shapes)


def test_multi_adapter_errors():
    base = T2IAdapterConfig(channels=(8, 16), num_res_blocks=1, downscale_factor=2)
    with pytest.raises(ValueError, match="single adapter"):
        MultiAdapter((base,))
    with pytest.raises(ValueError, match="downscale the same way"):
        MultiAdapter((base, base.replace(downscale_factor=4)))
    with pytest.raises(ValueError, match="downscale the same way"):  # light adapters downscale once more
        MultiAdapter((base, base.replace(adapter_type="light_adapter")))
    multi = MultiAdapter((base, base))
    shapes = param_shapes(multi)
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="2 adapters but got 1 images"):
        jax.eval_shape(lambda p: multi.apply({"params": p}, [x]), shapes)
    with pytest.raises(ValueError, match="adapter_weights must have 2 entries"):
        jax.eval_shape(lambda p: multi.apply({"params": p}, [x, x], adapter_weights=[1.0, 0.5, 0.2]), shapes)


def test_wrong_checkpoint_is_reported(tmp_path):
    """A checkpoint whose config says light_adapter but whose weights are a full adapter fails naming keys."""
    randomize_(TorchT2IAdapter(channels=[8, 16], num_res_blocks=1, downscale_factor=2)).save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"full_adapter"', '"light_adapter"')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(jc.CheckpointError, match="adapter.conv_in.weight"):
        jc.load_model(tmp_path)


@pytest.mark.parametrize("down", [("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                  ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")])
def test_adapter_feature_shapes_follow_the_block_layout(down):
    """`adapter_feature_shapes` is where the U-Net adds each feature (checked by tracing the U-Net
    with those shapes, no compile), and a feature of another size is refused with a named error."""
    from jaxcontrol.models import UNet2DConditionConfig, UNet2DConditionModel
    from jaxcontrol.models.unet import adapter_feature_shapes

    up = tuple(("CrossAttnUpBlock2D" if "CrossAttn" in d else "UpBlock2D") for d in reversed(down))
    cfg = UNet2DConditionConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2, down_block_types=down,
                                up_block_types=up)
    unet = UNet2DConditionModel(cfg)
    shapes = adapter_feature_shapes(cfg, 16, 16)
    first = (16, 16, 8) if down[0].startswith("CrossAttn") else (8, 8, 8)
    assert shapes == [first, (8, 8, 16), (4, 4, 16)]
    x, t, ctx = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 3, 8))
    params = param_shapes(unet)

    def run(feats):
        return jax.eval_shape(lambda p, f: unet.apply({"params": p}, x, t, ctx, down_intrablock_additional_residuals=f),
                              params, feats)

    run([jax.ShapeDtypeStruct((1,) + s, jnp.float32) for s in shapes])
    wrong = [(16, 16, 8), (8, 8, 16), (4, 4, 16)] if first == (8, 8, 8) else [(8, 8, 8), (8, 8, 16), (4, 4, 16)]
    with pytest.raises(ValueError, match=r"down_intrablock_additional_residuals\[0\].*down block 0"):
        run([jax.ShapeDtypeStruct((1,) + s, jnp.float32) for s in wrong])
