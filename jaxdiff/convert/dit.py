"""diffusers DiT folders (`DiTTransformer2DModel`) <-> jaxdiff `DiT`, both ways.

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (a DiT pipeline keeps it
in `transformer/`). Names (jaxdiff module path -> diffusers module path):

    patch_embed                         pos_embed.proj
    time_embed/dense_{0,1}              transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2}
    class_embed                         transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table
    block_{i}/adaln                     transformer_blocks.{i}.norm1.linear
    block_{i}/attn/query key value      transformer_blocks.{i}.attn1.to_q to_k to_v
    block_{i}/attn/proj_out             transformer_blocks.{i}.attn1.to_out.0
    block_{i}/mlp/proj_in, proj_out     transformer_blocks.{i}.ff.net.0.proj, ff.net.2
    final/adaln, final/proj_out         proj_out_1, proj_out_2

diffusers gives every block its own copy of the timestep and class embedders (the paper's
network has one of each; converted checkpoints hold identical copies), and the final layer
reads block 0's. jaxdiff keeps one: import reads block 0's and refuses a checkpoint whose
copies differ; export writes the same tensors into every block. Both class tables have
num_classes + 1 rows (the last one is the null class).

    module, params = load(folder)         # -> (DiT, float32 numpy tree)
    save(folder, module, params)          # -> a folder DiTTransformer2DModel.from_pretrained reads
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import names, tensors
from jaxdiff.errors import CheckpointError
from jaxdiff.models.dit import DiT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "DiTTransformer2DModel"

# The shared embedders live in block 0 of the diffusers tree; `_EMBEDDERS` are their module names.
_EMB = "transformer_blocks.{i}.norm1.emb."
_EMBEDDERS = ("timestep_embedder.linear_1", "timestep_embedder.linear_2", "class_embedder.embedding_table")

NAMES = names.Rules([
    ("patch_embed", "pos_embed.proj"),
    (r"time_embed/dense_(\d)", lambda i: _EMB.format(i=0) + f"timestep_embedder.linear_{int(i) + 1}"),
    ("class_embed", _EMB.format(i=0) + "class_embedder.embedding_table"),
    (r"block_(\d+)/adaln", r"transformer_blocks.\1.norm1.linear"),
    (r"block_(\d+)/attn/(query|key|value)",
     lambda i, m: f"transformer_blocks.{i}.attn1.to_{m[0]}"),
    (r"block_(\d+)/attn/proj_out", r"transformer_blocks.\1.attn1.to_out.0"),
    (r"block_(\d+)/mlp/proj_in", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"block_(\d+)/mlp/proj_out", r"transformer_blocks.\1.ff.net.2"),
    ("final/adaln", "proj_out_1"),
    ("final/proj_out", "proj_out_2"),
])


def table(module: DiT, in_channels: int | None = None) -> names.Table:
    """flax path <-> diffusers key <-> layout for every parameter of `module` (block 0's copy of
    the shared embedders; see `params_from_torch`)."""
    inputs = module.example_inputs(in_channels=in_channels)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))["params"]
    return names.from_tree(shapes, NAMES)


def _copies(module: DiT) -> list[tuple[str, str]]:
    """(block 0's key, block i's key) of every embedder copy in blocks 1..depth-1."""
    out = []
    for i in range(1, module.depth):
        for m in _EMBEDDERS:
            if m.startswith("class") and module.num_classes is None:
                continue
            for leaf in (("weight",) if m.startswith("class") else ("weight", "bias")):
                out.append((f"{_EMB.format(i=0)}{m}.{leaf}", f"{_EMB.format(i=i)}{m}.{leaf}"))
    return out


def _in_channels(module: DiT, state_dict: Mapping) -> int | None:
    w = state_dict.get("pos_embed.proj.weight")           # [D, C, p, p]
    return module.in_channels or (np.shape(w)[1] if w is not None else None)


def params_from_torch(state_dict: Mapping[str, np.ndarray], module: DiT) -> dict:
    """diffusers DiTTransformer2DModel state dict -> the parameter tree of `module` (float32 numpy).

    Raises CheckpointError naming missing / unexpected keys, mismatched shapes, or blocks whose
    embedder copies differ from block 0's (a network jaxdiff's DiT cannot represent).
    """
    state_dict = dict(state_dict)
    for first, other in _copies(module):
        if other in state_dict and first in state_dict:
            if not np.array_equal(np.asarray(state_dict[first]), np.asarray(state_dict[other])):
                raise CheckpointError(f"diffusers DiT weights: {other} differs from {first}; jaxdiff's DiT shares one "
                                      "timestep / class embedder between all blocks (as the paper's network does)")
            del state_dict[other]
    return names.to_flax(state_dict, table(module, _in_channels(module, state_dict)), what="diffusers DiT weights")


def params_to_torch(params: Mapping, module: DiT) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: {diffusers name: float32 numpy array}, the shared
    embedders copied into every block."""
    if set(params) == {"params"}:
        params = params["params"]
    kernel = params.get("patch_embed", {}).get("kernel")  # [p, p, C, D]
    in_channels = module.in_channels or (np.shape(kernel)[2] if kernel is not None else None)
    state = names.to_torch(params, table(module, in_channels), what="jaxdiff DiT parameters")
    for first, other in _copies(module):
        state[other] = state[first].copy()
    return state


