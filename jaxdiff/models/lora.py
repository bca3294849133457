"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a transform of
a parameter tree: no module changes, the network is called with merged weights.

    W' = W + sum_i s_i * (alpha_i / r_i) * down_i @ up_i                               (eq. 3)

Notation (paper -> code): the frozen weight W_0 -> `W` (a flax kernel), B A -> `down @ up` in
flax's [in, out] orientation (the paper's A [r, in] is `down.T`, its B [out, r] is `up.T`), the
rank r -> `down.shape[-1]`, alpha / r -> `alpha / r`, and s_i -> the adapter's scale (a traced
array, so changing it never recompiles a jitted caller).

Shapes of one `Lora` (flax layouts, float32):

    Dense kernel  W [in, out]            down [in, r]            up [r, out]
    Conv kernel   W [kh, kw, in, out]    down [kh, kw, in, r]    up [r, out]   (a k x k "down"
                                                                 convolution then a 1 x 1 "up")

An adapter is a flat dict {"/"-joined path of the kernel it changes: Lora}, e.g.
`{"down_1/attn_0/block_0/self_attn/query/kernel": Lora(down, up, alpha)}`; a set of adapters is
{name: adapter} with scales {name: scalar}:

    params = lora.merge(base, {"style": adapter}, {"style": jnp.float32(0.7)})   # inside jit
    unet.apply({"params": params}, x, t, context=c)

A network function that takes its parameters as an argument takes an `Adapted(base, adapters,
scales)` in their place and calls `resolve` on it first (see `jaxdiff/pipelines/lora.py`).

`init` makes a fresh adapter for training (down random, up zero, so it starts as the identity);
with the base frozen, the adapters are the only trainable leaves and `merge` is the forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

SEP = "/"


class Lora(NamedTuple):
    """One low-rank update: down [..., in, r], up [r, out] and alpha (a scalar; the update is
    scaled by alpha / r)."""
    down: jax.Array
    up: jax.Array
    alpha: jax.Array

    @property
    def rank(self) -> int:
        return int(self.down.shape[-1])


def delta(w: Lora, shape) -> jax.Array:
    """(alpha / r) * down @ up, reshaped to the kernel `shape` ([in, out] or [kh, kw, in, out]);
    a Dense-shaped pair [in, r] x [r, out] also fits a 1 x 1 convolution kernel [1, 1, in, out]."""
    d = jnp.tensordot(w.down, w.up, axes=1)                          # [..., in, out]
    d = d * (jnp.asarray(w.alpha, d.dtype) / w.rank)
    return d.reshape(shape)


def fits(w: Lora, shape) -> bool:
    """Whether `w`'s update has the kernel `shape` (see `delta`)."""
    shape = tuple(shape)
    if w.down.ndim < 2 or w.up.ndim != 2 or w.down.shape[-1] != w.up.shape[0]:
        return False
    full = tuple(w.down.shape[:-1]) + (w.up.shape[1],)
    return full == shape or (len(shape) == 4 and shape[:2] == (1, 1) and full == shape[2:])


def flat(tree: Mapping) -> dict[str, jax.Array]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    return traverse_util.flatten_dict(dict(tree), sep=SEP)


def unflat(leaves: Mapping[str, jax.Array]) -> dict:
    """The inverse of `flat`."""
    return traverse_util.unflatten_dict(dict(leaves), sep=SEP)


def check(params: Mapping, adapter: Mapping[str, Lora], *, what: str = "LoRA") -> None:
    """A one-line ValueError naming the first path of `adapter` that is not a kernel of `params`
    or whose update does not fit that kernel's shape."""
    leaves = flat(params)
    for path, w in adapter.items():
        if path not in leaves:
            raise ValueError(f"{what}: {path} is not a parameter of this network")
        if not fits(w, np.shape(leaves[path])):
            raise ValueError(f"{what}: {path} has down {list(np.shape(w.down))} and up {list(np.shape(w.up))}, "
                             f"which do not make the kernel's shape {list(np.shape(leaves[path]))}")


def merge(params: Mapping, adapters: Mapping[str, Mapping[str, Lora]], scales: Mapping[str, jax.Array]) -> dict:
    """The effective tree W + sum_i s_i * delta_i (eq. 3) for every kernel some adapter changes;
    other leaves are passed through. Pure and traceable: call it inside the jitted network so the
    scales are traced and no merged copy is kept between calls.

    params: the base tree (nested dict). adapters: {name: {path: Lora}}. scales: {name: scalar},
    one per adapter (a missing name is an error)."""
    leaves = flat(params)
    for name, adapter in adapters.items():
        s = jnp.asarray(scales[name], jnp.float32)
        for path, w in adapter.items():
            base = leaves[path]
            leaves[path] = base + (s * delta(w, base.shape)).astype(base.dtype)
    return unflat(leaves)


@struct.dataclass
class Adapted:
    """A parameter tree with adapters on it, handed to a network function in place of its params
    (`resolve` merges it there): base (the tree), adapters {name: {path: Lora}}, scales {name:
    scalar}; every leaf is traced."""
    base: dict
    adapters: dict
    scales: dict


def resolve(params):
    """The tree a module applies: `merge` of an `Adapted`, anything else unchanged."""
    if isinstance(params, Adapted):
        return merge(params.base, params.adapters, params.scales)
    return params


def init(params: Mapping, targets, rank: int, key: jax.Array, *, alpha: float | None = None) -> dict[str, Lora]:
    """A fresh adapter on the kernels `targets` (paths) of `params`: down ~ N(0, 1/in) (Kaiming
    for the fan-in of the down projection), up = 0, alpha = rank unless given, so the adapted
    network starts equal to the base."""
    leaves = flat(params)
    out = {}
    for i, path in enumerate(targets):
        if path not in leaves or np.ndim(leaves[path]) not in (2, 4):
            raise ValueError(f"LoRA target {path} is not a Dense or Conv kernel of this network")
        shape = np.shape(leaves[path])
        fan_in = int(np.prod(shape[:-1]))
        down = jax.random.normal(jax.random.fold_in(key, i), (*shape[:-1], rank), jnp.float32) / np.sqrt(fan_in)
        out[path] = Lora(down, jnp.zeros((rank, shape[-1]), jnp.float32),
                         jnp.float32(rank if alpha is None else alpha))
    return out
