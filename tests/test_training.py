"""jaxcontrol.training and train.py: the objective, the step, sharding, checkpoints and resume.

The networks are configs/smoke.py's one-block models on 8x8 fill50k images. Two train steps are
compiled for the whole module (one device; 8 devices as data=4 x fsdp=2) and shared by the tests;
the resume test runs train.py in subprocesses and compares their losses with the one-device
step's, bit for bit.
"""

import os
import runpy
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxcontrol.errors import CheckpointError, ConfigError
from jaxcontrol.models.params import flatten
from jaxcontrol.schedulers import NoiseSchedule, make_betas
from jaxcontrol.training import (
    Checkpointer,
    Run,
    check_config,
    default_config,
    make_mesh,
    make_train_step,
    param_shardings,
)
from jaxcontrol.training import losses
from jaxcontrol.training.config import timestep_sampling
from jaxcontrol.training.data import device_batch
from jaxcontrol.training.logger import read_metrics
from jaxcontrol.training.remat import remat_scope
from jaxcontrol.training.sharding import param_spec
from jaxcontrol.training.state import TrainState, create_train_state, ema_decay, learning_rate_schedule, make_optimizer
from jaxcontrol.training.step import model_prediction
from _smoke import smoke_config as _smoke_config

ROOT = Path(__file__).resolve().parents[1]
needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def smoke_config(data_dir, **overrides):
    return _smoke_config(data_dir, tensorboard=None, **overrides)


def _copy(tree):
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


# --------------------------------------------------------------------------------------------------
# the objective's terms, without networks
# --------------------------------------------------------------------------------------------------


def test_timestep_sampling_uniform_and_cubic():
    key = jax.random.key(0)
    u = np.asarray(losses.sample_timesteps(key, 20000, 1000, "uniform"))
    c = np.asarray(losses.sample_timesteps(key, 20000, 1000, "cubic"))
    assert u.dtype == np.int32 and u.min() >= 0 and u.max() <= 999
    assert c.min() >= 0 and c.max() <= 999
    assert abs(u.mean() - 499.5) < 10
    # t = floor((1 - U^3) T): E[1 - U^3] = 3/4, and P(t < T/2) = P(U^3 > 1/2) = 1 - 2^(-1/3)
    assert abs(c.mean() / 1000 - 0.75) < 0.01
    assert abs((c < 500).mean() - (1 - 2 ** (-1 / 3))) < 0.01
    with pytest.raises(ConfigError, match="cubic"):
        losses.sample_timesteps(key, 2, 10, "logit_normal")


