"""diffusers Flux transformer folders (`FluxTransformer2DModel`) <-> jaxdiff `FluxTransformer`.

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or its shards and their
index; a pipeline keeps it in `transformer/`). Names (jaxdiff module path -> diffusers module):

    x_embed, context_embed, proj_out       x_embedder, context_embedder, proj_out
    time_embed/dense_{0,1}                 time_text_embed.timestep_embedder.linear_{1,2}
    guidance_embed/dense_{0,1}             time_text_embed.guidance_embedder.linear_{1,2}
    pooled_embed/dense_{0,1}               time_text_embed.text_embedder.linear_{1,2}
    out_mod                                norm_out.linear
    double_{i}                             transformer_blocks.{i}
      img_mod, txt_mod                       norm1.linear, norm1_context.linear
      img_ff/proj_{in,out}                   ff.net.0.proj, ff.net.2
      txt_ff/proj_{in,out}                   ff_context.net.0.proj, ff_context.net.2
      attn/query key value proj_out          attn.to_q to_k to_v to_out.0
      attn/query_norm key_norm               attn.norm_q norm_k
      attn/txt_query txt_key txt_value       attn.add_q_proj add_k_proj add_v_proj
      attn/txt_proj_out                      attn.to_add_out
      attn/txt_query_norm txt_key_norm       attn.norm_added_q norm_added_k
    single_{i}                             single_transformer_blocks.{i}
      mod, mlp_in, proj_out                  norm.linear, proj_mlp, proj_out
      attn/query key value (+ _norm)         attn.to_q to_k to_v norm_q norm_k

Both modulation layers keep diffusers' chunk order (shift, scale, gate ...; `norm_out`: scale,
shift), so every tensor maps one to one with the usual leaf layouts (`names.from_tree`).

    module, params = load(folder)         # -> (FluxTransformer, float32 numpy tree)
    save(folder, module, params)          # -> a folder FluxTransformer2DModel.from_pretrained reads
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
from jaxdiff.models.flux import FluxTransformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "FluxTransformer2DModel"

_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_out": "to_out.0",
         "query_norm": "norm_q", "key_norm": "norm_k",
         "txt_query": "add_q_proj", "txt_key": "add_k_proj", "txt_value": "add_v_proj",
         "txt_proj_out": "to_add_out", "txt_query_norm": "norm_added_q", "txt_key_norm": "norm_added_k"}
_FF = {"proj_in": "net.0.proj", "proj_out": "net.2"}
_EMBED = {"time": "timestep_embedder", "guidance": "guidance_embedder", "pooled": "text_embedder"}

NAMES = names.Rules([
    ("x_embed", "x_embedder"),
    ("context_embed", "context_embedder"),
    ("proj_out", "proj_out"),
    ("out_mod", "norm_out.linear"),
    (r"(time|guidance|pooled)_embed/dense_(\d)",
     lambda kind, i: f"time_text_embed.{_EMBED[kind]}.linear_{int(i) + 1}"),
    (r"double_(\d+)/img_mod", r"transformer_blocks.\1.norm1.linear"),
    (r"double_(\d+)/txt_mod", r"transformer_blocks.\1.norm1_context.linear"),
    (r"double_(\d+)/(img|txt)_ff/(proj_in|proj_out)",
     lambda i, s, m: f"transformer_blocks.{i}.{'ff' if s == 'img' else 'ff_context'}.{_FF[m]}"),
    (r"double_(\d+)/attn/(\w+)", lambda i, m: f"transformer_blocks.{i}.attn.{_ATTN[m]}"),
    (r"single_(\d+)/mod", r"single_transformer_blocks.\1.norm.linear"),
    (r"single_(\d+)/mlp_in", r"single_transformer_blocks.\1.proj_mlp"),
    (r"single_(\d+)/proj_out", r"single_transformer_blocks.\1.proj_out"),
    (r"single_(\d+)/attn/((?:query|key|value)(?:_norm)?)",
     lambda i, m: f"single_transformer_blocks.{i}.attn.{_ATTN[m]}"),
])


def table(module: FluxTransformer) -> names.Table:
    """flax path <-> diffusers key <-> layout for every parameter of `module`."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **module.example_inputs()))["params"]
    return names.from_tree(shapes, NAMES)


