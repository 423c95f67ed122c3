"""Tiny random SDXL pipelines saved by diffusers itself, for parity tests of the SDXL family.

    ref = save_tiny_sdxl_pipeline(tmp, kind="base")     # tmp/pipeline: StableDiffusionXLPipeline
    ours = Pipeline.from_pretrained(tmp / "pipeline")

Components follow diffusers' own SDXL pipeline tests (`get_dummy_components`): a two-block U-Net
with the text_time embedding (addition_time_embed_dim 8, transformer depth (1, 2)), two CLIP text
encoders of width 32 (the second with a projection, padding with "!" as SDXL's tokenizer_2 does),
Euler with "leading" spacing. The VAE has SDXL's scaling factor 0.13025 and `force_upcast`.
"""

from __future__ import annotations

from pathlib import Path

from .parity import TINY_SDXL_TEST, controlnet_fields
from .pipeline_parity import VAE_TINY
from .reference import randomize_, tiny_clip_tokenizer

KINDS = ("base", "refiner", "img2img", "inpaint", "inpaint-9ch", "controlnet", "multi-controlnet", "adapter")
TINY_XL_TEXT = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
                    num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
                    projection_dim=32)
# the refiner: text_encoder_2 only (32 wide), and 5 time ids (original size, crop, aesthetic score)
TINY_REFINER_UNET = dict(TINY_SDXL_TEST, cross_attention_dim=32, projection_class_embeddings_input_dim=72)
TINY_XL_ADAPTER = dict(in_channels=3, channels=(32, 64), num_res_blocks=2, downscale_factor=4,
                       adapter_type="full_adapter_xl")
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 timestep_spacing="leading")


def save_tiny_sdxl_pipeline(folder: str | Path, *, kind: str = "base", seed: int = 0):
    """A diffusers SDXL pipeline folder (`folder/pipeline`) with tiny random components; returns
    the in-memory diffusers pipeline. `kind`: "base" (StableDiffusionXLPipeline), "img2img" (its
    img2img class over the base's components), "refiner" (StableDiffusionXLImg2ImgPipeline with
    text_encoder_2 alone and the aesthetic score), "inpaint" (StableDiffusionXLInpaintPipeline, a
    4-channel U-Net), "inpaint-9ch" (the same over a 9-channel inpainting U-Net), "controlnet" /
    "multi-controlnet" (ControlNet-XL), "adapter" (T2I-Adapter-XL).
    A 16x16 image has 8x8 latents (VAE factor 2); a control image is the image's size."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    folder = Path(folder)
    torch.manual_seed(seed)
    refiner = kind == "refiner"
    unet_config = TINY_REFINER_UNET if refiner else TINY_SDXL_TEST
    if kind == "inpaint-9ch":  # as diffusers/stable-diffusion-xl-1.0-inpainting-0.1: mask + masked-image latents
        unet_config = dict(unet_config, in_channels=9)
    unet = randomize_(diffusers.UNet2DConditionModel(**unet_config), seed)
    vae = randomize_(diffusers.AutoencoderKL(**VAE_TINY, scaling_factor=0.13025, force_upcast=True), seed + 9)
    text_config = CLIPTextConfig(**TINY_XL_TEXT)
    text_encoder_2 = randomize_(CLIPTextModelWithProjection(text_config), seed + 7)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tiny_clip_tokenizer(folder / "_tokenizer_2", pad_token="!"))
    common = dict(vae=vae, unet=unet, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                  scheduler=diffusers.EulerDiscreteScheduler(**SCHEDULER))
    if refiner:
        common.update(text_encoder=None, tokenizer=None)
    else:
        common.update(text_encoder=randomize_(CLIPTextModel(text_config), seed + 8),
                      tokenizer=CLIPTokenizer.from_pretrained(tiny_clip_tokenizer(folder / "_tokenizer")))

    def controlnet(k):
        fields = controlnet_fields(TINY_SDXL_TEST, {"conditioning_embedding_out_channels": (16, 32)})
        return randomize_(diffusers.ControlNetModel(**fields), seed + 1 + k)

    if kind == "base":
        pipe = diffusers.StableDiffusionXLPipeline(**common)
    elif kind in ("img2img", "refiner"):
        # as stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json: no zeroed negative embeddings
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**common, requires_aesthetics_score=refiner,
                                                          force_zeros_for_empty_prompt=not refiner)
    elif kind in ("inpaint", "inpaint-9ch"):
        pipe = diffusers.StableDiffusionXLInpaintPipeline(**common)
    elif kind == "controlnet":
        pipe = diffusers.StableDiffusionXLControlNetPipeline(controlnet=controlnet(0), **common)
    elif kind == "multi-controlnet":
        pipe = diffusers.StableDiffusionXLControlNetPipeline(
            controlnet=diffusers.MultiControlNetModel([controlnet(0), controlnet(1)]), **common)
    else:
        adapter = randomize_(diffusers.T2IAdapter(**TINY_XL_ADAPTER), seed + 5)
        pipe = diffusers.StableDiffusionXLAdapterPipeline(adapter=adapter, **common)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipeline")
    return pipe
