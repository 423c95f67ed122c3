#!/usr/bin/env python
"""Control fidelity of the embedded model on held-out fill50k conditions (tables + plots).

    python benchmarks/control_fidelity.py                       # the embedded model, 64 held-out examples
    python benchmarks/control_fidelity.py --runs runs/embedded --out docs/results   # + the training-step plot
    python benchmarks/control_fidelity.py --tiny                # 2 examples, 2 steps, short sweeps (seconds)

Held-out set: fill50k examples of the "basic" palette drawn with a seed the training never used
(`--data-seed`), so every circle (centre, radius) is new; the prompts are the same 90 colour
pairs the model was trained on (there are no others). Each image is generated from its prompt
and its condition outline; metrics (jaxcontrol.evaluation):

- edge IoU: Canny edges of the image against the condition outline, 1-pixel tolerance;
- Chamfer: symmetric Chamfer distance between them, in pixels (lower is better);
- colour accuracy: the background and circle colours read off the image, named by the nearest
  palette colour, both equal to the prompt's.

Tables: no control / ControlNet / T2I-Adapter / both; ControlNet conditioning scale 0 to 1.5;
CFG scale 0 to 8 (the CFG paper's w is scale - 1: 0 is the unconditional model, 1 no guidance).
With `--runs`, the ControlNet snapshots the training exported every 100 steps
(configs/embedded.py) give the plot of fidelity against training step (the ControlNet paper's
"sudden convergence"); step 0 is the no-control row, since a ControlNet's zero convolutions add
nothing before training. `--out` writes
the tables (Markdown), the plots and a sample grid there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxcontrol import demo, evaluation as ev  # noqa: E402
from jaxcontrol.data.fill50k import BASIC_COLORS, fill50k_example  # noqa: E402

CN_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
CFG_SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)  # 0: the unconditional model (empty prompts)


def held_out(n: int, seed: int, size: int) -> list:
    return [fill50k_example(i, split="validation", seed=seed, image_size=size, colors="basic") for i in range(n)]


class Evaluator:
    def __init__(self, pipe, examples, *, steps: int, seed: int, batch: int):
        self.pipe, self.examples, self.steps, self.seed, self.batch = pipe, examples, steps, seed, batch
        self.prompts = [e.caption for e in examples]
        self.conds = np.stack([e.condition for e in examples]).astype(np.float32) / 255.0
        self.outline = ev.outline_mask(self.conds)
        self.size = examples[0].image.shape[0]
        self.calls = 0
        self.seconds = 0.0

    def images(self, cn: float, ad: float, cfg: float) -> np.ndarray:
        """Samples at ControlNet scale `cn`, adapter scale `ad` and CFG scale `cfg`. CFG 0 is
        uncond + 0 * (cond - uncond): the empty prompt's prediction alone (diffusers' pipelines treat
        every scale <= 1 as 1, so it is run as the empty prompt without guidance)."""
        from jaxcontrol.pipeline import AdapterInput, ControlInput

        prompts = [""] * len(self.prompts) if cfg == 0 else self.prompts
        cfg = 1.0 if cfg == 0 else cfg
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(prompts), self.batch):
            sl = slice(i, i + self.batch)
            cond = self.conds[sl]
            out.append(self.pipe(prompts[sl], height=self.size, width=self.size, num_inference_steps=self.steps,
                                 guidance_scale=cfg, seed=self.seed, image_indices=list(range(i, i + len(cond))),
                                 controls=[ControlInput(cond, cn)],
                                 adapters=[AdapterInput(cond, ad)] if self.pipe.adapters else []))
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return np.concatenate(out)

    def metrics(self, images: np.ndarray) -> dict:
        edges = ev.edge_maps(images)
        acc = ev.color_accuracy(images, [e.circle_color for e in self.examples],
                                [e.background_color for e in self.examples], BASIC_COLORS)
        return {"edge_iou": float(ev.edge_iou(edges, self.outline).mean()),
                "chamfer": float(ev.chamfer_distance(edges, self.outline).mean()),
                "color_acc": float(acc["both"].mean()), "background_acc": float(acc["background"].mean()),
                "circle_acc": float(acc["circle"].mean())}

    def __call__(self, cn: float, ad: float, cfg: float) -> tuple[dict, np.ndarray]:
        images = self.images(cn, ad, cfg)
        return self.metrics(images), images


def vae_roundtrip(pipe, images: np.ndarray) -> np.ndarray:
    """uint8 images through the model's VAE (posterior mean) and back: the best a sample can look."""
    import jax

    from jaxcontrol.training.logger import to_uint8

    vae, params = pipe.vae, pipe.params["vae"]
    fn = jax.jit(lambda x: vae.apply({"params": params}, vae.apply({"params": params}, x, method=vae.encode)[
        ..., : vae.config.latent_channels], method=vae.decode))
    return to_uint8(fn(images.astype(np.float32) / 127.5 - 1.0))