def test_min_snr_weights_and_targets_match_the_diffusers_formulas():
    sched = NoiseSchedule(make_betas(1000, 0.00085, 0.012, "scaled_linear"))
    t = jnp.array([0, 10, 300, 999])
    ac = sched.alphas_cumprod[np.asarray(t)].astype(np.float64)
    snr = ac / (1 - ac)
    gamma = 5.0
    np.testing.assert_allclose(losses.min_snr_weights(sched, t, gamma, "epsilon"), np.minimum(snr, gamma) / snr,
                               rtol=1e-5)
    np.testing.assert_allclose(losses.min_snr_weights(sched, t, gamma, "v_prediction"),
                               np.minimum(snr, gamma) / (snr + 1), rtol=1e-5)
    x0 = jax.random.normal(jax.random.key(1), (4, 2, 2, 3))
    eps = jax.random.normal(jax.random.key(2), (4, 2, 2, 3))
    assert losses.prediction_target(sched, x0, eps, t, "epsilon") is eps
    v = np.sqrt(ac)[:, None, None, None] * eps - np.sqrt(1 - ac)[:, None, None, None] * x0
    np.testing.assert_allclose(losses.prediction_target(sched, x0, eps, t, "v_prediction"), v, rtol=1e-5, atol=1e-6)
    # per-sample MSE, weighted, then the batch mean
    w = jnp.array([1.0, 0.0, 2.0, 0.5])
    per = np.mean((np.asarray(x0) - np.asarray(eps)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(losses.diffusion_loss(x0, eps, w), np.mean(per * np.asarray(w)), rtol=1e-6)
    with pytest.raises(ConfigError):
        losses.prediction_target(sched, x0, eps, t, "sample")


def test_noise_offset_and_prompt_dropout():
    noise = jnp.zeros((64, 3, 3, 4))
    off = np.asarray(losses.offset_noise(jax.random.key(0), noise, 0.1))
    # one offset per sample and channel, constant over the image
    assert np.all(off == off[:, :1, :1, :])
    assert 0.05 < off[:, 0, 0, :].std() < 0.15
    assert losses.offset_noise(jax.random.key(0), noise, 0.0) is noise

    prompts = jnp.arange(1000 * 3).reshape(1000, 3) + 10
    empty = jnp.array([[1, 2, 3]])
    out = np.asarray(losses.drop_prompts(jax.random.key(3), prompts, empty, 0.3))
    dropped = np.all(out == [1, 2, 3], axis=1)
    assert abs(dropped.mean() - 0.3) < 0.05
    np.testing.assert_array_equal(out[~dropped], np.asarray(prompts)[~dropped])
    emb = losses.drop_prompts(jax.random.key(3), jnp.ones((1000, 2, 5)), jnp.zeros((1, 2, 5)), 0.3)
    np.testing.assert_array_equal(np.all(np.asarray(emb) == 0, axis=(1, 2)), dropped)


def test_schedules_and_ema_decay():
    c = default_config().optim
    c.learning_rate, c.warmup_steps = 1e-4, 10
    const = learning_rate_schedule(c, 100)
    assert float(const(0)) == 0.0 and float(const(5)) == pytest.approx(5e-5) and float(const(50)) == pytest.approx(1e-4)
    c.schedule, c.min_lr_ratio = "cosine", 0.1
    cos = learning_rate_schedule(c, 100)
    assert float(cos(10)) == pytest.approx(1e-4) and float(cos(100)) == pytest.approx(1e-5)
    assert float(cos(55)) == pytest.approx(1e-5 + 0.5 * 9e-5, rel=1e-3)
    # diffusers EMAModel.get_decay: 0 at the first update, then min(decay, (1 + s) / (10 + s)), s = step - 1
    assert float(ema_decay(jnp.array(1), 0.999)) == 0.0
    assert float(ema_decay(jnp.array(2), 0.999)) == pytest.approx(2 / 11)
    assert float(ema_decay(jnp.array(100000), 0.999)) == pytest.approx(0.999)


def test_grad_accumulation_clipping_and_ema_in_the_step():
    """The step's scan over micro-batches equals one big batch; clipping and the EMA act per update."""
    w_true = jnp.array([1.0, -2.0, 0.5])

    def loss_fn(params, frozen, batch, key):
        pred = batch["x"] @ params["w"]["kernel"]
        return jnp.mean((pred - batch["y"]) ** 2), {}

    x = jax.random.normal(jax.random.key(0), (8, 3))
    y = x @ w_true
    params = {"w": {"kernel": jnp.zeros((3,))}}
    steps = {}
    for accum in (1, 4):
        c = default_config()
        c.grad_accum_steps, c.batch_size = accum, 8
        c.optim.learning_rate, c.optim.weight_decay, c.optim.max_grad_norm, c.optim.ema_decay = 0.1, 0.0, 0.5, 0.9
        sched = learning_rate_schedule(c.optim, 10)
        tx = make_optimizer(c.optim, sched)
        step = jax.jit(make_train_step(None, c, tx, sched, loss_fn=loss_fn))
        state = create_train_state(params, tx, 0, ema=True)
        batch = {"x": x.reshape(accum, 8 // accum, 3), "y": y.reshape(accum, 8 // accum)}
        for _ in range(3):
            state, metrics = step(state, None, batch)
        steps[accum] = (state, metrics)
    (s1, m1), (s4, m4) = steps[1], steps[4]
    np.testing.assert_allclose(s4.params["w"]["kernel"], s1.params["w"]["kernel"], rtol=1e-5)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    assert int(s4.step) == 3
    # clipped: each of the 3 Adam updates is at most lr per coordinate; the raw gradient norm is reported
    assert float(m1["grad_norm"]) > 0.5
    # the EMA is a convex combination of the iterates: between 0 and the params, not equal to them
    ema, p = np.asarray(s1.ema["w"]["kernel"]), np.asarray(s1.params["w"]["kernel"])
    assert np.all(np.abs(ema) <= np.abs(p) + 1e-7) and not np.allclose(ema, p)


def test_check_config_names_the_key():
    c = default_config()
    c.model.init = "scratch"
    check_config(c)
    bad = default_config()
    with pytest.raises(ConfigError, match="model.pretrained_path"):
        check_config(bad)
    c.batch_size, c.grad_accum_steps = 6, 4
    with pytest.raises(ConfigError, match="config.batch_size"):
        check_config(c)
    c.grad_accum_steps = 1
    c.mesh.batch_axes = ("data", "model")
    with pytest.raises(ConfigError, match="mesh.batch_axes"):
        check_config(c)
    c = default_config()
    c.model.init, c.task = "scratch", "adapter"
    c.controlnet.small_scale = True
    with pytest.raises(ConfigError, match="small_scale"):
        check_config(c)
    c.controlnet.small_scale = False
    c.unknown_key = 1
    with pytest.raises(ConfigError, match="unknown_key"):
        check_config(c)
    c = default_config()
    c.model.init, c.optim.schedule = "scratch", "linear"
    with pytest.raises(ConfigError, match="optim.schedule"):
        check_config(c)
    assert timestep_sampling(c) == "uniform"
    c.task = "adapter"
    assert timestep_sampling(c) == "cubic"


@needs8
def test_mesh_and_param_sharding_rules():
    mesh = make_mesh(-1, 2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert dict(make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ConfigError, match="fsdp=3"):
        make_mesh(-1, 3)
    # the largest dimension that the fsdp size divides; small or indivisible leaves replicated
    assert param_spec((3, 3, 320, 640), 2, 16) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert param_spec((1280, 3), 4, 16) == jax.sharding.PartitionSpec("fsdp", None)
    assert param_spec((7, 5), 2, 16) == jax.sharding.PartitionSpec()
    assert param_spec((8,), 2, 16) == jax.sharding.PartitionSpec()
    sh = param_shardings({"a": jnp.zeros((64, 6)), "b": jnp.zeros(())}, mesh, min_size=16)
    assert sh["a"].spec == jax.sharding.PartitionSpec("fsdp", None) and sh["b"].spec == jax.sharding.PartitionSpec()


def _remat_case():
    from jaxcontrol.models import UNet2DConditionConfig, UNet2DConditionModel, init_params

    smoke = runpy.run_path(str(ROOT / "configs" / "smoke.py"))
    unet = UNet2DConditionModel(UNet2DConditionConfig(**smoke["UNET"]))
    params = init_params(unet, 0)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 3, 16))

    def loss(p, mode):
        with remat_scope(mode):
            return jnp.mean(unet.apply({"params": p}, x, jnp.array([1, 500]), ctx) ** 2)

    def residual_bytes(mode):  # what the linearised function keeps for the backward pass (traced, not run)
        f_jvp = jax.eval_shape(lambda p: jax.linearize(lambda q: loss(q, mode), p)[1], params)
        return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(f_jvp))

    return unet, params, loss, residual_bytes


def test_remat_keeps_fewer_residuals_and_the_same_values():
    unet, params, loss, residual_bytes = _remat_case()
    full, blocks, layers = residual_bytes("none"), residual_bytes("blocks"), residual_bytes("layers")
    assert blocks < 0.5 * full and layers < full, (full, blocks, layers)
    with pytest.raises(ConfigError, match="remat mode"):
        with remat_scope("everything"):
            pass


@pytest.mark.slow
def test_remat_gradients_equal_plain_gradients():
    unet, params, loss, _ = _remat_case()
    # the wrapped blocks get their arguments back in place: the same values and gradients
    values = jax.jit(lambda p: [loss(p, m) for m in ("none", "blocks", "layers")])(params)
    np.testing.assert_allclose(values[1:], [values[0]] * 2, rtol=1e-6)
    g0, g1, g2 = jax.jit(lambda p: [jax.grad(loss)(p, m) for m in ("none", "blocks", "layers")])(params)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(g) for g in (g0, g1, g2))):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# the real step on the smoke networks
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """A one-device ControlNet run, its initial state and its first batches (host numpy).

    Once the dataset exists, the train.py run that the resume test kills starts in the background,
    so that it compiles while this process does.
    """
    run = Run(smoke_config(data_dir), tmp_path_factory.mktemp("single"), restore=False)
    run.initial = _copy(run.state)
    it = iter(run.dataset)
    run.host_batches = [next(it) for _ in range(8)]
    run.to_kill = None
    if "PYTEST_XDIST_WORKER" not in os.environ:  # under xdist the other worker keeps the second core busy
        run.to_kill = _start_killed_run(tmp_path_factory.mktemp("resume"), data_dir)
    yield run
    if run.to_kill is not None:
        run.to_kill.finish()


@pytest.fixture(scope="module")
def sharded(data_dir, tmp_path_factory):
    cfg = smoke_config(data_dir, **{"mesh.num_devices": -1, "mesh.data": -1, "mesh.fsdp": 2,
                                    "mesh.min_shard_size": 64})
    return Run(cfg, tmp_path_factory.mktemp("sharded"), restore=False)


def _batch(run, host):
    return device_batch(host, run.accum, run.batch_sharding, run.batch_keys)


def _steps(run, state, batches, *, fixed_rng=False):
    losses_, rng = [], np.asarray(state.rng)  # a host copy: the step donates the state's buffers
    for host in batches:
        if fixed_rng:
            state = state.replace(rng=jax.device_put(rng, run.state_sharding.rng))
        state, m = run.step_fn(state, run.frozen, _batch(run, host))
        losses_.append(float(m["loss"]))
    return state, losses_


def test_controlnet_at_init_leaves_the_unet_prediction_unchanged(single):
    nets, frozen = single.nets, single.frozen
    batch = single.host_batches[0]
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
    t = jnp.arange(8) * 120
    ctx = jax.random.normal(jax.random.key(1), (8, 77, 16))
    cond = jnp.asarray(batch["conditioning_pixel_values"])
    cparams = single.initial.params["controlnet"]

    def both(p, up):
        down, mid = nets.controlnet.apply({"params": p["controlnet"]}, x, t, ctx, cond)
        return down, mid, model_prediction(nets, single.config, p, frozen, x, t, ctx, cond), nets.unet.apply(
            {"params": up}, x, t, ctx)

    down, mid, with_cn, alone = jax.jit(both, compiler_options=single.compiler_options)(
        single.initial.params, frozen["unet"])
    assert cparams and all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
    # the same prediction (the residuals are exact zeros; XLA may fuse the two programs differently)
    # (measured: at most 2e-6 apart on outputs of order 1)
    np.testing.assert_allclose(np.asarray(with_cn), np.asarray(alone), rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(alone))) > 0.1


