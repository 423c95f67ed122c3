"""Control-image preprocessing: Canny edges in JAX, and diffusers' control / adapter image preparation.

    edges = canny(images_nhwc_uint8, 100, 200)            # (B, H, W, 3) float32 in {0, 1}, on the device
    cond = prepare_control_image(pil_or_array, height=512, width=512, batch_size=2)   # (2, 512, 512, 3)
    sketch = prepare_adapter_image(pil_image, 512, 512, in_channels=1)                 # (1, 512, 512, 1)

`canny` follows OpenCV's `cv2.Canny(image, low, high)` (3x3 Sobel, L1 magnitude by default, OpenCV's
non-maximum suppression rule and 8-connected hysteresis), which is what diffusers' ControlNet
documentation feeds its Canny ControlNets. OpenCV applies no blur inside `Canny`; pass `sigma > 0`
for a Gaussian blur first (OpenCV's `GaussianBlur` kernel size rule and reflect-101 border).

`prepare_control_image` reproduces `VaeImageProcessor(do_convert_rgb=True, do_normalize=False)`
as `StableDiffusionControlNetPipeline.prepare_image` uses it, and `prepare_adapter_image` the T2I
adapter pipeline's `_preprocess_adapter_image`; both return NHWC float32 numpy arrays in [0, 1].
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from PIL import Image

from .errors import JaxControlError

__all__ = [
    "ImageLoadError",
    "load_image",
    "load_images",
    "canny",
    "canny_kernel_size",
    "edge_agreement",
    "default_height_width",
    "prepare_control_image",
    "prepare_depth_map",
    "prepare_adapter_image",
    "prepare_mask",
]


class ImageLoadError(JaxControlError, ValueError):
    """An image file is missing, unreadable, or not in a format PIL can decode."""


# --------------------------------------------------------------------------------------------- loading


def load_image(path: str | os.PathLike, mode: str | None = "RGB") -> Image.Image:
    """Open an image file fully (decoded now, file closed), converted to `mode` (None keeps the file's mode).

    Raises `ImageLoadError` naming the file when it does not exist, is a directory, cannot be read,
    or is not an image PIL can decode (including truncated files).
    """
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(f"{p}: image file not found")
    if p.is_dir():
        raise ImageLoadError(f"{p}: is a directory, not an image file")
    try:
        with Image.open(p) as im:
            im.load()  # decode now: truncated / corrupt data fails here, not later
            if mode is not None:
                im = _to_8bit(im)
            out = im if mode is None or im.mode == mode else im.convert(mode)
            if out is im:
                out = im.copy()
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError, as are permission errors
        raise ImageLoadError(f"{p}: cannot open as an image: {e}") from e
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{p}: cannot decode image: {e}") from e
    return out


def _to_8bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit integer images (16-bit PNGs load as "I;16" or "I") scaled to 8-bit "L".

    PIL's own `convert` clips such values at 255, which turns a 16-bit mask or depth map into an
    almost all-white image. A 16-bit image is scaled by 255/65535; an "I" image whose values all
    fit in 0..255 is taken as 8-bit data."""
    if im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
    elif im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"32-bit integer image with values in [{a.min():g}, {a.max():g}]; expected 0..65535")
        if a.size and a.max() > 255:
            a = a * (255.0 / 65535.0)
    else:
        return im
    return Image.fromarray(np.round(a).astype(np.uint8), mode="L")


def load_images(paths: Sequence[str | os.PathLike], mode: str | None = "RGB") -> list[Image.Image]:
    """`load_image` for each path, in order (raises `ImageLoadError` for the first bad one)."""
    return [load_image(p, mode) for p in paths]


# ----------------------------------------------------------------------------------------------- Canny

# OpenCV's fixed-point constants: tan(22.5 deg) in Q15 (Canny's direction test) and the 8-bit
# RGB->gray weights in Q15 (`cvtColor(COLOR_RGB2GRAY)`, measured bit-exact against OpenCV).
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)
_GRAY_R, _GRAY_G, _GRAY_B, _GRAY_SHIFT = 9798, 19235, 3735, 15


def canny_kernel_size(sigma: float, integer_input: bool = True) -> int:
    """OpenCV's `GaussianBlur(ksize=(0, 0))` kernel size: round(sigma * (3 for 8-bit, else 4) * 2 + 1) | 1."""
    return int(round(sigma * (3 if integer_input else 4) * 2 + 1)) | 1


def _gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    """Normalised 1-D Gaussian of `size` taps (float64), as OpenCV's `getGaussianKernel`."""
    half = (size - 1) // 2
    t = np.exp(-((np.arange(size, dtype=np.float64) - half) ** 2) / (2.0 * sigma * sigma))
    t[half] = 1.0
    return t / (2.0 * t[:half].sum() + 1.0)


