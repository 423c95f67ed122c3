"""fill50k-style examples drawn procedurally in numpy (no TFDS needed).

The ControlNet training tutorial's fill50k dataset: a filled circle of a named colour on a named
background, the caption "<circle colour> circle with <background colour> background", and as the
condition the circle's outline, white on black. Here every example is a pure function of
(seed, split, index), so any example, in particular a held-out validation condition for a benchmark,
can be drawn on its own:

    ex = fill50k_example(7, split="validation", seed=0, image_size=64)
    ex.image, ex.condition      # (64, 64, 3) uint8 each
    ex.caption                  # e.g. "light blue circle with maroon background"
    ex.center, ex.radius        # in pixels; (x, y) with y down
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Sequence

import numpy as np

from ..errors import ConfigError

# name -> sRGB. Names are what appears in captions (CSS / X11 colour names, spaced as words).
DEFAULT_COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (255, 0, 0)),
    ("green", (0, 128, 0)),
    ("blue", (0, 0, 255)),
    ("yellow", (255, 255, 0)),
    ("orange", (255, 165, 0)),
    ("purple", (128, 0, 128)),
    ("pink", (255, 192, 203)),
    ("brown", (165, 42, 42)),
    ("black", (0, 0, 0)),
    ("white", (255, 255, 255)),
    ("gray", (128, 128, 128)),
    ("cyan", (0, 255, 255)),
    ("magenta", (255, 0, 255)),
    ("light blue", (173, 216, 230)),
    ("dark green", (0, 100, 0)),
    ("navy", (0, 0, 128)),
    ("gold", (255, 215, 0)),
    ("maroon", (128, 0, 0)),
    ("olive", (128, 128, 0)),
    ("teal", (0, 128, 128)),
    ("lime", (0, 255, 0)),
    ("salmon", (250, 128, 114)),
    ("turquoise", (64, 224, 208)),
    ("lavender", (230, 230, 250)),
    ("pale golden rod", (238, 232, 170)),
    ("old lace", (253, 245, 230)),
    ("chocolate", (210, 105, 30)),
    ("sky blue", (135, 206, 235)),
)

# ten clearly distinct colours of DEFAULT_COLORS, in its order (pairwise sRGB distance >= 90): the
# embedded demo model's vocabulary, on which colour accuracy can be scored by nearest named colour
# without near-synonyms
BASIC_COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = tuple(
    c for c in DEFAULT_COLORS
    if c[0] in ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "gray", "cyan")
)
PALETTES = {"default": DEFAULT_COLORS, "basic": BASIC_COLORS}

SPLITS = {"train": 0, "validation": 1}
MIN_COLOR_DISTANCE = 60.0  # Euclidean sRGB distance between circle and background, so the circle shows


@dataclasses.dataclass(frozen=True)
class Fill50kExample:
    """One fill50k example (see `fill50k_example`); S is the image size in pixels."""

    image: np.ndarray  # (S, S, 3) uint8: the filled circle on its background
    condition: np.ndarray  # (S, S, 3) uint8: the outline, white on black
    caption: str
    circle_color: str
    background_color: str
    center: tuple[float, float]  # (x, y) in pixels, origin at the top-left corner of the image
    radius: float  # pixels
    index: int
    split: str


def check_colors(colors: Sequence[tuple[str, Sequence[int]]] | str | None) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """Validate a colour vocabulary [(name, (r, g, b)), ...] (or a `PALETTES` name; None is
    `DEFAULT_COLORS`) and return it as a tuple of (str, (int, int, int)) with values in 0..255.

    Raises `ConfigError` for an unknown palette name, an entry that is not (name, three ints in
    0..255), an empty or repeated name, or a vocabulary with no two colours at least
    `MIN_COLOR_DISTANCE` apart.
    """
    if colors is None:
        return DEFAULT_COLORS
    if isinstance(colors, str):
        if colors not in PALETTES:
            raise ConfigError(f"colour palette {colors!r} is not one of {sorted(PALETTES)}")
        return PALETTES[colors]
    out = []
    seen = set()
    for item in colors:
        try:
            name, rgb = item
            rgb = tuple(int(v) for v in rgb)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"colour vocabulary entry {item!r}: expected (name, (r, g, b))") from e
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"colour vocabulary entry {item!r}: the name must be a non-empty string")
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise ConfigError(f"colour {name!r}: expected three values in 0..255, got {rgb}")
        if name in seen:
            raise ConfigError(f"colour {name!r} appears twice in the vocabulary")
        seen.add(name)
        out.append((name, rgb))
    if not color_pairs(tuple(out)):
        raise ConfigError(
            f"colour vocabulary {[n for n, _ in out]} has no (circle, background) pair at least "
            f"{MIN_COLOR_DISTANCE} apart in RGB; add more distinct colours"
        )
    return tuple(out)


def color_pairs(colors: tuple[tuple[str, tuple[int, int, int]], ...]) -> list[tuple[int, int]]:
    """(circle, background) index pairs of distinct, clearly different colours, in a fixed order."""
    rgb = np.asarray([c for _, c in colors], np.float64).reshape(-1, 3)
    return [
        (i, j)
        for i in range(len(colors))
        for j in range(len(colors))
        if i != j and np.linalg.norm(rgb[i] - rgb[j]) >= MIN_COLOR_DISTANCE
    ]


def colors_fingerprint(colors: tuple[tuple[str, tuple[int, int, int]], ...]) -> str:
    """Short stable hash of a vocabulary, for dataset config names."""
    return hashlib.sha256(json.dumps([[n, list(c)] for n, c in colors]).encode()).hexdigest()[:10]


def draw_circle(
    image_size: int,
    center: tuple[float, float],
    radius: float,
    circle_rgb: Sequence[int],
    background_rgb: Sequence[int],
    outline_width: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(image, condition), each (S, S, 3) uint8 with S = `image_size`: an anti-aliased filled disc
    of `circle_rgb` on `background_rgb` (sRGB 0..255), and its outline white on black. `center` is
    (x, y) and `radius` in pixels, origin at the top-left corner.

    Coverage is clip(r - d + 1/2, 0, 1) with d the distance of the pixel centre from the circle's
    centre (a one-pixel linear ramp across the boundary); the outline's is the same for a ring of
    `outline_width` pixels (default max(2, S / 128)) centred on the circle.
    """
    if outline_width is None:
        outline_width = max(2.0, image_size / 128.0)
    c = np.arange(image_size, dtype=np.float64) + 0.5
    d = np.hypot(c[None, :] - center[0], c[:, None] - center[1])
    fill = np.clip(radius - d + 0.5, 0.0, 1.0)[..., None]
    image = np.asarray(background_rgb, np.float64) * (1.0 - fill) + np.asarray(circle_rgb, np.float64) * fill
    ring = np.clip(outline_width / 2.0 - np.abs(d - radius) + 0.5, 0.0, 1.0)
    condition = np.repeat((ring * 255.0)[..., None], 3, axis=-1)
    return (
        np.round(image).astype(np.uint8),
        np.round(condition).astype(np.uint8),
    )


