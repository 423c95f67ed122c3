"""Original (CompVis LDM, lllyasviel ControlNet, TencentARC T2I-Adapter) key layouts -> diffusers names.

Every function here works on key names and shapes only. A renaming is a dict `{original key:
diffusers key}` that `derive` turns into a lazy `TensorSource`, so nothing is read until the
converter asks for one tensor; the few tensors whose layout changes (the VAE's 1x1-conv attention,
OpenCLIP's fused q/k/v projection) get a per-tensor transform instead of a copy of the file.

Configs are inferred from shapes once the keys carry diffusers names (`infer_*_config`), so a
diffusers state dict without its `config.json` is handled by the same code. What the weights do
not record (attention head counts, GroupNorm groups, the prediction type) is filled with the value
Stable Diffusion uses, and every such guess is returned as a note for the summary.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..models.configs import CROSS_ATTN_DOWN, CROSS_ATTN_UP, MID_CROSS_ATTN, MID_PLAIN, PLAIN_DOWN, PLAIN_UP
from .sources import TensorSource

# one renamed tensor: (original key, new shape or None for unchanged, transform or None)
Spec = tuple[str, Optional[tuple[int, ...]], Optional[Callable[[np.ndarray], np.ndarray]]]


class Unknown:
    """A config value the weights do not determine and no rule supplies: the user must give it."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unknown({self.reason!r})"


def derive(source: TensorSource, spec: Mapping[str, Spec], origin: str | None = None) -> TensorSource:
    """A lazy view of `source` with keys `spec` maps (new key -> (old key, shape, transform))."""
    entries = {}
    for new, (old, shape, fn) in spec.items():
        if fn is None:
            entries[new] = (tuple(source.shape(old)), (lambda old=old: source.load(old)))
        else:
            entries[new] = (tuple(shape), (lambda old=old, fn=fn: fn(source.load(old))))
    return TensorSource(entries, origin or source.origin)


def _unrecognised(what: str, origin: str, keys: list[str]) -> CheckpointError:
    shown = "\n  ".join(keys[:20])
    more = f"\n  ... and {len(keys) - 20} more" if len(keys) > 20 else ""
    return CheckpointError(
        f"{origin}: keys of the {what} that no known layout explains ({len(keys)}):\n  {shown}{more}")


# --- U-Net and ControlNet (openaimodel.UNetModel / cldm.ControlNet) -------------------------------

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_RE = re.compile(r"(in_layers\.0|in_layers\.2|emb_layers\.1|out_layers\.0|out_layers\.3|skip_connection)\.(.+)")


def _resnet(rest: str) -> str | None:
    m = _RESNET_RE.fullmatch(rest)
    return f"{_RESNET[m[1]]}.{m[2]}" if m else None


def unet_layout(keys: Iterable[str]) -> tuple[int, int]:
    """(number of resolution levels, layers per block) of an LDM U-Net / ControlNet from its keys."""
    inputs, downsamplers = set(), set()
    for k in keys:
        m = re.match(r"input_blocks\.(\d+)\.", k)
        if m:
            inputs.add(int(m[1]))
            if re.match(r"input_blocks\.\d+\.0\.op\.", k):
                downsamplers.add(int(m[1]))
    if not inputs:
        raise CheckpointError("no input_blocks.* keys")
    levels = len(downsamplers) + 1
    n_inputs = max(inputs) + 1
    if (n_inputs - levels) % levels or n_inputs - levels <= 0:
        raise CheckpointError(
            f"input_blocks 0..{n_inputs - 1} with {levels - 1} downsamplers do not form a U-Net with the same number "
            f"of layers per level"
        )
    return levels, (n_inputs - levels) // levels