def _gaussian_kernel_q8(sigma: float, size: int) -> np.ndarray:
    """OpenCV's 8-bit fixed-point kernel: Q8 taps by error diffusion from the outside in, summing to 256."""
    k = _gaussian_kernel(sigma, size)
    half = size // 2
    out = np.zeros(size, np.int64)
    err = 0.0
    for i in range(half):
        v = k[i] * 256.0 + err
        q = int(round(v))  # round half to even, as cvRound
        err = v - q
        out[i] = out[size - 1 - i] = q
    out[half] = 256 - 2 * int(out[:half].sum())
    return out


def _blur(x: jax.Array, sigma: float, size: int, integer: bool) -> jax.Array:
    """Separable Gaussian blur of (B, H, W, C) with a reflect-101 border (OpenCV's default).

    Integer (8-bit) input follows OpenCV's bit-exact path: Q8 taps, exact integer sums and one
    round-half-up at the end, so the result is again 0..255 integers. Float input uses float taps.
    """
    h, w = x.shape[1], x.shape[2]
    r = size // 2
    if r >= h or r >= w:
        raise ValueError(f"canny: blur kernel of size {size} (sigma={sigma}) is too large for a {h}x{w} image")
    k = _gaussian_kernel_q8(sigma, size) if integer else _gaussian_kernel(sigma, size).astype(np.float32)
    x = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)), mode="reflect")
    x = sum(int(k[i]) * x[:, i : i + h] if integer else float(k[i]) * x[:, i : i + h] for i in range(size))
    x = jnp.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="reflect")
    x = sum(int(k[i]) * x[:, :, i : i + w] if integer else float(k[i]) * x[:, :, i : i + w] for i in range(size))
    return (x + (1 << 15)) >> 16 if integer else x


def _sobel(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """3x3 Sobel dx, dy of (B, H, W, C) with a replicated border, as `cv2.Canny` computes them."""
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1], x.shape[2]

    def at(dy, dx):
        return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) - at(-1, -1)) + 2 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
    gy = (at(1, -1) - at(-1, -1)) + 2 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
    return gx, gy


def _shift(m: jax.Array, dy: int, dx: int) -> jax.Array:
    """out[y, x] = m[y + dy, x + dx], zero outside the image. m is (B, H, W)."""
    h, w = m.shape[1], m.shape[2]
    p = jnp.pad(m, ((0, 0), (1, 1), (1, 1)))
    return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _dilate8(m: jax.Array) -> jax.Array:
    """3x3 (8-connected) binary dilation of a (B, H, W) bool mask, as two separable 3-tap ORs
    (XLA fuses the slices into one pass; several times faster on CPU than `reduce_window`)."""
    p = jnp.pad(m, ((0, 0), (1, 1), (0, 0)))
    m = p[:, :-2] | p[:, 1:-1] | p[:, 2:]
    p = jnp.pad(m, ((0, 0), (0, 0), (1, 1)))
    return p[:, :, :-2] | p[:, :, 1:-1] | p[:, :, 2:]


