"""LoRA files in, LoRA files out: the layouts users actually exchange, as one `models.lora.Lora`.

Read (`read_lora`), each key resolved against the target networks' own parameter shapes:

* **diffusers / PEFT** (`pytorch_lora_weights.safetensors`, written by `save_lora_weights`):
  `unet.<module>.lora_A.weight` / `lora_B.weight` (`lora_B.bias` with PEFT's `lora_bias`), prefixes
  `unet.`, `text_encoder.`, `controlnet.` (no prefix at all: the U-Net, as diffusers reads it);
  alpha from the file's `lora_adapter_metadata` (`lora_alpha`, `alpha_pattern`, `rank_pattern`,
  `use_rslora`), else alpha = rank (scale 1), as diffusers does.
* **older diffusers**: `<module>.lora.down.weight` / `lora.up.weight`, `lora_linear_layer.down/up`,
  attention processors (`attn1.processor.to_q_lora.down.weight`, `to_out_lora` is `to_out.0`;
  text encoder `self_attn.to_q_lora` is `q_proj`), with optional `<module>.alpha`.
* **kohya / A1111** (`lora_unet_*`, `lora_te_*`): `.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (multiplier alpha / rank), conv LoRA on 3x3 convolutions (down (r, in, 3, 3), up (out, r, 1, 1))
  included. Module names are the diffusers names with "_" for "." and are matched against the
  model's own modules, so the underscores are never guessed.

LyCORIS variants (LoHa, LoKr, LoCon's Tucker `lora_mid`), DoRA and full-weight diffs are refused
by name. Everything is checked before a tensor is kept: every key that matches no layer, every
factor whose shape does not fit its layer (named with both shapes) and every incomplete pair is
reported at once, and nothing is returned partially.

Write (`save_lora`): the diffusers/PEFT layout with `lora_adapter_metadata` (what
`pipe.load_lora_weights` reads), or kohya's.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import CheckpointError
from ..models.lora import Lora
from ..models.params import flatten, torch_module_name
from .paths import file_or_named_in_folder
from .safetensors_file import SafetensorsFile, save_safetensors
from .sources import PICKLE_SUFFIXES, open_weights
from .state_dict import torch_module_to_flax

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_PREFIXES = ("unet", "text_encoder", "text_encoder_2", "controlnet")
# markers of formats that are not plain LoRA (checked on every key first)
_UNSUPPORTED = [
    (re.compile(r"\.hada_"), "LoHa (LyCORIS)"),
    (re.compile(r"\.lokr_"), "LoKr (LyCORIS)"),
    (re.compile(r"\.lora_mid\."), "LoCon with a Tucker core (LyCORIS lora_mid)"),
    (re.compile(r"(dora_scale|lora_magnitude_vector)"), "DoRA"),
    (re.compile(r"\.(diff|diff_b)$"), "a full-weight difference"),
    (re.compile(r"\.oft_"), "OFT"),
]
_MAX_LISTED = 20
_TE_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """(component, diffusers module name or kohya stem, role) for a diffusers-style or kohya key;
    role is "down", "up", "bias" or "alpha". None when the key is no LoRA key we know."""
    for prefix, comp in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            stem, _, suffix = key[len(prefix):].partition(".")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
            return (comp, "kohya:" + stem, role) if role else None
    comp = None
    for prefix in DIFFUSERS_PREFIXES:
        m = re.match(rf"{prefix}(_\d+)?\.", key)
        if m:
            comp, key = m.group(0)[:-1], key[m.end():]
            break
    comp = comp or ""
    patterns = [
        (r"(.+)\.lora_A\.weight", "down"), (r"(.+)\.lora_B\.weight", "up"), (r"(.+)\.lora_B\.bias", "bias"),
        (r"(.+)\.lora\.down\.weight", "down"), (r"(.+)\.lora\.up\.weight", "up"),
        (r"(.+)\.lora_linear_layer\.down\.weight", "down"), (r"(.+)\.lora_linear_layer\.up\.weight", "up"),
        (r"(.+)\.alpha", "alpha"),
    ]
    m = re.fullmatch(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight", key)
    if m:  # diffusers' attention-processor LoRA (before 0.17)
        return comp, m[1] + "." + ("to_out.0" if m[2] == "to_out" else m[2]), m[3]
    m = re.fullmatch(r"(.+\.self_attn)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight", key)
    if m:  # the text encoder's in that format
        return comp, m[1] + "." + _TE_PROC[m[2]], m[3]
    for pattern, role in patterns:
        m = re.fullmatch(pattern, key)
        if m:
            return comp, m[1], role
    return None


def _metadata(meta: Mapping[str, str], path: Path) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` split per component ({"unet": {"r": 4, ...}, ...})."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its {METADATA_KEY} metadata is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: its {METADATA_KEY} metadata is not a JSON object")
    out: dict[str, dict] = collections.defaultdict(dict)
    for k, v in data.items():
        comp, _, field = str(k).rpartition(".")
        out[comp or "unet"][field] = v
    return dict(out)


def _pattern_value(patterns: Any, module: str, default):
    """PEFT's rule for `rank_pattern` / `alpha_pattern`: a key matches a module whose name it ends
    (as a regular expression at a dot boundary)."""
    if isinstance(patterns, dict):
        for key, value in patterns.items():
            try:
                if re.match(rf"(.*\.)?({key})$", module):
                    return value
            except re.error:
                if module == key or module.endswith("." + key):
                    return value
    return default


def _expected_factor_shapes(kernel: tuple[int, ...], rank: int) -> tuple[list[tuple], list[tuple]]:
    """The PyTorch shapes a down / up factor of `rank` may have for a Flax kernel."""
    if len(kernel) == 4:
        kh, kw, i, o = kernel
        downs = [(rank, i, kh, kw)] + ([(rank, i)] if (kh, kw) == (1, 1) else [])
        return downs, [(o, rank, 1, 1), (o, rank)]
    i, o = kernel
    return [(rank, i), (rank, i, 1, 1)], [(o, rank), (o, rank, 1, 1)]


def _torch_shape(kernel: tuple[int, ...]) -> tuple[int, ...]:
    return (kernel[3], kernel[2], kernel[0], kernel[1]) if len(kernel) == 4 else (kernel[1], kernel[0])


def _fmt(items: list[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def read_lora(path: str | os.PathLike, targets: Mapping[str, Any], *, name: str | None = None,
              unsafe_load_pickle: bool = False) -> Lora:
    """Read a LoRA file (or a folder holding `pytorch_lora_weights.safetensors`) for the networks
    in `targets` ({"unet": params or their shapes, "text_encoder": ..., "controlnet": ...}).

    Returns a `Lora` whose factors are float32 in Flax layout. Raises `CheckpointError` naming the
    file for an unreadable or unsafe file, a format that is not plain LoRA, keys that match no
    layer of `targets` (all listed), factors whose shapes do not fit (key, its shape, the layer's
    shape and the shapes that would fit), a down factor without its up factor (or the reverse),
    or ranks that disagree. Pickles (`.bin`, `.pt`) go through torch's safe loader."""
    given = Path(path)
    path = file_or_named_in_folder(given, LORA_WEIGHT_NAMES, "LoRA")
    # diffusers' default file name says nothing: such a LoRA is named after its folder
    name = name or (path.parent.name if path.name in LORA_WEIGHT_NAMES else path.stem)
    metadata: Mapping[str, str] = {}
    if path.name.endswith(".safetensors"):
        metadata = SafetensorsFile(path).metadata
    elif not path.name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: a LoRA must be a .safetensors file (or a PyTorch pickle {PICKLE_SUFFIXES})")
    source = open_weights(path, unsafe_load_pickle=unsafe_load_pickle)
    keys = source.keys()
    if not keys:
        raise CheckpointError(f"{path}: holds no tensors")
    for key in keys:
        for pattern, what in _UNSUPPORTED:
            if pattern.search(key):
                raise CheckpointError(f"{path}: key {key!r} is {what}, not a plain LoRA; only LoRA "
                                      f"(down/up factor pairs, also on convolutions) is supported")
    meta = _metadata(metadata, path)
    kernels = {comp: {p.rpartition("/")[0]: tuple(v.shape) for p, v in flatten(tree).items() if p.endswith("/kernel")}
               for comp, tree in targets.items()}
    biases = {comp: {p.rpartition("/")[0] for p in flatten(tree) if p.endswith("/bias")}
              for comp, tree in targets.items()}
    kohya_names = {comp: {m.replace("/", "_"): m for m in mods} for comp, mods in kernels.items()}
    parsed = {k: _parse_key(k) for k in keys}
    unparsed = [k for k, v in parsed.items() if v is None]
    if unparsed:
        raise CheckpointError(f"{path}: {len(unparsed)} keys are not LoRA keys of a known layout "
                              f"(diffusers/PEFT lora_A/lora_B, lora.down/up, kohya lora_down/lora_up):{_fmt(unparsed)}")
    has_prefix = any(comp for comp, _, _ in parsed.values())
    kohya = any(stem.startswith("kohya:") for _, stem, _ in parsed.values())
    fmt = "kohya" if kohya else ("peft" if any(".lora_A." in k or ".lora_B." in k for k in keys)
                                 else "diffusers-legacy")
    groups: dict[tuple[str, str], dict[str, str]] = collections.defaultdict(dict)
    unknown: list[str] = []
    for key, (comp, module, role) in parsed.items():
        comp = comp or ("unet" if not has_prefix else comp)
        if comp not in targets:
            unknown.append(f"{key} (for {comp or 'an unnamed network'}; this model has {sorted(targets)})")
            continue
        if module.startswith("kohya:"):
            flax_module = kohya_names[comp].get(module[len("kohya:"):])
        else:
            flax_module = torch_module_to_flax(module)
            if flax_module not in kernels[comp] and f"text_model/{flax_module}" in kernels[comp]:
                flax_module = f"text_model/{flax_module}"  # transformers 5 names CLIP's layers without text_model.
            flax_module = flax_module if flax_module in kernels[comp] else None
        if flax_module is None:
            unknown.append(f"{key} (no {comp} layer named {module.removeprefix('kohya:')!r})")
            continue
        if role in groups[(comp, flax_module)]:
            raise CheckpointError(f"{path}: keys {groups[(comp, flax_module)][role]!r} and {key!r} both give the "
                                  f"{role} of {comp} layer {torch_module_name(flax_module)!r}")
        groups[(comp, flax_module)][role] = key
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} LoRA keys match no layer of the model (a LoRA for another "
                              f"base model?):{_fmt(unknown)}")
    problems: list[str] = []
    weights: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    plan = []
    for (comp, module), roles in groups.items():
        tname = torch_module_name(module)
        if "down" not in roles or "up" not in roles:
            have = ", ".join(roles[r] for r in sorted(roles))
            problems.append(f"{comp} layer {tname!r}: has {have} but no {'down' if 'down' not in roles else 'up'} "
                            f"factor")
            continue
        kernel = kernels[comp][module]
        down_shape, up_shape = tuple(source.shape(roles["down"])), tuple(source.shape(roles["up"]))
        rank = down_shape[0] if down_shape else 0
        downs, ups = _expected_factor_shapes(kernel, rank)
        if down_shape not in downs:
            problems.append(f"{roles['down']}: shape {down_shape} does not fit {comp} layer {tname!r} of weight shape "
                            f"{_torch_shape(kernel)} (expected {' or '.join(map(str, downs))})")
            continue
        if up_shape not in ups:
            problems.append(f"{roles['up']}: shape {up_shape} does not fit {comp} layer {tname!r} of weight shape "
                            f"{_torch_shape(kernel)} with rank {rank} from {roles['down']} {down_shape} (expected "
                            f"{' or '.join(map(str, ups))})")
            continue
        if "bias" in roles:
            if module not in biases[comp]:
                problems.append(f"{roles['bias']}: {comp} layer {tname!r} has no bias to adapt")
                continue
            if tuple(source.shape(roles["bias"])) != (kernel[-1],):
                problems.append(f"{roles['bias']}: shape {tuple(source.shape(roles['bias']))}, expected ({kernel[-1]},)")
                continue
        if "alpha" in roles and int(np.prod(source.shape(roles["alpha"]))) != 1:
            problems.append(f"{roles['alpha']}: an alpha must be one number, found shape "
                            f"{tuple(source.shape(roles['alpha']))}")
            continue
        plan.append((comp, module, tname, roles, rank))
    if problems:
        raise CheckpointError(f"{path}: the LoRA does not fit the model ({len(problems)} problems):{_fmt(problems)}")
    for comp, module, tname, roles, rank in plan:
        down = np.asarray(source.load(roles["down"]), np.float32)
        up = np.asarray(source.load(roles["up"]), np.float32)
        if "alpha" in roles:
            alpha = float(np.asarray(source.load(roles["alpha"]), np.float64).reshape(()))
            scale = alpha / rank
        else:
            m = meta.get(comp, {})
            r_meta = _pattern_value(m.get("rank_pattern"), tname, m.get("r", rank))
            alpha = float(_pattern_value(m.get("alpha_pattern"), tname, m.get("lora_alpha", r_meta)))
            scale = alpha / (math.sqrt(rank) if m.get("use_rslora") else rank)
        if not math.isfinite(scale):
            raise CheckpointError(f"{path}: {comp} layer {tname!r} has a non-finite alpha")
        layer = {"down": (np.transpose(down, (2, 3, 1, 0)) if down.ndim == 4 else down.T),
                 "up": up.reshape(up.shape[0], rank).T.copy(), "multiplier": np.float32(scale)}
        if layer["down"].ndim == 4 and len(kernels[comp][module]) == 2:
            layer["down"] = layer["down"][0, 0]
        if "bias" in roles:
            layer["bias"] = np.asarray(source.load(roles["bias"]), np.float32)
        for k, v in layer.items():
            if not np.all(np.isfinite(v)):
                raise CheckpointError(f"{path}: {comp} layer {tname!r}: its {k} holds NaN or infinity")
        weights[comp][module] = layer
    return Lora(name=name, weights=dict(weights), source=str(path), format=fmt)