def ldm_unet_to_diffusers(keys: list[str], origin: str, *, controlnet: bool = False,
                          xl: bool = False) -> dict[str, str]:
    """Map the keys of an LDM `UNetModel` (or a `ControlNet`, with `controlnet=True`) to diffusers names.

    `keys` carry no prefix (`input_blocks.1.0.in_layers.0.weight`). Any key outside the known layout
    raises a `CheckpointError` listing it, so a file from a different architecture is never half-read.
    `xl`: an SDXL U-Net, whose `label_emb.0.0` / `label_emb.0.2` (the pooled text and size
    embedding) are diffusers' `add_embedding.linear_1` / `linear_2`.
    """
    what = "ControlNet" if controlnet else "U-Net"
    if not xl and any(k.startswith("label_emb.") for k in keys):
        raise ConfigError(
            f"{origin}: this {what} is class-conditioned (label_emb.*: SDXL, SD-2 unCLIP or the x4 upscaler); "
            f"jaxcontrol implements the SD-1.x / SD-2.x text-to-image U-Net only"
        )
    try:
        _, lpb = unet_layout(keys)
    except CheckpointError as e:
        raise CheckpointError(f"{origin}: cannot read the {what} layout: {e}") from None
    per = lpb + 1
    hint_convs = sorted({int(m[1]) for k in keys if (m := re.match(r"input_hint_block\.(\d+)\.", k))})
    up_has_attention = {
        int(m[1]) // per for k in keys if (m := re.match(r"output_blocks\.(\d+)\.1\.(?!conv\.)", k))
    }
    out: dict[str, str] = {}
    bad = []
    for k in keys:
        new = None
        if xl and (m := re.fullmatch(r"label_emb\.0\.([02])\.(weight|bias)", k)):
            new = f"add_embedding.linear_{int(m[1]) // 2 + 1}.{m[2]}"
        elif k.startswith("time_embed.0."):
            new = "time_embedding.linear_1." + k[len("time_embed.0."):]
        elif k.startswith("time_embed.2."):
            new = "time_embedding.linear_2." + k[len("time_embed.2."):]
        elif k.startswith("input_blocks.0.0."):
            new = "conv_in." + k[len("input_blocks.0.0."):]
        elif (m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", k)) and int(m[1]) > 0:
            i, j, rest = int(m[1]), int(m[2]), m[3]
            b, layer = divmod(i - 1, per)
            if layer == lpb:  # the level's downsampler
                if j == 0 and rest.startswith("op."):
                    new = f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}"
            elif j == 0 and (r := _resnet(rest)):
                new = f"down_blocks.{b}.resnets.{layer}.{r}"
            elif j == 1:
                new = f"down_blocks.{b}.attentions.{layer}.{rest}"
        elif m := re.fullmatch(r"middle_block\.(\d)\.(.+)", k):
            j, rest = int(m[1]), m[2]
            if j in (0, 2) and (r := _resnet(rest)):
                new = f"mid_block.resnets.{j // 2}.{r}"
            elif j == 1:
                new = f"mid_block.attentions.0.{rest}"
        elif not controlnet and (m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", k)):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            b, layer = divmod(i, per)
            if j == 0 and (r := _resnet(rest)):
                new = f"up_blocks.{b}.resnets.{layer}.{r}"
            elif rest.startswith("conv.") and layer == lpb and j == (2 if b in up_has_attention else 1):
                new = f"up_blocks.{b}.upsamplers.0.conv.{rest[5:]}"
            elif j == 1:
                new = f"up_blocks.{b}.attentions.{layer}.{rest}"
        elif not controlnet and k.startswith("out.0."):
            new = "conv_norm_out." + k[len("out.0."):]
        elif not controlnet and k.startswith("out.2."):
            new = "conv_out." + k[len("out.2."):]
        elif controlnet and (m := re.fullmatch(r"zero_convs\.(\d+)\.0\.(.+)", k)):
            new = f"controlnet_down_blocks.{m[1]}.{m[2]}"
        elif controlnet and k.startswith("middle_block_out.0."):
            new = "controlnet_mid_block." + k[len("middle_block_out.0."):]
        elif controlnet and (m := re.fullmatch(r"input_hint_block\.(\d+)\.(.+)", k)):
            # convolutions sit at even indices (odd ones are SiLUs): conv_in, blocks.0..n-1, conv_out
            idx = int(m[1])
            if idx == hint_convs[0]:
                new = f"controlnet_cond_embedding.conv_in.{m[2]}"
            elif idx == hint_convs[-1]:
                new = f"controlnet_cond_embedding.conv_out.{m[2]}"
            elif idx % 2 == 0:
                new = f"controlnet_cond_embedding.blocks.{idx // 2 - 1}.{m[2]}"
        if new is None:
            bad.append(k)
        else:
            out[k] = new
    if bad:
        raise _unrecognised(what, origin, bad)
    return out


def _count(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in keys if (m := rx.match(k))})