def table(title: str, key: str, rows: list[tuple[str, dict]]) -> str:
    lines = [f"**{title}**", "", f"| {key} | edge IoU | Chamfer (px) | colour acc | background | circle |",
             "|---|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['edge_iou']:.3f} | {m['chamfer']:.2f} | {m['color_acc']:.1%} | "
                     f"{m['background_acc']:.1%} | {m['circle_acc']:.1%} |")
    return "\n".join(lines)


def plot(path: Path, xs, series: dict, xlabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax1.plot(xs, series["edge_iou"], "o-", color="tab:blue", label="edge IoU")
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("edge IoU", color="tab:blue")
    ax1.set_ylim(0, max(0.05, max(series["edge_iou"]) * 1.15))
    ax2 = ax1.twinx()
    ax2.plot(xs, series["color_acc"], "s--", color="tab:red", label="colour accuracy")
    ax2.set_ylabel("colour accuracy", color="tab:red")
    ax2.set_ylim(0, 1.05)
    ax1.set_title(title)
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def snapshot_steps(runs: Path) -> list[tuple[int, Path]]:
    base = runs / "controlnet" / "export"
    found = []
    for d in sorted((base / "steps").glob("*")) if (base / "steps").is_dir() else []:
        p = d / "jaxcontrol" / "controlnet"
        if d.name.isdigit() and p.is_dir():
            found.append((int(d.name), p))
    final = base / "jaxcontrol" / "controlnet"
    if found and final.is_dir():
        cfg = json.loads((runs / "controlnet" / "config.json").read_text())
        found.append((int(cfg["steps"]), final))
    return sorted(found)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base pipeline (default: the embedded model)")
    ap.add_argument("--controlnet", help="ControlNet (default: the embedded one)")
    ap.add_argument("--adapter", help="T2I-Adapter (default: the embedded one)")
    ap.add_argument("--num", type=int, default=64, help="held-out examples (default 64)")
    ap.add_argument("--batch", type=int, default=64, help="images per compiled call (default 64)")
    ap.add_argument("--steps", type=int, default=demo.DEMO_STEPS, help="sampling steps (default %(default)s)")
    ap.add_argument("--cfg", type=float, default=demo.DEMO_GUIDANCE, help="CFG scale of the first two tables")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--data-seed", type=int, default=7, help="fill50k seed of the held-out set (training used 0)")
    ap.add_argument("--runs", help="runs/embedded: also plot fidelity against ControlNet training step")
    ap.add_argument("--snapshot-stride", type=int, default=1, help="use every k-th snapshot (default all)")
    ap.add_argument("--out", help="folder for results.md, the plots and a sample grid")
    ap.add_argument("--tiny", action="store_true",
                    help="2 examples, 2 steps, sweeps of 2 ControlNet and 3 CFG scales: checks the script runs")
    args = ap.parse_args(argv)
    cn_scales, cfg_scales = ((0.0, 1.0), (0.0, 1.0, args.cfg)) if args.tiny else (CN_SCALES, CFG_SCALES)
    if args.tiny:
        args.num, args.batch, args.steps = 2, 2, 2

    import jax

    t_start = time.perf_counter()
    pipe = demo.load_embedded(model=args.model, controlnet=args.controlnet, adapter=args.adapter)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    examples = held_out(args.num, args.data_seed, size)
    evaluate = Evaluator(pipe, examples, steps=args.steps, seed=args.seed, batch=min(args.batch, args.num))
    out = Path(args.out) if args.out else None
    md = [f"Held-out set: {args.num} fill50k examples (palette `basic`, data seed {args.data_seed}), {size}x{size} px, "
          f"{args.steps} steps of the model's solver ({pipe.scheduler_config.class_name}), sampling seed {args.seed}; "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s)."]

    truth = np.stack([e.image for e in examples])
    rows, samples = [("training images (reference)", evaluate.metrics(truth)),
                     ("their VAE reconstructions (reference)", evaluate.metrics(vae_roundtrip(pipe, truth)))], {}
    modes = [("no control", 0.0, 0.0), ("ControlNet", 1.0, 0.0)]
    if pipe.adapters:
        modes += [("T2I-Adapter", 0.0, 1.0), ("ControlNet + T2I-Adapter", 1.0, 1.0)]
    else:
        md.append("\nNo T2I-Adapter is loaded: its rows are left out.")
    for name, cn, ad in modes:
        m, imgs = evaluate(cn, ad, args.cfg)
        rows.append((name, m))
        samples[name] = imgs
        print(f"{name}: {m}", flush=True)
    md += ["", table(f"Control (CFG {args.cfg:g}, scales 1.0)", "control", rows)]
    no_control = dict(rows)["no control"]
    base_iou, cn_iou = no_control["edge_iou"], dict(rows)["ControlNet"]["edge_iou"]
    md.append(f"\nControlNet edge IoU / no-control edge IoU = **{cn_iou / max(base_iou, 1e-9):.2f}x**.")

    rows = []
    for s in cn_scales:
        m, _ = evaluate(s, 0.0, args.cfg)
        rows.append((f"{s:g}", m))
        print(f"CN scale {s}: {m}", flush=True)
    md += ["", table(f"ControlNet conditioning scale (CFG {args.cfg:g})", "scale", rows)]
    cn_rows = rows

    rows = []
    for g in cfg_scales:
        m, _ = evaluate(1.0, 0.0, g)
        rows.append(("0 (empty prompt)" if g == 0 else f"{g:g}", m))
        print(f"CFG {g}: {m}", flush=True)
    md += ["", table("CFG scale (ControlNet at 1.0)", "CFG", rows)]
    cfg_rows = rows

    snap_rows = []
    if args.runs:
        snaps = snapshot_steps(Path(args.runs))[:: max(1, args.snapshot_stride)]
        if not snaps:
            print(f"no ControlNet snapshots under {args.runs}/controlnet/export: skipping the training-step plot")
        from jaxcontrol.convert import load_model

        original = pipe.params["controlnets"][0]
        if snaps:
            snap_rows.append(("0", no_control))  # zero convolutions: exactly no control
        for step, path in snaps:
            _, params = load_model(path)
            pipe.params["controlnets"][0] = jax.device_put(params, jax.tree_util.tree_leaves(original)[0].sharding)
            m, _ = evaluate(1.0, 0.0, args.cfg)
            snap_rows.append((str(step), m))
            print(f"ControlNet at step {step}: {m}", flush=True)
        pipe.params["controlnets"][0] = original
        if snap_rows:
            md += ["", table(f"ControlNet training step (scale 1.0, CFG {args.cfg:g})", "step", snap_rows)]

    md.append(f"\n{evaluate.calls} evaluations of {args.num} images, {evaluate.seconds:.0f} s of sampling "
              f"(compiles included); {time.perf_counter() - t_start:.0f} s in all.")
    text = "\n".join(md)
    print("\n" + text)
    if out:
        from jaxcontrol.images import make_grid, save_png

        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".results.md.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / "results.md")
        k = min(8, args.num)
        cells = [np.round(evaluate.conds[i] * 255).astype(np.uint8) for i in range(k)]
        for name in samples:
            cells += list(samples[name][:k])
        save_png(np.asarray(make_grid(cells, columns=k)), out / "heldout_samples.png")
        plot(out / "cn_scale.png", [float(r[0]) for r in cn_rows],
             {k2: [r[1][k2] for r in cn_rows] for k2 in ("edge_iou", "color_acc")},
             "ControlNet conditioning scale", f"ControlNet scale sweep (CFG {args.cfg:g})")
        plot(out / "cfg_scale.png", list(cfg_scales),
             {k2: [r[1][k2] for r in cfg_rows] for k2 in ("edge_iou", "color_acc")},
             "CFG scale", "CFG sweep (ControlNet at 1.0)")
        if snap_rows:
            plot(out / "cn_training.png", [int(r[0]) for r in snap_rows],
                 {k2: [r[1][k2] for r in snap_rows] for k2 in ("edge_iou", "color_acc")},
                 "ControlNet training step", "Fidelity against ControlNet training step")
        print(f"wrote {out}/results.md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
