"""JAX's persistent compilation cache, on by default for the three command-line tools.

A program compiled once on a machine (same jax version, backend, shapes and flags) is read back
from disk by the next process instead of being compiled again: the second `infer.py` run with
the same model, size, batch and solver starts sampling without the compile. The directory is
`cache_dir()`: `$JAXCONTROL_COMPILE_CACHE` if set (an empty value, "off", "0", "false" or "none"
turns the cache off), else `$XDG_CACHE_HOME/jaxcontrol/xla`, else `~/.cache/jaxcontrol/xla`.
Library users opt in with `enable()`. Entries are only written for programs that took at least
`MIN_COMPILE_SECONDS` to compile. This module does not import JAX: before JAX is imported,
`enable` sets JAX's own environment variables, so a `--help` stays instant.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "JAXCONTROL_COMPILE_CACHE"
OFF = ("", "off", "0", "false", "none")
MIN_COMPILE_SECONDS = 1.0


def cache_dir() -> Path | None:
    """Where compiled programs are kept (see the module docstring), or None when the cache is off."""
    if ENV in os.environ:
        value = os.environ[ENV].strip()
        return None if value.lower() in OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxcontrol" / "xla"


def enable(path: str | os.PathLike | None = None, *, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Path | None:
    """Turn on JAX's persistent compilation cache in `path` (default `cache_dir()`) for programs
    that took at least `min_compile_seconds` to compile. Returns the directory, or None when the
    cache is off (the environment says so, or the directory cannot be created: then a warning is
    logged and nothing is cached). A cache directory JAX was already given is left as it is."""
    folder = Path(path).expanduser() if path is not None else cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s)", folder, e)
        return None
    settings = {"jax_compilation_cache_dir": str(folder),
                "jax_persistent_cache_min_compile_time_secs": float(min_compile_seconds),
                "jax_persistent_cache_min_entry_size_bytes": 0}
    if "jax" not in sys.modules:  # JAX reads these when it is imported; a value already set wins
        for name, value in settings.items():
            os.environ.setdefault(name.upper(), str(value))
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    import jax

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    for name, value in settings.items():
        if name.upper() not in os.environ:
            jax.config.update(name, value)
    return folder
