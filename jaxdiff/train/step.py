"""The denoising loss and the pure training step.

Loss (Ho et al. 2020, eq. 14, generalised to any prediction target): draw t ~ U{0..T-1} and
eps ~ N(0, I), form x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (`parameterization.diffuse`), and
regress the network output on the target of the chosen parameterisation (eps, x0 or v,
`parameterization.target`), optionally weighted per example by
min-SNR-gamma (Hang et al. 2023). Options are resolved when the step is built, so the traced step
itself has no flag branching.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdiff import parameterization
from jaxdiff import sharding as sharding_lib
from jaxdiff.errors import ConfigError
from jaxdiff.train.state import TrainState


def min_snr_weight(prediction_type: str, gamma: float) -> Callable[[jax.Array], jax.Array]:
    """Per-example loss weight as a function of abar_t `[B]`.

    Min-SNR-gamma weights the x0-space error by min(SNR, gamma); expressed in each target's own
    space that is min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and
    min(SNR, gamma) / (SNR + 1) for v. `gamma <= 0` gives uniform weights.
    """
    if gamma <= 0:
        return lambda abar: jnp.ones_like(abar)
    denominators = {
        "epsilon": lambda snr: snr,
        "sample": lambda snr: jnp.ones_like(snr),
        "v_prediction": lambda snr: snr + 1.0,
    }
    denom = denominators[prediction_type]

    def weight(abar):
        snr = abar / (1.0 - abar)
        return jnp.minimum(snr, gamma) / denom(snr)

    return weight


def label_dropper(p: float, null_label: int | None) -> Callable:
    """Replace each label by the null class with probability `p` (for classifier-free guidance)."""
    if null_label is None:
        return lambda labels, key: None
    if p <= 0:
        return lambda labels, key: labels

    def drop(labels, key):
        return jnp.where(jax.random.uniform(key, labels.shape) < p, null_label, labels)

    return drop


def label_condition(p: float, null_label: int | None) -> Callable:
    """`condition(batch, key) -> model kwargs` for a class-conditional (or unconditional) network:
    `{"labels": batch["label"]}` with each label replaced by the null class with probability `p`,
    or `{}` when the network has no classes (`null_label=None`)."""
    if null_label is None:
        return lambda batch, key: {}
    drop = label_dropper(p, null_label)
    return lambda batch, key: {"labels": drop(batch["label"], key)}


def context_condition(p: float, null_context) -> Callable:
    """`condition(batch, key) -> {"context": [B, S, D]}` for a text-conditioned network.

    batch["context"]: [B, S, D] text-encoder states of each example's caption. With probability
    `p` an example's whole context is replaced by `null_context` [S, D] (the empty caption's
    states), so the same network also learns the unconditional prediction for classifier-free
    guidance."""
    null_context = jnp.asarray(null_context, jnp.float32)

    def condition(batch, key):
        context = batch["context"]                                          # [B, S, D]
        drop = jax.random.uniform(key, (context.shape[0], 1, 1)) < p          # [B, 1, 1]
        return {"context": jnp.where(drop, null_context[None].astype(context.dtype), context)}

    return condition


def ema_update(ema, params, decay: float, step: jax.Array):
    """EMA with the usual warm start: the effective decay min(decay, (1+s)/(10+s)) lets a short run's
    average follow the early, fast-moving weights."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def make_loss_fn(apply_fn: Callable, alphas_cumprod: jax.Array, *, prediction_type: str = "epsilon",
                 min_snr_gamma: float = 0.0, label_dropout: float = 0.0,
                 null_label: int | None = None, condition: Callable | None = None) -> Callable:
    """Build `loss_fn(params, batch, key) -> scalar loss`.

    apply_fn: `apply_fn({"params": p}, x_t, t, train=True, rngs={"dropout": k}, **cond)`.
    alphas_cumprod: `[T]` float32. batch: {"image": [B, H, W, C] in [-1, 1], ...} plus what
    `condition` reads.
    condition: `condition(batch, key) -> dict` of conditioning keyword arguments for the
    network, with its own dropout for guidance (`label_condition`, `context_condition`); by
    default `label_condition(label_dropout, null_label)`: batch["label"] [B] int32 as `labels`.
    """
    num_t = alphas_cumprod.shape[0]
    weight_fn = min_snr_weight(prediction_type, min_snr_gamma)
    if condition is None:
        condition = label_condition(label_dropout, null_label)

    def loss_fn(params, batch, key):
        x0 = batch["image"]                                            # [B, H, W, C]
        k_t, k_eps, k_lab, k_drop = jax.random.split(key, 4)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, num_t)          # [B]
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        abar = alphas_cumprod[t]                                       # [B]
        x_t = parameterization.diffuse(x0, eps, abar)                  # [B, H, W, C]
        cond = condition(batch, k_lab)
        pred = apply_fn({"params": params}, x_t, t.astype(jnp.float32),
                        train=True, rngs={"dropout": k_drop}, **cond)
        pred = pred[..., :x0.shape[-1]]          # a learned-sigma network's variance half gets no loss
        target = parameterization.target(prediction_type, x0, eps, abar)
        per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target),
                               axis=tuple(range(1, x0.ndim)))          # [B]
        return jnp.mean(weight_fn(abar) * per_example)

    return loss_fn


