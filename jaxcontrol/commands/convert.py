"""Convert Stable Diffusion / ControlNet / T2I-Adapter checkpoints to the jaxcontrol format or to diffusers.

    python convert_weights.py --from v1-5-pruned-emaonly.safetensors --to sd15-jax --tokenizer sd15/tokenizer
    python convert_weights.py --from control_v11p_sd15_canny.pth --to canny-jax --dtype bfloat16
    python convert_weights.py --from my-trained-controlnet-jax --to controlnet-torch --format diffusers

A thin command line over `jaxcontrol.convert.convert`; see `docs/ARCHITECTURE.md` for the formats.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """\
Convert a checkpoint to the jaxcontrol format (Orbax parameters + diffusers config.json per
component, read fastest by train.py and infer.py) or to a diffusers folder that diffusers'
from_pretrained loads.

Inputs (the format is detected from the tensor names):
  LDM / CompVis single files, Stable Diffusion 1.x and 2.x (.ckpt, .safetensors), EMA or not,
  including the concatenation-conditioned ones: SD inpainting (sd-v1-5-inpainting, 9 U-Net input
  channels), SD-2 depth (512-depth-ema, 5) and InstructPix2Pix (instruct-pix2pix-00-22000, 8);
  ControlNet v1.0 (control_sd15_*.pth, whole ControlLDM) and v1.1 (control_v11*.pth);
  original T2I-Adapter files (full and light); a standalone LDM VAE;
  diffusers model and pipeline folders; jaxcontrol checkpoints (to export them to diffusers).

Output is written to a temporary folder beside --to and renamed into place when complete: a
failed or interrupted conversion leaves nothing behind and never replaces an existing output.
Pickle files (.ckpt, .pth, .pt, .bin) are read with torch's safe weights-only loader."""

EPILOG = """\
values the weights do not record:
  Attention head counts are not stored in any checkpoint. SD-1.x (cross-attention width 768)
  gets 8 heads, SD-2.x (1024) 64 channels per head; CLIP text encoders 64 channels per head.
  GroupNorm groups default to 32. Override any config field with --set, e.g.
    --set unet.attention_head_dim=8 --set text_encoder.num_attention_heads=12
  The prediction type (epsilon or v_prediction) cannot be read from the weights: SD-1.x files
  are taken as epsilon, SD-2.x files as v_prediction unless global_step is 875000 (diffusers'
  rule for the 512 base model). Use --prediction-type when you know better.

inpainting, depth and InstructPix2Pix files:
  The kind is read from the width of the U-Net's first convolution
  (model.diffusion_model.input_blocks.0.0.weight: 4 text2image, 5 depth, 8 instruct_pix2pix,
  9 inpaint) and written as the pipeline class (model_index.json's _class_name, jaxcontrol.json's
  pipeline_class): StableDiffusionInpaintPipeline, StableDiffusionDepth2ImgPipeline,
  StableDiffusionInstructPix2PixPipeline (a pipeline folder labelled StableDiffusionPipeline is
  relabelled the same way). --kind asserts the kind: one the width contradicts is refused. A
  pipeline whose U-Net has another width is refused; --component unet converts that U-Net alone. SD-2 depth
  and inpainting files are taken as epsilon models. A depth file's MiDaS estimator (depth_model.*)
  is not converted (the note says so): the depth pipeline's depth_estimator and feature_extractor
  are left empty, and depth maps are given as input.

exit status (the same in infer.py and train.py): 0 on success (and --help); 1 on a runtime error
(a bad or unsupported checkpoint, an unwritable --to, an I/O failure); 2 on bad arguments;
130 when interrupted (Ctrl-C). Errors print one line, never a traceback.

interrupted runs:
  Output is written in .NAME.tmp-* beside --to; the next conversion to the same --to deletes the
  ones a killed run on this host left. --overwrite swaps the old and the new folder in one step
  (Linux); elsewhere a kill between its two renames is repaired by the next run or load, which
  puts the old folder back."""


PROG = "convert_weights.py"


