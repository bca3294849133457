"""Parameter layouts: a logical name for every parameter's axes, and rule tables mapping those
names onto the mesh axes.

Parameters get *logical* axis names from their path and shape (`logical_axes`), not from
annotations inside the modules, so the same table lays out the U-Net, the VAE, the text encoder
and any converted checkpoint. Every parameter is named by one rule of `PARAMETER_RULES` (by the
name of its layer: "attention output", "convolution", ...); `unnamed_parameters(tree)` lists those
no rule names, and the tests require that list to be empty for jaxdiff's networks, so a renamed
layer cannot silently change how it shards. A rule table (`RULES`) maps logical names to mesh
axes; choosing `dp`, `fsdp` or `fsdp_tp` is a config change, not a code change, and a table that
does not fit the mesh (`check_rules`) is refused before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from typing import Any, NamedTuple, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.errors import ShardingError, JaxdiffWarning

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Leaf names of linen parameters (Dense / Conv / Embed / norm layers).
PARAM_LEAVES = ("kernel", "bias", "scale", "embedding")
# Bookkeeping leaves of a TrainState / optax state that are not parameters (scalars, such as
# optax's `count`, are bookkeeping whatever their name); they are replicated.
STATE_LEAVES = ("step", "rng", "count")

# ---------------------------------------------------------------------------------------------
# Logical axes of parameters


# How a parameter of a named layer is laid out, Megatron-style (column-parallel layers split their
# output features, row-parallel ones their input features, so tensor parallelism alternates):
#
#     layout      leaf [shape]            logical axes
#     column      kernel [..., in, out]   (None.., "embed", "mlp")     dense [in, out], conv [kh, kw, in, out]
#                 bias [out]              ("mlp",)
#     row         kernel [..., in, out]   (None.., "mlp", "embed")     maps the wide dimension back
#                 bias [out]              ("embed",)
#     norm        scale, bias [C]         ("norm",)                    replicated by every rule table
#     embedding   embedding [V, D]        ("vocab", "embed")
COLUMN, ROW, NORM, EMBEDDING = "column", "row", "norm", "embedding"


class ParamRule(NamedTuple):
    """A named rule: the parameters of every layer whose module path ends in `layers` (a regular
    expression over "/"-joined module names, matched at a name boundary) are laid out as `layout`."""

    name: str
    layers: str
    layout: str


# One rule per kind of layer of jaxdiff's networks (U-Net incl. the Stable Diffusion topologies,
# DiT, VAE, CLIP text encoder). A few patterns also hold the names diffusers / transformers give the same
# layers (to_q, out_proj, net_2, layer_norm1, ...), so such a tree shards alike.
PARAMETER_RULES = (
    ParamRule("convolution", r"conv|conv_\d+|conv_in|conv_out|skip|quant_conv|post_quant_conv", COLUMN),
    ParamRule("time embedding into a ResBlock", r"time_proj", COLUMN),
    ParamRule("time / micro-conditioning MLP, first layer", r"(time_embed|add_embed)/dense_0", COLUMN),
    ParamRule("time / micro-conditioning MLP, second layer", r"(time_embed|add_embed)/dense_1", ROW),
    ParamRule("attention query / key / value", r"query|key|value|to_q|to_k|to_v|q_proj|k_proj|v_proj", COLUMN),
    ParamRule("attention output", r"\w*attn\w*/out|to_out(_\d+)?|out_proj|o_proj", ROW),
    ParamRule("transformer / feed-forward input projection", r"proj_in|fc1|net_0(_proj)?", COLUMN),
    ParamRule("transformer / attention / feed-forward output projection", r"proj_out|fc2|net_2", ROW),
    ParamRule("normalisation", r"norm|norm_\d+|norm_out|final_norm|layer_norm\d*", NORM),
    ParamRule("token / position / class embedding", r"token_embedding|position_embedding|class_embed", EMBEDDING),
    # MMDiT (SD3 / SD3.5; models/mmdit.py): the layers the rules above do not already name. DiT
    # (models/dit.py) needs two of them, the patch embedding and the adaLN modulation.
    ParamRule("MMDiT patch embedding", r"patch_embed", COLUMN),
    ParamRule("MMDiT position table", r"pos_embed", EMBEDDING),
    ParamRule("MMDiT pooled-text MLP, first layer", r"pooled_embed/dense_0", COLUMN),
    ParamRule("MMDiT pooled-text MLP, second layer", r"pooled_embed/dense_1", ROW),
    ParamRule("MMDiT context projection", r"context_embed", COLUMN),
    ParamRule("adaLN modulation", r"adaln|context_adaln|final_adaln", COLUMN),
    ParamRule("joint attention context query / key / value", r"context_query|context_key|context_value", COLUMN),
    ParamRule("joint attention context output", r"context_out", ROW),
    ParamRule("query / key RMS normalisation", r"norm_q|norm_k|norm_context_q|norm_context_k", NORM),
    # T5 text encoder (models/t5.py; its attention, norms and token embedding fall under the rules
    # above). The bias table [buckets, heads] is tiny: no rule table splits it over `tensor`.
    ParamRule("T5 feed-forward input projections", r"mlp/(wi|wi_0|wi_1)", COLUMN),
    ParamRule("T5 feed-forward output projection", r"mlp/wo", ROW),
    ParamRule("T5 relative position bias table", r"relative_attention_bias", EMBEDDING),
    # Flux transformer (models/flux.py): heads and MLP over `tensor`; its attention q/k/v,
    # proj_out, feed-forward proj_in/proj_out, context_embed and pooled_embed are named by the
    # rules above (the MMDiT's context / pooled-text rows have the same layout).
    ParamRule("Flux: packed-token embedding into the model width", r"x_embed", COLUMN),
    ParamRule("Flux: guidance MLP, first layer", r"guidance_embed/dense_0", COLUMN),
    ParamRule("Flux: guidance MLP, second layer", r"guidance_embed/dense_1", ROW),
    ParamRule("Flux: adaLN modulation (shift / scale / gate)", r"img_mod|txt_mod|mod|out_mod", COLUMN),
    ParamRule("Flux: text-stream attention query / key / value", r"txt_(query|key|value)", COLUMN),
    ParamRule("Flux: text-stream attention output", r"txt_proj_out", ROW),
    ParamRule("Flux: single-block MLP input", r"mlp_in", COLUMN),
    ParamRule("Flux: RMS query / key norm", r"(txt_)?(query|key)_norm", NORM),
)

# Which leaves (and their rank) each layout names.
_LAYOUT_LEAVES = {
    COLUMN: {"kernel": "matrix", "bias": 1},
    ROW: {"kernel": "matrix", "bias": 1},
    NORM: {"scale": 1, "bias": 1},
    EMBEDDING: {"embedding": 2},
}


@functools.lru_cache(maxsize=None)
def _pattern(layers: str) -> re.Pattern:
    return re.compile(rf"(?:^|/)(?:{layers})$")


def parameter_rule(path: Sequence[str], shape: Sequence[int]) -> ParamRule | None:
    """The rule of `PARAMETER_RULES` that names the parameter at `path` (keys from the root, the
    leaf last, e.g. ("down_2", "attn_0", "proj_out", "kernel")) with `shape`, or None.

    The first rule whose `layers` match the module path and whose layout has this leaf at this
    rank names it. Optimizer moments and EMA copies end in their parameter's path, so they are
    named alike."""
    if len(path) < 2:
        return None
    leaf, modules = path[-1], "/".join(path[:-1])
    for rule in PARAMETER_RULES:
        rank = _LAYOUT_LEAVES[rule.layout].get(leaf)
        fits = rank is not None and (len(shape) >= 2 if rank == "matrix" else len(shape) == rank)
        if fits and _pattern(rule.layers).search(modules):
            return rule
    return None


def logical_axes(path: Sequence[str], shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axis names of one parameter, from the rule that names it (`parameter_rule`; the
    layouts are tabulated above `ParamRule`).

    A parameter no rule names gets no logical axes (all None): nothing splits it over `tensor`
    (the FSDP rule still splits it by size). Such parameters are listed by `unnamed_parameters`,
    and `tree_shardings` warns about them under a table that uses logical axes.
    path: keys from the root, e.g. ("down_2", "attn_0", "proj_out", "kernel").
    """
    ndim = len(shape)
    rule = parameter_rule(path, shape)
    layout = None if rule is None else rule.layout
    leaf = path[-1] if path else ""
    if layout == EMBEDDING:
        return ("vocab", "embed")
    if layout == NORM:
        return ("norm",)
    if layout in (COLUMN, ROW):
        out_axes = ("embed", "mlp") if layout == COLUMN else ("mlp", "embed")
        return (None,) * (ndim - 2) + out_axes if leaf == "kernel" else out_axes[1:]
    return (None,) * ndim


