"""Training memory and multi-host robustness: the remat defaults (attention scores never kept for
the backward pass), `jax.distributed` initialised from the environment, latent precomputation
shared by processes and local devices, and SIGTERM (pre-emption) saving a checkpoint and exiting 143.

The networks are configs/smoke.py's one-block models; the distributed tests read monkeypatched
environments (nothing is initialised but in one subprocess with a one-process coordinator).
"""

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrol.errors import ConfigError
from jaxcontrol.training import check_config, default_config
from jaxcontrol.training.config import REMAT_POLICIES
from jaxcontrol.training.remat import POLICIES, remat_scope
from jaxcontrol.training.sharding import (
    detect_cluster,
    release_free_memory,
    resolve_initialize,
    setup_distributed,
    use_cpu_memory_scheduler,
)
from _smoke import SignalAtLine, smoke_args, smoke_config, train_cmd
from _smoke import train_env as _env

ROOT = Path(__file__).resolve().parents[1]
SMOKE = runpy.run_path(str(ROOT / "configs" / "smoke.py"))


# --------------------------------------------------------------------------------------------------
# remat: the defaults, and attention's scores never kept for the backward pass
# --------------------------------------------------------------------------------------------------

TOKENS = 16 * 16  # self-attention over a 16x16 latent


def _attention_unet(impl):
    from jaxcontrol.models import (
        UNet2DConditionConfig,
        UNet2DConditionModel,
        init_params,
    )

    config = UNet2DConditionConfig(**{**SMOKE["UNET"], "attention_head_dim": 2})
    unet = UNet2DConditionModel(config, attention_impl=impl)
    return unet, init_params(unet, 0)


def _loss(unet, x, ctx):
    def loss(p, mode="none", policy="nothing_saveable", attention=False):
        with remat_scope(mode, policy, attention=attention):
            return jnp.mean(unet.apply({"params": p}, x, jnp.array([1, 500]), ctx) ** 2)

    return loss


def _residuals(loss, params, **kw):
    """The arrays the linearised loss keeps for the backward pass (traced, not run)."""
    f_jvp = jax.eval_shape(lambda p: jax.linearize(lambda q: loss(q, **kw), p)[1], params)
    return jax.tree_util.tree_leaves(f_jvp)


def _score_sized(residuals):
    """The shapes of residuals holding a (tokens x tokens) score or probability tensor: (B, heads,
    L, L) from "plain", (B * heads, blocks, chunk, L) stacked by "chunked"'s lax.map."""
    return [r.shape for r in residuals if list(r.shape).count(TOKENS) >= 2]


