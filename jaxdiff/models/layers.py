"""Building blocks of the diffusion U-Net: timestep embedding, residual block, self-attention,
down/up sampling.

Layout is NHWC throughout (`x: [B, H, W, C]`). Every module takes a compute `dtype` (activations
and matmuls) while parameters are created in float32 (`param_dtype`), following the precision
policy of the design notes. Submodule names are part of the checkpoint format (the converters map
diffusers names onto them), so keep them stable:

    TimestepMLP:  dense_0, dense_1
    ResBlock:     norm_0, conv_0, time_proj, norm_1, conv_1, skip (1x1, only when channels change)
    AttentionBlock: norm, query, key, value, proj_out
    Downsample / Upsample: conv

Initialisation follows Ho et al. (2020): fan-average uniform variance scaling everywhere, and zero
for the layers that close a residual branch (the second conv of a ResBlock, the attention output
projection), so every block starts as the identity.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import conv as conv_lib
from jaxdiff.models.flash import attend

Array = jax.Array
Dtype = Any

# Xavier/Glorot uniform: the "fan_avg, uniform" initialiser used by the DDPM reference network.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros_init()

# 3x3 convolutions pad one pixel on each side (PyTorch-style `padding=1`); see `Downsample` for
# the strided case, where the two padding conventions of reference checkpoints differ.
_PAD1 = ((1, 1), (1, 1))


def timestep_embedding(
    t: Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
    scale: float = 1.0,
) -> Array:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    With `half = dim // 2`, frequency k (k = 0..half-1) is

        w_k = max_period ** (-k / (half - freq_shift))

    and the embedding is `[sin(scale * t * w), cos(scale * t * w)]` (or `[cos, sin]` when
    `flip_sin_to_cos`). An odd `dim` gets one trailing zero column.

    `freq_shift=1, flip_sin_to_cos=False` is the DDPM convention (Ho et al. 2020, Transformer
    positional encoding with the last frequency exactly 1/max_period); `freq_shift=0,
    flip_sin_to_cos=True` is the ADM / Stable Diffusion one. The arguments mirror
    diffusers' `Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift)`.

    Args:
      t: [B] timesteps (any real dtype); a scalar is treated as [1].
      dim: embedding width.
    Returns:
      [B, dim] float32. Always computed in float32: timesteps reach ~1000, far beyond bf16's
      resolution.
    """
    if dim < 2:
        raise ValueError(f"timestep_embedding needs dim >= 2, got {dim}")
    half = dim // 2
    if half - freq_shift <= 0:
        raise ValueError(
            f"timestep_embedding: dim={dim} is too small for freq_shift={freq_shift} "
            f"(need dim // 2 > freq_shift)"
        )
    t = jnp.atleast_1d(jnp.asarray(t, jnp.float32))  # [B]
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    freqs = jnp.exp(exponent)  # [half]
    args = scale * t[:, None] * freqs[None, :]  # [B, half]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)  # [B, 2*half]
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))  # [B, dim]
    return emb


