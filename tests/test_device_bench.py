"""benchmarks/device_bench.py: its peak table, MFU, attention paths, the FLOP counting it rests on
(XLA's cost analysis: 2 FLOPs per multiply-add, a loop body counted once), its table, and a real
tiny run of the U-Net section (the whole script's tiny run is in tests/test_benchmarks.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import device_bench as db


@pytest.mark.parametrize("kind, platform, expected", [
    ("NVIDIA H200", "gpu", 989.0),
    ("NVIDIA H100 80GB HBM3", "gpu", 989.0),
    ("NVIDIA H100 PCIe", "gpu", 756.0),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312.0),
    ("TPU v4", "tpu", 275.0),
    ("TPU v5 lite", "tpu", 197.0),
    ("TPU v5p", "tpu", 459.0),
    ("TPU v5", "tpu", 459.0),
    ("TPU v6 lite", "tpu", 918.0),
    ("NVIDIA GeForce GTX 1080", "gpu", None),
    ("cpu", "cpu", None),
])
def test_peak_by_device_kind(kind, platform, expected):
    assert db.peak_tflops(kind, platform) == expected


def test_peak_override_and_mfu():
    assert db.peak_tflops("cpu", "cpu", 2.5) == 2.5
    assert db.peak_tflops("NVIDIA H200", "gpu", 500) == 500.0
    assert db.mfu(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5)
    assert db.mfu(4e12, 2.0, 4.0) == pytest.approx(0.5)
    assert db.mfu(1e12, 1.0, None) is None and db.mfu(None, 1.0, 989.0) is None


def test_attention_paths_per_platform():
    assert db.attention_paths("cpu") == ("auto", "plain", "chunked", "dot_product")
    assert db.attention_paths("gpu") == ("auto", "cudnn", "dot_product", "chunked", "plain")
    assert db.attention_paths("tpu") == ("auto", "tpu_flash", "dot_product", "plain")
    assert db.attention_paths("gpu", ["cudnn", "auto", "cudnn"]) == ("cudnn", "auto")
    with pytest.raises(ValueError, match="cudnn"):
        db.attention_paths("cpu", ["auto", "cudnn"])
    with pytest.raises(ValueError, match="tpu_flash"):
        db.attention_paths("gpu", ["tpu_flash"])
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        db.attention_paths("cpu", ["flash"])


def test_run_order_puts_the_first_path_everywhere_first():
    assert db.run_order(("auto", "plain"), ("unet", "train")) == [
        ("unet", "auto"), ("train", "auto"), ("unet", "plain"), ("train", "plain")]


def test_xla_counts_two_flops_per_multiply_add():
    a = jnp.ones((64, 32), jnp.bfloat16)
    b = jnp.ones((32, 16), jnp.bfloat16)
    lowered = jax.jit(jnp.matmul).lower(a, b)
    assert db.reference_flops(lowered) == 2 * 64 * 32 * 16


def test_xla_counts_a_loop_body_once_so_the_reference_refuses_loops():
    """Why FLOPs come from loop-free "plain" lowerings, and the pipeline's (evaluations - 1) term:
    a scan of 10 products counts as one. Should XLA start multiplying by trip counts, this fails
    and the pipeline's formula must change."""
    x = jnp.ones((32, 32))
    one = db.cost(jax.jit(lambda x: x @ x).lower(x))["flops"]
    scan = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=10)[0]).lower(x)
    assert db.cost(scan)["flops"] == pytest.approx(one, rel=0.01)
    assert db.count_loops(scan) == 1
    with pytest.raises(RuntimeError, match="1 while loop"):
        db.reference_flops(scan)
    assert db.reference_flops(scan, loops=1) == pytest.approx(one, rel=0.01)


def test_random_bit_loops_are_not_counted():
    lowered = jax.jit(lambda k: jax.random.normal(k, (8,))).lower(jax.random.key(0))
    assert db.count_loops(lowered) == 0


def test_table_rows():
    measured = db.finish(db.Row("train", "auto", "ControlNet train step, 64x64", 2, "samples/s", compile_s=3.0,
                                times_s=[0.5, 0.3, 0.4], flops=2e12, xla_flops=1e12, mem_bytes=2**30), peak=10.0)
    assert measured.step_s == 0.4 and measured.throughput == pytest.approx(5.0)
    assert measured.tflops_per_s == pytest.approx(5.0) and measured.mfu == pytest.approx(0.5)
    skipped = db.Row("unet", "plain", "U-Net forward, 8x8 latents", 2, "images/s", note="skipped: time budget")
    text = db.format_table([measured, skipped], "header", ["footnote"])
    lines = text.splitlines()
    assert lines[0] == "header" and lines[-1] == "footnote"
    assert "| U-Net forward, 8x8 latents | plain | 2 | - | - | skipped: time budget |" in text
    assert "| ControlNet train step, 64x64 | auto | 2 | 3.0 | 0.4 | 5 samples/s | 2 | 5 | 50.0% | 50% | 1.00 |" in text
    assert text.index("U-Net forward") < text.index("ControlNet train step")  # section order


@pytest.mark.slow
def test_tiny_unet_section_runs(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = db.main(["--tiny", "--sections", "unet", "--attention", "auto", "chunked", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| U-Net forward, 8x8 latents | auto | 2 |" in table and "| MFU |" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["attention"] for r in rows] == ["auto", "chunked"]
    auto, chunked = rows
    assert auto["flops"] == chunked["flops"] > 0  # the same model FLOPs for every path
    assert len(auto["times_s"]) == 2 and auto["mfu"] is None  # no peak on the CPU
    assert auto["xla_flops"] >= 0.99 * auto["flops"]  # "auto" is "plain" at 64 queries on the CPU
    assert chunked["xla_flops"] < auto["xla_flops"]  # lax.map's body counted once
    assert auto["mem_bytes"] > 0


def test_budget_skips_and_keeps_the_table(capsys):
    rc = db.main(["--tiny", "--sections", "unet", "pipeline", "--attention", "auto", "--budget-s", "0"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| U-Net forward, 8x8 latents | auto | 2 | - | - | skipped: time budget |" in table
    assert "| pipeline 64x64, 2 steps, CFG, ControlNet | auto | 1 | - | - | skipped: time budget |" in table
