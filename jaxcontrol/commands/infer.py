"""Text-to-image with ControlNets, T2I-Adapters and guidance (a thin CLI over jaxcontrol.pipeline).

Examples:
  # Stable Diffusion 1.5 + a canny ControlNet, weights on disk
  python infer.py --model ./stable-diffusion-v1-5 --prompt "a bird on a branch" \\
      --controlnet ./sd-controlnet-canny --control-image bird.png --preprocess canny \\
      --steps 20 --scheduler dpmpp_2m --num-images 4 --output out/

  # the embedded demo model (no --model): its ControlNet takes a circle outline
  python infer.py --prompt "red circle with white background" --control-image outline.png

  # the demo grid (condition | no control | ControlNet | T2I-Adapter | both, a CFG sweep, and the
  # embedded instruction editor's row when it is installed: input | three edits)
  python infer.py --demo --output outputs/demo

  # the embedded instruction editor (an InstructPix2Pix U-Net over the embedded model)
  python infer.py --instruct "make the background white" --init-image circle.png --guidance-scale 3

  # two ControlNets with their own scales and windows, plus a T2I-Adapter
  python infer.py --model sd15 --prompt "a house" \\
      --controlnet cn_depth --control-image depth.png --control-scale 0.8 --control-end 0.6 \\
      --controlnet cn_pose --control-image pose.png --control-scale 1.0 \\
      --adapter t2i_sketch --adapter-image sketch.png --adapter-scale 0.7

  # LoRAs (each with its own scale) and a textual-inversion word
  python infer.py --model sd15 --prompt "a <my-style> house" --lora watercolor.safetensors:0.8 \\
      --lora ./detail-lora:0.5 --embedding my-style.pt

  # concatenation-conditioned models: inpainting (9 channels), depth (5), InstructPix2Pix (8)
  python infer.py --model sd-inpainting --prompt "a sofa" --init-image room.png --mask mask.png
  python infer.py --model sd2-depth --prompt "a castle" --depth-map depth16.png
  python infer.py --model sd2-depth --prompt "a castle" --init-image room.png --depth-estimator ./dpt-hybrid-midas \\
      --strength 0.7 --scheduler ddim   # PNDM, SD-2 depth's own scheduler, cannot start part-way
  python infer.py --model instruct-pix2pix --instruct "make it red" --init-image room.png --image-guidance-scale 1.5

It writes one PNG per image, a contact-sheet grid and a JSON sidecar per image with every setting,
the seed and the image index (`--seed S --image-indices i` regenerates image i). Nothing is
written unless every image came out finite.

Exit codes: 0 success; 1 runtime error (an unreadable model, NaN or infinite values while
sampling, a size that cannot fit in memory); 2 usage error (a flag out of range, a missing or
unreadable input file); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import os
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jaxcontrol.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

PROG = "infer.py"


def solver_choices() -> tuple[str, ...]:
    """The --scheduler names: every solver name and alias the schedulers know (`schedulers.ALIASES`,
    which `schedulers.solvers.register` extends), except DDIM inversion, which does not generate."""
    from jaxcontrol.schedulers import ALIASES

    return tuple(name for name in ALIASES if name != "ddim_inverse")


def build_parser() -> argparse.ArgumentParser:
    from jaxcontrol.models.attention import ATTENTION_IMPLS

    """The `infer.py` argument parser: model, prompts, ControlNet, T2I-Adapter, sampling, editing, demo, output."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--model", help="a diffusers pipeline folder, an LDM single file, or a jaxcontrol checkpoint "
                                   "(default: the embedded demo model, jaxcontrol/assets/; then --control-image "
                                   "and --adapter-image without --controlnet / --adapter use its ControlNet and "
                                   "T2I-Adapter)")
    m.add_argument("--vae", help="a VAE (diffusers AutoencoderKL folder or file) in place of the model's own, with "
                                 "its latent channels, e.g. SDXL's fp16-fix VAE")
    m.add_argument("--unet", help="a U-Net (diffusers folder, jaxcontrol checkpoint or file) in place of the model's "
                                  "own, over its VAE and text encoder: a fine-tune, or a concatenation-conditioned "
                                  "U-Net (the model's kind follows its input width). Default: the model's; with "
                                  "--instruct and no --model, the embedded instruction editor "
                                  "(jaxcontrol/assets/default_editor)")
    m.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute dtype of the U-Net, ControlNets, adapters and text encoder; weights stay "
                        "float32 and normalisation/softmax statistics are float32 in every mode. Default auto: "
                        "bfloat16 on a GPU or TPU, float32 on the CPU (the sidecar records which)")
    m.add_argument("--vae-dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute dtype of the VAE (default float32, also when --dtype is bfloat16)")
    m.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                   help="attention kernel (default auto: cuDNN on a GPU, Pallas flash on a TPU, chunked on the "
                        "CPU for long sequences, plain for short ones); plain (einsum), chunked (one head and 1024 "
                        "queries at a time), dot_product (XLA's attention), cudnn (GPU), tpu_flash (TPU)")
    m.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA (diffusers/PEFT pytorch_lora_weights.safetensors or its folder, older diffusers "
                        "layouts, or a kohya/A1111 lora_unet_* file) at SCALE (default 1.0); repeatable, each "
                        "with its own scale")
    m.add_argument("--lora-mode", default="merged", choices=("merged", "unmerged"),
                   help="merged (default): fused into the weights before sampling (fastest); unmerged: added in "
                        "the compiled program at a traced scale (the same images, to float rounding)")
    m.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="a textual-inversion embedding (diffusers learned_embeds.safetensors or its folder, A1111 "
                        ".pt / .safetensors) under its own word or TOKEN; use the word in the prompt. Repeatable")
    m.add_argument("--unsafe-load-pickle", action="store_true",
                   help="allow arbitrary Python objects in .ckpt/.pth/.bin files: this runs code from the file; "
                        "only for files you trust")
    p = ap.add_argument_group("prompts")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None,
                   help="the negative prompt (unconditional branch of CFG; default none: \"\" for SD, zero "
                        "embeddings for an SDXL model that says force_zeros_for_empty_prompt, as diffusers)")
    p.add_argument("--instruct", action="append", default=[],
                   help="an InstructPix2Pix model's edit instruction, e.g. \"make it red\" (repeatable): the "
                        "prompt, by its name; give --instruct or --prompt / --prompt-file, not both. Only with an "
                        "InstructPix2Pix model (8-channel U-Net), which also needs --init-image")
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
    x = ap.add_argument_group("SDXL (a U-Net with the text_time embedding; diffusers' argument names)")
    x.add_argument("--prompt-2", default=None, help="the prompt for the second text encoder (default: --prompt)")
    x.add_argument("--negative-prompt-2", default=None,
                   help="the negative prompt for the second text encoder (default: --negative-prompt)")
    for flag, what in (("original-size", "H,W"), ("target-size", "H,W"), ("crops-coords-top-left", "TOP,LEFT")):
        for neg in ("", "negative-"):
            x.add_argument(f"--{neg}{flag}", type=_pair(f"--{neg}{flag}"), metavar=what,
                           default=(0, 0) if flag.startswith("crops") else None,
                           help=f"micro-conditioning {neg.replace('-', ' ')}{flag.replace('-', '_')} (default: "
                                + ("0,0" if flag.startswith("crops") else "the image size") + ")")
    x.add_argument("--aesthetic-score", type=float, default=None,
                   help="the refiner's aesthetic score (default 6); refused for a model without it")
    x.add_argument("--negative-aesthetic-score", type=float, default=None,
                   help="the refiner's negative aesthetic score (default 2.5); refused for a model without it")
    x.add_argument("--refiner", default=None, metavar="PATH",
                   help="an SDXL refiner (folder or file): the model denoises the first --high-noise-frac of "
                        "the steps, the refiner the rest from its latents (diffusers' ensemble of expert denoisers)")
    x.add_argument("--high-noise-frac", type=float, default=0.8,
                   help="with --refiner: the fraction of the schedule the model denoises, in (0, 1) (default 0.8)")
    s = ap.add_argument_group("sampling")
    s.add_argument("--scheduler", choices=solver_choices(),
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
    e.add_argument("--strength", type=float, default=None,
                   help="img2img / inpainting strength in (0, 1] (default 0.8; 1.0 with --mask, as diffusers)")
    e.add_argument("--mask", help="inpainting mask (white = regenerate), the size of --init-image; needs "
                                  "--init-image. An inpainting model (9-channel U-Net) takes it as its extra "
                                  "input by itself; a 4-channel model needs --inpaint-method")
    e.add_argument("--inpaint-method", default=None, choices=("partial", "repaint"),
                   help="how a 4-channel model inpaints with --mask: partial diffusion (blending the known "
                        "region back at every step) or RePaint; required there. An inpainting model (9-channel "
                        "U-Net) inpaints by itself (partial, the default for it; repaint is an error)")
    e.add_argument("--repaint-jump-length", type=int, default=10)
    e.add_argument("--repaint-jump-n-sample", type=int, default=10)
    e.add_argument("--depth-map", metavar="FILE",
                   help="a depth model's (5-channel U-Net) depth map: a PNG (8-bit, or 16-bit read at full "
                        "precision), a float TIFF, or a .npy array (H, W) or (H, W, 1); any size and scale (larger "
                        "= nearer, as MiDaS/DPT output), resized and scaled to [-1, 1] per image. Without "
                        "--init-image the model samples from noise; with it, from the image at --strength")
    e.add_argument("--depth-estimator", metavar="DPT_FOLDER",
                   help="instead of --depth-map: a local transformers DPT folder (DPTForDepthEstimation + "
                        "DPTImageProcessor saved with save_pretrained; never downloaded) run on --init-image to "
                        "estimate the depth map, as diffusers' Depth2Img pipeline does (needs torch and "
                        "transformers)")
    e.add_argument("--image-guidance-scale", type=float, default=None,
                   help="InstructPix2Pix only: how closely to follow --init-image (>= 0; default 1.5; image "
                        "guidance runs when it is >= 1 and --guidance-scale > 1, as in diffusers)")
    e.add_argument("--clip-guidance-scale", type=float, default=0.0,
                   help="CLIP guidance weight (needs --clip-model; default 0 = off)")
    e.add_argument("--clip-model", help="a transformers CLIPModel folder for CLIP guidance")
    e.add_argument("--clip-prompt", help="the text CLIP guidance steers toward (default: the prompt)")
    e.add_argument("--clip-cutouts", type=int, default=0, help="random cutouts per step for CLIP guidance")
    a = ap.add_argument_group("steering through the U-Net's attention (docs/GUIDANCE.md)")
    a.add_argument("--sag-scale", type=float, default=0.0,
                   help="Self-Attention Guidance weight (>= 0; default 0 = off; diffusers' default 0.75)")
    a.add_argument("--pag-scale", type=float, default=0.0,
                   help="Perturbed-Attention Guidance weight (>= 0; default 0 = off; diffusers suggests 3)")
    a.add_argument("--pag-layers", nargs="+", default=None, metavar="LAYER",
                   help="the self-attention layers PAG perturbs, as diffusers' pag_applied_layers (regular "
                        "expressions over names such as mid_block.attentions.0.transformer_blocks.0.attn1; "
                        "default: mid)")
    a.add_argument("--pag-adaptive-scale", type=float, default=0.0,
                   help="lower the PAG weight by this much per timestep below 1000 (default 0)")
    a.add_argument("--attend-and-excite-tokens", metavar="I,J[;K,...]",
                   help="Attend-and-Excite: the positions of the subject tokens in the tokenized prompt (the "
                        "first word is 1), comma-separated, for every prompt; or one list per prompt separated "
                        "by ';'")
    a.add_argument("--max-iter-to-alter", type=int, default=25,
                   help="Attend-and-Excite updates the latents during this many first steps (default 25)")
    a.add_argument("--attn-res", default="16,16", metavar="H,W",
                   help="the cross-attention map size Attend-and-Excite reads (default 16,16: a 512x512 image)")
    a.add_argument("--excite-scale-factor", type=float, default=20.0,
                   help="Attend-and-Excite's step size scale (diffusers' scale_factor; default 20)")
    a.add_argument("--excite-thresholds", default="0:0.05,10:0.5,20:0.8", metavar="STEP:T,...",
                   help="Attend-and-Excite's refinement steps and thresholds (default 0:0.05,10:0.5,20:0.8)")
    a.add_argument("--edit-source", metavar="FILE",
                   help="Pix2Pix-Zero: a text file of sentences (one per line) describing what to replace; needs "
                        "--edit-target. The prompt is the image's caption; with --init-image the image is "
                        "inverted and edited, else the generated image is")
    a.add_argument("--edit-target", metavar="FILE",
                   help="Pix2Pix-Zero: a text file of sentences describing the replacement")
    a.add_argument("--cross-attention-guidance-amount", type=float, default=0.1,
                   help="Pix2Pix-Zero's cross-attention guidance step (default 0.1)")
    d = ap.add_argument_group("demo")
    d.add_argument("--demo", action="store_true",
                   help="write the control grid instead: condition | no control | ControlNet | T2I-Adapter | both, "
                        "and a row of CFG scales, for the first prompt (default: the demo prompt) and the first "
                        "--control-image (default: a drawn circle outline); needs one ControlNet and at most one "
                        "adapter (the embedded model's by default). With the embedded model and its instruction "
                        "editor installed, a third row: an input image | its edits by three instructions")
    o = ap.add_argument_group("output")
    o.add_argument("--output", default="outputs", help="output folder (default ./outputs)")
    o.add_argument("--name", default="image", help="file name prefix (default 'image')")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap




def parse_args(argv=None) -> argparse.Namespace:
    """The command line as argparse reads it (`argv`, default `sys.argv[1:]`): types and choices
    checked, nothing resolved. `--help` exits 0 and a malformed flag exits 2, as argparse does."""
    return build_parser().parse_args(argv)


# --- flag values on their own --------------------------------------------------------------------


def check_flags(args: argparse.Namespace) -> None:
    """Flag values that are out of range or malformed: a `UsageError` naming the flag, before any
    file is read. Nothing is clamped or silently ignored; `args` is not changed."""
    _check_integers(args)
    _check_fractions(args)
    _check_size(args)
    _image_indices(args.image_indices)
    _check_name(args.name)
    _check_flags_apply(args)


def _finite(flag: str, v: float | None) -> None:
    if v is not None and not math.isfinite(v):
        raise UsageError(f"{flag} {v}: must be a finite number")


def _at_least(flag: str, v: float | None, lo: float) -> None:
    if v is not None and v < lo:
        raise UsageError(f"{flag} {v}: must be at least {lo}")


def _within(flag: str, v: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if v is None:
        return
    _finite(flag, v)
    if v < lo or v > hi or (lo_open and v == lo):
        raise UsageError(f"{flag} {v}: must be in {'(' if lo_open else '['}{lo}, {hi}]")


def _check_integers(args: argparse.Namespace) -> None:
    """Counts, the Canny thresholds and the seed."""
    for flag, v in (("--steps", args.steps), ("--num-images", args.num_images), ("--batch-size", args.batch_size),
                    ("--repaint-jump-length", args.repaint_jump_length),
                    ("--repaint-jump-n-sample", args.repaint_jump_n_sample)):
        _at_least(flag, v, 1)
    for flag, v in (("--clip-skip", args.clip_skip), ("--clip-cutouts", args.clip_cutouts),
                    ("--max-iter-to-alter", args.max_iter_to_alter),
                    ("--canny-low", args.canny_low), ("--canny-high", args.canny_high)):
        _at_least(flag, v, 0)
    if args.canny_low > args.canny_high:
        raise UsageError(f"--canny-low {args.canny_low} is above --canny-high {args.canny_high}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed}: must be in [0, 2^63 - 1]")


def _check_fractions(args: argparse.Namespace) -> None:
    """Guidance weights, strengths and ControlNet windows."""
    _finite("--guidance-scale", args.guidance_scale)
    _at_least("--guidance-scale", args.guidance_scale, 0)
    _within("--guidance-rescale", args.guidance_rescale, 0.0, 1.0)
    _within("--eta", args.eta, 0.0, 1.0)
    if args.strength is not None:
        _within("--strength", args.strength, 0.0, 1.0, lo_open=True)
    _within("--adapter-factor", args.adapter_factor, 0.0, 1.0)
    _finite("--clip-guidance-scale", args.clip_guidance_scale)
    _at_least("--clip-guidance-scale", args.clip_guidance_scale, 0)
    _finite("--image-guidance-scale", args.image_guidance_scale)
    _at_least("--image-guidance-scale", args.image_guidance_scale, 0)
    for flag, v in (("--sag-scale", args.sag_scale), ("--pag-scale", args.pag_scale),
                    ("--pag-adaptive-scale", args.pag_adaptive_scale), ("--excite-scale-factor", args.excite_scale_factor),
                    ("--cross-attention-guidance-amount", args.cross_attention_guidance_amount)):
        _finite(flag, v)
        _at_least(flag, v, 0)
    for v in args.control_scale:
        _finite("--control-scale", v)
    for v in args.adapter_scale:
        _finite("--adapter-scale", v)
    for flag, values in (("--control-start", args.control_start), ("--control-end", args.control_end)):
        for v in values:
            _within(flag, v, 0.0, 1.0)


def _check_size(args: argparse.Namespace) -> None:
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise UsageError(f"--{name} {v}: must be a positive multiple of 8")


def _image_indices(text: str | None) -> tuple[int, ...] | None:
    """`--image-indices 0,3,5` as integers (None when not given); `UsageError` if malformed or repeated."""
    if text is None:
        return None
    try:
        indices = tuple(int(i) for i in text.split(","))
    except ValueError:
        raise UsageError(f"--image-indices {text!r}: expected comma-separated integers such as 0,3,5") from None
    if len(set(indices)) != len(indices):
        raise UsageError(f"--image-indices {','.join(map(str, indices))}: an index is repeated")
    return indices


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or any(ch in name for ch in "/\\\0"):
        raise UsageError(f"--name {name!r}: must be a plain file-name prefix (no folders); files go into --output")


def _check_flags_apply(args: argparse.Namespace) -> None:
    """Settings that only apply with another flag: an error, never silently ignored."""
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
            ("--pag-layers", "pag_layers", "--pag-scale", args.pag_scale > 0),
            ("--pag-adaptive-scale", "pag_adaptive_scale", "--pag-scale", args.pag_scale > 0),
            ("--max-iter-to-alter", "max_iter_to_alter", "--attend-and-excite-tokens", args.attend_and_excite_tokens),
            ("--attn-res", "attn_res", "--attend-and-excite-tokens", args.attend_and_excite_tokens),
            ("--excite-scale-factor", "excite_scale_factor", "--attend-and-excite-tokens",
             args.attend_and_excite_tokens),
            ("--excite-thresholds", "excite_thresholds", "--attend-and-excite-tokens", args.attend_and_excite_tokens),
            ("--cross-attention-guidance-amount", "cross_attention_guidance_amount", "--edit-source",
             args.edit_source),
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
    if args.instruct and (args.prompt or args.prompt_file):
        given = "--prompt" if args.prompt else "--prompt-file"
        raise UsageError(f"--instruct is the prompt of an InstructPix2Pix model: give --instruct or {given}, not both")
    if args.depth_map and args.depth_estimator:
        raise UsageError(f"give --depth-map or --depth-estimator, not both (--depth-map {args.depth_map}, "
                         f"--depth-estimator {args.depth_estimator})")
    if bool(args.edit_source) != bool(args.edit_target):
        raise UsageError("Pix2Pix-Zero needs both --edit-source and --edit-target (sentence files)")
    if args.edit_source and args.attend_and_excite_tokens:
        raise UsageError("--attend-and-excite-tokens and --edit-source both move the latents: use one of them")
    if args.edit_source and (args.mask or args.strength is not None):
        raise UsageError("--edit-source (Pix2Pix-Zero) inverts --init-image all the way or edits a generated image: "
                         "no --mask or --strength")
    if args.edit_source and args.guidance_scale is not None and args.guidance_scale <= 1:
        raise UsageError(f"--edit-source (Pix2Pix-Zero) needs classifier-free guidance: --guidance-scale above 1, got "
                         f"{args.guidance_scale:g}")
    if args.edit_source and args.guidance_rescale:
        raise UsageError("--guidance-rescale does not apply to Pix2Pix-Zero (--edit-source)")
    if (args.edit_source or args.attend_and_excite_tokens) and args.clip_model:
        raise UsageError("--attend-and-excite-tokens / --edit-source move the latents inside the sampler and do not "
                         "combine with CLIP guidance (--clip-model); --sag-scale and --pag-scale do")
    if (args.sag_scale or args.pag_scale or args.attend_and_excite_tokens or args.edit_source) \
            and args.inpaint_method == "repaint":
        raise UsageError("the attention techniques do not run inside RePaint's resampling walk: use "
                         "--inpaint-method partial")
    if args.edit_source and (args.sag_scale or args.pag_scale):
        raise UsageError("--sag-scale / --pag-scale do not combine with Pix2Pix-Zero (--edit-source)")
    for layer in args.pag_layers or ():
        try:
            re.compile(layer)
        except re.error as e:
            raise UsageError(f"--pag-layers {layer!r}: not a valid regular expression ({e})") from None
    excite_tokens(args.attend_and_excite_tokens)
    attn_res(args.attn_res)
    excite_thresholds(args.excite_thresholds)
    if args.depth_estimator and not args.init_image:
        raise UsageError("--depth-estimator estimates the depth of --init-image: give --init-image (or a "
                         "--depth-map file instead)")


def excite_tokens(text: str | None):
    """--attend-and-excite-tokens "2,5" (for every prompt) as [2, 5], or "2,5;3" (one list per
    prompt) as [[2, 5], [3]]; None when not given. `UsageError` when malformed or below 1."""
    if text is None:
        return None
    try:
        rows = [[int(i) for i in part.split(",")] for part in text.split(";")]
    except ValueError:
        raise UsageError(f"--attend-and-excite-tokens {text!r}: expected comma-separated token positions such as "
                         "2,5 (or one list per prompt: 2,5;3)") from None
    if any(i < 1 for row in rows for i in row):
        raise UsageError(f"--attend-and-excite-tokens {text!r}: positions start at 1 (0 is the start token)")
    if any(i > 75 for row in rows for i in row):
        raise UsageError(f"--attend-and-excite-tokens {text!r}: positions go up to 75 (CLIP's 77 tokens less the "
                         "start and end tokens)")
    return rows[0] if len(rows) == 1 else rows


def attn_res(text: str) -> tuple[int, int]:
    """--attn-res "16,16" as (16, 16); `UsageError` when malformed."""
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--attn-res {text!r}: expected two positive integers H,W such as 16,16") from None
    if h < 2 or w < 2:
        raise UsageError(f"--attn-res {text!r}: expected two integers >= 2, H,W such as 16,16")
    return h, w


def excite_thresholds(text: str) -> dict[int, float]:
    """--excite-thresholds "0:0.05,10:0.5" as {0: 0.05, 10: 0.5}; `UsageError` when malformed."""
    try:
        out = {int(k): float(v) for k, v in (item.split(":") for item in text.split(",") if item)}
    except ValueError:
        raise UsageError(f"--excite-thresholds {text!r}: expected STEP:THRESHOLD pairs such as 0:0.05,10:0.5") from None
    if any(k < 0 or not 0 <= v <= 1 for k, v in out.items()):
        raise UsageError(f"--excite-thresholds {text!r}: steps must be >= 0 and thresholds in [0, 1]")
    return out


def _sentences(flag: str, path: str | None) -> tuple[str, ...] | None:
    """The non-blank lines of a Pix2Pix-Zero sentence file; `UsageError` naming the flag otherwise."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: cannot read the sentence file ({e})") from None
    sentences = tuple(line.strip() for line in lines if line.strip())
    if not sentences:
        raise UsageError(f"{flag} {path}: the file has no sentences (one per line)")
    return sentences


# --- the resolved request ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """One ControlNet's condition: its image file and diffusers' `controlnet_conditioning_scale`,
    `control_guidance_start` and `control_guidance_end` (fractions of the steps)."""

    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One T2I-Adapter's condition: its image file and diffusers' `adapter_conditioning_scale`."""

    image: str
    scale: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class InferSettings:
    """What one run does, after defaults and flag checks (`resolve`); what its sidecars record.

    Paths are kept as given (the sidecars record them so). Fields named as the flags are the
    flags' values; the others are resolved: `model` (the embedded demo model without --model),
    `controlnet_paths` / `adapter_paths` (the networks loaded from files, after the model folder's
    own; the embedded model's own without --controlnet / --adapter), `prompts` (--prompt, then
    the lines of --prompt-file), `unet` (--unet; with --instruct and no --model the embedded
    instruction editor's U-Net), `controls` / `adapters` (one per condition image, the model
    folder's own networks first, with their scales and windows), `steps` and `guidance_scale`
    (30 and 7.5, or the demo's), `image_indices` (every index of len(prompts) * num_images
    unless given; empty with `demo`), `output` and `progress`. `height`, `width` and `solver` are None until
    `fit_to_model` decides them from the loaded model (a flag's height / width is kept). `kind` is the
    U-Net's kind (`models.kinds`): read from the model's configs by `resolve` where that is cheap
    (`peek_unet_kind`), else None until the model is loaded. `instruct`: the prompts came from --instruct.
    """

    # the networks
    model: str
    unet: str | None  # a U-Net replacing the model's (--unet, or the embedded editor for --instruct)
    vae: str | None  # a VAE replacing the model's (--vae)
    controlnet_paths: tuple[str, ...]
    adapter_paths: tuple[str, ...]
    dtype: str
    vae_dtype: str
    attention: str
    unsafe_load_pickle: bool
    loras: tuple[tuple[str, float], ...]  # (path, scale) per --lora
    lora_mode: str
    embeddings: tuple[tuple[str, str | None], ...]  # (path, token or None) per --embedding
    # prompts and conditions
    prompts: tuple[str, ...]
    instruct: bool
    negative_prompt: str | None  # None: not given (SDXL may zero the negative embeddings)
    controls: tuple[ControlSpec, ...]
    control_resize_mode: str
    guess_mode: bool
    adapters: tuple[AdapterSpec, ...]
    adapter_factor: float  # fraction of the steps
    preprocess: str
    canny_low: int
    canny_high: int
    kind: str | None  # the U-Net's kind; None: not known before loading
    # sampling
    scheduler: str | None  # --scheduler; None: the model's own scheduler class
    solver: str | None  # the solver that runs (fit_to_model)
    steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    clip_skip: int | None
    seed: int
    num_images: int  # per prompt
    image_indices: tuple[int, ...]
    batch_size: int
    height: int | None  # pixels
    width: int | None
    # editing and guidance
    init_image: str | None
    strength: float | None  # None: the pipeline's default for the mode
    mask: str | None
    inpaint_method: str | None  # None: not given (an inpainting model's is partial)
    repaint_jump_length: int
    repaint_jump_n_sample: int
    depth_map: str | None  # a depth map file (depth models)
    depth_estimator: str | None  # a DPT folder estimating the depth of init_image (depth models)
    image_guidance_scale: float | None  # InstructPix2Pix; None: the pipeline's default
    # SDXL
    prompt_2: str | None
    negative_prompt_2: str | None
    original_size: tuple[int, int] | None
    target_size: tuple[int, int] | None
    crops_coords_top_left: tuple[int, int]
    negative_original_size: tuple[int, int] | None
    negative_target_size: tuple[int, int] | None
    negative_crops_coords_top_left: tuple[int, int]
    aesthetic_score: float | None  # None: not given (the refiner's default)
    negative_aesthetic_score: float | None
    refiner: str | None  # an SDXL refiner taking over at high_noise_frac (base -> refiner hand-off)
    high_noise_frac: float
    clip_model: str | None
    clip_guidance_scale: float
    clip_prompt: str | None
    clip_cutouts: int
    # steering through attention
    sag_scale: float
    pag_scale: float
    pag_layers: tuple[str, ...] | None  # None: diffusers' default ("mid",)
    pag_adaptive_scale: float
    attend_and_excite_tokens: str | None  # as given; parsed by `excite_tokens`
    max_iter_to_alter: int
    attn_res: str
    excite_scale_factor: float
    excite_thresholds: str
    edit_source: str | None  # sentence files (paths); their sentences in `edit_sentences`
    edit_target: str | None
    edit_sentences: tuple[tuple[str, ...], tuple[str, ...]] | None
    cross_attention_guidance_amount: float
    # output
    demo: bool
    output: Path
    name: str
    progress: bool

    def jobs(self) -> list[tuple[int, str]]:
        """(image index, prompt) of every image to generate, in the order given."""
        return [(i, self.prompts[i // self.num_images]) for i in self.image_indices]


_RESOLVED = ("model", "unet", "controlnet_paths", "adapter_paths", "prompts", "instruct", "kind", "controls", "adapters",
             "solver", "steps", "guidance_scale", "image_indices", "output", "progress", "pag_layers",
             "edit_sentences", "loras", "embeddings")


def resolve(args: argparse.Namespace) -> InferSettings:
    """The settings a parsed command line asks for: every usage check that needs no model, then
    the defaults. Reads only the prompt file, whether named paths exist and the model's small
    configs (its U-Net's kind, `convert.pipeline_kind.peek_unet_kind`); the condition images and the depth
    map are read by `load_inputs` and the weights by `open_pipeline`, both in `run`.

    Raises `UsageError` naming the flag: out of range or malformed values (`check_flags`), no
    prompt, a missing model / ControlNet / adapter / prompt file / depth map / depth estimator,
    condition images and networks that do not pair up, an --image-indices index out of range,
    --control-start >= --control-end, and inputs the model's kind does not take or lacks
    (`check_kind`; where the kind can be read from the model's configs without loading weights).
    """
    check_flags(args)
    if args.vae is not None and not Path(args.vae).exists():
        raise UsageError(f"--vae {args.vae}: no such file or folder")
    _check_refiner_flags(args)
    prompts = _prompts(args)
    model = _model_path(args.model)
    unet = _unet_path(args)
    controlnets, adapters = _network_paths(args)
    if args.demo:
        return _demo_settings(args, model, prompts, controlnets, adapters)
    _check_networks(args, controlnets, adapters)
    n_images = len(prompts) * args.num_images
    indices = _image_indices(args.image_indices)
    if indices is not None and any(i < 0 or i >= n_images for i in indices):
        raise UsageError(f"--image-indices {','.join(map(str, indices))}: must be in 0..{n_images - 1}")
    settings = _settings(
        args, model=model, unet=unet, controlnet_paths=controlnets, adapter_paths=adapters, prompts=prompts,
        instruct=bool(args.instruct), kind=_peek_kind(unet or model),
        controls=_controls(args), adapters=_adapters(args), solver=None,
        steps=30 if args.steps is None else args.steps,
        guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale,
        image_indices=tuple(range(n_images)) if indices is None else indices,
        output=Path(args.output), progress=not args.no_progress,
        pag_layers=None if args.pag_layers is None else tuple(args.pag_layers),
        loras=_loras(args.lora), embeddings=_embeddings(args.embedding),
        edit_sentences=None if not args.edit_source else (_sentences("--edit-source", args.edit_source),
                                                           _sentences("--edit-target", args.edit_target)))
    if settings.kind is not None:
        check_kind(settings, settings.kind)
    return settings


def _check_refiner_flags(args: argparse.Namespace) -> None:
    """--refiner's usage: an existing path, a fraction in (0, 1), text-to-image only."""
    if args.refiner is None:
        if args.high_noise_frac != 0.8:
            raise UsageError("--high-noise-frac applies with --refiner")
        return
    if not Path(args.refiner).exists():
        raise UsageError(f"--refiner {args.refiner}: no such file or folder")
    if not (math.isfinite(args.high_noise_frac) and 0.0 < args.high_noise_frac < 1.0):
        raise UsageError(f"--high-noise-frac {args.high_noise_frac}: must be in (0, 1)")
    given = [flag for flag, value in (("--init-image", args.init_image), ("--mask", args.mask),
                                      ("--instruct", args.instruct), ("--demo", args.demo)) if value]
    if given:
        raise UsageError(f"--refiner hands the model's text-to-image latents over; it does not combine with "
                         f"{', '.join(given)}")


def _loras(flags: list[str]) -> tuple[tuple[str, float], ...]:
    """--lora PATH[:SCALE] as (path, scale); `UsageError` for a missing path or a scale that is no
    finite number. A path that exists whole is taken whole (it may contain ':')."""
    out = []
    for flag in flags:
        path, scale = flag, 1.0
        if not Path(flag).exists() and ":" in flag:
            path, _, text = flag.rpartition(":")
            try:
                scale = float(text)
            except ValueError:
                raise UsageError(f"--lora {flag}: {text!r} is not a scale (PATH[:SCALE], e.g. style.safetensors:0.8)"
                                 ) from None
            if not math.isfinite(scale):
                raise UsageError(f"--lora {flag}: the scale must be a finite number")
        if not Path(path).exists():
            raise UsageError(f"--lora {path}: no such file or folder")
        out.append((path, scale))
    return tuple(out)


def _embeddings(flags: list[str]) -> tuple[tuple[str, str | None], ...]:
    """--embedding PATH[:TOKEN] as (path, token or None); `UsageError` for a missing path."""
    out = []
    for flag in flags:
        path, token = flag, None
        if not Path(flag).exists() and ":" in flag:
            path, _, token = flag.rpartition(":")
            if not token.strip():
                raise UsageError(f"--embedding {flag}: empty token after ':'")
        if not Path(path).exists():
            raise UsageError(f"--embedding {path}: no such file or folder")
        out.append((path, token))
    return tuple(out)


def _settings(args: argparse.Namespace, **resolved) -> InferSettings:
    """`InferSettings` of the `resolved` fields, the others copied from the flags of the same name."""
    from jaxcontrol.platform import dtype_name

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(InferSettings) if f.name not in _RESOLVED}
    flags["dtype"], flags["vae_dtype"] = dtype_name(flags["dtype"]), dtype_name(flags["vae_dtype"])  # "auto" resolved
    return InferSettings(**flags, **resolved)


def _prompts(args: argparse.Namespace) -> tuple[str, ...]:
    """--prompt, then the non-blank lines of --prompt-file (the demo prompt for a bare --demo)."""
    from jaxcontrol import demo

    prompts = list(args.prompt) + list(args.instruct)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.exists():
            raise UsageError(f"--prompt-file {path}: no such file")
        if not path.is_file():
            raise UsageError(f"--prompt-file {path}: not a regular file")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if args.demo and not prompts:
        prompts = [demo.DEMO_PROMPT]
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompt-file (or --instruct for an InstructPix2Pix model)")
    return tuple(prompts)


def _model_path(flag: str | None) -> str:
    """--model, or the embedded demo model; `UsageError` if it does not exist."""
    from jaxcontrol import demo

    model = flag or str(demo.DEFAULT_MODEL)
    if not Path(model).exists():
        if flag is None:
            raise UsageError("no --model given and the embedded default model is not built "
                             "(run `make embedded-model`)")
        raise UsageError(f"--model {model}: no such file or folder")
    return model


def _unet_path(args: argparse.Namespace) -> str | None:
    """--unet; with --instruct and no --model, the embedded instruction editor's U-Net. `UsageError`
    when the path does not exist or the editor is not built."""
    from jaxcontrol import demo

    if args.unet:
        if not Path(args.unet).exists():
            raise UsageError(f"--unet {args.unet}: no such file or folder")
        _check_unet_folder(args.unet)
        return args.unet
    if args.instruct and args.model is None and not args.demo:
        if not demo.DEFAULT_EDITOR.is_dir():
            raise UsageError("--instruct without --model uses the embedded instruction editor, which is not built "
                             "(run `make embedded-model`); or give an InstructPix2Pix --model")
        return str(demo.DEFAULT_EDITOR)
    return None


def _check_unet_folder(path: str) -> None:
    """--unet read from its small files: a pipeline folder (point at its unet/ subfolder) or a model
    of another class is a `UsageError` before any weights load. Files are checked when loaded."""
    import json

    p = Path(path)
    if not p.is_dir():
        return
    if (p / "model_index.json").is_file():
        raise UsageError(f"--unet {path} is a pipeline folder; give its U-Net, e.g. --unet {p / 'unet'}")
    try:
        if (p / "jaxcontrol.json").is_file():
            names = sorted((json.loads((p / "jaxcontrol.json").read_text()).get("components") or {}))
            if names != ["unet"]:
                raise UsageError(f"--unet {path}: a jaxcontrol checkpoint of {names or 'nothing'}, not of a U-Net "
                                 "alone")
        elif (p / "config.json").is_file():
            cls = json.loads((p / "config.json").read_text()).get("_class_name", "UNet2DConditionModel")
            if cls != "UNet2DConditionModel":
                raise UsageError(f"--unet {path}: config.json says {cls}, not UNet2DConditionModel")
    except (OSError, ValueError, AttributeError) as e:
        if isinstance(e, UsageError):
            raise
        return  # unreadable: loading reports it


def _network_paths(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(--controlnet, --adapter) paths. With the embedded model (no --model), condition images
    without a network of their own (and --demo) use its ControlNet and T2I-Adapter, first."""
    from jaxcontrol import demo

    controlnets, adapters = list(args.controlnet), list(args.adapter)
    if args.model is None:
        if len(args.control_image) > len(controlnets) or (args.demo and not controlnets):
            controlnets = [str(demo.DEFAULT_CONTROLNET)] + controlnets
        if len(args.adapter_image) > len(adapters) or (args.demo and not adapters and demo.DEFAULT_ADAPTER.is_dir()):
            if not demo.DEFAULT_ADAPTER.is_dir():
                raise UsageError("--adapter-image without --adapter: the embedded model has no T2I-Adapter installed")
            adapters = [str(demo.DEFAULT_ADAPTER)] + adapters
    return tuple(controlnets), tuple(adapters)


def _check_networks(args: argparse.Namespace, controlnets: tuple[str, ...], adapters: tuple[str, ...]) -> None:
    """The networks exist and pair up with the condition images; the editing flags' partners are given."""
    for flag, paths in (("--controlnet", controlnets), ("--adapter", adapters)):
        for p in paths:
            if not Path(p).exists():
                raise UsageError(f"{flag} {p}: no such file or folder")
    # a pipeline folder may hold its own ControlNets / adapter: their images come first
    if len(args.control_image) < len(controlnets):
        raise UsageError(f"{len(controlnets)} --controlnet but {len(args.control_image)} --control-image")
    if len(args.adapter_image) < len(adapters):
        raise UsageError(f"{len(adapters)} --adapter but {len(args.adapter_image)} --adapter-image")
    if args.mask and not args.init_image:
        raise UsageError("--mask needs --init-image")
    for flag, path, is_kind in (("--depth-map", args.depth_map, Path.is_file),
                                ("--depth-estimator", args.depth_estimator, Path.is_dir)):
        if path and not Path(path).exists():
            raise UsageError(f"{flag} {path}: no such {'file' if is_kind is Path.is_file else 'folder'}")
        if path and not is_kind(Path(path)):
            raise UsageError(f"{flag} {path}: not a {'regular file' if is_kind is Path.is_file else 'folder'}")
    if args.clip_guidance_scale and not args.clip_model:
        raise UsageError("--clip-guidance-scale needs --clip-model")


# --- the model's kind: the inputs a concatenation-conditioned U-Net takes ----------------------------

_KIND_NAMES = {
    "text2image": "a text-to-image model (4-channel U-Net)",
    "depth": "a depth model (5-channel U-Net)",
    "instruct_pix2pix": "an InstructPix2Pix model (8-channel U-Net)",
    "inpaint": "an inpainting model (9-channel U-Net)",
}


def _peek_kind(model: str) -> str | None:
    """The U-Net's kind read from `model`'s configs (`convert.pipeline_kind.peek_unet_kind`), no weights
    loaded; None where it cannot be told cheaply. A width that matches no kind, or contradicts the
    pipeline class, raises `ConfigError` as loading would (exit 1), only sooner."""
    from jaxcontrol.convert.pipeline_kind import peek_unet_kind

    return peek_unet_kind(model)


def check_kind(settings: InferSettings, kind: str) -> None:
    """The flags a U-Net of `kind` (`models.kinds.KINDS`) needs, and only those: a `UsageError`
    naming the flag, what the model is and what it would take. `resolve` calls it when the kind
    could be read from the model's configs, `run` again with the loaded model's kind."""
    model = (f"--unet {settings.unet} makes the model {_KIND_NAMES[kind]}" if settings.unet else
             f"--model {settings.model} is {_KIND_NAMES[kind]}")
    if kind != "instruct_pix2pix":
        if settings.instruct:
            raise UsageError(f"--instruct is the edit instruction of {_KIND_NAMES['instruct_pix2pix']}; {model}: "
                             "give the text as --prompt")
        if settings.image_guidance_scale is not None:
            raise UsageError(f"--image-guidance-scale {settings.image_guidance_scale:g} applies to "
                             f"{_KIND_NAMES['instruct_pix2pix']}; {model}")
    if kind != "text2image" and settings.edit_source:
        raise UsageError(f"--edit-source (Pix2Pix-Zero) runs text-to-image models; {model}")
    if kind != "depth":
        for flag, value in (("--depth-map", settings.depth_map), ("--depth-estimator", settings.depth_estimator)):
            if value:
                raise UsageError(f"{flag} {value} is the input of {_KIND_NAMES['depth']}; {model}")
    if kind == "text2image":
        if settings.mask and settings.inpaint_method is None:
            raise UsageError(f"--mask {settings.mask} needs --inpaint-method partial or repaint: {model}, which "
                             "inpaints by blending (partial) or RePaint; or use an inpainting model (9-channel U-Net)")
    elif kind == "inpaint":
        if not (settings.mask and settings.init_image):
            missing = " and ".join(f for f, v in (("--init-image", settings.init_image), ("--mask", settings.mask))
                                   if not v)
            raise UsageError(f"{model}: it needs --init-image and --mask (missing {missing})")
        if settings.inpaint_method == "repaint":
            raise UsageError(f"--inpaint-method repaint runs 4-channel models; {model}, which inpaints by itself: "
                             "drop --inpaint-method (or give partial)")
    elif kind == "depth":
        if not (settings.depth_map or settings.depth_estimator):
            raise UsageError(f"{model}: give --depth-map FILE, or --depth-estimator DPT_FOLDER with --init-image")
        if settings.mask:
            raise UsageError(f"--mask {settings.mask}: {model}, which does not inpaint (4- and 9-channel models do)")
    elif kind == "instruct_pix2pix":
        for flag, on in (("--sag-scale", settings.sag_scale), ("--pag-scale", settings.pag_scale),
                         ("--attend-and-excite-tokens", settings.attend_and_excite_tokens),
                         ("--edit-source", settings.edit_source)):
            if on:
                raise UsageError(f"{flag}: {model}, whose two-scale guidance does not take the attention techniques "
                                 "(they build on classifier-free guidance)")
        if not settings.init_image:
            raise UsageError(f"{model}: it needs --init-image, the image to edit")
        for flag, value in (("--mask", settings.mask), ("--strength", settings.strength)):
            if value is not None:
                raise UsageError(f"{flag} {value}: {model}, which takes --init-image alone and samples from noise "
                                 "(no mask, no strength; --image-guidance-scale sets how closely it follows the image)")
        if settings.guidance_rescale:
            raise UsageError(f"--guidance-rescale {settings.guidance_rescale:g}: {model}, whose two-scale guidance "
                             "has no rescale")


def per_unit(values, n, default, what):
    """A per-network flag's values for `n` networks: `default` for each when not given, one value
    for all, or one per network; `UsageError` naming the flag `what` otherwise."""
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"{what} given {len(values)} times for {n} models (give it once, or once per model)")
    return values


def _controls(args: argparse.Namespace) -> tuple[ControlSpec, ...]:
    """One `ControlSpec` per --control-image; `UsageError` for a window with start >= end."""
    n = len(args.control_image)
    scales = per_unit(args.control_scale, n, 1.0, "--control-scale")
    starts = per_unit(args.control_start, n, 0.0, "--control-start")
    ends = per_unit(args.control_end, n, 1.0, "--control-end")
    for k, (a, e) in enumerate(zip(starts, ends)):
        if a >= e:
            raise UsageError(f"--control-start {a} must be smaller than --control-end {e} (ControlNet {k})")
    return tuple(ControlSpec(*c) for c in zip(args.control_image, scales, starts, ends))


def _adapters(args: argparse.Namespace) -> tuple[AdapterSpec, ...]:
    scales = per_unit(args.adapter_scale, len(args.adapter_image), 1.0, "--adapter-scale")
    return tuple(AdapterSpec(*a) for a in zip(args.adapter_image, scales))


# What --demo honours: the model and how it runs, one prompt and condition, the solver, steps,
# guidance, seed, size and where the grid goes. Any other flag set to a non-default value is an error.
_DEMO_FLAGS = frozenset({"model", "dtype", "vae_dtype", "attention", "unsafe_load_pickle", "prompt", "prompt_file",
                         "controlnet", "control_image", "adapter", "scheduler", "steps", "guidance_scale", "seed",
                         "height", "width", "demo", "output", "name", "no_progress"})


def _refuse_flags_the_demo_ignores(args, prompts) -> None:
    """`UsageError` naming every flag --demo would silently ignore, and a second prompt or condition."""
    defaults = build_parser().parse_args([])
    ignored = sorted(f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                     if k not in _DEMO_FLAGS and v != getattr(defaults, k, None))
    if ignored:
        raise UsageError(f"--demo draws a fixed grid and does not use {', '.join(ignored)}; "
                         "drop them or leave out --demo")
    if len(prompts) > 1 or len(args.control_image) > 1:
        raise UsageError(f"--demo takes one prompt and one --control-image, got {len(prompts)} and "
                         f"{len(args.control_image)}")


def _demo_settings(args, model, prompts, controlnets, adapters) -> InferSettings:
    """--demo: one ControlNet and at most one adapter; the demo's steps and guidance by default;
    the first --control-image (if any) is the grid's condition."""
    from jaxcontrol import demo

    if len(controlnets) != 1 or len(adapters) > 1:
        raise UsageError(f"--demo needs one --controlnet and at most one --adapter, got {len(controlnets)} "
                         f"and {len(adapters)}")
    _refuse_flags_the_demo_ignores(args, prompts)
    for flag, paths in (("--controlnet", controlnets), ("--adapter", adapters)):
        if paths and not Path(paths[0]).exists():
            raise UsageError(f"{flag} {paths[0]}: no such file or folder")
    return _settings(
        args, model=model, unet=None, controlnet_paths=controlnets, adapter_paths=adapters, prompts=prompts, instruct=False,
        kind=None, controls=tuple(ControlSpec(p) for p in args.control_image[:1]), adapters=(), solver=None,
        steps=demo.DEMO_STEPS if args.steps is None else args.steps,
        guidance_scale=demo.DEMO_GUIDANCE if args.guidance_scale is None else args.guidance_scale,
        image_indices=(), output=Path(args.output), progress=not args.no_progress, pag_layers=None,
        edit_sentences=None, loras=(), embeddings=())


# --- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class InputImages:
    """The images a run reads: float32 in [0, 1], (H, W, 3); the mask (H, W); the depth map
    float64 (H, W) as read from --depth-map, or float32 as --depth-estimator estimated it."""

    control_images: tuple
    adapter_images: tuple
    init_image: np.ndarray | None
    mask: np.ndarray | None
    depth_map: np.ndarray | None = None


def main(argv=None) -> int:
    """`infer.py ARGS`: 0 on success, 1 on a runtime error, 2 on a usage error, 130 when
    interrupted (errors are one line on stderr; see `jaxcontrol.cli`)."""
    args = parse_args(argv)
    from jaxcontrol.cli import EXIT_OK, run_main

    def resolve_and_run() -> int:
        run(resolve(args))
        return EXIT_OK

    return run_main(PROG, resolve_and_run)


def run(settings: InferSettings) -> list[Path]:
    """Read the condition images, load the networks, sample every image, write them.

    Writes NAME_IIIII.png and its JSON sidecar per image and the grid NAME_grid.png under
    `settings.output` (with `demo`: `run_demo`); returns the PNG paths, the grid last. Every
    image is sampled and found finite before anything is written. Raises `UsageError` for an
    unreadable image or a flag the loaded model rejects (`fit_to_model`), `NonFiniteError` for
    NaN / infinity while sampling, `CheckpointError` / `OSError` for unreadable weights.
    """
    if settings.demo:
        return run_demo(settings)
    import jax

    from jaxcontrol.provenance import hash_paths_in_background

    inputs = load_inputs(settings)  # images are validated before the slow model load
    t0 = time.perf_counter()
    hashes = hash_paths_in_background([settings.model, *settings.controlnet_paths, *settings.adapter_paths,
                                       *filter(None, [settings.depth_estimator, settings.unet, settings.vae,
                                                      settings.refiner]),
                                       *(p for p, _ in settings.loras), *(p for p, _ in settings.embeddings)])
    pipe = open_pipeline(settings)
    refiner = open_refiner(settings, pipe)
    settings = dataclasses.replace(settings, kind=pipe.kind)
    check_kind(settings, pipe.kind)  # again: the kind read before loading may have been unknown
    settings = fit_to_model(settings, pipe, inputs.init_image)
    if settings.depth_estimator:
        from jaxcontrol.depth import estimate_depth

        inputs = dataclasses.replace(inputs, depth_map=estimate_depth(inputs.init_image, settings.depth_estimator))
    inputs = prepare_inputs(settings, inputs)
    clip = load_clip_guidance(settings, pipe) if settings.clip_guidance_scale else None
    written = write_outputs(settings, inputs, sample(settings, pipe, inputs, clip, refiner), hashes)
    print(f"wrote {len(written) - 1} images and {written[-1]} in {time.perf_counter() - t0:.1f} s "
          f"({jax.device_count()} device(s))")
    return written


def _load(flag, path, mode="RGB"):
    """An input image named by a flag; an unreadable one is a usage error naming the flag."""
    import numpy as np

    from jaxcontrol.preprocess import ImageLoadError, load_image

    try:
        if Path(path).exists() and not stat.S_ISREG(os.stat(path).st_mode) and not Path(path).is_dir():
            raise UsageError(f"{flag} {path}: not a regular file")
        return np.asarray(load_image(path, mode=mode), np.float32) / 255.0
    except ImageLoadError as e:
        raise UsageError(f"{flag}: {e}") from None


def load_inputs(settings: InferSettings) -> InputImages:
    """The condition, init and mask images and the depth map, read as given (`UsageError` naming
    the flag for one that is missing or unreadable, a mask whose size is not the init image's,
    and a depth map that is not 2-D, not finite or constant)."""
    init_image = _load("--init-image", settings.init_image) if settings.init_image else None
    mask = _load("--mask", settings.mask, mode="L") if settings.mask else None
    if mask is not None and init_image is not None and mask.shape[:2] != init_image.shape[:2]:
        raise UsageError(f"--mask {settings.mask} is {mask.shape[0]}x{mask.shape[1]} pixels (height x width) but "
                         f"--init-image {settings.init_image} is {init_image.shape[0]}x{init_image.shape[1]}; "
                         "give a mask of the init image's size")
    return InputImages(control_images=tuple(_load("--control-image", c.image) for c in settings.controls),
                       adapter_images=tuple(_load("--adapter-image", a.image) for a in settings.adapters),
                       init_image=init_image, mask=mask,
                       depth_map=_load_depth(settings.depth_map) if settings.depth_map else None)


def _load_depth(path: str):
    """--depth-map as a float (H, W) array at full precision (`jaxcontrol.depth.load_depth_map`)."""
    from jaxcontrol.depth import DepthMapError, load_depth_map

    if Path(path).exists() and not stat.S_ISREG(os.stat(path).st_mode):
        raise UsageError(f"--depth-map {path}: not a regular file")
    try:
        return load_depth_map(path)
    except DepthMapError as e:
        raise UsageError(f"--depth-map: {e}") from None


def open_pipeline(settings: InferSettings):
    """The `Pipeline` of `settings.model` plus the ControlNets and adapters loaded from files."""
    from jaxcontrol.pipeline import Pipeline

    return Pipeline.from_pretrained(settings.model, dtype=settings.dtype, vae_dtype=settings.vae_dtype,
                                    controlnets=list(settings.controlnet_paths), adapters=list(settings.adapter_paths),
                                    attention_impl=settings.attention, unsafe_load_pickle=settings.unsafe_load_pickle,
                                    unet=settings.unet, vae=settings.vae, loras=list(settings.loras),
                                    fuse_loras=settings.lora_mode == "merged",
                                    embeddings=[(p, t) if t else p for p, t in settings.embeddings])


def open_refiner(settings: InferSettings, pipe):
    """The `Pipeline` of --refiner (None without it). `UsageError` unless both the model and the
    refiner are SDXL text-to-image models (a text_time U-Net, 4 input channels)."""
    if settings.refiner is None:
        return None
    from jaxcontrol.pipeline import Pipeline

    if not pipe.xl:
        raise UsageError(f"--refiner applies to SDXL models; {settings.model} has no SDXL U-Net "
                         "(addition_embed_type='text_time')")
    refiner = Pipeline.from_pretrained(settings.refiner, dtype=settings.dtype, vae_dtype=settings.vae_dtype,
                                       attention_impl=settings.attention, unsafe_load_pickle=settings.unsafe_load_pickle)
    if not refiner.xl or refiner.kind != "text2image":
        raise UsageError(f"--refiner {settings.refiner}: not an SDXL text-to-image model (U-Net kind "
                         f"{refiner.kind!r}, addition_embed_type={refiner.unet.config.addition_embed_type!r})")
    if refiner.latent_channels != pipe.latent_channels or refiner.vae_scale_factor != pipe.vae_scale_factor:
        raise UsageError(f"--refiner {settings.refiner}: its VAE's latents ({refiner.latent_channels} channels, "
                         f"factor {refiner.vae_scale_factor}) are not the model's ({pipe.latent_channels}, "
                         f"{pipe.vae_scale_factor})")
    return refiner


def fit_to_model(settings: InferSettings, pipe, init_image) -> InferSettings:
    """`settings` with the solver and the image size decided by the loaded model: --height /
    --width, else the init image's size (an InstructPix2Pix model's: rounded down to a multiple of
    the VAE's factor, as diffusers does), else the U-Net's sample size times the VAE's factor.

    Raises `UsageError` for a --clip-skip deeper than the text encoder, --eta with a solver other
    than DDIM, or a size the VAE's downscale factor does not divide."""
    scores = [flag for flag, v in (("--aesthetic-score", settings.aesthetic_score),
                                   ("--negative-aesthetic-score", settings.negative_aesthetic_score)) if v is not None]
    if scores and pipe.xl and not pipe.requires_aesthetics_score and settings.refiner is None:
        raise UsageError(f"{', '.join(scores)}: this SDXL model is conditioned on the target size, not an aesthetic "
                         "score (requires_aesthetics_score is false: a base model); the score applies to a refiner "
                         "(--model or --refiner)")
    layers = pipe.max_clip_skip()
    if settings.clip_skip is not None and settings.clip_skip > layers:
        raise UsageError(f"--clip-skip {settings.clip_skip}: the text encoder has {layers} layers to skip at most "
                         f"(SDXL: one fewer than its shallower encoder, whose penultimate layer it uses already)")
    solver = pipe.scheduler_config.resolve(settings.scheduler)[0]
    if settings.eta and solver != "ddim":
        raise UsageError(f"--eta {settings.eta} applies to the DDIM solver only; this run uses {solver!r} "
                         "(add --scheduler ddim)")
    f = pipe.vae_scale_factor
    height = settings.height or (init_image.shape[0] if init_image is not None else None)
    width = settings.width or (init_image.shape[1] if init_image is not None else None)
    if settings.kind == "instruct_pix2pix" and init_image is not None:
        # diffusers' InstructPix2Pix pipeline: the image's size rounded down to the VAE's factor
        height, width = height - height % f, width - width % f
        if not height or not width:
            raise UsageError(f"--init-image {settings.init_image} is {init_image.shape[0]}x{init_image.shape[1]} "
                             f"pixels, smaller than the VAE's factor {f}")
    height = height or pipe.unet.config.sample_size * f
    width = width or pipe.unet.config.sample_size * f
    if height % f or width % f:
        raise UsageError(f"image size {height}x{width} is not a multiple of {f} (the VAE's downscale factor): "
                         "give --height and --width")
    return dataclasses.replace(settings, solver=solver, height=height, width=width)


def prepare_inputs(settings: InferSettings, inputs: InputImages) -> InputImages:
    """The init image resized (bicubic) to the output size; with --preprocess canny, the
    condition images as Canny edge maps (`jaxcontrol.preprocess.canny`)."""
    import numpy as np

    init_image = inputs.init_image
    if init_image is not None and init_image.shape[:2] != (settings.height, settings.width):
        from PIL import Image

        init_image = np.asarray(Image.fromarray(np.round(init_image * 255).astype(np.uint8)).resize(
            (settings.width, settings.height), Image.BICUBIC), np.float32) / 255.0
    inputs = dataclasses.replace(inputs, init_image=init_image)
    if settings.preprocess != "canny":
        return inputs
    from jaxcontrol.preprocess import canny

    def edges(img):
        u8 = np.round(img * 255).astype(np.uint8)[None]
        return np.asarray(canny(u8, settings.canny_low, settings.canny_high, channels=3))[0]

    return dataclasses.replace(inputs, control_images=tuple(edges(i) for i in inputs.control_images),
                               adapter_images=tuple(edges(i) for i in inputs.adapter_images))


def load_clip_guidance(settings: InferSettings, pipe):
    """`ClipGuidanceInput` from --clip-model (its tokenizer if the folder has one, else the
    pipeline's), steering toward --clip-prompt (default: the first prompt)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxcontrol.convert.clip_model import load_clip_towers
    from jaxcontrol.guidance import ClipGuide
    from jaxcontrol.pipeline import ClipGuidanceInput
    from jaxcontrol.tokenizer import load_tokenizer, tokenize

    (text, tparams), (vision, vparams) = load_clip_towers(settings.clip_model,
                                                          unsafe_load_pickle=settings.unsafe_load_pickle)
    tok_dir = Path(settings.clip_model)
    tokenizer = load_tokenizer(tok_dir) if (tok_dir / "vocab.json").is_file() else pipe.tokenizer
    ids = tokenize(tokenizer, [settings.clip_prompt or settings.prompts[0]])
    target = text.apply({"params": tparams}, jnp.asarray(ids)).text_embeds[0]
    guide = ClipGuide(pipe.vae, pipe.params["vae"], vision, vparams, image_size=vision.config.image_size,
                      num_cutouts=settings.clip_cutouts)
    return ClipGuidanceInput(guide, np.asarray(target), settings.clip_guidance_scale)


def sample(settings: InferSettings, pipe, inputs: InputImages, clip, refiner=None) -> list[tuple]:
    """Every image of `settings.jobs()`, `batch_size` per call: (index, prompt, uint8 (H, W, 3)
    image, the pipeline's resolved settings of its batch, seconds for the batch). Nothing is
    written here: the pipeline raises `NonFiniteError` for a NaN before any file exists.

    With a `refiner`, the model stops at `high_noise_frac` of the schedule (`denoising_end`) and
    the refiner continues from those latents (`denoising_start`), with the same prompts, steps,
    guidance, seed and SDXL flags (each model reads the micro-conditioning its U-Net takes); the
    resolved settings then hold the refiner's under "refiner_settings"."""
    from tqdm import tqdm

    call = _call_arguments(settings, inputs, clip)
    if refiner is not None:
        frac = settings.high_noise_frac
        refiner_call = {k: call[k] for k in ("height", "width", "num_inference_steps", "guidance_scale",
                                             "guidance_rescale", "scheduler", "scheduler_options", "seed")}
        refiner_call.update(xl_flags(settings), denoising_start=frac)
        call = {**call, "denoising_end": frac, "output_type": "latent"}
    jobs = settings.jobs()
    results = []
    bar = tqdm(total=len(jobs), disable=not settings.progress, unit="img", desc="compiling + sampling")
    for chunk, n_real in _batches(jobs, settings.batch_size):
        start = time.perf_counter()
        prompts, indices = [p for _, p in chunk], [i for i, _ in chunk]
        out = pipe(prompts, settings.negative_prompt, image_indices=indices, **call)
        resolved = {k: v for k, v in pipe.last_settings.items() if k != "image_indices"}
        if refiner is not None:
            out = refiner(prompts, settings.negative_prompt, image_indices=indices, init_latents=out, **refiner_call)
            resolved["refiner_settings"] = {k: v for k, v in refiner.last_settings.items() if k != "image_indices"}
        seconds = round(time.perf_counter() - start, 3)
        for (index, prompt), image in zip(chunk[:n_real], out[:n_real]):
            results.append((index, prompt, image, resolved, seconds))
        bar.set_description("sampling")
        bar.update(n_real)
    bar.close()
    return results


def _batches(jobs: list, batch_size: int):
    """(batch, number of real jobs in it): when there is more than one batch, the last is padded
    with copies of its last job, so that one compiled program serves every call."""
    for b in range(math.ceil(len(jobs) / batch_size)):
        chunk = jobs[b * batch_size : (b + 1) * batch_size]
        n_real = len(chunk)
        if len(jobs) > batch_size:
            chunk = chunk + [chunk[-1]] * (batch_size - n_real)
        yield chunk, n_real


def _as_file_image(img):
    """An image read from a file (float [0, 1], from 8-bit data) as the PIL image it was, for the
    steps diffusers does on PIL images only: the crop / fill resize modes and resizing adapter
    images to the output size (Lanczos)."""
    import numpy as np
    from PIL import Image

    u8 = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8)


def xl_flags(settings: InferSettings) -> dict:
    """The SDXL flags given on the command line, as `Pipeline.__call__` keyword arguments."""
    from jaxcontrol.pipeline import given_xl_arguments

    return {k: v for k, v in given_xl_arguments(settings).items() if v is not None}


def _call_arguments(settings: InferSettings, inputs: InputImages, clip) -> dict:
    """The `Pipeline.__call__` keyword arguments every batch shares."""
    from jaxcontrol.pipeline import AdapterInput, ControlInput

    return dict(
        height=settings.height, width=settings.width, num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale, guidance_rescale=settings.guidance_rescale,
        scheduler=settings.scheduler, scheduler_options={"eta": settings.eta} if settings.solver == "ddim" else None,
        seed=settings.seed,
        controls=[ControlInput(_as_file_image(img) if settings.control_resize_mode != "default" else img,
                               c.scale, c.start, c.end, settings.control_resize_mode)
                  for img, c in zip(inputs.control_images, settings.controls)],
        guess_mode=settings.guess_mode,
        adapters=[AdapterInput(img if img.shape[:2] == (settings.height, settings.width) else _as_file_image(img),
                               a.scale) for img, a in zip(inputs.adapter_images, settings.adapters)],
        adapter_conditioning_factor=settings.adapter_factor, init_image=inputs.init_image,
        strength=settings.strength, mask=inputs.mask, inpaint_method=settings.inpaint_method or "partial",
        depth_map=inputs.depth_map, image_guidance_scale=settings.image_guidance_scale,
        repaint_jump_length=settings.repaint_jump_length, repaint_jump_n_sample=settings.repaint_jump_n_sample,
        clip_guidance=clip, clip_skip=settings.clip_skip,
        sag_scale=settings.sag_scale, pag_scale=settings.pag_scale,
        pag_applied_layers=settings.pag_layers or ("mid",), pag_adaptive_scale=settings.pag_adaptive_scale,
        token_indices=excite_tokens(settings.attend_and_excite_tokens), max_iter_to_alter=settings.max_iter_to_alter,
        thresholds=excite_thresholds(settings.excite_thresholds), scale_factor=settings.excite_scale_factor,
        attn_res=attn_res(settings.attn_res),
        edit_source=None if settings.edit_sentences is None else list(settings.edit_sentences[0]),
        edit_target=None if settings.edit_sentences is None else list(settings.edit_sentences[1]),
        cross_attention_guidance_amount=settings.cross_attention_guidance_amount,
        **xl_flags(settings))  # the SDXL flags given; an SD model refuses them by name


def _pair(flag: str):
    """An argparse type: "A,B" (or "AxB") as a pair of non-negative ints, naming `flag` when malformed."""
    def parse(text: str) -> tuple[int, int]:
        parts = text.replace("x", ",").split(",")
        try:
            pair = tuple(int(v) for v in parts)
        except ValueError:
            pair = ()
        if len(pair) != 2 or min(pair) < 0:
            raise argparse.ArgumentTypeError(f"{flag} takes two non-negative integers, e.g. 1024,1024; got {text!r}")
        return pair
    return parse


def write_outputs(settings: InferSettings, inputs: InputImages, results: list[tuple], hashes: dict) -> list[Path]:
    """Each image as NAME_IIIII.png with its sidecar NAME_IIIII.json, then the grid NAME_grid.png
    (atomic writes); returns the PNG paths, the grid last. `hashes` maps each network path to a
    future of its sha256 (`hash_paths_in_background`)."""
    from jaxcontrol.images import make_grid, save_json, save_png

    common = _common_sidecar(settings, inputs, hashes)
    cn_digests = {p: hashes[p].result() for p in settings.controlnet_paths}
    ad_digests = {p: hashes[p].result() for p in settings.adapter_paths}
    written = []
    for index, prompt, image, resolved, seconds in results:
        stem = f"{settings.name}_{index:05d}"
        sidecar = {**resolved, **common, "prompt": prompt, "image_index": index, "seconds_for_batch": seconds,
                   "controlnets": _with_files(resolved["controlnets"], settings.controlnet_paths, cn_digests),
                   "adapters": _with_files(resolved["adapters"], settings.adapter_paths, ad_digests)}
        written.append(save_png(image, settings.output / f"{stem}.png"))
        save_json(sidecar, settings.output / f"{stem}.json")
    grid = make_grid([image for _, _, image, _, _ in results])
    return written + [save_png(grid, settings.output / f"{settings.name}_grid.png")]


def _with_files(entries: list[dict], paths: tuple[str, ...], digests: dict[str, str]) -> list[dict]:
    """The resolved per-network entries, those of the networks loaded from `paths` (after the
    model folder's own, which are fingerprinted with the model) with their path and sha256."""
    entries = [dict(e) for e in entries]
    own = len(entries) - len(paths)
    for k, path in enumerate(paths):  # by position: the same file may be given twice
        entries[own + k] = {**entries[own + k], "path": path, "sha256": digests[path]}
    return entries


def _common_sidecar(settings: InferSettings, inputs: InputImages, hashes: dict) -> dict:
    """What every image's sidecar records besides the pipeline's resolved settings: the version,
    the model's fingerprint, the request, and each input image's path and sha256 (as used)."""
    import jaxcontrol
    from jaxcontrol.provenance import array_sha256

    def fingerprint(path, array):
        return None if array is None else {"path": path, "sha256": array_sha256(array)}

    return {
        "jaxcontrol_version": jaxcontrol.__version__,
        "model": {"path": settings.model, "sha256": hashes[settings.model].result()},
        "unet": None if settings.unet is None else {"path": settings.unet, "sha256": hashes[settings.unet].result()},
        "vae": None if settings.vae is None else {"path": settings.vae, "sha256": hashes[settings.vae].result()},
        "refiner": None if settings.refiner is None else {
            "path": settings.refiner, "sha256": hashes[settings.refiner].result(),
            "high_noise_frac": settings.high_noise_frac},
        "lora_files": [{"path": p, "scale": s, "sha256": hashes[p].result()} for p, s in settings.loras],
        "lora_mode": settings.lora_mode if settings.loras else None,
        "embedding_files": [{"path": p, "token": t, "sha256": hashes[p].result()} for p, t in settings.embeddings],
        "negative_prompt": settings.negative_prompt,
        "prompt_2": settings.prompt_2,
        "negative_prompt_2": settings.negative_prompt_2,
        "scheduler": settings.scheduler or settings.solver,
        "steps": settings.steps,
        "attention": settings.attention,
        "inputs": {
            "control_images": [fingerprint(c.image, i) for c, i in zip(settings.controls, inputs.control_images)],
            "adapter_images": [fingerprint(a.image, i) for a, i in zip(settings.adapters, inputs.adapter_images)],
            "preprocess": settings.preprocess if settings.preprocess == "none" else
            {"name": settings.preprocess, "low": settings.canny_low, "high": settings.canny_high},
            "init_image": fingerprint(settings.init_image, inputs.init_image),
            "mask": fingerprint(settings.mask, inputs.mask),
            "edit_source": settings.edit_source, "edit_target": settings.edit_target,
            "depth_map": None if inputs.depth_map is None else {
                "source": settings.depth_map or "estimated", "path": settings.depth_map,
                "sha256": array_sha256(inputs.depth_map),
                "estimator": None if not settings.depth_estimator else {
                    "path": settings.depth_estimator, "sha256": hashes[settings.depth_estimator].result()}},
        },
        "depth_source": None if inputs.depth_map is None else settings.depth_map or "estimated",
    }


# --- the demo grid -------------------------------------------------------------------------------


def run_demo(settings: InferSettings) -> list[Path]:
    """--demo: the grid of `jaxcontrol.demo.control_grid` for the first prompt, written as
    NAME_demo.png with its sidecar NAME_demo.json; returns [the PNG path]."""
    from jaxcontrol import demo
    from jaxcontrol.images import save_json, save_png
    from jaxcontrol.provenance import hash_paths_in_background

    t0 = time.perf_counter()
    hashes = hash_paths_in_background([settings.model, *settings.controlnet_paths, *settings.adapter_paths])
    pipe = open_pipeline(settings)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings = dataclasses.replace(settings, height=settings.height or size, width=settings.width or size)
    condition = _demo_condition(settings)
    edit_rows, editor = [], None
    # the instruction editor's row (its input image is square, as the demo's default size)
    if settings.model == str(demo.DEFAULT_MODEL) and demo.DEFAULT_EDITOR.is_dir() and settings.height == settings.width:
        editor = demo.load_editor(dtype=settings.dtype, vae_dtype=settings.vae_dtype, attention_impl=settings.attention)
        edit_rows = [demo.edit_row(editor, demo.demo_source(settings.height), demo.DEMO_INSTRUCTIONS,
                                   seed=settings.seed, steps=settings.steps)]
    resolved = dict(editor.last_settings) if editor is not None else None
    grid = demo.control_grid(pipe, settings.prompts[0], condition, seed=settings.seed, steps=settings.steps,
                             guidance_scale=settings.guidance_scale, scheduler=settings.scheduler,
                             extra_rows=edit_rows)
    sidecar = _demo_sidecar(settings, pipe.last_settings, hashes, condition)
    if resolved is not None:
        sidecar["editor"] = {"unet": str(demo.DEFAULT_EDITOR), "instructions": list(demo.DEMO_INSTRUCTIONS),
                             "guidance_scale": resolved["guidance_scale"],
                             "image_guidance_scale": resolved["image_guidance_scale"], "kind": resolved["kind"]}
    path = save_png(grid, settings.output / f"{settings.name}_demo.png")
    save_json(sidecar, settings.output / f"{settings.name}_demo.json")
    print(f"wrote {path} ({settings.prompts[0]!r}, {settings.steps} steps, CFG {settings.guidance_scale:g}, "
          f"seed {settings.seed}) in {time.perf_counter() - t0:.1f} s")
    return [path]


def _demo_condition(settings: InferSettings):
    """The demo's condition, uint8 (height, width, 3): the first --control-image, else a drawn
    circle outline, resized (bilinear)."""
    import numpy as np
    from PIL import Image

    from jaxcontrol import demo

    if settings.controls:
        image = Image.fromarray(np.round(_load("--control-image", settings.controls[0].image) * 255).astype(np.uint8))
    else:
        image = Image.fromarray(demo.circle_outline(max(settings.height, settings.width)))
    return np.asarray(image.resize((settings.width, settings.height), Image.BILINEAR))


def _demo_sidecar(settings: InferSettings, resolved: dict, hashes: dict, condition) -> dict:
    import jaxcontrol
    from jaxcontrol import demo
    from jaxcontrol.provenance import array_sha256

    def network(paths):
        return {"path": paths[0], "sha256": hashes[paths[0]].result()} if paths else None

    return {
        "jaxcontrol_version": jaxcontrol.__version__, "prompt": settings.prompts[0], "negative_prompt": "",
        "seed": settings.seed, "steps": settings.steps, "guidance_scale": settings.guidance_scale,
        "cfg_sweep": list(demo.CFG_SWEEP), "height": settings.height, "width": settings.width,
        **{k: resolved[k] for k in ("solver", "scheduler_config", "prediction_type", "timesteps", "dtype",
                                    "vae_dtype")},
        "model": {"path": settings.model, "sha256": hashes[settings.model].result()},
        "controlnet": network(settings.controlnet_paths), "adapter": network(settings.adapter_paths),
        "condition": {"path": settings.controls[0].image if settings.controls else None,
                      "sha256": array_sha256(condition)},
    }


def console_main():
    """Entry point of `jaxcontrol-infer` and of `python infer.py`."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
