#!/usr/bin/env python
"""Self-Attention and Perturbed-Attention Guidance on the embedded model, and the compile cost of
attention-guided samplers (tables + a sample grid).

    python benchmarks/attention_guidance.py                       # 64 held-out examples
    python benchmarks/attention_guidance.py --out docs/results    # + attention_results.md, attention_samples.png
    python benchmarks/attention_guidance.py --tiny                # 2 examples, 2 steps (seconds)

Each row generates the held-out fill50k examples of benchmarks/control_fidelity.py (same prompts,
seeds and, with the ControlNet, the same condition outlines) with the embedded model at the demo's
CFG scale, adding SAG (`sag_scale`) and / or PAG (`pag_scale`, diffusers' default layer "mid").
Metrics (jaxcontrol.evaluation, and one here):

- colour accuracy: background and circle colours read off the image equal the prompt's;
- edge IoU: Canny edges against the condition outline (1-pixel tolerance), ControlNet rows;
- sharpness: the mean magnitude of the image's Laplacian (grey levels per pixel), the quantity SAG
  and PAG claim to raise; the held-out training images give its reference value.

Then the compile time of a jitted sampler with CFG + SAG + PAG (and with Attend-and-Excite on
top) at 20 and 50 steps, as a ratio measured in one run: `lax.scan` makes the program the same
size whatever the step count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from control_fidelity import held_out  # noqa: E402

from jaxcontrol import demo, evaluation as ev  # noqa: E402
from jaxcontrol.data.fill50k import BASIC_COLORS  # noqa: E402

ROWS = (("CFG only", 0.0, 0.0), ("SAG 0.75", 0.75, 0.0), ("SAG 1.5", 1.5, 0.0), ("PAG 1.5", 0.0, 1.5),
        ("PAG 3.0", 0.0, 3.0), ("SAG 0.75 + PAG 1.5", 0.75, 1.5))


def sharpness(images: np.ndarray) -> np.ndarray:
    """Mean |Laplacian| of each image's grey levels (0-255), one value per image."""
    g = images.astype(np.float64).mean(axis=-1)
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return np.abs(lap).mean(axis=(1, 2))


def metrics(images: np.ndarray, examples, outline) -> dict:
    acc = ev.color_accuracy(images, [e.circle_color for e in examples], [e.background_color for e in examples],
                            BASIC_COLORS)
    out = {"color_acc": float(acc["both"].mean()), "sharpness": float(sharpness(images).mean())}
    if outline is not None:
        out["edge_iou"] = float(ev.edge_iou(ev.edge_maps(images), outline).mean())
    return out


def generate(pipe, examples, conds, *, control: bool, sag: float, pag: float, steps: int, cfg: float, seed: int,
             batch: int) -> np.ndarray:
    from jaxcontrol.pipeline import AdapterInput, ControlInput

    prompts = [e.caption for e in examples]
    size = examples[0].image.shape[0]
    out = []
    for i in range(0, len(prompts), batch):
        sl = slice(i, i + batch)
        cond = conds[sl]
        out.append(pipe(prompts[sl], height=size, width=size, num_inference_steps=steps, guidance_scale=cfg, seed=seed,
                        image_indices=list(range(i, i + len(cond))),
                        controls=[ControlInput(cond, 1.0 if control else 0.0)],
                        adapters=[AdapterInput(cond, 0.0)] if pipe.adapters else [], sag_scale=sag, pag_scale=pag))
    return np.concatenate(out)