def test_zero_convolutions_get_gradients_at_step_one(single):
    """Zhang et al. eq. 6-8: with W = 0 the zero convolutions output 0 but dL/dW = input x dL/dy != 0.

    After the first AdamW update every zero-conv weight has moved by about lr (Adam's first step is
    lr * g / |g|), while everything behind them, the hint encoder's zero-initialised conv_out and the
    copied U-Net encoder, got exactly zero gradient (only weight decay moved the latter).
    """
    c = single.config.optim
    lr, wd = c.learning_rate, c.weight_decay
    before = flatten(single.initial.params["controlnet"])
    state, _ = _steps(single, _copy(single.initial), single.host_batches[:1])
    after = flatten(state.params["controlnet"])
    zero_convs = [k for k in before if k.startswith(("controlnet_down_blocks_", "controlnet_mid_block/"))]
    # one zero convolution per U-Net skip connection (conv_in and one resnet here) plus the mid block's
    assert {k.split("/")[0] for k in zero_convs} == {"controlnet_down_blocks_0", "controlnet_down_blocks_1",
                                                     "controlnet_mid_block"}
    for k in zero_convs:
        assert not np.any(np.asarray(before[k])), k
        if k.endswith("kernel"):
            moved = np.abs(np.asarray(after[k]))
            assert np.all(moved > 0.5 * lr) and np.all(moved <= lr * 1.0001), (k, moved.min(), moved.max())
    for k in ("controlnet_cond_embedding/conv_out/kernel", "controlnet_cond_embedding/conv_out/bias"):
        np.testing.assert_array_equal(np.asarray(after[k]), 0.0)
    encoder = [k for k in before if k.startswith("down_blocks_0/") and k.endswith("kernel")]
    assert encoder
    for k in encoder:
        np.testing.assert_allclose(np.asarray(after[k]), np.asarray(before[k]) * (1 - lr * wd), rtol=1e-6, atol=1e-9)


