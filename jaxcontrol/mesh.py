"""Shardings on a `jax.sharding.Mesh`, shared by the sampler pipeline and the trainer.

`named(mesh, spec)` is `NamedSharding(mesh, spec)` except on a one-device mesh, where it is that
device's `SingleDeviceSharding`. Both mean the same placement, but on the CPU backend (jax 0.10.2)
an executable compiled for `NamedSharding` arguments ran a small U-Net's training step 8.7x slower
(5.0 s against 0.58 s, batch 32) than the same step compiled for a single device, with identical
optimised HLO. Multi-device meshes keep `NamedSharding`.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def named(mesh: Mesh, spec: PartitionSpec) -> jax.sharding.Sharding:
    """`NamedSharding(mesh, spec)`, or the one device's `SingleDeviceSharding` when `mesh` has one device."""
    if mesh.devices.size == 1:
        return jax.sharding.SingleDeviceSharding(mesh.devices.reshape(-1)[0])
    return NamedSharding(mesh, spec)


def tracing_mesh(mesh: Mesh):
    """A context in which programs are traced on `mesh` (`jax.set_mesh`), so that kernels GSPMD
    cannot partition (the Pallas TPU attention) find the mesh and run per shard under `shard_map`.
    A no-op for a one-device mesh. Shardings of the traced program are unchanged (tested)."""
    if mesh.devices.size == 1:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)