def compile_seconds(pipe, steps: int, *, excite: bool, size: int) -> float:
    """Seconds to lower and compile the jitted CFG + SAG + PAG sampler (+ Attend-and-Excite) for
    `steps` DDIM steps, one image of the embedded model (no compile cache)."""
    import jax
    import jax.numpy as jnp

    from jaxcontrol import guidance as G
    from jaxcontrol.pipeline import encode_prompt
    from jaxcontrol.sampler import initial_latents, sample
    from jaxcontrol.schedulers import make_plan

    plan = make_plan(pipe.scheduler_config, steps, "ddim")
    (cn, cp), = pipe.controlnets
    base = G.unet_prediction(pipe.unet, pipe.params["unet"], controlnets=[G.ControlNetUnit(cn, cp)])
    rule = G.attention_guided(base, 5.0, [G.SAG(0.75, plan), G.PAG(1.5)])
    if excite:
        rule = G.attend_and_excite(base, rule, max_iter_to_alter=steps // 2)
    f = pipe.vae_scale_factor
    h = size // f
    text = encode_prompt(pipe.text_encoder, pipe.params["text_encoder"], pipe.token_ids(["a red circle"]), None)
    image = jnp.zeros((1, size, size, 3))
    cond = {"cond": {"text": text, "control": (image,)}, "uncond": {"text": text, "control": (image,)},
            "excite": jnp.asarray(G.token_mask([2], 1, text.shape[1]))}
    fn = jax.jit(lambda x: sample(rule, plan, initial_latents(plan, x), cond))
    t0 = time.perf_counter()
    fn.lower(jnp.zeros((1, h, h, pipe.latent_channels))).compile()
    return time.perf_counter() - t0


def table(title: str, rows: list[tuple[str, dict]], control: bool) -> str:
    head = "| guidance | colour acc | sharpness |" + (" edge IoU |" if control else "")
    lines = [f"**{title}**", "", head, "|---|---|---|" + ("---|" if control else "")]
    for name, m in rows:
        lines.append(f"| {name} | {m['color_acc']:.1%} | {m['sharpness']:.2f} |"
                     + (f" {m['edge_iou']:.3f} |" if control else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=64, help="held-out examples (default 64)")
    ap.add_argument("--batch", type=int, default=32, help="images per compiled call (default 32)")
    ap.add_argument("--steps", type=int, default=demo.DEMO_STEPS, help="sampling steps (default %(default)s)")
    ap.add_argument("--cfg", type=float, default=demo.DEMO_GUIDANCE, help="CFG scale (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=7, help="fill50k seed of the held-out set (training used 0)")
    ap.add_argument("--out", help="folder for attention_results.md and attention_samples.png")
    ap.add_argument("--tiny", action="store_true", help="2 examples, 2 steps, 3 rows, compile 2 and 5 steps")
    args = ap.parse_args(argv)
    rows = ROWS
    compile_steps = (20, 50)
    if args.tiny:
        args.num, args.batch, args.steps = 2, 2, 2
        rows, compile_steps = ROWS[:1] + ROWS[1:2] + ROWS[3:4], (2, 5)

    import jax

    pipe = demo.load_embedded()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    examples = held_out(args.num, args.data_seed, size)
    conds = np.stack([e.condition for e in examples]).astype(np.float32) / 255.0
    outline = ev.outline_mask(conds)
    truth = np.stack([e.image for e in examples])
    md = [f"Held-out set: {args.num} fill50k examples (palette `basic`, data seed {args.data_seed}), {size}x{size} px, "
          f"{args.steps} steps of the model's solver ({pipe.scheduler_config.class_name}), CFG {args.cfg}, sampling "
          f"seed {args.seed}; {jax.device_count()} {jax.devices()[0].platform} device(s). PAG perturbs the mid "
          "block's self-attention (diffusers' default).", ""]
    samples = {}
    t0 = time.perf_counter()
    for control in (False, True):
        results = [("training images (reference)", metrics(truth, examples, outline if control else None))]
        for name, sag, pag in rows:
            imgs = generate(pipe, examples, conds, control=control, sag=sag, pag=pag, steps=args.steps, cfg=args.cfg,
                            seed=args.seed, batch=min(args.batch, args.num))
            results.append((name, metrics(imgs, examples, outline if control else None)))
            samples[(control, name)] = imgs
            print(f"{'ControlNet' if control else 'text only'} / {name}: {results[-1][1]}", flush=True)
        title = "With the embedded ControlNet (scale 1.0)" if control else "Text only (no control)"
        md += [table(title, results, control), ""]
    sample_seconds = time.perf_counter() - t0

    compile_rows = []
    for excite in (False, True):
        secs = [compile_seconds(pipe, n, excite=excite, size=size) for n in compile_steps]
        compile_rows.append(("CFG + SAG + PAG + ControlNet" + (" + Attend-and-Excite" if excite else ""), secs))
    md += ["**Compile time of the jitted sampler (one image, no compile cache)**", "",
           f"| rule | {compile_steps[0]} steps (s) | {compile_steps[1]} steps (s) | ratio |", "|---|---|---|---|"]
    for name, (a, b) in compile_rows:
        md.append(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    md += ["", f"Sampling took {sample_seconds:.0f} s in all."]
    text = "\n".join(md)
    print(text)
    if args.out:
        from jaxcontrol.atomic import atomic_file
        from jaxcontrol.images import make_grid, save_png

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "attention_results.md", "w") as f:
            f.write(text + "\n")
        k = min(8, args.num)
        grid = [samples[(False, name)][:k] for name, _, _ in rows]
        save_png(make_grid(list(np.concatenate(grid)), columns=k), out / "attention_samples.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
