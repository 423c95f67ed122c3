"""The embedded default model and the control grid that `make demo` writes.

    pipe = load_embedded()                         # base model + its ControlNet + its T2I-Adapter
    grid = control_grid(pipe, DEMO_PROMPT, circle_outline())
    jaxcontrol.images.save_png(grid, "demo.png")

The model (jaxcontrol/assets/, trained by `make embedded-model`, see docs/RESULTS.md) is a small
Stable-Diffusion-architecture pipeline trained on fill50k-style data: prompts name a circle colour
and a background colour from `jaxcontrol.data.fill50k.BASIC_COLORS` ("red circle with blue
background"), and its ControlNet and T2I-Adapter take the circle's outline, white on black.

`control_grid` runs one compiled program: every column is the same call with different traced
scales (a ControlNet or adapter at scale 0 adds exactly nothing), so the grid costs one compile.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_directory
from .errors import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "default_model"  # the base pipeline (jaxcontrol checkpoint)
DEFAULT_CONTROLNET = ASSETS / "default_controlnet"
DEFAULT_ADAPTER = ASSETS / "default_adapter"
# the instruction editor: an 8-channel InstructPix2Pix U-Net over the base model's VAE and text encoder
DEFAULT_EDITOR = ASSETS / "default_editor"
EDIT_EXPORT = "edit/export/jaxcontrol/pipeline"
DEMO_INSTRUCTIONS = ("make the circle red", "make the background white", "make the circle green")
EDIT_GUIDANCE = (3.0, 1.5)  # (text, image) guidance scales of the demo row (docs/RESULTS.md's sweep)
DEMO_PROMPT = "yellow circle with blue background"
DEMO_GUIDANCE = 5.0
DEMO_STEPS = 20
CFG_SWEEP = (1.0, 2.0, 4.0, 6.0, 8.0)
# what `install` copies: run export -> asset folder
EXPORTS = {
    "unet/export/jaxcontrol/pipeline": DEFAULT_MODEL,
    "controlnet/export/jaxcontrol/controlnet": DEFAULT_CONTROLNET,
    "adapter/export/jaxcontrol/adapter": DEFAULT_ADAPTER,
}


def is_built() -> bool:
    """Whether the base model and its ControlNet are installed (the T2I-Adapter is optional)."""
    return DEFAULT_MODEL.is_dir() and DEFAULT_CONTROLNET.is_dir()


def load_embedded(*, model=None, controlnet=None, adapter=None, **kw):
    """The embedded pipeline with its ControlNet, and its T2I-Adapter when there is one (any of the
    three replaceable by a path)."""
    from .pipeline import Pipeline

    model, controlnet = (Path(p) if p else d for p, d in ((model, DEFAULT_MODEL), (controlnet, DEFAULT_CONTROLNET)))
    for p in (model, controlnet):
        if not p.exists():
            raise ConfigError(f"{p}: not found; the embedded model is built by `make embedded-model`")
    if adapter and not Path(adapter).exists():
        raise ConfigError(f"{adapter}: not found")
    adapter = Path(adapter) if adapter else (DEFAULT_ADAPTER if DEFAULT_ADAPTER.is_dir() else None)
    return Pipeline.from_pretrained(model, controlnets=[controlnet], adapters=[adapter] if adapter else [], **kw)


def load_editor(*, model=None, unet=None, **kw):
    """The embedded instruction editor: the base pipeline (`model`) with the InstructPix2Pix U-Net
    (`unet`, default `DEFAULT_EDITOR`) in place of its own."""
    from .pipeline import Pipeline

    model, unet = Path(model) if model else DEFAULT_MODEL, Path(unet) if unet else DEFAULT_EDITOR
    for p in (model, unet):
        if not p.exists():
            raise ConfigError(f"{p}: not found; the embedded editor is built by `make embedded-model`")
    return Pipeline.from_pretrained(model, unet=unet, **kw)


def demo_source(size: int = 64) -> np.ndarray:
    """The demo row's image to edit: a yellow circle on blue, at `circle_outline`'s place."""
    from .data.fill50k import BASIC_COLORS, draw_circle

    rgb = dict(BASIC_COLORS)
    image, _ = draw_circle(size, (0.36 * size, 0.58 * size), 0.24 * size, rgb["yellow"], rgb["blue"])
    return image


def edit_row(editor, source: np.ndarray, instructions: Sequence[str], *, seed: int = 0, steps: int = DEMO_STEPS,
             scales: tuple[float, float] = EDIT_GUIDANCE, scale: int = 3) -> list[np.ndarray]:
    """Labelled cells: the input image, then its edit by each instruction (one batched call)."""
    out = editor(list(instructions), init_image=np.stack([source] * len(instructions)), num_inference_steps=steps,
                 guidance_scale=scales[0], image_guidance_scale=scales[1], seed=seed)
    return [_label(source, "input", scale)] + [_label(img, text, scale) for img, text in zip(out, instructions)]


def circle_outline(size: int = 64, center: tuple[float, float] = (0.36, 0.58), radius: float = 0.24) -> np.ndarray:
    """(size, size, 3) uint8 outline of a circle, white on black, as fill50k draws conditions;
    `center` (x, y) and `radius` are fractions of `size`."""
    from .data.fill50k import draw_circle

    _, cond = draw_circle(size, (center[0] * size, center[1] * size), radius * size, (0, 0, 0), (0, 0, 0))
    return cond


def _label(image: np.ndarray, text: str, scale: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    h, w = big.shape[:2]
    canvas = Image.new("RGB", (w, h + 14), (255, 255, 255))
    canvas.paste(Image.fromarray(big), (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def control_grid(pipe, prompt: str, condition: np.ndarray, *, seed: int = 0, steps: int = DEMO_STEPS,
                 guidance_scale: float = DEMO_GUIDANCE, cfg_scales: Sequence[float] = CFG_SWEEP,
                 scheduler: str | None = None, scale: int = 3, extra_rows: Sequence[Sequence[np.ndarray]] = ()
                 ) -> np.ndarray:
    """A labelled uint8 grid. Row 1: condition | no control | ControlNet | T2I-Adapter | both, at
    `guidance_scale` (without an adapter loaded: condition | no control | ControlNet). Row 2: the
    ControlNet image at each of `cfg_scales`. Same seed throughout. `extra_rows`: rows of cells of
    the same size appended below (e.g. `edit_row`'s)."""
    from .images import make_grid
    from .pipeline import AdapterInput, ControlInput

    if len(pipe.controlnets) != 1 or len(pipe.adapters) > 1:
        raise ConfigError(f"control_grid needs one ControlNet and at most one adapter loaded, got "
                          f"{len(pipe.controlnets)} and {len(pipe.adapters)}")
    has_adapter = len(pipe.adapters) == 1
    cond = np.asarray(condition)
    cond01 = cond.astype(np.float32) / 255.0 if cond.dtype == np.uint8 else cond.astype(np.float32)
    h, w = cond01.shape[:2]

    def one(cn: float, ad: float, cfg: float) -> np.ndarray:
        return pipe([prompt], height=h, width=w, num_inference_steps=steps, guidance_scale=cfg, scheduler=scheduler,
                    seed=seed, controls=[ControlInput(cond01, cn)],
                    adapters=[AdapterInput(cond01, ad)] if has_adapter else [])[0]

    cond_u8 = np.round(np.clip(cond01, 0, 1) * 255).astype(np.uint8)
    row1 = [_label(cond_u8, "condition", scale)]
    columns = [("no control", 0.0, 0.0), ("ControlNet", 1.0, 0.0)]
    if has_adapter:
        columns += [("T2I-Adapter", 0.0, 1.0), ("both", 1.0, 1.0)]
    for name, cn, ad in columns:
        row1.append(_label(one(cn, ad, guidance_scale), name, scale))
    row2 = [_label(one(1.0, 0.0, cfg), f"CN, CFG {cfg:g}", scale) for cfg in cfg_scales]
    rows = [row1, row2, *[list(r) for r in extra_rows]]
    cols = max(len(r) for r in rows)
    blank = np.full_like(row1[0], 255)
    cells = [c for r in rows for c in r + [blank] * (cols - len(r))]
    return make_grid(cells, columns=cols, pad=4)


def install(runs: str | os.PathLike, *, overwrite: bool = True) -> list[Path]:
    """Copy the exports of `make embedded-model`'s runs (under `runs`) into jaxcontrol/assets/,
    each folder replaced atomically (written beside, then renamed). The base model and the
    ControlNet are required; the T2I-Adapter is copied when its run exported one."""
    runs = Path(runs)
    required = list(EXPORTS)[:2]  # the base model and the ControlNet; the adapter is installed when there is one
    missing = [str(runs / src) for src in required if not (runs / src).is_dir()]
    if missing:
        raise ConfigError(f"missing exports {missing}: run the stages of configs/embedded.py first")
    written = []
    for src, dest in EXPORTS.items():
        if not (runs / src).is_dir():
            continue
        with atomic_directory(dest, overwrite=overwrite, error=ConfigError) as tmp:
            # Orbax's commit_success.txt records the absolute path it was written to; restoring from a
            # local folder does not read it, and a shipped asset should not carry a build machine's paths
            shutil.copytree(runs / src, tmp, ignore=shutil.ignore_patterns("commit_success.txt"), dirs_exist_ok=True)
        written.append(dest)
    if (runs / EDIT_EXPORT).is_dir():
        from .convert import save_checkpoint
        from .convert.pipeline_folder import load_pipeline

        bundle = load_pipeline(runs / EDIT_EXPORT, components=("unet",))
        save_checkpoint(DEFAULT_EDITOR, {"unet": (bundle.modules["unet"], bundle.params["unet"])}, overwrite=overwrite)
        for f in DEFAULT_EDITOR.rglob("commit_success.txt"):
            f.unlink()
        written.append(DEFAULT_EDITOR)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxcontrol.demo install RUNS`: copy the trained exports into jaxcontrol/assets/."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m jaxcontrol.demo", description=main.__doc__)
    ap.add_argument("command", choices=("install",))
    ap.add_argument("runs", help="the runs folder of configs/embedded.py (runs/embedded)")
    args = ap.parse_args(argv)
    for p in install(args.runs):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        print(f"installed {p} ({size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