@functools.partial(
    jax.jit, static_argnames=("sigma", "l2_gradient", "color", "channels", "steps_per_check")
)
def _canny(images, low, high, max_iterations, *, sigma, l2_gradient, color, channels, steps_per_check=4):
    integer = jnp.issubdtype(images.dtype, jnp.integer)
    c = images.shape[-1]
    if c == 4:
        images = images[..., :3]  # alpha is not part of the edges
        c = 3
    if integer:
        x = images.astype(jnp.int32)
    else:
        x = images.astype(jnp.float32) * 255.0  # thresholds are in 0..255 units for float images too

    if color == "gray" and c == 3:
        if integer:
            r, g, b = x[..., 0], x[..., 1], x[..., 2]
            x = ((r * _GRAY_R + g * _GRAY_G + b * _GRAY_B + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT)[..., None]
        else:
            x = (x @ (jnp.asarray([_GRAY_R, _GRAY_G, _GRAY_B], jnp.float32) / (1 << _GRAY_SHIFT)))[..., None]
        c = 1

    if sigma > 0:
        size = canny_kernel_size(sigma, integer_input=bool(integer))
        x = _blur(x, sigma, size, bool(integer))

    gx, gy = _sobel(x)
    mag = gx * gx + gy * gy if l2_gradient else jnp.abs(gx) + jnp.abs(gy)
    if c > 1:  # OpenCV on multi-channel input: per pixel, the channel of largest magnitude (first on ties)
        best = jnp.argmax(mag, axis=-1)[..., None]
        gx = jnp.take_along_axis(gx, best, axis=-1)
        gy = jnp.take_along_axis(gy, best, axis=-1)
        mag = jnp.take_along_axis(mag, best, axis=-1)
    gx, gy, mag = gx[..., 0], gy[..., 0], mag[..., 0]

    # thresholds as OpenCV applies them: swapped if reversed, squared for L2, then floored
    lo, hi = jnp.minimum(low, high), jnp.maximum(low, high)
    if l2_gradient:
        lo = jnp.where(lo > 0, jnp.minimum(lo, 32767.0) ** 2, lo)
        hi = jnp.where(hi > 0, jnp.minimum(hi, 32767.0) ** 2, hi)
    lo, hi = jnp.floor(lo), jnp.floor(hi)
    if integer:
        lo, hi = lo.astype(jnp.int32), hi.astype(jnp.int32)
        ax, ay = jnp.abs(gx), jnp.abs(gy) << _CANNY_SHIFT
        tg22x = ax * _TG22
        tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    else:
        ax, ay = jnp.abs(gx), jnp.abs(gy) * float(1 << _CANNY_SHIFT)
        tg22x = ax * float(_TG22)
        tg67x = tg22x + ax * float(1 << (_CANNY_SHIFT + 1))

    # non-maximum suppression with OpenCV's tie rules (strict on the left/top side, >= on the right/bottom)
    left, right = _shift(mag, 0, -1), _shift(mag, 0, 1)
    up, down = _shift(mag, -1, 0), _shift(mag, 1, 0)
    same_sign = (gx < 0) == (gy < 0)
    diag_a = jnp.where(same_sign, _shift(mag, -1, -1), _shift(mag, -1, 1))
    diag_b = jnp.where(same_sign, _shift(mag, 1, 1), _shift(mag, 1, -1))
    horizontal = ay < tg22x
    vertical = ay > tg67x
    is_max = jnp.where(
        horizontal,
        (mag > left) & (mag >= right),
        jnp.where(vertical, (mag > up) & (mag >= down), (mag > diag_a) & (mag > diag_b)),
    )
    candidate = is_max & (mag > lo)
    strong = candidate & (mag > hi)

    # hysteresis: grow the strong edges through 8-connected candidates until nothing changes or
    # `max_iterations` growth steps are done (traced: changing the bound does not recompile). Several
    # steps run between convergence checks, single steps near the bound.
    def cond(state):
        _, changed, i = state
        return changed & (i < max_iterations)

    def grow(e, steps):
        for _ in range(steps):
            e = candidate & _dilate8(e)
        return e

    def body(state):
        edges, _, i = state
        full = i + steps_per_check <= max_iterations
        new = lax.cond(full, lambda e: grow(e, steps_per_check), lambda e: grow(e, 1), edges)
        return new, jnp.any(new != edges), i + jnp.where(full, steps_per_check, 1)

    edges, _, _ = lax.while_loop(cond, body, (strong, jnp.array(True), jnp.array(0)))
    out = edges.astype(jnp.float32)[..., None]
    return jnp.repeat(out, channels, axis=-1) if channels > 1 else out


def canny(
    images,
    low_threshold: float = 100.0,
    high_threshold: float = 200.0,
    *,
    sigma: float = 0.0,
    l2_gradient: bool = False,
    color: str = "max",
    channels: int = 3,
    max_iterations: int | None = None,
) -> jax.Array:
    """Canny edges of a batch of NHWC images, jit-compiled once per (shape, dtype, static settings).

    Args:
      images: (B, H, W, C) with C in {1, 3, 4} (alpha is ignored); uint8 or float in [0, 1].
        Thresholds are in 0..255 gradient units either way, as in `cv2.Canny(image, low, high)`.
        uint8 input is computed in int32 exactly as OpenCV does; float input in float32.
      low_threshold, high_threshold: hysteresis thresholds (traced, like `max_iterations`: changing
        them does not recompile).
        Edge pixels have magnitude > low and are 8-connected to a pixel with magnitude > high.
      sigma: Gaussian blur before the gradients (0: none, as inside `cv2.Canny`).
      l2_gradient: sqrt(dx^2 + dy^2) instead of |dx| + |dy| (OpenCV's `L2gradient`).
      color: "max" takes, per pixel, the channel with the largest gradient (what `cv2.Canny` does
        on a colour image, as in diffusers' docs); "gray" converts to luma first (OpenCV's
        RGB->gray weights).
      channels: 3 for diffusers' ControlNet convention (edges repeated over RGB) or 1.
      max_iterations: bound on hysteresis dilation steps (default: until convergence, at most H*W).
        A smaller bound cuts edges that are more than that many pixels from a strong pixel.

    Returns:
      float32 (B, H, W, channels), 1.0 on edges and 0.0 elsewhere.

    Raises:
      ValueError: images not NHWC with 1, 3 or 4 channels, a dtype other than uint8 or float,
        an unknown `color`, `channels` not 1 or 3, negative `sigma` or `max_iterations`, or a blur
        kernel larger than the image.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"canny: expected NHWC images with 1, 3 or 4 channels, got shape {tuple(images.shape)}")
    if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"canny: expected uint8 (0..255) or float ([0, 1]) images, got dtype {images.dtype}; "
            "convert other integer images to one of those"
        )
    if color not in ("max", "gray"):
        raise ValueError(f"canny: color must be 'max' or 'gray', got {color!r}")
    if channels not in (1, 3):
        raise ValueError(f"canny: channels must be 1 or 3, got {channels}")
    if sigma < 0:
        raise ValueError(f"canny: sigma must be >= 0, got {sigma}")
    if max_iterations is not None and max_iterations < 0:
        raise ValueError(f"canny: max_iterations must be >= 0, got {max_iterations}")
    limit = images.shape[1] * images.shape[2] if max_iterations is None else max_iterations
    return _canny(
        images,
        jnp.asarray(low_threshold, jnp.float32),
        jnp.asarray(high_threshold, jnp.float32),
        jnp.asarray(limit, jnp.int32),
        sigma=float(sigma),
        l2_gradient=bool(l2_gradient),
        color=color,
        channels=int(channels),
    )


def edge_agreement(pred, ref, tolerance: int = 0) -> dict[str, float]:
    """Precision, recall, F1 and IoU of two binary edge maps (H, W), a pixel counting as matched when
    the other map has an edge within `tolerance` pixels (Chebyshev distance; 0 = the same pixel).
    Precision (recall) is 1.0 when `pred` (`ref`) has no edges, IoU 1.0 when neither has; the edge
    counts come along. Raises `ValueError` when the shapes differ."""
    a = np.asarray(pred).astype(bool)
    b = np.asarray(ref).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"edge_agreement: shapes differ: {a.shape} vs {b.shape}")

    def near(m):
        if tolerance == 0:
            return m
        h, w = m.shape
        p = np.pad(m, tolerance)
        out = np.zeros_like(m)
        for dy in range(2 * tolerance + 1):
            for dx in range(2 * tolerance + 1):
                out |= p[dy : dy + h, dx : dx + w]
        return out

    na, nb = int(a.sum()), int(b.sum())
    precision = float((a & near(b)).sum()) / na if na else 1.0
    recall = float((b & near(a)).sum()) / nb if nb else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    union = int((a | b).sum())
    iou = float((a & b).sum()) / union if union else 1.0
    return {"precision": precision, "recall": recall, "f1": f1, "iou": iou, "pred_edges": na, "ref_edges": nb}


# --------------------------------------------------------------------------- control and adapter images

ImageInput = Union[Image.Image, np.ndarray, jax.Array, Sequence[Union[Image.Image, np.ndarray, jax.Array]]]

# diffusers' PIL_INTERPOLATION names
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "linear": Image.Resampling.BILINEAR,
}


def _as_list(image: ImageInput) -> list:
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("no images given (empty list)")
        items = list(image)
    else:
        items = [image]
    pil = [isinstance(i, Image.Image) for i in items]
    if any(pil) and not all(pil):
        raise ValueError("images must be all PIL images or all arrays, not a mix")
    for i in items:
        if not isinstance(i, (Image.Image, np.ndarray, jax.Array)):
            raise ValueError(f"unsupported image type {type(i).__name__}: expected a PIL image or a numpy/JAX array")
    return items


def _image_hw(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    a = np.asarray(image)
    if a.ndim == 2:
        return a.shape[0], a.shape[1]
    if a.ndim == 3:
        return a.shape[0], a.shape[1]
    if a.ndim == 4:
        return a.shape[1], a.shape[2]
    raise ValueError(f"expected an image array of shape (H, W), (H, W, C) or (B, H, W, C), got {a.shape}")


def default_height_width(image: ImageInput, height: int | None, width: int | None, multiple: int = 8,
                         round_given: bool = True) -> tuple[int, int]:
    """Output size: the first image's size where `height` / `width` is None, rounded down to `multiple`.

    `round_given=True` also rounds sizes that were given (diffusers' `VaeImageProcessor`);
    `round_given=False` rounds only the sizes taken from the image (the T2I adapter pipeline).
    Returns (height, width) in pixels; raises `ValueError` for an empty size or an unsupported image.
    """
    first = _as_list(image)[0]
    h, w = _image_hw(first)
    if height is None:
        height = h - h % multiple
    elif round_given:
        height = height - height % multiple
    if width is None:
        width = w - w % multiple
    elif round_given:
        width = width - width % multiple
    if height <= 0 or width <= 0:
        raise ValueError(f"output size {height}x{width} is empty (image {h}x{w}, multiple of {multiple})")
    return int(height), int(width)


def _to_float01(a: np.ndarray, what: str) -> np.ndarray:
    """uint8 -> /255; floats are taken to be in [0, 1] already (checked loosely)."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        if a.size and (a.min() < -1e-3 or a.max() > 1 + 1e-3):
            raise ValueError(
                f"{what}: float images must be in [0, 1]; got values in [{a.min():.3g}, {a.max():.3g}] "
                "(pass uint8 for 0..255 data)"
            )
        return a
    raise ValueError(f"{what}: expected uint8 or float images, got dtype {a.dtype}")


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch's `F.interpolate(mode="nearest")` source indices (float32 scale), as diffusers uses for arrays."""
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) // 2
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def _resize_pil(image: Image.Image, height: int, width: int, mode: str, resample) -> Image.Image:
    """diffusers' `VaeImageProcessor.resize` for PIL images (modes "default", "fill", "crop")."""
    if mode == "default":
        return image.resize((width, height), resample=resample)
    ratio = width / height
    src_ratio = image.width / image.height
    if mode == "crop":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = image.resize((src_w, src_h), resample=resample)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    if mode == "fill":
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
        resized = image.resize((src_w, src_h), resample=resample)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        if ratio < src_ratio:
            fill_height = height // 2 - src_h // 2
            if fill_height > 0:
                res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
                res.paste(
                    resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                    box=(0, fill_height + src_h),
                )
        elif ratio > src_ratio:
            fill_width = width // 2 - src_w // 2
            if fill_width > 0:
                res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
                res.paste(
                    resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                    box=(fill_width + src_w, 0),
                )
        return res
    raise ValueError(f"resize_mode must be 'default', 'fill' or 'crop', got {mode!r}")


def _arrays_to_nhwc(items: list, what: str) -> np.ndarray:
    arrays = []
    for a in items:
        a = np.asarray(a)
        if a.ndim == 2:
            a = a[None, :, :, None]
        elif a.ndim == 3:
            a = a[None]
        elif a.ndim != 4:
            raise ValueError(f"{what}: expected arrays of shape (H, W), (H, W, C) or (B, H, W, C), got {a.shape}")
        arrays.append(a)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{what}: arrays in one batch must have the same (H, W, C), got {sorted(shapes)}")
    return _to_float01(np.concatenate(arrays, axis=0), what)


def prepare_control_image(
    image: ImageInput,
    height: int | None = None,
    width: int | None = None,
    *,
    batch_size: int = 1,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = False,
    guess_mode: bool = False,
    resize_mode: str = "default",
    vae_scale_factor: int = 8,
    resample: str = "lanczos",
) -> np.ndarray:
    """A ControlNet conditioning batch, NHWC float32 in [0, 1], as `StableDiffusionControlNetPipeline.prepare_image`.

    Size: `height` / `width` default to the first image's size; all are rounded down to a multiple of
    `vae_scale_factor`. PIL images are resized with `resample` (Lanczos) per `resize_mode`:
    "default" stretches to the size, "crop" keeps the aspect ratio and centre-crops, "fill" keeps it
    and fills the margins from the image's edge rows/columns; then they are converted to RGB.
    Arrays (uint8, or float in [0, 1]) are resized with PyTorch's nearest rule ("default" only, as in
    diffusers); 1-channel arrays are repeated to RGB and a 4th (alpha) channel is dropped, as
    `convert("RGB")` does for PIL images.

    Batch: `batch_size` is the number of images generated (prompts x `num_images_per_prompt`, the
    value diffusers passes). A single control image is repeated `batch_size` times; a batch of one per
    prompt is repeated `num_images_per_prompt` times each (interleaved). With classifier-free
    guidance and not `guess_mode`, the batch is doubled (negative half first, equal content).

    Differences from diffusers, where diffusers' result would be unusable: uint8 arrays are scaled
    by 1/255 (diffusers keeps 0..255), and 1- or 4-channel arrays become 3-channel.

    Returns (batch_size, or 2 x batch_size with guidance, height, width, 3). Raises `ValueError` for
    mixed or unsupported image types, float values outside [0, 1], an unknown `resize_mode` /
    `resample` (or a non-"default" mode for arrays), arrays of different shapes, a bad channel
    count, or a batch that is neither 1 nor the prompt count.
    """
    items = _as_list(image)
    if resize_mode not in ("default", "fill", "crop"):
        raise ValueError(f"resize_mode must be 'default', 'fill' or 'crop', got {resize_mode!r}")
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    height, width = default_height_width(items, height, width, vae_scale_factor, round_given=True)
    if isinstance(items[0], Image.Image):
        imgs = [_resize_pil(i, height, width, resize_mode, _RESAMPLE[resample]).convert("RGB") for i in items]
        out = np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in imgs])
    else:
        if resize_mode != "default":
            raise ValueError(f"resize_mode {resize_mode!r} needs PIL images; arrays support only 'default'")
        out = _arrays_to_nhwc(items, "control image")
        hi, wi = _nearest_indices(out.shape[1], height), _nearest_indices(out.shape[2], width)
        out = out[:, hi][:, :, wi]
        if out.shape[-1] == 1:
            out = np.repeat(out, 3, axis=-1)
        elif out.shape[-1] == 4:
            out = out[..., :3]
        elif out.shape[-1] != 3:
            raise ValueError(f"control image: expected 1, 3 or 4 channels, got {out.shape[-1]}")
    if batch_size < 1 or num_images_per_prompt < 1 or batch_size % num_images_per_prompt:
        raise ValueError(
            f"batch_size ({batch_size}) must be a positive multiple of num_images_per_prompt ({num_images_per_prompt})"
        )
    n = out.shape[0]
    prompts = batch_size // num_images_per_prompt
    if n != 1 and n != prompts:
        raise ValueError(
            f"control image batch size {n} must be 1 or equal to the prompt batch size {prompts} "
            f"(batch_size={batch_size} / num_images_per_prompt={num_images_per_prompt})"
        )
    out = np.repeat(out, batch_size if n == 1 else num_images_per_prompt, axis=0)
    if do_classifier_free_guidance and not guess_mode:
        out = np.concatenate([out, out], axis=0)
    return np.ascontiguousarray(out, dtype=np.float32)