def _is_state_leaf(path: Sequence[str], shape: Sequence[int]) -> bool:
    return len(shape) == 0 or (bool(path) and path[-1] in STATE_LEAVES)


def unnamed_parameters(tree: Any) -> list[str]:
    """The "/"-joined paths of the parameters in `tree` (a parameter tree, a TrainState, an optax
    state; leaves with `.shape`) that no rule of `PARAMETER_RULES` names: every leaf except the
    bookkeeping ones (scalars, and leaves named in `STATE_LEAVES`). Empty for jaxdiff's networks;
    a layer with a name no rule knows shows up here."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = tuple(_key_name(k) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        if not _is_state_leaf(names, shape) and parameter_rule(names, shape) is None:
            found.append("/".join(names))
    return found


@dataclasses.dataclass(frozen=True)
class Rules:
    """How logical axes land on the mesh.

    logical: (logical axis, mesh axis) pairs; unlisted logical axes are replicated.
    fsdp: shard the largest remaining dimension of each parameter of at least
      `fsdp_min_size` elements over the `fsdp` axis (ZeRO-3); a dimension that the axis size
      does not divide is never split, so an odd-shaped parameter stays replicated.
    """

    logical: tuple[tuple[str, str], ...] = ()
    fsdp: bool = False
    fsdp_min_size: int = 1024


RULES = {
    "dp": Rules(),
    "fsdp": Rules(fsdp=True),
    "fsdp_tp": Rules(logical=(("mlp", TENSOR_AXIS), ("heads", TENSOR_AXIS)), fsdp=True),
}


def get_rules(name: str) -> Rules:
    try:
        return RULES[name]
    except KeyError:
        raise ShardingError(
            f"unknown sharding rules {name!r}; set --config.mesh.rules to one of {sorted(RULES)}") from None


def rule_axes(rules: Rules) -> set[str]:
    """The mesh axes a rule table splits parameters over."""
    return ({FSDP_AXIS} if rules.fsdp else set()) | {axis for _, axis in rules.logical}


def check_rules(mesh, rules: Rules | str) -> None:
    """Refuse a rule table that does not fit the mesh, with a one-line ShardingError naming the fix.

    The table must split parameters over exactly the mesh axes other than `data` that have more
    than one device: an axis it splits over must not have size 1 (`fsdp` rules with fsdp=1 would
    split nothing; `fsdp_tp` with tensor=1 no tensor parallelism), and an axis of size > 1 must be
    used (`dp` with fsdp=4 would replicate what the mesh asks to shard; tensor=2 under `fsdp`
    would have two devices repeat each other's work). A mesh of a single device accepts every
    table: nothing is split there, and a config written for a pod runs unchanged on one device.
    mesh: a `Mesh` or `AbstractMesh` with the axes (data, fsdp, tensor).
    """
    name = rules if isinstance(rules, str) else next((k for k, v in RULES.items() if v == rules), "custom")
    rules = get_rules(rules) if isinstance(rules, str) else rules
    sizes = {axis: int(mesh.shape.get(axis, 1)) for axis in MESH_AXES}
    if math.prod(sizes.values()) == 1:
        return
    described = ", ".join(f"{k}={v}" for k, v in sizes.items())
    used = rule_axes(rules)
    if FSDP_AXIS in used and sizes[FSDP_AXIS] == 1:
        raise ShardingError(
            f"rules {name!r} split parameters over the fsdp axis, but the mesh ({described}) has fsdp=1, so "
            f"nothing would be split; set --config.mesh.fsdp (e.g. --config.mesh.data=1 --config.mesh.fsdp=-1)"
            + (" or --config.mesh.rules=dp" if sizes[TENSOR_AXIS] == 1 else ""))
    if TENSOR_AXIS in used and sizes[TENSOR_AXIS] == 1:
        raise ShardingError(
            f"rules {name!r} split the mlp dimension over the tensor axis, but the mesh ({described}) has "
            f"tensor=1; set --config.mesh.tensor (e.g. 2) or --config.mesh.rules=fsdp")
    if FSDP_AXIS not in used and sizes[FSDP_AXIS] > 1:
        raise ShardingError(
            f"the mesh ({described}) has fsdp={sizes[FSDP_AXIS]} but rules {name!r} replicate every parameter "
            f"over it; set --config.mesh.rules=fsdp, or --config.mesh.fsdp=1 to put those devices on data")
    if TENSOR_AXIS not in used and sizes[TENSOR_AXIS] > 1:
        raise ShardingError(
            f"the mesh ({described}) has tensor={sizes[TENSOR_AXIS]} but rules {name!r} split nothing over it, so "
            f"its devices would repeat each other's work; set --config.mesh.rules=fsdp_tp or --config.mesh.tensor=1")


def param_spec(path: Sequence[str], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """The PartitionSpec of one parameter (or optimizer moment of that parameter's shape)."""
    spec: list = [None] * len(shape)
    table = dict(rules.logical)
    for i, (name, size) in enumerate(zip(logical_axes(path, shape), shape)):
        axis = table.get(name)
        if axis is not None and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0:
            spec[i] = axis
    n = mesh.shape[FSDP_AXIS]
    if rules.fsdp and n > 1 and math.prod(shape) >= rules.fsdp_min_size:
        free = [i for i, size in enumerate(shape) if spec[i] is None and size % n == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = FSDP_AXIS
    return P(*spec)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules | str) -> Any:
    """NamedShardings for every leaf of `tree` (params, a TrainState, an optax state, ...).

    Leaves named like linen parameters (kernel, bias, scale, embedding) get `param_spec`;
    optax moments (`mu`, `nu`, ...) end in the same path and have the same shape, so they land
    exactly like their parameter. Everything else (scalars, counts, keys) is replicated.
    tree: leaves with `.shape` (arrays or `jax.ShapeDtypeStruct`s).
    Raises ShardingError if the rule table does not fit the mesh (`check_rules`); warns when the
    table splits by logical axes and some parameters are named by no rule (`unnamed_parameters`).
    """
    check_rules(mesh, rules)
    rules = get_rules(rules) if isinstance(rules, str) else rules
    if rules.logical:
        unnamed = unnamed_parameters(tree)
        if unnamed:
            warnings.warn(JaxdiffWarning(f"{len(unnamed)} parameter(s) named by no sharding rule get no logical axes (not split "
                          f"over tensor): {', '.join(unnamed[:3])}{', ...' if len(unnamed) > 3 else ''}; add a "
                          f"rule for their layers to jaxdiff.sharding.PARAMETER_RULES"), stacklevel=2)

    def one(path, leaf):
        names = tuple(_key_name(k) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        if names and names[-1] in PARAM_LEAVES and shape:
            return NamedSharding(mesh, param_spec(names, shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `abstract` carrying `shardings` (a restore / lowering target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
