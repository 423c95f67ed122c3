"""The training loop: `train(config, workdir)`, what `train.py` runs.

    from jaxcontrol.training import default_config, train
    config = default_config()
    ...
    summary = train(config, "runs/controlnet")

Order of work: (multi-host initialisation), the mesh, the networks, the data, the state (restored
from the latest checkpoint of WORKDIR/checkpoints if there is one, onto the current mesh), then
the step loop with logging, checkpoints and validation images, then the final checkpoint and the
export. Rerunning the same command after an interruption resumes; the losses then continue
exactly as an uninterrupted run's (same config, same mesh shape, CPU).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..atomic import write_json
from ..errors import ConfigError, NonFiniteError
from ..mesh import tracing_mesh
from ..models.vae import sample_posterior
from ..schedulers import make_plan
from .checkpoint import Checkpointer
from .config import TEXT_TO_IMAGE_TASKS, check_config, to_plain
from .data import device_batch, make_train_dataset, open_sources, precomputed_source, validation_examples
from .export import export_trained
from .logger import MetricsWriter, image_grid, to_uint8
from .networks import Networks, build_networks
from .sharding import (
    batch_divisor,
    batch_sharding,
    describe,
    make_mesh,
    param_shardings,
    release_free_memory,
    replicated,
    setup_distributed,
    use_cpu_memory_scheduler,
)
from .state import TrainState, create_train_state, learning_rate_schedule, make_optimizer
from .step import DEVICE_KEYS, jit_train_step, make_sample_fn, make_train_step

log = logging.getLogger("jaxcontrol.train")


class Run:
    """Everything `train` sets up, kept together so that tests and tools can drive steps themselves.

    `Run(config, workdir)` sets up, in this order: the checked config, then (a `_setup_*` method
    each) the workdir, the mesh, the networks and optimizer, the data (after the networks: it
    may be precomputed through them), the shardings, then the checkpointer, the state (fresh, or
    restored from the latest checkpoint) and the train step.
    `run.state` is fresh or restored; `run.step_fn(run.state, run.frozen, batch)` is the compiled
    step; `run.next_batch()` the next global batch. Use it as a context manager (or call
    `close()`), so that an async checkpoint save still in flight completes:

        with Run(config, workdir) as run:
            ...
            run.save(step)
    """

    def __init__(self, config, workdir: str | os.PathLike, *, restore: bool = True):
        self.config = check_config(config)
        self._setup_workdir(workdir)
        self._setup_mesh()
        trainable, frozen = self._setup_model()
        self._setup_data(frozen)
        self._setup_shardings(trainable, frozen)
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=int(self.config.checkpoint.keep),
                                         async_save=bool(self.config.checkpoint.async_save))
        self._closed = False
        try:
            self._setup_state(trainable, restore)
            self._setup_step()
        except BaseException:
            self.close()
            raise

    def _setup_workdir(self, workdir: str | os.PathLike) -> None:
        """`workdir` as an absolute path; the main process creates it and checks it is writable."""
        self.workdir = Path(os.path.abspath(workdir))
        self.is_main = jax.process_index() == 0
        if self.is_main:
            prepare_workdir(self.workdir)

    def _setup_mesh(self) -> None:
        """The ("data", "fsdp") mesh over `mesh.num_devices` devices. `ConfigError` when a
        micro-batch (batch_size / grad_accum_steps) does not split over its batch axes."""
        mesh = self.config.mesh
        self.mesh = make_mesh(int(mesh.data), int(mesh.fsdp), _devices(int(mesh.num_devices)))
        self.batch_axes = tuple(mesh.batch_axes)
        self.accum = int(self.config.grad_accum_steps)
        micro = self.config.batch_size // self.accum
        div = batch_divisor(self.mesh, self.batch_axes)
        if micro % div:
            raise ConfigError(f"config.batch_size / grad_accum_steps = {micro} examples per micro-batch do not "
                              f"split over the mesh's batch axes {self.batch_axes} ({div} ways; {describe(self.mesh)})")

    def _setup_model(self) -> tuple[dict, dict]:
        """The networks, the learning-rate schedule and the optimizer; returns the (trainable,
        frozen) parameters, host arrays."""
        self.nets, trainable, frozen = build_networks(self.config, self.workdir)
        self.lr_schedule = learning_rate_schedule(self.config.optim, int(self.config.steps))
        self.tx = make_optimizer(self.config.optim, self.lr_schedule)
        return trainable, frozen

    def _setup_data(self, frozen: dict) -> None:
        """The training and validation sources (the training one precomputed through the frozen
        encoders with `data.precompute`), the dataset, its iterator and the keys a device batch
        holds. Precomputed text embeddings with prompt dropout add `frozen["empty_prompt"]`."""
        config = self.config
        train_source, self.validation_source = open_sources(config, self.workdir)
        has_text = False
        if config.data.precompute:
            train_source = precomputed_source(config, self.workdir, train_source, self.nets, frozen)
            has_text = train_source.meta.get("text_embeddings") is not None
            if has_text and (config.loss.proportion_empty_prompts > 0 or config.task == "instruct_pix2pix"):
                empty = self._empty_prompt_host(frozen)
                if self.nets.xl:
                    frozen["empty_prompt"], frozen["empty_pooled"] = (np.asarray(a) for a in empty)
                else:
                    frozen["empty_prompt"] = np.asarray(empty)
        self.dataset = make_train_dataset(config, train_source, self.nets.tokenizer, tokenize_prompts=not has_text,
                                          tokenizer_2=self.nets.tokenizer_2)
        self.iterator = iter(self.dataset)
        self.train_source = train_source
        if config.task == "vae":
            self.batch_keys: tuple = ("pixel_values",)
        else:
            self.batch_keys = tuple(k for k in DEVICE_KEYS
                                    if not (k == "conditioning_pixel_values" and config.task in TEXT_TO_IMAGE_TASKS))

    def _new_state(self, params) -> TrainState:
        """A fresh `TrainState` of `params` (step 0, optimizer state, the EMA if `optim.ema_decay`)."""
        return create_train_state(params, self.tx, int(self.config.seed), ema=self.config.optim.ema_decay > 0)

    def _setup_shardings(self, trainable: dict, frozen: dict) -> None:
        """Shardings of the train state, the frozen parameters and the batches; the abstract
        (sharded) state a checkpoint restores into; the frozen parameters placed on the mesh."""
        mesh_cfg = self.config.mesh
        min_size = int(mesh_cfg.min_shard_size)
        abstract = jax.eval_shape(self._new_state, trainable)
        self.state_sharding = param_shardings(abstract, self.mesh, shard=bool(mesh_cfg.shard_trainable),
                                              min_size=min_size)
        self.frozen_sharding = param_shardings(frozen, self.mesh, shard=bool(mesh_cfg.shard_frozen), min_size=min_size)
        self.batch_sharding = batch_sharding(self.mesh, self.batch_axes, leading=1)
        self.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_sharding)
        self.frozen = jax.device_put(frozen, self.frozen_sharding)

    def _setup_state(self, trainable: dict, restore: bool) -> None:
        """`state` restored from the latest checkpoint (with the data iterator's position) when
        `restore` and there is one, else fresh from `trainable`; `restored_step` says which."""
        config = self.config
        self.meta = {"batch_size": int(config.batch_size), "grad_accum_steps": self.accum,
                     "process_count": jax.process_count(), "dataset": config.data.dataset, "seed": int(config.seed),
                     "task": config.task, "mesh": dict(self.mesh.shape)}
        latest = self.checkpointer.latest_step() if restore else None
        if latest is not None:
            self.state = self.checkpointer.restore(latest, self.abstract_state, self.iterator, self.meta)
            self.restored_step = int(latest)
        else:
            self.state = jax.jit(self._new_state, out_shardings=self.state_sharding)(
                jax.device_put(trainable, self.state_sharding.params))
            self.restored_step = None

    def _setup_step(self) -> None:
        """`step_fn`, the jitted train step (`make_train_step`); the validation programs are jitted on first use."""
        self.compiler_options = to_plain(self.config.compiler_options) or None
        self.step_fn = jit_train_step(make_train_step(self.nets, self.config, self.tx, self.lr_schedule),
                                      self.state_sharding, self.frozen_sharding, self.batch_sharding,
                                      replicated(self.mesh), self.compiler_options)
        self._sample_fn = None
        self._reconstruct_fn = None
        self._finite_fn = None

    # ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for in-flight (async) checkpoint saves to complete, then close the checkpointer.

        Call it (or use `with Run(...) as run:`) before the process exits: an async save still in
        flight at exit is lost. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.checkpointer.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _empty_prompt_host(self, frozen):
        """The frozen text conditioning of the empty prompt: (1, 77, D), or for SDXL (states, pooled)."""
        nets = self.nets
        if nets.xl:
            from .step import encode_prompts_xl

            return encode_prompts_xl(nets, frozen, jnp.asarray(nets.empty_ids), jnp.asarray(nets.empty_ids_2))
        return nets.text_encoder.apply({"params": frozen["text_encoder"]}, jnp.asarray(nets.empty_ids)).last_hidden_state

    def compile_step(self, batch: dict):
        """`step_fn` compiled ahead of time for `batch`'s shapes (a `jax.stages.Compiled`, called like
        `step_fn`), after which the compiler's freed working memory is handed back to the operating
        system (`sharding.release_free_memory`), so that it does not add to the step's own."""
        compiled = self.step_fn.lower(self.state, self.frozen, batch).compile()
        release_free_memory()
        return compiled

    def next_batch(self) -> dict:
        """The next training batch as global device arrays (grad_accum_steps, micro_batch, ...), batch on dim 1.

        Only `batch_keys` are kept (images NHWC). Raises `ConfigError` when the host batch does not
        split into grad_accum_steps (see `data.device_batch`).
        """
        return device_batch(next(self.iterator), self.accum, self.batch_sharding, self.batch_keys)

    def save(self, step: int) -> None:
        """Start saving the state at `step` (async); `NonFiniteError` instead if the state has NaN/inf."""
        self.check_state_finite(step)
        self.checkpointer.save(step, self.state, self.iterator, self.meta)

    def check_state_finite(self, step: int) -> None:
        """Raise `NonFiniteError` naming `step` and the part of the state (params, opt_state, ema)
        that holds NaN or infinity. One reduction over the state, run before each checkpoint."""
        if self._finite_fn is None:
            def finite(state):
                return {name: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
                                                   if jnp.issubdtype(x.dtype, jnp.inexact)] or [True]))
                        for name, tree in (("params", state.params), ("opt_state", state.opt_state),
                                           ("ema", state.ema))}
            self._finite_fn = jax.jit(finite, out_shardings=replicated(self.mesh))
        flags = jax.device_get(self._finite_fn(self.state))
        bad = [name for name, ok in flags.items() if not bool(ok)]
        if bad:
            raise NonFiniteError(f"training step {step}: the train state's {' and '.join(bad)} hold NaN or "
                                 f"infinity; not saving a checkpoint of it{_latest_note(self)}")

    def export_params(self) -> dict:
        """The trainable params to export: the EMA when there is one and export.use_ema, gathered to every host."""
        tree = self.state.ema if (self.config.export.use_ema and self.state.ema) else self.state.params
        return jax.jit(lambda t: t, out_shardings=replicated(self.mesh))(tree)

    # ---------------------------------------------------------------------------------------------
    def validation_images(self, params: Any | None = None) -> np.ndarray | None:
        """A grid: one column per validation example; rows: condition (if any), then the sample."""
        cfg = self.config.validation
        source = self.validation_source
        if source is None or len(source) == 0 or cfg.num_images < 1:
            return None
        examples = validation_examples(source, int(cfg.num_images), int(self.config.data.resolution))
        n = len(examples)
        nets: Networks = self.nets
        params = self.state.params if params is None else params
        if self.config.task == "vae":  # rows: the images, their reconstructions (posterior mean)
            x = np.stack([e["pixel_values"] for e in examples]).astype(np.float32)
            rec = np.asarray(self._reconstruct(params["vae"], x))
            return image_grid([to_uint8(x), to_uint8(rec)])
        if self._sample_fn is None:
            plan = make_plan(nets.scheduler_config, int(cfg.num_inference_steps), cfg.solver or None)
            self._plan = plan
            self._sample_fn = jax.jit(make_sample_fn(nets, self.config, plan), out_shardings=replicated(self.mesh),
                                      compiler_options=self.compiler_options)
        if nets.xl:
            ids, neg = nets.prompt_ids([e["caption"] for e in examples]), nets.prompt_ids([""] * n)
        else:
            ids, neg = nets.token_ids([e["caption"] for e in examples]), np.repeat(nets.empty_ids, n, axis=0)
        cond = np.stack([e["conditioning_pixel_values"] for e in examples]).astype(np.float32)
        res = cond.shape[1] // nets.vae_scale_factor
        key = jax.random.key(int(cfg.seed))
        noise = jax.random.normal(key, (n, res, res, nets.vae.config.latent_channels), jnp.float32)
        with tracing_mesh(self.mesh):
            images = np.asarray(self._sample_fn(params, self.frozen, ids, neg, cond, noise, jax.random.fold_in(key, 1)))
        bad = np.flatnonzero(~np.isfinite(images.reshape(n, -1)).all(axis=1))
        if bad.size:  # before anything is written: a NaN sample must not become a black validation image
            raise NonFiniteError(f"validation sampling produced NaN or infinite pixels for validation image(s) "
                                 f"{bad.tolist()} ({cfg.solver}, {cfg.num_inference_steps} steps, guidance "
                                 f"{cfg.guidance_scale}); the weights may have diverged")
        rows = []
        if nets.controlnet is not None or nets.adapter is not None or self.config.task == "instruct_pix2pix":
            rows.append(to_uint8(cond, 0.0, 1.0))  # the condition, or the image to edit
        rows.append(to_uint8(images))
        return image_grid(rows)


    def _reconstruct(self, vae_params, images):
        vae = self.nets.vae
        if self._reconstruct_fn is None:
            self._reconstruct_fn = jax.jit(
                lambda p, x: jnp.clip(vae.apply({"params": p}, x), -1.0, 1.0), out_shardings=replicated(self.mesh),
                compiler_options=self.compiler_options)
        return self._reconstruct_fn(vae_params, images)

    def vae_scaling_factor(self, vae_params) -> float:
        """task="vae": `vae.scaling_factor`, or 1 / std of the latents (posterior samples) of up to
        `vae.scaling_examples` training images, as Stable Diffusion's 0.18215 was chosen."""
        cfg = self.config.vae
        if cfg.scaling_factor > 0:
            return float(cfg.scaling_factor)
        vae = self.nets.vae
        examples = validation_examples(self.train_source, int(cfg.scaling_examples), int(self.config.data.resolution))
        encode = jax.jit(lambda p, x, k: sample_posterior(vae.apply({"params": p}, x, method=vae.encode), k),
                         out_shardings=replicated(self.mesh))
        latents = []
        for i in range(0, len(examples), 32):
            x = np.stack([e["pixel_values"] for e in examples[i:i + 32]]).astype(np.float32)
            latents.append(np.asarray(encode(vae_params, x, jax.random.key(i))))
        std = float(np.std(np.concatenate(latents)))
        if not np.isfinite(std) or std <= 0:
            raise ConfigError(f"the VAE's latents have standard deviation {std}; set config.vae.scaling_factor")
        return 1.0 / std