def fill50k_example(
    index: int,
    *,
    split: str = "train",
    seed: int = 0,
    image_size: int = 512,
    colors: Sequence[tuple[str, Sequence[int]]] | None = None,
    min_radius: float = 0.08,
    max_radius: float = 0.35,
) -> Fill50kExample:
    """Example `index` of `split` ("train" or "validation"), a pure function of its arguments
    (numpy's PCG64 seeded by (seed, split, index)). Radii are fractions of `image_size`; the circle
    lies inside the image. Images are (image_size, image_size, 3) uint8.

    Raises `ConfigError` for an unknown split, image_size < 8, radii outside
    0 < min_radius <= max_radius < 0.5, a negative index or seed, or an invalid `colors`.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if image_size < 8:
        raise ConfigError(f"image_size must be at least 8, got {image_size}")
    if not 0 < min_radius <= max_radius < 0.5:
        raise ConfigError(f"need 0 < min_radius <= max_radius < 0.5, got {min_radius}, {max_radius}")
    if index < 0 or seed < 0:
        raise ConfigError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    colors = check_colors(colors)
    pairs = color_pairs(colors)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))
    ci, bi = pairs[int(rng.integers(len(pairs)))]
    radius = float(rng.uniform(min_radius, max_radius)) * image_size
    cx = float(rng.uniform(radius, image_size - radius))
    cy = float(rng.uniform(radius, image_size - radius))
    (cname, crgb), (bname, brgb) = colors[ci], colors[bi]
    image, condition = draw_circle(image_size, (cx, cy), radius, crgb, brgb)
    return Fill50kExample(
        image=image,
        condition=condition,
        caption=caption(cname, bname),
        circle_color=cname,
        background_color=bname,
        center=(cx, cy),
        radius=radius,
        index=int(index),
        split=split,
    )


# ------------------------------------------------------------------------------ instruction edits

EDIT_PARTS = ("circle", "background")


@dataclasses.dataclass(frozen=True)
class Fill50kEdit:
    """One edit triple (see `fill50k_edit_example`): `source` --`instruction`--> `edited`. Both
    images share the circle's geometry; exactly one part (`part`) changes colour."""

    source: np.ndarray  # (S, S, 3) uint8: the image to edit
    edited: np.ndarray  # (S, S, 3) uint8: the same circle with `part` recoloured
    instruction: str  # "make the circle red" / "make the background white"
    part: str  # "circle" or "background"
    source_colors: tuple[str, str]  # (circle, background) names before the edit
    edited_colors: tuple[str, str]  # (circle, background) names after it
    center: tuple[float, float]
    radius: float
    index: int
    split: str


