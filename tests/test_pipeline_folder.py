"""load_pipeline on diffusers pipeline folders saved from tiny random components."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    PNDMScheduler,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import jaxcontrol as jc
from jaxcontrol.testing.parity import TINY_ADAPTER_TEST, controlnet_fields
from jaxcontrol.testing.reference import nchw_to_nhwc, randomize_, rel_err, tiny_clip_tokenizer
from jaxcontrol.tokenizer import tokenize

TEXT = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
            num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000)
VAE = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    torch.manual_seed(0)
    tok_dir = tiny_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return dict(
        unet=randomize_(UNet2DConditionModel(**TINY_ADAPTER_TEST)),
        vae=randomize_(AutoencoderKL(**VAE)),
        text_encoder=randomize_(CLIPTextModel(CLIPTextConfig(**TEXT))),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
    )


def test_stable_diffusion_folder_round_trips(components, tmp_path):
    StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path)
    bundle = jc.load_pipeline(tmp_path)
    assert bundle.class_name == "StableDiffusionPipeline"
    assert set(bundle.modules) == {"unet", "vae", "text_encoder"}
    assert bundle.scheduler_config["_class_name"] == "PNDMScheduler"
    assert set(bundle.skipped) <= {"safety_checker", "feature_extractor"}

    ids = tokenize(bundle.tokenizer, ["a red circle", "blue square"])
    ref_ids = components["tokenizer"](["a red circle", "blue square"], padding="max_length", max_length=77,
                                      truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, ref_ids)

    with torch.no_grad():
        ref_ctx = components["text_encoder"](torch.from_numpy(ids).long())[0]
        x = torch.randn(2, 4, 16, 16)
        ref_eps = components["unet"](x, torch.tensor([10, 900]), ref_ctx).sample
        ref_img = components["vae"].decode(x).sample
    te, unet, vae = bundle.text_encoder, bundle.unet, bundle.vae
    ctx = jax.jit(lambda p, i: te.apply({"params": p}, i).last_hidden_state)(bundle.params["text_encoder"], ids)
    np.testing.assert_allclose(np.asarray(ctx), ref_ctx.numpy(), rtol=1e-4, atol=1e-4)
    eps = jax.jit(lambda p: unet.apply({"params": p}, jnp.asarray(nchw_to_nhwc(x)), jnp.array([10, 900]), ctx))(
        bundle.params["unet"])
    assert rel_err(eps, ref_eps)[2] <= 1e-4
    img = jax.jit(lambda p: vae.apply({"params": p}, jnp.asarray(nchw_to_nhwc(x)), method=vae.decode))(
        bundle.params["vae"])
    assert rel_err(img, ref_img)[2] <= 1e-4


def test_multi_controlnet_and_adapter_folders(components, tmp_path):
    fields = controlnet_fields(TINY_ADAPTER_TEST, dict(conditioning_embedding_out_channels=(16, 32)))
    nets = [randomize_(ControlNetModel(**fields), seed) for seed in (1, 2)]
    StableDiffusionControlNetPipeline(**components, controlnet=nets, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(tmp_path / "cn")
    assert (tmp_path / "cn" / "controlnet_1" / "config.json").exists()
    bundle = jc.load_pipeline(tmp_path / "cn", components=("controlnet",))
    assert [type(m).__name__ for m in bundle.controlnet] == ["ControlNetModel", "ControlNetModel"]
    assert len(bundle.params["controlnet"]) == 2

    adapter = randomize_(T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=2))
    StableDiffusionAdapterPipeline(**components, adapter=adapter, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(tmp_path / "ad")
    bundle = jc.load_pipeline(tmp_path / "ad", components=("adapter", "unet"))
    assert type(bundle.adapter).__name__ == "T2IAdapter" and set(bundle.modules) == {"adapter", "unet"}


def test_pipeline_folder_errors(components, tmp_path):
    with pytest.raises(jc.ConfigError, match="no model_index.json"):
        jc.load_pipeline(tmp_path)
    StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    with pytest.raises(jc.ConfigError, match=r"requested components \['controlnet'\]"):
        jc.load_pipeline(tmp_path / "sd", components=("controlnet",))


@pytest.mark.slow
def test_full_sd15_folder_loads_within_memory_bound(tmp_path):
    from jaxcontrol.testing.memory import build_sd15_folder, measure_load_memory

    r = measure_load_memory(build_sd15_folder(tmp_path / "sd15"))
    assert r["param_counts"]["unet"] == 859_520_964
    assert r["peak_over_params"] <= 1.5, r
