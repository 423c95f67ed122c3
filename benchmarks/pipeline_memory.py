"""Peak host memory of loading a full-size SD-1.5 pipeline folder (random weights) with load_pipeline.

    python benchmarks/pipeline_memory.py [--folder DIR]   # builds a 4.3 GB folder in a temp dir if none given
    python benchmarks/pipeline_memory.py --tiny           # a tiny random pipeline instead (seconds)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from jaxcontrol.testing.memory import build_sd15_folder, measure_load_memory  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help="an existing diffusers SD-1.5 pipeline folder")
    ap.add_argument("--tiny", action="store_true", help="build a tiny random pipeline instead of a full-size one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder:
            folder, what = args.folder, "the given folder"
        elif args.tiny:
            from _tiny import build_tiny_sd_folder

            folder, what = build_tiny_sd_folder(Path(tmp) / "tiny"), "a tiny random SD-layout folder"
        else:
            folder, what = build_sd15_folder(Path(tmp) / "sd15"), "a random full-size SD-1.5 folder"
        r = measure_load_memory(folder)
    gib = 1024**3
    print(f"\nload_pipeline on {what}\n")
    for name, n in r["param_counts"].items():
        print(f"  {name:<14} {n / 1e6:>9.1f} M params")
    print(f"  {'float32 bytes':<14} {r['param_bytes_f32'] / gib:>9.2f} GiB")
    print(f"  {'RSS before':<14} {r['baseline_bytes'] / gib:>9.2f} GiB  (python + jax + jaxcontrol imported)")
    print(f"  {'peak RSS':<14} {r['peak_bytes'] / gib:>9.2f} GiB  = {r['peak_over_params']:.2f} x the float32 params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