def train(config, workdir: str | os.PathLike) -> dict:
    """Train per `config` in `workdir` (created; resumed from its checkpoints if it has any).

    Returns a summary: {"step", "restored_from", "exported": {...}, "last_loss"}.

    First of all, on a CPU-only JAX, XLA:CPU's memory-minimising scheduler is chosen
    (`config.xla_cpu_memory_scheduler`; `sharding.use_cpu_memory_scheduler`: only effective when
    nothing in the process has used JAX yet), then `jax.distributed` is initialised as
    `config.distributed.initialize` says ("auto": when the environment is a multi-process launch;
    `sharding.setup_distributed`), each outcome logged in one line. Non-finite values stop the run with `NonFiniteError` naming the training
    step and the metric:
    the step's metrics (loss, grad_norm) are fetched to the host at every log flush (every
    `log.every` steps, and before every checkpoint, validation and export), and the whole train
    state is checked before each checkpoint is saved, so a NaN is caught within `log.every` steps
    and never saved or exported: the latest checkpoint stays the last good one. A
    `KeyboardInterrupt` stops the loop; in-flight checkpoint saves are completed first. A SIGTERM
    (a pre-emption notice; with several processes, JAX's preemption sync point) saves a checkpoint
    at the next step boundary, waits for it, and raises `Preempted`. Raises `ConfigError` for a bad
    config and `RuntimeError` when the environment says multi-process but `jax.distributed` fails.
    """
    check_config(config)
    # before anything touches a device: XLA reads its flags, and jax.distributed must come first
    notes = [use_cpu_memory_scheduler(bool(config.xla_cpu_memory_scheduler)), setup_distributed(config.distributed)]
    if jax.process_index() == 0:
        prepare_workdir(Path(workdir))
        removed = remove_stale_exports(Path(workdir) / "export")
        if removed:
            log.warning("removed %d unfinished export folder(s) of an interrupted run: %s", len(removed),
                        ", ".join(str(p) for p in removed))
    with InterruptGuard() as interrupt, Run(config, workdir) as run:
        run.notes = [note for note in notes if note]
        return _train_loop(run, interrupt)


