"""Text-to-image with ControlNets, T2I-Adapters and guidance (a thin CLI over jaxcontrol.pipeline).

Examples:
  # Stable Diffusion 1.5 + a canny ControlNet, weights on disk
  python infer.py --model ./stable-diffusion-v1-5 --prompt "a bird on a branch" \\
      --controlnet ./sd-controlnet-canny --control-image bird.png --preprocess canny \\
      --steps 20 --scheduler dpmpp_2m --num-images 4 --output out/

  # the embedded demo model (no --model): its ControlNet takes a circle outline
  python infer.py --prompt "red circle with white background" --control-image outline.png

  # the demo grid (condition | no control | ControlNet | T2I-Adapter | both, and a CFG sweep)
  python infer.py --demo --output outputs/demo

  # two ControlNets with their own scales and windows, plus a T2I-Adapter
  python infer.py --model sd15 --prompt "a house" \\
      --controlnet cn_depth --control-image depth.png --control-scale 0.8 --control-end 0.6 \\
      --controlnet cn_pose --control-image pose.png --control-scale 1.0 \\
      --adapter t2i_sketch --adapter-image sketch.png --adapter-scale 0.7

It writes one PNG per image, a contact-sheet grid and a JSON sidecar per image with every setting,
the seed and the image index (`--seed S --image-indices i` regenerates image i). Nothing is
written unless every image came out finite.

Exit codes: 0 success; 1 runtime error (an unreadable model, NaN or infinite values while
sampling, a size that cannot fit in memory); 2 usage error (a flag out of range, a missing or
unreadable input file); 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

SOLVER_CHOICES = ("ddim", "ddpm", "pndm", "plms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras",
                  "unipc", "lcm")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--model", help="a diffusers pipeline folder, an LDM single file, or a jaxcontrol checkpoint "
                                   "(default: the embedded demo model, jaxcontrol/assets/; then --control-image "
                                   "and --adapter-image without --controlnet / --adapter use its ControlNet and "
                                   "T2I-Adapter)")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype of the U-Net, ControlNets, adapters and text encoder (default float32)")
    m.add_argument("--vae-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype of the VAE (default float32, also in bf16 mode)")
    m.add_argument("--attention", default="plain", choices=("plain", "dot_product"), help="attention kernel")
    m.add_argument("--unsafe-load-pickle", action="store_true",
                   help="allow arbitrary Python objects in .ckpt/.pth/.bin files: this runs code from the file; "
                        "only for files you trust")
    p = ap.add_argument_group("prompts")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default="", help="the negative prompt (unconditional branch of CFG)")
    c = ap.add_argument_group("ControlNet (repeat the group once per ControlNet)")
    c.add_argument("--controlnet", action="append", default=[], help="a ControlNet (diffusers folder or .pth file)")
    c.add_argument("--control-image", action="append", default=[],
                   help="its condition image (first those of the model folder's own ControlNets, if any)")
    c.add_argument("--control-scale", action="append", type=float, default=[],
                   help="controlnet_conditioning_scale (once for all, or once per ControlNet; default 1.0)")
    c.add_argument("--control-start", action="append", type=float, default=[],
                   help="control_guidance_start, fraction of steps (default 0.0)")
    c.add_argument("--control-end", action="append", type=float, default=[],
                   help="control_guidance_end, fraction of steps (default 1.0)")
    c.add_argument("--control-resize-mode", default="default", choices=("default", "crop", "fill"),
                   help="how control images are fitted to the output size: stretch (default), centre-crop, "
                        "or pad (diffusers' resize_mode)")
    c.add_argument("--guess-mode", action="store_true",
                   help="ControlNet guess mode (control on the conditional branch only, residual k of 13 scaled "
                        "by 10^((k-12)/12)); on by itself for ControlNets with global_pool_conditions (shuffle)")
    a = ap.add_argument_group("T2I-Adapter (repeat the group once per adapter)")
    a.add_argument("--adapter", action="append", default=[], help="a T2I-Adapter (diffusers folder or .pth file)")
    a.add_argument("--adapter-image", action="append", default=[], help="its condition image")
    a.add_argument("--adapter-scale", action="append", type=float, default=[],
                   help="adapter_conditioning_scale (once for all, or once per adapter; default 1.0)")
    a.add_argument("--adapter-factor", type=float, default=1.0,
                   help="adapter_conditioning_factor: the fraction of steps the adapters act on (default 1.0)")
    a.add_argument("--preprocess", default="none", choices=("none", "canny"),
                   help="turn control and adapter images into Canny edge maps first (JAX, on the device)")
    a.add_argument("--canny-low", type=int, default=100, help="Canny low threshold (default 100)")
    a.add_argument("--canny-high", type=int, default=200, help="Canny high threshold (default 200)")
    s = ap.add_argument_group("sampling")
    s.add_argument("--scheduler", choices=SOLVER_CHOICES,
                   help="solver (default: the model's own scheduler class)")
    s.add_argument("--steps", type=int, help="number of inference steps (default 30; --demo: 20)")
    s.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance scale (default 7.5; --demo: 5)")
    s.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance_rescale (Lin et al. 2023)")
    s.add_argument("--eta", type=float, default=0.0,
                   help="DDIM eta in [0, 1] (default 0); an error with any other solver")
    s.add_argument("--clip-skip", type=int, default=None, help="use the CLIP layer this many from the end")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    s.add_argument("--image-indices", help="comma-separated image indices to (re)generate, as in the sidecars")
    s.add_argument("--batch-size", type=int, default=4, help="images per compiled call (default 4)")
    s.add_argument("--height", type=int, help="image height in pixels (a multiple of 8; default: the model's)")
    s.add_argument("--width", type=int, help="image width in pixels (a multiple of 8; default: the model's)")
    e = ap.add_argument_group("editing and guidance")
    e.add_argument("--init-image", help="img2img / SDEdit start image")
    e.add_argument("--strength", type=float, default=0.8, help="img2img strength (default 0.8)")
    e.add_argument("--mask", help="inpainting mask (white = regenerate); needs --init-image")
    e.add_argument("--inpaint-method", default="partial", choices=("partial", "repaint"),
                   help="partial diffusion (default) or RePaint")
    e.add_argument("--repaint-jump-length", type=int, default=10)
    e.add_argument("--repaint-jump-n-sample", type=int, default=10)
    e.add_argument("--clip-guidance-scale", type=float, default=0.0,
                   help="CLIP guidance weight (needs --clip-model; default 0 = off)")
    e.add_argument("--clip-model", help="a transformers CLIPModel folder for CLIP guidance")
    e.add_argument("--clip-prompt", help="the text CLIP guidance steers toward (default: the prompt)")
    e.add_argument("--clip-cutouts", type=int, default=0, help="random cutouts per step for CLIP guidance")
    d = ap.add_argument_group("demo")
    d.add_argument("--demo", action="store_true",
                   help="write the control grid instead: condition | no control | ControlNet | T2I-Adapter | both, "
                        "and a row of CFG scales, for the first prompt (default: the demo prompt) and the first "
                        "--control-image (default: a drawn circle outline); needs one ControlNet and at most one "
                        "adapter (the embedded model's by default)")
    o = ap.add_argument_group("output")
    o.add_argument("--output", default="outputs", help="output folder (default ./outputs)")
    o.add_argument("--name", default="image", help="file name prefix (default 'image')")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


PROG = "infer.py"


def check_flags(args) -> None:
    """Flag values that are out of range or malformed: a `UsageError` naming the flag, before any
    file is read. Nothing is clamped or silently ignored."""
    from jaxcontrol.errors import UsageError

    def finite(flag, v):
        if v is not None and not math.isfinite(v):
            raise UsageError(f"{flag} {v}: must be a finite number")

    def at_least(flag, v, lo):
        if v is not None and v < lo:
            raise UsageError(f"{flag} {v}: must be at least {lo}")

    def within(flag, v, lo, hi, lo_open=False):
        if v is None:
            return
        finite(flag, v)
        if v < lo or v > hi or (lo_open and v == lo):
            raise UsageError(f"{flag} {v}: must be in {'(' if lo_open else '['}{lo}, {hi}]")

    for flag, v in (("--steps", args.steps), ("--num-images", args.num_images), ("--batch-size", args.batch_size),
                    ("--repaint-jump-length", args.repaint_jump_length),
                    ("--repaint-jump-n-sample", args.repaint_jump_n_sample)):
        at_least(flag, v, 1)
    for flag, v in (("--clip-skip", args.clip_skip), ("--clip-cutouts", args.clip_cutouts),
                    ("--canny-low", args.canny_low), ("--canny-high", args.canny_high)):
        at_least(flag, v, 0)
    if args.canny_low > args.canny_high:
        raise UsageError(f"--canny-low {args.canny_low} is above --canny-high {args.canny_high}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed}: must be in [0, 2^63 - 1]")
    finite("--guidance-scale", args.guidance_scale)
    at_least("--guidance-scale", args.guidance_scale, 0)
    within("--guidance-rescale", args.guidance_rescale, 0.0, 1.0)
    within("--eta", args.eta, 0.0, 1.0)
    within("--strength", args.strength, 0.0, 1.0, lo_open=True)
    within("--adapter-factor", args.adapter_factor, 0.0, 1.0)
    finite("--clip-guidance-scale", args.clip_guidance_scale)
    at_least("--clip-guidance-scale", args.clip_guidance_scale, 0)
    for v in args.control_scale:
        finite("--control-scale", v)
    for v in args.adapter_scale:
        finite("--adapter-scale", v)
    for flag, values in (("--control-start", args.control_start), ("--control-end", args.control_end)):
        for v in values:
            within(flag, v, 0.0, 1.0)
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise UsageError(f"--{name} {v}: must be a positive multiple of 8")
    if args.image_indices is not None:
        try:
            args.image_indices = [int(i) for i in args.image_indices.split(",")]
        except ValueError:
            raise UsageError(f"--image-indices {args.image_indices!r}: expected comma-separated integers "
                             "such as 0,3,5") from None
        if len(set(args.image_indices)) != len(args.image_indices):
            raise UsageError(f"--image-indices {','.join(map(str, args.image_indices))}: an index is repeated")
    if not args.name or args.name in (".", "..") or any(ch in args.name for ch in "/\\\0"):
        raise UsageError(f"--name {args.name!r}: must be a plain file-name prefix (no folders); files go "
                         "into --output")
    # settings that only apply with another flag: an error, never silently ignored
    defaults = build_parser().parse_args([])
    for flag, attr, needs, present in (
            ("--strength", "strength", "--init-image", args.init_image),
            ("--inpaint-method", "inpaint_method", "--mask", args.mask),
            ("--repaint-jump-length", "repaint_jump_length", "--inpaint-method repaint",
             args.inpaint_method == "repaint"),
            ("--repaint-jump-n-sample", "repaint_jump_n_sample", "--inpaint-method repaint",
             args.inpaint_method == "repaint"),
            ("--clip-cutouts", "clip_cutouts", "--clip-model", args.clip_model),
            ("--clip-prompt", "clip_prompt", "--clip-model", args.clip_model),
            ("--canny-low", "canny_low", "--preprocess canny", args.preprocess == "canny"),
            ("--canny-high", "canny_high", "--preprocess canny", args.preprocess == "canny")):
        if getattr(args, attr) != getattr(defaults, attr) and not present:
            raise UsageError(f"{flag} only applies with {needs}")
    for flag, values in (("--control-scale", args.control_scale), ("--control-start", args.control_start),
                         ("--control-end", args.control_end)):
        if values and not args.control_image:
            raise UsageError(f"{flag} only applies with --control-image")
    if args.adapter_scale and not args.adapter_image:
        raise UsageError("--adapter-scale only applies with --adapter-image")


def per_unit(values, n, default, what):
    from jaxcontrol.errors import UsageError

    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"{what} given {len(values)} times for {n} models (give it once, or once per model)")
    return values


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxcontrol.cli import run_main

    return run_main(PROG, lambda: run(args))


def _load(flag, path, mode="RGB"):
    """An input image named by a flag; an unreadable one is a usage error naming the flag."""
    import numpy as np

    import os
    import stat

    from jaxcontrol.errors import UsageError
    from jaxcontrol.preprocess import ImageLoadError, load_image

    try:
        if Path(path).exists() and not stat.S_ISREG(os.stat(path).st_mode) and not Path(path).is_dir():
            raise UsageError(f"{flag} {path}: not a regular file")
        return np.asarray(load_image(path, mode=mode), np.float32) / 255.0
    except ImageLoadError as e:
        raise UsageError(f"{flag}: {e}") from None


def run(args) -> int:
    from jaxcontrol.errors import UsageError

    check_flags(args)
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.exists():
            raise UsageError(f"--prompt-file {path}: no such file")
        if not path.is_file():
            raise UsageError(f"--prompt-file {path}: not a regular file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    from jaxcontrol import demo

    if args.demo and not prompts:
        prompts = [demo.DEMO_PROMPT]
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompt-file")
    model = args.model or str(demo.DEFAULT_MODEL)
    if not Path(model).exists():
        if args.model is None:
            raise UsageError("no --model given and the embedded default model is not built "
                             "(run `make embedded-model`)")
        raise UsageError(f"--model {model}: no such file or folder")
    if args.model is None:  # the embedded model: images without a network go to its own ControlNet / adapter
        if len(args.control_image) > len(args.controlnet) or (args.demo and not args.controlnet):
            args.controlnet = [str(demo.DEFAULT_CONTROLNET)] + args.controlnet
        if len(args.adapter_image) > len(args.adapter) or (
                args.demo and not args.adapter and demo.DEFAULT_ADAPTER.is_dir()):
            if not demo.DEFAULT_ADAPTER.is_dir():
                raise UsageError("--adapter-image without --adapter: the embedded model has no T2I-Adapter installed")
            args.adapter = [str(demo.DEFAULT_ADAPTER)] + args.adapter
    if args.demo:
        return run_demo(args, prompts[0], model)
    args.steps = 30 if args.steps is None else args.steps
    args.guidance_scale = 7.5 if args.guidance_scale is None else args.guidance_scale
    for flag, paths in (("--controlnet", args.controlnet), ("--adapter", args.adapter)):
        for p in paths:
            if not Path(p).exists():
                raise UsageError(f"{flag} {p}: no such file or folder")
    # a pipeline folder may hold its own ControlNets / adapter: their images come first
    if len(args.control_image) < len(args.controlnet):
        raise UsageError(f"{len(args.controlnet)} --controlnet but {len(args.control_image)} --control-image")
    if len(args.adapter_image) < len(args.adapter):
        raise UsageError(f"{len(args.adapter)} --adapter but {len(args.adapter_image)} --adapter-image")
    if args.mask and not args.init_image:
        raise UsageError("--mask needs --init-image")
    if args.clip_guidance_scale and not args.clip_model:
        raise UsageError("--clip-guidance-scale needs --clip-model")
    n_images = len(prompts) * args.num_images
    if args.image_indices is not None and any(i < 0 or i >= n_images for i in args.image_indices):
        raise UsageError(f"--image-indices {','.join(map(str, args.image_indices))}: must be in 0..{n_images - 1}")
    n_cn, n_ad = len(args.control_image), len(args.adapter_image)
    cn_scales = per_unit(args.control_scale, n_cn, 1.0, "--control-scale")
    cn_starts = per_unit(args.control_start, n_cn, 0.0, "--control-start")
    cn_ends = per_unit(args.control_end, n_cn, 1.0, "--control-end")
    for k, (a, e) in enumerate(zip(cn_starts, cn_ends)):
        if a >= e:
            raise UsageError(f"--control-start {a} must be smaller than --control-end {e} (ControlNet {k})")
    ad_scales = per_unit(args.adapter_scale, n_ad, 1.0, "--adapter-scale")

    # images are validated before the slow model load
    control_images = [_load("--control-image", p) for p in args.control_image]
    adapter_images = [_load("--adapter-image", p) for p in args.adapter_image]
    init_image = _load("--init-image", args.init_image) if args.init_image else None
    mask = _load("--mask", args.mask, mode="L") if args.mask else None

    import numpy as np
    from tqdm import tqdm

    import jax

    from jaxcontrol.images import make_grid, save_json, save_png
    from jaxcontrol.pipeline import AdapterInput, ControlInput
    from jaxcontrol.provenance import array_sha256, hash_paths_in_background

    t0 = time.perf_counter()
    hashes = hash_paths_in_background([model, *args.controlnet, *args.adapter])
    pipe = open_pipeline(args, model)
    layers = pipe.text_encoder.config.num_hidden_layers
    if args.clip_skip is not None and args.clip_skip > layers:
        raise UsageError(f"--clip-skip {args.clip_skip}: the text encoder has {layers} layers (at most {layers})")
    solver = pipe.scheduler_config.resolve(args.scheduler)[0]
    if args.eta and solver != "ddim":
        raise UsageError(f"--eta {args.eta} applies to the DDIM solver only; this run uses {solver!r} "
                         "(add --scheduler ddim)")
    f = pipe.vae_scale_factor
    height = args.height or (init_image.shape[0] if init_image is not None else None)
    width = args.width or (init_image.shape[1] if init_image is not None else None)
    height = height or pipe.unet.config.sample_size * f
    width = width or pipe.unet.config.sample_size * f
    if height % f or width % f:
        raise UsageError(f"image size {height}x{width} is not a multiple of {f} (the VAE's downscale factor): "
                         "give --height and --width")
    if init_image is not None and init_image.shape[:2] != (height, width):
        from PIL import Image

        init_image = np.asarray(Image.fromarray(np.round(init_image * 255).astype(np.uint8)).resize(
            (width, height), Image.BICUBIC), np.float32) / 255.0
    if args.preprocess == "canny":
        from jaxcontrol.preprocess import canny

        def edges(img, channels):
            u8 = np.round(img * 255).astype(np.uint8)[None]
            return np.asarray(canny(u8, args.canny_low, args.canny_high, channels=channels))[0]

        control_images = [edges(i, 3) for i in control_images]
        adapter_images = [edges(i, 3) for i in adapter_images]
    clip = None
    if args.clip_guidance_scale:
        clip = load_clip_guidance(args, pipe, prompts)

    indices = list(range(n_images)) if args.image_indices is None else args.image_indices
    jobs = [(i, prompts[i // args.num_images]) for i in indices]
    results = []  # everything is sampled (and checked) before anything is written
    batches = math.ceil(len(jobs) / args.batch_size)
    bar = tqdm(total=len(jobs), disable=args.no_progress, unit="img", desc="compiling + sampling")
    for b in range(batches):
        chunk = jobs[b * args.batch_size : (b + 1) * args.batch_size]
        n_real = len(chunk)
        if len(jobs) > args.batch_size:  # pad the last batch so that one compiled program serves all
            chunk = chunk + [chunk[-1]] * (args.batch_size - n_real)
        start = time.perf_counter()
        out = pipe(
            [p for _, p in chunk], args.negative_prompt, height=height, width=width,
            num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            guidance_rescale=args.guidance_rescale, scheduler=args.scheduler,
            scheduler_options={"eta": args.eta} if solver == "ddim" else None,
            seed=args.seed, image_indices=[i for i, _ in chunk],
            controls=[ControlInput(img, s, a, e, args.control_resize_mode)
                      for img, s, a, e in zip(control_images, cn_scales, cn_starts, cn_ends)],
            guess_mode=args.guess_mode,
            adapters=[AdapterInput(img, s) for img, s in zip(adapter_images, ad_scales)],
            adapter_conditioning_factor=args.adapter_factor, init_image=init_image, strength=args.strength,
            mask=mask, inpaint_method=args.inpaint_method, repaint_jump_length=args.repaint_jump_length,
            repaint_jump_n_sample=args.repaint_jump_n_sample, clip_guidance=clip, clip_skip=args.clip_skip,
        )
        seconds = round(time.perf_counter() - start, 3)
        resolved = {k: v for k, v in pipe.last_settings.items() if k != "image_indices"}
        for (index, prompt), image in zip(chunk[:n_real], out[:n_real]):
            results.append((index, prompt, image, resolved, seconds))
        bar.set_description("sampling")
        bar.update(n_real)
    bar.close()

    import jaxcontrol

    common = {
        "jaxcontrol_version": jaxcontrol.__version__,
        "model": {"path": model, "sha256": hashes[model].result()},
        "negative_prompt": args.negative_prompt,
        "scheduler": args.scheduler or solver,
        "steps": args.steps,
        "attention": args.attention,
        "inputs": {
            "control_images": [{"path": p, "sha256": array_sha256(i)} for p, i in zip(args.control_image, control_images)],
            "adapter_images": [{"path": p, "sha256": array_sha256(i)} for p, i in zip(args.adapter_image, adapter_images)],
            "preprocess": args.preprocess if args.preprocess == "none" else
            {"name": args.preprocess, "low": args.canny_low, "high": args.canny_high},
            "init_image": None if init_image is None else {"path": args.init_image, "sha256": array_sha256(init_image)},
            "mask": None if mask is None else {"path": args.mask, "sha256": array_sha256(mask)},
        },
    }
    extra_cn = {p: hashes[p].result() for p in args.controlnet}
    extra_ad = {p: hashes[p].result() for p in args.adapter}
    out_dir = Path(args.output)
    written, images = [], []
    for index, prompt, image, resolved, seconds in results:
        stem = f"{args.name}_{index:05d}"
        sidecar = {**resolved, **common, "prompt": prompt, "image_index": index, "seconds_for_batch": seconds,
                   "controlnets": [dict(c) for c in resolved["controlnets"]],
                   "adapters": [dict(a) for a in resolved["adapters"]]}
        # the ControlNets / adapters loaded from files (a pipeline folder's own come first and
        # are fingerprinted with the model)
        own_cn = len(resolved["controlnets"]) - len(args.controlnet)
        for k, (p, digest) in enumerate(extra_cn.items()):
            sidecar["controlnets"][own_cn + k] = {**sidecar["controlnets"][own_cn + k], "path": p, "sha256": digest}
        own_ad = len(resolved["adapters"]) - len(args.adapter)
        for k, (p, digest) in enumerate(extra_ad.items()):
            sidecar["adapters"][own_ad + k] = {**sidecar["adapters"][own_ad + k], "path": p, "sha256": digest}
        written.append(save_png(image, out_dir / f"{stem}.png"))
        save_json(sidecar, out_dir / f"{stem}.json")
        images.append(image)
    grid = save_png(make_grid(images), out_dir / f"{args.name}_grid.png")
    print(f"wrote {len(written)} images and {grid} in {time.perf_counter() - t0:.1f} s "
          f"({jax.device_count()} device(s))")
    return 0


def open_pipeline(args, model):
    from jaxcontrol.pipeline import Pipeline

    return Pipeline.from_pretrained(model, dtype=args.dtype, vae_dtype=args.vae_dtype, controlnets=args.controlnet,
                                    adapters=args.adapter, attention_impl=args.attention,
                                    unsafe_load_pickle=args.unsafe_load_pickle)


def run_demo(args, prompt, model) -> int:
    from jaxcontrol.errors import UsageError

    if len(args.controlnet) != 1 or len(args.adapter) > 1:
        raise UsageError(f"--demo needs one --controlnet and at most one --adapter, got {len(args.controlnet)} "
                         f"and {len(args.adapter)}")
    for flag, paths in (("--controlnet", args.controlnet), ("--adapter", args.adapter)):
        if paths and not Path(paths[0]).exists():
            raise UsageError(f"{flag} {paths[0]}: no such file or folder")
    import numpy as np
    from PIL import Image

    import jaxcontrol
    from jaxcontrol import demo
    from jaxcontrol.images import save_json, save_png
    from jaxcontrol.provenance import array_sha256, hash_paths_in_background

    t0 = time.perf_counter()
    hashes = hash_paths_in_background([model, *args.controlnet, *args.adapter])
    pipe = open_pipeline(args, model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = args.height or size, args.width or size
    if args.control_image:
        condition = Image.fromarray(np.round(_load("--control-image", args.control_image[0]) * 255).astype(np.uint8))
    else:
        condition = Image.fromarray(demo.circle_outline(max(height, width)))
    condition = np.asarray(condition.resize((width, height), Image.BILINEAR))
    guidance = demo.DEMO_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    steps = demo.DEMO_STEPS if args.steps is None else args.steps
    grid = demo.control_grid(pipe, prompt, condition, seed=args.seed, steps=steps, guidance_scale=guidance,
                             scheduler=args.scheduler)
    settings = pipe.last_settings
    sidecar = {
        "jaxcontrol_version": jaxcontrol.__version__, "prompt": prompt, "negative_prompt": "",
        "seed": args.seed, "steps": steps, "guidance_scale": guidance, "cfg_sweep": list(demo.CFG_SWEEP),
        "height": height, "width": width, "solver": settings["solver"],
        "scheduler_config": settings["scheduler_config"], "prediction_type": settings["prediction_type"],
        "timesteps": settings["timesteps"], "dtype": settings["dtype"], "vae_dtype": settings["vae_dtype"],
        "model": {"path": model, "sha256": hashes[model].result()},
        "controlnet": {"path": args.controlnet[0], "sha256": hashes[args.controlnet[0]].result()},
        "adapter": {"path": args.adapter[0], "sha256": hashes[args.adapter[0]].result()} if args.adapter else None,
        "condition": {"path": args.control_image[0] if args.control_image else None,
                      "sha256": array_sha256(condition)},
    }
    path = save_png(grid, Path(args.output) / f"{args.name}_demo.png")
    save_json(sidecar, Path(args.output) / f"{args.name}_demo.json")
    print(f"wrote {path} ({prompt!r}, {steps} steps, CFG {guidance:g}, seed {args.seed}) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def load_clip_guidance(args, pipe, prompts):
    import jax.numpy as jnp
    import numpy as np

    from jaxcontrol.convert.clip_model import load_clip_towers
    from jaxcontrol.guidance import ClipGuide
    from jaxcontrol.pipeline import ClipGuidanceInput
    from jaxcontrol.tokenizer import load_tokenizer, tokenize

    (text, tparams), (vision, vparams) = load_clip_towers(args.clip_model, unsafe_load_pickle=args.unsafe_load_pickle)
    tok_dir = Path(args.clip_model)
    tokenizer = load_tokenizer(tok_dir) if (tok_dir / "vocab.json").is_file() else pipe.tokenizer
    ids = tokenize(tokenizer, [args.clip_prompt or prompts[0]])
    target = text.apply({"params": tparams}, jnp.asarray(ids)).text_embeds[0]
    guide = ClipGuide(pipe.vae, pipe.params["vae"], vision, vparams, image_size=vision.config.image_size,
                      num_cutouts=args.clip_cutouts)
    return ClipGuidanceInput(guide, np.asarray(target), args.clip_guidance_scale)


def console_main():
    """Entry point of `jaxcontrol-infer` and of `python infer.py`."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
