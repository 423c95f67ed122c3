"""SDXL single files (generative-models' layout: `conditioner.embedders.*`, `model.diffusion_model.*`,
`first_stage_model.*`) built here from random diffusers SDXL pipelines with the inverse key maps of
test_convert.py (plus OpenCLIP bigG's, written below), imported, compared tensor by tensor with the
diffusers models they came from, and sampled end to end against diffusers' pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import jaxcontrol as jc
from jaxcontrol.convert import convert, read_checkpoint
from jaxcontrol.pipeline import Pipeline
from jaxcontrol.testing.sdxl_parity import save_tiny_sdxl_pipeline
from test_convert import (assert_same_tensors, contiguous, openclip_tower, torch_names, unet_to_ldm,
                          vae_to_ldm)

# what the tiny models' weights cannot tell, given as a user would: SDXL and CLIP use 64 channels per
# head and 256-wide size features, these are narrower; the group counts; and diffusers' tiny SDXL
# CLIP-L uses gelu where the real one (and our reading of an SDXL file) has quick_gelu
HEADS = {"unet": {"attention_head_dim": [2, 4], "addition_time_embed_dim": 8, "norm_num_groups": 1},
         "vae": {"norm_num_groups": 2},
         "text_encoder": {"num_attention_heads": 4, "hidden_act": "gelu"},
         "text_encoder_2": {"num_attention_heads": 4}}


def clip_to_openclip_xl(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP text tower keys under `prefix` (every layer
    kept, `text_projection` stored as OpenCLIP's (width, projection) matrix, applied as x @ P)."""
    out = openclip_tower({k: v for k, v in sd.items() if k != "text_projection.weight"}, prefix)
    out[prefix + "text_projection"] = sd["text_projection.weight"].T
    out[prefix + "logit_scale"] = torch.tensor(4.6)
    return out


