"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 and 3.5 (Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"; diffusers'
`SD3Transformer2DModel`).

Image patches and text tokens keep separate weights (two streams) but meet in one attention over
the joint sequence. With D = num_heads * head_dim, for a latent x: [B, H, W, C]:

    h = patch_embed(x) + crop(pos_embed)              [B, T, D],  T = (H / p) * (W / p)
    c = context_embed(context)                        [B, S, D]
    e = time_embed(sinusoid(t)) + pooled_embed(pooled)   [B, D]     (the conditioning vector)
    num_layers x JointBlock:  (h, c) <- block(h, c, e)
    v = proj_out(LN(h) * (1 + scale(e)) + shift(e))   -> unpatchify -> [B, H, W, C_out]

One JointBlock (adaLN-Zero modulation, Peebles & Xie 2023; every `shift/scale/gate` is a [B, D]
slice of a Dense layer of SiLU(e)):

    h' = LN(h) (1 + scale1) + shift1                  c' = LN(c) (1 + c_scale1) + c_shift1
    [a_h, a_c] = attention over the joint sequence [h' ; c']   (one softmax, image tokens first)
    h = h + gate1 a_h                                 c = c + c_gate1 a_c
    h = h + gate2 attn2(LN(h0) (1 + scale3) + shift3) (SD3.5-medium dual-attention layers only;
                                                        h0 is the block's input)
    h = h + gate_ff ff(LN(h) (1 + scale2) + shift2)   c = c + c_gate_ff ff_c(LN(c) (1 + ...) + ...)

The last block is "context pre-only": its text tokens still serve as keys and values, but the
block returns no text stream (no context output projection, context MLP or their modulation; its
context modulation is a shift and scale only). `qk_norm="rms_norm"` (SD3.5) normalises every
head's queries and keys (RMSNorm over head_dim, learned scale) before the dot products.

The position table is the fixed 2-D sine-cosine one over a pos_embed_max_size^2 grid, of which the
centred (H / p) x (W / p) window is used; it is stored as a parameter (initialised to the
sine-cosine values) because checkpoints carry it.

Parameter tree (names are stable; `jaxdiff/convert/sd3.py` maps diffusers names onto them):

    patch_embed (Conv p x p, stride p)   pos_embed/embedding [M * M, D]
    time_embed/{dense_0,dense_1}         pooled_embed/{dense_0,dense_1}     context_embed
    block_{i}/adaln [D, 6D or 9D]        block_{i}/context_adaln [D, 6D or 2D (last block)]
    block_{i}/attn/{query,key,value,proj_out,context_query,context_key,context_value,
                    context_out (not in the last block),norm_q,norm_k,norm_context_q,norm_context_k}
    block_{i}/attn2/{query,key,value,proj_out,norm_q,norm_k}   (dual-attention layers)
    block_{i}/ff/{proj_in,proj_out}      block_{i}/context_ff/{proj_in,proj_out} (not the last)
    final_adaln [D, 2D]                  proj_out [D, p * p * C_out]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.flash import attend
from jaxdiff.models.layers import (
    TimestepMLP,
    default_init,
    depth_to_space,
    timestep_embedding,
)

Array = jax.Array
Dtype = Any

NORM_EPS = 1e-6       # every LayerNorm and RMSNorm of the reference network
TIME_CHANNELS = 256   # width of the sinusoidal timestep embedding
FF_MULT = 4
QK_NORMS = (None, "rms_norm")


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=default_init,
                    name=name)


