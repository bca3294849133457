"""T5 text encoder: token ids -> per-token embeddings that condition SD3 and Flux.

The network is the encoder stack of T5 (Raffel et al. 2020) in its v1.1 form, transformers'
`T5EncoderModel`, which SD3 keeps in `text_encoder_3/` and Flux in `text_encoder_2/`:

    h_0 = token_embedding[ids]                                               # [B, S, D]
    bias = relative_attention_bias[bucket(j - i)]                            # [1, N, S, S]
    h_l = h' + FF(RMS_2(h')),   h' = h_{l-1} + Attn(RMS_1(h_{l-1}), bias)   (l = 1..num_layers)
    out = final_norm(h_num_layers)

Three things set it apart from a textbook transformer:

* No absolute positions. Each attention logit gets a learned per-head scalar that depends only
  on the offset `j - i` between key j and query i, binned into `relative_attention_num_buckets`
  buckets (`relative_position_buckets`): half of them for keys after the query, half for keys
  before it (the encoder is bidirectional); within each half, offsets below a quarter of the
  buckets get one bucket each and larger ones share logarithmically wider buckets up to
  `relative_attention_max_distance`, beyond which all offsets share the last bucket. The table
  [num_buckets, N] lives in the first layer of the checkpoint, and the bias it gives is shared
  by every layer.
* The logits q.k are not scaled by 1/sqrt(head_dim): T5 folds that factor into the
  initialisation of the query projection.
* Normalisation is RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * scale, no mean
  subtraction, no bias, computed in float32; no layer has a bias.

Feed-forward (`feed_forward_proj`, transformers' config field of the same name):
"gated-gelu" (v1.1, the SD3 / Flux encoder) is wo(gelu_tanh(wi_0 x) * wi_1 x), GELU's tanh
approximation; "relu" (the original T5) is wo(relu(wi x)). "gated-relu", "gated-silu", "gelu"
(exact) and "silu" are read alike. Dropout is not applied (inference and frozen conditioning).

Public API
----------
    T5Encoder(vocab_size, hidden_size, head_dim, intermediate_size, num_layers, num_heads,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", layer_norm_eps=1e-6, dtype=jnp.float32)
    module.apply({"params": params}, input_ids [B, S], attention_mask [B, S] or None)
        -> last hidden state [B, S, hidden_size] (compute dtype)
    relative_position_buckets(query_length, key_length, num_buckets, max_distance,
                              bidirectional=True) -> np.ndarray int32 [query_length, key_length]
    T5XXLEncoder = google/t5-v1_1-xxl's encoder (SD3's text_encoder_3, Flux's text_encoder_2)

`attention_mask` (1 = token, 0 = padding) removes padded keys from every softmax; padded query
rows are still computed. The SD3 and Flux pipelines call the encoder without a mask (padding
tokens are attended to), which is `attention_mask=None`.

Precision: parameters are float32; `dtype` is the compute dtype of the projections; the
attention logits and softmax, every RMSNorm and the residual stream between layers stay
float32 (T5's activations grow large across layers, and a float32 residual keeps bf16 close).

Parameters and their transformers names (T5EncoderModel state dict; see convert/t5.py):

    jaxdiff                              transformers
    token_embedding/embedding            shared.weight  (tied to encoder.embed_tokens.weight)
    relative_attention_bias/embedding    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    layer_{i}/norm_1/scale               encoder.block.{i}.layer.0.layer_norm.weight
    layer_{i}/attn/{query,key,value,out} encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}
    layer_{i}/norm_2/scale               encoder.block.{i}.layer.1.layer_norm.weight
    layer_{i}/mlp/{wi_0,wi_1,wo}         encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}
                  ({wi,wo} ungated)
    final_norm/scale                     encoder.final_layer_norm.weight
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

FEED_FORWARD = ("gated-gelu", "relu", "gated-relu", "gated-silu", "gelu", "silu")


def feed_forward_activation(feed_forward_proj: str) -> tuple[bool, Callable[[Array], Array]]:
    """(gated, activation) of a transformers `feed_forward_proj` value, e.g. "gated-gelu".

    As transformers reads it: "gated-gelu" uses the tanh approximation of GELU ("gelu_new"),
    a plain "gelu" the exact one. Raises ValueError for other values.
    """
    if feed_forward_proj not in FEED_FORWARD:
        raise ValueError(f"feed_forward_proj must be one of {FEED_FORWARD}, got {feed_forward_proj!r}")
    gated = feed_forward_proj.startswith("gated-")
    name = feed_forward_proj.removeprefix("gated-")
    if name == "gelu":
        return gated, functools.partial(jax.nn.gelu, approximate=gated)
    return gated, {"relu": jax.nn.relu, "silu": jax.nn.silu}[name]


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int, bidirectional: bool = True) -> np.ndarray:
    """The bucket of each (query i, key j) offset j - i: int32 [query_length, key_length].

    Bidirectional (the encoder): buckets [0, num_buckets/2) hold offsets <= 0 (keys at or before
    the query), [num_buckets/2, num_buckets) offsets > 0. Within a half of n buckets, |offset| <
    n/2 gets its own bucket, larger ones bucket n/2 + floor(log(|offset| / (n/2)) /
    log(max_distance / (n/2)) * n/2), capped at n - 1. Computed on the host in float32, the
    precision the reference implementation bins in, so boundary offsets land alike.
    Unidirectional (a decoder): one half, of offsets <= 0 only.
    """
    offset = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # [Q, K]
    n = num_buckets
    buckets = np.zeros_like(offset)
    if bidirectional:
        n //= 2
        buckets += (offset > 0) * n
        distance = np.abs(offset)
    else:
        distance = -np.minimum(offset, 0)
    exact = n // 2
    with np.errstate(divide="ignore"):
        log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
    scaled = log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(n - exact)
    large = np.minimum(exact + scaled.astype(np.int64), n - 1)
    buckets += np.where(distance < exact, distance, large)
    return buckets.astype(np.int32)


class T5RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale in float32, cast to `dtype`. [..., D] -> [..., D]."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)  # [D]
        x = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)  # [..., 1]
        return (x * jax.lax.rsqrt(variance + self.eps) * scale).astype(self.dtype)


def _dense(features: int, std: float, dtype: Dtype, name: str) -> nn.Dense:
    """A bias-free linear layer with T5's initialisation N(0, std^2)."""
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(std), name=name)


