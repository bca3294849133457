"""Device mesh and shardings: one code path for 1 device, 8 devices, or many hosts.

The trainer builds a `Mesh` over every device of every process with a `data` axis, replicates the
parameters and splits the batch's leading dimension over `data`. XLA inserts the gradient
all-reduce. Each process hands in only its local slice of the global batch;
`jax.make_array_from_process_local_data` assembles the global array without copying it around.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.errors import JaxdiffError

DATA_AXIS = "data"


class ShardingError(JaxdiffError, ValueError):
    """A batch or mesh shape that cannot be laid out on the devices present."""


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the `data` axis; the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
    """The per-process batch size; an error if the global batch does not divide evenly."""
    n_dev = mesh.devices.size
    if global_batch % n_dev:
        raise ShardingError(
            f"batch size {global_batch} is not divisible by the {n_dev} devices of the mesh; "
            f"use a multiple of {n_dev} (e.g. --config.data.batch_size={n_dev * max(1, global_batch // n_dev)})")
    return global_batch // jax.process_count()


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global `jax.Array`s split over `data`.

    batch: dict of arrays `[B_local, ...]`; returns arrays `[B_local * process_count, ...]`.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
