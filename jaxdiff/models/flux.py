"""The Flux.1 transformer (Black Forest Labs 2024; diffusers' `FluxTransformer2DModel`).

A rectified-flow denoiser on *packed* latent tokens: each 2x2 patch of the C-channel latent is
one token of 4C channels (`pack`). Text tokens (T5 hidden states) and image tokens are embedded
to one width D = num_heads * head_dim and pass two kinds of block:

    temb = MLP_t(sinusoid(1000 t)) [+ MLP_g(sinusoid(1000 g))] + MLP_p(pooled)      [B, D]
    img = x_embed(tokens), txt = context_embed(context)                     [B, N, D], [B, S, D]
    num_layers x double-stream block (MM-DiT, Esser et al. 2024), separate weights per stream:
        per stream: (shift, scale, gate) x 2 = mod(SiLU(temb));  h = LN(x) (1 + scale) + shift
        joint attention over [txt; img] (RMS-normed q, k; rotary positions), split back,
        x += gate * out(attn);  x += gate' * FF(LN(x) (1 + scale') + shift')
    num_single_layers x single-stream block on [txt; img] (Dehghani et al. 2023's parallel form):
        (shift, scale, gate) = mod(SiLU(temb));  h = LN(x) (1 + scale) + shift
        x += gate * proj_out([attn(h); GELU(mlp_in(h))])
    out = proj_out(LN(img) (1 + scale) + shift),  (scale, shift) = out_mod(SiLU(temb))

Positions enter only through a rotary embedding (Su et al. 2021) over three axes: every token
has an id (i0, i1, i2) (image tokens (0, row, col), text tokens (0, 0, 0)), and head channel
pair k of axis a, in `axes_dims_rope` chunks, is rotated by the angle i_a / theta^(2k / d_a).
The timestep is on the unit scale (sigma in [0, 1], what FluxPipeline hands the transformer) and
multiplied by 1000 inside, as is the guidance value of the guidance-distilled "dev" models
(`guidance_embeds=True`).

Submodule names (part of the checkpoint format; see `jaxdiff/convert/flux.py`):

    x_embed, context_embed, time_embed/dense_{0,1}, guidance_embed/dense_{0,1},
    pooled_embed/dense_{0,1}, double_{i}, single_{i}, out_mod, proj_out
    double_{i}: img_mod, txt_mod, attn, img_ff/proj_{in,out}, txt_ff/proj_{in,out}
      attn: query key value query_norm key_norm proj_out (image stream),
            txt_query txt_key txt_value txt_query_norm txt_key_norm txt_proj_out (text stream)
    single_{i}: mod, attn (query key value query_norm key_norm, no output layer), mlp_in, proj_out

Helpers for pipelines that keep NHWC latents: `pack` / `unpack` (diffusers' `_pack_latents` /
`_unpack_latents` on NCHW, the same token layout) and `image_ids` (`_prepare_latent_image_ids`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.flash import attend
from jaxdiff.models.layers import timestep_embedding

Array = jax.Array
Dtype = Any

NORM_EPS = 1e-6       # every LayerNorm and RMSNorm of the reference
TIME_CHANNELS = 256   # sinusoid width of the timestep and guidance embeddings
TIME_SCALE = 1000.0   # the network's input t and guidance are multiplied by this


# ------------------------------------------------------------------------------------------
# packing and positions


def pack(latents: Array) -> Array:
    """NHWC latents [B, H, W, C] -> tokens [B, H/2 * W/2, 4C], one per 2x2 patch, row-major.

    Token channel c * 4 + dy * 2 + dx holds latent channel c at pixel (2i + dy, 2j + dx), the
    layout diffusers' FluxPipeline gives NCHW latents. H and W must be even."""
    B, H, W, C = latents.shape
    if H % 2 or W % 2:
        raise ValueError(f"Flux packs 2x2 latent patches: H and W must be even, got latents of "
                         f"shape {tuple(latents.shape)} ([B, H, W, C])")
    x = latents.reshape(B, H // 2, 2, W // 2, 2, C)         # [B, h, dy, w, dx, C]
    x = x.transpose(0, 1, 3, 5, 2, 4)                       # [B, h, w, C, dy, dx]
    return x.reshape(B, (H // 2) * (W // 2), C * 4)         # [B, N, 4C]


def unpack(tokens: Array, height: int, width: int) -> Array:
    """The inverse of `pack`: tokens [B, H/2 * W/2, 4C] -> NHWC latents [B, H, W, C].

    height, width: the latent grid H, W (even)."""
    B, N, C4 = tokens.shape
    h, w = height // 2, width // 2
    if h * w != N or C4 % 4 or height % 2 or width % 2:
        raise ValueError(f"Flux unpack: {N} tokens of {C4} channels do not fill an even latent "
                         f"grid of {height} x {width}")
    x = tokens.reshape(B, h, w, C4 // 4, 2, 2)              # [B, h, w, C, dy, dx]
    x = x.transpose(0, 1, 4, 2, 5, 3)                       # [B, h, dy, w, dx, C]
    return x.reshape(B, height, width, C4 // 4)             # [B, H, W, C]


def image_ids(h: int, w: int) -> np.ndarray:
    """Position ids of the h x w token grid (h = H/2, w = W/2 of the latents), row-major:
    [h * w, 3] float32 rows (0, row, col)."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w, dtype=np.float32)[None, :]
    return ids.reshape(h * w, 3)                            # [N, 3]


def text_ids(length: int) -> np.ndarray:
    """Position ids of `length` text tokens: [S, 3] zeros, as FluxPipeline uses."""
    return np.zeros((length, 3), np.float32)


def rope_angles(ids: Array, axes_dims: tuple[int, ...], theta: float = 10000.0) -> Array:
    """Rotation angles of every head-channel pair: ids [L, A] -> [L, sum(axes_dims) / 2] float32.

    Axis a contributes d_a / 2 pairs with frequencies theta^(-2k / d_a), k = 0 .. d_a/2 - 1."""
    if ids.shape[-1] != len(axes_dims):
        raise ValueError(f"Flux: position ids have {ids.shape[-1]} axes but axes_dims_rope="
                         f"{tuple(axes_dims)} has {len(axes_dims)}")
    pos = jnp.asarray(ids, jnp.float32)
    out = []
    for a, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2], exact on host
        out.append(pos[:, a:a + 1] * jnp.asarray(freqs, jnp.float32)[None])  # [L, d/2]
    return jnp.concatenate(out, axis=-1)                    # [L, D/2]


def apply_rope(x: Array, angles: Array) -> Array:
    """Rotate each adjacent channel pair (x_2k, x_2k+1) of x [B, L, N, D] by angles [L, D/2]:
    (x_2k cos - x_2k+1 sin, x_2k sin + x_2k+1 cos). Float32 inside; returns x's dtype."""
    B, L, N, D = x.shape
    pairs = x.astype(jnp.float32).reshape(B, L, N, D // 2, 2)  # [B, L, N, D/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]  # [1, L, 1, D/2]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(B, L, N, D).astype(x.dtype)          # [B, L, N, D]


# ------------------------------------------------------------------------------------------
# layers


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _plain_norm(x: Array) -> Array:
    """LayerNorm without scale or bias over the last axis, statistics in float32."""
    h = x.astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    return ((h - mean) * jax.lax.rsqrt(var + NORM_EPS)).astype(x.dtype)


def _rms_norm(name: str) -> nn.RMSNorm:
    return nn.RMSNorm(epsilon=NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """LN(x) (1 + scale) + shift; x: [B, L, D], shift, scale: [B, D]."""
    return _plain_norm(x) * (1 + scale[:, None]) + shift[:, None]


class MLP(nn.Module):
    """dense_1(SiLU(dense_0(x))): the timestep / guidance / pooled-text embedding MLPs."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, C] -> [B, features]."""
        h = nn.silu(_dense(self.features, self.dtype, "dense_0")(x))
        return _dense(self.features, self.dtype, "dense_1")(h)


class FeedForward(nn.Module):
    """proj_out(GELU_tanh(proj_in(x))), hidden width `mult` * C."""

    mult: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, L, C] -> [B, L, C]."""
        C = x.shape[-1]
        h = nn.gelu(_dense(int(C * self.mult), self.dtype, "proj_in")(x), approximate=True)
        return _dense(C, self.dtype, "proj_out")(h)


class JointAttention(nn.Module):
    """Attention over the tokens of one or two streams with RMS-normed queries and keys and
    rotary positions.

    Double-stream (`txt` given): each stream has its own q/k/v, norms and output layer; the
    attention runs over [txt; img] jointly and the result is split back. Single-stream (`txt`
    None): one sequence, no output layer (the block's proj_out follows).
    """

    num_heads: int
    head_dim: int
    output: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def _qkv(self, x: Array, prefix: str) -> tuple[Array, Array, Array]:
        B, L, _ = x.shape
        N, Dh = self.num_heads, self.head_dim
        q, k, v = (_dense(N * Dh, self.dtype, f"{prefix}{n}")(x).reshape(B, L, N, Dh)  # [B, L, N, Dh]
                   for n in ("query", "key", "value"))
        q = _rms_norm(f"{prefix}query_norm")(q).astype(self.dtype)
        k = _rms_norm(f"{prefix}key_norm")(k).astype(self.dtype)
        return q, k, v

    @nn.compact
    def __call__(self, img: Array, angles: Array, txt: Array | None = None):
        """img: [B, N, D], angles: [S + N, Dh/2] (text first), txt: [B, S, D] or None
        -> img out [B, N, D] (and txt out [B, S, D] when txt is given); single-stream returns
        the heads concatenated, [B, N, num_heads * head_dim]."""
        B, N, D = img.shape
        q, k, v = self._qkv(img, "")
        S = 0
        if txt is not None:
            S = txt.shape[1]
            tq, tk, tv = self._qkv(txt, "txt_")
            q, k, v = (jnp.concatenate(p, axis=1) for p in ((tq, q), (tk, k), (tv, v)))  # [B, S+N, ..]
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        o = attend(q, k, v, implementation=self.attention_impl).astype(self.dtype)  # [B, S+N, H, Dh]
        o = o.reshape(B, S + N, self.num_heads * self.head_dim)                     # [B, S+N, H*Dh]
        if txt is None:
            return o
        t_o, i_o = o[:, :S], o[:, S:]
        return (_dense(D, self.dtype, "proj_out")(i_o),
                _dense(txt.shape[-1], self.dtype, "txt_proj_out")(t_o))


class DoubleBlock(nn.Module):
    """MM-DiT block: image and text streams with separate weights, one joint attention."""

    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, img: Array, txt: Array, temb: Array, angles: Array) -> tuple[Array, Array]:
        """img: [B, N, D], txt: [B, S, D], temb: [B, D], angles: [S + N, Dh/2] -> (img, txt)."""
        D = img.shape[-1]
        e = nn.silu(temb)
        im = jnp.split(_dense(6 * D, self.dtype, "img_mod")(e), 6, axis=-1)  # 6 x [B, D]
        tm = jnp.split(_dense(6 * D, self.dtype, "txt_mod")(e), 6, axis=-1)
        # each: shift, scale, gate of the attention, then of the feed-forward
        a_img, a_txt = JointAttention(self.num_heads, self.head_dim, True, self.dtype,
                                      self.attention_impl, name="attn")(
            _modulate(img, im[0], im[1]), angles, _modulate(txt, tm[0], tm[1]))
        img = img + im[2][:, None] * a_img
        img = img + im[5][:, None] * FeedForward(self.mlp_ratio, self.dtype, name="img_ff")(
            _modulate(img, im[3], im[4]))
        txt = txt + tm[2][:, None] * a_txt
        txt = txt + tm[5][:, None] * FeedForward(self.mlp_ratio, self.dtype, name="txt_ff")(
            _modulate(txt, tm[3], tm[4]))
        return img, txt


class SingleBlock(nn.Module):
    """Single-stream block on [txt; img]: attention and MLP in parallel from one modulated
    input, joined by one output layer."""

    num_heads: int
    head_dim: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, temb: Array, angles: Array) -> Array:
        """x: [B, S + N, D], temb: [B, D], angles: [S + N, Dh/2] -> [B, S + N, D]."""
        D = x.shape[-1]
        shift, scale, gate = jnp.split(_dense(3 * D, self.dtype, "mod")(nn.silu(temb)), 3, axis=-1)
        h = _modulate(x, shift, scale)
        a = JointAttention(self.num_heads, self.head_dim, False, self.dtype, self.attention_impl,
                           name="attn")(h, angles)                       # [B, L, H*Dh]
        m = nn.gelu(_dense(int(D * self.mlp_ratio), self.dtype, "mlp_in")(h), approximate=True)
        out = _dense(D, self.dtype, "proj_out")(jnp.concatenate([a, m], axis=-1))
        return x + gate[:, None] * out


# ------------------------------------------------------------------------------------------
# the transformer


class FluxTransformer(nn.Module):
    """Flux.1 transformer on packed tokens (see the module docstring).

    Attributes (diffusers config names in brackets):
      in_channels: token width, 4x the latent channels (64 for Flux.1's 16-channel latents).
      out_channels: output channels per patch position (None: in_channels).
      patch_size: patch side inside a token; the output width is patch_size^2 * out_channels
        (Flux.1: 1, the 2x2 patching being done by `pack`).
      num_layers: double-stream blocks (Flux.1: 19).
      num_single_layers: single-stream blocks (Flux.1: 38).
      num_heads, head_dim: attention heads and channels per head [num_attention_heads,
        attention_head_dim]; the width is their product (Flux.1: 24 x 128 = 3072).
      context_dim: width of the text hidden states [joint_attention_dim] (T5-XXL: 4096).
      pooled_dim: width of the pooled text vector [pooled_projection_dim] (CLIP-L: 768).
      guidance_embeds: embed a guidance value (guidance-distilled "dev" models).
      axes_dims_rope: head channels given to each position-id axis; sums to head_dim.
      theta: rotary base period.
      mlp_ratio: feed-forward width / model width.
      dtype: compute dtype; parameters are float32 and the output is float32.
      attention_impl: attention kernel, see `flash.attend`.
    """

    in_channels: int = 64
    out_channels: int | None = None
    patch_size: int = 1
    num_layers: int = 19
    num_single_layers: int = 38
    num_heads: int = 24
    head_dim: int = 128
    context_dim: int = 4096
    pooled_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    def example_inputs(self, batch: int = 1, tokens: int = 1, text: int = 1) -> dict[str, Array]:
        """Zero inputs for `init` / `jax.eval_shape`: `module.init(key, **module.example_inputs())`."""
        out = {"tokens": jnp.zeros((batch, tokens, self.in_channels)), "t": jnp.zeros((batch,)),
               "context": jnp.zeros((batch, text, self.context_dim)),
               "pooled": jnp.zeros((batch, self.pooled_dim)),
               "img_ids": jnp.zeros((tokens, len(self.axes_dims_rope))),
               "txt_ids": jnp.zeros((text, len(self.axes_dims_rope)))}
        if self.guidance_embeds:
            out["guidance"] = jnp.zeros((batch,))
        return out

    def _check(self, tokens, context, pooled, img_ids, txt_ids, guidance) -> None:
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"Flux: axes_dims_rope={tuple(self.axes_dims_rope)} sums to "
                             f"{sum(self.axes_dims_rope)}, not head_dim={self.head_dim}")
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_channels:
            raise ValueError(f"Flux expects packed tokens [B, N, {self.in_channels}] (see "
                             f"jaxdiff.models.flux.pack), got shape {tuple(tokens.shape)}")
        B, N = tokens.shape[:2]
        if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != self.context_dim:
            raise ValueError(f"Flux expects context [{B}, S, {self.context_dim}], got "
                             f"{tuple(context.shape)}")
        if pooled.shape != (B, self.pooled_dim):
            raise ValueError(f"Flux expects pooled [{B}, {self.pooled_dim}], got {tuple(pooled.shape)}")
        if img_ids.shape[0] != N or txt_ids.shape[0] != context.shape[1]:
            raise ValueError(f"Flux: img_ids {tuple(img_ids.shape)} / txt_ids {tuple(txt_ids.shape)} "
                             f"need one row per image token ({N}) / text token ({context.shape[1]})")
        if self.guidance_embeds and guidance is None:
            raise ValueError("this Flux model is guidance-distilled (guidance_embeds=True): pass "
                             "guidance [B], e.g. 3.5")
        if not self.guidance_embeds and guidance is not None:
            raise ValueError("this Flux model has no guidance embedding (guidance_embeds=False): "
                             "pass guidance=None and use classifier-free guidance instead")

    @nn.compact
    def __call__(self, tokens: Array, t: Array, context: Array, pooled: Array, img_ids: Array,
                 txt_ids: Array, guidance: Array | None = None) -> Array:
        """tokens: [B, N, in_channels] (packed latents), t: [B] (or scalar) on [0, 1],
        context: [B, S, context_dim], pooled: [B, pooled_dim], img_ids: [N, 3], txt_ids: [S, 3],
        guidance: [B] (or scalar) when guidance_embeds, else None
        -> [B, N, patch_size^2 * out_channels] float32 (the flow velocity, eps - x0)."""
        self._check(tokens, context, pooled, img_ids, txt_ids, guidance)
        B = tokens.shape[0]
        D, dt = self.width, self.dtype

        def sinusoid(v):  # [B] on the unit scale -> [B, 256]
            v = jnp.broadcast_to(jnp.asarray(v, jnp.float32), (B,)) * TIME_SCALE
            return timestep_embedding(v, TIME_CHANNELS, flip_sin_to_cos=True, freq_shift=0.0).astype(dt)

        temb = MLP(D, dt, name="time_embed")(sinusoid(t))                 # [B, D]
        if self.guidance_embeds:
            temb = temb + MLP(D, dt, name="guidance_embed")(sinusoid(guidance))
        temb = temb + MLP(D, dt, name="pooled_embed")(pooled.astype(dt))

        img = _dense(D, dt, "x_embed")(tokens.astype(dt))                  # [B, N, D]
        txt = _dense(D, dt, "context_embed")(context.astype(dt))           # [B, S, D]
        S = txt.shape[1]
        ids = jnp.concatenate([jnp.asarray(txt_ids, jnp.float32), jnp.asarray(img_ids, jnp.float32)])
        angles = rope_angles(ids, tuple(self.axes_dims_rope), self.theta)  # [S + N, Dh/2]

        for i in range(self.num_layers):
            img, txt = DoubleBlock(self.num_heads, self.head_dim, self.mlp_ratio, dt,
                                   self.attention_impl, name=f"double_{i}")(img, txt, temb, angles)
        x = jnp.concatenate([txt, img], axis=1)                            # [B, S + N, D]
        for i in range(self.num_single_layers):
            x = SingleBlock(self.num_heads, self.head_dim, self.mlp_ratio, dt, self.attention_impl,
                            name=f"single_{i}")(x, temb, angles)
        img = x[:, S:]                                                     # [B, N, D]

        scale, shift = jnp.split(_dense(2 * D, dt, "out_mod")(nn.silu(temb)), 2, axis=-1)
        img = _modulate(img, shift, scale)
        out_c = self.out_channels or self.in_channels
        return _dense(self.patch_size ** 2 * out_c, dt, "proj_out")(img).astype(jnp.float32)


# Flux.1 [dev] (guidance-distilled) and [schnell] (timestep-distilled, no guidance input).
FluxDev = functools.partial(FluxTransformer, guidance_embeds=True)
FluxSchnell = functools.partial(FluxTransformer, guidance_embeds=False)
