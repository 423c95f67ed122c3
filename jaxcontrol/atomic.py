"""Atomic output: every file and folder jaxcontrol writes appears whole or not at all.

    with atomic_file("out/image.png") as f:        # a file: temp file beside it, fsync, rename
        f.write(data)
    write_bytes(path, data); write_text(path, text); write_json(path, obj)

    with atomic_directory("out/model", overwrite=True) as tmp:   # a folder: temp folder, rename
        (tmp / "config.json").write_text(...)

A failure or interrupt (KeyboardInterrupt included) inside either leaves the destination as it
was and deletes the temporary. Outputs get the mode a plain `open` would give them (0666 or 0777
less the umask), not `mkstemp`'s 0600.

This is the one writer of the library: images, sidecars, iterator states, safetensors files,
checkpoints, exports, precomputed datasets and the embedded-model install all go through it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import CheckpointError

logger = logging.getLogger(__name__)


# --- files ---------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, parents: bool = False) -> Iterator[IO]:
    """Yield a file open for writing (`mode` "wb" or "w") that becomes `path` when the block ends.

    The data goes to a temporary file in `path`'s folder, is flushed to disk, and is renamed over
    `path` in one step, so readers see the old file or the new one, never a part. On any exception
    the temporary is deleted and `path` is untouched. `parents` creates missing parent folders.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes with mode 'wb' or 'w', got {mode!r}")
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, *, parents: bool = False) -> Path:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    with atomic_file(path, "wb", parents=parents) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, parents: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_file`)."""
    return write_bytes(path, text.encode("utf-8"), parents=parents)


def write_json(path: str | os.PathLike, obj: Any, *, parents: bool = False, **dumps: Any) -> Path:
    """Write `json.dumps(obj, **dumps)` and a newline to `path` atomically."""
    return write_text(path, json.dumps(obj, **dumps) + "\n", parents=parents)


# --- folders -------------------------------------------------------------------------------------
#
# A writer works in `.NAME.tmp-HOST.PID.RAND` beside the destination NAME (HOST: a short hash of
# the host name, PID: the writing process). Replacing an existing NAME swaps the two folders in one
# `renameat2(RENAME_EXCHANGE)` call on Linux, so NAME holds either the old or the new output at
# every instant. Where the exchange is not available (other systems, some network file systems)
# the old folder is first renamed to `.NAME.old-HOST.PID.RAND` and the new one renamed in; a
# process killed between the two leaves NAME missing, and the next writer or reader of NAME
# (`recover_destination`, called by `atomic_directory`, `read_checkpoint`, `load_model` and
# `load_pipeline`) renames the old folder back. Temporaries are deleted by the next run only when
# they are provably ours and stale: our naming pattern for this NAME, this host, and a process id
# that is no longer running (processes in separate PID namespaces that share both the output folder
# and the host name cannot be told apart; give such containers distinct host names).

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]{8}$")
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temp_name(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}-{_host_tag()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or an id we cannot check): not provably stale
    return True


def stale_temporaries(dest: str | os.PathLike) -> list[tuple[Path, str]]:
    """`(path, kind)` of the temporaries beside `dest` that a dead writer on this host left ("tmp" or "old")."""
    dest = Path(os.path.abspath(dest))
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return []
    host = _host_tag()
    found = []
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if (m is None or m["name"] != dest.name or m["host"] != host or _pid_alive(int(m["pid"]))
                or not entry.is_dir(follow_symlinks=False)):
            continue
        found.append((Path(entry.path), m["kind"]))
    return sorted(found)


def recover_destination(dest: str | os.PathLike) -> None:
    """Finish what a killed writer of `dest` left: put the old output back if `dest` is missing
    (a kill between the two renames of a replacement), then delete its stale temporaries."""
    dest = Path(os.path.abspath(dest))
    for path, kind in stale_temporaries(dest):
        if kind == "old" and not os.path.lexists(dest):
            try:
                os.rename(path, dest)
                logger.warning("%s: restored the previous output from %s (a replacement was interrupted)",
                               dest, path.name)
                continue
            except OSError:
                pass
        logger.warning("%s: deleting %s, left by an interrupted writer", dest, path.name)
        shutil.rmtree(path, ignore_errors=True)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """`renameat2(src, dst, flags)`; False where the call or the flag is not available, raises on other errors."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(-100, os.fsencode(src), -100, os.fsencode(dst), flags) == 0:  # -100: AT_FDCWD
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(src), None, str(dst))
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


@functools.lru_cache(maxsize=1)
def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _swap_in(tmp: Path, dest: Path) -> None:
    """Replace the folder `dest` by `tmp` so that `dest` is never missing (see above)."""
    if _renameat2(tmp, dest, _RENAME_EXCHANGE):
        # dest holds the new output; tmp the old one, renamed so that a kill while deleting it leaves a
        # folder the next run recognises as a stale "old" (dest exists, so it is deleted, not restored)
        old = _temp_name(dest, "old")
        try:
            os.rename(tmp, old)
        except OSError:
            old = tmp
        shutil.rmtree(old, ignore_errors=True)
        return
    aside = _temp_name(dest, "old")
    os.rename(dest, aside)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _move_in(tmp: Path, dest: Path, error: type[Exception]) -> None:
    """Rename `tmp` to a `dest` that does not exist, refusing to replace one created meanwhile."""
    try:
        if _renameat2(tmp, dest, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise error(f"{dest}: appeared while the output was being written; not replacing it") from None
    if os.path.lexists(dest):
        raise error(f"{dest}: appeared while the output was being written; not replacing it")
    os.rename(tmp, dest)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, *, overwrite: bool = False,
                     error: type[Exception] = CheckpointError) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it becomes `dest`.

    On any exception (KeyboardInterrupt included) the temporary directory is deleted and `dest`
    is left as it was. With `overwrite`, an existing `dest` is replaced so that `dest` holds the old
    or the new output at every instant (an atomic exchange on Linux; elsewhere two renames, with
    the old output put back by the next run if a kill falls between them). Without `overwrite`, an
    existing `dest` is an error raised before any work is done. Temporaries that a killed writer of
    `dest` left on this host are deleted first. Refusals raise `error` (CheckpointError unless the
    caller names another class).
    """
    dest = Path(os.path.abspath(dest))
    recover_destination(dest)
    if dest.exists() and not overwrite:
        raise error(f"{dest}: already exists; pass overwrite=True (--overwrite) to replace it")
    if os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir()):
        raise error(f"{dest}: exists and is not a directory; not replacing it")
    if not dest.parent.is_dir():
        raise error(f"{dest.parent}: the destination's parent folder does not exist")
    tmp = _temp_name(dest, "tmp")
    try:
        os.mkdir(tmp)  # mode 0777 less the umask: the output's mode
    except OSError as e:
        raise error(f"{dest}: cannot write beside it in {dest.parent}: {e.strerror or e}") from e
    try:
        yield tmp
        _fsync_tree(tmp)
        if overwrite and os.path.lexists(dest):
            _swap_in(tmp, dest)
        else:  # without overwrite, an output that appeared meanwhile is an error, never replaced
            _move_in(tmp, dest, error)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_path(path: str | os.PathLike) -> None:
    """Flush one file or folder to disk (best effort: errors are ignored)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    _fsync_path(folder)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk before it is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)


__all__ = ["atomic_directory", "atomic_file", "recover_destination", "stale_temporaries", "write_bytes",
           "write_json", "write_text"]
