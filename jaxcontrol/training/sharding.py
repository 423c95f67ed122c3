"""The device mesh, sharding rules, and global batches assembled from each host's local data.

    mesh = make_mesh(data=-1, fsdp=2)                     # ("data", "fsdp"); -1 = the devices left over
    shardings = param_shardings(params, mesh, shard=True)  # largest divisible dim on "fsdp"
    batch = global_batch(local_numpy_batch, batch_sharding(mesh, ("data", "fsdp")))

The batch is split over `batch_axes` (by default both axes: FSDP replicas each see their own
examples, as in ZeRO-3 / maxtext). A parameter is sharded on `fsdp` along its largest dimension
that the axis size divides, when it has at least `min_size` elements; anything else is
replicated. Sharding depends only on shapes, so the Adam moments and the EMA, which have their
parameters' shapes, get their parameters' sharding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..errors import ConfigError
from ..mesh import named
from .config import resolve_initialize

AXES = ("data", "fsdp")
log = logging.getLogger(__name__)


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """(data, fsdp) sizes for `num_devices`; one of them may be -1 (the devices left over). Raises
    `ConfigError` when both are -1 or the product is not `num_devices`."""
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh: only one of data and fsdp may be -1")
    if data == -1:
        if num_devices % fsdp:
            raise ConfigError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices")
        data = num_devices // fsdp
    elif fsdp == -1:
        if num_devices % data:
            raise ConfigError(f"mesh.data={data} does not divide the {num_devices} devices")
        fsdp = num_devices // data
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {num_devices}")
    return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A 2-D `Mesh` with axes ("data", "fsdp") over `devices` (default: every device of every host).
    Raises `ConfigError` as `mesh_shape`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(len(devices), data, fsdp)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def param_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2**12) -> P:
    """`P(...)` sharding the largest dimension that `fsdp_size` divides on "fsdp", or replicated."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    best = None
    for i, n in enumerate(shape):
        if n % fsdp_size == 0 and (best is None or n > shape[best]):
            best = i
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def param_shardings(tree: Any, mesh: Mesh, *, shard: bool = True, min_size: int = 2**12) -> Any:
    """A sharding per leaf of `tree` (arrays or ShapeDtypeStructs); `shard=False` replicates all."""
    fsdp = mesh.shape["fsdp"] if shard else 1

    def one(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return named(mesh, param_spec(shape, fsdp, min_size))

    return jax.tree_util.tree_map(one, tree)


def replicated(mesh: Mesh) -> jax.sharding.Sharding:
    """A sharding that puts a whole copy on every device of `mesh`."""
    return named(mesh, P())


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = AXES, *, leading: int = 0) -> jax.sharding.Sharding:
    """Sharding of a batch array whose batch dimension comes after `leading` unsharded dimensions."""
    axes = tuple(a for a in batch_axes if mesh.shape[a] > 1) or None
    return named(mesh, P(*([None] * leading), axes))


def batch_divisor(mesh: Mesh, batch_axes: Sequence[str] = AXES) -> int:
    """How many ways the batch is split (its size must be a multiple of this)."""
    return math.prod(mesh.shape[a] for a in batch_axes)


def global_batch(local: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding, *, batch_dim: int = 0) -> dict:
    """Global `jax.Array`s from this host's rows of the batch (`jax.make_array_from_process_local_data`).

    Every host passes its own rows (the same count on each); the global batch dimension is the sum.
    """
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        shape = list(value.shape)
        shape[batch_dim] *= jax.process_count()
        out[name] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
    return out


@dataclasses.dataclass(frozen=True)
class ClusterEnvironment:
    """What the environment says about a multi-process launch (`detect_cluster`).

    `kind` is "explicit" (a coordinator address was given), "tpu" (TPU pod workers or a multislice
    job), "slurm" (an `srun` step), "openmpi" (`mpirun`) or "" (none); `processes` the process count
    the environment declares (None when it declares none); `variables` the relevant variables that
    are set, by name (what an error message shows); `note` why a cluster that was seen is not used.
    """

    kind: str
    processes: int | None
    variables: dict[str, str]
    note: str = ""

    @property
    def multi_process(self) -> bool:
        """Whether this process is one of several that must call `jax.distributed.initialize`."""
        return self.kind != "" and (self.processes is None or self.processes > 1)


# every variable `detect_cluster` reads, in the order its rules read them
CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
    "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "SLURM_JOB_ID",
    "SLURM_STEP_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_MCA_orte_hnp_uri",
)


