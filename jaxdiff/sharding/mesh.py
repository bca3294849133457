"""The device mesh: three named axes over every device of every process.

    data    pure data parallelism: parameters replicated, batch split
    fsdp    data parallelism with ZeRO-3 sharding: the batch is split over it too, and each
            parameter (and its optimizer moments) is split along one dimension
    tensor  tensor (model) parallelism: the batch is replicated over it, the `mlp` dimension of
            weights is split
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdiff.errors import ShardingError
from jaxdiff.sharding.rules import (DATA_AXIS, FSDP_AXIS, MESH_AXES, TENSOR_AXIS, Rules, check_rules, get_rules,
                                    rule_axes)

# ---------------------------------------------------------------------------------------------
# Mesh


def make_mesh(devices=None, *, data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    One size may be -1: it takes the devices the others leave. Devices keep `jax.devices()`
    order (process-major), so each process owns a contiguous block of the batch and `tensor`,
    the innermost axis, stays within a process.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {DATA_AXIS: data, FSDP_AXIS: fsdp, TENSOR_AXIS: tensor}
    shape = _resolve_shape(sizes, len(devices))
    mesh = Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)
    _check_tensor_within_process(mesh)
    return mesh


def mesh_from_config(mesh_cfg, devices=None) -> Mesh:
    """The mesh named by a config's `mesh` section (`data`, `fsdp`, `tensor` sizes), checked
    against its rule table (`mesh_cfg.rules`, see `check_rules`) before anything is built on it."""
    mesh = make_mesh(devices, data=int(mesh_cfg.data), fsdp=int(mesh_cfg.fsdp),
                     tensor=int(mesh_cfg.tensor))
    rules = getattr(mesh_cfg, "rules", None)
    if rules is not None:
        check_rules(mesh, rules)
    return mesh


def _resolve_shape(sizes: dict, n_devices: int) -> tuple[int, ...]:
    described = ", ".join(f"{k}={v}" for k, v in sizes.items())
    fix = (f"set --config.mesh.data/fsdp/tensor so their product is {n_devices} "
           f"(one of them may be -1 for 'the rest')")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ShardingError(f"mesh {described}: sizes must be positive with at most one -1; {fix}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise ShardingError(
                f"mesh {described} does not fit {n_devices} devices ({n_devices} is not a multiple "
                f"of {fixed}); {fix}")
        sizes = dict(sizes, **{free[0]: n_devices // fixed})
    elif fixed != n_devices:
        raise ShardingError(f"mesh {described} needs {fixed} devices but {n_devices} are present; {fix}")
    return tuple(sizes[a] for a in MESH_AXES)


def _check_tensor_within_process(mesh: Mesh) -> None:
    # Tensor-parallel peers see the same batch rows; each process feeds only its own rows, so a
    # tensor group spanning processes would need identical input on several processes.
    groups = mesh.devices.reshape(-1, mesh.shape[TENSOR_AXIS])
    if any(len({d.process_index for d in g}) > 1 for g in groups):
        raise ShardingError(
            f"mesh.tensor={mesh.shape[TENSOR_AXIS]} spans more than one process "
            f"({jax.local_device_count()} devices each); use a tensor size that divides the "
            f"devices of one process")


def inference_mesh(rules: Rules | str = "dp", devices=None) -> Mesh:
    """The default mesh of a sampling pipeline: every device (default: all of all processes) on
    one batch axis, `data` for `dp` and `fsdp` for the FSDP tables (so that their parameters are
    actually split); a table with tensor parallelism (`fsdp_tp`) gets tensor=2 and the rest on
    fsdp. A single device is a one-device mesh whatever the table. Build a mesh with `make_mesh`
    for other shapes."""
    rules = get_rules(rules) if isinstance(rules, str) else rules
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) == 1:
        return make_mesh(devices)
    tensor = 2 if TENSOR_AXIS in rule_axes(rules) else 1
    if rules.fsdp:
        return make_mesh(devices, data=1, fsdp=-1, tensor=tensor)
    return make_mesh(devices, data=-1, tensor=tensor)
