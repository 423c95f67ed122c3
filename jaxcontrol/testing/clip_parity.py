"""CLIP text / vision encoder parity against transformers (PyTorch, CPU, float32, random weights).

Each case builds a random transformers model (constant-initialised parameters perturbed by
`randomize_`), saves it with `save_pretrained`, loads it back with `jaxcontrol.load_model`, runs
both sides on the same inputs and reports max|ours - torch| / max|torch| as `parity.Row`s, for
the last hidden state, the pooled output, every hidden state (one row: the worst of them) and the
projected embeddings.

    from jaxcontrol.testing.clip_parity import parity_rows
    from jaxcontrol.testing.parity import format_table
    print(format_table(parity_rows(full=False)))
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ..convert import load_model
from ..models.clip import CLIPTextModel as JaxCLIPTextModel
from .parity import Row
from .reference import nchw_to_nhwc, randomize_

# --- configs -------------------------------------------------------------------------------------
# a tiny CLIP text tower (transformers' CLIPTextModelTester sizes, 5 layers, SD's 77 positions);
# eos_token_id=2 selects transformers' legacy pooling (argmax of the ids)
TINY_TEXT = dict(
    vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
    max_position_embeddings=77, projection_dim=16, hidden_act="quick_gelu",
    bos_token_id=0, pad_token_id=1, eos_token_id=2,
)
# the post-transformers#24773 rule (pool at the first eos), with eos the last id as in CLIP's 49407
TINY_TEXT_EOS_LAST = TINY_TEXT | dict(vocab_size=99, bos_token_id=97, pad_token_id=98, eos_token_id=98)
TINY_VISION = dict(
    image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=37, num_attention_heads=4,
    num_hidden_layers=5, projection_dim=16, hidden_act="quick_gelu",
)
# openai/clip-vit-large-patch14: SD-1.x's text encoder (with its projection, as SDXL's second encoder has)
CLIP_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    bos_token_id=49406, pad_token_id=1, eos_token_id=49407,
)
# SDXL's text_encoder_2, OpenCLIP ViT-bigG/14 as transformers holds it (stable-diffusion-xl-base-1.0's
# config: gelu, legacy pooling ids), with its projection: the pooled embedding SDXL conditions on
OPENCLIP_BIGG_TEXT = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", bos_token_id=0, pad_token_id=1,
    eos_token_id=2,
)
CLIP_B32_VISION = dict(
    image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
    num_hidden_layers=12, projection_dim=512, hidden_act="quick_gelu",
)
CLIP_L14_VISION = dict(
    image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
    num_hidden_layers=24, projection_dim=768, hidden_act="quick_gelu",
)


@dataclasses.dataclass(frozen=True)
class ClipCase:
    """A CLIP parity case: transformers config kwargs of one tower, with or without its projection."""

    name: str
    tower: str  # "text" or "vision"
    config: dict
    with_projection: bool
    tol: float = 1e-4
    batch: int = 2
    seq: int = 77
    slow: bool = False
    attention_impls: tuple[str, ...] = ("plain",)
    # text only: a right-padded attention_mask, and the clip_skip=1 path (final_layer_norm of hidden_states[-2])
    padding_mask: bool = False
    clip_skip: bool = False


CLIP_CASES: dict[str, ClipCase] = {
    c.name: c
    for c in (
        ClipCase("tiny-text-quick_gelu", "text", TINY_TEXT, False, attention_impls=("plain", "dot_product"),
                 clip_skip=True),
        ClipCase("tiny-text-gelu+mask", "text", TINY_TEXT | dict(hidden_act="gelu"), True, padding_mask=True,
                 attention_impls=("plain", "dot_product")),
        ClipCase("tiny-text-eos-last", "text", TINY_TEXT_EOS_LAST, True, batch=3),
        ClipCase("tiny-vision", "vision", TINY_VISION, True, attention_impls=("plain", "dot_product")),
        ClipCase("tiny-vision-gelu", "vision", TINY_VISION | dict(hidden_act="gelu"), False),
        ClipCase("clip-l14-text", "text", CLIP_L14_TEXT, True, slow=True, clip_skip=True),
        ClipCase("openclip-bigg-text", "text", OPENCLIP_BIGG_TEXT, True, slow=True, clip_skip=True),
        ClipCase("clip-b32-vision", "vision", CLIP_B32_VISION, True, slow=True),
        ClipCase("clip-l14-vision", "vision", CLIP_L14_VISION, True, slow=True, batch=1),
    )
}
QUICK_CLIP_CASES = tuple(n for n, c in CLIP_CASES.items() if not c.slow)


def torch_model(case: ClipCase, seed: int = 0) -> torch.nn.Module:
    """The case's transformers model (`CLIPTextModel[WithProjection]` / `CLIPVisionModel[WithProjection]`),
    seeded, with constant-initialised parameters perturbed by `randomize_`, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    if case.tower == "text":
        cls = transformers.CLIPTextModelWithProjection if case.with_projection else transformers.CLIPTextModel
        config = transformers.CLIPTextConfig(**case.config)
    else:
        cls = transformers.CLIPVisionModelWithProjection if case.with_projection else transformers.CLIPVisionModel
        config = transformers.CLIPVisionConfig(**case.config)
    return randomize_(cls(config), seed)


