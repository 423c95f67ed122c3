"""U-Net / ControlNet parity cases against diffusers (PyTorch, CPU, float32, random weights).

Each case builds random diffusers models, saves them with `save_pretrained`, loads them back with
`jaxcontrol.load_model`, runs both sides on the same inputs and reports max|ours - torch| / max|torch|.
`benchmarks/parity.py` prints these rows as a table; `tests/test_unet_parity.py` asserts on them.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import torch

from ..convert import load_model
from .reference import nchw_to_nhwc, randomize_, rel_err

# --- configs -----------------------------------------------------------------------------------
# diffusers' tests/pipelines/controlnet/test_controlnet.py::get_dummy_components
TINY_CONTROLNET_TEST = dict(
    block_out_channels=(4, 8), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, norm_num_groups=1,
)
# diffusers' tests/models/unets/test_models_unet_2d_condition.py
TINY_UNET_TEST = dict(
    block_out_channels=(4, 8), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
    out_channels=4, in_channels=4, layers_per_block=1, sample_size=16,
)
# diffusers' tests/pipelines/stable_diffusion_adapter (norm_num_groups defaults to 32)
TINY_ADAPTER_TEST = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
)
# SD-2.x style: linear projections, per-block head counts, upcast attention
SD2_STYLE = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, cross_attention_dim=48,
)
# diffusers' tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py::get_dummy_components:
# SDXL's text_time embedding, per-block transformer depth, linear projections
TINY_SDXL_TEST = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=1,
)
# Stable Diffusion XL base 1.0 (sd_xl_base.yaml through diffusers' converter)
SDXL = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Stable Diffusion 1.5 (v1-inference.yaml through diffusers' converter)
SD15 = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768, sample_size=64,
)


@dataclasses.dataclass(frozen=True)
class Case:
    """A U-Net (+ ControlNet) parity case: diffusers constructor kwargs, latent size, relative tolerance."""

    name: str
    unet: dict
    controlnet: dict | None  # ControlNet-only fields, or None for no ControlNet
    latent_hw: tuple[int, int]
    tol: float
    batch: int = 2
    seq: int = 7
    slow: bool = False
    attention_impls: tuple[str, ...] = ("plain", "dot_product")


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("tiny-controlnet-test", TINY_CONTROLNET_TEST, dict(conditioning_embedding_out_channels=(16, 32)),
             (32, 32), 1e-4, attention_impls=("auto", "plain", "dot_product")),
        Case("tiny-unet-test", TINY_UNET_TEST, dict(conditioning_embedding_out_channels=(16, 32)), (16, 16), 1e-4,
             attention_impls=("plain",)),
        Case("tiny-adapter-test", TINY_ADAPTER_TEST, dict(conditioning_embedding_out_channels=(16, 32)),
             (32, 32), 1e-4, slow=True, attention_impls=("plain",)),
        # every portable kernel is checked on tiny-controlnet-test ("auto" is "chunked" there on the CPU:
        # 1024 queries); "auto" (the default) on the case that upcasts and on the full size too
        Case("sd2-style", SD2_STYLE, dict(conditioning_embedding_out_channels=(16, 32, 32)), (16, 16), 1e-4,
             attention_impls=("auto",)),
        Case("sd2-style-odd-size", SD2_STYLE, None, (13, 10), 1e-4, attention_impls=("plain",)),
        Case("sd15-full", SD15, dict(), (16, 16), 1e-3, batch=2, seq=77, slow=True, attention_impls=("auto", "plain")),
        Case("tiny-sdxl-test", TINY_SDXL_TEST, dict(conditioning_embedding_out_channels=(16, 32)), (16, 16), 1e-4,
             attention_impls=("auto",)),
        # the full SDXL U-Net (2.57 B parameters) and ControlNet-XL: see `run_case` for the staging
        Case("sdxl-full", SDXL, dict(), (16, 16), 1e-3, batch=1, seq=77, slow=True, attention_impls=("auto",)),
    )
}
QUICK_CASES = tuple(n for n, c in CASES.items() if not c.slow)


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared output: max|ours - torch|, max|torch| and their ratio against `tol`."""

    case: str
    component: str
    attention: str
    max_abs_err: float
    max_abs_ref: float
    rel_err: float
    tol: float

    @property
    def ok(self) -> bool:
        """Whether `rel_err <= tol`."""
        return self.rel_err <= self.tol


