"""CLIP text encoder: token ids -> per-token embeddings that condition a latent diffusion U-Net.

The network is the text tower of CLIP (Radford et al. 2021) as Stable Diffusion uses it: token
plus learned position embeddings, `num_layers` pre-LayerNorm transformer layers with causal
self-attention, and a final LayerNorm:

    h_0 = token_embedding[ids] + position_embedding[:T]                       # [B, T, D]
    h_l = h' + MLP(LN_2(h')),   h' = h_{l-1} + Attn(LN_1(h_{l-1}))   (l = 1..num_layers)
    last_hidden_state = final_norm(h_{num_layers - skip_layers})
    pooled = final_norm(h_{num_layers})[b, eos position of row b]
    text_embeds = pooled @ text_projection          (only with projection_dim: SDXL's second encoder)

Public API
----------
    CLIPTextEncoder(vocab_size, max_position_embeddings, hidden_size, intermediate_size,
                    num_layers, num_heads, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    eos_token_id=None, projection_dim=None, dtype=jnp.float32)
    module.apply({"params": params}, input_ids, skip_layers=0, output_hidden_states=False)
        -> CLIPTextOutput(last_hidden_state [B, T, D], pooled [B, D], hidden_states,
                          text_embeds [B, P] or None)
    SD1TextEncoder = CLIP ViT-L/14 text tower (Stable Diffusion 1.x)
    SD2TextEncoder = OpenCLIP ViT-H/14 text tower, 23 layers as diffusers ships it (SD 2.x)
    SDXLTextEncoder2 = OpenCLIP ViT-bigG/14 text tower with its projection head (SDXL's second)

With `projection_dim=P` the module is transformers' `CLIPTextModelWithProjection`: a bias-free
linear head `text_projection` [D, P] maps `pooled` to `text_embeds`, the pooled embedding SDXL
adds to the U-Net's time embedding.

`skip_layers=k` is diffusers' `clip_skip=k`: the sequence output is the hidden state after layer
`num_layers - k`, passed through the final LayerNorm. `pooled` is always taken from the full-depth
output (what transformers calls `pooler_output`), whatever `skip_layers` is, so all layers run.
`hidden_states` (only with `output_hidden_states=True`, else None) is the tuple
`(h_0, h_1, ..., h_num_layers)` *before* the final LayerNorm, as transformers returns it; SDXL-style
conditioning reads `hidden_states[-2]` from it.

No attention mask is taken: like the Stable Diffusion pipelines, padding tokens are attended to
under the causal mask alone (they sit after EOS, so they never change the tokens before them).

Pooling rule: with `eos_token_id=None` the EOS position is `argmax(input_ids)`, the first
maximum (the legacy rule transformers keeps for configs with `eos_token_id == 2`, which every
released Stable Diffusion text encoder has; correct because the CLIP EOS token has the largest id
in the vocabulary). With an id, it is the first position holding that id.

Precision: parameters are float32; `dtype` is the compute dtype of the attention, MLP and
LayerNorm outputs, while the residual stream between layers is kept in float32.

Parameters and their transformers names (files from transformers 4.x, which every released
Stable Diffusion folder is, prefix each with `text_model.`):

    jaxdiff                                  transformers CLIPTextModel
    token_embedding/embedding                embeddings.token_embedding.weight
    position_embedding/embedding             embeddings.position_embedding.weight
    layer_{i}/norm_1/{scale,bias}            encoder.layers.{i}.layer_norm1.{weight,bias}
    layer_{i}/attn/{query,key,value,out}     encoder.layers.{i}.self_attn.{q,k,v,out}_proj
    layer_{i}/norm_2/{scale,bias}            encoder.layers.{i}.layer_norm2.{weight,bias}
    layer_{i}/mlp/{fc1,fc2}                  encoder.layers.{i}.mlp.{fc1,fc2}
    final_norm/{scale,bias}                  final_layer_norm.{weight,bias}
    text_projection/kernel                   text_projection.weight  (never prefixed)

(dense `kernel` [in, out] is the transpose of torch's `weight` [out, in]; see convert/clip.py.)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu")

# CLIP's reference initialisation: N(0, 0.02) for the embedding tables.
_embed_init = nn.initializers.normal(0.02)


def quick_gelu(x: Array) -> Array:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)  # exact (erf) GELU
    raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {name!r}")


class CLIPTextOutput(NamedTuple):
    """What `CLIPTextEncoder` returns (a pytree; `hidden_states` is None unless asked for).

    last_hidden_state: [B, T, D] final-LayerNorm output (of layer num_layers - skip_layers),
      in the compute dtype.
    pooled: [B, D] full-depth final-LayerNorm state at each row's EOS token (compute dtype).
    hidden_states: tuple of num_layers + 1 float32 arrays [B, T, D] (embeddings, then every
      layer's output, none of them final-normed), or None.
    text_embeds: [B, P] the projected pooled state (modules with a projection_dim), or None.
    """

    last_hidden_state: Array
    pooled: Array
    hidden_states: tuple[Array, ...] | None = None
    text_embeds: Array | None = None


class CLIPAttention(nn.Module):
    """Multi-head self-attention: [B, T, D] -> [B, T, D], scaled by 1/sqrt(D / num_heads).

    Attributes:
      num_heads: heads; must divide the width.
      dtype: compute dtype.
      causal: each token attends to itself and earlier ones only (the text tower); False for
        full attention (CLIP's image tower, `models/clip_vision.py`).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        B, T, D = x.shape
        if D % self.num_heads:
            raise ValueError(f"width {D} is not divisible by num_heads={self.num_heads}")
        d = D // self.num_heads

        def proj(name):
            return nn.Dense(D, dtype=self.dtype, param_dtype=jnp.float32, name=name)

        q = proj("query")(x).reshape(B, T, self.num_heads, d)  # [B, T, N, d]
        k = proj("key")(x).reshape(B, T, self.num_heads, d)  # [B, T, N, d]
        v = proj("value")(x).reshape(B, T, self.num_heads, d)  # [B, T, N, d]
        o = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)  # [B, T, N, d]
        return proj("out")(o.reshape(B, T, D))  # [B, T, D]


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2: [B, T, D] -> [B, T, D] through `intermediate_size` units."""

    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=jnp.float32,
                     name="fc1")(x)
        h = _activation(self.hidden_act)(h)
        return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + Attn(LN_1(x)), then + MLP(LN_2(.)). [B, T, D] -> [B, T, D].
    `causal` as in `CLIPAttention` (False in the image tower)."""

    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def norm(name):
            return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                param_dtype=jnp.float32, name=name)

        x = x + CLIPAttention(self.num_heads, dtype=self.dtype, causal=self.causal, name="attn")(norm("norm_1")(x))
        mlp = CLIPMLP(self.intermediate_size, self.hidden_act, dtype=self.dtype, name="mlp")
        return x + mlp(norm("norm_2")(x))


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer (transformers' `CLIPTextModel`), see the module docstring.

    Attributes:
      vocab_size: rows of the token embedding.
      max_position_embeddings: longest sequence (77 for every Stable Diffusion encoder).
      hidden_size: width D.
      intermediate_size: MLP hidden units.
      num_layers: transformer layers.
      num_heads: attention heads (divide hidden_size).
      hidden_act: "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (exact; OpenCLIP, SD 2.x).
      layer_norm_eps: LayerNorm epsilon.
      eos_token_id: id whose first occurrence marks the pooled position, or None for the
        argmax-of-ids rule.
      projection_dim: width P of the bias-free `text_projection` head on the pooled state
        (transformers' CLIPTextModelWithProjection), or None for no head.
      dtype: compute dtype; parameters are float32.
    """

    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = None
    projection_dim: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, *, skip_layers: int = 0,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids: int [B, T] with T <= max_position_embeddings (usually the tokenizer's 77)."""
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.max_position_embeddings:
            raise ValueError(f"input_ids has {T} tokens, more than max_position_embeddings="
                             f"{self.max_position_embeddings}; tokenize with max_length="
                             f"{self.max_position_embeddings}")
        if not 0 <= skip_layers < self.num_layers:
            raise ValueError(f"skip_layers must be in [0, {self.num_layers}), got {skip_layers}")

        # The residual stream stays float32 (the sublayers compute in `dtype` and are added back
        # to it): for a network this small the cost is nil, and in bf16 it roughly halves the
        # error against float32.
        tok = nn.Embed(self.vocab_size, self.hidden_size, dtype=jnp.float32,
                       param_dtype=jnp.float32, embedding_init=_embed_init, name="token_embedding")
        pos = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=jnp.float32,
                       param_dtype=jnp.float32, embedding_init=_embed_init,
                       name="position_embedding")
        h = tok(input_ids) + pos(jnp.arange(T))[None]  # [B, T, D] float32

        hidden = [h]
        for i in range(self.num_layers):
            h = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act,
                                 self.layer_norm_eps, dtype=self.dtype, name=f"layer_{i}")(h)
            hidden.append(h)

        final_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                  param_dtype=jnp.float32, name="final_norm")
        last = final_norm(h)  # [B, T, D]
        if self.eos_token_id is None:
            eos_pos = jnp.argmax(input_ids, axis=-1)  # [B]
        else:
            eos_pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # [B]
        pooled = last[jnp.arange(B), eos_pos]  # [B, D]
        text_embeds = None
        if self.projection_dim is not None:
            text_embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                                   param_dtype=jnp.float32, name="text_projection")(pooled)  # [B, P]
        if skip_layers:
            last = final_norm(hidden[self.num_layers - skip_layers])
        return CLIPTextOutput(last, pooled, tuple(hidden) if output_hidden_states else None,
                              text_embeds)