# ------------------------------------------------------------------------------------------
# configs

_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "dropout",
            "norm_num_groups"}
# (option, values jaxdiff supports, diffusers' default)
_FIXED = [
    ("attention_bias", (True,), True),
    ("activation_fn", ("gelu-approximate",), "gelu-approximate"),
    ("upcast_attention", (False,), False),
    ("norm_type", ("ada_norm_zero",), "ada_norm_zero"),
    ("norm_elementwise_affine", (False,), False),
]
_USED = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
         "sample_size", "patch_size", "num_embeds_ada_norm", "norm_eps"}


def module_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> DiT:
    """A `DiT` from a diffusers DiTTransformer2DModel `config.json` (as a dict).
    Raises CheckpointError naming an option jaxdiff does not implement."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise CheckpointError(f"config.json describes a {name}, not a diffusers {CLASS_NAME}")
    for key, allowed, default in _FIXED:
        value = config.get(key, default)
        if value not in allowed:
            raise CheckpointError(f"this DiT config uses {key}={value!r}, which jaxdiff's DiT does not support "
                                  f"(supported: {', '.join(map(repr, allowed))})")
    for key, value in config.items():
        if key not in _USED | _IGNORED and key not in {k for k, _, _ in _FIXED}:
            raise CheckpointError(f"this DiT config uses the option {key}={value!r}, which jaxdiff's DiT does not support")
    heads, head_dim = int(config.get("num_attention_heads", 16)), int(config.get("attention_head_dim", 72))
    in_channels = int(config.get("in_channels", 4))
    out = config.get("out_channels")
    out = in_channels if out is None else int(out)
    if out not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"this DiT config has out_channels={out} with in_channels={in_channels}; jaxdiff's "
                              "DiT outputs in_channels (or twice that, learned sigma)")
    classes = config.get("num_embeds_ada_norm", 1000)
    return DiT(patch_size=int(config.get("patch_size", 2)), hidden_size=heads * head_dim,
               depth=int(config.get("num_layers", 28)), num_heads=heads,
               num_classes=None if classes is None else int(classes), learn_sigma=out == 2 * in_channels,
               in_channels=in_channels, sample_size=int(config.get("sample_size", 32)),
               norm_eps=float(config.get("norm_eps", 1e-5)), dtype=dtype)


def config_to_diffusers(module: DiT, *, in_channels: int | None = None) -> dict[str, Any]:
    """The diffusers DiTTransformer2DModel `config.json` (as a dict) of `module`."""
    if module.num_classes is None:
        raise CheckpointError("an unconditional DiT has no diffusers DiTTransformer2DModel form "
                              "(diffusers' DiT always has a class embedder); train with classes")
    c = in_channels or module.in_channels or 4
    return {"_class_name": CLASS_NAME, "num_attention_heads": module.num_heads,
            "attention_head_dim": module.hidden_size // module.num_heads, "in_channels": c,
            "out_channels": module.out_channels(c), "num_layers": module.depth, "dropout": 0.0,
            "norm_num_groups": 32, "attention_bias": True, "sample_size": module.sample_size or 32,
            "patch_size": module.patch_size, "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": module.num_classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "norm_eps": module.norm_eps}


# ------------------------------------------------------------------------------------------
# folders


def load(folder: str | os.PathLike, dtype=jnp.float32, *, variant: str | None = None) -> tuple[DiT, dict]:
    """Read a diffusers DiT folder -> (module, params); params are float32 whatever the file holds.
    Missing files, pickles and malformed files are one-line CheckpointErrors."""
    folder = os.fspath(folder)
    module = tensors.read_config(folder, lambda c: module_from_config(c, dtype),
                                 what=f"a diffusers DiT folder ({CONFIG_NAME} and {WEIGHTS_NAME})",
                                 subfolder="transformer")
    weights = tensors.read_weights_folder(folder, "diffusion_pytorch_model", variant=variant)
    return module, params_from_torch(weights, module)


def save(folder: str | os.PathLike, module: DiT, params: Mapping) -> None:
    """Write `module` and `params` as a diffusers DiT folder (config.json + safetensors)."""
    folder = os.fspath(folder)
    state = params_to_torch(params, module)
    config = config_to_diffusers(module, in_channels=int(state["pos_embed.proj.weight"].shape[1]))
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(state, os.path.join(folder, WEIGHTS_NAME), {"format": "pt"})
    tensors.write_json(config, os.path.join(folder, CONFIG_NAME))