def check_lora(lora: Lora, targets: Mapping[str, Any]) -> None:
    """Check an in-memory `Lora` against the networks `targets` as `read_lora` checks a file:
    every layer exists, its factors' product has the layer's kernel shape and ranks agree.
    Raises `CheckpointError` listing every problem."""
    problems = []
    for comp, layers in lora.weights.items():
        if comp not in targets:
            problems.append(f"network {comp!r}: not in this model (it has {sorted(targets)})")
            continue
        flat = flatten(targets[comp])
        for module, layer in layers.items():
            tname = torch_module_name(module)
            kernel = flat.get(f"{module}/kernel")
            if kernel is None:
                problems.append(f"{comp} layer {tname!r}: no such Linear or Conv layer")
                continue
            kshape = tuple(kernel.shape)
            down, up = tuple(np.shape(layer.get("down"))), tuple(np.shape(layer.get("up")))
            rank = down[-1] if down else 0
            ok = (len(up) == 2 and up == (rank, kshape[-1]) and (
                down == kshape[:-1] + (rank,) or (len(kshape) == 4 and kshape[:2] == (1, 1) and down == (kshape[2], rank))
                or (len(kshape) == 2 and down == (1, 1, kshape[0], rank))))
            if not ok:
                problems.append(f"{comp} layer {tname!r}: factors of shapes {down} and {up} (Flax layout) do not "
                                f"fit its kernel of shape {kshape}")
            if "bias" in layer and (f"{module}/bias" not in flat or tuple(np.shape(layer["bias"])) != (kshape[-1],)):
                problems.append(f"{comp} layer {tname!r}: a LoRA bias of shape {tuple(np.shape(layer['bias']))} "
                                f"does not fit")
    if problems:
        raise CheckpointError(f"LoRA {lora.name!r} does not fit the model ({len(problems)} problems):{_fmt(problems)}")


