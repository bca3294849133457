"""Diffusion Transformer (DiT; Peebles & Xie 2023, "Scalable Diffusion Models with Transformers")
on NHWC images or latents, called like the U-Net: `module.apply(params, x, t, labels)`.

    tokens = patch_embed(x) + pos(h, w)         x: [B, H, W, C] -> [B, h*w, D], h = H/p, w = W/p
    c = time_embed(sinusoid(t)) + class_embed(labels)                          [B, D]
    depth x adaLN-Zero block (sec. 3.2, "adaLN-Zero"):
        (shift1, scale1, gate1, shift2, scale2, gate2) = adaln(SiLU(c))      each [B, D]
        tokens += gate1 * attn(LN(tokens) * (1 + scale1) + shift1)
        tokens += gate2 * mlp(LN(tokens) * (1 + scale2) + shift2)
    final: (shift, scale) = adaln(SiLU(c));  out = proj_out(LN(tokens) * (1 + scale) + shift)
    unpatchify: [B, h*w, p*p*C_out] -> [B, H, W, C_out]

pos(h, w) is the fixed 2-D sine-cosine embedding (computed from the grid, not a parameter): half
of the D channels encode the column, half the row, each as [sin, cos] of the position times
10000^(-k / (D/4)). With `sample_size` set, positions on a grid of another size are rescaled so
they span the training grid (diffusers' `PatchEmbed`: position i of n -> i * base / n, base =
sample_size / p); without it they are the integers 0..n-1 (the paper's code).

The adaLN projections and the output projection start at zero, so every block starts as the
identity and the network outputs zeros (the "-Zero" of adaLN-Zero). LayerNorms have no affine
parameters (the modulation provides them). `learn_sigma` doubles the output channels
(C: the prediction, C: the interpolation weights of the variance, Nichol & Dhariwal 2021);
pipelines and samplers read the first C.

Parameter tree (stable names; `convert/dit.py` maps diffusers' `DiTTransformer2DModel` onto it):

    patch_embed                       Conv p x p, stride p: [p, p, C, D]
    time_embed/{dense_0,dense_1}      [256, D], [D, D]
    class_embed/embedding             [num_classes + 1, D]  (row num_classes: the null class)
    block_{i}/adaln                   [D, 6D]
    block_{i}/attn/{query,key,value,proj_out}   [D, D] with biases
    block_{i}/mlp/{proj_in,proj_out}  [D, mlp_ratio D], [mlp_ratio D, D] (tanh-GELU between)
    final/adaln                       [D, 2D]
    final/proj_out                    [D, p * p * C_out]
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.flash import attend
from jaxdiff.models.layers import (
    TimestepMLP,
    default_init,
    timestep_embedding,
    zero_init,
)
from jaxdiff.models.levels import REMAT_POLICIES, checkpointed

Array = jax.Array
Dtype = Any

FREQ_EMBED_DIM = 256     # width of the timestep sinusoid fed to time_embed (fixed by the reference)
ADALN_EPS = 1e-6         # the LayerNorms modulated by adaLN and the final one


def sincos_2d(dim: int, h: int, w: int, base: int | None = None) -> np.ndarray:
    """The fixed 2-D position embedding of an h x w token grid, row-major: float32 [h * w, dim].

    Channels [0, dim/2) encode the column, [dim/2, dim) the row, each as [sin(pos * f), cos(pos *
    f)] with f_k = 10000^(-k / (dim/4)), k < dim/4. base: the grid size positions are rescaled
    to (i -> i * base / n on each axis), or None for integer positions. Computed in float64 on
    the host (shapes are static), like the reference.
    """
    if dim % 4:
        raise ValueError(f"DiT: hidden_size {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    rows = np.arange(h, dtype=np.float64) / ((h / base) if base else 1.0)   # [h]
    cols = np.arange(w, dtype=np.float64) / ((w / base) if base else 1.0)   # [w]
    freqs = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # [dim/4]

    def one_axis(pos):                                           # [h*w] -> [h*w, dim/2]
        a = pos[:, None] * freqs[None]
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    col_of, row_of = np.meshgrid(cols, rows)                     # each [h, w]
    emb = np.concatenate([one_axis(col_of.reshape(-1)), one_axis(row_of.reshape(-1))], axis=1)
    return emb.astype(np.float32)                                # [h*w, dim]


def _dense(features: int, dtype: Dtype, name: str, init=default_init) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, name=name)


def _plain_norm(eps: float, dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm without learned scale or bias, statistics in float32."""
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=dtype,
                        use_fast_variance=False)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x: [B, T, D], shift, scale: [B, D] -> x * (1 + scale) + shift."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased projections: [B, T, D] -> [B, T, D]."""

    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        B, T, D = x.shape
        N = self.num_heads
        q = _dense(D, self.dtype, "query")(x).reshape(B, T, N, D // N)    # [B, T, N, Dh]
        k = _dense(D, self.dtype, "key")(x).reshape(B, T, N, D // N)      # [B, T, N, Dh]
        v = _dense(D, self.dtype, "value")(x).reshape(B, T, N, D // N)    # [B, T, N, Dh]
        o = attend(q, k, v, implementation=self.attention_impl).astype(self.dtype)
        return _dense(D, self.dtype, "proj_out")(o.reshape(B, T, D))      # [B, T, D]


class MLP(nn.Module):
    """proj_out(GELU_tanh(proj_in(x))): [B, T, D] -> [B, T, D], hidden width `hidden`."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _dense(self.hidden, self.dtype, "proj_in")(x)                 # [B, T, hidden]
        return _dense(x.shape[-1], self.dtype, "proj_out")(nn.gelu(h, approximate=True))


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block: x [B, T, D], c [B, D] -> [B, T, D] (module docstring).

    norm_eps: epsilon of the LayerNorm before the MLP (the one before attention uses 1e-6)."""

    num_heads: int
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        D = x.shape[-1]
        mod = _dense(6 * D, self.dtype, "adaln", zero_init)(nn.silu(c))   # [B, 6D]
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)  # each [B, D]
        h = _modulate(_plain_norm(ADALN_EPS, self.dtype)(x), shift1, scale1)
        x = x + gate1[:, None] * SelfAttention(self.num_heads, self.dtype, self.attention_impl,
                                               name="attn")(h)
        h = _modulate(_plain_norm(self.norm_eps, self.dtype)(x), shift2, scale2)
        return x + gate2[:, None] * MLP(int(D * self.mlp_ratio), self.dtype, name="mlp")(h)


class FinalLayer(nn.Module):
    """proj_out(LN(x) * (1 + scale) + shift), (shift, scale) = adaln(SiLU(c)):
    x [B, T, D], c [B, D] -> [B, T, features]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        D = x.shape[-1]
        shift, scale = jnp.split(_dense(2 * D, self.dtype, "adaln", zero_init)(nn.silu(c)), 2, axis=-1)
        h = _modulate(_plain_norm(ADALN_EPS, self.dtype)(x), shift, scale)
        return _dense(self.features, self.dtype, "proj_out", zero_init)(h)


class DiT(nn.Module):
    """Diffusion Transformer denoiser on NHWC inputs (see the module docstring).

    Attributes:
      patch_size: p; H and W must be multiples of it (the grid h x w may be non-square or odd).
      hidden_size: token width D (divisible by num_heads and by 4).
      depth: number of DiT blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      num_classes: class-conditional with a table of num_classes + 1 rows (row num_classes is
        the null class for classifier-free guidance), or None for an unconditional network.
      learn_sigma: output 2C channels (prediction, then variance interpolation) instead of C.
      in_channels: channels of x, checked when set (None: taken from x).
      sample_size: the training image size, for position rescaling on other sizes (module
        docstring); None: integer positions.
      norm_eps: epsilon of each block's pre-MLP LayerNorm (diffusers' `norm_eps`).
      remat: rematerialise every block in the backward pass: "none", "dots" or "full"
        (`levels.REMAT_POLICIES`); the parameters and outputs are the same.
      dtype: compute dtype; parameters are float32 and the output is float32.
      attention_impl: the attention kernel ("auto", "xla", "blocked", "cudnn", "pallas";
        `flash.attend`).
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int | None = 1000
    learn_sigma: bool = False
    in_channels: int | None = None
    sample_size: int | None = None
    norm_eps: float = 1e-6
    remat: str = "none"
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    # The trainer and pipelines ask every denoiser for its text width; a DiT takes no text.
    context_dim = None

    def example_inputs(self, batch: int = 1, size: int | None = None,
                       in_channels: int | None = None) -> dict[str, Array]:
        """Zero inputs for `init` / `jax.eval_shape`: `module.init(key, **module.example_inputs())`.
        size defaults to one patch; channels to in_channels (else 4)."""
        size = size or self.patch_size
        c = in_channels or self.in_channels or 4
        out = {"x": jnp.zeros((batch, size, size, c)), "t": jnp.zeros((batch,))}
        if self.num_classes is not None:
            out["labels"] = jnp.zeros((batch,), jnp.int32)
        return out

    def out_channels(self, in_channels: int) -> int:
        return 2 * in_channels if self.learn_sigma else in_channels

    def _check(self, x: Array, t: Array, labels: Array | None) -> None:
        if x.ndim != 4:
            raise ValueError(f"DiT expects x of shape [B, H, W, C] (NHWC), got shape {x.shape}")
        B, H, W, C = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"DiT: image height and width must be divisible by patch_size={p}; got input "
                             f"shape {tuple(x.shape)} ([B, H, W, C]). Pad or resize the images.")
        if self.in_channels is not None and C != self.in_channels:
            raise ValueError(f"DiT: x has {C} channels ({tuple(x.shape)}) but the network was built for "
                             f"in_channels={self.in_channels}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiT: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"DiT: remat={self.remat!r} is not valid; choose one of {', '.join(REMAT_POLICIES)}")
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, B)):
            raise ValueError(f"DiT: t must be a scalar or shape [B]=[{B}], got shape {t.shape}")
        if labels is not None and self.num_classes is None:
            raise ValueError("DiT: labels were given but the model is unconditional (num_classes=None)")
        if labels is None and self.num_classes is not None:
            raise ValueError(f"DiT: this model is class-conditional (num_classes={self.num_classes}) and needs "
                             f"labels of shape [B]; for unconditional outputs pass the null class, "
                             f"labels=jnp.full((B,), {self.num_classes}).")
        if labels is not None and (labels.shape != (B,) or not jnp.issubdtype(labels.dtype, jnp.integer)):
            raise ValueError(f"DiT: labels must be integers of shape [B]=[{B}], got {labels.dtype}{list(labels.shape)}")

    @nn.compact
    def __call__(self, x: Array, t: Array, labels: Array | None = None, *, train: bool = False) -> Array:
        """Predict the network output for noisy inputs.

        Args:
          x: [B, H, W, C] noisy images or latents (NHWC).
          t: [B] or scalar timesteps on the training scale (float or int).
          labels: [B] int class ids in [0, num_classes] (num_classes = null class), or None for
            an unconditional network.
          train: accepted for the trainer's call convention (DiT has no dropout).
        Returns:
          [B, H, W, C_out] float32, C_out = 2C with learn_sigma, else C.
        """
        del train
        t = jnp.asarray(t)
        labels = None if labels is None else jnp.asarray(labels)
        self._check(x, t, labels)
        B, H, W, C = x.shape
        p, D = self.patch_size, self.hidden_size
        h, w = H // p, W // p

        tok = nn.Conv(D, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=default_init, name="patch_embed")(x.astype(self.dtype))  # [B, h, w, D]
        base = self.sample_size // p if self.sample_size else None
        pos = jnp.asarray(sincos_2d(D, h, w, base))                                     # [h*w, D]
        tok = (tok.reshape(B, h * w, D).astype(jnp.float32) + pos[None]).astype(self.dtype)  # [B, T, D]

        t = jnp.broadcast_to(t.astype(jnp.float32), (B,))                               # [B]
        emb = timestep_embedding(t, FREQ_EMBED_DIM, flip_sin_to_cos=True, freq_shift=1.0)  # [B, 256]
        c = TimestepMLP(D, self.dtype, name="time_embed")(emb)                           # [B, D]
        if self.num_classes is not None:
            c = c + nn.Embed(self.num_classes + 1, D, dtype=self.dtype, param_dtype=jnp.float32,
                             embedding_init=nn.initializers.normal(0.02), name="class_embed")(labels)

        block = checkpointed(DiTBlock, self.remat)
        for i in range(self.depth):
            tok = block(self.num_heads, self.mlp_ratio, self.norm_eps, self.dtype, self.attention_impl,
                        name=f"block_{i}")(tok, c)                                       # [B, T, D]

        out = self.out_channels(C)
        y = FinalLayer(p * p * out, self.dtype, name="final")(tok, c)                   # [B, T, p*p*out]
        y = y.reshape(B, h, w, p, p, out).transpose(0, 1, 3, 2, 4, 5)                   # [B, h, p, w, p, out]
        return y.reshape(B, H, W, out).astype(jnp.float32)                              # [B, H, W, out]