def text_inputs(config: dict, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Token ids that tell the two pooling rules apart.

    Legacy configs (eos_token_id == 2) pool at argmax(ids): the rows are random ids with 2s at
    positions 1 and seq // 2, so pooling at the first eos would pick another position. Otherwise
    rows look tokenised (bos, words, eos, eos padding) at varying lengths, and the last row is
    words only, no bos and no eos (transformers then pools position 0, where argmax(ids) would not).
    """
    g = torch.Generator().manual_seed(seed)
    vocab, eos = config["vocab_size"], config["eos_token_id"]
    if eos == 2:
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        ids[:, 1] = 2
        ids[:, seq // 2] = 2
        return ids
    words = [i for i in range(vocab) if i not in (eos, config.get("bos_token_id"))]
    ids = torch.tensor(words)[torch.randint(0, len(words), (batch, seq), generator=g)]
    for row in range(batch - 1):
        end = 2 + (row * 7) % (seq - 2)
        ids[row, 0] = config.get("bos_token_id", 0)
        ids[row, end:] = eos
    return ids


def padding_mask(batch: int, seq: int) -> torch.Tensor:
    """Right padding: row i keeps its first seq - 5 * (i + 1) tokens (at least 1); the last row is whole."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch - 1):
        mask[row, max(1, seq - 5 * (row + 1)):] = 0
    return mask


def _err(ours: Any, ref: torch.Tensor) -> tuple[float, float, float]:
    ref_np = ref.detach().cpu().numpy()
    ours_np = np.asarray(ours, dtype=np.float32)
    if ours_np.shape != ref_np.shape:
        raise AssertionError(f"shape mismatch: ours {ours_np.shape} vs reference {ref_np.shape}")
    err = float(np.max(np.abs(ours_np - ref_np)))
    mag = float(np.max(np.abs(ref_np)))
    return err, mag, err / max(mag, 1e-30)


def run_clip_case(
    case: ClipCase,
    attention_impls: Sequence[str] | None = None,
    workdir: str | Path | None = None,
    seed: int = 0,
) -> list[Row]:
    """Rows for one case: save the random transformers model, `load_model` it, compare the outputs.
    Raises `AssertionError` when an output's shape or the number of hidden states differs."""
    model = torch_model(case, seed)
    g = torch.Generator().manual_seed(seed + 1)
    refs: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    with torch.no_grad():
        if case.tower == "text":
            ids = text_inputs(case.config, case.batch, case.seq, seed + 2)
            mask = padding_mask(case.batch, case.seq) if case.padding_mask else None
            inner = model.text_model if case.with_projection else model
            out = inner(ids, attention_mask=mask, output_hidden_states=True)
            if case.with_projection:
                refs["text_embeds"] = model(ids, attention_mask=mask).text_embeds
            if case.clip_skip:
                refs["final_norm(hidden_states[-2])"] = inner.final_layer_norm(out.hidden_states[-2])
            inputs = (jnp.asarray(ids.numpy(), jnp.int32),)
            if mask is not None:
                kwargs["attention_mask"] = jnp.asarray(mask.numpy(), jnp.int32)
        else:
            size, ch = case.config["image_size"], case.config.get("num_channels", 3)
            pixels = torch.randn(case.batch, ch, size, size, generator=g)
            inner = model.vision_model if case.with_projection else model
            out = inner(pixels, output_hidden_states=True)
            if case.with_projection:
                refs["image_embeds"] = model(pixels).image_embeds
            inputs = (jnp.asarray(nchw_to_nhwc(pixels)),)
        refs["last_hidden_state"] = out.last_hidden_state
        refs["pooler_output"] = out.pooler_output
        refs["hidden_states"] = out.hidden_states

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model.save_pretrained(tmp)
        del model, inner
        for impl in attention_impls or case.attention_impls:
            module, params = load_model(tmp, attention_impl=impl)
            run = jax.jit(lambda p, *a, **k: module.apply({"params": p}, *a, **k))
            ours = run(params, *inputs, **kwargs)

            def add(component: str, value: Any, ref: torch.Tensor) -> None:
                rows.append(Row(case.name, component, impl, *_err(value, ref), case.tol))

            add("last_hidden_state", ours.last_hidden_state, refs["last_hidden_state"])
            add("pooler_output", ours.pooler_output, refs["pooler_output"])
            if len(ours.hidden_states) != len(refs["hidden_states"]):
                raise AssertionError(
                    f"{case.name}: {len(ours.hidden_states)} hidden states, "
                    f"transformers has {len(refs['hidden_states'])}"
                )
            errs = [_err(o, r) for o, r in zip(ours.hidden_states, refs["hidden_states"])]
            rows.append(Row(case.name, f"hidden_states (worst of {len(errs)})", impl,
                            *max(errs, key=lambda e: e[2]), case.tol))
            for name in ("text_embeds", "image_embeds"):
                if name in refs:
                    add(name, getattr(ours, name), refs[name])
            if case.clip_skip:
                final_norm = JaxCLIPTextModel.apply_final_layer_norm
                norm = jax.jit(lambda p, h: module.apply({"params": p}, h, method=final_norm))
                add("final_norm(hidden_states[-2])", norm(params, ours.hidden_states[-2]),
                    refs["final_norm(hidden_states[-2])"])
            del params
    return rows


def parity_rows(full: bool = False, workdir: str | Path | None = None) -> list[Row]:
    """Rows for the quick CLIP cases, and the full-size CLIP-L / ViT-B/32 / ViT-L/14 ones when `full`."""
    names = [n for n, c in CLIP_CASES.items() if full or not c.slow]
    return [row for name in names for row in run_clip_case(CLIP_CASES[name], workdir=workdir)]
