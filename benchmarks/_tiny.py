"""Tiny random Stable-Diffusion-layout models for the benchmarks' `--tiny` runs (what the test
suite runs): the same folder formats and code paths as the full-size runs, in seconds."""

from __future__ import annotations

from pathlib import Path

# diffusers' tiny adapter-test U-Net (two blocks, one with cross-attention) at 8x8 latents
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
# four levels, so the image / latent factor is SD's 8
TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, sample_size=64,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def build_tiny_sd_folder(folder: str | Path) -> Path:
    """Save a StableDiffusionPipeline folder with tiny random U-Net, VAE and CLIP text encoder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jaxcontrol.testing.reference import tiny_clip_tokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    tok_dir = tiny_clip_tokenizer(folder.parent / (folder.name + "-tokenizer"))
    StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=UNet2DConditionModel(**TINY_UNET),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder
