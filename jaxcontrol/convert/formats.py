"""Which layout a checkpoint is, from its key names alone.

    detect_format(source.keys(), "model.ckpt")      # "ldm-sd1", "controlnet-v1.1", "t2i-adapter-full", ...

`FORMATS` names every format a `Checkpoint` can have (single files, folders, our own format).
Nothing here reads a tensor or a file: `detect_format` looks at key prefixes and a few marker
keys, as diffusers' `single_file_utils.infer_diffusers_model_type` does.
"""

from __future__ import annotations

from typing import Iterable

from ..errors import CheckpointError, ConfigError

FORMATS = {
    "ldm-sd1": "LDM single file, Stable Diffusion 1.x",
    "ldm-sd2": "LDM single file, Stable Diffusion 2.x",
    "ldm-sdxl": "LDM single file, Stable Diffusion XL base",
    "ldm-sdxl-refiner": "LDM single file, Stable Diffusion XL refiner",
    "ldm-unet": "LDM U-Net state dict",
    "ldm-vae": "LDM VAE state dict",
    "controlnet-v1.0": "ControlNet v1.0 (whole ControlLDM)",
    "controlnet-v1.1": "ControlNet v1.1 (control_model.* only)",
    "controlnet-bare": "ControlNet, original names without prefix",
    "t2i-adapter-full": "T2I-Adapter original (full)",
    "t2i-adapter-light": "T2I-Adapter original (light)",
    "diffusers-state-dict": "diffusers state dict without config",
    "diffusers-model": "diffusers model folder",
    "diffusers-pipeline": "diffusers pipeline folder",
    "jaxcontrol": "jaxcontrol checkpoint (Orbax)",
}

# the single-file formats that hold a Stable Diffusion U-Net (and possibly its VAE and text encoder)
STABLE_DIFFUSION_FORMATS = ("ldm-sd1", "ldm-sd2", "controlnet-v1.0")

# the single-file formats of SDXL (generative-models' `DiffusionEngine`: `conditioner.embedders.*`)
SDXL_FORMATS = ("ldm-sdxl", "ldm-sdxl-refiner")
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."  # the base's CLIP ViT-L (transformers names)
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."  # the base's OpenCLIP ViT-bigG
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."  # the refiner's OpenCLIP ViT-bigG

# key prefixes of an LDM `LatentDiffusion` / ControlNet `ControlLDM` file
SD_TEXT_PREFIX = "cond_stage_model.transformer."  # CLIP ViT-L (transformers names)
SD2_TEXT_PREFIX = "cond_stage_model.model."  # OpenCLIP ViT-H
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROL_PREFIX = "control_model."
ADAPTER_PREFIX = "adapter."
EMA_PREFIX = "model_ema."
DEPTH_PREFIX = "depth_model."  # the MiDaS estimator inside an LDM depth model (not converted)


def has_prefix(keys: Iterable[str], prefix: str) -> bool:
    """Whether any key starts with `prefix`."""
    return any(k.startswith(prefix) for k in keys)


def adapter_prefix(keys: Iterable[str]) -> str:
    """`"adapter."` when every key of an original T2I-Adapter file carries it, else `""`."""
    return ADAPTER_PREFIX if all(k.startswith(ADAPTER_PREFIX) for k in keys) else ""


def detect_format(keys: Iterable[str], origin: str = "checkpoint") -> str:
    """The format of a single-file checkpoint, from its key names alone (a key of `FORMATS`).

    An SD-1 file whose U-Net turns out to cross-attend at width 1024 is SD-2 (`read_single_file`
    refines `ldm-sd1` once shapes are read). Raises `ConfigError` for class-conditioned files
    other than SDXL base and refiner, and `CheckpointError` (listing some keys) for a layout none of the formats explains.
    """
    keys = list(keys)
    ks = set(keys)
    if has_prefix(keys, "conditioner.embedders."):
        if has_prefix(keys, SDXL_TEXT_PREFIX) and has_prefix(keys, SDXL_TEXT2_PREFIX):
            return "ldm-sdxl"
        if has_prefix(keys, SDXL_REFINER_TEXT_PREFIX) and not has_prefix(keys, "conditioner.embedders.1."):
            return "ldm-sdxl-refiner"
        embedders = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.embedders.")})
        raise ConfigError(
            f"{origin}: a generative-models checkpoint with text encoders {embedders}: jaxcontrol reads SDXL base "
            f"(CLIP ViT-L at {SDXL_TEXT_PREFIX}*, OpenCLIP bigG at {SDXL_TEXT2_PREFIX}*) and the SDXL refiner "
            f"(OpenCLIP bigG at {SDXL_REFINER_TEXT_PREFIX}*)")
    if has_prefix(keys, UNET_PREFIX + "label_emb."):
        raise ConfigError(
            f"{origin}: a class-conditioned U-Net (label_emb.*) without SDXL's text encoders "
            f"(conditioner.embedders.*): SD-2 unCLIP and the x4 upscaler are not supported; an SDXL U-Net alone "
            f"converts from its diffusers folder, or from the whole SDXL file"
        )
    if has_prefix(keys, UNET_PREFIX):
        if has_prefix(keys, CONTROL_PREFIX):
            return "controlnet-v1.0"
        return "ldm-sd2" if has_prefix(keys, SD2_TEXT_PREFIX + "transformer.") else "ldm-sd1"
    if has_prefix(keys, CONTROL_PREFIX):
        return "controlnet-v1.1"
    if "time_embed.0.weight" in ks and "input_hint_block.0.weight" in ks:
        return "controlnet-bare"
    if "time_embed.0.weight" in ks and "out.2.weight" in ks:
        return "ldm-unet"
    bare = [k.removeprefix(ADAPTER_PREFIX) for k in keys] if adapter_prefix(keys) else keys
    if "conv_in.weight" in bare and "body.0.block1.weight" in bare:
        return "t2i-adapter-full"
    if "body.0.in_conv.weight" in bare and "body.0.body.0.block1.weight" in bare:
        return "t2i-adapter-light"
    if "encoder.down.0.block.0.conv1.weight" in ks or "first_stage_model.encoder.conv_in.weight" in ks:
        return "ldm-vae"
    if diffusers_class_of(ks) is not None:
        return "diffusers-state-dict"
    shown = ", ".join(sorted(keys)[:12])
    raise CheckpointError(
        f"{origin}: unknown checkpoint format: its keys match no supported layout (LDM Stable Diffusion 1.x/2.x, "
        f"ControlNet v1.0/v1.1, T2I-Adapter full/light, diffusers). {len(keys)} keys, e.g. {shown}"
    )


def diffusers_class_of(keys: set[str]) -> str | None:
    """The diffusers class of a state dict already in diffusers naming, or None."""
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "ControlNetModel"
    if "time_embedding.linear_1.weight" in keys and "conv_out.weight" in keys:
        return "UNet2DConditionModel"
    if "encoder.conv_in.weight" in keys and "decoder.conv_out.weight" in keys:
        return "AutoencoderKL"
    if any(k.startswith("adapter.body.0.") for k in keys):
        return "T2IAdapter"
    if "text_model.embeddings.token_embedding.weight" in keys or "embeddings.token_embedding.weight" in keys:
        return "CLIPTextModel"
    return None
