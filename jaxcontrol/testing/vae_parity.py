"""AutoencoderKL parity rows against diffusers: posterior mean and log-variance, decoder output."""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import torch

from ..convert import load_model
from ..models.vae import SD_VAE, split_moments
from .parity import Row
from .reference import nchw_to_nhwc, randomize_, rel_err

# diffusers' controlnet pipeline tests (4, 8; 2 groups) and adapter pipeline tests (32, 64)
VAE_CASES = {
    "vae-tiny-controlnet-test": (dict(block_out_channels=[4, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                                      up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                                      norm_num_groups=2), (16, 12), 1e-4),
    "vae-tiny-adapter-test": (dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                                   up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4), (16, 12), 1e-4),
    "vae-sd-full": ({k: v for k, v in SD_VAE.to_dict().items() if not k.startswith("_")}, (64, 64), 1e-3),
}
QUICK_VAE_CASES = ("vae-tiny-controlnet-test", "vae-tiny-adapter-test")


def run_vae_case(name: str, seed: int = 0) -> list[Row]:
    """Rows for the `VAE_CASES` entry `name`: posterior mean and log-variance of random images in
    [-1, 1], and the decoder's output for random latents."""
    from diffusers import AutoencoderKL as TorchVAE

    config, (h, w), tol = VAE_CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        t_vae = randomize_(TorchVAE(**config), seed)
        t_vae.save_pretrained(Path(tmp))
        vae, params = load_model(Path(tmp))  # attention "auto", the default
        down = 2 ** (len(config["block_out_channels"]) - 1)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.rand(2, 3, h, w, generator=g) * 2 - 1
        z = torch.randn(2, config.get("latent_channels", 4), h // down, w // down, generator=g)
        with torch.no_grad():
            dist = t_vae.encode(x).latent_dist
            decoded = t_vae.decode(z).sample
        enc = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
        dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
        mean, logvar = split_moments(enc(params, jnp.asarray(nchw_to_nhwc(x))))
        out = dec(params, jnp.asarray(nchw_to_nhwc(z)))
        return [
            Row(name, "vae-encoder (posterior mean)", "auto", *rel_err(mean, dist.mean), tol),
            Row(name, "vae-encoder (posterior logvar)", "auto", *rel_err(logvar, dist.logvar), tol),
            Row(name, "vae-decoder", "auto", *rel_err(out, decoded), tol),
        ]
