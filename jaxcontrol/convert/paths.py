"""Paths named inside checkpoint files, checked before anything is read or written.

Component names (`model_index.json`, `jaxcontrol.json`), shard file names (`*.index.json`) and
manifest paths come from files a user may have downloaded from anywhere. Every such entry is
joined to its folder with `safe_join`, which refuses absolute paths, `..` components and
symbolic links that resolve outside the folder, so a crafted file can neither write beside the
output nor read (and copy into the output) a file from elsewhere on the machine.

One kind of link is allowed: the Hugging Face cache stores a snapshot as
`models--ORG--NAME/snapshots/REV/...` whose files are symbolic links into the repository's own
`models--ORG--NAME/blobs/`; files may resolve there too.

`read_json` reads the small JSON files of a checkpoint (configs, indexes, manifests) with a size
limit and turns every failure (missing, not a regular file, not UTF-8, not JSON, nested too deep)
into one error naming the file. `copy_tree` copies a tokenizer or scheduler folder with the same
checks: regular files and folders only, links only to places inside.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

MAX_JSON_BYTES = 64 * 1024 * 1024  # far above any config, index or tokenizer file we read


def allowed_roots(root: str | os.PathLike) -> list[Path]:
    """The folders files under `root` may resolve into: `root` itself, and, inside a Hugging Face
    cache snapshot, that repository's `blobs/` folder."""
    real = Path(os.path.realpath(root))
    roots = [real]
    for folder in (real, *real.parents):
        if folder.parent.name == "snapshots":
            blobs = folder.parent.parent / "blobs"
            if blobs.is_dir():
                roots.append(Path(os.path.realpath(blobs)))
            break
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def check_entry(entry: Any, what: str, *, single: bool = False) -> str:
    """`entry` as a relative path that stays inside its folder by its text alone.

    `single` requires one plain name (no `/`), as component and tokenizer names are.
    """
    if not isinstance(entry, str) or not entry:
        raise CheckpointError(f"{what}: expected a non-empty relative path, got {entry!r}")
    if "\x00" in entry:
        raise CheckpointError(f"{what}: {entry!r} contains a NUL byte")
    if os.path.isabs(entry) or entry.startswith(("/", "\\")):
        raise CheckpointError(f"{what}: {entry!r} is an absolute path; only paths inside the folder are allowed")
    parts = entry.replace("\\", "/").split("/")
    if any(p == ".." for p in parts):
        raise CheckpointError(f"{what}: {entry!r} leaves its folder ('..'); only paths inside the folder are allowed")
    if single and (len(parts) != 1 or entry in (".",)):
        raise CheckpointError(f"{what}: {entry!r} must be a plain name (no '/' and not '.')")
    return entry