class Preempted(BaseException):
    """`train` stopped on SIGTERM (a pre-emption notice) after saving the state of `step`.

    `checkpoint_step` is the latest complete checkpoint (`step`, or None when the run stopped before
    its first step, with nothing to save), `directory` the checkpoints folder. Rerunning the same
    command resumes from it. A `BaseException`, like `KeyboardInterrupt`, so that no
    `except Exception` on the way swallows it; `train.py` exits with `cli.EXIT_TERMINATED` (143).
    """

    def __init__(self, step: int, checkpoint_step: int | None, directory: Path):
        self.step, self.checkpoint_step, self.directory = step, checkpoint_step, directory
        where = (f"saved a checkpoint of step {checkpoint_step}" if checkpoint_step is not None
                 else "no checkpoint was saved yet")
        super().__init__(f"terminated (SIGTERM) at step {step}; {where} in {directory}")


class InterruptGuard:
    """Ctrl-C (SIGINT) and SIGTERM during `train`, handled so that neither is lost or cuts a step.

    The first Ctrl-C is recorded and `check` raises KeyboardInterrupt at the next safe point (before
    the first step, between steps, before the final validation and export), so in-flight checkpoint
    saves complete and the state is whole. A second Ctrl-C raises at once. (Raising from the
    handler itself is not reliable: JAX registers a garbage-collector callback, and a
    KeyboardInterrupt raised while it runs is printed and swallowed.)

    SIGTERM (what TPU VMs, SLURM and Kubernetes send before they pre-empt) sets `terminate`; the
    training loop then saves a checkpoint at the next step boundary and raises `Preempted`
    (`preempted` is the test). With `jax.distributed` initialised the signal may reach only some of
    the processes, so there the handler is JAX's own preemption notifier (installed by
    `jax.distributed.initialize`, and left alone here) and `preempted(step)` asks JAX's preemption
    sync point (`multihost_utils.reached_preemption_sync_point`), which makes every process stop
    at the same step. Handlers are installed only from the main thread and only over the default
    ones.
    """

    def __init__(self):
        self.requested = False
        self.terminate = False
        self._previous = None
        self._previous_term = None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous = signal.signal(signal.SIGINT, self._handle)
            # with jax.distributed, JAX's preemption notifier owns SIGTERM (a C++ handler, which
            # signal.getsignal does not see): replacing it would hide the notice from the other processes
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and not jax.distributed.is_initialized():
                self._previous_term = signal.signal(signal.SIGTERM, self._handle_term)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if self._previous_term is not None:
            signal.signal(signal.SIGTERM, self._previous_term)
            self._previous_term = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("Ctrl-C: stopping before the next step (press it again to stop at once)", file=sys.stderr, flush=True)

    def _handle_term(self, signum, frame) -> None:
        if not self.terminate:
            self.terminate = True
            print("SIGTERM: saving a checkpoint at the next step boundary, then exiting", file=sys.stderr,
                  flush=True)

    def check(self) -> None:
        """Raise `KeyboardInterrupt` if Ctrl-C was pressed since the guard was entered; else do nothing."""
        if self.requested:
            raise KeyboardInterrupt

    def preempted(self, step: int) -> bool:
        """Whether to save and stop at `step`: SIGTERM was received here, or (with `jax.distributed`)
        JAX's preemption sync point is `step`. Call it once per step, at the same steps on every process."""
        if self.terminate:
            return True
        if jax.distributed.is_initialized():
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service=False)
                return False
        return False