def test_loss_decreases_on_a_fixed_batch(single):
    # the same batch, noise and timesteps every step: a deterministic objective
    _, trace = _steps(single, _copy(single.initial), [single.host_batches[0]] * 8, fixed_rng=True)
    assert all(np.isfinite(trace))
    # (measured 1.186 -> 1.163 over 8 steps at lr 1e-3: a ControlNet starts from zero residuals)
    assert all(b < a for a, b in zip(trace, trace[1:])), trace
    assert trace[-1] < 0.99 * trace[0], trace


@needs8
def test_sharded_losses_match_single_device(single, sharded):
    assert dict(sharded.mesh.shape) == {"data": 4, "fsdp": 2}
    specs = [s.spec for s in jax.tree_util.tree_leaves(sharded.state_sharding.params)]
    assert any("fsdp" in tuple(s) for s in specs)  # trainable params really are split
    # the same initial state on both meshes
    for a, b in zip(jax.tree_util.tree_leaves(single.initial), jax.tree_util.tree_leaves(sharded.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    batch = _batch(sharded, single.host_batches[0])
    assert len(batch["pixel_values"].sharding.device_set) == 8
    s1, l1 = _steps(single, _copy(single.initial), single.host_batches[:3])
    s8, l8 = _steps(sharded, _copy(sharded.state), single.host_batches[:3])
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    sharded.after3 = s8


@needs8
def test_checkpoint_restores_onto_a_different_mesh(single, sharded, tmp_path):
    """Saved on data=4 x fsdp=2, restored onto one device and onto data=2 x fsdp=4; training continues."""
    if not hasattr(sharded, "after3"):  # another worker ran the sharded-loss test: take the 3 steps here
        sharded.after3, _ = _steps(sharded, _copy(sharded.state), single.host_batches[:3])
    state8 = sharded.after3
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    ckpt.save(3, state8, meta={"batch_size": 8})
    ckpt.wait()
    on_one = ckpt.restore(3, single.abstract_state)
    mesh24 = make_mesh(2, 4)
    abstract24 = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        single.abstract_state, param_shardings(single.abstract_state, mesh24,
                                                                               min_size=512))
    on_24 = ckpt.restore(3, abstract24)
    for a, b, c in zip(jax.tree_util.tree_leaves(state8), jax.tree_util.tree_leaves(on_one),
                       jax.tree_util.tree_leaves(on_24)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
    assert len(jax.tree_util.tree_leaves(on_one)[1].sharding.device_set) == 1
    assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(on_24.params))
    # step 4 from the restored state on one device = step 4 on the original mesh
    _, l1 = _steps(single, on_one, single.host_batches[3:4])
    _, l8 = _steps(sharded, state8, single.host_batches[3:4])
    np.testing.assert_allclose(l1, l8, rtol=2e-5)
    ckpt.close()


def test_checkpoint_refuses_a_different_batch_geometry(single, tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1)
    it = iter(single.dataset)
    next(it)
    ckpt.save(1, _copy(single.initial), it, meta={"batch_size": 8, "grad_accum_steps": 1})
    ckpt.wait()
    with pytest.raises(CheckpointError, match="batch_size=8"):
        ckpt.restore(1, single.abstract_state, iter(single.dataset), meta={"batch_size": 16, "grad_accum_steps": 1})
    ckpt.close()


# --------------------------------------------------------------------------------------------------
# train.py: SIGKILL mid-run (during an async save), resume, compare with an uninterrupted run
# --------------------------------------------------------------------------------------------------

_BOOT = (
    "import sys, runpy, jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
    "sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _train_cmd(workdir, data_dir, *extra, num_devices=1):
    return [sys.executable, "-c", _BOOT, "--config", "configs/smoke.py", "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", f"--config.mesh.num_devices={num_devices}", *extra]


def _env(cache, devices=8):
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               TOKENIZERS_PARALLELISM="false")
    return env


class KillAtLine:
    """Runs a command in the background and SIGKILLs it as soon as it prints a line containing `trigger`."""

    def __init__(self, cmd, env, trigger):
        self.cmd, self.env, self.trigger = cmd, env, trigger
        self.workdir = Path(cmd[cmd.index("--workdir") + 1])
        self.lines = []
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.trigger in line:
                self.proc.send_signal(signal.SIGKILL)
                break

    def finish(self, timeout=600):
        self.thread.join(timeout)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        return self.proc.returncode


def _start_killed_run(tmp, data_dir):
    return KillAtLine(_train_cmd(tmp / "run", data_dir), _env(tmp / "xla-cache"), "step 6: checkpoint saving")


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(single, data_dir, tmp_path):
    # the uninterrupted run: the same compiled program from a fresh state and a fresh iterator
    it = iter(single.dataset)
    _, reference = _steps(single, _copy(single.initial), [next(it) for _ in range(8)])

    # train.py (started by the `single` fixture), killed right after it began the async save of step 6
    killer = single.to_kill or _start_killed_run(tmp_path, data_dir)
    assert killer.finish() == -signal.SIGKILL, "".join(killer.lines[-30:])
    workdir, env = killer.workdir, killer.env
    killed = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in killed] == list(range(1, 7))
    left = sorted(p.name for p in (workdir / "checkpoints").iterdir())

    resumed = subprocess.run(_train_cmd(workdir, data_dir, "--config.export.at_end=True"),
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    start = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert start in (4, 6), (start, left)
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7)) + list(range(start + 1, 9)), left
    for r in records:  # killed run, then resumed run: every loss equals the uninterrupted run's, bit for bit
        assert np.float32(r["loss"]) == np.float32(reference[r["step"] - 1]), (r, reference)

    # the resumed run finished the job: checkpoint, TensorBoard, both exports
    assert sorted(Checkpointer(workdir / "checkpoints").all_steps())[-1] == 8
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    import jaxcontrol

    final = Checkpointer(workdir / "checkpoints").restore(8, single.abstract_state)
    for fmt in ("diffusers", "jaxcontrol"):
        module, params = jaxcontrol.load_model(workdir / "export" / fmt / "controlnet")
        assert type(module).__name__ == "ControlNetModel"
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(final.params["controlnet"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print(f"killed during/after the step-6 save; checkpoint dir then held {left}; resumed from {start}")


# --------------------------------------------------------------------------------------------------
# the other tasks, end to end (slow: each compiles its own step and sampler)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("task", ["adapter", "unet", "controlnet-small-unlocked"])
def test_train_py_other_tasks_end_to_end(task, data_dir, tmp_path):
    extra = ["--config.steps=4", "--config.export.at_end=True", "--config.validation.at_end=True"]
    if task == "controlnet-small-unlocked":
        extra += ["--config.controlnet.small_scale=True", "--config.controlnet.unlock_unet=True",
                  "--config.grad_accum_steps=2", "--config.optim.ema_decay=0.9"]
    else:
        extra += [f"--config.task={task}"]
    if task == "adapter":  # trains from precomputed VAE moments and text embeddings, with prompt dropout
        extra += ["--config.data.precompute=True", "--config.loss.proportion_empty_prompts=0.5"]
    if task == "unet":
        extra += ["--config.loss.snr_gamma=5.0", "--config.loss.prediction_type=v_prediction",
                  "--config.loss.noise_offset=0.05", "--config.optim.schedule=cosine"]
    out = subprocess.run(_train_cmd(tmp_path / "run", _ensure_data(data_dir), *extra), cwd=ROOT,
                         env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "validation_step_0000004.png"))
    rows = 1 if task == "unet" else 2  # (conditions,) samples
    assert grid.shape == (rows * 8, 2 * 8, 3) and grid[-8:].std() > 0
    import jaxcontrol

    names = {"adapter": ["adapter"], "unet": ["pipeline"], "controlnet-small-unlocked": ["controlnet", "unet"]}[task]
    for name in names:
        for fmt in ("diffusers", "jaxcontrol"):
            path = tmp_path / "run" / "export" / fmt / name
            if name == "pipeline":
                bundle = jaxcontrol.load_pipeline(path)
                assert {"unet", "vae", "text_encoder"} <= set(bundle.modules) and bundle.tokenizer is not None
                assert bundle.scheduler_config["prediction_type"] == "v_prediction"
            else:
                jaxcontrol.load_model(path)
    if task == "unet":
        from diffusers import StableDiffusionPipeline

        from jaxcontrol.training import build_networks

        StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "export" / "diffusers" / "pipeline")
        # the export is the base of a ControlNet run, in either format
        for fmt in ("diffusers", "jaxcontrol"):
            cfg = smoke_config(data_dir, **{"model.init": "pretrained",
                                            "model.pretrained_path": str(tmp_path / "run" / "export" / fmt / "pipeline")})
            nets, trainable, frozen = build_networks(check_config(cfg), tmp_path / fmt)
            assert set(trainable) == {"controlnet"} and set(frozen) == {"unet", "vae", "text_encoder"}
            assert nets.prediction_type == "v_prediction" and nets.tokenizer is not None
    if task == "adapter":
        from diffusers import T2IAdapter

        assert (tmp_path / "run" / "precomputed" / "meta.json").is_file()

        T2IAdapter.from_pretrained(tmp_path / "run" / "export" / "diffusers" / "adapter")