def check_inside(path: str | os.PathLike, root: str | os.PathLike, what: str) -> Path:
    """`path` if it (following every link) resolves inside `root` (or a snapshot's blobs/), else an error."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    if not _inside(real, allowed_roots(root)):
        raise CheckpointError(
            f"{what}: {path} resolves to {real}, outside {root}; links out of a checkpoint folder are refused")
    return path


def safe_join(root: str | os.PathLike, entry: Any, what: str, *, single: bool = False) -> Path:
    """`root / entry`, refusing entries that are absolute, contain `..` or resolve (through links) outside.

    `what` names the entry in the error (e.g. "model.safetensors.index.json: weight_map['x']").
    The returned path need not exist.
    """
    check_entry(entry, what, single=single)
    return check_inside(Path(root) / entry, root, what)


def file_or_named_in_folder(path: str | os.PathLike, names: tuple[str, ...], what: str) -> Path:
    """`path` itself when it is a file, or the first of `names` inside it when it is a folder
    (diffusers' `pytorch_lora_weights.safetensors`, `learned_embeds.safetensors`, ...). Raises
    `CheckpointError` naming `what` for a missing path, a folder holding none of `names`, or a
    path that is not a regular file (a FIFO would block)."""
    path = Path(path)
    if path.is_dir():
        for name in names:
            candidate = safe_join(path, name, f"{what} folder {path}")
            if candidate.is_file():
                return regular_file(candidate)
        raise CheckpointError(f"{path}: a {what} folder must hold one of {list(names)}")
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: no such {what} file")
    return regular_file(path)


def regular_file(path: str | os.PathLike, what: str | None = None) -> Path:
    """`path` if it is a regular file (after links); a FIFO, device, socket or folder is refused
    before anything opens it (opening a FIFO blocks forever)."""
    path = Path(path)
    label = what or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{label}: no such file ({path})") from None
    except OSError as e:
        raise CheckpointError(f"{label}: cannot read {path}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise CheckpointError(f"{label}: {path} is {kind}; a regular file is needed")
    return path


def read_bytes(path: str | os.PathLike, what: str | None = None, *, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, opened without blocking on FIFOs."""
    path = regular_file(path, what)
    label = what or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"{label}: cannot open {path}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # replaced between the two checks
            raise CheckpointError(f"{label}: {path} is not a regular file")
        if st.st_size > limit:
            raise CheckpointError(f"{label}: {path} is {st.st_size} bytes, more than the {limit} allowed here")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{label}: {path} is more than the {limit} bytes allowed here")
    return data


def read_json(path: str | os.PathLike, what: str = "JSON file", *, error: type[Exception] = CheckpointError,
              expect: type | tuple[type, ...] | None = dict) -> Any:
    """Parse a small JSON file; any failure is `error` naming the file (and `what` it is).

    Deeply nested input raises `RecursionError` in Python's parser; it is reported like any other
    malformed file. `expect` is the type the top level must have (a JSON object by default).
    """
    path = Path(path)
    try:
        raw = read_bytes(path, f"{path} ({what})")
    except CheckpointError as e:
        raise error(str(e)) from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: invalid {what}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid {what}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: invalid {what}: nested too deeply to parse") from None
    if expect is not None and not isinstance(value, expect):
        names = expect.__name__ if isinstance(expect, type) else "/".join(t.__name__ for t in expect)
        shown = {"dict": "a JSON object", "list": "a JSON list"}.get(names, names)
        raise error(f"{path}: invalid {what}: expected {shown} at the top level, found a {type(value).__name__}")
    return value


def check_tree(src: str | os.PathLike, what: str, *, root: str | os.PathLike | None = None) -> list[tuple[Path, Path, bool]]:
    """Check that folder `src` holds only regular files and folders that resolve inside `root`
    (default `src`; a Hugging Face snapshot's blobs/ also counts). Returns `(path, relative path,
    is_dir)` for every entry. Links to files inside are allowed, links to folders are not (they
    could loop), and FIFOs, devices and sockets are refused before anything opens them."""
    src = Path(src)
    root = Path(root) if root is not None else src
    check_inside(src, root, what)
    if not src.is_dir():
        raise CheckpointError(f"{what}: {src} is not a folder")
    roots = allowed_roots(root)
    entries: list[tuple[Path, Path, bool]] = []
    for folder, dirs, files in os.walk(src, followlinks=False):
        here = Path(folder)
        rel = here.relative_to(src)
        for name in sorted(dirs):
            p = here / name
            if p.is_symlink():
                raise CheckpointError(f"{what}: {rel / name} is a link to a folder; only files may be links")
            entries.append((p, rel / name, True))
        for name in sorted(files):
            p = here / name
            real = Path(os.path.realpath(p))
            if not _inside(real, roots):
                raise CheckpointError(f"{what}: {rel / name} resolves to {real}, outside {root}; links out of a "
                                      f"checkpoint folder are refused")
            regular_file(p, f"{what}: {rel / name}")
            entries.append((p, rel / name, False))
    return entries


def copy_tree(src: str | os.PathLike, dest: str | os.PathLike, what: str, *, root: str | os.PathLike | None = None) -> None:
    """Copy folder `src` to `dest` (which must not exist) after `check_tree`: a link to a file
    inside is copied as that file's contents; nothing outside is ever read."""
    entries = check_tree(src, what, root=root)
    dest = Path(dest)
    dest.mkdir()
    for source, rel, is_dir in entries:
        target = dest / rel
        if is_dir:
            target.mkdir(exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