def _stop_if_asked(run: Run, metric_log: _MetricLog, step: int, interrupt: InterruptGuard) -> None:
    """At a step boundary: on SIGTERM, checkpoint `step` (unless it is saved already, or is a fresh
    run's step 0), wait until every save is complete and raise `Preempted`; on Ctrl-C raise
    `KeyboardInterrupt`. The metrics are flushed (and so checked finite) before the save."""
    if interrupt.preempted(step):
        metric_log.flush()
        run.checkpointer.wait()
        if step > 0 and run.checkpointer.latest_step() != step:
            run.save(step)
            run.checkpointer.wait()
        raise Preempted(step, run.checkpointer.latest_step(), run.checkpointer.directory)
    interrupt.check()


def _train_loop(run: Run, interrupt: InterruptGuard) -> dict:
    """The steps from the state's step to `config.steps`, each followed by what is due at it
    (`_after_step`), then `_finish`. Returns `train`'s summary."""
    cfg = run.config
    if run.is_main:
        _write_json(run.workdir / "config.json", to_plain(cfg))
    start = step = int(jax.device_get(run.state.step))
    writer = _open_writer(run, start)
    metric_log = _MetricLog(run, writer)
    step_fn = None
    try:
        while step < cfg.steps:
            _stop_if_asked(run, metric_log, step, interrupt)
            batch = run.next_batch()
            with tracing_mesh(run.mesh):
                if step_fn is None:
                    step_fn = run.compile_step(batch)
                run.state, metrics = step_fn(run.state, run.frozen, batch)
            step += 1
            metric_log.add(step, metrics)
            if step == start + 1:  # the first step includes compilation: time samples/s from after it
                metric_log.restart_clock(step)
            _after_step(run, writer, metric_log, step)
        exported = _finish(run, writer, metric_log, step, interrupt)
    finally:
        writer.close()
    return {"step": step, "restored_from": run.restored_step, "exported": exported,
            "last_loss": metric_log.last.get("loss")}


