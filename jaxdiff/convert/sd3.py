"""diffusers SD3 transformer folders (`SD3Transformer2DModel`) <-> jaxdiff `MMDiT`, both ways.

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (an SD3 pipeline keeps it
in `transformer/`). Names (jaxdiff module path -> diffusers module path):

    patch_embed                       pos_embed.proj
    pos_embed/embedding [M*M, D]      pos_embed.pos_embed [1, M*M, D]      (POSITIONS layout)
    time_embed/dense_{0,1}            time_text_embed.timestep_embedder.linear_{1,2}
    pooled_embed/dense_{0,1}          time_text_embed.text_embedder.linear_{1,2}
    context_embed                     context_embedder
    block_{i}/adaln, context_adaln    transformer_blocks.{i}.norm1.linear, .norm1_context.linear
    block_{i}/attn, attn2             transformer_blocks.{i}.attn, .attn2
      query key value proj_out          to_q to_k to_v to_out.0
      context_query context_key         add_q_proj add_k_proj
      context_value context_out         add_v_proj to_add_out
      norm_q norm_k                     norm_q norm_k
      norm_context_q norm_context_k     norm_added_q norm_added_k
    block_{i}/ff, context_ff          transformer_blocks.{i}.ff, .ff_context
      proj_in proj_out                  net.0.proj net.2
    final_adaln                       norm_out.linear
    proj_out                          proj_out

    module, params = load(folder)         # -> (MMDiT, float32 numpy tree)
    save(folder, module, params)          # -> a folder SD3Transformer2DModel.from_pretrained reads
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
from jaxdiff.models.mmdit import QK_NORMS, MMDiT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "SD3Transformer2DModel"

# the stored position table has a leading batch axis of 1
POSITIONS = names.Layout("position table", lambda w: w[0], lambda e: e[None])

_ATTN = names.Rules([
    ("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_out", "to_out.0"),
    (r"context_(query|key|value)", lambda m: f"add_{m[0]}_proj"), ("context_out", "to_add_out"),
    (r"norm_([qk])", r"norm_\1"), (r"norm_context_([qk])", r"norm_added_\1"),
])
_FF = names.Rules([("proj_in", "net.0.proj"), ("proj_out", "net.2")])
_NAMES = names.Rules([
    ("patch_embed", "pos_embed.proj"), ("pos_embed", "pos_embed"),
    (r"time_embed/dense_(\d)", lambda i: f"time_text_embed.timestep_embedder.linear_{int(i) + 1}"),
    (r"pooled_embed/dense_(\d)", lambda i: f"time_text_embed.text_embedder.linear_{int(i) + 1}"),
    ("context_embed", "context_embedder"),
    (r"block_(\d+)/adaln", r"transformer_blocks.\1.norm1.linear"),
    (r"block_(\d+)/context_adaln", r"transformer_blocks.\1.norm1_context.linear"),
    (r"block_(\d+)/(attn2?)/(\w+)", lambda i, a, m: f"transformer_blocks.{i}.{a}.{_ATTN(m)}"),
    (r"block_(\d+)/(ff|context_ff)/(\w+)",
     lambda i, f, m: f"transformer_blocks.{i}.{'ff' if f == 'ff' else 'ff_context'}.{_FF(m)}"),
    ("final_adaln", "norm_out.linear"), ("proj_out", "proj_out"),
])


def table(module: MMDiT) -> names.Table:
    """flax path <-> diffusers key <-> layout for every parameter of `module`."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **module.example_inputs()))["params"]
    return tuple(e._replace(torch="pos_embed.pos_embed", layout=POSITIONS)
                 if e.flax == ("pos_embed", "embedding") else e
                 for e in names.from_tree(shapes, _NAMES))


def params_from_torch(state_dict: Mapping[str, np.ndarray], module: MMDiT) -> dict:
    """diffusers SD3Transformer2DModel state dict -> the parameter tree of `module` (float32
    numpy). Raises CheckpointError naming missing / unexpected keys or mismatched shapes."""
    return names.to_flax(state_dict, table(module), what="diffusers SD3 transformer weights")


