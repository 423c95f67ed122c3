"""T2I-Adapter parity cases against diffusers (PyTorch, CPU, float32, random weights).

Each case builds random diffusers `T2IAdapter`s (and, for U-Net cases, a `UNet2DConditionModel`),
saves them with `save_pretrained`, loads them back with `jaxcontrol.load_model` (or
`load_multi_adapter` for a `MultiAdapter`), runs both sides on the same inputs and reports
max|ours - torch| / max|torch| as `jaxcontrol.testing.parity.Row`s. U-Net cases feed each side's
own adapter features to its own U-Net through `down_intrablock_additional_residuals`, so the rows
measure the whole adapter path, not the U-Net alone.

    from jaxcontrol.testing.adapter_parity import ADAPTER_CASES, run_adapter_case
    rows = [r for c in ADAPTER_CASES.values() for r in run_adapter_case(c)]
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import torch

from ..convert import load_model, load_multi_adapter
from .parity import TINY_ADAPTER_TEST, TINY_SDXL_TEST, Row, sdxl_added_conditions
from .reference import nchw_to_nhwc, randomize_, rel_err

# --- configs -----------------------------------------------------------------------------------
# diffusers' tests/pipelines/stable_diffusion_adapter/test_stable_diffusion_adapter.py::get_dummy_components
TINY_ADAPTER = dict(in_channels=3, channels=(32, 64), num_res_blocks=2, downscale_factor=2)
# diffusers' tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl_adapter.py::get_dummy_components
TINY_ADAPTER_XL = dict(
    in_channels=3, channels=(32, 64), num_res_blocks=2, downscale_factor=4, adapter_type="full_adapter_xl"
)
# ...::get_dummy_components_with_full_downscaling (x8 VAE, 4 U-Net down blocks)
FULL_DOWNSCALING_UNET = dict(
    block_out_channels=(32, 32, 32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
)
FULL_DOWNSCALING_ADAPTER = dict(in_channels=3, channels=(32, 32, 32, 64), num_res_blocks=2, downscale_factor=8)
# SDXL's adapter layout in miniature: the U-Net of diffusers' SDXL full-downscaling adapter test (text_time
# embedding included), and an XL adapter with a 4th level, which the U-Net adds after its mid block, as
# SDXL's (320, 640, 1280, 1280) adapter does.
XL_STYLE_UNET = dict(
    block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=2, use_linear_projection=True, cross_attention_dim=64,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
)
XL_STYLE_ADAPTER = dict(
    in_channels=3, channels=(32, 32, 64, 64), num_res_blocks=2, downscale_factor=16, adapter_type="full_adapter_xl"
)


@dataclasses.dataclass(frozen=True)
class AdapterCase:
    """A T2I-Adapter parity case: diffusers `T2IAdapter` kwargs per adapter, image size, and optionally
    a U-Net (diffusers kwargs) to feed the features to."""

    name: str
    adapters: tuple[dict, ...]  # diffusers T2IAdapter kwargs; two or more make a MultiAdapter
    image_hw: tuple[int, int]
    tol: float = 1e-4
    batch: int = 2
    adapter_weights: tuple[float, ...] | None = None  # MultiAdapter only
    unet: dict | None = None  # a U-Net config: also compare the U-Net fed with the adapter's features
    latent_hw: tuple[int, int] | None = None
    seq: int = 7


def _full(**kw: Any) -> dict:
    return TINY_ADAPTER | {"adapter_type": "full_adapter"} | kw


def _light(**kw: Any) -> dict:
    return TINY_ADAPTER | {"adapter_type": "light_adapter"} | kw


ADAPTER_CASES: dict[str, AdapterCase] = {
    c.name: c
    for c in (
        AdapterCase("full-adapter", (_full(),), (64, 64)),
        # odd sizes after unshuffling: 9x11 -> 5x6 (AvgPool2d ceil_mode)
        AdapterCase("full-adapter-odd", (_full(),), (18, 22)),
        AdapterCase("light-adapter", (_light(),), (64, 64)),
        AdapterCase("light-adapter-odd", (_light(),), (18, 22)),
        AdapterCase("full-adapter-xl", (TINY_ADAPTER_XL,), (64, 64)),
        AdapterCase("xl-4-levels-odd", (XL_STYLE_ADAPTER,), (144, 112)),  # 9x7 -> 9x7 -> 5x4 -> 5x4
        AdapterCase("one-channel", (_full(in_channels=1),), (64, 64)),
        AdapterCase("one-channel-light", (_light(in_channels=1),), (64, 64)),
        # two adapters, one RGB and one 1-channel (sketch-like), each with its own image
        AdapterCase("multi-adapter", (_full(), _full(in_channels=1)), (64, 64), adapter_weights=(0.3, 0.7)),
        AdapterCase("multi-adapter-default-weights", (_full(), _full()), (64, 64)),
        # U-Net + adapter
        AdapterCase("unet-tiny-adapter-test", (_full(),), (64, 64), unet=TINY_ADAPTER_TEST,
                    latent_hw=(32, 32)),
        # 4 down blocks, odd sizes at every level: 9 -> 5 -> 3 -> 2 (diffusers' test_multiple_image_dimensions)
        AdapterCase("unet-full-downscaling-odd", (FULL_DOWNSCALING_ADAPTER,), (72, 72),
                    unet=FULL_DOWNSCALING_UNET, latent_hw=(9, 9)),
        AdapterCase("unet-xl-style", (XL_STYLE_ADAPTER,), (144, 144), unet=XL_STYLE_UNET,
                    latent_hw=(18, 18)),
        # diffusers' SDXL adapter pipeline test: its U-Net and full_adapter_xl, image 64 -> latents 32
        AdapterCase("unet-sdxl-tiny-adapter", (TINY_ADAPTER_XL,), (64, 64), unet=TINY_SDXL_TEST,
                    latent_hw=(32, 32)),
    )
}
ADAPTER_ONLY_CASES = tuple(n for n, c in ADAPTER_CASES.items() if c.unet is None)
UNET_ADAPTER_CASES = tuple(n for n, c in ADAPTER_CASES.items() if c.unet is not None)


def _worst(case: AdapterCase, component: str, ours: Sequence, refs: Sequence, attention: str = "-") -> Row:
    if len(ours) != len(refs):
        raise AssertionError(f"{case.name}: {len(ours)} features, diffusers gives {len(refs)}")
    errs = [rel_err(o, r) for o, r in zip(ours, refs)]
    worst = max(errs, key=lambda e: e[2])
    return Row(case.name, f"{component} (worst of {len(errs)})", attention, *worst, case.tol)


def run_adapter_case(case: AdapterCase, workdir: str | Path | None = None, seed: int = 0) -> list[Row]:
    """Rows for one case: the adapter features (worst feature) and, for U-Net cases, the U-Net output.
    Raises `AssertionError` when the two sides give different numbers of features."""
    from diffusers import MultiAdapter as TorchMultiAdapter
    from diffusers import T2IAdapter as TorchT2IAdapter
    from diffusers import UNet2DConditionModel as TorchUNet

    multi = len(case.adapters) > 1
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        torch.manual_seed(seed)
        t_adapters = [randomize_(TorchT2IAdapter(**kw), seed + 10 + k) for k, kw in enumerate(case.adapters)]
        t_adapter = TorchMultiAdapter(t_adapters).eval() if multi else t_adapters[0]
        t_adapter.save_pretrained(str(tmp / "adapter"))

        g = torch.Generator().manual_seed(seed + 2)
        b, (h, w) = case.batch, case.image_hw
        images = [torch.rand(b, kw["in_channels"], h, w, generator=g) for kw in case.adapters]
        with torch.no_grad():
            if multi:
                weights = None if case.adapter_weights is None else list(case.adapter_weights)
                ref_feats = t_adapter(images, adapter_weights=weights)
            else:
                ref_feats = t_adapter(images[0])
        ref_feats = [f.clone() for f in ref_feats]

        t_unet = None
        if case.unet is not None:
            t_unet = randomize_(TorchUNet(**case.unet), seed)
            t_unet.save_pretrained(tmp / "unet")
            lh, lw = case.latent_hw
            x = torch.randn(b, t_unet.config.in_channels, lh, lw, generator=g)
            t = torch.tensor([999, 10, 500, 1][:b], dtype=torch.long)
            ctx = torch.randn(b, case.seq, t_unet.config.cross_attention_dim, generator=g)
            added = sdxl_added_conditions(dict(t_unet.config), b, g)
            extra = {} if added is None else {"added_cond_kwargs": added}
            with torch.no_grad():
                # diffusers' U-Net pops from the list it is given: pass a copy
                ref_unet = t_unet(x, t, ctx, down_intrablock_additional_residuals=[f.clone() for f in ref_feats],
                                  **extra).sample
        del t_unet, t_adapter, t_adapters

        jimages = [jnp.asarray(nchw_to_nhwc(im)) for im in images]
        rows = []
        if multi:
            adapter, aparams = load_multi_adapter(tmp / "adapter")
            run = jax.jit(lambda p, xs, wts: adapter.apply({"params": p}, xs, adapter_weights=wts))
            wts = None if case.adapter_weights is None else jnp.asarray(case.adapter_weights, jnp.float32)
            feats = run(aparams, jimages, wts)
            component = "multi-adapter features"
        else:
            adapter, aparams = load_model(tmp / "adapter")
            feats = jax.jit(lambda p, x: adapter.apply({"params": p}, x))(aparams, jimages[0])
            component = "adapter features"
        rows.append(_worst(case, component, feats, ref_feats))

        if case.unet is not None:
            unet, uparams = load_model(tmp / "unet")
            jx, jt, jctx = jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
            jextra = {k: {n: jnp.asarray(v.numpy()) for n, v in a.items()} for k, a in extra.items()}
            out = jax.jit(
                lambda p, f: unet.apply({"params": p}, jx, jt, jctx, down_intrablock_additional_residuals=f, **jextra)
            )(uparams, list(feats))
            err, mag, rel = rel_err(out, ref_unet)
            rows.append(Row(case.name, "unet+adapter", "plain", err, mag, rel, case.tol))
        return rows


def adapter_rows(names: Sequence[str] | None = None, workdir: str | Path | None = None) -> list[Row]:
    """Rows for the named cases (default: all), for a report script: `parity.format_table(adapter_rows())`."""
    rows: list[Row] = []
    for name in names or ADAPTER_CASES:
        rows += run_adapter_case(ADAPTER_CASES[name], workdir=workdir)
    return rows
