"""What a U-Net takes besides its latents: the concatenation-conditioned model families.

A concatenation-conditioned U-Net has a wider first convolution; the condition, encoded at latent
size, is stacked on the noisy latents along channels (`models.forward.concat_channels`):

| kind               | in_channels | extra channels, in order                                     |
|--------------------|-------------|--------------------------------------------------------------|
| "text2image"       | 4           | none                                                         |
| "depth"            | 5           | a depth map at latent size, normalised to [-1, 1] per image  |
| "instruct_pix2pix" | 8           | the VAE mode of the input image (unscaled)                   |
| "inpaint"          | 9           | the mask (1 = regenerate), the masked image's scaled latents |

The kind follows from `in_channels` minus the latent channels; a diffusers pipeline folder's
class name (`model_index.json`'s `_class_name`) confirms it, and a contradiction is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

KINDS = ("text2image", "depth", "instruct_pix2pix", "inpaint")
EXTRA_CHANNELS = {"text2image": 0, "depth": 1, "instruct_pix2pix": 4, "inpaint": 5}
# diffusers' pipeline classes that name a kind; other classes (ControlNet, adapter, img2img...) say nothing
PIPELINE_CLASSES = {
    "StableDiffusionInpaintPipeline": "inpaint",
    "StableDiffusionControlNetInpaintPipeline": None,  # runs 4- and 9-channel U-Nets alike
    "StableDiffusionDepth2ImgPipeline": "depth",
    "StableDiffusionInstructPix2PixPipeline": "instruct_pix2pix",
}


def unet_kind(in_channels: int, latent_channels: int = 4, pipeline_class: str = "", where: str = "the U-Net") -> str:
    """The kind of a U-Net with `in_channels` inputs over `latent_channels`-channel latents.

    Raises `ConfigError` naming `where` when the width matches no kind, or when `pipeline_class`
    names a kind whose width differs. A diffusers inpainting pipeline may hold a 4-channel U-Net
    (it then inpaints by blending, as diffusers does), so that class accepts "text2image" too."""
    extra = int(in_channels) - int(latent_channels)
    by_width = {v: k for k, v in EXTRA_CHANNELS.items()}
    if extra not in by_width:
        known = ", ".join(f"{latent_channels + v} ({k})" for k, v in EXTRA_CHANNELS.items())
        raise ConfigError(f"{where}: in_channels={in_channels} over {latent_channels}-channel latents matches no "
                          f"known model kind; known widths: {known}")
    kind = by_width[extra]
    named = PIPELINE_CLASSES.get(pipeline_class)
    if named is not None and named != kind and not (named == "inpaint" and kind == "text2image"):
        raise ConfigError(f"{where}: the pipeline class {pipeline_class} is a {named!r} model with "
                          f"{latent_channels + EXTRA_CHANNELS[named]} U-Net input channels, but the U-Net has "
                          f"in_channels={in_channels} ({kind!r})")
    return kind


# an LDM single file's U-Net input convolution and VAE decoder input (their shapes give the widths)
LDM_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
LDM_VAE_DECODER_IN = "first_stage_model.decoder.conv_in.weight"


def peek_unet_kind(path: str | os.PathLike) -> str | None:
    """The kind of the U-Net of the model at `path`, read from small files only (no weights).

    A diffusers pipeline folder: `model_index.json`'s `_class_name`, `unet/config.json`'s
    `in_channels` and `vae/config.json`'s `latent_channels`. A jaxcontrol checkpoint: the same from
    `jaxcontrol.json`'s `pipeline_class` and its components' `config.json`. An LDM `.safetensors`
    single file: the shapes of its first U-Net convolution and VAE decoder input, from the header.

    Returns None where that cannot be told cheaply (a `.ckpt` pickle, a folder or file of another
    layout, an unreadable or malformed config): the kind is then known once the model is loaded,
    which reports those problems itself. Raises `ConfigError` (from `unet_kind`) for a width that
    matches no kind or contradicts the pipeline class, as loading the model would."""
    p = Path(path)
    try:
        widths = _peek_widths(p)
    except (OSError, ValueError, AttributeError, TypeError):  # CheckpointError / ConfigError are ValueErrors
        return None
    if widths is None:
        return None
    in_channels, latent_channels, pipeline_class, where = widths
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in (in_channels, latent_channels)):
        return None
    return unet_kind(in_channels, latent_channels, pipeline_class, where=where)


def _peek_widths(p: Path) -> tuple | None:
    """(U-Net in_channels, latent channels, pipeline class, where) of the model at `p`, or None."""
    from ..convert.paths import read_json, safe_join

    if p.is_file():
        return _peek_single_file(p)
    if (p / "jaxcontrol.json").is_file():
        manifest = read_json(p / "jaxcontrol.json", "jaxcontrol manifest")
        comps = manifest.get("components") or {}
        folders = {name: safe_join(p, comps[name].get("path", name), name) if isinstance(comps.get(name), dict)
                   else None for name in ("unet", "vae")}
        pipeline_class = manifest.get("pipeline_class") or ""
    elif (p / "model_index.json").is_file():
        index = read_json(p / "model_index.json", "model_index.json")
        folders = {name: safe_join(p, name, name) if isinstance(index.get(name), list) else None
                   for name in ("unet", "vae")}
        pipeline_class = index.get("_class_name") or ""
    else:
        return None
    if folders["unet"] is None or not (folders["unet"] / "config.json").is_file():
        return None
    unet = read_json(folders["unet"] / "config.json", "unet config")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        return None
    vae = {}
    if folders["vae"] is not None and (folders["vae"] / "config.json").is_file():
        vae = read_json(folders["vae"] / "config.json", "vae config")
    return unet.get("in_channels", 4), vae.get("latent_channels", 4), str(pipeline_class), f"{p}: unet"


def _peek_single_file(path: Path) -> tuple | None:
    if path.suffix.lower() != ".safetensors":
        return None  # a pickle (.ckpt / .pth / .bin) cannot be read without loading it
    from ..convert.safetensors_file import SafetensorsFile

    header = SafetensorsFile(path)
    if LDM_CONV_IN not in header:
        return None  # a diffusers-layout or non-U-Net file: the loader tells
    conv_in = header.shape(LDM_CONV_IN)
    latent = header.shape(LDM_VAE_DECODER_IN)[1] if LDM_VAE_DECODER_IN in header else 4
    if len(conv_in) != 4:
        return None
    return conv_in[1], latent, "", f"{path}: {LDM_CONV_IN}"


__all__ = ["EXTRA_CHANNELS", "KINDS", "PIPELINE_CLASSES", "peek_unet_kind", "unet_kind"]
