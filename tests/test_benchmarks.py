"""Every benchmark script runs: each one, with its tiny option, in a fresh process (as a user runs
it, one CPU device), exits 0 and prints its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))

# script -> (its tiny arguments, a line of the table it must print, slow). The slow ones compile a training
# step or run two pipelines in two processes (about 25 s of CPU each; device_bench.py compiles a U-Net, a
# pipeline and a training step, about 40 s), or repeat what the fast suite checks by itself: parity.py's
# cases are tests/test_unet_parity.py's, control_fidelity.py's and edit_fidelity.py's metrics are
# tests/test_embedded.py's (each about 60 s). The rest run in the fast suite, as does device_bench.py's U-Net section
# (tests/test_device_bench.py).
RUNS = {
    "attention_guidance.py": (["--tiny"], "| guidance | colour acc | sharpness |", True),
    "control_fidelity.py": (["--tiny"], "| control | edge IoU | Chamfer (px) | colour acc |", True),
    "edit_fidelity.py": (["--tiny"], "| text scale s_T | image scale s_I | edit success |", True),
    "device_bench.py": (["--tiny", "--attention", "auto", "plain"], "| ControlNet train step, 64x64 | auto | 2 |", True),
    "parity.py": (["--tiny"], "rows within tolerance", True),
    # seven training runs of 4 steps each on the embedded model, with class images (about 6 min)
    "personalization.py": (["--tiny"], "| method | WORD | teal named (circle) |", True),
    "pipeline_memory.py": (["--tiny"], "peak RSS", True),
    "pipeline_throughput.py": (["--tiny"], "images/s", True),
    "sampler_speed.py": (["--tiny"], "compile vs first", False),
    # two networks in four processes plus a ControlNet-XL training step (about 90 s)
    "sdxl.py": (["--tiny"], "| max rel err vs diffusers |", True),
    "solver_parity.py": (["--quick"], "worst error / bound", False),
    "train_step.py": (["--tiny"], "samples/s", True),
    "unet_speed.py": (["--tiny"], "torch/this", True),
}


def test_every_benchmark_has_a_tiny_run():
    assert SCRIPTS and set(SCRIPTS) == set(RUNS), set(SCRIPTS) ^ set(RUNS)


def run_benchmark(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if RUNS[s][2] else [])
                                    for s in sorted(RUNS)])
def test_benchmark_runs_with_its_tiny_option(script, tmp_path):
    args, header, _ = RUNS[script]
    if script == "control_fidelity.py":  # the training-step table from ControlNet snapshots
        args = args + ["--runs", str(fake_runs(tmp_path / "runs"))]
    out = run_benchmark(script, args, tmp_path)
    assert out.returncode == 0, f"{script} {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert header in out.stdout, out.stdout[-3000:]
    if script == "control_fidelity.py":
        assert "| step | edge IoU |" in out.stdout and "| 100 |" in out.stdout and "| 200 |" in out.stdout


def fake_runs(runs: Path) -> Path:
    """A `runs/embedded` layout whose ControlNet snapshots (steps 100 and 200) are the embedded one."""
    from jaxcontrol import demo

    export = runs / "controlnet" / "export"
    for target in (export / "steps" / "100" / "jaxcontrol" / "controlnet", export / "jaxcontrol" / "controlnet"):
        target.parent.mkdir(parents=True)
        target.symlink_to(demo.DEFAULT_CONTROLNET, target_is_directory=True)
    (runs / "controlnet" / "config.json").write_text(json.dumps({"steps": 200}))
    return runs
