"""train.py as a user meets it: --help, one-line errors with the shared exit codes (0 ok, 1 runtime,
2 usage, 130 interrupt), the NaN guard (the latest checkpoint stays the last good one, nothing
exported), Ctrl-C (in-flight checkpoints completed, the run resumes), stale export folders of a
killed run removed, and `Run` as a context manager.

The networks are configs/smoke.py's one-block models on 8x8 fill50k images.
"""

import os
import signal
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.errors import NonFiniteError
from jaxcontrol.training import Checkpointer, Run, train
from jaxcontrol.training import trainer as trainer_module
from jaxcontrol.training.logger import read_metrics
from _smoke import SignalAtLine, smoke_config
from _smoke import smoke_args as _smoke_args
from _smoke import train_cmd as _cmd
from _smoke import train_env as _env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from jaxcontrol.data import build_fill50k

    path = tmp_path_factory.mktemp("tfds")
    cfg = smoke_config(path)
    build_fill50k(path, image_size=cfg.data.resolution, num_train=cfg.data.fill50k_num_train,
                  num_validation=cfg.data.fill50k_num_validation, seed=cfg.data.fill50k_seed)
    return path


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for this module's train.py processes (same program, compiled once)."""
    return tmp_path_factory.mktemp("xla-cache")


def _run_all(commands, env=None, timeout=300):
    """Run the commands concurrently (they only parse flags and exit); [(returncode, stdout, stderr)]."""
    procs = [subprocess.Popen(_cmd(*c), cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), stderr
    return lines[0]


# --------------------------------------------------------------------------------------------------
# the command line: --help, usage errors (2), runtime errors (1)
# --------------------------------------------------------------------------------------------------


def test_help_exits_0_and_usage_errors_are_one_line_with_exit_2(tmp_path, data_dir):
    """`--help` printed absl's help and exited 1; a missing config file, an unknown `--config.` key
    and a workdir that is a file printed tracebacks."""
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    work = tmp_path / "w"
    cases = {
        "help": ["--help"],
        "h": ["-h"],
        "missing config": ["--config", "configs/no_such_config.py", "--workdir", work],
        "unknown key": _smoke_args(work, data_dir, "--config.optim.learnin_rate=1e-4"),
        "unknown top key": _smoke_args(work, data_dir, "--config.stepz=3"),
        "bad value": _smoke_args(work, data_dir, "--config.steps=many"),
        "no workdir": ["--config", "configs/smoke.py"],
        "workdir is a file": _smoke_args(a_file, data_dir),
        "unknown flag": _smoke_args(work, data_dir, "--stepz=3"),
    }
    results = dict(zip(cases, _run_all(cases.values())))
    for name in ("help", "h"):
        code, stdout, stderr = results[name]
        assert code == 0, (name, stdout, stderr)
        assert stdout.startswith("usage: train.py --config FILE") and "--workdir DIR" in stdout
        assert "130" in stdout and "Traceback" not in stderr
    expected = {
        "missing config": "--config configs/no_such_config.py: no such file",
        "unknown key": "--config.optim.learnin_rate: config.optim has no key 'learnin_rate' "
                       "(did you mean config.optim.learning_rate?)",
        "unknown top key": "--config.stepz: config has no key 'stepz' (did you mean config.steps?)",
        "bad value": "flag --config.steps=many: invalid literal for int()",
        "no workdir": "--workdir is required",
        "workdir is a file": f"--workdir {a_file}: exists and is not a directory",
        "unknown flag": "Unknown command line flag 'stepz'",
    }
    for name, text in expected.items():
        code, stdout, stderr = results[name]
        assert code == 2, (name, code, stderr[-2000:])
        assert text in _one_error_line(stderr), (name, stderr)
    assert not work.exists()  # nothing was created for a command that failed to parse


def test_unusable_workdir_is_one_line_with_exit_1(tmp_path, data_dir):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    commands = [_smoke_args(a_file / "run", data_dir)]
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    check_readonly = not os.access(readonly, os.W_OK)  # root writes anywhere: then only the first case applies
    if check_readonly:
        commands.append(_smoke_args(readonly, data_dir))
    results = _run_all(commands)
    code, _, stderr = results[0]
    assert code == 1, stderr[-2000:]
    assert f"--workdir {a_file / 'run'}: cannot create it: Not a directory" in _one_error_line(stderr)
    if check_readonly:
        code, _, stderr = results[1]
        assert code == 1, stderr[-2000:]
        assert f"--workdir {readonly}: cannot write in it: Permission denied" in _one_error_line(stderr)
    readonly.chmod(0o755)


# --------------------------------------------------------------------------------------------------
# the NaN guard
# --------------------------------------------------------------------------------------------------


def _poisoning(at_step, *, metrics=True):
    """A `make_train_step` whose step `at_step` (and later) turns the params NaN, and the loss too if `metrics`."""
    real = trainer_module.make_train_step

    def make(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def poisoned(state, frozen, batch):
            new, m = step_fn(state, frozen, batch)
            bad = new.step >= at_step
            params = jax.tree_util.tree_map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
            if metrics:
                m = dict(m, loss=jnp.where(bad, jnp.nan, m["loss"]))
            return new.replace(params=params), m

        return poisoned

    return make


def test_nan_loss_exits_1_keeping_the_last_good_checkpoint(data_dir, tmp_path, xla_cache):
    """A learning rate of 1e30 makes step 2's loss NaN: train.py exits 1 with one line naming the
    step and the metric; step 1's checkpoint stays the latest and nothing is exported. Before, the
    run went on, saved NaN checkpoints, exported them and exited 0."""
    workdir = tmp_path / "run"
    out = subprocess.run(_cmd(*_smoke_args(workdir, data_dir, "--config.optim.learning_rate=1e30", "--config.steps=4",
                                           "--config.checkpoint.every=1", "--config.checkpoint.keep=5",
                                           "--config.export.at_end=True")),
                         cwd=ROOT, env=_env(xla_cache), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: training step 2: non-finite "), out.stderr
    assert "loss=nan" in lines[0] and "the latest checkpoint is step 1" in lines[0]
    assert Checkpointer(workdir / "checkpoints").all_steps() == [1]
    assert not (workdir / "export").exists()
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and np.isfinite(records[0]["loss"]) and np.isnan(records[1]["loss"])


def test_non_finite_state_is_never_checkpointed(data_dir, tmp_path, monkeypatch):
    """Params that the update of step 4 turns NaN, while that step's loss and gradient are still
    finite, are caught when step 4 would be saved: the latest checkpoint stays step 2."""
    monkeypatch.setattr(trainer_module, "make_train_step", _poisoning(4, metrics=False))
    cfg = smoke_config(data_dir, **{"checkpoint.keep": 5, "steps": 4, "log.every": 4})
    workdir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"training step 4: the train state's params hold NaN"):
        train(cfg, workdir)
    assert Checkpointer(workdir / "checkpoints").all_steps() == [2]


# --------------------------------------------------------------------------------------------------
# Ctrl-C, resume, stale export folders
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_rerun_resumes_and_cleans_stale_exports(data_dir, tmp_path, xla_cache):
    """SIGINT mid-run: exit 130, one line, no traceback, the checkpoints complete. The rerun resumes
    from the latest checkpoint (and only exports, to stay quick), and the export folders a killed
    export left behind are gone after it."""
    workdir = tmp_path / "run"
    args = _smoke_args(workdir, data_dir, "--config.steps=100000", "--config.checkpoint.every=10",
                       "--config.log.every=10")
    run = SignalAtLine(_cmd(*args), _env(xla_cache), "step 20: checkpoint saving", signal.SIGINT)
    code, stderr = run.finish()
    assert code == 130, "".join(run.lines[-20:]) + stderr[-3000:]
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and lines[0].startswith("train.py: interrupted; the latest checkpoint is step "), stderr
    steps = Checkpointer(workdir / "checkpoints").all_steps()
    assert steps and steps[-1] >= 20 and f"step {steps[-1]}" in lines[0], (steps, lines)
    assert not [p for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]  # no partial save left

    # what a kill during an export leaves: atomic_directory's temporary folders (and a renamed-aside old export)
    stale = [workdir / "export" / "diffusers" / ".controlnet.tmp-k1ll3d", workdir / "export" / "jaxcontrol" /
             ".controlnet.tmp-abc123", workdir / "export" / "steps" / "20" / "diffusers" / ".controlnet.tmp-x"]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    latest = steps[-1]
    resumed = subprocess.run(_cmd(*_smoke_args(workdir, data_dir, f"--config.steps={latest}",
                                               "--config.export.at_end=True")),
                             cwd=ROOT, env=_env(xla_cache), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {latest}" in resumed.stdout and f"done at step {latest}" in resumed.stdout
    leftovers = [p for p in workdir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == [], leftovers
    assert (workdir / "export" / "diffusers" / "controlnet" / "config.json").is_file()
    assert (workdir / "export" / "jaxcontrol" / "controlnet").is_dir()


def test_remove_stale_exports_puts_back_an_export_renamed_aside(tmp_path):
    """A kill between the two renames of a replacement leaves only `.NAME.old-*`: it becomes NAME again."""
    export = tmp_path / "export"
    (export / "diffusers" / ".controlnet.old-1234abcd").mkdir(parents=True)
    (export / "diffusers" / ".controlnet.old-1234abcd" / "config.json").write_text("{}")
    (export / "jaxcontrol" / "adapter").mkdir(parents=True)
    (export / "jaxcontrol" / ".adapter.old-99").mkdir()
    (export / "jaxcontrol" / ".adapter.tmp-5").mkdir()
    removed = trainer_module.remove_stale_exports(export)
    assert sorted(p.name for p in removed) == [".adapter.old-99", ".adapter.tmp-5"]
    assert (export / "diffusers" / "controlnet" / "config.json").is_file()
    assert sorted(p.name for p in (export / "jaxcontrol").iterdir()) == ["adapter"]
    assert sorted(p.name for p in (export / "diffusers").iterdir()) == ["controlnet"]


# --------------------------------------------------------------------------------------------------
# Run as a context manager
# --------------------------------------------------------------------------------------------------


def test_run_context_manager_completes_the_async_checkpoint(data_dir, tmp_path):
    """TRAINING.md's snippet: a save started inside `with Run(...)` is complete when the block exits
    (before, the async save was still in flight and lost at interpreter exit)."""
    cfg = smoke_config(data_dir)
    with Run(cfg, tmp_path / "run") as run:
        run.save(0)
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [0]
    run.close()  # a second close does nothing
