"""What the training tests share: the smoke config (configs/smoke.py) on a test's data folder, and
running train.py in a subprocess (its environment, flags, and a signal sent at a line it prints)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smoke_config(data_dir, *, tensorboard: bool | None = False, **overrides):
    """configs/smoke.py's config on one device reading `data_dir`, with TensorBoard logging set to
    `tensorboard` (None: smoke.py's own setting) and `overrides` ({"a.b": value}) applied."""
    config = runpy.run_path(str(ROOT / "configs" / "smoke.py"))["get_config"]()
    config.data.data_dir = str(data_dir)
    config.mesh.num_devices = 1
    if tensorboard is not None:
        config.log.tensorboard = tensorboard
    return set_keys(config, overrides)


def set_keys(config, overrides: dict):
    """`config` with each dotted key of `overrides` ({"a.b": value}) set; returns it."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def train_env(cache=None) -> dict:
    """The environment for a train.py subprocess: one CPU device and, given `cache`, a persistent
    compilation cache there that keeps every program (the processes of a test compile once)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", TOKENIZERS_PARALLELISM="false")
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def train_cmd(*args) -> list[str]:
    """The command line running train.py (from the repository root) with `args`."""
    return [sys.executable, "train.py", *map(str, args)]


def smoke_args(workdir, data_dir, *extra) -> list:
    """train.py's flags for the smoke config on one device without TensorBoard, then `extra`."""
    return ["--config", "configs/smoke.py", "--workdir", workdir, f"--config.data.data_dir={data_dir}",
            "--config.mesh.num_devices=1", "--config.log.tensorboard=False", *extra]


class SignalAtLine:
    """Runs a command (from the repository root) in the background and sends `signum` once, when it
    prints a line containing `trigger`, to itself or to the process `target`."""

    def __init__(self, cmd, env, trigger, signum, target=None):
        self.trigger, self.signum, self.target, self.lines, self.errors = trigger, signum, target, [], []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        # one reader per pipe: stdout only by the watcher (a second reader could take the trigger line)
        self.threads = [threading.Thread(target=self._watch, daemon=True),
                        threading.Thread(target=lambda: self.errors.extend(self.proc.stderr), daemon=True)]
        for t in self.threads:
            t.start()

    def _watch(self):
        sent = False
        for line in self.proc.stdout:
            self.lines.append(line)
            if not sent and self.trigger in line:
                (self.target or self.proc).send_signal(self.signum)
                sent = True

    def finish(self, timeout=300):
        """Wait for the command (killed after `timeout` s); (its return code, its stderr)."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for t in self.threads:
            t.join(10)
        return self.proc.returncode, "".join(self.errors)
