#!/usr/bin/env python
"""Train a ControlNet, a T2I-Adapter, a U-Net or a VAE. See docs/TRAINING.md.

    python train.py --config configs/controlnet_fill50k.py --workdir runs/cn
    python train.py --config configs/controlnet_fill50k.py --workdir runs/cn --config.steps=2000 \\
        --config.model.pretrained_path=stable-diffusion-v1-5 --config.model.init=pretrained

`--config` is a Python file whose `get_config()` returns an ml_collections ConfigDict
(`FILE:ARG` passes ARG to `get_config`); any key can be overridden with `--config.KEY=VALUE`.
Rerunning a command with the same `--workdir` resumes from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import runpy
import signal
import sys
import tempfile
from pathlib import Path

PROG = "train.py"


@contextlib.contextmanager
def exit_on_interrupt():
    """While importing libraries, Ctrl-C exits 130 at once: nothing has been written yet, and a
    KeyboardInterrupt raised inside an extension module's initialisation or a garbage-collector
    callback would otherwise become an ImportError traceback, or be swallowed."""
    def handler(signum, frame):
        os.write(2, f"{PROG}: interrupted\n".encode())
        os._exit(130)

    try:
        previous = signal.signal(signal.SIGINT, handler) if signal.getsignal(signal.SIGINT) is \
            signal.default_int_handler else None
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


with exit_on_interrupt():
    from absl import flags
    from ml_collections import config_dict, config_flags

    from jaxcontrol.cli import (
        EXIT_INTERRUPTED,
        EXIT_OK,
        EXIT_RUNTIME,
        EXIT_TERMINATED,
        error,
        run_main,
    )
    from jaxcontrol.errors import UsageError

HELP_FLAGS = ("-h", "-help", "--help", "--helpshort", "--helpfull", "-?")
OPTIONS = """\
options:
  --config FILE[:ARG]     experiment config file (get_config() -> ConfigDict); required
  --config.KEY=VALUE      override one key of the config (tuples as "(16,32)"); see docs/TRAINING.md
  --workdir DIR           run directory: checkpoints, logs, samples, exports; required
  -h, --help              show this help and exit

exit codes: 0 success, 1 runtime error (a bad file or config, non-finite loss, an unwritable workdir),
2 usage error (a missing or malformed flag, a missing config file, an unknown config key),
130 interrupted (Ctrl-C; in-flight checkpoints are completed, rerun the command to resume),
143 terminated (SIGTERM, e.g. a pre-emption: a checkpoint of the current step is saved first; rerun to resume)."""

config_flags.DEFINE_config_file("config", None, "experiment config file (get_config() -> ConfigDict)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, logs, samples, exports")


def help_text() -> str:
    """The text `train.py --help` prints: usage line, the module docstring and the options."""
    return f"usage: {PROG} --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]\n\n{__doc__.strip()}\n\n{OPTIONS}"


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value given to `--name` / `-name` (as `--name=V` or `--name V`), or None."""
    value = None
    for i, arg in enumerate(argv):
        m = re.fullmatch(rf"--?{name}(=(.*))?", arg, flags=re.S)
        if m is None:
            continue
        if m.group(1) is not None:
            value = m.group(2)
        elif i + 1 < len(argv):
            value = argv[i + 1]
        else:
            raise UsageError(f"--{name} needs a value")
    return value


def _one_line(message: str) -> str:
    """absl / ml_collections messages can embed a traceback: keep the part a user needs."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return ""
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0].rstrip(':')}: {lines[-1]}"
    return " ".join(lines)


def _unknown_override(argv: list[str], config_arg: str) -> str | None:
    """The message for the first `--config.KEY` whose KEY is not in the config file's config."""
    file, *arg = config_arg.split(":", 1)
    config = runpy.run_path(file)["get_config"](*arg)
    for arg in argv[1:]:
        m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if m is None:
            continue
        node, walked = config, "config"
        for part in m.group(1).split("."):
            keys = list(node.keys()) if isinstance(node, (config_dict.ConfigDict, dict)) else []
            if part not in keys:
                close = difflib.get_close_matches(part, [str(k) for k in keys], n=3)
                hint = f" (did you mean {', '.join(f'{walked}.{c}' for c in close)}?)" if close else ""
                return (f"--config.{m.group(1)}: {walked} has no key {part!r}{hint}; the keys are listed in "
                        "docs/TRAINING.md")
            node, walked = node[part], f"{walked}.{part}"
    return None