def _layer_norm(x: Array) -> Array:
    """LayerNorm over the last axis without a learned scale or bias; statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + NORM_EPS)).astype(x.dtype)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x: [B, T, D], shift, scale: [B, D] -> x (1 + scale) + shift."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_table(dim: int, grid: int, base_size: int) -> np.ndarray:
    """The 2-D sine-cosine position table [grid * grid, dim] (float32), row-major over (row, col).

    Position (i, j) sits at coordinates (i, j) * base_size / grid; its first dim / 2 channels
    encode the column coordinate and the last dim / 2 the row coordinate, each as
    [sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim / 4)), k < dim / 4 (Vaswani et al.
    2017, per axis). Computed in float64 like the reference, then rounded.
    """
    if dim % 4:
        raise ValueError(f"the sine-cosine position table needs a width divisible by 4, got {dim}")
    coords = np.arange(grid, dtype=np.float64) * base_size / grid          # [M]
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def axis(pos):                                                         # [M*M] -> [M*M, dim/2]
        out = pos[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(coords, coords, indexing="ij")                # [M, M] each
    return np.concatenate([axis(cols.reshape(-1)), axis(rows.reshape(-1))], 1).astype(np.float32)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis (Zhang & Sennrich 2019), in float32."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> [..., D]."""
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + NORM_EPS)
        return (x32 * scale).astype(self.dtype)


class JointAttention(nn.Module):
    """Attention over the joint sequence [x ; context], each stream with its own projections.

        q = [query(x) ; context_query(c)], likewise k, v     (optionally RMS-normed per head)
        o = softmax(q k^T / sqrt(head_dim)) v  ->  split  ->  proj_out(o_x), context_out(o_c)

    Without `context` it is plain self-attention over x (SD3.5's second attention).

    Attributes:
      num_heads, head_dim: N heads of head_dim channels (N * head_dim = D).
      qk_norm: None or "rms_norm".
      context_pre_only: the context tokens are keys and values only; no context output.
      attention_impl: the kernel, see `flash.attend`.
    """

    num_heads: int
    head_dim: int
    qk_norm: str | None = None
    context_pre_only: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def _qkv(self, x: Array, prefix: str) -> tuple[Array, Array, Array]:
        B, L, _ = x.shape
        N, Dh = self.num_heads, self.head_dim
        q, k, v = (_dense(N * Dh, self.dtype, prefix + name)(x).reshape(B, L, N, Dh)  # [B, L, N, Dh]
                   for name in ("query", "key", "value"))
        if self.qk_norm == "rms_norm":
            norm = "norm_context_" if prefix else "norm_"
            q = RMSNorm(self.dtype, name=norm + "q")(q)
            k = RMSNorm(self.dtype, name=norm + "k")(k)
        return q, k, v

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> tuple[Array, Array | None]:
        """x: [B, T, D], context: [B, S, D] or None -> ([B, T, D], [B, S, D] or None)."""
        B, T, D = x.shape
        q, k, v = self._qkv(x, "")
        if context is not None:
            cq, ck, cv = self._qkv(context, "context_")
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, cq), (k, ck), (v, cv)))  # [B, T+S, N, Dh]
        o = attend(q, k, v, implementation=self.attention_impl).astype(self.dtype)
        o = o.reshape(B, o.shape[1], self.num_heads * self.head_dim)  # [B, T+S, N*Dh]
        out_x = _dense(D, self.dtype, "proj_out")(o[:, :T])
        if context is None or self.context_pre_only:
            return out_x, None
        return out_x, _dense(D, self.dtype, "context_out")(o[:, T:])


class FeedForward(nn.Module):
    """proj_out(GELU_tanh(proj_in(x))), hidden width 4 D."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, T, D] -> [B, T, D]."""
        h = _dense(FF_MULT * x.shape[-1], self.dtype, "proj_in")(x)
        return _dense(x.shape[-1], self.dtype, "proj_out")(nn.gelu(h, approximate=True))


