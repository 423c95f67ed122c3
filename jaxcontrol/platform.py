"""What follows from the machine a program runs on: the default compute dtype and the persistent
compilation cache.

* **Compute dtype "auto"** is bfloat16 on GPUs and TPUs (their matrix units run bf16 at several
  times the float32 rate, and every network here keeps its normalisation statistics and softmax in
  float32) and float32 on the CPU, where bf16 is emulated and slower. Parameters stay float32 unless
  asked otherwise (`param_dtype`), and training keeps float32 master weights and optimizer state.
  The error this costs is measured in docs/PRECISION.md.
* **The compilation cache** (`enable_compile_cache`) is JAX's persistent cache: a program compiled
  once on a machine (same jax version, same shapes and flags) is read back from disk by the next
  process instead of being compiled again. The three CLIs turn it on by default in
  `compile_cache_dir()`: `$JAXCONTROL_COMPILE_CACHE` if set (an empty value or "off" turns the
  cache off), else `$XDG_CACHE_HOME/jaxcontrol/xla` or `~/.cache/jaxcontrol/xla`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from .errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_CHOICES = ("auto",) + tuple(DTYPES)
ACCELERATORS = ("gpu", "tpu")
CACHE_ENV = "JAXCONTROL_COMPILE_CACHE"


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


def compile_cache_dir() -> Path | None:
    """Where the CLIs keep compiled programs: `$JAXCONTROL_COMPILE_CACHE` when set (None when it is
    empty or "off"), else `$XDG_CACHE_HOME/jaxcontrol/xla`, else `~/.cache/jaxcontrol/xla`."""
    if CACHE_ENV in os.environ:
        value = os.environ[CACHE_ENV].strip()
        return None if value.lower() in ("", "off", "0", "false", "none") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxcontrol" / "xla"


def enable_compile_cache(path: str | os.PathLike | None = None, *, min_compile_seconds: float = 1.0) -> Path | None:
    """Turn on JAX's persistent compilation cache in `path` (default `compile_cache_dir()`), for
    programs whose compilation took at least `min_compile_seconds`. Returns the directory, or None
    when the cache is off (the environment said so, or the directory cannot be created: then a
    warning is logged and compilation simply is not cached). Call before the first compilation."""
    folder = Path(path).expanduser() if path is not None else compile_cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s)", folder, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
