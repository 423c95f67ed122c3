"""LoRA files made by diffusers + PEFT on tiny random models, and the same weights in the other
layouts users have (kohya, older diffusers), built key by key from the PEFT state dict."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _metadata(config) -> dict:
    d = config.to_dict()
    return {k: (sorted(d[k]) if isinstance(d[k], set) else d[k])
            for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora",
                      "lora_bias", "use_rslora")}


def add_peft_loras(pipe, *, seed: int = 0, unet_rank: int = 4, unet_alpha: float = 8, text_rank: int = 2,
                   text_alpha: float = 2, adapter_name: str = "default", std: float = 0.2) -> tuple[dict, dict]:
    """Give `pipe.unet` and `pipe.text_encoder` PEFT LoRA adapters (conv LoRA on the resnets'
    conv1, a rank pattern on ff.net.2 and an alpha pattern on proj_in), their factors drawn at
    random (PEFT starts lora_B at zero). Returns (state dicts, adapter metadata) per network, as
    `save_lora_weights` takes them."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ucfg = LoraConfig(r=unet_rank, lora_alpha=unet_alpha, target_modules=UNET_TARGETS,
                      rank_pattern={"ff.net.2": max(1, unet_rank // 2)}, alpha_pattern={"proj_in": 3})
    tcfg = LoraConfig(r=text_rank, lora_alpha=text_alpha, target_modules=TEXT_TARGETS)
    # SDXL pipelines: both text encoders (the refiner has the second alone)
    texts = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    pipe.unet.add_adapter(ucfg, adapter_name=adapter_name)
    for n in texts:
        getattr(pipe, n).add_adapter(tcfg, adapter_name=adapter_name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in [pipe.unet] + [getattr(pipe, n) for n in texts]:
            for name, p in model.named_parameters():
                if "lora_" in name and f".{adapter_name}." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    states = {"unet": get_peft_model_state_dict(pipe.unet, adapter_name=adapter_name)}
    states.update({n: get_peft_model_state_dict(getattr(pipe, n), adapter_name=adapter_name) for n in texts})
    return states, {"unet": _metadata(ucfg), **{n: _metadata(tcfg) for n in texts}}


def save_peft_lora(pipe, folder: str | Path, **kwargs) -> tuple[Path, dict[str, np.ndarray]]:
    """`add_peft_loras`, then diffusers' `save_lora_weights` into `folder`. Returns the file and
    its tensors as numpy (diffusers' keys), for building other layouts from the same weights."""
    import diffusers

    states, meta = add_peft_loras(pipe, **kwargs)
    folder = Path(folder)
    if "text_encoder_2" in states:  # SDXL's loader class writes the second encoder's layers too
        diffusers.StableDiffusionXLPipeline.save_lora_weights(
            folder, **{f"{n}_lora_layers": states[n] for n in states},
            **{f"{n}_lora_adapter_metadata": meta[n] for n in meta})
    else:
        diffusers.StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=states["unet"], text_encoder_lora_layers=states["text_encoder"],
            unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta["text_encoder"])
    from safetensors.numpy import load_file

    path = folder / "pytorch_lora_weights.safetensors"
    return path, load_file(str(path))


def peft_alpha(module: str, meta: dict) -> float:
    """The alpha PEFT gives `module` under adapter metadata `meta` (its alpha_pattern, else lora_alpha)."""
    for key, value in meta.get("alpha_pattern", {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(meta["lora_alpha"])


def to_kohya(tensors: dict[str, Any], meta: dict[str, dict]) -> dict[str, np.ndarray]:
    """The same LoRA in kohya's layout: `lora_unet_<module with _>` / `lora_te_text_model_<...>`,
    `.lora_down.weight`, `.lora_up.weight` and `.alpha` (written from the PEFT alphas)."""
    out = {}
    for key, value in tensors.items():
        comp, _, rest = key.partition(".")
        module, _, role = rest.rpartition(".lora_")
        if comp == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module
        stem = ("lora_unet_" if comp == "unet" else "lora_te_") + module.replace(".", "_")
        kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[role]
        out[f"{stem}.{kind}"] = np.asarray(value)
        if role == "A.weight":
            out[f"{stem}.alpha"] = np.asarray(peft_alpha(module.removeprefix("text_model."), meta[comp]), np.float32)
    return out


def to_legacy_diffusers(tensors: dict[str, Any], meta: dict[str, dict]) -> dict[str, np.ndarray]:
    """The same LoRA in diffusers' pre-PEFT layouts: attention processors for the U-Net's attention
    (`attn1.processor.to_q_lora.down.weight`, `to_out_lora`), `lora.down` / `lora.up` for its other
    layers, `lora_linear_layer` for the text encoder, each with a `<module>.alpha`."""
    out = {}
    for key, value in tensors.items():
        comp, _, rest = key.partition(".")
        module, _, role = rest.rpartition(".lora_")
        updown = "down" if role == "A.weight" else "up"
        m = re.fullmatch(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out\.0)", module)
        if comp == "unet" and m:
            name = f"unet.{m[1]}.processor.{m[2].replace('.0', '')}_lora.{updown}.weight"
        elif comp == "unet":
            name = f"unet.{module}.lora.{updown}.weight"
        else:
            name = f"text_encoder.{module}.lora_linear_layer.{updown}.weight"
        out[name] = np.asarray(value)
        if updown == "down":
            out[f"{comp}.{module}.alpha"] = np.asarray(peft_alpha(module, meta[comp]), np.float32)
    return out
