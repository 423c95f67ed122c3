#!/usr/bin/env python
"""Edit success of the embedded instruction editor on held-out fill50k edit triples (a table + a grid).

    python benchmarks/edit_fidelity.py                          # the embedded editor, 64 held-out triples
    python benchmarks/edit_fidelity.py --out docs/results       # + edit_results.md and edit_samples.png
    python benchmarks/edit_fidelity.py --tiny                   # 2 triples, 2 steps, 2 scale pairs (seconds)

Held-out set: edit triples (`jaxcontrol.data.fill50k.fill50k_edit_example`) of the "basic" palette
drawn with a seed the training never used (`--data-seed`): every circle is new; the instructions
are the training's ("make the circle red", "make the background white"). Each source image is
edited with its instruction (InstructPix2Pix guidance: text scale s_T, image scale s_I, diffusers'
three branches) and scored by `jaxcontrol.evaluation.edit_scores`, reading each region's colour
where the circle is known to be:

- edited: the part the instruction names has the wanted colour (nearest palette colour);
- kept: the other part still has its source colour;
- success: both; geometry: edge IoU of the output's Canny edges with the source circle's outline.

The sweep runs every (s_T, s_I) pair of `--text-scales` x `--image-scales`; "best" is the pair
with the highest success among those keeping the unedited part in >= 90% of the images.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxcontrol import demo, evaluation as ev  # noqa: E402
from jaxcontrol.data.fill50k import BASIC_COLORS, fill50k_edit_example, fill50k_example  # noqa: E402

TEXT_SCALES = (1.0, 2.0, 3.0, 5.0, 7.5)
IMAGE_SCALES = (1.0, 1.5, 2.0, 3.0, 5.0)
KEPT_BAR = 0.9


def held_out(n: int, seed: int, size: int) -> list:
    return [fill50k_edit_example(i, split="validation", seed=seed, image_size=size, colors="basic") for i in range(n)]


class Evaluator:
    def __init__(self, pipe, examples, *, steps: int, seed: int, batch: int, data_seed: int):
        self.pipe, self.examples, self.steps, self.seed, self.batch = pipe, examples, steps, seed, batch
        self.sources = np.stack([e.source for e in examples])
        self.instructions = [e.instruction for e in examples]
        size = self.sources.shape[1]
        conds = np.stack([fill50k_example(e.index, split="validation", seed=data_seed, image_size=size,
                                          colors="basic").condition for e in examples])
        self.outline = ev.outline_mask(conds)
        self.calls, self.seconds = 0, 0.0

    def images(self, text_scale: float, image_scale: float) -> np.ndarray:
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(self.examples), self.batch):
            sl = slice(i, i + self.batch)
            src = self.sources[sl]
            out.append(self.pipe(self.instructions[sl], init_image=src, num_inference_steps=self.steps,
                                 guidance_scale=text_scale, image_guidance_scale=image_scale, seed=self.seed,
                                 image_indices=list(range(i, i + len(src)))))
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return np.concatenate(out)

    def metrics(self, images: np.ndarray) -> dict:
        e = self.examples
        s = ev.edit_scores(images, [x.part for x in e], [x.edited_colors[0] for x in e],
                           [x.edited_colors[1] for x in e], np.asarray([x.center for x in e]),
                           np.asarray([x.radius for x in e]), BASIC_COLORS)
        iou = ev.edge_iou(ev.edge_maps(images), self.outline)
        return {"success": float(s["success"].mean()), "edited": float(s["edited"].mean()),
                "kept": float(s["kept"].mean()), "edge_iou": float(iou.mean())}


def table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| text scale s_T | image scale s_I | edit success | named part changed | other part kept | edge IoU |",
             "|---|---|---|---|---|---|"]
    for a, b, m in rows:
        lines.append(f"| {a} | {b} | {m['success']:.1%} | {m['edited']:.1%} | {m['kept']:.1%} | {m['edge_iou']:.3f} |")
    return "\n".join(lines)


def best(rows: list[tuple[float, float, dict]]) -> tuple[float, float, dict] | None:
    ok = [r for r in rows if r[2]["kept"] >= KEPT_BAR]
    return max(ok, key=lambda r: (r[2]["success"], r[2]["kept"])) if ok else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base pipeline (default: the embedded model)")
    ap.add_argument("--unet", help="InstructPix2Pix U-Net (default: the embedded editor's)")
    ap.add_argument("--num", type=int, default=64, help="held-out triples (default 64)")
    ap.add_argument("--batch", type=int, default=64, help="images per compiled call (default 64)")
    ap.add_argument("--steps", type=int, default=demo.DEMO_STEPS, help="sampling steps (default %(default)s)")
    ap.add_argument("--text-scales", type=float, nargs="+", default=TEXT_SCALES)
    ap.add_argument("--image-scales", type=float, nargs="+", default=IMAGE_SCALES)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--data-seed", type=int, default=7, help="fill50k seed of the held-out triples (training used 0)")
    ap.add_argument("--out", help="folder for edit_results.md and edit_samples.png")
    ap.add_argument("--tiny", action="store_true",
                    help="2 triples, 2 steps, scale pairs (1, 1.5) and (3, 1.5), in place of --num, --batch, --steps "
                         "and the scales: checks the script runs")
    args = ap.parse_args(argv)
    if args.tiny:
        args.num, args.batch, args.steps = 2, 2, 2
        args.text_scales, args.image_scales = [1.0, 3.0], [1.5]
    for flag, value in (("--num", args.num), ("--batch", args.batch), ("--steps", args.steps)):
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")
    for flag, values in (("--text-scales", args.text_scales), ("--image-scales", args.image_scales)):
        if not all(math.isfinite(v) and v >= 0 for v in values):
            ap.error(f"{flag} must be finite numbers >= 0, got {values}")

    import jax

    from jaxcontrol.errors import ConfigError

    t_start = time.perf_counter()
    try:
        pipe = demo.load_editor(model=args.model, unet=args.unet)
    except ConfigError as e:
        print(f"edit_fidelity.py: {e}", file=sys.stderr)
        return 2
    if pipe.kind != "instruct_pix2pix":
        print(f"edit_fidelity.py: the model is a {pipe.kind!r} model; edits need an InstructPix2Pix U-Net "
              "(8 input channels, --unet)", file=sys.stderr)
        return 2
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    examples = held_out(args.num, args.data_seed, size)
    evaluate = Evaluator(pipe, examples, steps=args.steps, seed=args.seed, batch=min(args.batch, args.num),
                         data_seed=args.data_seed)
    parts = sum(e.part == "circle" for e in examples)
    md = [f"Held-out set: {args.num} edit triples (palette `basic`, data seed {args.data_seed}; {parts} circle and "
          f"{args.num - parts} background edits), {size}x{size} px, {args.steps} steps of the model's solver "
          f"({pipe.scheduler_config.class_name}), sampling seed {args.seed}; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s).", ""]

    targets = np.stack([e.edited for e in examples])
    refs = [("source images (no edit)", evaluate.metrics(evaluate.sources)),
            ("edited images (reference)", evaluate.metrics(targets))]
    md += ["**References**", "", "| images | edit success | named part changed | other part kept | edge IoU |",
           "|---|---|---|---|---|"]
    md += [f"| {n} | {m['success']:.1%} | {m['edited']:.1%} | {m['kept']:.1%} | {m['edge_iou']:.3f} |" for n, m in refs]

    rows, samples = [], {}
    for s_t in args.text_scales:
        for s_i in args.image_scales:
            images = evaluate.images(s_t, s_i)
            m = evaluate.metrics(images)
            rows.append((s_t, s_i, m))
            samples[(s_t, s_i)] = images
            print(f"s_T {s_t:g} s_I {s_i:g}: {m}", flush=True)
    md += ["", "**Guidance sweep**", "", table([(f"{a:g}", f"{b:g}", m) for a, b, m in rows])]
    top = best(rows)
    if top is None:
        md.append(f"\nNo scale pair keeps the unedited part in >= {KEPT_BAR:.0%} of the images.")
    else:
        md.append(f"\nBest (highest success with the other part kept >= {KEPT_BAR:.0%}): s_T {top[0]:g}, s_I "
                  f"{top[1]:g}: **edit success {top[2]['success']:.1%}**, other part kept {top[2]['kept']:.1%}.")
    md.append(f"\n{evaluate.calls} evaluations of {args.num} images, {evaluate.seconds:.0f} s of sampling "
              f"(compiles included); {time.perf_counter() - t_start:.0f} s in all.")
    text = "\n".join(md)
    print("\n" + text)
    if args.out:
        from jaxcontrol.images import make_grid, save_png

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".edit_results.md.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / "edit_results.md")
        k = min(8, args.num)
        key = (top[0], top[1]) if top else (rows[-1][0], rows[-1][1])
        cells = list(evaluate.sources[:k]) + list(samples[key][:k]) + list(targets[:k])
        save_png(np.asarray(make_grid(cells, columns=k)), out / "edit_samples.png")
        print(f"wrote {out}/edit_results.md and edit_samples.png (rows: source, edit at s_T {key[0]:g} s_I "
              f"{key[1]:g}, reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
