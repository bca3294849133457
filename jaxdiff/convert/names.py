"""The name table: the one skeleton every checkpoint mapping in this package runs on.

A converter declares, for each flax parameter leaf, the torch state-dict key holding it and the
layout rule between the two:

    Entry(flax=("down_0", "res_0", "conv_0", "kernel"),
          torch="down_blocks.0.resnets.0.conv1.weight", shape=(3, 3, 32, 32), layout=CONV)

A `Table` is a tuple of such entries, one per flax leaf. Two functions run it, both ways:

    to_flax(state_dict, table, what=...) -> params       {torch key: array} -> nested flax tree
    to_torch(params, table, what=...) -> state_dict      nested flax tree -> {torch key: array}

Both check the keys (one line naming what is missing and what is unexpected) and the shapes
(in the file's own names and layout) before converting anything. A table is built from the
module's own parameter tree (`jax.eval_shape` of its init: which parameters exist is never
restated) and a `Rules` name table mapping flax module paths to torch module names:

    table = from_tree(expected, Rules([("conv_in", "conv_in"),
                                       (r"down_(\\d+)/res_(\\d+)/(\\w+)", fn), ...]))

Layouts (torch <-> flax), the rule `from_tree` picks by flax leaf:

    CONV      torch Conv2d.weight [O, I, kh, kw]  <->  flax Conv.kernel [kh, kw, I, O]  (rank 4)
    LINEAR    torch Linear.weight [O, I]  <->  flax Dense.kernel [I, O]                 (rank 2)
              (reads a 1x1 convolution weight [O, I, 1, 1] too)
    SAME      *Norm.weight -> scale, bias -> bias, Embedding.weight -> embedding: unchanged
    CONV1X1   a Dense kernel [I, O] stored as a 1x1 convolution [O, I, 1, 1]   (LDM VAE attention)
    NULL_ROW  an embedding table [N, D] whose flax twin has one more, zero, row [N + 1, D]

A fused tensor (OpenCLIP's q/k/v `in_proj_weight` [3D, D]) is several entries with the same
torch key and `part=(i, n)`: entry i holds the i-th of n equal slices along the torch axis 0.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from flax import traverse_util

from jaxdiff.errors import CheckpointError

# ------------------------------------------------------------------------------------------
# layouts


def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """[O, I, kh, kw] -> [kh, kw, I, O]."""
    return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(k: np.ndarray) -> np.ndarray:
    """[kh, kw, I, O] -> [O, I, kh, kw]."""
    return np.transpose(k, (3, 2, 0, 1))


def linear_to_flax(w: np.ndarray) -> np.ndarray:
    """[O, I] -> [I, O]; a 1x1 conv weight [O, I, 1, 1] is accepted as a linear one."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.transpose(w)


def linear_to_torch(k: np.ndarray) -> np.ndarray:
    """[I, O] -> [O, I]."""
    return np.transpose(k)


class Layout(NamedTuple):
    """How one torch tensor becomes one flax leaf and back.

    also: another torch shape read as the same tensor, from the expected one (or None).
    """
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    also: Callable[[tuple], tuple] | None = None


def _same(w):
    return w


SAME = Layout("same", _same, _same)
CONV = Layout("conv", conv_to_flax, conv_to_torch)
LINEAR = Layout("linear", linear_to_flax, linear_to_torch, also=lambda s: (*s, 1, 1))
CONV1X1 = Layout("1x1 conv", linear_to_flax, lambda k: linear_to_torch(k)[:, :, None, None],
                 also=lambda s: s[:2])
NULL_ROW = Layout("null row", lambda w: np.concatenate([w, np.zeros_like(w[:1])]),
                  lambda e: e[:-1])


# ------------------------------------------------------------------------------------------
# tables


class Entry(NamedTuple):
    """One flax leaf: its path, the torch key holding it, its flax shape, the layout rule, and
    which slice (i of n along axis 0) of a fused torch tensor it is."""
    flax: tuple[str, ...]
    torch: str
    shape: tuple[int, ...]
    layout: Layout = SAME
    part: tuple[int, int] = (0, 1)


Table = tuple[Entry, ...]


class Rules:
    """An ordered name table: rows (pattern, name). A name maps to the first row whose regex
    pattern matches all of it; `name` is a template (`\\1` is group 1) or a function of the
    groups (strings). Unmatched names raise KeyError."""

    def __init__(self, rows: Sequence[tuple[str, str | Callable[..., str]]]):
        self.rows = [(re.compile(pattern), name) for pattern, name in rows]

    def __call__(self, name: str) -> str:
        for pattern, out in self.rows:
            m = pattern.fullmatch(name)
            if m:
                return out(*m.groups()) if callable(out) else m.expand(out)
        raise KeyError(name)


# flax leaf -> (torch leaf, layout); a kernel's layout is judged by its rank
_LEAVES = {"bias": ("bias", SAME), "scale": ("weight", SAME), "embedding": ("weight", SAME)}


