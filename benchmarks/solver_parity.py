"""Solver parity with diffusers' schedulers: prints one row per case (tests/test_schedulers.py and
tests/test_zero_snr_schedules.py check them).

    python benchmarks/solver_parity.py            # every case, then the zero-terminal-SNR matrix
    python benchmarks/solver_parity.py --quick    # one case per solver and a few matrix rows (seconds)
"""

from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore")

from jaxcontrol.errors import ConfigError  # noqa: E402
from jaxcontrol.testing.solver_parity import (  # noqa: E402
    SOLVER_CASES,
    matrix_cases,
    reference_is_finite,
    run_case,
)

QUICK_MATRIX = ("dpmpp_2m-v_prediction-zero_snr", "heun-epsilon-zero_snr", "ddim(clip_sample=False,"
                "set_alpha_to_one=False)-epsilon-zero_snr")


def _row(case_id: str, r: dict, tolerance: float) -> str:
    sig = "-" if r["sigmas_equal"] is None else ("exact" if r["sigmas_equal"] else f"{r['sigmas_max_ulp']} ulp")
    ts = "exact" if r["timesteps_equal"] else "DIFFER"
    return f"{case_id:<100} {r['evals']:>5} {ts:>9} {sig:>10} {r['rel_err']:>9.1e} {tolerance:>7.0e}"


def _header(title: str) -> str:
    header = f"{title:<100} {'evals':>5} {'timesteps':>9} {'sigmas':>10} {'rel err':>9} {'bound':>7}"
    return header + "\n" + "-" * len(header)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one case per solver and three matrix rows")
    args = parser.parse_args(argv)

    worst, failures = 0.0, 0
    print(_header("case"))
    seen = set()
    for case in SOLVER_CASES:
        if args.quick and case.solver in seen:
            continue
        seen.add(case.solver)
        r = run_case(case)
        print(_row(case.id, r, case.tolerance))
        worst = max(worst, r["rel_err"] / case.tolerance)

    print()
    print(_header("zero-terminal-SNR matrix: solver-prediction-schedule"))
    for m in matrix_cases():
        if args.quick and m.id not in QUICK_MATRIX:
            continue
        if m.refused:
            try:
                run_case(m.case)
                verdict = "NOT REFUSED"
                failures += 1
            except ConfigError:
                verdict = "ConfigError"
            ref = "NaN" if not reference_is_finite(m.case) else "finite"
            if ref == "finite":
                failures += 1
            print(f"{m.id:<100} refused: {verdict} (diffusers: {ref})")
            continue
        r = run_case(m.case)
        print(_row(m.id, r, m.case.tolerance))
        worst = max(worst, r["rel_err"] / m.case.tolerance)
        failures += not (r["timesteps_equal"] and r["ours_finite"])
    print(f"\nworst error / bound: {worst:.2f}; failures: {failures}")
    return 0 if worst <= 1 and failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
