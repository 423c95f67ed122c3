"""What follows from the machine a program runs on: the platform and the default compute dtype.

* **Compute dtype "auto"** is bfloat16 on GPUs and TPUs (their matrix units run bf16 at several
  times the float32 rate, and every network here keeps its normalisation statistics and softmax in
  float32) and float32 on the CPU, where bf16 is emulated and slower. Parameters stay float32 unless
  asked otherwise (`param_dtype`), and training keeps float32 master weights and optimizer state.
  The error this costs is measured in docs/PRECISION.md.

The persistent compilation cache the CLIs use is in `jaxcontrol.compile_cache`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_CHOICES = ("auto",) + tuple(DTYPES)
ACCELERATORS = ("gpu", "tpu")


def backend() -> str:
    """"cpu", "gpu" or "tpu": the platform of JAX's default backend (CUDA and ROCm are "gpu")."""
    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def default_dtype_name(platform: str | None = None) -> str:
    """The compute dtype "auto" means on `platform` (default: this process's backend): "bfloat16"
    on a GPU or TPU, "float32" on the CPU."""
    return "bfloat16" if (platform or backend()) in ACCELERATORS else "float32"


def dtype_name(name: str, platform: str | None = None) -> str:
    """`name` with "auto" resolved for `platform` (see `default_dtype_name`). Raises `ConfigError`
    for a name not in `DTYPE_CHOICES`."""
    if name not in DTYPE_CHOICES:
        raise ConfigError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {name!r}")
    return default_dtype_name(platform) if name == "auto" else name


def to_dtype(name):
    """A dtype from its name ("auto", "float32", "bfloat16", "float16"; "auto" resolved for this
    backend); dtypes pass through. Raises `ConfigError` for another name."""
    if isinstance(name, str):
        return DTYPES[dtype_name(name)]
    return name
