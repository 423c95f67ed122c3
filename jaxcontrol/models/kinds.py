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


def widen_unet_input(unet, params: dict, kind: str, latent_channels: int = 4):
    """(module, params) of `unet` with the input width of `kind`, as InstructPix2Pix and the
    inpainting models were made from a text-to-image U-Net: `conv_in`'s kernel gains zero input
    channels, so the widened model starts out computing exactly what the base model did. A U-Net
    that already has the width comes back unchanged (continuing a run). Raises `ConfigError` for an
    unknown kind or a U-Net that is neither the base nor the target width."""
    import dataclasses

    import numpy as np

    if kind not in EXTRA_CHANNELS:
        raise ConfigError(f"model kind {kind!r} is not one of {list(KINDS)}")
    want, have = int(latent_channels) + EXTRA_CHANNELS[kind], int(unet.config.in_channels)
    if have == want:
        return unet, params
    if have != int(latent_channels):
        raise ConfigError(f"cannot widen a U-Net with in_channels={have} to {want} ({kind!r}): only a "
                          f"{latent_channels}-channel text-to-image U-Net is widened")
    kernel = np.asarray(params["conv_in"]["kernel"])  # (kh, kw, in, out)
    pad = np.zeros(kernel.shape[:2] + (want - have,) + kernel.shape[3:], kernel.dtype)
    conv_in = {**params["conv_in"], "kernel": np.concatenate([kernel, pad], axis=2)}
    module = unet.clone(config=dataclasses.replace(unet.config, in_channels=want))
    return module, {**params, "conv_in": conv_in}


__all__ = ["EXTRA_CHANNELS", "KINDS", "PIPELINE_CLASSES", "unet_kind", "widen_unet_input"]
