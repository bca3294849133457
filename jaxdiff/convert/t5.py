"""transformers `T5EncoderModel` folders (config.json + model.safetensors, maybe sharded) <->
`T5Encoder`.

SD3 keeps its T5 in `text_encoder_3/`, Flux in `text_encoder_2/`, both in this format; the
released ones are sharded (`model-00001-of-00002.safetensors` ... with
`model.safetensors.index.json`), which `tensors.read_weights_folder` reads, refusing an index
that names a file outside the folder. Public API:

    module_from_config(config: dict, dtype=jnp.float32) -> T5Encoder
    config_to_transformers(module) -> dict                     # a T5Config config.json
    params_from_torch(state_dict: Mapping[str, np.ndarray], module) -> params
    params_to_torch(params, module) -> dict[str, np.ndarray]   # T5EncoderModel.state_dict() names
    load(folder, dtype=jnp.float32, *, variant=None) -> (module, params)
    save(folder, module, params) -> None

`params` is the nested dict of float32 numpy arrays that goes into
`module.apply({"params": params}, input_ids, attention_mask)`; bf16 / fp16 files are widened.

Names (the `NAMES` table below; jaxdiff/models/t5.py has the module side): `shared` ->
`token_embedding`, `encoder.block.0.layer.0.SelfAttention.relative_attention_bias` ->
`relative_attention_bias`, `encoder.block.{i}.layer.0.{layer_norm, SelfAttention.{q,k,v,o}}` ->
`layer_{i}/{norm_1, attn/{query,key,value,out}}`, `encoder.block.{i}.layer.1.{layer_norm,
DenseReluDense.{wi_0,wi_1,wi,wo}}` -> `layer_{i}/{norm_2, mlp/{wi_0,wi_1,wi,wo}}`,
`encoder.final_layer_norm` -> `final_norm`. Linear weights are transposed ([out, in] ->
[in, out]); RMSNorm `weight` becomes `scale`; embedding tables are kept as they are.

The token embedding is one tensor under two names: transformers ties `encoder.embed_tokens`
to `shared`. `state_dict()` lists both, files usually only `shared.weight`; either is read
(`shared` when both are there, as transformers does), `params_to_torch` gives both like
`state_dict()`, and `save` writes `shared.weight` alone, as `save_pretrained` does. The weights
of a whole T5 (`decoder.*`, `lm_head.weight`) are skipped, as `T5EncoderModel` skips them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import names, tensors
from jaxdiff.errors import CheckpointError
from jaxdiff.models.t5 import FEED_FORWARD, T5Encoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHARED, TIED = "shared.weight", "encoder.embed_tokens.weight"
# Parts of a whole encoder-decoder T5 that the encoder does not use.
_SKIPPED_PREFIXES = ("decoder.", "lm_head.")

ARCHITECTURES = ("T5EncoderModel", "T5Model", "T5ForConditionalGeneration")
# The pipeline parts that hold a T5 encoder (SD3, Flux), named in a missing-config message.
SUBFOLDERS = ("text_encoder_3", "text_encoder_2")

# T5Config's defaults (transformers), used for keys a config.json leaves out.
_DEFAULTS = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
             "num_heads": 8, "relative_attention_num_buckets": 32,
             "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
             "feed_forward_proj": "relu"}


# ------------------------------------------------------------------------------------------
# configs


def module_from_config(config: Mapping, dtype=jnp.float32) -> T5Encoder:
    """A `T5Encoder` from a transformers `T5Config` dict (a text_encoder_3/config.json).

    Raises CheckpointError naming what jaxdiff does not implement (another model type, e.g.
    UMT5 with its per-layer position biases; a decoder config; an unknown feed-forward).
    """
    model_type = config.get("model_type", "t5")
    if model_type != "t5":
        raise CheckpointError(f"config.json has model_type={model_type!r}; expected 't5' (a "
                              "transformers T5EncoderModel)")
    archs = list(config.get("architectures") or [])
    other = [a for a in archs if a not in ARCHITECTURES]
    if other:
        raise CheckpointError(f"config.json architecture {other[0]!r} is not supported: jaxdiff's "
                              f"T5Encoder reads the encoder of {', '.join(ARCHITECTURES)}")
    if config.get("is_decoder"):
        raise CheckpointError("config.json has is_decoder=true; jaxdiff's T5Encoder is the "
                              "bidirectional encoder only")
    c = {k: (config.get(k) if config.get(k) is not None else v) for k, v in _DEFAULTS.items()}
    if c["feed_forward_proj"] not in FEED_FORWARD:
        raise CheckpointError(f"config.json feed_forward_proj={c['feed_forward_proj']!r} is not "
                              f"supported; jaxdiff implements {FEED_FORWARD}")
    return T5Encoder(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["d_model"]),
        head_dim=int(c["d_kv"]),
        intermediate_size=int(c["d_ff"]),
        num_layers=int(c["num_layers"]),
        num_heads=int(c["num_heads"]),
        relative_attention_num_buckets=int(c["relative_attention_num_buckets"]),
        relative_attention_max_distance=int(c["relative_attention_max_distance"]),
        feed_forward_proj=str(c["feed_forward_proj"]),
        layer_norm_eps=float(c["layer_norm_epsilon"]),
        dtype=dtype,
    )


def config_to_transformers(module: T5Encoder) -> dict:
    """The `T5Config` dict (config.json) transformers builds the same `T5EncoderModel` from."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": module.vocab_size,
        "d_model": module.hidden_size,
        "d_kv": module.head_dim,
        "d_ff": module.intermediate_size,
        "num_layers": module.num_layers,
        "num_heads": module.num_heads,
        "relative_attention_num_buckets": module.relative_attention_num_buckets,
        "relative_attention_max_distance": module.relative_attention_max_distance,
        "feed_forward_proj": module.feed_forward_proj,
        "layer_norm_epsilon": module.layer_norm_eps,
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


