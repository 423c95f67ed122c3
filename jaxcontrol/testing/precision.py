"""Error of the bf16 compute mode against float32 (activations bf16; GroupNorm, LayerNorm, softmax in f32)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ..convert import load_model
from .parity import TINY_ADAPTER_TEST, controlnet_fields
from .reference import randomize_


def bf16_error_rows(
    seed: int = 0,
    param_dtypes: tuple = (jnp.float32, jnp.bfloat16),
    attention_impls: tuple[str, ...] = ("plain", "dot_product"),
) -> list[dict]:
    """Rows of {model, params, attention, rel_err} (bf16 mode vs float32) for the tiny-adapter-test config."""
    from diffusers import ControlNetModel as TorchControlNet
    from diffusers import UNet2DConditionModel as TorchUNet

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(seed)
        randomize_(TorchUNet(**TINY_ADAPTER_TEST), seed).save_pretrained(tmp / "unet")
        fields = controlnet_fields(TINY_ADAPTER_TEST, dict(conditioning_embedding_out_channels=(16, 32)))
        randomize_(TorchControlNet(**fields), seed + 1).save_pretrained(tmp / "controlnet")
        k = jax.random.split(jax.random.key(seed), 4)
        x = jax.random.normal(k[0], (2, 32, 32, 4))
        ctx = jax.random.normal(k[1], (2, 7, 32))
        cond = jax.random.uniform(k[2], (2, 64, 64, 3))
        t = jnp.array([999, 10])

        unet32, p32 = load_model(tmp / "unet")
        cn32, c32 = load_model(tmp / "controlnet")
        ref_unet = np.asarray(unet32.apply({"params": p32}, x, t, ctx))
        ref_down, ref_mid = cn32.apply({"params": c32}, x, t, ctx, cond)

        for param_dtype in param_dtypes:
            for impl in attention_impls:
                unet, p = load_model(tmp / "unet", dtype=jnp.bfloat16, param_dtype=param_dtype, attention_impl=impl)
                cn, c = load_model(tmp / "controlnet", dtype=jnp.bfloat16, param_dtype=param_dtype,
                                   attention_impl=impl)
                out = np.asarray(jax.jit(lambda p: unet.apply({"params": p}, x, t, ctx))(p))
                down, mid = jax.jit(lambda c: cn.apply({"params": c}, x, t, ctx, cond))(c)
                name = jnp.dtype(param_dtype).name
                rows.append(dict(model="unet", params=name, attention=impl, rel_err=_rel(out, ref_unet)))
                worst = max(_rel(np.asarray(o, np.float32), np.asarray(r)) for o, r in zip(down, ref_down))
                rows.append(dict(model="controlnet-down (worst)", params=name, attention=impl, rel_err=worst))
                rows.append(dict(model="controlnet-mid", params=name, attention=impl,
                                 rel_err=_rel(np.asarray(mid, np.float32), np.asarray(ref_mid))))
    return rows


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def format_bf16_table(rows: list[dict]) -> str:
    """`bf16_error_rows` as a fixed-width text table with a header."""
    header = f"{'model':<26} {'params':<10} {'attention':<12} {'rel err vs f32':>15}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<26} {r['params']:<10} {r['attention']:<12} {r['rel_err']:>15.3e}")
    return "\n".join(lines)


__all__ = ["bf16_error_rows", "format_bf16_table"]