def sdxl_single_file(pipe, refiner: bool = False) -> dict:
    state = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), 2).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(pipe.vae.state_dict()).items()})
    if refiner:
        state.update(clip_to_openclip_xl(pipe.text_encoder_2.state_dict(), "conditioner.embedders.0.model."))
    else:
        state.update({"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                      for k, v in pipe.text_encoder.state_dict().items()})
        state.update(clip_to_openclip_xl(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    return contiguous(state)


@pytest.fixture(scope="module", params=["base", pytest.param("refiner", marks=pytest.mark.slow)])
def xl(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    pipe = save_tiny_sdxl_pipeline(root, kind=kind, seed=2)
    path = root / f"sd_xl_{kind}_tiny.safetensors"
    save_file(sdxl_single_file(pipe, refiner=kind == "refiner"), str(path))
    return dict(kind=kind, root=root, pipe=pipe, file=path)


def test_sdxl_single_file_equals_the_diffusers_models(xl):
    refiner = xl["kind"] == "refiner"
    heads = {k: v for k, v in HEADS.items() if not (refiner and k == "text_encoder")}
    ckpt = read_checkpoint(xl["file"], overrides=heads)
    assert ckpt.format == ("ldm-sdxl-refiner" if refiner else "ldm-sdxl")
    want = ["unet", "vae", "text_encoder_2"] if refiner else ["unet", "vae", "text_encoder", "text_encoder_2"]
    assert list(ckpt.components) == want
    assert ckpt.pipeline_class == ("StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline")
    assert ckpt.options == {"force_zeros_for_empty_prompt": not refiner, "requires_aesthetics_score": refiner}
    assert ckpt.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    unet = ckpt.components["unet"].config
    assert unet["addition_embed_type"] == "text_time" and unet["addition_time_embed_dim"] == 8  # given
    assert unet["projection_class_embeddings_input_dim"] == (72 if refiner else 80)
    assert unet["transformer_layers_per_block"] == 2  # depth 2 wherever there is attention (mid too)
    assert ckpt.components["vae"].config["scaling_factor"] == 0.13025
    assert ckpt.components["text_encoder_2"].config["_class_name"] == "CLIPTextModelWithProjection"
    assert any("alphas_cumprod" not in n and "noise-schedule" in n for n in ckpt.notes)

    bundle = jc.load_single_file(xl["file"], overrides=heads)
    for name in want:
        ours = torch_names(bundle.params[name], strip_text_model=name.startswith("text_encoder"))
        ref = getattr(xl["pipe"], name).state_dict()
        if name.startswith("text_encoder"):
            ref = {k.removeprefix("text_model."): v for k, v in ref.items()}
        assert_same_tensors(ours, ref, name)
    if not refiner:
        # diffusers reads the same file offline given the folder's configs: the U-Net, VAE and CLIP-L come
        # out as ours do (its OpenCLIP reader assumes bigG's 32 layers, so text_encoder_2 is compared with
        # the source model above only)
        import diffusers

        theirs = diffusers.StableDiffusionXLPipeline.from_single_file(
            str(xl["file"]), config=str(xl["root"] / "pipeline"), local_files_only=True)
        for name in ("unet", "vae", "text_encoder"):
            ref = {k.removeprefix("text_model."): v for k, v in getattr(theirs, name).state_dict().items()}
            assert_same_tensors(torch_names(bundle.params[name], strip_text_model=name == "text_encoder"), ref,
                                f"{name} (diffusers from_single_file)")


@pytest.mark.slow  # the tensors are compared in the fast test above
def test_sdxl_single_file_converts_and_samples_like_diffusers(xl, tmp_path):
    refiner = xl["kind"] == "refiner"
    heads = {k: v for k, v in HEADS.items() if not (refiner and k == "text_encoder")}
    dest = tmp_path / "converted"
    convert(xl["file"], dest, overrides=heads, tokenizer=None if refiner else xl["root"] / "_tokenizer",
            tokenizer_2=xl["root"] / "_tokenizer_2")
    manifest = json.loads((dest / "jaxcontrol.json").read_text())
    assert manifest["options"]["requires_aesthetics_score"] is refiner
    ours = Pipeline.from_pretrained(dest)
    assert ours.xl and ours.requires_aesthetics_score is refiner
    g = torch.Generator().manual_seed(0)
    prompt = ["a red circle"]
    if refiner:
        lat = torch.randn(1, 4, 8, 8, generator=g)
        with torch.no_grad():
            want = xl["pipe"](prompt, image=lat, num_inference_steps=4, denoising_start=0.5, guidance_scale=5.0,
                              output_type="np").images
        got = ours(prompt, init_latents=lat.numpy().transpose(0, 2, 3, 1), num_inference_steps=4, denoising_start=0.5,
                   guidance_scale=5.0, output_type="float")
    else:
        noise = torch.randn(1, 4, 8, 8, generator=g)
        with torch.no_grad():
            want = xl["pipe"](prompt, height=16, width=16, num_inference_steps=4, guidance_scale=5.0, latents=noise,
                              output_type="np").images
        got = ours(prompt, height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
                   latents=noise.numpy().transpose(0, 2, 3, 1), output_type="float")
    assert np.abs(got - want).max() < 1e-4
    # and out to diffusers: the exported folder loads in diffusers with the pipeline's settings
    out = tmp_path / "diffusers"
    convert(dest, out, format="diffusers")
    index = json.loads((out / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is (not refiner)
    import diffusers

    cls = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
    back = cls.from_pretrained(out, local_files_only=True)
    assert back.config.force_zeros_for_empty_prompt is (not refiner)
    assert_same_tensors({k: v.numpy() for k, v in back.unet.state_dict().items()}, xl["pipe"].unet.state_dict(), "unet")


def test_unrecognised_generative_models_file_is_named(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"conditioner.embedders.0.foo.weight": torch.zeros(2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(jc.ConfigError, match="conditioner.embedders.0.foo"):
        read_checkpoint(path)