def _first(source: TensorSource, pattern: str) -> str | None:
    rx = re.compile(pattern)
    return next((k for k in source.keys() if rx.match(k)), None)


def infer_unet_config(source: TensorSource, *, controlnet: bool = False) -> tuple[dict, list[str]]:
    """A diffusers `UNet2DConditionModel` / `ControlNetModel` config from a diffusers-named state dict."""
    keys = source.keys()
    shape = source.shape
    what = "ControlNet" if controlnet else "U-Net"
    notes: list[str] = []
    try:
        n = _count(keys, r"down_blocks\.(\d+)\.resnets\.0\.conv1\.weight")
        block_out = [shape(f"down_blocks.{b}.resnets.0.conv1.weight")[0] for b in range(n)]
        lpb = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.conv1\.weight")
        has_attn = [f"down_blocks.{b}.attentions.0.proj_in.weight" in source for b in range(n)]
        conv_in = shape("conv_in.weight")
    except KeyError as e:
        raise CheckpointError(f"{source.origin}: cannot infer the {what} config: no tensor {e}") from None
    if n == 0:
        raise CheckpointError(f"{source.origin}: cannot infer the {what} config: no down_blocks.*")
    config: dict = {
        "_class_name": "ControlNetModel" if controlnet else "UNet2DConditionModel",
        "in_channels": conv_in[1],
        "block_out_channels": block_out,
        "layers_per_block": lpb,
        "down_block_types": [CROSS_ATTN_DOWN if a else PLAIN_DOWN for a in has_attn],
    }
    if "mid_block.attentions.0.proj_in.weight" in source:
        config["mid_block_type"] = MID_CROSS_ATTN
    elif "mid_block.resnets.0.conv1.weight" in source:
        config["mid_block_type"] = MID_PLAIN
    else:
        config["mid_block_type"] = None
    to_k = _first(source, r".*\.attn2\.to_k\.weight$")
    proj_in = _first(source, r".*attentions\.\d+\.proj_in\.weight$")
    if to_k is not None:
        cross = shape(to_k)[1]
        config["cross_attention_dim"] = cross
        config["use_linear_projection"] = len(shape(proj_in)) == 2
        config["transformer_layers_per_block"] = _transformer_depths(keys, n, has_attn)
        xl = "add_embedding.linear_1.weight" in source
        # head counts are not stored in the weights: SD-1.x uses 8 heads, SD-2.x and SDXL 64 channels per head
        if xl:
            config["attention_head_dim"] = [max(1, c // 64) for c in block_out]
            notes.append(f"{what}: attention heads not stored in the weights; assumed SDXL's 64 channels per head "
                         f"({config['attention_head_dim']})")
        elif cross == 1024:
            config["attention_head_dim"] = [max(1, c // 64) for c in block_out]
            notes.append(f"{what}: attention heads not stored in the weights; assumed SD-2.x's 64 channels per head "
                         f"({config['attention_head_dim']})")
        else:
            config["attention_head_dim"] = 8
            notes.append(f"{what}: attention heads not stored in the weights; assumed SD-1.x's 8 heads")
    if "time_embedding.cond_proj.weight" in source:
        config["time_cond_proj_dim"] = shape("time_embedding.cond_proj.weight")[1]
    if "add_embedding.linear_1.weight" in source:  # SDXL: pooled text + 256-wide Fourier features per size id
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=shape("add_embedding.linear_1.weight")[1])
    if controlnet:
        try:
            cond_in = shape("controlnet_cond_embedding.conv_in.weight")
            nb = _count(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
            outs = [cond_in[0]] + [shape(f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight")[0]
                                   for i in range(nb // 2)]
        except KeyError as e:
            raise CheckpointError(
                f"{source.origin}: cannot infer the ControlNet's hint encoder: no tensor {e}") from None
        config["conditioning_channels"] = cond_in[1]
        config["conditioning_embedding_out_channels"] = outs
    else:
        config["out_channels"] = shape("conv_out.weight")[0]
        config["conv_in_kernel"] = conv_in[2]
        config["conv_out_kernel"] = shape("conv_out.weight")[2]
        nu = _count(keys, r"up_blocks\.(\d+)\.resnets\.0\.conv1\.weight")
        config["up_block_types"] = [
            CROSS_ATTN_UP if f"up_blocks.{b}.attentions.0.proj_in.weight" in source else PLAIN_UP for b in range(nu)
        ]
        config["sample_size"] = 128 if "add_embedding.linear_1.weight" in source else 64
    return config, notes


def _transformer_depths(keys, n: int, has_attn: list[bool]) -> int | list[int]:
    """`transformer_layers_per_block`: the transformer blocks in each down block's attentions. Blocks
    without attention get 1, except a last one, whose entry the mid block also uses (diffusers
    takes the mid block's depth from the last entry); one depth everywhere is written as an int,
    as diffusers' own configs do (SDXL base: [1, 2, 10]; its refiner: 4)."""
    depths = [_count(keys, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.") for b in range(n)]
    mid = _count(keys, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    used = {d for d, a in zip(depths, has_attn) if a} | ({mid} if mid else set())
    if len(used) == 1:
        return used.pop()
    out = [d if a else 1 for d, a in zip(depths, has_attn)]
    if mid and not has_attn[-1]:
        out[-1] = mid
    return out


# --- VAE (ldm.models.autoencoder.AutoencoderKL) -------------------------------------------------

_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _squeeze_1x1(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], a.shape[1])


def ldm_vae_to_diffusers(source: TensorSource, keys: list[str], origin: str) -> dict[str, Spec]:
    """Spec for an LDM `AutoencoderKL` (keys without prefix; `loss.*` training keys must be removed first)."""
    n_up = _count(keys, r"decoder\.up\.(\d+)\.")
    spec: dict[str, Spec] = {}
    bad = []
    for k in keys:
        new, shape, fn = None, None, None
        if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", k):
            new = k
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", k):
            new = f"{m[1]}.conv_norm_out.{m[2]}"
        elif re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", k):
            new = k
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(.+)", k):
            new = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3].replace('nin_shortcut', 'conv_shortcut')}.{m[4]}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", k):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(.+)", k):
            new = (f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.{m[2]}."
                   f"{m[3].replace('nin_shortcut', 'conv_shortcut')}.{m[4]}")
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", k):
            new = f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(norm1|conv1|norm2|conv2|nin_shortcut)\.(.+)",
                               k):
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3].replace('nin_shortcut', 'conv_shortcut')}.{m[4]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", k):
            new = f"{m[1]}.mid_block.attentions.0.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            s = source.shape(k)
            if m[3] == "weight" and len(s) == 4:  # a 1x1 conv in LDM, a Linear in diffusers
                if tuple(s[2:]) != (1, 1):
                    raise CheckpointError(f"{origin}: {k}: expected a 1x1 convolution, found shape {tuple(s)}")
                shape, fn = (s[0], s[1]), _squeeze_1x1
        if new is None:
            bad.append(k)
        else:
            spec[new] = (k, shape, fn)
    if bad:
        raise _unrecognised("VAE", origin, bad)
    return spec


def infer_vae_config(source: TensorSource) -> tuple[dict, list[str]]:
    """The diffusers `AutoencoderKL` config of a VAE state dict (diffusers names), read from its shapes.

    Returns (config, notes); sample_size 512 and scaling_factor 0.18215 (SD 1.x) are assumed, the
    rest (channels, blocks, layers_per_block, quant convs, mid-block attention) comes from the keys.
    Raises `CheckpointError` naming the source when a key it needs is missing.
    """
    keys = source.keys()
    shape = source.shape
    try:
        n = _count(keys, r"encoder\.down_blocks\.(\d+)\.resnets\.0\.conv1\.weight")
        block_out = [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n)]
        config = {
            "_class_name": "AutoencoderKL",
            "in_channels": shape("encoder.conv_in.weight")[1],
            "out_channels": shape("decoder.conv_out.weight")[0],
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": block_out,
            "layers_per_block": _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.conv1\.weight"),
            "latent_channels": shape("decoder.conv_in.weight")[1],
            "use_quant_conv": "quant_conv.weight" in source,
            "use_post_quant_conv": "post_quant_conv.weight" in source,
            "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in source,
            "sample_size": 512,
            "scaling_factor": 0.18215,
        }
    except KeyError as e:
        raise CheckpointError(f"{source.origin}: cannot infer the VAE config: no tensor {e}") from None
    return config, []


# --- CLIP text encoders -------------------------------------------------------------------------

_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}


def openclip_text_to_diffusers(source: TensorSource, keys: list[str], origin: str, *,
                               sdxl: bool = False) -> tuple[dict[str, Spec], list[str]]:
    """Spec for an OpenCLIP text tower (SD-2.x's `cond_stage_model.model.*`, prefix removed).

    SD-2.x conditions on the penultimate layer, so, like diffusers, the last transformer layer is
    dropped and the result is a `CLIPTextModel` with one layer fewer whose `final_layer_norm` is
    OpenCLIP's `ln_final`. The fused `attn.in_proj_*` is split into q, k and v on load.
    `sdxl` (SDXL's OpenCLIP bigG, `conditioner.embedders.*.model.*`): every layer is kept (the
    pipeline reads the penultimate hidden state itself) and OpenCLIP's `text_projection` (width,
    projection), applied as x @ P, becomes a `CLIPTextModelWithProjection`'s `text_projection.weight` P^T.
    """
    layers = sorted({int(m[1]) for k in keys if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    if not layers:
        raise CheckpointError(f"{origin}: no OpenCLIP text transformer (transformer.resblocks.*)")
    last = layers[-1] if not sdxl else None
    spec: dict[str, Spec] = {}
    dropped, bad = [], []
    for k in keys:
        if k == "token_embedding.weight":
            spec["text_model.embeddings.token_embedding.weight"] = (k, None, None)
        elif k == "positional_embedding":
            spec["text_model.embeddings.position_embedding.weight"] = (k, None, None)
        elif m := re.fullmatch(r"ln_final\.(weight|bias)", k):
            spec[f"text_model.final_layer_norm.{m[1]}"] = (k, None, None)
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k):
            i, mod, leaf = int(m[1]), m[2], m[3]
            if i == last:
                dropped.append(k)
            elif mod in _OPENCLIP_LAYER:
                spec[f"text_model.encoder.layers.{i}.{_OPENCLIP_LAYER[mod]}.{leaf}"] = (k, None, None)
            else:
                bad.append(k)
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k):
            i, leaf = int(m[1]), m[2]
            if i == last:
                dropped.append(k)
                continue
            s = tuple(source.shape(k))
            if s[0] % 3:
                raise CheckpointError(f"{origin}: {k}: fused q/k/v projection of shape {s} is not divisible by 3")
            d = s[0] // 3
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                spec[f"text_model.encoder.layers.{i}.self_attn.{name}.{leaf}"] = (
                    k, (d,) + s[1:], (lambda a, j=j, d=d: a[j * d:(j + 1) * d]))
        elif sdxl and k == "text_projection":
            s = tuple(source.shape(k))
            if len(s) != 2:
                raise CheckpointError(f"{origin}: {k} has shape {s}; expected (width, projection)")
            spec["text_projection.weight"] = (k, (s[1], s[0]), lambda a: np.ascontiguousarray(np.asarray(a).T))
        elif k in ("text_projection", "logit_scale", "attn_mask") or k.startswith("visual."):
            dropped.append(k)
        else:
            bad.append(k)
    if bad:
        raise _unrecognised("OpenCLIP text encoder", origin, bad)
    if sdxl:
        if "text_projection.weight" not in spec:
            raise CheckpointError(f"{origin}: SDXL's OpenCLIP text encoder has no text_projection (its pooled "
                                  f"embedding needs it)")
        return spec, [f"text_encoder_2: OpenCLIP bigG, all {len(layers)} layers, with its text projection"]
    notes = [f"text encoder: OpenCLIP layer {last} of {last + 1} dropped (SD-2.x conditions on the penultimate layer)"]
    return spec, notes


def infer_clip_text_config(source: TensorSource, *, hidden_act: str) -> tuple[dict, list[str]]:
    """A transformers `CLIPTextConfig` for a `text_model.*` state dict; SD's token ids (bos 0, eos 2, pad 1)."""
    keys = source.keys()
    shape = source.shape
    notes = []
    try:
        vocab, hidden = shape("text_model.embeddings.token_embedding.weight")
        config = {
            "_class_name": "CLIPTextModel",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")[0],
            "num_hidden_layers": _count(keys, r"text_model\.encoder\.layers\.(\d+)\."),
            "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
            "projection_dim": shape("text_projection.weight")[0] if "text_projection.weight" in source else hidden,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        }
    except KeyError as e:
        raise CheckpointError(f"{source.origin}: cannot infer the text encoder config: no tensor {e}") from None
    if hidden % 64:
        config["num_attention_heads"] = Unknown(
            f"the text encoder's attention head count is not stored in the weights and hidden_size={hidden} is not "
            f"a multiple of 64")
    else:
        config["num_attention_heads"] = hidden // 64
        notes.append(f"text encoder: {hidden // 64} attention heads assumed (64 channels per head, as CLIP-L and "
                     f"OpenCLIP-H)")
    return config, notes


# --- T2I-Adapter (TencentARC/T2I-Adapter ldm/modules/encoders/adapter.py) ------------------------


def _adapter_in_channels(conv_in_channels: int, origin: str, key: str) -> int:
    # the original unshuffles by 8, so the first convolution sees in_channels * 64 channels
    if conv_in_channels % 64:
        raise ConfigError(
            f"{origin}: {key} takes {conv_in_channels} channels, not a multiple of 64 (8x8 pixel unshuffle); "
            f"for another downscale factor give --set adapter.downscale_factor=N --set adapter.in_channels=C"
        )
    return conv_in_channels // 64


def t2i_full_to_diffusers(source: TensorSource, keys: list[str], origin: str) -> tuple[dict[str, str], dict, list[str]]:
    """`Adapter(cin, channels, nums_rb, ksize=1, sk=True, use_conv=False)` -> diffusers `full_adapter`."""
    notes = []
    bodies = sorted({int(m[1]) for k in keys if (m := re.match(r"body\.(\d+)\.", k))})
    if any(".skep." in k for k in keys):
        raise ConfigError(f"{origin}: an adapter built with sk=False (body.*.skep) has no diffusers equivalent")
    if any(".down_opt.op." in k for k in keys):
        raise ConfigError(f"{origin}: an adapter built with use_conv=True (strided-conv downsampling) has no diffusers "
                          f"equivalent")
    in_convs = sorted({int(m[1]) for k in keys if (m := re.match(r"body\.(\d+)\.in_conv\.", k))})
    if in_convs:
        nrb = in_convs[0]
    else:
        nrb = 2
        notes.append("adapter: residual blocks per level not visible in the weights; assumed 2 (every released SD-1.x "
                     "adapter)")
    n = len(bodies)
    if nrb <= 0 or n % nrb or any(i % nrb for i in in_convs) or bodies != list(range(n)):
        raise CheckpointError(f"{origin}: adapter body blocks {bodies} with in_conv at {in_convs} do not form levels "
                              f"of equal depth")
    mapping, bad = {}, []
    for k in keys:
        if re.fullmatch(r"conv_in\.(weight|bias)", k):
            mapping[k] = "adapter." + k
        elif m := re.fullmatch(r"body\.(\d+)\.(block1|block2|in_conv)\.(weight|bias)", k):
            i, j = divmod(int(m[1]), nrb)
            if m[2] == "in_conv":
                if j:
                    bad.append(k)
                    continue
                mapping[k] = f"adapter.body.{i}.in_conv.{m[3]}"
            else:
                mapping[k] = f"adapter.body.{i}.resnets.{j}.{m[2]}.{m[3]}"
        else:
            bad.append(k)
    if bad:
        raise _unrecognised("T2I-Adapter", origin, bad)
    levels = n // nrb
    config = {
        "_class_name": "T2IAdapter",
        "in_channels": _adapter_in_channels(source.shape("conv_in.weight")[1], origin, "conv_in.weight"),
        "channels": [source.shape(f"body.{i * nrb}.block1.weight")[0] for i in range(levels)],
        "num_res_blocks": nrb,
        "downscale_factor": 8,
        "adapter_type": "full_adapter",
    }
    return mapping, config, notes


def t2i_light_to_diffusers(source: TensorSource, keys: list[str],
                           origin: str) -> tuple[dict[str, str], dict, list[str]]:
    """`Adapter_light(channels, nums_rb, cin)` -> diffusers `light_adapter` (whose `channels` omit the last level)."""
    mapping, bad = {}, []
    for k in keys:
        if m := re.fullmatch(r"body\.(\d+)\.(in_conv|out_conv)\.(weight|bias)", k):
            mapping[k] = f"adapter.body.{m[1]}.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"body\.(\d+)\.body\.(\d+)\.(block1|block2)\.(weight|bias)", k):
            mapping[k] = f"adapter.body.{m[1]}.resnets.{m[2]}.{m[3]}.{m[4]}"
        else:
            bad.append(k)
    if bad:
        raise _unrecognised("light T2I-Adapter", origin, bad)
    levels = _count(keys, r"body\.(\d+)\.in_conv\.weight")
    widths = [source.shape(f"body.{i}.out_conv.weight")[0] for i in range(levels)]
    if levels < 2 or widths[-1] != widths[-2]:
        raise ConfigError(
            f"{origin}: a light adapter with level widths {widths} has no diffusers equivalent (diffusers repeats the "
            f"last width for its final level)"
        )
    config = {
        "_class_name": "T2IAdapter",
        "in_channels": _adapter_in_channels(source.shape("body.0.in_conv.weight")[1], origin, "body.0.in_conv.weight"),
        "channels": widths[:-1],
        "num_res_blocks": _count(keys, r"body\.0\.body\.(\d+)\.block1\.weight"),
        "downscale_factor": 8,
        "adapter_type": "light_adapter",
    }
    return mapping, config, []


def infer_adapter_config(source: TensorSource) -> tuple[dict, list[str]]:
    """A `T2IAdapter` config from a diffusers-named adapter state dict (`adapter.*`)."""
    keys = source.keys()
    shape = source.shape
    light = "adapter.conv_in.weight" not in source
    levels = _count(keys, r"adapter\.body\.(\d+)\.")
    try:
        if light:
            widths = [shape(f"adapter.body.{i}.out_conv.weight")[0] for i in range(levels)]
            first_in = shape("adapter.body.0.in_conv.weight")[1]
            channels = widths[:-1]
        else:
            channels = [shape(f"adapter.body.{i}.resnets.0.block1.weight")[0] for i in range(levels)]
            first_in = shape("adapter.conv_in.weight")[1]
    except KeyError as e:
        raise CheckpointError(f"{source.origin}: cannot infer the adapter config: no tensor {e}") from None
    config = {
        "_class_name": "T2IAdapter",
        "in_channels": _adapter_in_channels(first_in, source.origin, "the first convolution"),
        "channels": channels,
        "num_res_blocks": _count(keys, r"adapter\.body\.0\.resnets\.(\d+)\."),
        "downscale_factor": 8,
        "adapter_type": "light_adapter" if light else "full_adapter",
    }
    return config, ["adapter: downscale_factor 8 assumed (SD-1.x adapters; SDXL ones need "
                    "--set adapter.adapter_type=full_adapter_xl --set adapter.downscale_factor=16)"]