def parse_set(values: list[str]) -> dict[str, dict]:
    """The `--set COMPONENT.FIELD=VALUE` flags as {component: {field: value}}.

    VALUE is parsed as JSON, else kept as a plain string (e.g. full_adapter_xl). Raises `UsageError`
    for an item not of that form or a value nested too deeply.
    """
    from jaxcontrol.errors import UsageError

    out: dict[str, dict] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        component, dot, field = key.partition(".")
        if not sep or not dot or not component or not field:
            raise UsageError(f"--set expects COMPONENT.FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as full_adapter_xl
        except RecursionError:
            raise UsageError(f"--set {key}: the value is nested too deeply") from None
        out.setdefault(component, {})[field] = value
    return out


def parse_configs(values: list[str]) -> dict[str, dict]:
    """The `--config COMPONENT=PATH` flags as {component: parsed config.json}.

    PATH is a config.json file or a folder holding one. Raises `UsageError` for an item not of that
    form, and naming the component for a file that is missing, unreadable or not a JSON object.
    """
    from jaxcontrol.convert.paths import read_json
    from jaxcontrol.errors import UsageError

    out = {}
    for item in values:
        component, sep, path = item.partition("=")
        if not sep or not component or not path:
            raise UsageError(f"--config expects COMPONENT=PATH, got {item!r}")
        file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
        try:
            out[component] = read_json(file, "config.json")
        except ValueError as e:
            raise UsageError(f"--config {component}: {e}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    """The `convert_weights.py` argument parser (its options and help text; parsing is the caller's)."""
    p = argparse.ArgumentParser(prog="convert_weights.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, metavar="PATH",
                   help="input checkpoint: a single file (.safetensors, .ckpt, .pth, .pt, .bin) or a folder "
                        "(diffusers model or pipeline, or jaxcontrol checkpoint)")
    p.add_argument("--to", dest="dest", required=True, metavar="DIR",
                   help="output folder; must not exist unless --overwrite")
    p.add_argument("--format", choices=("jaxcontrol", "diffusers"), default="jaxcontrol",
                   help="output format: jaxcontrol (Orbax params + config.json per component, default) or diffusers "
                        "(config.json + diffusion_pytorch_model.safetensors; model.safetensors for CLIP; a pipeline "
                        "folder with model_index.json when there are several components)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the written floating-point parameters (default float32)")
    p.add_argument("--component", action="append", metavar="NAME",
                   help="convert only this component (repeatable): unet, vae, text_encoder, controlnet, adapter, ... "
                        "default: all the input holds")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="LDM files holding both: use the EMA weights (model_ema.*) for the U-Net (--ema) or the "
                        "regular ones (--no-ema, the default)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"),
                   help="what the U-Net predicts; written to the scheduler config and the manifest (the weights "
                        "cannot tell; see below)")
    p.add_argument("--kind", choices=("auto", "text2image", "depth", "instruct_pix2pix", "inpaint"), default="auto",
                   help="the U-Net's kind; auto (default) reads it from the U-Net's input width (4, 9, 5, 8 channels); "
                        "a kind the width contradicts is refused (see below)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a tokenizer folder to copy into a converted pipeline (single files hold none; without one "
                        "the pipeline cannot encode prompts)")
    p.add_argument("--tokenizer-2", metavar="DIR",
                   help="SDXL's second tokenizer folder (OpenCLIP bigG's, `tokenizer_2/` of a diffusers SDXL folder) "
                        "to copy into a converted SDXL pipeline; single files hold none")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="COMPONENT.FIELD=VALUE",
                   help="set one config field of a component (diffusers field names; VALUE is JSON, or a string), "
                        "e.g. --set controlnet.global_pool_conditions=true (repeatable)")
    p.add_argument("--config", dest="configs", action="append", default=[], metavar="COMPONENT=PATH",
                   help="use this config.json (or folder holding one) for a component instead of inferring it from "
                        "tensor shapes; the shapes are still checked (repeatable)")
    p.add_argument("--unsafe-load-pickle", action="store_true",
                   help="let pickle files build arbitrary Python objects. RISK: a crafted .ckpt/.pth/.bin runs any "
                        "code it contains with your permissions. Only for legacy files from a source you trust")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --to folder (only once the new output is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes as in `jaxcontrol.cli` (0 ok, 1 runtime, 2 usage, 130 interrupted)."""
    from jaxcontrol.cli import run_main

    return run_main(PROG, lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)  # --help exits 0, a bad flag 2, as argparse does
    overrides = parse_set(args.set_)
    configs = parse_configs(args.configs)

    from jaxcontrol.convert import convert, format_summary

    def progress(description: str, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{description:<14}", unit="tensor", file=sys.stderr, leave=False)

    src = Path(args.src)
    if src.is_file():
        print(f"reading {src} ({src.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)
    report = convert(
        src, args.dest, format=args.format, dtype=args.dtype, components=args.component,
        unsafe_load_pickle=args.unsafe_load_pickle, ema=args.ema, prediction_type=args.prediction_type,
        overrides=overrides, configs=configs, tokenizer=args.tokenizer, tokenizer_2=args.tokenizer_2, kind=args.kind,
        overwrite=args.overwrite,
        progress=None if args.no_progress else progress,
    )
    print(format_summary(report))
    return 0


def console_main():
    """Entry point of `jaxcontrol-convert` and of `python convert_weights.py`."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