def controlnet_fields(unet_config: dict, extra: dict) -> dict:
    """diffusers `ControlNetModel` kwargs: the encoder fields of a U-Net's kwargs, updated by `extra`."""
    shared = (
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "norm_num_groups",
        "cross_attention_dim", "attention_head_dim", "use_linear_projection", "upcast_attention",
        "only_cross_attention", "transformer_layers_per_block", "resnet_time_scale_shift", "flip_sin_to_cos",
        "freq_shift", "norm_eps", "act_fn", "downsample_padding", "mid_block_scale_factor",
        "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    )
    return {k: unet_config[k] for k in shared if k in unet_config} | extra


def adapter_feature_shapes(unet_config: dict, batch: int, hw: tuple[int, int]) -> list[tuple[int, ...]]:
    """NCHW shapes of T2I-Adapter features, one per down block, as diffusers' U-Net consumes them."""
    types = unet_config.get("down_block_types")
    channels = unet_config.get("block_out_channels")
    h, w = hw
    shapes = []
    for i, (t, c) in enumerate(zip(types, channels)):
        final = i == len(types) - 1
        nh, nw = (h, w) if final else (math.ceil(h / 2), math.ceil(w / 2))
        # cross-attention blocks take the feature before their downsampler, plain blocks after it
        shapes.append((batch, c, h, w) if t == "CrossAttnDownBlock2D" else (batch, c, nh, nw))
        h, w = nh, nw
    return shapes


def run_case(
    case: Case,
    attention_impls: Sequence[str] | None = None,
    workdir: str | Path | None = None,
    seed: int = 0,
) -> list[Row]:
    """Rows for one case: the U-Net alone, with T2I-Adapter features and (with a ControlNet) the
    ControlNet's residuals and the U-Net fed with them, for each attention kernel. The random
    diffusers models are saved under a temporary folder in `workdir` (default: the system's).

    Staged so that one network is in memory at a time, on either side (the full SDXL U-Net is
    10.3 GB in float32): the ControlNet runs first, then the U-Net with its residuals; PyTorch's
    models are freed before JAX loads."""
    from diffusers import ControlNetModel as TorchControlNet
    from diffusers import UNet2DConditionModel as TorchUNet

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        with torch.device("meta"):  # the config alone: nothing allocated
            config = dict(TorchUNet(**case.unet).config)
        g = torch.Generator().manual_seed(seed + 2)
        b, (h, w) = case.batch, case.latent_hw
        x = torch.randn(b, config["in_channels"], h, w, generator=g)
        t = torch.tensor([999, 10, 500, 1][:b], dtype=torch.long)
        ctx = torch.randn(b, case.seq, config["cross_attention_dim"], generator=g)
        feats = [torch.randn(s, generator=g) for s in adapter_feature_shapes(config, b, (h, w))]
        added = sdxl_added_conditions(config, b, g)
        extra = {} if added is None else {"added_cond_kwargs": added}

        refs: dict[str, Any] = {}
        down = mid = None
        with torch.no_grad():
            if case.controlnet is not None:
                torch.manual_seed(seed + 1)
                t_cn = randomize_(TorchControlNet(**controlnet_fields(case.unet, case.controlnet)), seed + 1)
                t_cn.save_pretrained(tmp / "controlnet")
                factor = 2 ** (len(t_cn.config.conditioning_embedding_out_channels) - 1)
                cond = torch.rand(b, t_cn.config.conditioning_channels, h * factor, w * factor, generator=g)
                down, mid = t_cn(x, t, ctx, cond, conditioning_scale=0.7, return_dict=False, **extra)
                refs["controlnet-down"], refs["controlnet-mid"] = down, mid
                del t_cn
            torch.manual_seed(seed)
            t_unet = randomize_(TorchUNet(**case.unet), seed)
            t_unet.save_pretrained(tmp / "unet")
            refs["unet"] = t_unet(x, t, ctx, **extra).sample
            refs["unet+t2i-features"] = t_unet(
                x, t, ctx, down_intrablock_additional_residuals=[f.clone() for f in feats], **extra
            ).sample
            if down is not None:
                refs["unet+controlnet"] = t_unet(
                    x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid, **extra
                ).sample
            del t_unet

        jx, jt, jctx = jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
        jfeats = [jnp.asarray(nchw_to_nhwc(f)) for f in feats]
        jextra = {k: {n: jnp.asarray(v.numpy()) for n, v in a.items()} for k, a in extra.items()}
        rows = []

        def add(component, impl, ours, ref):
            err, mag, rel = rel_err(ours, ref)
            rows.append(Row(case.name, component, impl, err, mag, rel, case.tol))

        for impl in attention_impls or case.attention_impls:
            jdown = jmid = None
            if case.controlnet is not None:
                cn, cparams = load_model(tmp / "controlnet", attention_impl=impl)
                jcond = jnp.asarray(nchw_to_nhwc(cond))
                run_cn = jax.jit(lambda p, *a, **k: cn.apply({"params": p}, *a, **k))
                jdown, jmid = run_cn(cparams, jx, jt, jctx, jcond, conditioning_scale=0.7, **jextra)
                del cparams, run_cn
                worst = max((rel_err(o, r) for o, r in zip(jdown, refs["controlnet-down"])), key=lambda e: e[2])
                rows.append(Row(case.name, "controlnet-down (worst of %d)" % len(jdown), impl, *worst, case.tol))
                add("controlnet-mid", impl, jmid, refs["controlnet-mid"])
            unet, params = load_model(tmp / "unet", attention_impl=impl)
            run_unet = jax.jit(lambda p, *a, **k: unet.apply({"params": p}, *a, **k))
            add("unet", impl, run_unet(params, jx, jt, jctx, **jextra), refs["unet"])
            add("unet+t2i-features", impl,
                run_unet(params, jx, jt, jctx, down_intrablock_additional_residuals=jfeats, **jextra),
                refs["unet+t2i-features"])
            if jdown is not None:
                add("unet+controlnet", impl,
                    run_unet(params, jx, jt, jctx, down_block_additional_residuals=jdown,
                             mid_block_additional_residual=jmid, **jextra),
                    refs["unet+controlnet"])
            del params, run_unet
        return rows


def sdxl_added_conditions(unet_config: dict, batch: int, generator: torch.Generator) -> dict | None:
    """SDXL's `added_cond_kwargs` for a text_time U-Net config (else None): random pooled text
    embeddings and 6 micro-conditioning ids per sample (sizes, crop corners) as torch tensors."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 16.0, 48.0, 1024.0, 1024.0],
                        [512.0, 512.0, 0.0, 0.0, 896.0, 1152.0], [64.0, 64.0, 3.0, 5.0, 1024.0, 1024.0]])
    return {"text_embeds": torch.randn(batch, pooled, generator=generator), "time_ids": ids[:batch].clone()}


def format_table(rows: Sequence[Row]) -> str:
    """`rows` as a fixed-width text table, one line per row, with a header."""
    header = f"{'case':<22} {'component':<30} {'attention':<12} {'max|err|':>10} {'max|ref|':>10} {'rel err':>10} {'tol':>8}  ok"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.case:<22} {r.component:<30} {r.attention:<12} {r.max_abs_err:>10.3e} {r.max_abs_ref:>10.3e} "
            f"{r.rel_err:>10.3e} {r.tol:>8.0e}  {'yes' if r.ok else 'NO'}"
        )
    return "\n".join(lines)