def _open_writer(run: Run, start: int) -> MetricsWriter:
    """The metrics writer (console, progress bar, metrics.jsonl, TensorBoard; quiet on other
    hosts than the main one), after the run's one-line header."""
    cfg = run.config
    writer = MetricsWriter(run.workdir, total_steps=int(cfg.steps), initial_step=start, batch_size=int(cfg.batch_size),
                           tensorboard=bool(cfg.log.tensorboard), progress_bar=bool(cfg.log.progress_bar),
                           enabled=run.is_main)
    writer.console(f"jaxcontrol train: task={cfg.task} mesh {describe(run.mesh)}, {jax.process_count()} host(s); "
                   + (f"resumed from step {run.restored_step}" if run.restored_step is not None else "fresh start"))
    for note in getattr(run, "notes", ()):
        writer.console(note)
    return writer


class _MetricLog:
    """Step metrics on their way to the host: kept on the device until a flush fetches all of
    them at once, logs them, then checks them finite (`NonFiniteError`). `interval` holds the
    records since the last summary, `last` the latest value of each metric."""

    def __init__(self, run: Run, writer: MetricsWriter):
        self.run, self.writer = run, writer
        self.pending: list[tuple[int, dict]] = []
        self.interval: list[dict] = []
        self.last: dict = {}

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> None:
        if not self.pending:
            return
        host = jax.device_get([m for _, m in self.pending])
        records = [(s, {k: float(v) for k, v in m.items()}) for (s, _), m in zip(self.pending, host)]
        self.pending = []
        self.writer.steps(records)  # logged first, so that metrics.jsonl shows the bad values too
        check_finite_metrics(records, self.run)
        self.interval.extend(r for _, r in records)
        self.last.update(records[-1][1])

    def restart_clock(self, step: int) -> None:
        """Flush, and time samples/s (and the next summary's interval) from `step` on."""
        self.flush()
        self.writer.reset_clock(step)
        self.interval.clear()

    def summarize(self, step: int) -> None:
        """Flush, and log the means over the interval (the learning rate: its latest value)."""
        self.flush()
        if self.interval:
            means = {k: float(np.mean([r[k] for r in self.interval])) for k in self.interval[0]}
            means["learning_rate"] = self.interval[-1]["learning_rate"]
            self.writer.summary(step, means)
            self.interval.clear()