class T5Attention(nn.Module):
    """Bidirectional self-attention with an additive position bias and unscaled logits.

    x: [B, S, D]; bias: [1, N, S, S] float32; mask: bool [B, 1, 1, S] (True = attend) or None
    -> [B, S, D]. The heads span num_heads * head_dim features, which need not equal D.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array, mask: Array | None) -> Array:
        B, S, D = x.shape
        N, d = self.num_heads, self.head_dim
        q = _dense(N * d, (D * d) ** -0.5, self.dtype, "query")(x).reshape(B, S, N, d)  # [B, S, N, d]
        k = _dense(N * d, D ** -0.5, self.dtype, "key")(x).reshape(B, S, N, d)  # [B, S, N, d]
        v = _dense(N * d, D ** -0.5, self.dtype, "value")(x).reshape(B, S, N, d)  # [B, S, N, d]
        o = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0)  # [B, S, N, d]
        return _dense(D, (N * d) ** -0.5, self.dtype, "out")(o.reshape(B, S, N * d))  # [B, S, D]


class T5FeedForward(nn.Module):
    """wo(act(wi_0 x) * wi_1 x) when gated, else wo(act(wi x)): [B, S, D] -> [B, S, D]."""

    intermediate_size: int
    feed_forward_proj: str = "gated-gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        D, F = x.shape[-1], self.intermediate_size
        gated, act = feed_forward_activation(self.feed_forward_proj)
        if gated:
            h = act(_dense(F, D ** -0.5, self.dtype, "wi_0")(x)) * _dense(F, D ** -0.5, self.dtype, "wi_1")(x)
        else:
            h = act(_dense(F, D ** -0.5, self.dtype, "wi")(x))  # [B, S, F]
        return _dense(D, F ** -0.5, self.dtype, "wo")(h)


class T5EncoderLayer(nn.Module):
    """x + Attn(RMS_1(x)), then + FF(RMS_2(.)). [B, S, D] float32 -> [B, S, D] float32."""

    num_heads: int
    head_dim: int
    intermediate_size: int
    feed_forward_proj: str = "gated-gelu"
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array, mask: Array | None) -> Array:
        attn = T5Attention(self.num_heads, self.head_dim, dtype=self.dtype, name="attn")
        x = x + attn(T5RMSNorm(self.layer_norm_eps, self.dtype, name="norm_1")(x), bias, mask)
        mlp = T5FeedForward(self.intermediate_size, self.feed_forward_proj, dtype=self.dtype,
                            name="mlp")
        return x + mlp(T5RMSNorm(self.layer_norm_eps, self.dtype, name="norm_2")(x))


class T5Encoder(nn.Module):
    """T5 encoder stack (transformers' `T5EncoderModel`), see the module docstring.

    Attributes:
      vocab_size: rows of the token embedding (32128 for T5 v1.1).
      hidden_size: width D (transformers' d_model).
      head_dim: width of one attention head (d_kv).
      intermediate_size: feed-forward hidden units (d_ff).
      num_layers: encoder layers.
      num_heads: attention heads.
      relative_attention_num_buckets: rows of the relative position bias table.
      relative_attention_max_distance: offset from which all offsets share a bucket.
      feed_forward_proj: one of FEED_FORWARD ("gated-gelu" for v1.1, "relu" for the original).
      layer_norm_eps: RMSNorm epsilon.
      dtype: compute dtype; parameters are float32.
    """

    vocab_size: int
    hidden_size: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """input_ids: int [B, S]; attention_mask: [B, S] (1 = token, 0 = padding) or None.

        Returns the final-RMSNorm hidden states [B, S, hidden_size] in the compute dtype.
        """
        feed_forward_activation(self.feed_forward_proj)  # refuse an unknown value early
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(f"attention_mask must have the shape of input_ids {(B, S)}, got "
                                 f"{tuple(attention_mask.shape)}")
            mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, S]

        embed = nn.Embed(self.vocab_size, self.hidden_size, dtype=jnp.float32,
                         param_dtype=jnp.float32, embedding_init=nn.initializers.normal(1.0),
                         name="token_embedding")
        h = embed(input_ids)  # [B, S, D] float32

        table = nn.Embed(self.relative_attention_num_buckets, self.num_heads, dtype=jnp.float32,
                         param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(self.hidden_size ** -0.5),
                         name="relative_attention_bias")
        buckets = relative_position_buckets(S, S, self.relative_attention_num_buckets,
                                            self.relative_attention_max_distance)  # [S, S]
        bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # [1, N, S, S]

        for i in range(self.num_layers):
            h = T5EncoderLayer(self.num_heads, self.head_dim, self.intermediate_size,
                               self.feed_forward_proj, self.layer_norm_eps, dtype=self.dtype,
                               name=f"layer_{i}")(h, bias, mask)
        return T5RMSNorm(self.layer_norm_eps, self.dtype, name="final_norm")(h)  # [B, S, D]


# google/t5-v1_1-xxl's encoder, SD3's text_encoder_3 and Flux's text_encoder_2
# (4,762,310,656 parameters).
T5XXLEncoder = functools.partial(
    T5Encoder, vocab_size=32128, hidden_size=4096, head_dim=64, intermediate_size=10240,
    num_layers=24, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_eps=1e-6)
