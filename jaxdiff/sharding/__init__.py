"""Device mesh, parameter layouts and multi-host start-up: one code path from 1 device to a pod.

    mesh.py     the (data, fsdp, tensor) mesh; `make_mesh`, `mesh_from_config`, `inference_mesh`
    rules.py    logical axes of every parameter and the rule tables (`dp`, `fsdp`, `fsdp_tp`)
    arrays.py   batches and host values on the mesh: `shard_batch`, `put_batch`, `place`, `gather`
    hosts.py    `init_distributed`, `barrier`

The mesh has three named axes, outermost first:

    data    pure data parallelism: parameters replicated, batch split
    fsdp    data parallelism with ZeRO-3 sharding: the batch is split over it too, and each
            parameter (and its optimizer moments) is split along one dimension, gathered by XLA
            just before use and its gradient reduce-scattered back
    tensor  tensor (model) parallelism: the batch is replicated over it, the `mlp` dimension of
            weights is split (Megatron-style: column-parallel in, row-parallel out)

Parameters get *logical* axis names from their path and shape, by one named rule each, and a
rule table (`dp`, `fsdp`, `fsdp_tp`) maps those onto the mesh axes: see `rules.py`.

Each process hands in only its local slice of the global batch;
`jax.make_array_from_process_local_data` assembles the global array without copying it around.
"""

from jaxdiff.errors import ShardingError  # noqa: F401
from jaxdiff.sharding.arrays import (  # noqa: F401
    batch_sharding, batch_shards, check_batch_size, gather, padded_batch, place, put, put_batch, replicated,
    shard_batch)
from jaxdiff.sharding.hosts import barrier, init_distributed  # noqa: F401
from jaxdiff.sharding.mesh import inference_mesh, make_mesh, mesh_from_config  # noqa: F401
from jaxdiff.sharding.rules import (  # noqa: F401
    BATCH_AXES, DATA_AXIS, FSDP_AXIS, MESH_AXES, PARAM_LEAVES, PARAMETER_RULES, RULES, STATE_LEAVES, TENSOR_AXIS,
    ParamRule, Rules, _key_name, check_rules, get_rules, logical_axes, param_spec, parameter_rule, rule_axes,
    tree_shardings, unnamed_parameters, with_shardings)