@pytest.mark.parametrize("impl", [pytest.param("plain", marks=pytest.mark.slow), "chunked"])
def test_attention_remat_keeps_no_score_tensor_and_changes_no_gradient(impl):
    """Without remat the backward pass keeps the (heads, L, L) softmax of every self-attention
    (with "chunked" too: lax.map stacks each block's probabilities); with remat.attention it keeps
    none, alone or inside rematerialised blocks, and the gradients are unchanged."""
    unet, params = _attention_unet(impl)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 16))
    loss = _loss(unet, x, ctx)
    assert _score_sized(_residuals(loss, params)), "the plain backward should keep the scores"
    for kw in ({"attention": True}, {"attention": True, "mode": "layers", "policy": "dots_saveable"},
               {"attention": True, "mode": "blocks", "policy": "convs_and_dense_saveable"}):
        assert _score_sized(_residuals(loss, params, **kw)) == [], kw
    # dots_saveable alone keeps the batched score product: only the attention remat removes it
    assert _score_sized(_residuals(loss, params, mode="layers", policy="dots_saveable"))
    g0, g1 = jax.jit(lambda p: (jax.grad(loss)(p), jax.grad(lambda q: loss(q, attention=True))(p)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_conv_unet_policy_keeps_convolutions_and_dense_outputs_only():
    """convs_and_dense_saveable keeps less than no remat and more than
    nothing_saveable, and gives the same gradients."""
    unet, params = _attention_unet("plain")
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 16))
    loss = _loss(unet, x, ctx)
    def size(**kw):
        return sum(r.size for r in _residuals(loss, params, **kw))

    full = size()
    conv = size(mode="layers", policy="convs_and_dense_saveable")
    nothing = size(mode="layers", policy="nothing_saveable")
    assert nothing < conv < full, (nothing, conv, full)
    assert set(REMAT_POLICIES) == set(POLICIES)
    g0, g1 = jax.jit(lambda p: (jax.grad(loss)(p), jax.grad(
        lambda q: loss(q, "blocks", "convs_and_dense_saveable", True))(p)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)


def test_default_config_step_keeps_no_score_tensor():
    """The training default: the ControlNet + U-Net prediction of `step.model_prediction` keeps no
    attention score tensor for the backward pass."""
    from jaxcontrol.models import controlnet_from_unet
    from jaxcontrol.training.networks import Networks
    from jaxcontrol.training.step import model_prediction

    config = default_config()
    assert config.remat.attention is True
    unet, params = _attention_unet("plain")
    cn, cparams = controlnet_from_unet(unet, params, jax.random.key(2), conditioning_embedding_out_channels=(8,))
    nets = Networks(task="controlnet", unet=unet, vae=None, text_encoder=None, tokenizer=None, scheduler_config={},
                    prediction_type="epsilon", schedule=None, controlnet=cn)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 16))
    cond = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))

    def loss(trainable, config=config):
        return jnp.mean(model_prediction(nets, config, trainable, {"unet": params}, x, jnp.array([1, 500]), ctx,
                                         cond) ** 2)

    def residuals(config):
        f_jvp = jax.eval_shape(lambda p: jax.linearize(lambda q: loss(q, config), p)[1], {"controlnet": cparams})
        return jax.tree_util.tree_leaves(f_jvp)

    assert _score_sized(residuals(config)) == []
    plain = default_config()
    plain.remat.attention, plain.remat.unet, plain.remat.controlnet = False, "none", "none"
    assert _score_sized(residuals(plain))


# --------------------------------------------------------------------------------------------------
# XLA:CPU's memory-minimising scheduler and the compiler's freed memory
# --------------------------------------------------------------------------------------------------

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def test_cpu_memory_scheduler_flag_is_set_only_for_a_cpu_only_jax(monkeypatch):
    jax.devices()  # JAX has started in this process: too late for the flag, and the line says so
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert "JAX had started before train()" in use_cpu_memory_scheduler(True, plugins=[])
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    env = {}
    assert use_cpu_memory_scheduler(True, env, plugins=[]).startswith("XLA:CPU: memory-minimising scheduler")
    assert env == {"XLA_FLAGS": f"{FLAG}=false"}
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    use_cpu_memory_scheduler(True, env, plugins=[])
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}=false"
    for env, plugins, enabled in (({"XLA_FLAGS": f"{FLAG}=true"}, [], True),  # the user's choice wins
                                  ({}, [], False),  # config.xla_cpu_memory_scheduler=False
                                  ({}, ["xla_cuda12"], True),  # an accelerator may be used
                                  ({"JAX_PLATFORMS": "tpu"}, [], True)):
        before = dict(env)
        assert use_cpu_memory_scheduler(enabled, env, plugins=plugins) == "" and env == before
    env = {"JAX_PLATFORMS": "cpu"}
    assert use_cpu_memory_scheduler(True, env, plugins=["xla_cuda12"]) and FLAG in env["XLA_FLAGS"]
    assert isinstance(release_free_memory(), bool)


def test_the_scheduler_flag_set_after_import_lowers_the_temporaries():
    """What train() relies on: the flag, put in XLA_FLAGS after the training stack is imported but
    before JAX starts, still reaches XLA:CPU, and its buffer assignment shrinks (here sixteen
    independent products that the concurrency-optimised scheduler keeps alive together)."""
    code = (
        "import sys, jax, jax.numpy as jnp\n"
        "import jaxcontrol.training\n"
        "from jaxcontrol.training.sharding import use_cpu_memory_scheduler\n"
        "use_cpu_memory_scheduler(sys.argv[1] == 'on', plugins=[])\n"
        "f = lambda xs: sum(jnp.sum(jnp.sin(x) @ x) for x in xs)\n"
        "xs = [jnp.ones((512, 512)) for _ in range(16)]\n"
        "print(jax.jit(jax.grad(f)).lower(xs).compile().memory_analysis().temp_size_in_bytes)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    temp = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        temp[mode] = int(out.stdout.split()[-1])
    assert temp["on"] * 4 <= temp["off"], temp


# --------------------------------------------------------------------------------------------------
# jax.distributed from the environment
# --------------------------------------------------------------------------------------------------


class _Distributed:
    def __init__(self, initialize="auto", coordinator_address="", num_processes=-1, process_id=-1):
        self.initialize, self.coordinator_address = initialize, coordinator_address
        self.num_processes, self.process_id = num_processes, process_id


SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, kind, processes", [
    ({}, "", 1),
    ({"HOME": "/root", "PATH": "/usr/bin"}, "", 1),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, "", 1),
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3", "TPU_WORKER_ID": "1"}, "tpu", 4),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "tpu", 2),
    ({"TPU_WORKER_HOSTNAMES": "a,b", "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_COORDINATOR_ADDRESS": "a:8080"},
     "tpu", 4),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080"}, "tpu", None),
    (SRUN, "slurm", 4),
    ({**SRUN, "SLURM_STEP_NUM_TASKS": "2"}, "slurm", 2),
    ({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, "", 1),  # sbatch script, no srun
    ({**SRUN, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, "", 1),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "3"}, "openmpi", 8),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, "", 1),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "explicit", None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", **SRUN}, "explicit", None),  # explicit wins
])
def test_cluster_detection(env, kind, processes, monkeypatch):
    found = detect_cluster(env)
    assert (found.kind, found.processes) == (kind, processes), found
    assert found.multi_process == (kind != "")
    # the default reads os.environ
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "JAX_COORDINATOR")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert detect_cluster() == found


def test_sbatch_without_srun_is_one_process_with_a_note():
    found = detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"})
    assert not found.multi_process and "srun" in found.note and "SLURM_NTASKS=4" in found.note
    assert detect_cluster({}, coordinator_address="10.0.0.1:1234").kind == "explicit"