class TimestepMLP(nn.Module):
    """Two-layer MLP on the sinusoidal embedding: Dense -> SiLU -> Dense.

    No activation at the end: each ResBlock applies SiLU before its own projection.

    Attributes:
      features: output width (4 * base_channels in DDPM/ADM).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: Array) -> Array:
        """emb: [B, D] -> [B, features] in `dtype`."""
        dense = lambda name: nn.Dense(  # noqa: E731
            self.features, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=default_init, name=name,
        )
        h = dense("dense_0")(emb)
        h = nn.silu(h)
        return dense("dense_1")(h)


class GroupNorm(nn.Module):
    """Group normalisation over the last (channel) axis, with flax's `nn.GroupNorm` parameters
    (`scale`, `bias`: [C]) and results (two-pass float32 statistics, `use_fast_variance=False`).

    Each channel's sum over the middle (spatial) axes comes first and the groups' sums after, on
    [B, C]: in NHWC both are reductions a CPU vectorises along C, where reducing
    [B, H, W, G, C/G] over (H, W, C/G) at once, as `nn.GroupNorm` does, ran 3-5x slower forward
    and ~3x slower backward on XLA's CPU backend (experiments/profile_ops.py, "norm").

        mean_g = mean over (H, W, c in g) of x,   var_g = mean of (x - mean_g)^2
        y = (x - mean_g) * rsqrt(var_g + eps) * scale + bias

    With `activation="silu"` the result is SiLU(y), taken in float32 before the one rounding to
    `dtype`: in bfloat16 that is both closer to the exact value and faster on the CPU than a
    rounded y and a SiLU of its own ([4, 64, 64, 320]: 7.5 against 11.1 ms).

    Attributes:
      num_groups: G; C must be divisible by it.
      epsilon: added to the variance.
      activation: None or "silu", applied to y before it is cast to `dtype`.
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    activation: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, ..., C] (NHWC: [B, H, W, C]) -> the same shape, in `dtype`."""
        C, G = x.shape[-1], self.num_groups
        if G <= 0 or C % G:
            raise ValueError(f"GroupNorm: {C} channels are not divisible into {G} groups")
        if self.activation not in (None, "silu"):
            raise ValueError(f"GroupNorm.activation must be None or 'silu', got {self.activation!r}")
        scale = self.param("scale", nn.initializers.ones_init(), (C,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (C,), self.param_dtype)
        axes = tuple(range(1, x.ndim - 1))
        n = math.prod(x.shape[1:-1]) * (C // G)

        def per_channel(v: Array) -> Array:
            """[B, ..., C] -> each group's mean, repeated on its channels, shaped to broadcast."""
            g = jnp.sum(v, axis=axes).reshape(x.shape[0], G, C // G).sum(-1) / n  # [B, G]
            return jnp.repeat(g, C // G, axis=1).reshape((x.shape[0],) + (1,) * len(axes) + (C,))

        xf = x.astype(jnp.float32)
        d = xf - per_channel(xf)                                        # [B, ..., C]
        inv = jax.lax.rsqrt(per_channel(d * d) + self.epsilon)          # [B, 1.., C]
        y = d * (inv * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
        if self.activation == "silu":
            y = nn.silu(y)
        return y.astype(self.dtype)


def group_norm(num_groups: int, eps: float, dtype: Dtype, name: str, *,
               activation: str | None = None) -> GroupNorm:
    """GroupNorm over the channel axis of NHWC; statistics are reduced in float32, and the
    optional activation ("silu") is taken in float32 too."""
    return GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                     activation=activation, name=name)


def conv3x3(features: int, dtype: Dtype, name: str, *, zero: bool = False,
            conv_general_dilated=conv_lib.conv_general) -> nn.Conv:
    """Shape-preserving 3x3 convolution, NHWC (`conv_general_dilated`: how it is computed)."""
    return nn.Conv(
        features, (3, 3), padding=_PAD1, dtype=dtype,
        param_dtype=jnp.float32, kernel_init=zero_init if zero else default_init, name=name,
        conv_general_dilated=conv_general_dilated,
    )


def _downsample_avg(x: Array) -> Array:
    """[B, H, W, C] -> [B, H/2, W/2, C], 2x2 average pooling."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """Pre-activation residual block with timestep conditioning.

        h = conv_0(SiLU(norm_0(x)))
        additive:     h = conv_1(dropout(SiLU(norm_1(h + time_proj(SiLU(emb))))))
        scale-shift:  scale, shift = split(time_proj(SiLU(emb)))
                      h = conv_1(dropout(SiLU((1 + scale) * norm_1(h) + shift)))
        out = skip(x) + h            (skip is a 1x1 conv when channels change, else identity)

    With `resample='down'|'up'` (ADM's `resblock_updown`) both branches are resampled (2x2
    average pool / nearest x2, no conv) right after the first norm+SiLU, so the block also
    changes resolution.

    Without a conditioning vector (`emb=None`, as in the autoencoder) there is no `time_proj`
    parameter and `norm_1` acts on `h` alone.

    Attributes:
      out_channels: C_out.
      dropout: dropout rate before conv_1 (needs the 'dropout' rng when train=True).
      use_scale_shift_norm: FiLM-style conditioning of norm_1 (ADM) instead of addition (DDPM).
      num_groups: GroupNorm groups; both C_in and C_out must be divisible by it.
      norm_eps: GroupNorm epsilon.
      resample: None, 'down' or 'up'.
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    num_groups: int = 32
    norm_eps: float = 1e-5
    resample: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array | None = None, train: bool = False) -> Array:
        """x: [B, H, W, C_in], emb: [B, D] or None -> [B, H', W', out_channels] (H' = H, H/2
        or 2H)."""
        if self.resample not in (None, "down", "up"):
            raise ValueError(
                f"ResBlock.resample must be None, 'down' or 'up', got {self.resample!r}"
            )
        h = group_norm(self.num_groups, self.norm_eps, self.dtype, "norm_0", activation="silu")(x)
        if self.resample is not None:
            fn = _downsample_avg if self.resample == "down" else conv_lib.upsample_nearest
            h, x = fn(h), fn(x)
        h = conv3x3(self.out_channels, self.dtype, "conv_0")(h)

        film = emb is not None and self.use_scale_shift_norm
        # SiLU inside the norm (in float32) unless the FiLM modulation comes between them.
        norm_1 = group_norm(self.num_groups, self.norm_eps, self.dtype, "norm_1",
                            activation=None if film else "silu")
        if emb is None:
            h = norm_1(h)
        else:
            proj_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
            e = nn.Dense(
                proj_width, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=default_init, name="time_proj",
            )(nn.silu(emb))
            e = e[:, None, None, :]  # [B, 1, 1, proj_width]
            if film:
                scale, shift = jnp.split(e, 2, axis=-1)  # each [B, 1, 1, C_out]
                h = nn.silu(norm_1(h) * (1 + scale) + shift)
            else:
                h = norm_1(h + e)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(self.out_channels, self.dtype, "conv_1", zero=True)(h)

        if x.shape[-1] != self.out_channels:
            x = nn.Conv(
                self.out_channels, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=default_init, name="skip", conv_general_dilated=conv_lib.conv_general,
            )(x)
        return x + h


def split_heads(channels: int, num_heads: int, head_dim: int | None, who: str) -> tuple[int, int]:
    """(heads, channels per head) for `channels` split into `head_dim`-wide heads when head_dim
    is given, else into `num_heads` heads."""
    if head_dim is not None:
        if head_dim <= 0 or channels % head_dim:
            raise ValueError(f"{who}: channels {channels} not divisible by head_dim {head_dim}")
        return channels // head_dim, head_dim
    if num_heads <= 0 or channels % num_heads:
        raise ValueError(f"{who}: channels {channels} not divisible by num_heads {num_heads}")
    return num_heads, channels // num_heads


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual connection.

        out = x + proj_out(MHA(query(n), key(n), value(n))),   n = norm(x)

    Heads: `head_dim` channels per head when given (ADM's num_head_channels), otherwise
    `num_heads` heads of C / num_heads channels. Scaled by 1/sqrt(head width). The attention
    itself is `flash.attend`, the kernel chosen by `attention_impl` (XLA, blocked, cuDNN, Pallas).

    Attributes:
      num_heads: number of heads (ignored when head_dim is set).
      head_dim: channels per head, or None.
      num_groups / norm_eps: GroupNorm settings.
      attention_impl: the attention kernel, see `flash.attend` ("auto" picks by backend and size).
    """

    num_heads: int = 1
    head_dim: int | None = None
    num_groups: int = 32
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        B, H, W, C = x.shape
        heads, d = split_heads(C, self.num_heads, self.head_dim, "AttentionBlock")

        n = group_norm(self.num_groups, self.norm_eps, self.dtype, "norm")(x)
        n = n.reshape(B, H * W, C)  # [B, T, C]

        def proj(name: str, init=default_init) -> nn.Dense:
            return nn.Dense(
                C, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=init, name=name
            )

        q = proj("query")(n).reshape(B, H * W, heads, d)  # [B, T, N, D]
        k = proj("key")(n).reshape(B, H * W, heads, d)  # [B, T, N, D]
        v = proj("value")(n).reshape(B, H * W, heads, d)  # [B, T, N, D]
        o = attend(q, k, v, implementation=self.attention_impl)  # [B, T, N, D]
        o = o.reshape(B, H, W, C)  # [B, H, W, C]
        return x + proj("proj_out", zero_init)(o)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: [B, H, W, C] -> [B, H/2, W/2, C] (H, W even).

    Attributes:
      padding: 1 pads one pixel on every side (ADM, Stable Diffusion); 0 pads one pixel only
        after each spatial axis (bottom/right), i.e. TensorFlow 'SAME' on even sizes, as in the
        original DDPM code (diffusers' `downsample_padding=0`). The two sample different pixels.
    """

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.padding not in (0, 1):
            raise ValueError(f"Downsample.padding must be 0 or 1, got {self.padding}")
        pad = _PAD1 if self.padding == 1 else ((0, 1), (0, 1))
        return nn.Conv(
            self.channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype,
            param_dtype=jnp.float32, kernel_init=default_init, name="conv",
            conv_general_dilated=conv_lib.conv_general,
        )(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: [B, H, W, C] -> [B, 2H, 2W, C]."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        # the convolution of the upsampled map, applied to x (`conv.upsample_conv`: on the CPU it
        # folds the 3x3 kernel onto x's pixels instead of convolving the 4x larger map)
        return conv3x3(self.channels, self.dtype, "conv", conv_general_dilated=conv_lib.upsample_conv)(x)


def space_to_depth(x: Array, p: int) -> Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p patch becomes one pixel's channels."""
    if p == 1:
        return x
    B, H, W, C = x.shape
    x = x.reshape(B, H // p, p, W // p, p, C)                      # [B, H/p, p, W/p, p, C]
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, H // p, W // p, p * p * C)


def depth_to_space(x: Array, p: int) -> Array:
    """The inverse of `space_to_depth`: [B, h, w, p*p*C] -> [B, h*p, w*p, C]."""
    if p == 1:
        return x
    B, h, w, D = x.shape
    x = x.reshape(B, h, w, p, p, D // (p * p))                      # [B, h, w, p, p, C]
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, h * p, w * p, D // (p * p))