# The paper's sizes (Table 1): S, B, L, XL, each with patch 2, 4 or 8. DiT-XL/2 on 32x32x4 latents
# (256-pixel ImageNet) is the paper's best model.
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def _variant(size: str, patch: int):
    hidden, depth, heads = _SIZES[size]
    return functools.partial(DiT, patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads)


DiT_S_2, DiT_S_4, DiT_S_8 = (_variant("S", p) for p in (2, 4, 8))
DiT_B_2, DiT_B_4, DiT_B_8 = (_variant("B", p) for p in (2, 4, 8))
DiT_L_2, DiT_L_4, DiT_L_8 = (_variant("L", p) for p in (2, 4, 8))
DiT_XL_2, DiT_XL_4, DiT_XL_8 = (_variant("XL", p) for p in (2, 4, 8))

# A CPU-sized DiT for the 16x16 embedded digits: patch 2 (an 8x8 grid of 64 tokens), 4 blocks of
# width 96 with 4 heads, 10 classes.
tiny = functools.partial(DiT, patch_size=2, hidden_size=96, depth=4, num_heads=4, num_classes=10)

CONFIGS = {
    "DiT_S_2": DiT_S_2, "DiT_S_4": DiT_S_4, "DiT_S_8": DiT_S_8,
    "DiT_B_2": DiT_B_2, "DiT_B_4": DiT_B_4, "DiT_B_8": DiT_B_8,
    "DiT_L_2": DiT_L_2, "DiT_L_4": DiT_L_4, "DiT_L_8": DiT_L_8,
    "DiT_XL_2": DiT_XL_2, "DiT_XL_4": DiT_XL_4, "DiT_XL_8": DiT_XL_8,
    "tiny": tiny,
}
