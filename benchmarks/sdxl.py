"""SDXL on this CPU: loading memory, the U-Net forward and the ControlNet-XL training step,
jaxcontrol against diffusers (PyTorch), float32, random weights.

    python benchmarks/sdxl.py                  # builds a full-size random SDXL folder (13.9 GB) in a temp dir
    python benchmarks/sdxl.py --folder DIR     # an existing SDXL pipeline folder
    python benchmarks/sdxl.py --tiny           # diffusers' tiny SDXL test pipeline (seconds)
    python benchmarks/sdxl.py --no-train-step  # loading and the forward only

1. `load_pipeline` on the folder in a fresh process: peak RSS against the float32 parameter bytes.
2. The U-Net forward (batch 1, 16x16 latents, 77x2048 context, pooled text and micro-conditioning):
   each side in its own process reads the folder's U-Net and runs the same inputs; the first call
   (JAX: trace + compile + run) and the median of the repeats, the peak RSS, and our error
   against diffusers' output.
3. The ControlNet-XL training step: `benchmarks/train_step.py --arch sdxl-reduced` (the full
   step needs 28 GiB before activations; see that script), its table printed here.

Ratios come from one run on one machine; absolute seconds on a shared machine mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_step import _status  # noqa: E402  (this process's VmHWM / VmRSS)


def _inputs(config: dict, batch: int, size: int) -> dict:
    import numpy as np

    g = np.random.default_rng(0)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {"x": g.standard_normal((batch, size, size, config["in_channels"]), dtype=np.float32),
            "t": np.full((batch,), 500, np.int64),
            "ctx": g.standard_normal((batch, 77, config["cross_attention_dim"]), dtype=np.float32),
            "text_embeds": g.standard_normal((batch, pooled), dtype=np.float32),
            "time_ids": np.tile(np.asarray([[1024, 1024, 0, 0, 1024, 1024]], np.float32), (batch, 1))}


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def forward_torch(unet_dir: str, batch: int, size: int, repeats: int, out: str) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(os.cpu_count() or 1)
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    a = _inputs(dict(unet.config), batch, size)
    x = torch.from_numpy(np.ascontiguousarray(a["x"].transpose(0, 3, 1, 2)))
    added = {"text_embeds": torch.from_numpy(a["text_embeds"]), "time_ids": torch.from_numpy(a["time_ids"])}
    args = (x, torch.from_numpy(a["t"]), torch.from_numpy(a["ctx"]))
    with torch.no_grad():
        first, steady, y = _timed(lambda: unet(*args, added_cond_kwargs=added).sample, repeats)
    np.save(out, y.numpy().transpose(0, 2, 3, 1))
    return {"first_s": first, "steady_s": steady, "peak_bytes": _status("VmHWM"),
            "params": sum(p.numel() for p in unet.parameters())}


def forward_jax(unet_dir: str, batch: int, size: int, repeats: int, ref: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxcontrol

    unet, params = jaxcontrol.load_model(unet_dir)
    a = _inputs(dict(unet.config.__dict__), batch, size)
    added = {"text_embeds": jnp.asarray(a["text_embeds"]), "time_ids": jnp.asarray(a["time_ids"])}
    fwd = jax.jit(lambda p, x, t, c, k: unet.apply({"params": p}, x, t, c, added_cond_kwargs=k))
    args = (params, jnp.asarray(a["x"]), jnp.asarray(a["t"]), jnp.asarray(a["ctx"]), added)
    first, steady, y = _timed(lambda: fwd(*args).block_until_ready(), repeats)
    want = np.load(ref)
    err = float(np.max(np.abs(np.asarray(y) - want)) / np.max(np.abs(want)))
    return {"first_s": first, "steady_s": steady, "peak_bytes": _status("VmHWM"), "rel_err": err}


def _child(which: str, args, unet_dir: Path, npy: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--unet", str(unet_dir), "--npy", str(npy),
           "--batch", str(args.batch), "--size", str(args.size), "--repeats", str(args.repeats)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{which} side failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help="an existing diffusers SDXL pipeline folder")
    ap.add_argument("--tiny", action="store_true", help="diffusers' tiny SDXL test pipeline, one repeat")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=16, help="latent height and width")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-train-step", action="store_true", help="skip the ControlNet-XL training step")
    ap.add_argument("--child", choices=("torch", "jax"), help=argparse.SUPPRESS)
    ap.add_argument("--unet", help=argparse.SUPPRESS)
    ap.add_argument("--npy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = forward_torch if args.child == "torch" else forward_jax
        print(json.dumps(fn(args.unet, args.batch, args.size, args.repeats, args.npy)))
        return 0
    if args.tiny:
        args.repeats = 1
    from jaxcontrol.testing.memory import build_sdxl_folder, measure_load_memory

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.folder:
            folder, what = args.folder, str(args.folder.name)
        else:
            what = "tiny random SDXL folder" if args.tiny else "random SDXL folder"
            print(f"building a {what} ...", flush=True)
            if args.tiny:
                from jaxcontrol.testing.sdxl_parity import save_tiny_sdxl_pipeline

                save_tiny_sdxl_pipeline(tmp / "tiny")
                folder = tmp / "tiny" / "pipeline"
            else:
                folder = build_sdxl_folder(tmp / "sdxl")
        load = measure_load_memory(folder)
        print(f"\nload_pipeline({what}): {sum(load['param_counts'].values()) / 1e9:.3f}B params "
              f"({', '.join(f'{k} {v / 1e6:.0f}M' for k, v in load['param_counts'].items())})\n"
              f"  float32 bytes {gib(load['param_bytes_f32'])}, RSS before {gib(load['baseline_bytes'])}, "
              f"peak RSS {gib(load['peak_bytes'])} = {load['peak_over_params']:.2f} x the parameter bytes")
        npy = tmp / "torch_out.npy"
        ref = _child("torch", args, folder / "unet", npy)
        ours = _child("jax", args, folder / "unet", npy)
    print(f"\nSDXL U-Net forward ({ref['params'] / 1e6:.1f}M params), batch {args.batch}, {args.size}x{args.size} "
          f"latents, float32, {os.cpu_count()} CPU cores, median of {args.repeats}\n")
    rows = [("first call s", lambda r: f"{r['first_s']:.2f}", None),
            ("steady s", lambda r: f"{r['steady_s']:.2f}", "steady_s"),
            ("peak RSS (load + run)", lambda r: gib(r["peak_bytes"]), "peak_bytes")]
    header = ("", "jaxcontrol", "diffusers", "ours/theirs")
    table = [(n, f(ours), f(ref), f"{ours[k] / ref[k]:.2f}x" if k else "") for n, f, k in rows]
    table.append(("max rel err vs diffusers", f"{ours['rel_err']:.1e}", "-", ""))
    widths = [max(len(r[i]) for r in table + [header]) for i in range(4)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|-" + "-|-".join("-" * w for w in widths) + "-|")
    for r in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    print("\n'first call' includes tracing and XLA compilation for JAX; ours/theirs < 1 is faster / smaller.")
    if not args.no_train_step:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py")]
        cmd += ["--tiny", "--arch", "sdxl"] if args.tiny else ["--arch", "sdxl-reduced", "--size", "128", "--steps", "2"]
        print(f"\n$ benchmarks/train_step.py {' '.join(cmd[2:])}", flush=True)
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(out.stdout[-6000:])
        if out.returncode != 0:
            print(out.stderr[-4000:], file=sys.stderr)
            return out.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