def test_setup_distributed_follows_the_config_and_the_environment():
    calls = []

    def fake(*args):
        calls.append(args)

    line = setup_distributed(_Distributed(), {}, initialize=fake)
    assert calls == [] and line.startswith("jax.distributed: not initialised, running as a single process")
    assert "no multi-process cluster environment" in line
    line = setup_distributed(_Distributed(), {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, initialize=fake)
    assert calls == [] and "srun" in line
    setup_distributed(_Distributed(), SRUN, initialize=fake)
    assert calls == [("", -1, -1)]
    setup_distributed(_Distributed("false"), SRUN, initialize=fake)
    setup_distributed(_Distributed(False), SRUN, initialize=fake)
    assert len(calls) == 1
    setup_distributed(_Distributed("True", "10.0.0.1:99", 2, 1), {}, initialize=fake)  # as --config.X=True gives it
    setup_distributed(_Distributed(True), {}, initialize=fake)
    assert calls[1:] == [("10.0.0.1:99", 2, 1), ("", -1, -1)]


def test_a_failed_initialisation_names_the_variables_seen():
    def broken(*args):
        raise ValueError("coordinator_address should be defined.")

    with pytest.raises(RuntimeError) as e:
        setup_distributed(_Distributed(), {**SRUN, "HOME": "/root"}, initialize=broken)
    text = str(e.value)
    assert "a slurm cluster" in text and "SLURM_NTASKS=4" in text and "SLURM_STEP_NODELIST=node[001-004]" in text
    assert "coordinator_address should be defined" in text and "HOME" not in text
    assert "distributed.initialize=false" in text
    with pytest.raises(RuntimeError, match=r"distributed.initialize=true .*environment seen: none of JAX_COORDINATOR"):
        setup_distributed(_Distributed("true"), {}, initialize=broken)


def test_initialize_values_are_checked():
    assert [resolve_initialize(v) for v in ("auto", "AUTO", " true", "False", True, False)] == \
        ["auto", "auto", "true", "false", "true", "false"]
    with pytest.raises(ConfigError, match="config.distributed.initialize: 'maybe'"):
        resolve_initialize("maybe")
    config = default_config()
    config.model.init = "scratch"
    assert config.distributed.initialize == "auto"
    config.distributed.initialize = "maybe"
    with pytest.raises(ConfigError, match="config.distributed.initialize"):
        check_config(config)


def test_training_imports_touch_no_device_so_initialisation_can_come_first(tmp_path):
    """train.py imports the training stack, then initialises jax.distributed (here for real, as a
    one-process job with its own coordinator): nothing imported may have started a JAX backend,
    or jax.distributed.initialize would refuse."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    code = (
        "import jaxcontrol.commands.train, jaxcontrol.training, jaxcontrol.training.trainer\n"
        "from jaxcontrol.training import default_config\n"
        "from jaxcontrol.training.sharding import setup_distributed\n"
        "c = default_config().distributed\n"
        f"c.initialize, c.coordinator_address, c.num_processes, c.process_id = 'true', 'localhost:{port}', 1, 0\n"
        "print(setup_distributed(c, {}))\n"
        "import jax; print(jax.process_count(), jax.distributed.is_initialized())\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "jax.distributed: process 0 of 1 (explicit), 2 local / 2 global devices" in out.stdout
    assert out.stdout.strip().endswith("1 True")


# --------------------------------------------------------------------------------------------------
# latent precomputation shared by processes and local devices
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 3, 7, 64, 1000])
@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_each_process_takes_a_contiguous_share(count, processes):
    from jaxcontrol.data.precompute import precompute_plan, process_share

    shares = [process_share(count, p, processes) for p in range(processes)]
    assert [i for s in shares for i in s] == list(range(count))  # every example once, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert sorted(map(len, shares), reverse=True) == list(map(len, shares))  # the first ones take the extra
    plan = precompute_plan(count, 16, processes)
    assert [i for f in plan for i in range(f.start, f.stop)] == list(range(count))
    assert [f.index for f in plan] == list(range(len(plan))) and all(f.total == len(plan) for f in plan)
    for p, share in enumerate(shares):
        mine = [f for f in plan if f.process == p]
        assert all(0 < f.stop - f.start <= 16 for f in mine)
        assert [i for f in mine for i in range(f.start, f.stop)] == list(share)
    if processes == 1:  # the single-process layout: cuts at multiples of records_per_shard
        assert [f.start for f in plan] == list(range(0, count, 16))
    with pytest.raises(ConfigError):
        process_share(count, processes, processes)


def _raw_source(n, size=8):
    from jaxcontrol.data.fill50k import fill50k_example

    records = []
    for i in range(n):
        e = fill50k_example(i, split="train", seed=0, image_size=size)
        records.append({"image": e.image, "conditioning_image": e.condition, "text": e.caption, "index": i})
    return records


def _encode_images(x):  # a deterministic stand-in encoder: (B, 8, 8, 3) -> (B, 1, 1, 8)
    x = np.asarray(x, np.float32)
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, :1, :2, 0].reshape(len(x), 2)],
                          axis=-1)[:, None, None, :]


def _encode_text(captions):
    return np.asarray([[len(c), sum(map(ord, c)) % 997] for c in captions], np.float32)[:, None, :]


def _records(folder):
    from jaxcontrol.data import PrecomputedSource

    src = PrecomputedSource(folder)
    return src, [src[i] for i in range(len(src))]


def test_single_process_precompute_is_the_per_example_encoding(tmp_path):
    """precompute_latents (one process) writes, for every index, the encoders' output for that
    example alone, in the layout it always had (records_per_shard per file, in index order)."""
    from jaxcontrol.data import ControlTransform, precompute_latents

    source = _raw_source(21)
    precompute_latents(source, tmp_path / "one", encode_images=_encode_images, encode_text=_encode_text,
                       batch_size=4, records_per_shard=8, resolution=8)
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert meta == {"format_version": 1, "count": 21, "num_shards": 3, "latents": {"shape": [1, 1, 8], "dtype":
                    "float32"}, "text_embeddings": {"shape": [1, 2], "dtype": "float32"},
                    "conditioning_image": {"shape": [8, 8, 3]}, "resolution": 8}
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["meta.json"] + [
        f"records-{i:05d}-of-00003.array_record" for i in range(3)]
    _, records = _records(tmp_path / "one")
    transform = ControlTransform(resolution=8)
    for i, rec in enumerate(records):
        e = transform(source[i])
        assert rec["index"] == i and rec["text"] == e["caption"]
        np.testing.assert_array_equal(rec["latents"], _encode_images(e["pixel_values"][None])[0])
        np.testing.assert_array_equal(rec["text_embeddings"], _encode_text([e["caption"]])[0])
        np.testing.assert_array_equal(rec["conditioning_image"],
                                      np.round(e["conditioning_pixel_values"] * 255).astype(np.uint8))


@pytest.mark.parametrize("processes, count", [(2, 21), (3, 21), (4, 21), (4, 3)])
def test_shares_written_by_several_processes_read_back_as_one_process_wrote_them(tmp_path, processes, count):
    from jaxcontrol.data import precompute_latents
    from jaxcontrol.data.precompute import finish_precompute, precompute_share

    source = _raw_source(count)
    kw = {"encode_images": _encode_images, "encode_text": _encode_text, "batch_size": 4, "resolution": 8}
    precompute_latents(source, tmp_path / "one", records_per_shard=8, **kw)
    shared = tmp_path / ".many.parts"
    shared.mkdir()
    for p in reversed(range(processes)):  # any order: each process writes only its own files
        part = precompute_share(source, shared, records_per_shard=4, process_index=p, process_count=processes, **kw)
        assert part["stop"] - part["start"] in (count // processes, count // processes + 1)
    finish_precompute(shared, tmp_path / "many", processes, resolution=8)
    assert not shared.exists()
    one_src, one = _records(tmp_path / "one")
    many_src, many = _records(tmp_path / "many")
    assert {k: v for k, v in many_src.meta.items() if k != "num_shards"} == \
        {k: v for k, v in one_src.meta.items() if k != "num_shards"}
    assert len(many) == len(one) == count
    for a, b in zip(one, many):
        assert a.keys() == b.keys() and a["index"] == b["index"] and a["text"] == b["text"]
        for key in ("latents", "text_embeddings", "conditioning_image"):
            np.testing.assert_array_equal(a[key], b[key])


def test_a_missing_share_is_named(tmp_path):
    from jaxcontrol.data import DataError
    from jaxcontrol.data.precompute import finish_precompute, precompute_share

    source = _raw_source(10)
    shared = tmp_path / "parts"
    shared.mkdir()
    precompute_share(source, shared, encode_images=_encode_images, batch_size=4, process_index=0, process_count=2)
    with pytest.raises(DataError, match=r"process 1 of 2 did not finish its share \(part-00001.json missing\)"):
        finish_precompute(shared, tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from jaxcontrol.data import build_fill50k

    path = tmp_path_factory.mktemp("tfds")
    cfg = smoke_config(path)
    build_fill50k(path, image_size=cfg.data.resolution, num_train=cfg.data.fill50k_num_train,
                  num_validation=cfg.data.fill50k_num_validation, seed=cfg.data.fill50k_seed)
    return path


@pytest.mark.skipif(jax.local_device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_trainer_precompute_splits_batches_over_the_local_devices(data_dir, tmp_path):
    """The trainer's precomputation (one process here) runs its encoders over all 8 local devices,
    8 examples per batch, one per device, and stores what one device computes for each example."""
    from jaxcontrol.tokenizer import tokenize
    from jaxcontrol.training import build_networks
    from jaxcontrol.training.data import (
        local_encoders,
        open_sources,
        precomputed_source,
    )
    from jaxcontrol.training.step import encode_prompts

    config = check_config(smoke_config(data_dir, **{"data.precompute": True}))
    nets, _, frozen = build_networks(config, tmp_path)
    source, _ = open_sources(config, tmp_path)
    images, _, batch = local_encoders(nets, frozen)
    assert batch == 8
    x = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
    one = jax.jit(lambda p, x: nets.vae.apply({"params": p}, x, method=nets.vae.encode))
    # 8 devices vs one: XLA may fuse differently; one element in 4096 was seen 1.3e-6 off
    np.testing.assert_allclose(images(x), np.asarray(one(frozen["vae"], x)), rtol=1e-5, atol=1e-5)

    out = precomputed_source(config, tmp_path, source, nets, frozen)
    assert len(out) == len(source) and not list(tmp_path.glob(".*parts*"))
    from jaxcontrol.data import ControlTransform

    transform = ControlTransform(resolution=8)
    for i in (0, 9, len(source) - 1):
        rec, e = out[i], transform(source[i])
        np.testing.assert_allclose(rec["latents"], np.asarray(one(frozen["vae"], e["pixel_values"][None]))[0],
                                   rtol=1e-5, atol=1e-6)
        ids = tokenize(nets.tokenizer, [e["caption"]])
        np.testing.assert_allclose(rec["text_embeddings"], np.asarray(encode_prompts(nets, frozen, ids))[0],
                                   rtol=1e-5, atol=1e-6)
    again = precomputed_source(config, tmp_path, source, nets, frozen)  # reused, not recomputed
    assert again.directory == out.directory


# --------------------------------------------------------------------------------------------------
# SIGTERM: a checkpoint at the step boundary, exit 143, and the rerun resumes
# --------------------------------------------------------------------------------------------------


def test_interrupt_guard_records_sigterm_and_restores_the_handlers():
    from jaxcontrol.training.trainer import InterruptGuard

    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with InterruptGuard() as guard:
        assert not guard.preempted(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.terminate and guard.preempted(3)
        guard.check()  # SIGTERM is not a Ctrl-C
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def own(signum, frame):
        own.seen = True

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with InterruptGuard() as guard:  # someone else's handler is left in place
            os.kill(os.getpid(), signal.SIGTERM)
            assert not guard.terminate and own.seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def _smoke_cmd(workdir, data_dir, *extra):
    return train_cmd(*smoke_args(workdir, data_dir, *extra))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_step_boundary_exits_143_and_the_rerun_resumes(data_dir, tmp_path):
    """SIGTERM mid-run (periodic checkpoints far apart): the step reached is checkpointed, the run
    exits 143 with one line naming it, and the same command resumes from it."""
    from jaxcontrol.training import Checkpointer
    from jaxcontrol.training.logger import read_metrics

    workdir = tmp_path / "run"
    args = _smoke_cmd(workdir, data_dir, "--config.steps=100000", "--config.checkpoint.every=100000",
                      "--config.log.every=5")
    run = SignalAtLine(args, _env(tmp_path / "cache"), "step 10/", signal.SIGTERM)
    code, stderr = run.finish()
    assert code == 143, "".join(run.lines[-20:]) + stderr[-3000:]
    assert "Traceback" not in stderr, stderr
    assert "SIGTERM: saving a checkpoint at the next step boundary" in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and lines[0].startswith("train.py: terminated (SIGTERM) at step "), stderr
    steps = Checkpointer(workdir / "checkpoints").all_steps()
    last = read_metrics(workdir / "metrics.jsonl")[-1]["step"]
    assert steps == [last] and last >= 10, (steps, last)  # saved on SIGTERM: no periodic save was due
    assert f"saved a checkpoint of step {last} in " in lines[0] and "rerun the same command" in lines[0]
    assert not [p for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]

    resumed = subprocess.run(_smoke_cmd(workdir, data_dir, f"--config.steps={last + 2}"), cwd=ROOT,
                             env=_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {last}" in resumed.stdout and f"done at step {last + 2}" in resumed.stdout
    assert "jax.distributed: not initialised, running as a single process" in resumed.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_under_jax_distributed_goes_through_the_preemption_sync_point(data_dir, tmp_path):
    """A run with jax.distributed initialised (here one process with its own coordinator): JAX's
    preemption notifier owns SIGTERM, and the loop stops at its sync point, saving that step."""
    from jaxcontrol.training import Checkpointer
    from jaxcontrol.training.logger import read_metrics

    workdir = tmp_path / "run"
    args = _smoke_cmd(workdir, data_dir, "--config.steps=100000", "--config.checkpoint.every=100000",
                      "--config.log.every=5", f"--config.distributed.coordinator_address=localhost:{_free_port()}",
                      "--config.distributed.num_processes=1", "--config.distributed.process_id=0")
    run = SignalAtLine(args, _env(tmp_path / "cache"), "step 10/", signal.SIGTERM)
    code, stderr = run.finish()
    out = "".join(run.lines)
    assert code == 143, out[-3000:] + stderr[-3000:]
    assert "jax.distributed: process 0 of 1 (explicit)" in out
    assert "SIGTERM caught" in stderr and "SIGTERM: saving" not in stderr  # JAX's handler, not the guard's
    steps = Checkpointer(workdir / "checkpoints").all_steps()
    last = read_metrics(workdir / "metrics.jsonl")[-1]["step"]
    assert steps == [last] and last >= 10, (steps, last)
    assert f"train.py: terminated (SIGTERM) at step {last}; saved a checkpoint of step {last}" in stderr


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(data_dir, tmp_path):
    """Two processes (jax.distributed over gloo, 2 CPU devices each); SIGTERM reaches process 1 only:
    both save the same step, both exit 143, and both resume from it."""
    from jaxcontrol.training import Checkpointer
    from jaxcontrol.training.logger import read_metrics

    port = _free_port()
    env = dict(_env(tmp_path / "cache"), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    workdir = tmp_path / "run"

    def cmd(i, steps):
        return [sys.executable, "train.py", "--config", "configs/smoke.py", "--workdir", str(workdir),
                f"--config.data.data_dir={data_dir}", "--config.mesh.num_devices=-1", "--config.log.tensorboard=False",
                f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}", "--config.mesh.fsdp=2", "--config.mesh.min_shard_size=64",
                f"--config.steps={steps}", "--config.checkpoint.every=100000", "--config.log.every=5"]

    other = subprocess.Popen(cmd(1, 100000), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    main = SignalAtLine(cmd(0, 100000), env, "step 10/", signal.SIGTERM, target=other)  # process 1 only
    code0, err0 = main.finish(600)
    _, err1 = other.communicate(timeout=120)
    assert (code0, other.returncode) == (143, 143), err0[-3000:] + err1[-3000:]
    steps = Checkpointer(workdir / "checkpoints").all_steps()
    last = read_metrics(workdir / "metrics.jsonl")[-1]["step"]
    assert steps == [last] and last >= 10, (steps, last)
    for err in (err0, err1):
        assert f"train.py: terminated (SIGTERM) at step {last}; saved a checkpoint of step {last}" in err, err[-2000:]
    procs = [subprocess.Popen(cmd(i, last + 2), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert f"resumed from step {last}" in outs[0] and f"done at step {last + 2}" in outs[0]


@pytest.mark.slow
def test_two_processes_share_the_precomputation(data_dir, tmp_path):
    """Two processes (jax.distributed over gloo, 2 CPU devices each) precompute half of the dataset
    each, on their own devices; the published folder holds every example once, and its records
    match a one-process precomputation of the same networks, index for index."""
    from jaxcontrol.data import PrecomputedSource

    port = _free_port()
    env = dict(_env(tmp_path / "cache"), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    common = ["--config.task=adapter", "--config.data.precompute=True", "--config.steps=2",
              "--config.mesh.num_devices=-1"]
    procs = [subprocess.Popen(
        _smoke_cmd(tmp_path / "two", data_dir, *common, f"--config.distributed.coordinator_address=localhost:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    one = subprocess.run(_smoke_cmd(tmp_path / "one", data_dir, *common), cwd=ROOT, env=_env(tmp_path / "cache"),
                         capture_output=True, text=True, timeout=600, check=False)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    a, b = PrecomputedSource(tmp_path / "one" / "precomputed"), PrecomputedSource(tmp_path / "two" / "precomputed")
    assert len(a) == len(b) == 64 and not list(tmp_path.glob("two/.*parts*"))
    assert (a.meta["num_shards"], b.meta["num_shards"]) == (1, 2)  # one record file per process
    assert {**b.meta, "num_shards": 1} == a.meta
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        assert ra["index"] == rb["index"] and ra["text"] == rb["text"]
        np.testing.assert_array_equal(ra["conditioning_image"], rb["conditioning_image"])
        for key in ("latents", "text_embeddings"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-5)