def micro_batches(batch: dict, k: int, sharding=None) -> dict:
    """Split a batch `[B, ...]` into `k` micro-batches `[k, B/k, ...]`; micro-batch i holds the
    examples i, i+k, i+2k, ... (a strided split: each device's contiguous shard of the batch keeps
    its own rows, so nothing moves between devices when B/k is a multiple of the batch shards).
    sharding: the `[k, B/k, ...]` stack's sharding (micro-batch axis replicated, rows split like
    the batch), applied as a constraint; None leaves the layout to XLA."""

    def split(x):
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:])            # [B/k, k, ...]
        x = jnp.swapaxes(x, 0, 1)                                    # [k, B/k, ...]
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split, batch)


def accumulated_value_and_grad(loss_fn: Callable, k: int, sharding=None) -> Callable:
    """`value_and_grad(params, batch, key, *frozen) -> (loss, grads)` of `loss_fn` averaged over
    `k` equal micro-batches (`micro_batches`), one `lax.scan` so only one micro-batch's
    activations live at a time. Micro-batch i draws with `fold_in(key, i)`. The mean of the
    micro-batch means is the big batch's mean, so a loss whose draws follow the examples gives
    the big batch's loss and gradient; `k = 1` is plain `jax.value_and_grad(loss_fn)`."""
    grad_fn = jax.value_and_grad(loss_fn)
    if k == 1:
        return grad_fn

    def value_and_grad(params, batch, key, *frozen):
        def one(carry, inputs):
            i, micro = inputs
            loss, grads = grad_fn(params, micro, jax.random.fold_in(key, i), *frozen)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        total, _ = jax.lax.scan(one, zero, (jnp.arange(k), micro_batches(batch, k, sharding)))
        return jax.tree.map(lambda a: a / k, total)

    return value_and_grad


def accumulation_options(cfg, mesh) -> dict:
    """`make_train_step` keywords for `cfg.train.grad_accum_steps` (k): each update averages k
    micro-batches of data.batch_size / k, split over the mesh like the batch. A config without
    the key trains on whole batches."""
    k = int(cfg.train.get("grad_accum_steps", 1))
    shards = sharding_lib.batch_shards(mesh)
    if k > 1 and cfg.data.batch_size % (k * shards):
        raise ConfigError(f"train.grad_accum_steps={k}: data.batch_size={cfg.data.batch_size} must be a multiple of "
                          f"{k} x {shards} batch shards (each micro-batch split over every device)")
    micro = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES))
    return {"grad_accum_steps": k, "micro_sharding": micro}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
                    ema_decay: float = 0.999, grad_accum_steps: int = 1,
                    micro_sharding=None) -> Callable:
    """Build `train_step(state, batch, *frozen) -> (state, metrics)` from a `make_loss_fn` loss.

    The step's randomness is `fold_in(state.rng, state.step)`: a function of the step alone.
    frozen: arguments the loss reads but never trains, passed on as `loss_fn(params, batch, key,
    *frozen)` (a LoRA run's base weights, `train/lora.py`); none for full training. They are
    arguments rather than closed-over constants so the jitted step takes them as (sharded) inputs.
    grad_accum_steps: k > 1 averages the gradient of k micro-batches of B/k examples
    (`accumulated_value_and_grad`, sharded like `micro_sharding`) before the one optimizer
    update; the step count and the EMA advance once per update.
    """
    value_and_grad = accumulated_value_and_grad(loss_fn, grad_accum_steps, micro_sharding)

    def train_step(state: TrainState, batch: dict, *frozen) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        loss, grads = value_and_grad(state.params, batch, key, *frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            params=params, opt_state=opt_state, step=state.step + 1,
            ema_params=ema_update(state.ema_params, params, ema_decay, state.step))
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    return train_step
