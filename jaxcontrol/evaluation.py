"""Control-fidelity metrics for generated images (numpy; edges from `jaxcontrol.preprocess.canny`).

    edges = edge_maps(images)                              # (B, H, W) bool, Canny of the samples
    iou = edge_iou(edges, outline_mask(conditions))        # (B,) per image
    dist = chamfer_distance(edges, outline_mask(conditions))
    ok = color_accuracy(images, circle_names, background_names, palette)

Edge fidelity compares the edges of a generated image with the condition outline it was given:

- `edge_iou`: intersection over union of the two edge sets after dilating each by `tolerance`
  pixels (a 3x3 square per pixel of tolerance), so a one-pixel offset between an anti-aliased
  outline and a Canny edge still half-overlaps (IoU 0.5 for two shifted lines; 0 at tolerance 0).
  An image without edges scores 0.
- `chamfer_distance`: the symmetric Chamfer distance in pixels, the mean over both sets of each
  edge pixel's distance to the nearest pixel of the other set, averaged over the two directions.
  An image without edges gets the image diagonal (the largest possible distance).

Colour accuracy reads the two colours of a fill50k-style image without knowing where the circle is:
the background is the median colour of the one-pixel frame around the image; the circle is the
median of the pixels at least `min_distance` (sRGB) away from that background. Each is then
named by the nearest colour of the palette; an image is correct when both names match its prompt.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def outline_mask(conditions: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(B, H, W) bool: where a condition image (uint8 or [0, 1] floats, white on black) is lit."""
    c = np.asarray(conditions)
    c = c.astype(np.float32) / 255.0 if c.dtype == np.uint8 else c.astype(np.float32)
    if c.ndim == 4:
        c = c.max(axis=-1)
    return c >= threshold


def edge_maps(images: np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """(B, H, W) bool Canny edges of uint8 (B, H, W, 3) RGB images (OpenCV's conventions, L1 gradient,
    no blur; thresholds in 0..255 gradient units). Raises `ValueError` for other dtypes or ranks."""
    from .preprocess import canny

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"edge_maps wants uint8 (B, H, W, 3) images, got {images.dtype} {images.shape}")
    edges = np.asarray(canny(images, low, high))
    return (edges[..., 0] if edges.ndim == 4 else edges) > 0


def _dilate(mask: np.ndarray, tolerance: int) -> np.ndarray:
    if tolerance <= 0:
        return mask
    structure = np.ones((1, 3, 3), bool)
    return ndimage.binary_dilation(mask, structure=structure, iterations=int(tolerance))


