"""Time one full SD-1.5 U-Net forward (batch 2, 64x64 latents, 77x768 context, float32) in JAX and PyTorch.

Both run in this one process on the same random weights, one after the other, so the ratio is
meaningful on a shared, noisy machine; absolute seconds are not. JAX's first call (trace + XLA
compile + run) is reported separately from the steady-state time.

    python benchmarks/unet_speed.py [--batch 2] [--size 64] [--repeats 3] [--attention auto plain]
    python benchmarks/unet_speed.py --tiny   # a two-block U-Net, batch 1, 8x8 latents, one repeat (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaxcontrol.convert.diffusers_folder import build_module, load_params  # noqa: E402
from jaxcontrol.convert.sources import source_from_state_dict  # noqa: E402
from jaxcontrol.testing.parity import SD15, TINY_ADAPTER_TEST  # noqa: E402

# --tiny: diffusers' tiny adapter-test U-Net with SD's 768-wide context
TINY = {**TINY_ADAPTER_TEST, "cross_attention_dim": 768}


def _time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="latent height and width")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", nargs="+", default=["auto", "plain"])
    ap.add_argument("--tiny", action="store_true", help="a two-block U-Net, batch 1, 8x8 latents, one repeat")
    args = ap.parse_args()
    config, what = (TINY, "tiny two-block") if args.tiny else (SD15, "SD-1.5")
    if args.tiny:
        args.batch, args.size, args.repeats = 1, 8, 1

    torch.set_num_threads(os.cpu_count() or 1)
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    t_unet = TorchUNet(**config).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g)
    ctx = torch.randn(args.batch, 77, 768, generator=g)
    t = torch.tensor([500] * args.batch)

    rows = []
    with torch.no_grad():
        start = time.perf_counter()
        ref = t_unet(x, t, ctx).sample
        first = time.perf_counter() - start
        med, _ = _time(lambda: t_unet(x, t, ctx).sample, args.repeats)
    rows.append(("diffusers (PyTorch eager)", first, med, ref.numpy()))
    state = {k: v for k, v in t_unet.state_dict().items()}

    jx = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    jctx, jt = jnp.asarray(ctx.numpy()), jnp.asarray(t.numpy())
    for impl in args.attention:
        unet = build_module({"_class_name": "UNet2DConditionModel", **config}, attention_impl=impl)
        params = load_params(unet, source_from_state_dict(state, "torch"))
        fwd = jax.jit(lambda p, a, b, c: unet.apply({"params": p}, a, b, c))
        start = time.perf_counter()
        out = fwd(params, jx, jt, jctx).block_until_ready()
        first = time.perf_counter() - start
        med, _ = _time(lambda: fwd(params, jx, jt, jctx).block_until_ready(), args.repeats)
        rows.append((f"jaxcontrol (jit, attention={impl})", first, med, np.asarray(out).transpose(0, 3, 1, 2)))
        params = None  # free before the next variant is loaded
    t_unet = state = None

    base = rows[0][2]
    ref_out = rows[0][3]
    print(f"\n{what} U-Net forward, batch {args.batch}, {args.size}x{args.size} latents, 77x768 context, float32, "
          f"{os.cpu_count()} CPU cores, median of {args.repeats}\n")
    header = f"{'implementation':<40} {'first call s':>13} {'steady s':>10} {'torch/this':>11} {'rel err':>10}"
    print(header)
    print("-" * len(header))
    for name, first, med, out in rows:
        err = float(np.max(np.abs(out - ref_out)) / np.max(np.abs(ref_out)))
        print(f"{name:<40} {first:>13.2f} {med:>10.2f} {base / med:>11.2f} {err:>10.1e}")
    print("\n'first call' includes tracing and XLA compilation for JAX; 'torch/this' > 1 means faster than PyTorch.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
