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

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..errors import ConfigError
from ..mesh import named

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


def initialize_distributed(coordinator_address: str = "", num_processes: int = -1, process_id: int = -1) -> None:
    """`jax.distributed.initialize`, with discovery (TPU pods, SLURM, Open MPI) for what is left unset.

    Must run before anything touches a device. Safe to call twice.
    """
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
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