def _to_gray_array(a: np.ndarray) -> np.ndarray:
    """PIL's `convert("L")` weights (ITU-R 601-2), on float data."""
    return (a[..., :3] @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]


def prepare_adapter_image(
    image: ImageInput,
    height: int | None = None,
    width: int | None = None,
    *,
    in_channels: int | None = None,
    downscale_factor: int = 8,
) -> np.ndarray:
    """A T2I-Adapter input batch, NHWC float32 in [0, 1], as the adapter pipeline's `_preprocess_adapter_image`.

    `height` / `width` default to the first image's size rounded down to `downscale_factor` (given
    sizes are used as they are, as in diffusers). PIL images are resized with Lanczos and keep their
    channels: an "L" image gives 1 channel, "RGB" 3. With `in_channels` (see
    `jaxcontrol.models.adapter.adapter_in_channels`), images are first converted to what the adapter
    takes: "L" for 1-channel sketch / canny adapters, "RGB" for 3. Arrays (uint8 or float in [0, 1];
    (H, W), (H, W, C) or (B, H, W, C)) must already be `height` x `width`; with `in_channels`, their
    channels are converted the same way (luma with PIL's weights, or repetition).

    Returns (B, height, width, C), C = `in_channels` or the images' own. Raises `ValueError` for
    `in_channels` not 1 / 3 / None, mixed or unsupported image types, float values outside [0, 1],
    arrays of another size, or channel counts that differ or cannot be converted.
    """
    items = _as_list(image)
    if in_channels not in (None, 1, 3):
        raise ValueError(f"in_channels must be 1 or 3 (or None to keep the image's channels), got {in_channels}")
    height, width = default_height_width(items, height, width, downscale_factor, round_given=False)
    if isinstance(items[0], Image.Image):
        arrays = []
        for im in items:
            if in_channels is not None:
                im = im.convert("L" if in_channels == 1 else "RGB")
            a = np.asarray(im.resize((width, height), resample=Image.Resampling.LANCZOS))
            arrays.append(a[None, ..., None] if a.ndim == 2 else a[None])
        chans = {a.shape[-1] for a in arrays}
        if len(chans) > 1:
            raise ValueError(f"adapter images have different channel counts {sorted(chans)}; pass in_channels")
        out = np.concatenate(arrays, axis=0).astype(np.float32) / 255.0
    else:
        out = _arrays_to_nhwc(items, "adapter image")
        if out.shape[1:3] != (height, width):
            raise ValueError(
                f"adapter image arrays are {out.shape[1]}x{out.shape[2]} but {height}x{width} was asked for; "
                "resize them first or pass PIL images"
            )
        c = out.shape[-1]
        if in_channels == 1 and c in (3, 4):
            out = _to_gray_array(out)
        elif in_channels == 3 and c == 1:
            out = np.repeat(out, 3, axis=-1)
        elif in_channels == 3 and c == 4:
            out = out[..., :3]
        elif in_channels is not None and c != in_channels:
            raise ValueError(f"adapter image has {c} channels; cannot convert to {in_channels}")
    return np.ascontiguousarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------------- masks


