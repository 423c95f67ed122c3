"""Depth maps for Depth2Image models (5-channel U-Nets): read from a file, or estimated by DPT.

    depth = load_depth_map("d.png")                       # float64 (H, W): 8/16-bit PNG, "F" TIFF, .npy
    depth = estimate_depth(image, "./dpt-hybrid-midas")   # float32 (h, w): DPT's predicted_depth
    pipe(prompt, init_image=image, depth_map=depth)       # resized and scaled to [-1, 1] by the pipeline

`estimate_depth` runs what diffusers' `StableDiffusionDepth2ImgPipeline.prepare_depth_map` runs
when it is given no `depth_map`: the folder's `DPTImageProcessor`, then `DPTForDepthEstimation`'s
`predicted_depth`. The bicubic resize to latent size and the per-map normalisation are the
pipeline's own (`preprocess.prepare_depth_map`). It needs torch and transformers (optional
dependencies) and reads a local folder only: nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, ConfigError, JaxControlError

NPY_SUFFIX = ".npy"


class DepthMapError(JaxControlError, ValueError):
    """A depth-map file is missing, unreadable, not a 2-D map, non-finite or constant."""


def load_depth_map(path: str | os.PathLike) -> np.ndarray:
    """A depth map file as float64 (H, W), at full precision.

    `.npy`: a numeric array (H, W) or (H, W, 1), read without pickles. Images: 8-bit ("L"), 16-bit
    ("I;16", as 16-bit PNGs load), 32-bit integer ("I") and float ("F") grey values as they are
    (no scaling to 8 bits); RGB and palette images as their luma (`preprocess.prepare_depth_map`'s
    rule). Only the range matters to the model: the pipeline scales each map to [-1, 1].

    Raises `DepthMapError` naming the file for a missing or unreadable file, another shape, a
    non-numeric array, NaN or infinite values, or a constant map (nothing to normalise)."""
    from .preprocess import ImageLoadError, _depth_array, load_image

    p = Path(path)
    if p.suffix.lower() == NPY_SUFFIX:
        if not p.is_file():
            raise DepthMapError(f"{p}: no such file" if not p.exists() else f"{p}: not a regular file")
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DepthMapError(f"{p}: cannot read as a .npy array: {e}") from None
        if not isinstance(a, np.ndarray) or a.dtype == np.bool_ or not (
                np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise DepthMapError(f"{p}: expected a numeric depth map, got dtype {getattr(a, 'dtype', type(a))}")
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim != 2:
            raise DepthMapError(f"{p}: expected a 2-D depth map (H, W) or (H, W, 1), got shape {a.shape}")
        depth = a.astype(np.float64)
    else:
        try:
            image = load_image(p, mode=None)
        except ImageLoadError as e:
            raise DepthMapError(str(e)) from None
        try:
            depth = _depth_array(image, str(p))[0]
        except ValueError as e:
            raise DepthMapError(f"{p} (mode {image.mode}): {e}") from None
        if depth.ndim != 2:  # e.g. a multi-band mode PIL has no luma rule for
            raise DepthMapError(f"{p}: an image of mode {image.mode} is not a single-channel depth map "
                                f"(array shape {depth.shape})")
    if depth.size == 0:
        raise DepthMapError(f"{p}: an empty depth map (shape {depth.shape})")
    if not np.all(np.isfinite(depth)):
        raise DepthMapError(f"{p}: the depth map holds NaN or infinite values")
    if depth.max() == depth.min():
        raise DepthMapError(f"{p}: the depth map is constant ({depth.min():g} everywhere); it has no range to "
                            "normalise to [-1, 1]")
    return depth


def _optional_torch():
    try:
        import torch
        from transformers import DPTForDepthEstimation, DPTImageProcessor
    except ImportError as e:
        raise ConfigError(f"depth estimation runs a transformers DPT model and needs torch and transformers "
                          f"(pip install torch transformers): {e}") from None
    return torch, DPTForDepthEstimation, DPTImageProcessor


def _as_pil(image: Any):
    """A PIL RGB image of `image`: PIL, uint8 (H, W, 3) or float (H, W, 3) in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ConfigError(f"the image to estimate depth from must be (H, W, 3), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.asarray(a, np.float64)
        if not np.all(np.isfinite(a)) or a.min() < 0.0 or a.max() > 1.0:
            raise ConfigError("the image to estimate depth from must be uint8 or floats in [0, 1]")
        a = np.round(a * 255.0).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def load_depth_estimator(path: str | os.PathLike):
    """`(image processor, model)` of a local transformers DPT folder (`save_pretrained` of a
    `DPTImageProcessor` and a `DPTForDepthEstimation`), on the CPU in float32, eval mode. Nothing
    is downloaded. Raises `CheckpointError` naming the folder when it cannot be loaded."""
    torch, DPTForDepthEstimation, DPTImageProcessor = _optional_torch()
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a folder; a depth estimator is a transformers DPT folder "
                              "(DPTForDepthEstimation and DPTImageProcessor saved with save_pretrained)")
    try:
        processor = DPTImageProcessor.from_pretrained(p, local_files_only=True)
        model = DPTForDepthEstimation.from_pretrained(p, local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: cannot load as a DPT depth estimator (DPTImageProcessor + "
                              f"DPTForDepthEstimation): {e}") from None
    return processor, model.eval()


def estimate_depth(image: Any, estimator: str | os.PathLike | tuple) -> np.ndarray:
    """DPT's `predicted_depth` of `image` (PIL, uint8 (H, W, 3) or floats in [0, 1]) as float32
    (h, w) at the processor's output size: what diffusers' Depth2Img pipeline computes before its
    resize and normalisation. `estimator` is a DPT folder or `load_depth_estimator`'s pair.

    Raises `ConfigError` without torch / transformers or for a malformed image, `CheckpointError`
    for a folder that is not a DPT model, `DepthMapError` when the estimate is not finite."""
    torch, _, _ = _optional_torch()
    processor, model = load_depth_estimator(estimator) if not isinstance(estimator, tuple) else estimator
    pixel_values = processor(images=_as_pil(image), return_tensors="pt").pixel_values
    with torch.no_grad():
        depth = model(pixel_values.to(torch.float32)).predicted_depth
    depth = depth.detach().cpu().numpy().astype(np.float32)[0]
    if not np.all(np.isfinite(depth)):
        raise DepthMapError(f"the depth estimator {estimator if not isinstance(estimator, tuple) else ''} "
                            "predicted NaN or infinite depth")
    return depth


__all__ = ["DepthMapError", "estimate_depth", "load_depth_estimator", "load_depth_map"]