def from_tree(expected: Mapping, module_name: Callable[[str], str]) -> Table:
    """The table of a parameter tree: one Entry per leaf, named `module_name("a/b") + ".weight"`
    (or `.bias`) for the leaf `("a", "b", leaf)`.

    expected: the (nested or flat) parameter tree; leaves need only a `.shape`.
    module_name: flax module path, joined by "/" -> torch module name (e.g. a `Rules`).
    Raises CheckpointError naming a parameter `module_name` has no name for.
    """
    table = []
    for path, leaf in flatten(expected).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            torch_leaf, layout = "weight", CONV if len(shape) == 4 else LINEAR
        elif path[-1] in _LEAVES:
            torch_leaf, layout = _LEAVES[path[-1]]
        else:
            raise CheckpointError(f"no torch name for the parameter leaf {_key(path)}")
        try:
            module = module_name("/".join(path[:-1]))
        except (KeyError, ValueError, IndexError):
            raise CheckpointError(f"no torch name for parameter {_key(path)}") from None
        table.append(Entry(path, f"{module}.{torch_leaf}", shape, layout))
    return tuple(table)


def torch_shapes(table: Table) -> dict[str, tuple[int, ...]]:
    """{torch key: shape in torch layout} of every tensor the table reads or writes."""
    shapes: dict[str, tuple[int, ...]] = {}
    for e in table:
        shape = e.layout.to_torch(np.broadcast_to(np.float32(0), e.shape)).shape  # no memory
        if e.torch in shapes:  # one more slice of a fused tensor
            shape = (shapes[e.torch][0] + shape[0], *shape[1:])
        shapes[e.torch] = tuple(shape)
    return shapes


# ------------------------------------------------------------------------------------------
# running a table


def to_flax(state_dict: Mapping[str, Any], table: Table, *, what: str) -> dict:
    """{torch key: array (any float dtype, torch layout)} -> the nested flax parameter tree,
    float32 numpy arrays.

    what: names the source in errors (e.g. "diffusers U-Net weights").
    Raises CheckpointError naming missing / unexpected torch keys, then shape mismatches (in the
    file's names and layout, with the flax parameter each one feeds).
    """
    want = torch_shapes(table)
    check_same_keys(state_dict.keys(), want, what=what)
    first = {}
    for e in table:
        first.setdefault(e.torch, e)
    bad = []
    for key, shape in want.items():
        e, got = first[key], tuple(np.shape(state_dict[key]))
        if got != shape and not (e.part[1] == 1 and e.layout.also and got == e.layout.also(shape)):
            bad.append(f"{key} has {got}, expected {shape} (for {_key(e.flax)})")
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} shape mismatch(es): " + ", ".join(bad[:5])
                              + (", ..." if len(bad) > 5 else ""))
    flat = {}
    for e in table:
        w = np.asarray(state_dict[e.torch])
        i, n = e.part
        if n > 1:
            w = np.split(w, n, axis=0)[i]
        flat[e.flax] = np.asarray(e.layout.to_flax(w), np.float32)
    return unflatten(flat)


def to_torch(params: Mapping, table: Table, *, what: str) -> dict[str, np.ndarray]:
    """The inverse of `to_flax`: a flax tree (or {"params": tree}) -> {torch key: contiguous
    float32 numpy array}, fused tensors concatenated in part order.

    Raises CheckpointError naming missing / unexpected flax parameters or mismatched shapes.
    """
    if set(params) == {"params"}:
        params = params["params"]
    flat = flatten(params)
    check_same_keys(flat, [e.flax for e in table], what=what)
    check_same_shapes(flat, {e.flax: np.broadcast_to(np.uint8(0), e.shape) for e in table},
                      what=what)
    parts: dict[str, list] = {}
    for e in sorted(table, key=lambda e: e.part[0]):
        w = e.layout.to_torch(np.asarray(flat[e.flax], np.float32))
        parts.setdefault(e.torch, []).append(w)
    return {k: np.ascontiguousarray(v[0] if len(v) == 1 else np.concatenate(v))
            for k, v in parts.items()}


# ------------------------------------------------------------------------------------------
# trees and checks


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """{("a", "b"): x} -> {"a": {"b": x}}."""
    return traverse_util.unflatten_dict(dict(flat))


def flatten(tree: Mapping) -> dict[tuple[str, ...], Any]:
    """{"a": {"b": x}} -> {("a", "b"): x}; a flat {tuple: x} dict is returned as it is."""
    if all(isinstance(k, tuple) for k in tree):
        return dict(tree)
    return traverse_util.flatten_dict(tree)


def check_same_keys(got: Iterable, expected: Iterable, *, what: str) -> None:
    """Raise one CheckpointError line naming missing and unexpected keys (at most 10 of each)."""
    got, expected = set(got), set(expected)
    missing, unexpected = sorted(expected - got, key=str), sorted(got - expected, key=str)
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
    raise CheckpointError(f"{what}: " + "; ".join(parts))


def check_same_shapes(got: Mapping, expected: Mapping, *, what: str) -> None:
    """Raise one CheckpointError line naming the first keys whose shapes differ."""
    bad = [(k, np.shape(got[k]), np.shape(expected[k])) for k in expected
           if k in got and np.shape(got[k]) != np.shape(expected[k])]
    if bad:
        lines = ", ".join(f"{_key(k)} has {g}, expected {e}" for k, g, e in bad[:5])
        raise CheckpointError(f"{what}: {len(bad)} shape mismatch(es): {lines}")


def _key(k) -> str:
    return "/".join(k) if isinstance(k, tuple) else str(k)


def _names(keys) -> str:
    shown = ", ".join(_key(k) for k in keys[:10])
    return shown + (", ..." if len(keys) > 10 else "")