def lora_tensors(lora: Lora, *, format: str = "peft") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The state dict and safetensors metadata `save_lora` writes ("peft" or "kohya")."""
    if format not in ("peft", "kohya"):
        raise CheckpointError(f"LoRA export format must be 'peft' or 'kohya', got {format!r}")
    tensors: dict[str, np.ndarray] = {}
    meta_out: dict[str, Any] = {}
    for comp, layers in lora.weights.items():
        if format == "kohya" and comp not in ("unet", "text_encoder", "text_encoder_2"):
            raise CheckpointError(f"kohya files hold only unet / text_encoder LoRAs, not {comp!r}")
        ranks, alphas, targets = {}, {}, []
        for module, layer in layers.items():
            down, up = np.asarray(layer["down"], np.float32), np.asarray(layer["up"], np.float32)
            rank = up.shape[0]
            conv = down.ndim == 4
            down_t = np.transpose(down, (3, 2, 0, 1)) if conv else down.T
            up_t = up.T.reshape(up.shape[1], rank, 1, 1) if conv else up.T
            tname = torch_module_name(module)
            alpha = float(np.asarray(layer["multiplier"])) * rank
            if format == "peft":
                tensors[f"{comp}.{tname}.lora_A.weight"] = np.ascontiguousarray(down_t)
                tensors[f"{comp}.{tname}.lora_B.weight"] = np.ascontiguousarray(up_t)
                if "bias" in layer:
                    tensors[f"{comp}.{tname}.lora_B.bias"] = np.asarray(layer["bias"], np.float32)
            else:
                if "bias" in layer:
                    raise CheckpointError(f"kohya files cannot hold the LoRA bias of {comp} layer {tname!r}")
                prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[comp]
                stem = prefix + module.replace("/", "_")
                tensors[f"{stem}.lora_down.weight"] = np.ascontiguousarray(down_t)
                tensors[f"{stem}.lora_up.weight"] = np.ascontiguousarray(up_t)
                tensors[f"{stem}.alpha"] = np.asarray(alpha, np.float32)
            # PEFT matches target names as suffixes: without CLIP's "text_model." they fit transformers 4 and 5
            short = tname.removeprefix("text_model.")
            ranks[short], alphas[short] = rank, alpha
            targets.append(short)
        if format == "peft":
            r = collections.Counter(ranks.values()).most_common(1)[0][0]
            a = collections.Counter(alphas.values()).most_common(1)[0][0]
            bias = any("bias" in layer for layer in layers.values())
            meta_out.update({f"{comp}.r": r, f"{comp}.lora_alpha": a, f"{comp}.target_modules": sorted(targets),
                             f"{comp}.rank_pattern": {k: v for k, v in ranks.items() if v != r},
                             f"{comp}.alpha_pattern": {k: v for k, v in alphas.items() if v != a},
                             f"{comp}.use_dora": False, f"{comp}.lora_bias": bias, f"{comp}.use_rslora": False})
    metadata = {"format": "pt"}
    if meta_out:
        metadata[METADATA_KEY] = json.dumps(meta_out, indent=2, sort_keys=True)
    return tensors, metadata


def save_lora(lora: Lora, path: str | os.PathLike, *, format: str = "peft") -> Path:
    """Write `lora` as one `.safetensors` file, atomically: "peft" (diffusers' layout with its
    `lora_adapter_metadata`, which `pipe.load_lora_weights` reads; a folder path gets
    `pytorch_lora_weights.safetensors` inside) or "kohya" (`lora_unet_*` / `lora_te_*` with `.alpha`)."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAMES[0]
    if not path.name.endswith(".safetensors"):
        raise CheckpointError(f"{path}: a LoRA is written as a .safetensors file")
    tensors, metadata = lora_tensors(lora, format=format)
    save_safetensors(path, tensors, metadata)
    return path
