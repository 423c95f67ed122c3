"""Throughput of the full SD-1.5 architecture + one ControlNet (random weights): ours vs diffusers.

Builds a full-size random SD-1.5 pipeline folder plus a ControlNet (diffusers' `from_unet`),
then runs text-to-image with classifier-free guidance at a reduced size in two fresh processes:
one for our `Pipeline`, one for diffusers' `StableDiffusionControlNetPipeline`. The two processes
use the same weights, prompts, initial latents and settings. It reports:

* compile time (ours: the first call minus a steady call);
* images per second (median of `--repeats` steady calls) and the ratio;
* peak host memory (VmHWM) of each process;
* the largest difference between the two outputs.

    python benchmarks/pipeline_throughput.py [--size 256] [--batch 2] [--steps 10] [--repeats 2]
    python benchmarks/pipeline_throughput.py --tiny   # tiny random models, 64x64, batch 1, 2 steps (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(args) -> None:
    import statistics
    import time
    import warnings

    import numpy as np

    warnings.filterwarnings("ignore")
    folder, cn = Path(args.folder) / "pipeline", Path(args.folder) / "controlnet"
    rng = np.random.default_rng(0)
    h = args.size // 8
    latents = rng.standard_normal((args.batch, h, h, 4)).astype(np.float32)
    control = rng.random((args.batch, args.size, args.size, 3)).astype(np.float32)
    prompts = ["a red circle with light blue background"] * args.batch
    times = []
    if args.child == "ours":
        from jaxcontrol.pipeline import ControlInput, Pipeline

        pipe = Pipeline.from_pretrained(folder, controlnets=[cn], attention_impl=args.attention)

        def call():
            return pipe(prompts, height=args.size, width=args.size, num_inference_steps=args.steps,
                        guidance_scale=7.5, scheduler="ddim", latents=latents, controls=[ControlInput(control, 1.0)],
                        output_type="float")
    else:
        import torch
        from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

        torch.set_num_threads(os.cpu_count() or 1)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            folder, controlnet=ControlNetModel.from_pretrained(cn), safety_checker=None,
            requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        pipe.set_progress_bar_config(disable=True)
        t_lat = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
        t_ctl = torch.from_numpy(control.transpose(0, 3, 1, 2).copy())

        def call():
            with torch.no_grad():
                return pipe(prompts, image=t_ctl, height=args.size, width=args.size, num_inference_steps=args.steps,
                            guidance_scale=7.5, latents=t_lat, output_type="np").images

    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    steady = statistics.median(times)
    peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    np.save(Path(args.folder) / f"out_{args.child}.npy", np.asarray(out))
    print(json.dumps({"first": first, "steady": steady, "peak": peak}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--attention", default="auto", help="jaxcontrol's attention_impl (default auto, as a user gets)")
    ap.add_argument("--folder", help="reuse a folder built by an earlier run")
    ap.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random U-Net / VAE / CLIP / ControlNet, 64x64, batch 1, 2 steps, one repeat")
    args = ap.parse_args()
    if args.tiny:
        args.size, args.batch, args.steps, args.repeats = 64, 1, 2, 1
    if args.child:
        _child(args)
        return 0

    import numpy as np

    tmp = None
    if args.folder is None:
        tmp = tempfile.TemporaryDirectory()
        args.folder = tmp.name
    folder = Path(args.folder)
    if not (folder / "controlnet" / "config.json").is_file():
        import torch
        from diffusers import ControlNetModel, UNet2DConditionModel

        if args.tiny:
            from _tiny import build_tiny_sd_folder as build_sd15_folder
        else:
            from jaxcontrol.testing.memory import build_sd15_folder

        build_sd15_folder(folder / "pipeline")
        torch.manual_seed(1)
        unet = UNet2DConditionModel.from_pretrained(folder / "pipeline" / "unet")
        cn = ControlNetModel.from_unet(unet)
        for p in cn.parameters():  # non-zero zero-convolutions, so the ControlNet matters
            p.data.add_(torch.randn_like(p) * 1e-3)
        cn.save_pretrained(folder / "controlnet")
        del unet, cn
    results = {}
    for child in ("diffusers", "ours"):
        cmd = [sys.executable, __file__, "--child", child, "--folder", str(folder), "--size", str(args.size),
               "--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats),
               "--attention", args.attention]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        results[child] = json.loads(res.stdout.strip().splitlines()[-1])
    ours_img, ref_img = np.load(folder / "out_ours.npy"), np.load(folder / "out_diffusers.npy")
    diff = float(np.abs(ours_img - ref_img).max())
    gib = 1024**3
    what = "Tiny SD-layout U-Net + ControlNet + CLIP + VAE" if args.tiny else \
        "SD-1.5 (859.5M U-Net) + ControlNet (361M) + CLIP-L + VAE"
    print(f"\n{what}, random weights, {args.size}x{args.size}, "
          f"batch {args.batch}, {args.steps} DDIM steps, CFG 7.5, float32, {os.cpu_count()} CPU cores\n")
    header = f"{'implementation':<34} {'compile s':>10} {'s/call':>8} {'images/s':>9} {'peak GiB':>9} {'vs diffusers':>13}"
    print(header)
    print("-" * len(header))
    base = args.batch / results["diffusers"]["steady"]
    for name, key in (("diffusers (PyTorch eager)", "diffusers"), (f"jaxcontrol (jit, {args.attention})", "ours")):
        r = results[key]
        ips = args.batch / r["steady"]
        compile_s = "-" if key == "diffusers" else f"{r['first'] - r['steady']:.1f}"
        print(f"{name:<34} {compile_s:>10} {r['steady']:>8.2f} {ips:>9.3f} {r['peak'] / gib:>9.2f} {ips / base:>13.2f}")
    print(f"\nlargest |ours - diffusers| over the output images (values in [0, 1]): {diff:.2e}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