def params_to_torch(params: Mapping, module: MMDiT) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: {diffusers name: float32 numpy array}."""
    return names.to_torch(params, table(module), what="jaxdiff MMDiT parameters")


# ------------------------------------------------------------------------------------------
# configs

_DEFAULTS = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18,
             "attention_head_dim": 64, "num_attention_heads": 18, "joint_attention_dim": 4096,
             "caption_projection_dim": 1152, "pooled_projection_dim": 2048, "out_channels": 16,
             "pos_embed_max_size": 96, "dual_attention_layers": (), "qk_norm": None}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def module_from_config(config: Mapping[str, Any], dtype=jnp.float32, *,
                       attention_impl: str = "auto") -> MMDiT:
    """An `MMDiT` from a diffusers SD3Transformer2DModel `config.json` (as a dict).
    Raises CheckpointError naming an option jaxdiff does not implement."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise CheckpointError(f"config.json describes a {name}, not a diffusers {CLASS_NAME}")
    unknown = sorted(set(config) - set(_DEFAULTS) - _IGNORED)
    if unknown:
        raise CheckpointError(f"this SD3 transformer config has option(s) jaxdiff does not know: "
                              f"{', '.join(unknown)}")
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
    width = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    if int(c["caption_projection_dim"]) != width:
        raise CheckpointError(f"caption_projection_dim={c['caption_projection_dim']} differs from the "
                              f"transformer width {width} (heads x head dim); such a model cannot run")
    if c["qk_norm"] not in QK_NORMS:
        raise CheckpointError(f"this SD3 transformer config uses qk_norm={c['qk_norm']!r}; jaxdiff "
                              f"supports None and 'rms_norm'")
    if c["pos_embed_max_size"] is None:
        raise CheckpointError("this SD3 transformer config has no pos_embed_max_size; jaxdiff needs "
                              "the cropped position table of SD3")
    return MMDiT(sample_size=int(c["sample_size"]), patch_size=int(c["patch_size"]),
                 in_channels=int(c["in_channels"]),
                 out_channels=int(c["out_channels"] or c["in_channels"]),
                 num_layers=int(c["num_layers"]), num_heads=int(c["num_attention_heads"]),
                 head_dim=int(c["attention_head_dim"]), context_dim=int(c["joint_attention_dim"]),
                 pooled_dim=int(c["pooled_projection_dim"]),
                 pos_embed_max_size=int(c["pos_embed_max_size"]),
                 dual_attention_layers=tuple(int(i) for i in c["dual_attention_layers"] or ()),
                 qk_norm=c["qk_norm"], dtype=dtype, attention_impl=attention_impl)


def config_to_diffusers(module: MMDiT) -> dict[str, Any]:
    """The diffusers SD3Transformer2DModel `config.json` (as a dict) of `module`."""
    return {"_class_name": CLASS_NAME, "sample_size": module.sample_size,
            "patch_size": module.patch_size, "in_channels": module.in_channels,
            "num_layers": module.num_layers, "attention_head_dim": module.head_dim,
            "num_attention_heads": module.num_heads, "joint_attention_dim": module.context_dim,
            "caption_projection_dim": module.width, "pooled_projection_dim": module.pooled_dim,
            "out_channels": module.out_channels or module.in_channels,
            "pos_embed_max_size": module.pos_embed_max_size,
            "dual_attention_layers": list(module.dual_attention_layers), "qk_norm": module.qk_norm}


# ------------------------------------------------------------------------------------------
# folders


def load(folder: str | os.PathLike, dtype=jnp.float32, *, variant: str | None = None,
         attention_impl: str = "auto") -> tuple[MMDiT, dict]:
    """Read a diffusers SD3 transformer folder -> (module, params); params are float32 whatever
    the file holds. Missing files, pickles and malformed files are one-line CheckpointErrors."""
    folder = os.fspath(folder)
    module = tensors.read_config(
        folder, lambda c: module_from_config(c, dtype, attention_impl=attention_impl),
        what=f"a diffusers SD3 transformer folder ({CONFIG_NAME} and {WEIGHTS_NAME})",
        subfolder="transformer")
    weights = tensors.read_weights_folder(folder, "diffusion_pytorch_model", variant=variant)
    return module, params_from_torch(weights, module)


def save(folder: str | os.PathLike, module: MMDiT, params: Mapping) -> None:
    """Write `module` and `params` as a diffusers SD3 transformer folder (config.json +
    safetensors)."""
    folder = os.fspath(folder)
    state = params_to_torch(params, module)
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(state, os.path.join(folder, WEIGHTS_NAME), {"format": "pt"})
    tensors.write_json(config_to_diffusers(module), os.path.join(folder, CONFIG_NAME))
