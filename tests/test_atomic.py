"""The one writer: files and folders appear whole or not at all, with the mode `open` would give."""

import json
import os
import stat

import pytest

from jaxcontrol import atomic
from jaxcontrol.errors import CheckpointError, ConfigError


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_failed_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    atomic.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic.atomic_file(path) as f:
            f.write(b"{\"a\": 2, \"half")
            raise RuntimeError("disk on fire")
    assert json.loads(path.read_text()) == {"a": 1}
    assert _listing(tmp_path) == ["out.json"]


def test_an_interrupt_is_cleaned_up_too(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_file(tmp_path / "x.bin") as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_files_get_the_mode_open_would_give_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.write_text(tmp_path / "a" / "b.txt", "hello", parents=True)
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_without_parents_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic.write_bytes(tmp_path / "missing" / "x.bin", b"x")
    assert _listing(tmp_path) == []


def test_text_mode_and_bad_modes(tmp_path):
    with atomic.atomic_file(tmp_path / "t.txt", "w") as f:
        f.write("line\n")
    assert (tmp_path / "t.txt").read_text() == "line\n"
    with pytest.raises(ValueError, match="mode"):
        with atomic.atomic_file(tmp_path / "a.txt", "a"):
            pass


def test_write_json_ends_with_a_newline(tmp_path):
    atomic.write_json(tmp_path / "m.json", {"b": [1, 2]}, sort_keys=True)
    assert (tmp_path / "m.json").read_text() == '{"b": [1, 2]}\n'


def test_directory_refusals_raise_the_callers_error_class(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        with atomic.atomic_directory(dest, error=ConfigError):
            pass
    with pytest.raises(CheckpointError, match="already exists"):
        with atomic.atomic_directory(dest):
            pass
    assert _listing(tmp_path) == ["out"]


def test_a_directory_replacement_is_whole(tmp_path):
    dest = tmp_path / "out"
    with atomic.atomic_directory(dest) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("failed half way")
    assert (dest / "v").read_text() == "1" and _listing(tmp_path) == ["out"]
    with atomic.atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (dest / "v").read_text() == "2" and _listing(tmp_path) == ["out"]


def test_every_writer_of_the_library_goes_through_this_module():
    """No other module renames temporaries into place itself (the seven writers this replaced)."""
    import pathlib
    import re

    root = pathlib.Path(atomic.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "atomic.py":
            continue
        text = path.read_text()
        if re.search(r"os\.replace\(|\.replace\(tmp|mkdtemp\(|renameat2\(", text):
            offenders.append(str(path.relative_to(root)))
    assert offenders == []
