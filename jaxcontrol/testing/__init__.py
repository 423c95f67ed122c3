"""Parity harness against the PyTorch references (diffusers / transformers on CPU, float32).

Needs the `test` extra (torch, diffusers, transformers). Used by `tests/` and `benchmarks/parity.py`.
"""
