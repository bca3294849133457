"""Arrays on the mesh: a process's slice of a training batch in, host values in and out for
sampling (padding a batch to the mesh, laying parameters out, gathering results).

Each process hands in only its local slice of the global batch;
`jax.make_array_from_process_local_data` assembles the global array without copying it around.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.errors import ShardingError
from jaxdiff.sharding.rules import BATCH_AXES, DATA_AXIS, FSDP_AXIS

# ---------------------------------------------------------------------------------------------
# Batches


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data` x `fsdp`; replicated over `tensor`."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
    """The per-process batch size; an error if the global batch does not divide evenly."""
    n = math.lcm(batch_shards(mesh), jax.process_count())
    if global_batch % n:
        raise ShardingError(
            f"batch size {global_batch} is not divisible by the {batch_shards(mesh)} batch shards "
            f"(mesh data x fsdp) and {jax.process_count()} processes; use a multiple of {n} "
            f"(e.g. --config.data.batch_size={n * max(1, global_batch // n)})")
    return global_batch // jax.process_count()


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global `jax.Array`s split over `data` x `fsdp`.

    batch: dict of arrays `[B_local, ...]`; returns arrays `[B_local * process_count, ...]`.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

# ---------------------------------------------------------------------------------------------
# Inference: host values in, images out


def padded_batch(n: int, mesh: Mesh) -> int:
    """The batch a run of `n` rows is computed at: `n` rounded up to a multiple of the batch
    shards (data x fsdp), the extra rows being dropped from the result."""
    k = batch_shards(mesh)
    return -(-n // k) * k


def put(x, sharding: NamedSharding) -> jax.Array:
    """A host value (the same on every process) -> a global `jax.Array` laid out by `sharding`;
    each process copies only the pieces its own devices hold."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_batch(x, mesh: Mesh, rows: int) -> jax.Array:
    """Host rows `[n, ...]` (the same on every process) -> a global array `[rows, ...]` split
    over `data` x `fsdp`, padded with copies of the last row (padding never adds zeros or NaNs
    that a network would not see otherwise)."""
    x = np.asarray(x)
    if x.shape[0] < rows:
        x = np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])
    return put(x, batch_sharding(mesh))


def place(tree: Any, shardings: Any) -> Any:
    """Lay the leaves of `tree` (numpy or jax arrays, the same on every process) out as
    `shardings` (e.g. `tree_shardings(tree, mesh, rules)`); leaves already there are kept, so a
    jitted function handed the result sees the same input layouts every call (no recompiles)."""
    def one(x, s):
        if isinstance(x, jax.Array):
            if x.sharding == s:  # equal, not merely equivalent: jit's cache tells the two apart
                return x
            if x.sharding.device_set == s.device_set or not x.is_fully_addressable:
                return jax.device_put(x, s)  # reshard on the devices, no trip through the host
        return put(x, s)

    return jax.tree.map(one, tree, shardings)


def gather(x: Any) -> Any:
    """Global arrays -> numpy arrays holding all their rows, on every process (a collective in a
    multi-process run: every process must call it)."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, x)