def _due(step: int, every) -> bool:
    """Whether an `every`-steps task is due at `step` (never when `every` is 0)."""
    every = int(every)
    return bool(every) and step % every == 0


def _after_step(run: Run, writer: MetricsWriter, metric_log: _MetricLog, step: int) -> None:
    """What is due after `step`, in this order: the metrics summary (every `log.every` steps and
    at the last), a checkpoint (every `checkpoint.every` and at the last), validation images and
    an export to export/steps/STEP (every `validation.every` / `export.every`, before the last
    step; at the last step `_finish` does them). Metrics are flushed, and so checked, first."""
    cfg = run.config
    last = step == cfg.steps
    if step % (int(cfg.log.every) or int(cfg.steps)) == 0 or last:
        metric_log.summarize(step)
    if _due(step, cfg.checkpoint.every) or last:
        metric_log.flush()
        run.save(step)
        writer.console(f"step {step}: checkpoint saving (async) to {run.checkpointer.directory}")
    if _due(step, cfg.validation.every) and not last:
        metric_log.flush()
        _validate(run, writer, step)
    if _due(step, cfg.export.every) and not last:
        metric_log.flush()
        run.check_state_finite(step)
        _export(run, writer, run.workdir / "export" / "steps" / str(step))


def _finish(run: Run, writer: MetricsWriter, metric_log: _MetricLog, step: int, interrupt: InterruptGuard) -> dict:
    """After the loop: the last metrics, the checkpoint saves completed, then the final
    validation and export (`validation.at_end`, `export.at_end`); returns the export's paths.
    A SIGTERM before either stops here (`Preempted`): the last step's checkpoint is saved already."""
    _stop_if_asked(run, metric_log, step, interrupt)
    metric_log.flush()
    run.checkpointer.wait()
    if run.config.validation.at_end:
        _validate(run, writer, step)
    exported = {}
    if run.config.export.at_end:
        if interrupt.terminate:
            _stop_if_asked(run, metric_log, step, interrupt)
        interrupt.check()
        run.check_state_finite(step)
        exported = _export(run, writer, run.workdir / "export")
    return exported