def _per_prompt(x: np.ndarray, batch: int, num_images_per_prompt: int, what: str, noun: str) -> np.ndarray:
    """`x` (N, ...) for the whole batch: one for all, one per prompt repeated
    `num_images_per_prompt` times each (interleaved like the prompts), or one per image.
    `ValueError` naming `what` for any other count."""
    n, prompts = x.shape[0], batch // max(num_images_per_prompt, 1)
    if n == 1:
        return np.repeat(x, batch, axis=0)
    if n == prompts:
        return np.repeat(x, num_images_per_prompt, axis=0)
    if n != batch:
        counts = sorted({1, prompts, batch})
        accepted = " or ".join(map(str, counts)) if len(counts) < 3 else f"{counts[0]}, {counts[1]} or {counts[2]}"
        raise ValueError(f"{what}: a batch of {n} {noun} for {prompts} prompt(s) x {num_images_per_prompt} "
                         f"image(s) each; give {accepted}")
    return x


def _mask_array(item, what: str) -> np.ndarray:
    """One mask, or a batch of them, as float32 (N, H, W) in [0, 1] from any layout diffusers'
    mask processor takes, plus RGB(A) arrays (converted to luma)."""
    if isinstance(item, Image.Image):
        im = _to_8bit(item)
        return np.asarray(im.convert("L"), np.float32)[None] / 255.0
    a = np.asarray(item)
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        if a.size and (not np.all(np.isfinite(a)) or a.min() < -1e-3 or a.max() > 1 + 1e-3):
            raise ValueError(f"{what}: float masks must be finite and in [0, 1]; got values in "
                             f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}] (pass uint8 for 0..255 data)")
    else:
        raise ValueError(f"{what}: expected a bool, uint8, uint16 or float mask, got dtype {a.dtype}")
    shape = a.shape
    channels = (1, 3, 4)
    if a.ndim == 2:  # (H, W)
        return a[None]
    if a.ndim == 3:
        if shape[-1] in channels and shape[0] not in channels:  # (H, W, C)
            return _mask_channels(a[None], what, shape)
        if shape[0] in channels and shape[-1] not in channels:  # (C, H, W) or (1, H, W)
            return _mask_channels(np.moveaxis(a, 0, -1)[None], what, shape)
        if shape[-1] == 1:
            return a[None, ..., 0]
        return a  # (B, H, W)
    if a.ndim == 4:
        if shape[-1] in channels and shape[1] not in channels:  # (B, H, W, C)
            return _mask_channels(a, what, shape)
        if shape[1] in channels and shape[-1] not in channels:  # (B, C, H, W)
            return _mask_channels(np.moveaxis(a, 1, -1), what, shape)
        if shape[-1] == 1:
            return a[..., 0]
        if shape[1] == 1:
            return a[:, 0]
    raise ValueError(f"{what}: cannot tell the layout of a mask of shape {shape}; expected (H, W), (H, W, C), "
                     "(C, H, W), (B, H, W), (B, H, W, C) or (B, C, H, W) with C in 1, 3, 4")


