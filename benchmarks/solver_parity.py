"""Solver parity with diffusers' schedulers: prints one row per case (tests/test_schedulers.py checks them).

    python benchmarks/solver_parity.py
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")

from jaxcontrol.testing.solver_parity import SOLVER_CASES, run_case  # noqa: E402


def main() -> int:
    header = f"{"case":<100} {'evals':>5} {'timesteps':>9} {'sigmas':>10} {'rel err':>9} {'bound':>7}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for case in SOLVER_CASES:
        r = run_case(case)
        sig = "-" if r["sigmas_equal"] is None else ("exact" if r["sigmas_equal"] else f"{r['sigmas_max_ulp']} ulp")
        ts = "exact" if r["timesteps_equal"] else "DIFFER"
        print(f"{case.id:<100} {r['evals']:>5} {ts:>9} {sig:>10} {r['rel_err']:>9.1e} {case.tolerance:>7.0e}")
        worst = max(worst, r["rel_err"] / case.tolerance)
    print(f"\nworst error / bound: {worst:.2f}")
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
