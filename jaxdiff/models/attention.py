"""Cross-attention transformer blocks of the text-conditioned (Stable Diffusion) U-Net.

A `SpatialTransformer` (Rombach et al. 2022, the latent diffusion model's "SpatialTransformer";
diffusers' `Transformer2DModel` with `BasicTransformerBlock`s) lets every pixel of a feature map
attend to itself and to a sequence of conditioning vectors (the text encoder's hidden states):

    n = proj_in(GroupNorm(x))                     x: [B, H, W, C] -> n: [B, H*W, C]
    depth x:  n = n + self_attn(LN(n))
              n = n + cross_attn(LN(n), context)  context: [B, S, context_dim]
              n = n + ff(LN(n))                   GEGLU feed-forward, 4x wide
    out = x + proj_out(n)

`proj_in`/`proj_out` are 1x1 convolutions (SD 1.x) or linear layers (SD 2.x,
`use_linear_projection`); the two compute the same function, but checkpoints store them with
different shapes, so the parameter tree follows the checkpoint.

Submodule names (part of the checkpoint format; see `jaxdiff/convert/unet.py`):

    SpatialTransformer: norm, proj_in, block_{k}, proj_out
    TransformerBlock:   norm_0, self_attn, norm_1, cross_attn, norm_2, ff
    Attention:          query, key, value (no biases), proj_out
    GEGLUFeedForward:   proj_in ([C, 2 * 4C]: value half then gate half), proj_out

The attention kernel is `flash.attend`, chosen by `attention_impl` ("auto", "xla", "blocked",
"cudnn", "pallas"; see `jaxdiff/models/flash.py`): XLA's `jax.nn.dot_product_attention`, the
blocked online-softmax kernel that never forms the [B, N, T, S] logits, cuDNN's fused kernel on
GPU or the Pallas flash kernel on TPU. Every one forms the logits and the softmax in float32,
even for bfloat16 inputs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import conv as conv_lib
from jaxdiff.models.flash import attend
from jaxdiff.models.layers import default_init, group_norm, split_heads, zero_init

Array = jax.Array
Dtype = Any

# Fixed by the reference architecture, not configurable there either.
GROUP_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5
FF_MULT = 4


def _dense(features: int, dtype: Dtype, name: str, *, bias: bool = True, init=default_init):
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=init, name=name, dot_general=conv_lib.dot_general)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm over the last axis; statistics in float32."""
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


class Attention(nn.Module):
    """Multi-head attention of a token sequence onto itself or onto a context sequence.

        out = proj_out(softmax(q k^T / sqrt(head_dim)) v),  q = query(x), k, v = key/value(c)

    with c = x (self-attention) or c = context (cross-attention).

    Attributes:
      num_heads: N heads of head_dim channels; the inner width N * head_dim is the width of x.
      head_dim: channels per head.
      upcast: compute the attention (q, k, v and the weighted sum) in float32 whatever `dtype`.
        diffusers' `upcast_attention`, set by SD 2.x v-prediction checkpoints whose logits
        overflow float16; bfloat16 logits cannot overflow and are already formed in float32, so
        it only costs time there.
      attention_impl: the attention kernel, see `flash.attend` ("auto" picks by backend and size).
    """

    num_heads: int
    head_dim: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        """x: [B, T, C], context: [B, S, D_c] or None -> [B, T, C]."""
        B, T, C = x.shape
        c = x if context is None else context.astype(self.dtype)
        S = c.shape[1]
        N, D = self.num_heads, self.head_dim
        q = _dense(N * D, self.dtype, "query", bias=False)(x).reshape(B, T, N, D)  # [B, T, N, D]
        k = _dense(N * D, self.dtype, "key", bias=False)(c).reshape(B, S, N, D)    # [B, S, N, D]
        v = _dense(N * D, self.dtype, "value", bias=False)(c).reshape(B, S, N, D)  # [B, S, N, D]
        if self.upcast:
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        o = attend(q, k, v, implementation=self.attention_impl).astype(self.dtype)  # [B, T, N, D]
        return _dense(C, self.dtype, "proj_out")(o.reshape(B, T, N * D))  # [B, T, C]


class GEGLUFeedForward(nn.Module):
    """Gated-GELU MLP (Shazeer 2020): proj_out(a * GELU(g)), [a, g] = split(proj_in(x)).

    The hidden width is 4 * C; GELU is the exact (erf) one."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, T, C] -> [B, T, C]."""
        C = x.shape[-1]
        h = _dense(2 * FF_MULT * C, self.dtype, "proj_in")(x)  # [B, T, 2 * 4C]
        a, g = jnp.split(h.astype(jnp.float32), 2, axis=-1)     # each [B, T, 4C]
        # The gate in float32, rounded once: in bfloat16 faster on the CPU than a GELU of its
        # own ([1, 4096, 2560]: 4.2 against 6.5 ms) and closer to the exact product.
        gated = (a * nn.gelu(g, approximate=False)).astype(self.dtype)
        return _dense(C, self.dtype, "proj_out")(gated)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on `context`, GEGLU feed-forward,
    each with a residual connection. Shape-preserving on [B, T, C]."""

    num_heads: int
    head_dim: int
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """x: [B, T, C], context: [B, S, D_c] -> [B, T, C]."""
        attn = lambda name: Attention(  # noqa: E731
            self.num_heads, self.head_dim, self.upcast, self.dtype, self.attention_impl, name=name)
        x = x + attn("self_attn")(_layer_norm(self.dtype, "norm_0")(x))
        x = x + attn("cross_attn")(_layer_norm(self.dtype, "norm_1")(x), context)
        return x + GEGLUFeedForward(self.dtype, name="ff")(_layer_norm(self.dtype, "norm_2")(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> `depth` TransformerBlocks over the H*W tokens -> proj_out, plus
    the input (see the module docstring).

    Attributes:
      num_heads: attention heads (used when head_dim is None).
      head_dim: channels per head; overrides num_heads when set.
      depth: number of TransformerBlocks (SD 1.x/2.x: 1; SDXL: up to 10).
      num_groups: GroupNorm groups (epsilon is fixed at 1e-6, as in the reference).
      use_linear_projection: proj_in/proj_out as linear layers on tokens instead of 1x1 convs.
      upcast: float32 attention, see `Attention`.
      attention_impl: the attention kernel, see `Attention`.
    """

    num_heads: int = 8
    head_dim: int | None = None
    depth: int = 1
    num_groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """x: [B, H, W, C], context: [B, S, D_c] -> [B, H, W, C]."""
        B, H, W, C = x.shape
        heads, d = split_heads(C, self.num_heads, self.head_dim, "SpatialTransformer")
        h = group_norm(self.num_groups, GROUP_NORM_EPS, self.dtype, "norm")(x)
        if self.use_linear_projection:
            h = _dense(C, self.dtype, "proj_in")(h.reshape(B, H * W, C))  # [B, T, C]
        else:
            h = self._conv1x1(C, "proj_in")(h).reshape(B, H * W, C)        # [B, T, C]
        for k in range(self.depth):
            h = TransformerBlock(heads, d, self.upcast, self.dtype, self.attention_impl,
                                 name=f"block_{k}")(h, context)
        if self.use_linear_projection:
            h = _dense(C, self.dtype, "proj_out", init=zero_init)(h).reshape(B, H, W, C)
        else:
            h = self._conv1x1(C, "proj_out", zero_init)(h.reshape(B, H, W, C))  # [B, H, W, C]
        return x + h

    def _conv1x1(self, features: int, name: str, init=default_init) -> nn.Conv:
        return nn.Conv(features, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=init, name=name, conv_general_dilated=conv_lib.conv_general)
