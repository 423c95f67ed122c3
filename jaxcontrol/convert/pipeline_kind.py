"""Which diffusers pipeline class a converted Stable Diffusion checkpoint is, from its U-Net's input width.

    width_kind(9)                                    # "inpaint" (over 4-channel latents; None for no known width)
    pipeline_class_for("depth", controlnet=False)    # "StableDiffusionDepth2ImgPipeline"
    resolve_kind(ckpt, "auto")                       # checks a requested kind, sets ckpt.pipeline_class
    peek_unet_kind("sd15-inpainting/")               # "inpaint", from configs or a header alone (no weights)

The original single files of the concatenation-conditioned families (sd-v1-5-inpainting, SD-2's
512-depth-ema, instruct-pix2pix-00-22000) have the text-to-image layout and differ only in the
width of the U-Net's first convolution (`models.kinds`): 9, 5 and 8 input channels. So the kind
is read from that width, a requested kind (`--kind`) that contradicts it is refused, and the
pipeline class written (diffusers' `model_index.json` `_class_name`, the jaxcontrol manifest's
`pipeline_class`) names the kind, which is what `jaxcontrol.pipeline.Pipeline` and diffusers'
`from_pretrained` load it by.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from ..models.kinds import EXTRA_CHANNELS, KINDS, unet_kind
from .components import Checkpoint
from .formats import SDXL_FORMATS, STABLE_DIFFUSION_FORMATS, UNET_PREFIX

KIND_CHOICES = ("auto",) + KINDS

# (kind, has a ControlNet) -> the diffusers pipeline class a converted pipeline gets
_PIPELINES = {
    ("text2image", False): "StableDiffusionPipeline",
    ("text2image", True): "StableDiffusionControlNetPipeline",
    ("inpaint", False): "StableDiffusionInpaintPipeline",
    ("inpaint", True): "StableDiffusionControlNetInpaintPipeline",
    ("depth", False): "StableDiffusionDepth2ImgPipeline",
    ("instruct_pix2pix", False): "StableDiffusionInstructPix2PixPipeline",
}
# the text-to-image classes a folder may carry for a U-Net of another kind (older conversions wrote
# StableDiffusionPipeline for every LDM file): relabelled from the U-Net's width, with a note
_GENERIC = ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline")


def width_kind(in_channels: int, latent_channels: int = 4) -> str | None:
    """The kind (`models.kinds.KINDS`) of a U-Net with `in_channels` inputs, or None when no kind has that width."""
    extra = int(in_channels) - int(latent_channels)
    return next((k for k, v in EXTRA_CHANNELS.items() if v == extra), None)


def pipeline_class_for(kind: str, *, controlnet: bool = False) -> str | None:
    """diffusers' pipeline class for a U-Net of `kind` (with a ControlNet beside it), or None when there is none."""
    return _PIPELINES.get((kind, controlnet))


def check_kind_name(kind: str | None) -> str | None:
    """`kind` as given ("auto" and None: detect), or `ConfigError` for a name that is no kind."""
    if kind in (None, "auto"):
        return None
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {list(KIND_CHOICES)}, got {kind!r}")
    return kind


def _latent_channels(ckpt: Checkpoint) -> int:
    vae = ckpt.components.get("vae")
    if vae is not None and "latent_channels" in vae.config:
        return int(vae.config["latent_channels"])
    return int(ckpt.components["unet"].config.get("out_channels", 4))


def conv_in_key(ckpt: Checkpoint) -> str:
    """The name of the U-Net's first convolution weight as the checkpoint itself spells it."""
    if ckpt.format in STABLE_DIFFUSION_FORMATS + SDXL_FORMATS:
        return UNET_PREFIX + "input_blocks.0.0.weight"
    if ckpt.format == "ldm-unet":
        return "input_blocks.0.0.weight"
    return "unet conv_in.weight"


def conv_in_shape(config: dict, in_channels: int | None = None) -> tuple[int, int, int, int]:
    """The PyTorch shape (out, in, k, k) of the first convolution of a U-Net `config` (with `in_channels` if given)."""
    k = int(config.get("conv_in_kernel", 3))
    width = config["in_channels"] if in_channels is None else in_channels
    return (int(config["block_out_channels"][0]), int(width), k, k)


def _known_shapes(config: dict, latent: int) -> str:
    return ", ".join(f"{conv_in_shape(config, latent + n)} {k}" for k, n in EXTRA_CHANNELS.items())