# Stable Diffusion 1.x: OpenAI CLIP ViT-L/14 text tower (123,060,480 parameters).
SD1TextEncoder = functools.partial(
    CLIPTextEncoder, vocab_size=49408, max_position_embeddings=77, hidden_size=768,
    intermediate_size=3072, num_layers=12, num_heads=12, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, eos_token_id=None)

# Stable Diffusion 2.x: OpenCLIP ViT-H/14 text tower without its last layer, as diffusers ships
# it (SD 2 conditions on the penultimate layer; 340,387,840 parameters).
SD2TextEncoder = functools.partial(
    CLIPTextEncoder, vocab_size=49408, max_position_embeddings=77, hidden_size=1024,
    intermediate_size=4096, num_layers=23, num_heads=16, hidden_act="gelu",
    layer_norm_eps=1e-5, eos_token_id=None)

# SDXL's second text encoder: OpenCLIP ViT-bigG/14 text tower with its 1280-wide projection
# head (transformers' CLIPTextModelWithProjection, 694,659,840 parameters).
SDXLTextEncoder2 = functools.partial(
    CLIPTextEncoder, vocab_size=49408, max_position_embeddings=77, hidden_size=1280,
    intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu",
    layer_norm_eps=1e-5, eos_token_id=None, projection_dim=1280)
