"""`TrainState`: everything a training step reads and writes, as one pytree of arrays; `Trainer`:
the compiled pieces of a run that hold it (built by `build.build_trainer` or `lora.build_trainer`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """params / ema_params: the network's parameter tree (float32) and its exponential moving
    average; opt_state: the optax state; step: int32 scalar, number of updates applied; rng: the
    run's base key (each step folds `step` into it, so randomness depends on the step alone and a
    resumed run draws exactly what an uninterrupted one would)."""

    params: Any
    ema_params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


class Trainer(NamedTuple):
    """The compiled pieces of a run on one mesh.

    init: `() -> TrainState`, the fresh state, already laid out on the mesh.
    step: `(state, batch) -> (state, metrics)`, jitted with the state's shardings; the input
      state is donated.
    abstract: the TrainState as `jax.ShapeDtypeStruct`s carrying their shardings (the target
      for restoring a checkpoint onto this mesh, or for lowering without data).
    state_sharding / batch_sharding: NamedSharding pytree of the state; the batch's sharding.
    frozen: arrays the step reads but never trains, already on the mesh, passed after the batch:
      `step(state, batch, *frozen)` (a LoRA or ControlNet run's base weights; none for full training).
    """

    init: Callable
    step: Callable
    abstract: Any
    state_sharding: Any
    batch_sharding: Any
    frozen: tuple = ()


def create(params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=rng,
    )


def make_optimizer(learning_rate: float, *, warmup_steps: int = 0, decay_steps: int = 0,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   grad_clip: float = 0.0) -> optax.GradientTransformation:
    """AdamW with linear warmup (then constant, or cosine decay over `decay_steps`) and global-norm
    clipping (`grad_clip <= 0` disables it)."""
    if decay_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(warmup_steps, 1), warmup_steps + decay_steps)
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
             optax.constant_schedule(learning_rate)], [max(warmup_steps, 1)])
    adam = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip > 0 else adam


def optimizer_from_config(cfg):
    """`make_optimizer` with the config's `optim` section."""
    o = cfg.optim
    return make_optimizer(o.learning_rate, warmup_steps=o.warmup_steps, decay_steps=o.decay_steps,
                          weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, grad_clip=o.grad_clip)
