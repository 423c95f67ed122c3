"""Compile once, scan, not unroll: sampler compile time against the number of steps, and steps/s.

A tiny random U-Net under classifier-free guidance (and, with --controlnet, one ControlNet) is
sampled by each solver for 20 and 50 steps. Compile time is `jit(...).lower(...).compile()`; run
time is the median of --repeats calls after that. The scan body is the same for any step count,
so compile time should not grow with it.

    python benchmarks/sampler_speed.py [--solvers ddim dpmpp_2m ...] [--size 16] [--batch 2]
    python benchmarks/sampler_speed.py --tiny   # DDIM at 2 and 4 steps, 8x8 latents, one repeat (seconds)
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

import jaxcontrol as jc  # noqa: E402
from jaxcontrol import guidance as G  # noqa: E402
from jaxcontrol.sampler import initial_latents, sample  # noqa: E402
from jaxcontrol.schedulers import make_plan  # noqa: E402
from jaxcontrol.testing.parity import TINY_CONTROLNET_TEST  # noqa: E402
from jaxcontrol.testing.solver_parity import SD_BETAS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvers", nargs="+", default=["ddim", "pndm", "euler", "heun", "dpmpp_2m", "unipc"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 50])
    ap.add_argument("--size", type=int, default=16, help="latent height and width")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--controlnet", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="ddim, 2 and 4 steps, 8x8 latents, batch 1, one repeat")
    args = ap.parse_args()
    if args.tiny:
        args.solvers, args.steps, args.size, args.batch, args.repeats = ["ddim"], [2, 4], 8, 1, 1

    unet = jc.UNet2DConditionModel(jc.UNet2DConditionConfig(**TINY_CONTROLNET_TEST))
    params = jc.init_params(unet, jax.random.key(0))
    units = []
    if args.controlnet:
        cn, cparams = jc.controlnet_from_unet(unet, params, jax.random.key(1),
                                              conditioning_embedding_out_channels=(16, 32))
        units = [G.ControlNetUnit(cn, cparams, scale=0.8)]
    model = G.classifier_free(G.unet_prediction(unet, params, controlnets=units), 7.5)
    b, s = args.batch, args.size
    key = jax.random.key(2)
    text = jax.random.normal(key, (b, 8, TINY_CONTROLNET_TEST["cross_attention_dim"]))
    branch = {"text": text}
    if units:
        branch["control"] = (jnp.ones((b, 2 * s, 2 * s, 3)) * 0.5,)
    cond = {"cond": branch, "uncond": {**branch, "text": text * 0}}
    noise = jax.random.normal(key, (b, s, s, 4))
    config = {**SD_BETAS, "_class_name": "PNDMScheduler", "skip_prk_steps": True, "steps_offset": 1}

    rows = []
    for solver in args.solvers:
        for steps in args.steps:
            plan = make_plan(config, steps, solver)
            fn = jax.jit(lambda z, k, plan=plan: sample(model, plan, initial_latents(plan, z), cond, key=k))
            start = time.perf_counter()
            compiled = fn.lower(noise, key).compile()
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                compiled(noise, key).block_until_ready()
                times.append(time.perf_counter() - start)
            run_s = statistics.median(times)
            rows.append((solver, steps, plan.num_evals, compile_s, run_s, plan.num_evals / run_s))

    print(f"\nTiny U-Net{' + ControlNet' if units else ''}, CFG (batch {2 * b} per call), {s}x{s} latents, "
          f"{os.cpu_count()} CPU cores, median of {args.repeats}\n")
    header = f"{'solver':<12} {'steps':>5} {'evals':>5} {'compile s':>10} {'run s':>8} {'evals/s':>8} {'compile vs first':>17}"
    print(header)
    print("-" * len(header))
    first = {}
    for solver, steps, evals, c, r, eps in rows:
        first.setdefault(solver, c)
        print(f"{solver:<12} {steps:>5} {evals:>5} {c:>10.2f} {r:>8.3f} {eps:>8.1f} {c / first[solver]:>17.2f}")
    print("\n'compile vs first': compile time relative to the same solver's first (smallest) step count.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