def parse_flags(argv: list[str]):
    """(config, workdir) from the command line; `UsageError` naming the flag for anything wrong."""
    config_arg = _flag_value(argv, "config")
    if not config_arg:
        raise UsageError("--config is required: a Python file whose get_config() returns the experiment config")
    config_file = config_arg.split(":", 1)[0]
    if not os.path.isfile(config_file):
        what = "is a directory, not a Python file" if os.path.isdir(config_file) else "no such file"
        raise UsageError(f"--config {config_file}: {what}")
    if not _flag_value(argv, "workdir"):
        raise UsageError("--workdir is required: the run directory (checkpoints, logs, samples, exports)")
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS.config
        config.get("task")  # a config file that failed to load reports its error on first access
    except (AttributeError, KeyError) as e:
        raise UsageError(_unknown_override(argv, config_arg) or f"--config: {_one_line(e)}") from None
    except flags.Error as e:
        raise UsageError(_one_line(str(e))) from None
    except Exception as e:  # the config file's own code failed (a syntax error, get_config raised)
        raise UsageError(f"--config {config_arg}: cannot load it: {type(e).__name__}: {_one_line(e)}") from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}; every option is a --flag")
    return config, flags.FLAGS.workdir


def check_workdir(workdir: str) -> str | None:
    """Create `workdir` and check that files can be written in it; a one-line problem, or None.

    A path that exists and is not a directory is a usage error (`UsageError`)."""
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--workdir {workdir}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--workdir {workdir}: cannot create it: {e.strerror or e}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"--workdir {workdir}: cannot write in it: {e.strerror or e}"
    return None


def _latest_checkpoint(workdir: str) -> int | None:
    folder = Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps) if steps else None


def main() -> int:
    """Run `train.py` from `sys.argv`: parse --config/--workdir, train, and return the exit code.

    0 when done or for --help, 1 when the workdir cannot be used, 130 on Ctrl-C (after printing
    the latest checkpoint's step), 143 on SIGTERM (after saving a checkpoint of the step reached).
    Raises `UsageError` for bad flags and lets training errors propagate (`console_main` turns
    them into exit codes 1 or 2).
    """
    argv = list(sys.argv)
    if any(a in HELP_FLAGS or a.startswith("--help") for a in argv[1:]):
        print(help_text())
        return EXIT_OK
    config, workdir = parse_flags(argv)
    problem = check_workdir(workdir)
    if problem:
        return error(PROG, problem, EXIT_RUNTIME)
    logging.getLogger("absl").setLevel(logging.WARNING)
    with exit_on_interrupt():
        from jaxcontrol.training import train
        from jaxcontrol.training.trainer import Preempted

    try:
        summary = train(config, workdir)
    except Preempted as e:
        print(f"{PROG}: {e}; rerun the same command to resume", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        latest = _latest_checkpoint(workdir)
        where = f"the latest checkpoint is step {latest}" if latest is not None else "no checkpoint was saved yet"
        print(f"{PROG}: interrupted; {where} (in {workdir}); rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{PROG}: done at step {summary['step']}"
          + (f", last loss {summary['last_loss']:.6g}" if summary["last_loss"] is not None else ""))
    return EXIT_OK


def console_main() -> None:
    """The `jaxcontrol-train` entry point: exit with `main`'s code (0, 1, 2 or 130)."""
    sys.exit(run_main(PROG, main))


if __name__ == "__main__":
    console_main()