def caption(circle: str, background: str) -> str:
    """An example's caption: "<circle colour> circle with <background colour> background"."""
    return f"{circle} circle with {background} background"


def edit_instruction(part: str, color: str) -> str:
    """The instruction text of an edit: "make the <part> <colour>"."""
    if part not in EDIT_PARTS:
        raise ConfigError(f"edit part must be one of {EDIT_PARTS}, got {part!r}")
    return f"make the {part} {color}"


def fill50k_edit_example(
    index: int,
    *,
    split: str = "train",
    seed: int = 0,
    image_size: int = 512,
    colors: Sequence[tuple[str, Sequence[int]]] | None = None,
) -> Fill50kEdit:
    """Edit triple `index` of `split`, a pure function of its arguments: the source is
    `fill50k_example(index, ...)`; the part (circle or background, equally likely) and its new
    colour are drawn from a second stream seeded by (seed, split, index), among the colours at least
    `MIN_COLOR_DISTANCE` from both the part's old colour and the other part's colour (so the edit
    shows and the circle stays visible). Raises `ConfigError` as `fill50k_example` does, or when the
    vocabulary leaves no such colour for this example."""
    src = fill50k_example(index, split=split, seed=seed, image_size=image_size, colors=colors)
    colors = check_colors(colors)
    rgb = dict(colors)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index), 1]))
    part = EDIT_PARTS[int(rng.integers(2))]
    old, other = (src.circle_color, src.background_color) if part == "circle" else (src.background_color, src.circle_color)

    def far(a: str, b: str) -> bool:
        return float(np.linalg.norm(np.subtract(rgb[a], rgb[b], dtype=np.float64))) >= MIN_COLOR_DISTANCE

    choices = [name for name, _ in colors if far(name, old) and far(name, other)]
    if not choices:
        raise ConfigError(f"fill50k edit {index}: no colour in the vocabulary differs from both {old!r} and {other!r}")
    new = choices[int(rng.integers(len(choices)))]
    circle, background = (new, src.background_color) if part == "circle" else (src.circle_color, new)
    edited, _ = draw_circle(image_size, src.center, src.radius, rgb[circle], rgb[background])
    return Fill50kEdit(
        source=src.image, edited=edited, instruction=edit_instruction(part, new), part=part,
        source_colors=(src.circle_color, src.background_color), edited_colors=(circle, background),
        center=src.center, radius=src.radius, index=int(index), split=split,
    )
