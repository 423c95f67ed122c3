"""Peak host memory of `load_pipeline` on a full-size SD-1.5 or SDXL folder with random weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from .parity import SD15
from .reference import tiny_clip_tokenizer

SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, sample_size=512, latent_channels=4)


def build_sd15_folder(folder: str | Path) -> Path:
    """Save a StableDiffusionPipeline with full-size random U-Net, VAE and CLIP text encoder (4.3 GB)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    tok_dir = tiny_clip_tokenizer(folder.parent / (folder.name + "-tokenizer"))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=UNet2DConditionModel(**SD15),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_sdxl_folder(folder: str | Path) -> Path:
    """Save a StableDiffusionXLPipeline folder with full-size random networks (13.9 GB in float32:
    U-Net 2.57B, CLIP-L 123M, OpenCLIP bigG with projection 695M, VAE 84M), one network at a time
    so that at most the U-Net is in memory."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .clip_parity import CLIP_L14_TEXT, OPENCLIP_BIGG_TEXT
    from .parity import SDXL
    from .sdxl_parity import SCHEDULER

    folder = Path(folder)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    builders = {
        "unet": lambda: diffusers.UNet2DConditionModel(**SDXL),
        "vae": lambda: diffusers.AutoencoderKL(**SD15_VAE, scaling_factor=0.13025, force_upcast=True),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT)),
    }
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
             "force_zeros_for_empty_prompt": True}
    for name, build in builders.items():
        model = build()
        model.save_pretrained(folder / name)
        index[name] = [type(model).__module__.split(".")[0], type(model).__name__]
        del model
    tok = CLIPTokenizer.from_pretrained(tiny_clip_tokenizer(folder.parent / (folder.name + "-tokenizer")))
    for name in ("tokenizer", "tokenizer_2"):
        tok.save_pretrained(folder / name)
        index[name] = ["transformers", "CLIPTokenizer"]
    scheduler = diffusers.EulerDiscreteScheduler(**SCHEDULER)
    scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


_PROBE = r"""
import json, sys
import jax
import jaxcontrol
from jaxcontrol.models.params import count_params

def status(field):
    # VmHWM / VmRSS belong to this process's own address space; ru_maxrss would also count the
    # parent's memory at fork time, which Linux carries across exec
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
bundle = jaxcontrol.load_pipeline(sys.argv[1])
peak = status("VmHWM")
counts = {k: count_params(v) for k, v in bundle.params.items()}
print(json.dumps({"baseline_bytes": base, "peak_bytes": peak, "param_counts": counts}))
"""


def measure_load_memory(folder: str | Path) -> dict:
    """Load `folder` in a fresh process; return its peak RSS, its RSS before loading, and the param bytes."""
    out = subprocess.run([sys.executable, "-c", _PROBE, str(folder)], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["param_bytes_f32"] = 4 * sum(result["param_counts"].values())
    result["peak_over_params"] = result["peak_bytes"] / result["param_bytes_f32"]
    return result