class JointBlock(nn.Module):
    """One dual-stream block (see the module docstring).

    Attributes:
      num_heads, head_dim, qk_norm: of the attention.
      context_pre_only: the last block: the text stream is read but not updated; returns None.
      dual_attention: add the second, image-only self-attention (SD3.5 medium).
    """

    num_heads: int
    head_dim: int
    context_pre_only: bool = False
    qk_norm: str | None = None
    dual_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, context: Array, emb: Array) -> tuple[Array, Array | None]:
        """x: [B, T, D], context: [B, S, D], emb: [B, D] -> (x [B, T, D], context [B, S, D] or None)."""
        D = x.shape[-1]
        e = nn.silu(emb)
        m = jnp.split(_dense((9 if self.dual_attention else 6) * D, self.dtype, "adaln")(e),
                      9 if self.dual_attention else 6, axis=-1)             # each [B, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = m[:6]
        cm = jnp.split(_dense((2 if self.context_pre_only else 6) * D, self.dtype, "context_adaln")(e),
                       2 if self.context_pre_only else 6, axis=-1)          # each [B, D]
        if self.context_pre_only:
            c_scale1, c_shift1 = cm
        else:
            c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = cm
        attention = functools.partial(JointAttention, self.num_heads, self.head_dim, self.qk_norm,
                                      dtype=self.dtype, attention_impl=self.attention_impl)
        nx = _layer_norm(x)
        a_x, a_c = attention(context_pre_only=self.context_pre_only, name="attn")(
            _modulate(nx, shift1, scale1), _modulate(_layer_norm(context), c_shift1, c_scale1))
        h = x + gate1[:, None] * a_x
        if self.dual_attention:
            shift3, scale3, gate3 = m[6:]
            a2, _ = attention(name="attn2")(_modulate(nx, shift3, scale3))
            h = h + gate3[:, None] * a2
        h = h + gate2[:, None] * FeedForward(self.dtype, name="ff")(_modulate(_layer_norm(h), shift2, scale2))
        if self.context_pre_only:
            return h, None
        c = context + c_gate1[:, None] * a_c
        ff_c = FeedForward(self.dtype, name="context_ff")(_modulate(_layer_norm(c), c_shift2, c_scale2))
        return h, c + c_gate2[:, None] * ff_c


class _PositionTable(nn.Module):
    """The [M * M, D] position table, initialised to `sincos_table`."""

    grid: int
    dim: int
    base_size: int

    @nn.compact
    def __call__(self) -> Array:
        table = sincos_table(self.dim, self.grid, self.base_size)
        return self.param("embedding", lambda *_: jnp.asarray(table), None)


