#!/usr/bin/env bash
# The device benchmark (benchmarks/device_bench.py) on one GPU or TPU host, in one command:
#
#     benchmarks/device_run.sh [OUT_DIR] [device_bench.py options...]
#     benchmarks/device_run.sh /tmp/bench --attention auto cudnn     # two paths only
#
# Writes OUT_DIR/device_bench.md (the markdown table, for docs/PERFORMANCE.md), device_bench.json
# (the rows, rewritten after each configuration, so a run stopped early keeps what finished) and
# device_bench.log (progress), and prints the table. The benchmark keeps itself within its
# --budget-s (420 s by default: every configuration that would end later is skipped and marked);
# `timeout` stops it after 540 s in any case (SIGINT first, which prints the finished rows; SIGKILL
# 30 s later), so a command limited to 10 minutes returns its output.
#
# XLA may take 90% of the device memory instead of its default 75%: the "plain" and
# "dot_product" training steps keep every attention score tensor for the backward pass.
#
# Needs python3 with jax for the accelerator, flax, optax, transformers, torch (for the tokenizer
# helper of jaxcontrol.testing) and ml_collections (the training config). On a machine without a
# package index, put the missing wheels in .whl/ of this checkout: they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
[ $# -gt 0 ] && shift
mkdir -p "$out"
python="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/jaxcontrol-bench-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/jaxcontrol-bench-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
timeout --signal=INT --kill-after=30 540 "$python" benchmarks/device_bench.py --json "$out/device_bench.json" "$@" \
  >"$out/device_bench.md" 2> >(tee "$out/device_bench.log" >&2)
status=$?
cat "$out/device_bench.md"
exit "$status"