# ------------------------------------------------------------------------------------------
# the name table (flax module path, "/"-joined -> transformers module name)

_LAYER = names.Rules([
    ("norm_1", "layer.0.layer_norm"),
    ("attn/query", "layer.0.SelfAttention.q"), ("attn/key", "layer.0.SelfAttention.k"),
    ("attn/value", "layer.0.SelfAttention.v"), ("attn/out", "layer.0.SelfAttention.o"),
    ("norm_2", "layer.1.layer_norm"),
    (r"mlp/(wi|wi_0|wi_1|wo)", r"layer.1.DenseReluDense.\1"),
])
NAMES = names.Rules([
    ("token_embedding", "shared"),
    ("relative_attention_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"),
    (r"layer_(\d+)/(.+)", lambda i, m: f"encoder.block.{i}.{_LAYER(m)}"),
    ("final_norm", "encoder.final_layer_norm"),
])


def table(module: T5Encoder) -> names.Table:
    """flax path <-> transformers key <-> layout for every parameter of `module`."""
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    return names.from_tree(shapes, NAMES)


# ------------------------------------------------------------------------------------------
# state dicts


def params_from_torch(state_dict: Mapping[str, np.ndarray], module: T5Encoder) -> dict:
    """transformers T5EncoderModel state dict (numpy) -> `module`'s params (float32 numpy tree).

    The token embedding is read from `shared.weight`, or from `encoder.embed_tokens.weight` when
    the file holds only that; decoder and LM-head weights are skipped. Raises CheckpointError
    naming missing or unexpected keys and shape mismatches, in the file's names and layouts.
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(_SKIPPED_PREFIXES)}
    tied = sd.pop(TIED, None)
    if SHARED not in sd and tied is not None:
        sd[SHARED] = tied
    return names.to_flax(sd, table(module), what="T5 encoder checkpoint")


def params_to_torch(params: Mapping, module: T5Encoder) -> dict[str, np.ndarray]:
    """`module`'s params -> the tensors of `T5EncoderModel.state_dict()` (float32 numpy), the
    token embedding under both of its names."""
    state_dict = names.to_torch(jax.device_get(params), table(module), what="T5 encoder params")
    state_dict[TIED] = state_dict[SHARED]
    return state_dict


# ------------------------------------------------------------------------------------------
# folders


def load(folder: str, dtype=jnp.float32, *, variant: str | None = None) -> tuple[T5Encoder, dict]:
    """(module, params) from a transformers T5EncoderModel folder, e.g. `<pipeline>/text_encoder_3`
    (SD3) or `text_encoder_2` (Flux); variant: e.g. "fp16" for `model.fp16.safetensors` (or its
    sharded form)."""
    folder = os.fspath(folder)
    sub = next((s for s in SUBFOLDERS if os.path.isdir(os.path.join(folder, s))), SUBFOLDERS[0])
    module = tensors.read_config(folder, lambda c: module_from_config(c, dtype=dtype),
                                 what="a transformers T5EncoderModel folder", subfolder=sub)
    return module, params_from_torch(tensors.read_weights_folder(folder, "model", variant=variant), module)


def save(folder: str, module: T5Encoder, params: Mapping) -> None:
    """Write `config.json` + `model.safetensors` that transformers' `T5EncoderModel` loads."""
    folder = os.fspath(folder)
    state_dict = params_to_torch(params, module)
    del state_dict[TIED]  # one copy of the tied embedding, as save_pretrained writes it
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(state_dict, os.path.join(folder, WEIGHTS_NAME),
                              metadata={"format": "pt"})
    tensors.write_json(config_to_transformers(module), os.path.join(folder, CONFIG_NAME))