class MMDiT(nn.Module):
    """The SD3 / SD3.5 transformer on NHWC latents; returns the flow velocity (eps - x0).

    Attributes:
      sample_size: the training latent size; sets the position table's scale (base size
        sample_size / patch_size), nothing else.
      patch_size: p; H and W must be multiples of it.
      in_channels / out_channels: latent channels in and out (out None: same as in).
      num_layers, num_heads, head_dim: depth and width (D = num_heads * head_dim).
      context_dim: width of the text-encoder states (diffusers' joint_attention_dim).
      pooled_dim: width of the pooled text vector (pooled_projection_dim).
      pos_embed_max_size: M, the position grid; (H / p) and (W / p) must not exceed it.
      dual_attention_layers: indices of the blocks with the second attention (SD3.5 medium).
      qk_norm: None or "rms_norm" (SD3.5).
      attention_impl: the attention kernel, see `flash.attend`.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = 16
    num_layers: int = 18
    num_heads: int = 18
    head_dim: int = 64
    context_dim: int = 4096
    pooled_dim: int = 2048
    pos_embed_max_size: int = 96
    dual_attention_layers: Sequence[int] = ()
    qk_norm: str | None = None
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    def example_inputs(self, batch: int = 1, size: int | None = None) -> dict[str, Array]:
        """Zero inputs for `init` / `jax.eval_shape`: `module.init(key, **module.example_inputs())`.
        The context length is 1 (parameters do not depend on it)."""
        size = size or self.patch_size
        return {"x": jnp.zeros((batch, size, size, self.in_channels)), "t": jnp.zeros((batch,)),
                "context": jnp.zeros((batch, 1, self.context_dim)),
                "pooled": jnp.zeros((batch, self.pooled_dim))}

    def _check(self, x: Array, context: Array, pooled: Array) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"MMDiT qk_norm={self.qk_norm!r} is not supported; use None or 'rms_norm'")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"MMDiT expects x of shape [B, H, W, {self.in_channels}] (NHWC), got {x.shape}")
        p, M = self.patch_size, self.pos_embed_max_size
        H, W = x.shape[1:3]
        if H % p or W % p:
            raise ValueError(f"MMDiT: the latent size {H}x{W} is not a multiple of the patch size {p}")
        if H // p > M or W // p > M:
            raise ValueError(f"MMDiT: the latent size {H}x{W} exceeds the position grid "
                             f"({M} patches of {p}, so at most {M * p}x{M * p})")
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"MMDiT expects context of shape [B, S, {self.context_dim}], got {context.shape}")
        if pooled.shape != (x.shape[0], self.pooled_dim):
            raise ValueError(f"MMDiT expects pooled of shape [{x.shape[0]}, {self.pooled_dim}], got {pooled.shape}")

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array, pooled: Array) -> Array:
        """x: [B, H, W, C] latents, t: [B] timesteps (sigma * 1000), context: [B, S, context_dim]
        text states, pooled: [B, pooled_dim] -> velocity [B, H, W, out_channels]."""
        self._check(x, context, pooled)
        B, H, W, _ = x.shape
        p, D, M = self.patch_size, self.width, self.pos_embed_max_size
        h_p, w_p = H // p, W // p
        h = nn.Conv(D, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32, kernel_init=default_init, name="patch_embed")(
            x.astype(self.dtype))                                           # [B, H/p, W/p, D]
        table = _PositionTable(M, D, self.sample_size // p, name="pos_embed")().reshape(M, M, D)
        top, left = (M - h_p) // 2, (M - w_p) // 2
        h = h + table[top:top + h_p, left:left + w_p].astype(self.dtype)    # [B, H/p, W/p, D]
        h = h.reshape(B, h_p * w_p, D)                                      # [B, T, D]

        t_emb = timestep_embedding(t, TIME_CHANNELS, flip_sin_to_cos=True, freq_shift=0)  # [B, 256]
        emb = (TimestepMLP(D, self.dtype, name="time_embed")(t_emb.astype(self.dtype))
               + TimestepMLP(D, self.dtype, name="pooled_embed")(pooled.astype(self.dtype)))  # [B, D]
        c = _dense(D, self.dtype, "context_embed")(context.astype(self.dtype))  # [B, S, D]

        for i in range(self.num_layers):
            h, c = JointBlock(self.num_heads, self.head_dim, context_pre_only=i == self.num_layers - 1,
                              qk_norm=self.qk_norm, dual_attention=i in tuple(self.dual_attention_layers),
                              dtype=self.dtype, attention_impl=self.attention_impl,
                              name=f"block_{i}")(h, c, emb)

        scale, shift = jnp.split(_dense(2 * D, self.dtype, "final_adaln")(nn.silu(emb)), 2, axis=-1)
        h = _modulate(_layer_norm(h), shift, scale)
        C = self.out_channels or self.in_channels
        h = _dense(p * p * C, self.dtype, "proj_out")(h)                    # [B, T, p*p*C]
        return depth_to_space(h.reshape(B, h_p, w_p, p * p * C), p)         # [B, H, W, C]


# Published configurations (diffusers' transformer/config.json of each release).
SD3Medium = functools.partial(MMDiT, num_layers=24, num_heads=24, pos_embed_max_size=192)
SD35Large = functools.partial(MMDiT, num_layers=38, num_heads=38, pos_embed_max_size=192,
                              qk_norm="rms_norm")
SD35Medium = functools.partial(MMDiT, num_layers=24, num_heads=24, pos_embed_max_size=384,
                               qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
