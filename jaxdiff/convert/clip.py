"""transformers `CLIPTextModel` / `CLIPTextModelWithProjection` folders (config.json +
model.safetensors) <-> `CLIPTextEncoder`.

A Stable Diffusion pipeline folder keeps its text encoder in `text_encoder/`, in exactly this
format; SDXL adds `text_encoder_2/`, a `CLIPTextModelWithProjection` (architectures in its
config.json, `projection_dim`), whose bias-free head is `text_projection.weight` [P, D] in the
file (never prefixed) and `text_projection/kernel` [D, P] in jaxdiff. Public API:

    module_from_config(config: dict, dtype=jnp.float32) -> CLIPTextEncoder
    config_to_transformers(module) -> dict                     # a CLIPTextConfig config.json
    params_from_torch(state_dict: Mapping[str, np.ndarray], module) -> params
    params_to_torch(params, module) -> dict[str, np.ndarray]   # transformers names and layouts
    load(folder, dtype=jnp.float32, *, variant=None) -> (module, params)
    save(folder, module, params) -> None

`params` is the nested dict of float32 numpy arrays that goes into
`module.apply({"params": params}, input_ids)`.

Names (the `NAMES` table below; jaxdiff/models/text.py has the module side):
`embeddings.{token,position}_embedding` -> `{token,position}_embedding`,
`encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}` ->
`layer_{i}/{norm_1, attn/{query,key,value,out}, norm_2, mlp/fc1, mlp/fc2}`, `final_layer_norm`
-> `final_norm`. Linear weights are transposed ([out, in] -> [in, out]), LayerNorm `weight`
becomes `scale`, embedding tables are kept as they are.

Checkpoints written by transformers 4.x (every released Stable Diffusion folder) prefix each name
with `text_model.`; transformers 5 writes them without. Both are read; `save` writes the prefixed
form, which both versions load. The `text_model.embeddings.position_ids` buffer some files carry
is ignored.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import names, tensors
from jaxdiff.errors import CheckpointError
from jaxdiff.models.text import ACTIVATIONS, CLIPTextEncoder

PREFIX = "text_model."
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_IGNORED = ("embeddings.position_ids",)

PROJECTION = "text_projection"
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")

# CLIPTextConfig's defaults (transformers), used for keys a config.json leaves out.
_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, eos_token_id=49407, projection_dim=512)
# The eos id configs carried before transformers fixed it; it selects the argmax pooling rule.
_LEGACY_EOS = 2


# ------------------------------------------------------------------------------------------
# configs


def module_from_config(config: Mapping, dtype=jnp.float32) -> CLIPTextEncoder:
    """A `CLIPTextEncoder` from a transformers `CLIPTextConfig` dict (a text_encoder/config.json).

    `eos_token_id == 2` (the legacy value in every Stable Diffusion config) selects the
    argmax-of-ids pooling rule, like transformers; any other id pools at its first occurrence.
    Raises CheckpointError naming options jaxdiff does not implement.
    """
    model_type = config.get("model_type", "clip_text_model")
    if model_type == "clip":
        raise CheckpointError(
            "config.json describes a whole CLIP model (text and vision); jaxdiff loads only the "
            "text tower: use a CLIPTextModel folder such as a pipeline's text_encoder/")
    if model_type != "clip_text_model":
        raise CheckpointError(f"config.json has model_type={model_type!r}; expected "
                              "'clip_text_model' (a transformers CLIPTextModel)")
    archs = list(config.get("architectures") or [])
    other = [a for a in archs if a not in ARCHITECTURES]
    if other:
        raise CheckpointError(
            f"config.json architecture {other[0]!r} is not supported: jaxdiff's CLIPTextEncoder "
            f"reads {' and '.join(ARCHITECTURES)}")
    projected = "CLIPTextModelWithProjection" in archs
    c = {k: (config.get(k) if config.get(k) is not None else v) for k, v in _DEFAULTS.items()}
    if c["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(f"config.json hidden_act={c['hidden_act']!r} is not supported; "
                              f"jaxdiff implements {ACTIVATIONS}")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise CheckpointError(f"config.json hidden_size={c['hidden_size']} is not divisible by "
                              f"num_attention_heads={c['num_attention_heads']}")
    eos = c["eos_token_id"]
    if isinstance(eos, (list, tuple)):
        raise CheckpointError(f"config.json eos_token_id={eos!r}: a list of EOS ids is not "
                              "supported; give one id")
    return CLIPTextEncoder(
        vocab_size=int(c["vocab_size"]),
        max_position_embeddings=int(c["max_position_embeddings"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        hidden_act=str(c["hidden_act"]),
        layer_norm_eps=float(c["layer_norm_eps"]),
        eos_token_id=None if eos == _LEGACY_EOS else int(eos),
        projection_dim=int(c["projection_dim"]) if projected else None,
        dtype=dtype,
    )


def config_to_transformers(module: CLIPTextEncoder) -> dict:
    """The `CLIPTextConfig` dict (config.json) transformers builds the same network from.

    The argmax pooling rule (`eos_token_id=None`) is written as the legacy `eos_token_id: 2`
    with Stable Diffusion's `bos_token_id: 0, pad_token_id: 1`, which transformers reads as
    that rule.
    """
    config = {
        "architectures": [ARCHITECTURES[module.projection_dim is not None]],
        "model_type": "clip_text_model",
        "vocab_size": module.vocab_size,
        "max_position_embeddings": module.max_position_embeddings,
        "hidden_size": module.hidden_size,
        "intermediate_size": module.intermediate_size,
        "num_hidden_layers": module.num_layers,
        "num_attention_heads": module.num_heads,
        "hidden_act": module.hidden_act,
        "layer_norm_eps": module.layer_norm_eps,
        "attention_dropout": 0.0,
    }
    if module.projection_dim is not None:
        config["projection_dim"] = module.projection_dim
    if module.eos_token_id is None:
        config.update(bos_token_id=0, pad_token_id=1, eos_token_id=_LEGACY_EOS)
    else:
        config["eos_token_id"] = module.eos_token_id
    return config


# ------------------------------------------------------------------------------------------
# the name table (flax module path, "/"-joined -> transformers module name, unprefixed)

_LAYER = names.Rules([
    ("norm_1", "layer_norm1"), ("norm_2", "layer_norm2"),
    ("attn/query", "self_attn.q_proj"), ("attn/key", "self_attn.k_proj"),
    ("attn/value", "self_attn.v_proj"), ("attn/out", "self_attn.out_proj"),
    (r"mlp/(fc1|fc2)", r"mlp.\1"),
])
# One encoder layer's names, shared with the image tower (convert/clip_vision.py).
LAYER = _LAYER

NAMES = names.Rules([
    ("token_embedding", "embeddings.token_embedding"),
    ("position_embedding", "embeddings.position_embedding"),
    (r"layer_(\d+)/(.+)", lambda i, m: f"encoder.layers.{i}.{_LAYER(m)}"),
    ("final_norm", "final_layer_norm"),
])


def table(module: CLIPTextEncoder, prefix: str = PREFIX, projection: str = PROJECTION) -> names.Table:
    """flax path <-> transformers key (`prefix` + name; the projection head is `projection`,
    unprefixed) <-> layout for every parameter."""
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    return names.from_tree(shapes, lambda path: projection if path == PROJECTION else prefix + NAMES(path))


# ------------------------------------------------------------------------------------------
# state dicts


def params_from_torch(state_dict: Mapping[str, np.ndarray], module: CLIPTextEncoder) -> dict:
    """transformers CLIPTextModel state dict (numpy) -> `module`'s params (float32 numpy tree).

    Accepts names with or without the `text_model.` prefix (one convention per file) and ignores
    the `position_ids` buffer. Raises CheckpointError naming missing or unexpected keys and
    shape mismatches, in the file's own names and torch layouts.
    """
    prefix = PREFIX if any(k.startswith(PREFIX) for k in state_dict) else ""
    sd = {k: v for k, v in state_dict.items()
          if not (k.startswith(prefix) and k[len(prefix):] in _IGNORED)}
    return names.to_flax(sd, table(module, prefix), what="CLIP text encoder checkpoint")


def params_to_torch(params: Mapping, module: CLIPTextEncoder) -> dict[str, np.ndarray]:
    """`module`'s params -> transformers state dict (`text_model.`-prefixed, float32 numpy)."""
    return names.to_torch(jax.device_get(params), table(module), what="CLIP text encoder params")


# ------------------------------------------------------------------------------------------
# folders


def load(folder: str, dtype=jnp.float32, *, variant: str | None = None) -> tuple[CLIPTextEncoder, dict]:
    """(module, params) from a transformers CLIPTextModel(WithProjection) folder, e.g.
    `<pipeline>/text_encoder` or `text_encoder_2`; variant: e.g. "fp16" for `model.fp16.safetensors`."""
    folder = os.fspath(folder)
    module = tensors.read_config(folder, lambda c: module_from_config(c, dtype=dtype),
                                 what="a transformers CLIPTextModel folder",
                                 subfolder="text_encoder")
    return module, params_from_torch(tensors.read_weights_folder(folder, "model", variant=variant), module)


def save(folder: str, module: CLIPTextEncoder, params: Mapping) -> None:
    """Write `config.json` + `model.safetensors` that transformers' `CLIPTextModel` loads."""
    folder = os.fspath(folder)
    state_dict = params_to_torch(params, module)
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(state_dict, os.path.join(folder, WEIGHTS_NAME),
                              metadata={"format": "pt"})
    tensors.write_json(config_to_transformers(module), os.path.join(folder, CONFIG_NAME))
