#!/usr/bin/env python
"""Teach the embedded model a colour it never saw (teal), once with each method: textual
inversion, DreamBooth without and with prior preservation, and LoRA (tables + a sample grid).

    python benchmarks/personalization.py                          # runs/personalization, 64 held-out outlines
    python benchmarks/personalization.py --out docs/results       # + personalization_results.md / _samples.png
    python benchmarks/personalization.py --tiny                   # a few steps and images (a smoke run)

The training set is 16 images drawn like fill50k's: a teal (0, 128, 128) circle on a background of
the basic palette (each background in turn), captioned "WORD circle with <background> background", WORD being the new word
"<teal>" for textual inversion and the rare token "k" for DreamBooth and LoRA (which add no word). Each method runs
train.py's task on the embedded model (`jaxcontrol/assets/default_model`) with the settings in
`METHODS`; DreamBooth's prior preservation uses class images that the base model generates from
the basic palette's own captions. Then, on held-out fill50k outlines with the embedded ControlNet:

- "teal named": how often "WORD circle with X background" gives a circle whose colour is nearest
  to teal among the basic palette plus teal (read inside the known circle), background right too;
- "known colours": the colour accuracy (circle and background) of the held-out captions
  themselves, which fine-tuning must not destroy (prior preservation's purpose);
- the wall time of each training run on this machine (the first run with prior preservation also
  generates the class images);
- a first row that is no method, the ceiling the autoencoder sets (`round_trip`): the target
  images (a teal circle on each held-out outline and background; the held-out images for the known
  colours) through the embedded VAE and read the same way. The methods change the text encoder
  and the U-Net, never the VAE, which was trained for the basic palette and shows teal right on
  only about 80% of them.

"LoRA + prior" is task dreambooth with `use_lora`: LoRA factors with DreamBooth's prior loss. The
"K/V" rows put the factors on the cross-attention's key and value projections only; "new word"
trains a new word's embedding with them (pivotal tuning) in place of the text encoder's LoRA.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxcontrol import demo, evaluation as ev  # noqa: E402
from jaxcontrol.data.fill50k import BASIC_COLORS, caption, color_pairs, draw_circle, fill50k_example  # noqa: E402

TEAL = ("teal", (0, 128, 128))
RESOLUTION = 64
# Textual inversion adds its own word. DreamBooth and LoRA add none (as in diffusers): their word is
# a rare token of the model's vocabulary, "k" (one token, never a word of fill50k's captions), as
# DreamBooth's "sks"; a new string such as "<teal>" would tokenize into characters and unknown tokens.
RARE = "k"

CLASS_IMAGES = 180  # two per class prompt
# method -> (task, the word its captions use, config overrides); common settings in `config_for`
LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2")
KV_MODULES = ("attn2.to_k", "attn2.to_v")
# a cosine decay and an EMA of the factors (exported): the last step's weights of a constant rate
# moved the scores by up to 25 points between runs of 1200 and 2400 steps
SMOOTH = {"optim.schedule": "cosine", "optim.ema_decay": 0.99}
METHODS = {
    "textual inversion": ("textual_inversion", "<teal>", {
        "textual_inversion.placeholder_token": "<teal>", "textual_inversion.initializer_token": "cyan",
        "textual_inversion.num_vectors": 2, "optim.learning_rate": 5e-3, "optim.weight_decay": 0.0, "steps": 600}),
    "DreamBooth": ("dreambooth", RARE, {"optim.learning_rate": 2e-4, "steps": 600}),
    "DreamBooth + prior": ("dreambooth", RARE, {
        "optim.learning_rate": 2e-4, "steps": 600, "dreambooth.with_prior_preservation": True,
        "dreambooth.prior_loss_weight": 1.0, "dreambooth.num_class_images": CLASS_IMAGES}),
    "LoRA": ("lora", RARE, {"lora.rank": 8, "lora.unet_target_modules": LORA_MODULES, "lora.text_encoder": True,
                            "optim.learning_rate": 2e-3, "steps": 600}),
    "LoRA + prior": ("dreambooth", RARE, {
        "dreambooth.use_lora": True, "dreambooth.train_text_encoder": True, "lora.rank": 8,
        "lora.unet_target_modules": LORA_MODULES, "optim.learning_rate": 2e-3, "steps": 600,
        "dreambooth.with_prior_preservation": True, "dreambooth.prior_loss_weight": 1.0,
        "dreambooth.num_class_images": CLASS_IMAGES}),
    # LoRA on the cross-attention's key and value projections only, the layers through which the text
    # reaches the U-Net (Custom Diffusion's choice, Kumari et al. 2023), with the text encoder's LoRA
    "K/V LoRA + prior": ("dreambooth", RARE, {
        "dreambooth.use_lora": True, "dreambooth.train_text_encoder": True, "lora.rank": 8,
        "lora.unet_target_modules": KV_MODULES, "optim.learning_rate": 2e-3, "steps": 1200, **SMOOTH,
        "dreambooth.with_prior_preservation": True, "dreambooth.prior_loss_weight": 1.0,
        "dreambooth.num_class_images": CLASS_IMAGES}),
    # the same with a new word whose embedding trains with the factors instead of the text encoder's
    # LoRA (pivotal tuning; with K/V and a prior, Custom Diffusion's recipe)
    "K/V LoRA + new word + prior": ("dreambooth", "<teal>", {
        "dreambooth.use_lora": True, "lora.rank": 8, "lora.unet_target_modules": KV_MODULES,
        "textual_inversion.placeholder_token": "<teal>", "textual_inversion.initializer_token": "cyan",
        "textual_inversion.num_vectors": 2, "optim.learning_rate": 2e-3, "steps": 1200, **SMOOTH,
        "dreambooth.with_prior_preservation": True, "dreambooth.prior_loss_weight": 1.0,
        "dreambooth.num_class_images": CLASS_IMAGES}),
}


def training_set(folder: Path, word: str, n: int = 16, seed: int = 11) -> Path:
    """`n` teal circles on basic-palette backgrounds (and 4 more for validation), captioned
    "`word` circle with X background", as manifests (the same images for every word)."""
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    backgrounds = [c for c in BASIC_COLORS if np.linalg.norm(np.subtract(c[1], TEAL[1])) >= 90]
    rng = np.random.default_rng(seed)
    lines = {"train": [], "validation": []}
    for split, count in (("train", n), ("validation", 4)):
        for i in range(count):  # every background in turn, so that no background is missing
            name, rgb = backgrounds[(i + (3 if split == "validation" else 0)) % len(backgrounds)]
            r = float(rng.uniform(0.08, 0.35)) * RESOLUTION
            cx, cy = (float(rng.uniform(r, RESOLUTION - r)) for _ in range(2))
            image, _ = draw_circle(RESOLUTION, (cx, cy), r, TEAL[1], rgb)
            path = folder / f"{split}_{i:02d}.png"
            Image.fromarray(image).save(path)
            lines[split].append(json.dumps({"image": path.name, "text": caption(word, name)}))
    tag = "".join(ch for ch in word if ch.isalnum())
    for split, rows in lines.items():
        (folder / f"{split}_{tag}.jsonl").write_text("\n".join(rows) + "\n")
    return folder / f"train_{tag}.jsonl", folder / f"validation_{tag}.jsonl"


def class_prompts() -> str:
    """Every caption of the basic palette (fill50k's own: 90 circle / background pairs), one per
    line: the class the prior keeps. (A sample of 32 of them kept the known colours less well: the
    pairs it left out drifted.)"""
    return "\n".join(caption(BASIC_COLORS[i][0], BASIC_COLORS[j][0]) for i, j in color_pairs(BASIC_COLORS))


def config_for(task: str, overrides: dict, manifests: tuple[Path, Path], tiny: bool, class_dir: Path):
    from jaxcontrol.training import default_config

    c = default_config()
    c.task = task
    c.model.init = "pretrained"
    c.model.pretrained_path = str(demo.DEFAULT_MODEL)
    c.data.dataset = "folder"
    c.data.train_manifest, c.data.validation_manifest = map(str, manifests)
    c.data.resolution = RESOLUTION
    c.data.read_threads = 2
    c.batch_size = 8
    c.optim.warmup_steps = 20
    c.log.every = 50
    c.log.progress_bar = False
    c.log.tensorboard = False
    c.checkpoint.every = 1000
    c.checkpoint.keep = 1
    c.validation.num_images = 4
    c.validation.guidance_scale = demo.DEMO_GUIDANCE
    c.export.diffusers = False
    c.dreambooth.instance_prompt = ""  # the captions name the background too
    c.dreambooth.class_prompt = class_prompts()
    c.dreambooth.class_data_dir = str(class_dir)  # generated once, shared by the runs with prior preservation
    c.dreambooth.class_guidance_scale = demo.DEMO_GUIDANCE
    c.dreambooth.class_num_inference_steps = demo.DEMO_STEPS
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    if tiny:
        c.steps = 4
        c.dreambooth.num_class_images = 8
        c.dreambooth.class_num_inference_steps = 2
        c.optim.warmup_steps = 0
    return c


def pipeline_for(method: str, summary: dict):
    """The embedded pipeline (with its ControlNet) carrying what `method` trained."""
    exported = summary["exported"] if summary else {}
    if method == "base":
        return demo.load_embedded()
    if "textual_inversion" not in exported and "lora" not in exported:
        return demo.load_embedded(model=exported["jaxcontrol/pipeline"])
    pipe = demo.load_embedded()
    if "textual_inversion" in exported:
        pipe.load_textual_inversion(exported["textual_inversion"])
    if "lora" in exported:
        pipe.load_lora(exported["lora"])
        pipe.fuse_loras()
    return pipe


def generate(pipe, prompts, conds, *, steps: int, seed: int, batch: int, cfg: float) -> np.ndarray:
    from jaxcontrol.pipeline import AdapterInput, ControlInput

    out = []
    for i in range(0, len(prompts), batch):
        sl = slice(i, i + batch)
        cond = conds[sl]
        out.append(pipe(prompts[sl], height=RESOLUTION, width=RESOLUTION, num_inference_steps=steps,
                        guidance_scale=cfg, seed=seed, image_indices=list(range(i, i + len(cond))),
                        controls=[ControlInput(cond, 1.0)],
                        adapters=[AdapterInput(cond, 0.0)] if pipe.adapters else []))
    return np.concatenate(out)


def judge(examples, teal: np.ndarray, known: np.ndarray, color=TEAL) -> dict:
    """Colour accuracy of images (B, H, W, 3) uint8 on `examples`' circles: `teal` meant to show a
    circle of the new `color` ((name, rgb), teal by default) on each example's background, `known`
    each example's own caption. The new colour is read against the basic palette plus itself."""
    centers = np.asarray([e.center for e in examples])
    radii = np.asarray([e.radius for e in examples])
    palette = tuple(BASIC_COLORS) + (color,)
    circle, background = ev.region_colors(teal, centers, radii)
    named = np.asarray(ev.nearest_color(np.nan_to_num(circle), palette)) == color[0]
    bg_ok = np.asarray(ev.nearest_color(np.nan_to_num(background), palette)) == np.asarray(
        [e.background_color for e in examples])
    kc, kb = ev.region_colors(known, centers, radii)
    k_ok = (np.asarray(ev.nearest_color(np.nan_to_num(kc), BASIC_COLORS)) == [e.circle_color for e in examples]) & (
        np.asarray(ev.nearest_color(np.nan_to_num(kb), BASIC_COLORS)) == [e.background_color for e in examples])
    return {"teal_circle": float(named.mean()), "teal_both": float((named & bg_ok).mean()),
            "known": float(k_ok.mean())}


def scores(pipe, word: str, examples, conds, *, steps: int, seed: int, batch: int,
           cfg: float) -> tuple[dict, np.ndarray]:
    teal = generate(pipe, [caption(word, e.background_color) for e in examples], conds,
                    steps=steps, seed=seed, batch=batch, cfg=cfg)
    known = generate(pipe, [e.caption for e in examples], conds, steps=steps, seed=seed, batch=batch, cfg=cfg)
    return judge(examples, teal, known), teal


def round_trip(pipe, examples, color=TEAL) -> tuple[dict, np.ndarray]:
    """The autoencoder's ceiling: the images a method would have to reproduce (a circle of the new
    `color`, (name, rgb), drawn on each held-out outline and background; the held-out images
    themselves for the known colours), through the embedded VAE (`control_fidelity.vae_roundtrip`),
    scored as samples are. None of the methods changes the VAE, so a U-Net that reproduced the
    training images' latents exactly would score this."""
    from control_fidelity import vae_roundtrip

    rgb = dict(BASIC_COLORS)
    teal = vae_roundtrip(pipe, np.stack([draw_circle(RESOLUTION, e.center, e.radius, color[1], rgb[e.background_color])[0]
                                         for e in examples]))
    return judge(examples, teal, vae_roundtrip(pipe, np.stack([e.image for e in examples])), color), teal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/personalization")
    ap.add_argument("--num", type=int, default=64, help="held-out outlines (default 64)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=demo.DEMO_STEPS, help="sampling steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=demo.DEMO_GUIDANCE, help="classifier-free guidance scale")
    ap.add_argument("--data-seed", type=int, default=7, help="fill50k seed of the held-out outlines")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="which methods (default all)")
    ap.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    ap.add_argument("--out", help="folder for personalization_results.md and personalization_samples.png")
    ap.add_argument("--tiny", action="store_true", help="4 training steps, 4 outlines, 2 sampling steps")
    args = ap.parse_args(argv)
    if args.tiny:
        args.num, args.batch, args.steps = 4, 4, 2
    from jaxcontrol.training import train

    work = Path(args.workdir)
    examples = [fill50k_example(i, split="validation", seed=args.data_seed, image_size=RESOLUTION, colors="basic")
                for i in range(args.num)]
    conds = np.stack([e.condition for e in examples]).astype(np.float32) / 255.0
    rows, samples = [], {}
    for method in ["base"] + list(args.methods):
        summary, seconds, word = None, None, RARE
        if method != "base":
            task, word, overrides = METHODS[method]
            run_dir = work / method.replace(" + ", "_").replace(" ", "_")
            done = run_dir / "summary.json"
            if args.retrain and run_dir.exists():
                shutil.rmtree(run_dir)
            if done.is_file():
                summary = json.loads(done.read_text())
            else:
                t0 = time.perf_counter()
                manifests = training_set(work / "data", word)
                summary = train(config_for(task, overrides, manifests, args.tiny, work / "class_images"), run_dir)
                summary["seconds"] = time.perf_counter() - t0
                done.write_text(json.dumps(summary, indent=1))
            seconds = summary["seconds"]
        pipe = pipeline_for(method, summary)
        if method == "base":
            ceiling, samples["autoencoder round trip"] = round_trip(pipe, examples)
            print(f"autoencoder round trip: {ceiling}", flush=True)
        s, teal = scores(pipe, word, examples, conds, steps=args.steps, seed=args.seed, batch=min(args.batch, args.num),
                         cfg=args.cfg)
        samples[method] = teal
        rows.append((method, word, s, seconds))
        print(f"{method}: {s} ({seconds and round(seconds)} s of training)", flush=True)
    base_known = rows[0][2]["known"]
    md = [f"Held-out set: {args.num} fill50k outlines (palette `basic`, data seed {args.data_seed}) with the embedded "
          f"ControlNet at scale 1.0, {args.steps} steps, CFG {args.cfg:g}, seed {args.seed}. Training: 16 "
          f"images of a teal circle captioned \"WORD circle with X background\", batch 8 at {RESOLUTION} px.", "",
          "| method | WORD | teal named (circle) | teal + background | known colours | vs before | training time |",
          "|---|---|---|---|---|---|---|",
          f"| autoencoder round trip (ceiling: the target images through the VAE) | - | {ceiling['teal_circle']:.1%} | "
          f"{ceiling['teal_both']:.1%} | {ceiling['known']:.1%} | - | - |"]
    for method, word, s, seconds in rows:
        md.append(f"| {method} | `{word}` | {s['teal_circle']:.1%} | {s['teal_both']:.1%} | {s['known']:.1%} | "
                  f"{s['known'] / max(base_known, 1e-9):.0%} | {'-' if seconds is None else f'{seconds / 60:.1f} min'} |")
    md += ["", "Settings: " + "; ".join(f"{m}: task {t}, " + ", ".join(f"{k}={v}" for k, v in o.items())
                                       for m, (t, _, o) in METHODS.items() if m in args.methods)]
    text = "\n".join(md)
    print(text)
    if args.out:
        from jaxcontrol.atomic import atomic_file
        from jaxcontrol.images import make_grid, save_png

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "personalization_results.md", "w") as f:
            f.write(text + "\n")
        k = min(8, args.num)
        save_png(make_grid(list(np.concatenate([images[:k] for images in samples.values()])), columns=k),
                 out / "personalization_samples.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