def edge_iou(edges: np.ndarray, outline: np.ndarray, tolerance: int = 1) -> np.ndarray:
    """(B,) IoU of the two (B, H, W) edge sets, each dilated by `tolerance` pixels."""
    a, b = _dilate(np.asarray(edges, bool), tolerance), _dilate(np.asarray(outline, bool), tolerance)
    inter = np.logical_and(a, b).sum(axis=(1, 2))
    union = np.logical_or(a, b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def chamfer_distance(edges: np.ndarray, outline: np.ndarray) -> np.ndarray:
    """(B,) symmetric Chamfer distance in pixels between two (B, H, W) edge sets."""
    edges, outline = np.asarray(edges, bool), np.asarray(outline, bool)
    out = np.empty(edges.shape[0])
    for i, (e, o) in enumerate(zip(edges, outline)):
        if not e.any() or not o.any():
            out[i] = float(np.hypot(*e.shape))
            continue
        to_o = ndimage.distance_transform_edt(~o)  # distance of every pixel to the nearest outline pixel
        to_e = ndimage.distance_transform_edt(~e)
        out[i] = 0.5 * (to_o[e].mean() + to_e[o].mean())
    return out


def nearest_color(rgb: np.ndarray, palette: Sequence[tuple[str, Sequence[int]]]) -> list[str]:
    """The palette name nearest (sRGB Euclidean) to each colour of `rgb` (..., 3)."""
    names = [n for n, _ in palette]
    ref = np.asarray([c for _, c in palette], np.float64)
    rgb = np.asarray(rgb, np.float64).reshape(-1, 3)
    d = np.linalg.norm(rgb[:, None, :] - ref[None, :, :], axis=-1)
    return [names[i] for i in d.argmin(axis=1)]


def image_colors(images: np.ndarray, min_distance: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """((B, 3) background, (B, 3) circle) float64 median sRGB colours of (B, H, W, 3) images (0..255);
    the circle is NaN where no pixel is `min_distance` away from the background."""
    images = np.asarray(images, np.float64)
    b = images.shape[0]
    frame = np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1)
    background = np.median(frame, axis=1)
    circle = np.full((b, 3), np.nan)
    for i in range(b):
        far = np.linalg.norm(images[i] - background[i], axis=-1) >= min_distance
        if far.any():
            circle[i] = np.median(images[i][far], axis=0)
    return background, circle


def color_accuracy(images: np.ndarray, circle_names: Sequence[str], background_names: Sequence[str],
                   palette: Sequence[tuple[str, Sequence[int]]], min_distance: float = 60.0) -> dict[str, np.ndarray]:
    """Per-image (B,) bool arrays {"background", "circle", "both"}: do the colours read from
    (B, H, W, 3) `images` in 0..255 (see `image_colors`), named by the nearest `palette` entry, match the
    prompt's `circle_names` / `background_names`?"""
    background, circle = image_colors(images, min_distance)
    bg = np.asarray(nearest_color(background, palette)) == np.asarray(background_names)
    has = ~np.isnan(circle).any(axis=1)
    names = nearest_color(np.where(has[:, None], circle, 0.0), palette)
    ci = (np.asarray(names) == np.asarray(circle_names)) & has
    return {"background": bg, "circle": ci, "both": bg & ci}


def region_colors(images: np.ndarray, centers: np.ndarray, radii: np.ndarray,
                  margin: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """((B, 3) circle, (B, 3) background) float64 median sRGB colours of (B, H, W, 3) images where the
    circle is known: pixels whose centre is at most radius - `margin` from `centers` (B, 2) (x, y),
    and at least radius + `margin` from it. A region with no pixel is NaN."""
    images = np.asarray(images, np.float64)
    b, h, w = images.shape[:3]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    circle, background = np.full((b, 3), np.nan), np.full((b, 3), np.nan)
    for i in range(b):
        d = np.hypot(xs - centers[i][0], ys - centers[i][1])
        inside, outside = d <= radii[i] - margin, d >= radii[i] + margin
        if inside.any():
            circle[i] = np.median(images[i][inside], axis=0)
        if outside.any():
            background[i] = np.median(images[i][outside], axis=0)
    return circle, background


def edit_scores(images: np.ndarray, parts: Sequence[str], circle_names: Sequence[str],
                background_names: Sequence[str], centers: np.ndarray, radii: np.ndarray,
                palette: Sequence[tuple[str, Sequence[int]]]) -> dict[str, np.ndarray]:
    """Per-image (B,) bool arrays for instruction edits of fill50k-style images whose circle is at
    `centers` / `radii`: "edited" (the part the instruction named, `parts[i]` "circle" or
    "background", has the wanted colour), "kept" (the other part still has its colour) and "success"
    (both). `circle_names` / `background_names` are the colours the edited image should have; each
    region's median colour (`region_colors`) is named by the nearest `palette` entry."""
    circle, background = region_colors(images, np.asarray(centers), np.asarray(radii))
    ok = {}
    for name, rgb, want in (("circle", circle, circle_names), ("background", background, background_names)):
        has = ~np.isnan(rgb).any(axis=1)
        got = np.asarray(nearest_color(np.where(has[:, None], rgb, 0.0), palette))
        ok[name] = (got == np.asarray(want)) & has
    named = np.asarray(parts) == "circle"
    edited = np.where(named, ok["circle"], ok["background"])
    kept = np.where(named, ok["background"], ok["circle"])
    return {"edited": edited, "kept": kept, "success": edited & kept}
