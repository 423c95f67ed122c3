"""AutoencoderKL against diffusers: posterior moments, decoder, legacy attention names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

import jaxcontrol as jc
from jaxcontrol.convert import SafetensorsFile, save_safetensors
from jaxcontrol.models.vae import SD_VAE, split_moments
from jaxcontrol.testing.reference import nchw_to_nhwc, randomize_, rel_err

# diffusers' controlnet pipeline tests and adapter pipeline tests
TINY = dict(block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2)
SMALL = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
             up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4)


def _check(torch_vae, vae, params, hw, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, *hw, generator=g) * 2 - 1
    z = torch.randn(2, torch_vae.config.latent_channels, hw[0] // 2 ** (len(vae.config.block_out_channels) - 1),
                    hw[1] // 2 ** (len(vae.config.block_out_channels) - 1), generator=g)
    with torch.no_grad():
        dist = torch_vae.encode(x).latent_dist
        decoded = torch_vae.decode(z).sample
    enc = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
    mean, logvar = split_moments(enc(params, jnp.asarray(nchw_to_nhwc(x))))
    errs = {
        "mean": rel_err(mean, dist.mean)[2],
        "logvar": rel_err(logvar, dist.logvar)[2],
        "decode": rel_err(dec(params, jnp.asarray(nchw_to_nhwc(z))), decoded)[2],
    }
    assert max(errs.values()) <= tol, errs
    return errs


@pytest.mark.parametrize("config", [TINY, SMALL, dict(SMALL, mid_block_add_attention=False, use_quant_conv=False)],
                         ids=["tiny", "small", "no-attention-no-quant"])
def test_vae_parity(config, tmp_path):
    torch_vae = randomize_(TorchVAE(**config))
    torch_vae.save_pretrained(tmp_path)
    vae, params = jc.load_model(tmp_path)
    assert isinstance(vae, jc.AutoencoderKL)
    _check(torch_vae, vae, params, (16, 12), 1e-4)


def test_legacy_attention_names_and_conv_weights(tmp_path):
    """Old VAEs store the mid attention as query/key/value/proj_attn, some as 1x1 convs."""
    torch_vae = randomize_(TorchVAE(**SMALL))
    torch_vae.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    f = SafetensorsFile(path)
    renamed = {}
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k in f.keys():
        v = f.load(k)
        for new, old in legacy.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if k.endswith("weight"):
                    v = v[:, :, None, None]
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_safetensors(path, renamed)
    vae, params = jc.load_model(tmp_path)
    _check(torch_vae, vae, params, (8, 8), 1e-4)


def test_reconstruct_and_sample():
    vae = jc.AutoencoderKL(jc.AutoencoderKLConfig(**{**TINY, "block_out_channels": (4, 8)}))
    params = jc.init_params(vae, 0)
    x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3)) * 2 - 1
    run = jax.jit(lambda p, x, r: vae.apply({"params": p}, x, r))
    assert run(params, x, None).shape == (1, 8, 8, 3)
    a, b = run(params, x, jax.random.key(1)), run(params, x, jax.random.key(2))
    assert not np.allclose(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_full_sd_vae_parity(tmp_path):
    config = {k: v for k, v in SD_VAE.to_dict().items() if not k.startswith("_")}
    torch_vae = randomize_(TorchVAE(**config))
    assert sum(p.numel() for p in torch_vae.parameters()) == 83_653_863
    torch_vae.save_pretrained(tmp_path)
    vae, params = jc.load_model(tmp_path)
    _check(torch_vae, vae, params, (64, 64), 1e-3)