def _mask_channels(a: np.ndarray, what: str, shape: tuple) -> np.ndarray:
    """(B, H, W, C) -> (B, H, W): one channel as it is, RGB(A) to luma (alpha dropped)."""
    c = a.shape[-1]
    if c == 1:
        return a[..., 0]
    if c in (3, 4):
        return _to_gray_array(a)[..., 0]
    raise ValueError(f"{what}: a mask of shape {shape} has {c} channels; expected 1, 3 or 4")


def prepare_mask(mask, batch: int, height: int, width: int, *, num_images_per_prompt: int = 1,
                 what: str = "mask") -> np.ndarray:
    """An inpainting mask as (batch, height, width, 1) float32 in {0, 1} (1 = regenerate), at the
    latent size `height` x `width`.

    Accepts what diffusers' mask processor (`VaeImageProcessor(do_binarize=True,
    do_convert_grayscale=True)`) takes: PIL images of any mode ("1", "L", "RGB", "RGBA", 16-bit),
    arrays (H, W), (H, W, 1), channels-first (1, H, W) and (B, 1, H, W), batches (B, H, W) and
    (B, H, W, 1), and lists of these; also RGB(A) arrays, converted to luma. uint8 is 0..255,
    uint16 0..65535, floats [0, 1]. Masks of any size are resized with PyTorch's nearest rule
    (diffusers' `F.interpolate` to the latent size) and binarised at 0.5 (>= 0.5 is 1). A single
    mask serves the whole batch; one per prompt is repeated `num_images_per_prompt` times each.

    Raises `ValueError` naming `what` for an empty list, an unsupported dtype, float values outside
    [0, 1] or not finite, a layout it cannot tell, masks of different sizes, or a mask count that is
    not 1, the prompt count or `batch`.
    """
    items = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    if not items:
        raise ValueError(f"{what}: empty list")
    arrays = [_mask_array(m, what) for m in items]
    sizes = {a.shape[1:] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{what}: masks in one batch must have the same size, got {sorted(sizes)}")
    m = np.concatenate(arrays, axis=0)
    hi, wi = _nearest_indices(m.shape[1], height), _nearest_indices(m.shape[2], width)
    m = m[:, hi][:, :, wi]
    m = (m >= 0.5).astype(np.float32)[..., None]
    return np.ascontiguousarray(_per_prompt(m, batch, num_images_per_prompt, what, "masks"))


# ------------------------------------------------------------------------------------- depth maps


def _bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of PyTorch's `F.interpolate(mode="bicubic", align_corners=False)` along
    one axis: source (o + 0.5) * n_in / n_out - 0.5, Keys' cubic with A = -0.75, edges clamped."""
    a = -0.75
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    t = src - base
    w = np.stack([
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ], axis=1)
    m = np.zeros((n_out, n_in))
    for k in range(4):
        idx = np.clip(base + k - 1, 0, n_in - 1).astype(np.int64)
        np.add.at(m, (np.arange(n_out), idx), w[:, k])
    return m


def _depth_array(item, what: str) -> np.ndarray:
    """One depth map or a batch as float64 (N, H, W): PIL images of any mode (16-bit "I;16", "I",
    "F", "L"; RGB as luma) or numeric arrays (H, W), (H, W, 1), (B, H, W), (B, 1, H, W), (B, H, W, 1)."""
    if isinstance(item, Image.Image):
        if item.mode in ("RGB", "RGBA", "P", "LA"):
            item = item.convert("L")
        return np.asarray(item).astype(np.float64)[None]
    a = np.asarray(item)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{what}: expected a numeric depth map, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3:
        if a.shape[-1] in (3, 4) and a.shape[0] not in (3, 4):  # an (H, W, RGB[A]) rendering: its luma
            return _to_gray_array(a[None])[..., 0]
        return a[None, ..., 0] if a.shape[-1] == 1 else a
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim == 4 and a.shape[-1] == 1:
        return a[..., 0]
    raise ValueError(f"{what}: cannot tell the layout of a depth map of shape {a.shape}; expected (H, W), "
                     "(H, W, 1), (B, H, W), (B, 1, H, W) or (B, H, W, 1)")


def prepare_depth_map(depth, batch: int, height: int, width: int, *, num_images_per_prompt: int = 1,
                      what: str = "depth_map") -> np.ndarray:
    """A Depth2Image model's depth input as (batch, height, width, 1) float32 in [-1, 1], at the
    latent size `height` x `width`, as diffusers' `StableDiffusionDepth2ImgPipeline.prepare_depth_map`
    makes it from a given `depth_map`: bicubic resize (PyTorch's rule), then each map scaled by its
    own min and max to [-1, 1]. Larger values are nearer in MiDaS/DPT output; the model was trained
    on that convention, so pass the estimator's raw output (any scale: only its range matters).

    Takes PIL images (16-bit PNGs included), arrays or lists of them. One map serves the whole
    batch; one per prompt is repeated `num_images_per_prompt` times each. Raises `ValueError`
    naming `what` for an unreadable layout, non-finite values, a constant map (no range to
    normalise), maps of different sizes, or a count that is not 1, the prompt count or `batch`."""
    items = list(depth) if isinstance(depth, (list, tuple)) else [depth]
    if not items:
        raise ValueError(f"{what}: empty list")
    arrays = [_depth_array(d, what) for d in items]
    if len({a.shape[1:] for a in arrays}) > 1:
        raise ValueError(f"{what}: maps in one batch must have the same size, got {sorted({a.shape[1:] for a in arrays})}")
    d = np.concatenate(arrays, axis=0)
    if not np.all(np.isfinite(d)):
        raise ValueError(f"{what}: the depth map holds NaN or infinite values")
    top = float(np.abs(d).max()) if d.size else 0.0
    if top > 2.0 ** 500:  # near float64's range: a power of two (exact) keeps the resize and range finite
        d = d * 2.0 ** -int(np.ceil(np.log2(top)))
    wh, ww = _bicubic_weights(d.shape[1], height), _bicubic_weights(d.shape[2], width)
    d = np.einsum("oh,nhw,pw->nop", wh, d, ww)
    lo, hi = d.min(axis=(1, 2), keepdims=True), d.max(axis=(1, 2), keepdims=True)
    if np.any(hi - lo <= 0):
        raise ValueError(f"{what}: a depth map is constant after resizing to {height}x{width}; it has no range to "
                         "normalise to [-1, 1]")
    d = 2.0 * (d - lo) / (hi - lo) - 1.0
    return np.ascontiguousarray(_per_prompt(d, batch, num_images_per_prompt, what, "depth maps")[..., None],
                                dtype=np.float32)