def check_finite_metrics(records: list[tuple[int, dict]], run: Run | None = None) -> None:
    """Raise `NonFiniteError` naming the first training step whose metrics (loss, grad_norm, ...)
    hold NaN or infinity. `records` are (step, {name: float}) in step order."""
    for step, metrics in records:
        bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
        if bad:
            what = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NonFiniteError(f"training step {step}: non-finite {what}; stopped without saving a checkpoint "
                                 f"or exporting from this state{_latest_note(run)} (lower optim.learning_rate, "
                                 "set optim.max_grad_norm, or check the data)")


def _latest_note(run: Run | None) -> str:
    if run is None:
        return ""
    run.checkpointer.wait()
    latest = run.checkpointer.latest_step()
    if latest is None:
        return "; no checkpoint had been saved"
    return f"; the latest checkpoint is step {latest} in {run.checkpointer.directory}"


def prepare_workdir(workdir: Path) -> None:
    """Create `workdir` and check that files can be written in it (`OSError` naming it otherwise)."""
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the run directory exists and is not a directory", str(workdir))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=workdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise type(e)(e.errno, f"cannot be used as the run directory: {e.strerror or e}", str(workdir)) from e


STALE_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[^/]+$")


def remove_stale_exports(export_dir: Path) -> list[Path]:
    """Clean what a killed export left under `export_dir`; returns the folders removed.

    Exports are written through `atomic_directory`: in `.NAME.tmp-*` beside the destination, renamed
    into place when complete; a replaced export is first renamed aside to `.NAME.old-*`. Only a
    killed process leaves either behind. A `.tmp-*` folder is always incomplete and is deleted; an
    `.old-*` folder is deleted when NAME exists, and renamed back to NAME when it does not (the kill
    came between the two renames). Call it only while no export is being written.
    """
    removed: list[Path] = []
    if not export_dir.is_dir():
        return removed
    for folder, dirs, _ in os.walk(export_dir):
        for name in sorted(dirs):
            m = STALE_TEMP.match(name)
            if m is None:
                continue
            path = Path(folder) / name
            dest = Path(folder) / m.group("name")
            if m.group("kind") == "old" and not dest.exists():
                os.rename(path, dest)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if STALE_TEMP.match(d) is None]
    return removed