def params_from_torch(state_dict: Mapping[str, np.ndarray], module: FluxTransformer) -> dict:
    """diffusers FluxTransformer2DModel state dict -> the parameter tree of `module` (float32
    numpy). Raises CheckpointError naming missing / unexpected keys or mismatched shapes."""
    return names.to_flax(state_dict, table(module), what="diffusers Flux transformer weights")


def params_to_torch(params: Mapping, module: FluxTransformer) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: {diffusers name: float32 numpy array}."""
    return names.to_torch(params, table(module), what="jaxdiff Flux transformer parameters")


def module_from_config(config: Mapping[str, Any], dtype=jnp.float32,
                       attention_impl: str = "auto") -> FluxTransformer:
    """A `FluxTransformer` from a diffusers FluxTransformer2DModel `config.json` (as a dict).
    Raises CheckpointError for another class."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise CheckpointError(f"config.json describes a {name}, not a diffusers {CLASS_NAME}")
    out = config.get("out_channels")
    return FluxTransformer(
        in_channels=int(config.get("in_channels", 64)),
        out_channels=None if out is None else int(out),
        patch_size=int(config.get("patch_size", 1)),
        num_layers=int(config.get("num_layers", 19)),
        num_single_layers=int(config.get("num_single_layers", 38)),
        num_heads=int(config.get("num_attention_heads", 24)),
        head_dim=int(config.get("attention_head_dim", 128)),
        context_dim=int(config.get("joint_attention_dim", 4096)),
        pooled_dim=int(config.get("pooled_projection_dim", 768)),
        guidance_embeds=bool(config.get("guidance_embeds", False)),
        axes_dims_rope=tuple(int(d) for d in config.get("axes_dims_rope", (16, 56, 56))),
        dtype=dtype, attention_impl=attention_impl)


def config_to_diffusers(module: FluxTransformer) -> dict[str, Any]:
    """The diffusers FluxTransformer2DModel `config.json` (as a dict) of `module`."""
    return {"_class_name": CLASS_NAME, "patch_size": module.patch_size,
            "in_channels": module.in_channels, "out_channels": module.out_channels,
            "num_layers": module.num_layers, "num_single_layers": module.num_single_layers,
            "attention_head_dim": module.head_dim, "num_attention_heads": module.num_heads,
            "joint_attention_dim": module.context_dim, "pooled_projection_dim": module.pooled_dim,
            "guidance_embeds": module.guidance_embeds,
            "axes_dims_rope": list(module.axes_dims_rope)}


def load(folder: str | os.PathLike, dtype=jnp.float32, *, variant: str | None = None,
         attention_impl: str = "auto") -> tuple[FluxTransformer, dict]:
    """Read a diffusers Flux transformer folder -> (module, params); params are float32 whatever
    the file holds. Missing files, pickles and malformed files are one-line CheckpointErrors."""
    folder = os.fspath(folder)
    module = tensors.read_config(
        folder, lambda c: module_from_config(c, dtype, attention_impl),
        what=f"a diffusers Flux transformer folder ({CONFIG_NAME} and {WEIGHTS_NAME})",
        subfolder="transformer")
    weights = tensors.read_weights_folder(folder, "diffusion_pytorch_model", variant=variant)
    return module, params_from_torch(weights, module)


def save(folder: str | os.PathLike, module: FluxTransformer, params: Mapping) -> None:
    """Write `module` and `params` as a diffusers Flux transformer folder (config + safetensors)."""
    folder = os.fspath(folder)
    state = params_to_torch(params, module)
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(state, os.path.join(folder, WEIGHTS_NAME), {"format": "pt"})
    tensors.write_json(config_to_diffusers(module), os.path.join(folder, CONFIG_NAME))