def _ensure_data(data_dir):
    from jaxcontrol.data import build_fill50k

    cfg = smoke_config(data_dir)
    build_fill50k(data_dir, image_size=cfg.data.resolution, num_train=cfg.data.fill50k_num_train,
                  num_validation=cfg.data.fill50k_num_validation, seed=cfg.data.fill50k_seed)
    return data_dir


def test_train_step_metrics_are_reported(single):
    state, m = single.step_fn(_copy(single.initial), single.frozen, _batch(single, single.host_batches[0]))
    assert isinstance(state, TrainState) and int(state.step) == 1
    assert set(m) == {"loss", "grad_norm", "learning_rate"}
    assert float(m["learning_rate"]) == pytest.approx(single.config.optim.learning_rate)
    assert float(m["grad_norm"]) > 0


@pytest.mark.slow
def test_train_py_on_two_hosts(data_dir, tmp_path):
    """Two processes x 2 CPU devices (jax.distributed over gloo): per-host data shards, global batches,
    an fsdp-sharded state written by both processes, export, and a resume on both hosts."""
    import socket

    _ensure_data(data_dir)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = _env(tmp_path / "cache", devices=2)
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    workdir = tmp_path / "run"

    def launch(steps, extra=()):
        procs = [subprocess.Popen(
            _train_cmd(workdir, data_dir, "--config.distributed.initialize=True",
                       f"--config.distributed.coordinator_address=localhost:{port}",
                       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                       "--config.mesh.fsdp=2", "--config.mesh.min_shard_size=64", f"--config.steps={steps}", *extra,
                       num_devices=-1),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outs = [p.communicate(timeout=900)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-4000:]
        return outs

    outs = launch(4)
    assert "mesh data=2 x fsdp=2 (4 devices), 2 host(s)" in outs[0]
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    data = workdir / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    outs = launch(6, ("--config.export.at_end=True",))
    assert "resumed from step 4" in outs[0]
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    import jaxcontrol

    jaxcontrol.load_model(workdir / "export" / "jaxcontrol" / "controlnet")


def test_vae_task_trains_exports_its_scaling_factor_and_snapshots(data_dir, tmp_path):
    """task="vae" end to end in-process: the loss falls, the export carries 1/std of the latents as
    `scaling_factor` and loads in both formats, and `export.every` writes step snapshots."""
    import jaxcontrol
    from jaxcontrol.training import train

    cfg = smoke_config(_ensure_data(data_dir), **{
        "task": "vae", "model.init": "scratch", "steps": 12, "optim.learning_rate": 3e-3, "export.every": 6,
        "validation.at_end": True, "export.at_end": True, "vae.scaling_examples": 16, "log.progress_bar": False,
        "log.tensorboard": False})
    summary = train(cfg, tmp_path / "vae")
    records = read_metrics(tmp_path / "vae" / "metrics.jsonl")
    losses = [r["loss"] for r in records]
    assert summary["step"] == 12 and len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    grid = np.asarray(Image.open(tmp_path / "vae" / "samples" / "validation_step_0000012.png"))
    assert grid.shape[0] == 2 * 8  # images, reconstructions
    module, params = jaxcontrol.load_model(tmp_path / "vae" / "export" / "jaxcontrol" / "vae")
    factor = module.config.scaling_factor
    assert factor != jaxcontrol.AutoencoderKLConfig().scaling_factor and 0 < factor < 1e3
    diff_module, _ = jaxcontrol.load_model(tmp_path / "vae" / "export" / "diffusers" / "vae")
    assert diff_module.config.scaling_factor == pytest.approx(factor)
    assert (tmp_path / "vae" / "export" / "steps" / "6" / "jaxcontrol" / "vae").is_dir()
    with pytest.raises(ConfigError, match="data.precompute"):
        check_config(smoke_config(data_dir, **{"task": "vae", "data.precompute": True}))
    with pytest.raises(ConfigError, match="fill50k_palette"):
        check_config(smoke_config(data_dir, **{"data.fill50k_palette": "pastel"}))