def resolve_kind(ckpt: Checkpoint, kind: str | None = None) -> str | None:
    """Check the U-Net's kind against a requested `kind` and name the pipeline class by it; returns the kind.

    - `kind` (not None / "auto") must be what the width says, else `ConfigError` naming the file,
      the first convolution's key and the expected and actual shapes (also for a lone U-Net);
    - a pipeline (`ckpt.pipeline_class` set) whose U-Net has a width of no known kind is refused
      the same way: `--component unet` converts that network alone, with no pipeline class;
    - a single file's pipeline, and a folder's generic text-to-image class, get the kind's class
      (`pipeline_class_for`); a folder class that names a kind must agree with the width.

    Returns None when there is no U-Net, or a lone U-Net of no known width.
    """
    kind = check_kind_name(kind)
    unet = ckpt.components.get("unet")
    if unet is None:
        if kind is not None:
            raise ConfigError(f"{ckpt.path}: kind {kind!r} (--kind) describes a U-Net, and the components converted "
                              f"({sorted(ckpt.components)}) have none")
        return None
    config = unet.config
    latent = _latent_channels(ckpt)
    found = width_kind(config["in_channels"], latent)
    key, shape = conv_in_key(ckpt), conv_in_shape(config)
    if kind is not None and found != kind:
        what = f"kind {found!r}" if found else "a width of no known kind"
        raise ConfigError(
            f"{ckpt.path}: kind {kind!r} (--kind) expects {key} of shape "
            f"{conv_in_shape(config, latent + EXTRA_CHANNELS[kind])} ({latent} latent + {EXTRA_CHANNELS[kind]} "
            f"condition channels), found {shape} ({what}); the kind cannot be changed by relabelling")
    if ckpt.pipeline_class is None:  # a lone network: there is no pipeline class to name
        return found
    if found is None:
        raise ConfigError(
            f"{ckpt.path}: {key} has shape {shape}: {config['in_channels']} input channels over {latent}-channel "
            f"latents match no model kind jaxcontrol samples (expected one of {_known_shapes(config, latent)}); "
            f"convert the U-Net alone with --component unet (no pipeline class is then written)")
    cls = ckpt.pipeline_class
    if ckpt.format in SDXL_FORMATS:  # SDXL files: text-to-image (base), img2img (refiner) or inpainting
        if found == "inpaint":
            ckpt.pipeline_class = "StableDiffusionXLInpaintPipeline"
        elif found != "text2image":
            raise ConfigError(f"{ckpt.path}: {key} of shape {shape} makes the SDXL U-Net a {found!r} model, which "
                              f"jaxcontrol has no SDXL pipeline for (text-to-image and inpainting)")
    elif ckpt.format in STABLE_DIFFUSION_FORMATS or cls in _GENERIC:
        controlnet = "controlnet" in ckpt.components
        new = pipeline_class_for(found, controlnet=controlnet)
        if new is None:
            raise ConfigError(
                f"{ckpt.path}: {key} of shape {shape} makes the U-Net a {found!r} model, and diffusers has no "
                f"{found} pipeline with a ControlNet; convert the networks one at a time (--component)")
        if new != cls:
            if ckpt.format not in STABLE_DIFFUSION_FORMATS:
                ckpt.notes.append(f"pipeline class {cls} -> {new}: the U-Net's {config['in_channels']} input channels "
                                  f"make it a {found!r} model")
            ckpt.pipeline_class = new
    else:  # a folder's own class: it must not name another kind (diffusers' inpainting class also runs 4 channels)
        unet_kind(config["in_channels"], latent, cls, where=f"{ckpt.path}: {key} of shape {shape}")
    if found != "text2image":
        ckpt.notes.append(f"unet: {config['in_channels']} input channels ({key} {shape}): kind {found!r}, "
                          f"pipeline class {ckpt.pipeline_class}")
    return found


# an LDM single file's U-Net input convolution and VAE decoder input (their shapes give the widths)
LDM_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
LDM_VAE_DECODER_IN = "first_stage_model.decoder.conv_in.weight"


def peek_unet_kind(path: str | os.PathLike) -> str | None:
    """The kind of the U-Net of the model at `path`, read from small files only (no weights).

    A diffusers pipeline folder: `model_index.json`'s `_class_name`, `unet/config.json`'s
    `in_channels` and `vae/config.json`'s `latent_channels`; a diffusers U-Net folder: its
    `in_channels` over its `out_channels`. A jaxcontrol checkpoint: the same from
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
    from .paths import read_json, safe_join

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
    elif (p / "config.json").is_file():  # a diffusers model folder: a U-Net alone predicts its own latents
        unet = read_json(p / "config.json", "config.json")
        if unet.get("_class_name") != "UNet2DConditionModel":
            return None
        return unet.get("in_channels", 4), unet.get("out_channels", 4), "", f"{p}"
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
    from .safetensors_file import SafetensorsFile

    header = SafetensorsFile(path)
    if LDM_CONV_IN not in header:
        return None  # a diffusers-layout or non-U-Net file: the loader tells
    conv_in = header.shape(LDM_CONV_IN)
    latent = header.shape(LDM_VAE_DECODER_IN)[1] if LDM_VAE_DECODER_IN in header else 4
    if len(conv_in) != 4:
        return None
    return conv_in[1], latent, "", f"{path}: {LDM_CONV_IN}"


__all__ = ["KIND_CHOICES", "check_kind_name", "conv_in_key", "conv_in_shape",
           "pipeline_class_for", "resolve_kind", "width_kind", "peek_unet_kind"]