def _devices(count: int) -> list:
    devices = jax.devices()
    if count == -1:
        return devices
    if jax.process_count() > 1:
        raise ConfigError(f"config.mesh.num_devices={count}: a multi-host run uses every device (set -1)")
    if count > len(devices):
        raise ConfigError(f"config.mesh.num_devices={count}, but there are {len(devices)} devices")
    return devices[:count]


def _export(run: Run, writer: MetricsWriter, out_dir: Path) -> dict:
    """Export the trainable params (the EMA if configured) in the configured formats to `out_dir`."""
    cfg = run.config
    formats = tuple(f for f in ("diffusers", "jaxcontrol") if cfg.export[f])
    params = run.export_params()
    frozen = jax.jit(lambda t: t, out_shardings=replicated(run.mesh))(run.frozen)
    nets = run.nets
    if cfg.task == "vae":
        factor = run.vae_scaling_factor(params["vae"])
        nets = dataclasses.replace(nets, vae=nets.vae.clone(
            config=dataclasses.replace(nets.vae.config, scaling_factor=factor)))
        writer.console(f"VAE scaling_factor {factor:.5f}")
    if cfg.export.scheduler_class:
        nets = dataclasses.replace(nets, scheduler_config={**nets.scheduler_config,
                                                           "_class_name": str(cfg.export.scheduler_class)})
    exported = {}
    if run.is_main and formats:
        exported = {k: str(v) for k, v in export_trained(
            nets, params, frozen, out_dir, formats=formats, dtype=cfg.export.dtype).items()}
        for k, v in exported.items():
            writer.console(f"exported {k}: {v}")
    return exported


def _validate(run: Run, writer: MetricsWriter, step: int) -> None:
    t0 = time.perf_counter()
    grid = run.validation_images()
    if grid is not None:
        writer.image(step, "validation", grid)
        writer.console(f"step {step}: validation took {time.perf_counter() - t0:.1f}s")


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj, indent=1, sort_keys=True, default=str)


__all__ = ["InterruptGuard", "Preempted", "Run", "TrainState", "check_finite_metrics", "prepare_workdir", "remove_stale_exports", "train"]
