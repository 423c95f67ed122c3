"""Print the parity table: jaxcontrol vs diffusers (PyTorch, CPU, float32) on random weights.

    python benchmarks/parity.py            # tiny and SD-2-style configs: U-Net, ControlNet, VAE, CLIP, T2I-Adapters
    python benchmarks/parity.py --full     # plus full-size SD-1.5 U-Net/ControlNet, SD VAE, CLIP-L text, ViT-B/L vision
    python benchmarks/parity.py --bf16     # plus the bf16 compute-mode error against float32
    python benchmarks/parity.py --tiny     # one case of each kind (what the test suite runs)

Exits non-zero if any row exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxcontrol.testing.adapter_parity import ADAPTER_CASES, adapter_rows  # noqa: E402
from jaxcontrol.testing.clip_parity import CLIP_CASES, run_clip_case, parity_rows as clip_rows  # noqa: E402
from jaxcontrol.testing.parity import CASES, QUICK_CASES, format_table, run_case  # noqa: E402
from jaxcontrol.testing.vae_parity import QUICK_VAE_CASES, run_vae_case  # noqa: E402
from jaxcontrol.testing.precision import bf16_error_rows, format_bf16_table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="include the full-size SD-1.5 case")
    ap.add_argument("--bf16", action="store_true", help="also measure the bf16 compute mode")
    ap.add_argument("--cases", nargs="*", help=f"U-Net/ControlNet cases (default: quick set). Known: {', '.join(CASES)}")
    ap.add_argument("--unet-only", action="store_true", help="skip the VAE, CLIP and T2I-Adapter rows")
    ap.add_argument("--tiny", action="store_true", help="only the first quick case of each kind (seconds)")
    args = ap.parse_args()
    if args.tiny and (args.full or args.bf16 or args.cases):
        ap.error("--tiny runs a fixed set of cases: it does not combine with --full, --bf16 or --cases")

    names = args.cases or list(QUICK_CASES[:1] if args.tiny else QUICK_CASES) + (["sd15-full"] if args.full else [])
    rows = []
    for name in names:
        if name not in CASES:
            ap.error(f"unknown case {name!r}; known: {', '.join(CASES)}")
        start = time.perf_counter()
        rows += run_case(CASES[name])
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    if args.tiny and not args.unet_only:
        rows += run_vae_case(QUICK_VAE_CASES[0])
        rows += run_clip_case(CLIP_CASES[next(n for n, c in CLIP_CASES.items() if not c.slow)])
        rows += adapter_rows([next(iter(ADAPTER_CASES))])
    elif not args.unet_only:
        for name in list(QUICK_VAE_CASES) + (["vae-sd-full"] if args.full else []):
            rows += run_vae_case(name)
        rows += clip_rows(full=args.full)
        rows += adapter_rows()
        print("[vae, clip, adapters done]", file=sys.stderr, flush=True)
    print("\nParity with diffusers / transformers (max|ours - torch| / max|torch|), random weights, CPU float32\n")
    print(format_table(rows))
    ok = all(r.ok for r in rows)
    if args.bf16:
        print("\nbf16 compute mode against float32 (tiny-adapter-test config)\n")
        print(format_bf16_table(bf16_error_rows()))
    print(f"\n{sum(r.ok for r in rows)}/{len(rows)} rows within tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