def _count(value: str | None) -> int | None:
    try:
        return int(str(value).strip().split("(")[0]) if value not in (None, "") else None
    except ValueError:
        return None


def _hosts(value: str | None) -> int:
    return len([h for h in str(value or "").split(",") if h.strip()])


def detect_cluster(environ: Mapping[str, str] | None = None, coordinator_address: str = "") -> ClusterEnvironment:
    """Whether `environ` (default `os.environ`) is one process of a multi-process launch, and which.

    Pure: reads only `environ`. The rules, first match wins:

    - explicit: `coordinator_address` (the config's) or `JAX_COORDINATOR_ADDRESS` is set;
    - TPU: `TPU_PROCESS_ADDRESSES` / `TPU_WORKER_HOSTNAMES` list more than one host, or
      `MEGASCALE_NUM_SLICES` > 1 / `MEGASCALE_COORDINATOR_ADDRESS` is set (multislice);
    - SLURM: inside an `srun` step (`SLURM_JOB_ID` and `SLURM_STEP_ID` or `SLURM_STEP_NODELIST`) with
      `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`) > 1. A batch script with several tasks that runs
      Python directly (no `srun`) is one process: it is reported with a `note`, not initialised;
    - Open MPI: `OMPI_COMM_WORLD_SIZE` > 1 (`mpirun -n N`).

    A Cloud TPU VM slice that publishes its workers only through the metadata server (not the
    environment) is not detected: set `distributed.initialize=true` there. Returns a
    `ClusterEnvironment` (kind "" when none applies); never raises.
    """
    env = os.environ if environ is None else environ
    seen = {k: str(env[k]) for k in CLUSTER_VARIABLES if env.get(k) not in (None, "")}
    if coordinator_address or seen.get("JAX_COORDINATOR_ADDRESS"):
        if coordinator_address:
            seen = {"distributed.coordinator_address": coordinator_address, **seen}
        return ClusterEnvironment("explicit", None, seen)
    tpu_hosts = max(_hosts(seen.get("TPU_PROCESS_ADDRESSES")), _hosts(seen.get("TPU_WORKER_HOSTNAMES")))
    slices = _count(seen.get("MEGASCALE_NUM_SLICES")) or 1
    if tpu_hosts > 1 or slices > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in seen:
        known = tpu_hosts > 0 or slices > 1  # MEGASCALE_COORDINATOR_ADDRESS alone declares no count
        return ClusterEnvironment("tpu", max(tpu_hosts, 1) * slices if known else None, seen)
    if "SLURM_JOB_ID" in seen:
        tasks = _count(seen.get("SLURM_STEP_NUM_TASKS")) or _count(seen.get("SLURM_NTASKS"))
        in_step = "SLURM_STEP_ID" in seen or "SLURM_STEP_NODELIST" in seen
        if tasks and tasks > 1:
            if in_step:
                return ClusterEnvironment("slurm", tasks, seen)
            return ClusterEnvironment("", 1, seen, note=f"SLURM_NTASKS={tasks} but this process was not started by "
                                      "srun (no SLURM_STEP_ID): one process; launch it with srun for several")
    size = _count(seen.get("OMPI_COMM_WORLD_SIZE"))
    if size and size > 1:
        return ClusterEnvironment("openmpi", size, seen)
    return ClusterEnvironment("", 1, seen)


def setup_distributed(distributed, environ: Mapping[str, str] | None = None, *,
                      initialize: Callable[..., None] | None = None) -> str:
    """Initialise `jax.distributed` as `distributed` (the config's `distributed` section) asks, before
    anything touches a device; returns the one line that describes the outcome (for the log).

    `distributed.initialize`: "true" always initialises; "false" never; "auto" (the default)
    initialises when `detect_cluster` finds a multi-process launch and otherwise runs one process.
    `initialize` replaces `initialize_distributed` (for tests). Raises `ConfigError` for a bad
    `initialize` value, and `RuntimeError` naming the cluster variables seen when the environment
    says multi-process (or "true" was given) and `jax.distributed.initialize` fails.
    """
    mode = resolve_initialize(distributed.initialize)
    cluster = detect_cluster(environ, str(distributed.coordinator_address or ""))
    if mode == "false" or (mode == "auto" and not cluster.multi_process):
        why = "distributed.initialize=false" if mode == "false" else (
            cluster.note or "no multi-process cluster environment (TPU pod, SLURM srun, Open MPI, "
            "JAX_COORDINATOR_ADDRESS) was found")
        return f"jax.distributed: not initialised, running as a single process ({why})"
    init = initialize or initialize_distributed
    try:
        init(str(distributed.coordinator_address or ""), int(distributed.num_processes),
             int(distributed.process_id))
    except Exception as e:
        what = f"a {cluster.kind} cluster" if cluster.kind else "distributed.initialize=true"
        seen = ", ".join(f"{k}={v}" for k, v in cluster.variables.items()) or "none of " + ", ".join(CLUSTER_VARIABLES)
        raise RuntimeError(
            f"jax.distributed.initialize() failed for {what} ({type(e).__name__}: {e}); environment seen: {seen}. "
            "Set config.distributed.coordinator_address / num_processes / process_id, or "
            "config.distributed.initialize=false to run one process") from e
    return (f"jax.distributed: process {jax.process_index()} of {jax.process_count()}"
            f"{f' ({cluster.kind})' if cluster.kind else ''}, {jax.local_device_count()} local / "
            f"{jax.device_count()} global devices")


CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def accelerator_plugins() -> list[str]:
    """The installed JAX accelerator backends (libtpu, and PJRT plugins such as jax-cuda12-plugin
    registered under the "jax_plugins" entry points), by name; [] for a CPU-only JAX."""
    import importlib.metadata
    import importlib.util

    found = ["libtpu"] if importlib.util.find_spec("libtpu") is not None else []
    found += sorted(ep.name for ep in importlib.metadata.entry_points(group="jax_plugins"))
    if importlib.util.find_spec("jax_plugins") is not None:
        import pkgutil

        import jax_plugins

        found += sorted(m.name for m in pkgutil.iter_modules(jax_plugins.__path__))
    return found


def use_cpu_memory_scheduler(enabled: bool = True, environ: dict | None = None,
                             plugins: Sequence[str] | None = None) -> str:
    """On a CPU-only JAX, add `--xla_cpu_enable_concurrency_optimized_scheduler=false` to XLA_FLAGS
    in `environ` (default `os.environ`), so that XLA:CPU orders each program to keep few buffers
    alive instead of running independent operations in parallel. Returns a line for the log, ""
    when nothing was changed.

    XLA reads the flag when JAX starts its CPU backend (the per-program `compiler_options` do not
    reach it), so call this before anything touches a device; if JAX has started already (and
    `environ` is the process's), nothing is changed and the line says so. Nothing is changed either
    when `enabled` is false, when XLA_FLAGS names the flag already (the user's choice wins),
    or when JAX may run on an accelerator: `JAX_PLATFORMS` is set to something else than "cpu", or
    an accelerator plugin is installed (`plugins`, default `accelerator_plugins()`).

    On the SD-1.5 ControlNet step of benchmarks/train_step.py (256x256, batch 1, float32) the
    step's temporaries went from 3.38 GiB to 1.36 GiB, the gradients being 1.35 GiB of these.
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if not enabled or CPU_SCHEDULER_FLAG in flags:
        return ""
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms not in ("", "cpu") or (not platforms and (accelerator_plugins() if plugins is None else plugins)):
        return ""
    if environ is None and _jax_started():
        return (f"XLA:CPU: JAX had started before train(), so {CPU_SCHEDULER_FLAG}=false was not applied "
                "(put it in XLA_FLAGS to use less memory)")
    env["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()
    return f"XLA:CPU: memory-minimising scheduler ({CPU_SCHEDULER_FLAG}=false)"


def _jax_started() -> bool:
    """Whether a JAX backend exists in this process already (then XLA has read its flags)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this internal: assume not
        return False


def release_free_memory() -> bool:
    """Give the C heap's free memory back to the operating system (glibc's `malloc_trim(0)`).

    XLA's compiler frees its working memory (about 1.4 GiB for the SD-1.5 ControlNet step) into
    the heap, which keeps it; the program's temporaries, allocated afterwards as fresh pages, then
    add to it. Trimming between compiling and running keeps the process's peak at the larger of
    the two instead of their sum. Returns whether anything was released; False (doing nothing)
    where there is no glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def initialize_distributed(coordinator_address: str = "", num_processes: int = -1, process_id: int = -1) -> None:
    """`jax.distributed.initialize`, with discovery (TPU pods, SLURM, Open MPI) for what is left unset.

    Must run before anything touches a device. Safe to call twice. Raises what
    `jax.distributed.initialize` raises (`RuntimeError`, `ValueError`) when it fails.
    """
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "already" not in str(e).lower():
            raise
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def describe(mesh: Mesh) -> str:
    """e.g. "data=4 x fsdp=2 (8 devices)"."""
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.devices.size} devices)"
