"""Pixel-space diffusion U-Net (DDPM, Ho et al. 2020; ADM options from Dhariwal & Nichol 2021).

Topology, for `L = len(channel_mult)` resolution levels and `R = num_res_blocks`:

    emb = time_embed(sinusoid(t)) [+ class_embed(labels)]
    h = conv_in(x)                                         -> skip
    down_i (i = 0..L-1): R x (res_j [, attn_j])            -> skip after each
                         downsample (i < L-1)              -> skip
    mid: res_0, attn, res_1
    up_i (i = L-1..0):   (R+1) x (concat(h, skip.pop()), res_j [, attn_j])
                         upsample (i > 0)
    out = conv_out(SiLU(norm_out(h)))

Parameter tree (names are stable; `convert/` maps diffusers checkpoints onto them):

    time_embed/{dense_0,dense_1}    class_embed/embedding [num_classes + 1, 4 * base_channels]
    conv_in
    down_{i}/res_{j}, down_{i}/attn_{j}, down_{i}/downsample
    mid/res_0, mid/attn, mid/res_1
    up_{i}/res_{j}, up_{i}/attn_{j}, up_{i}/upsample
    norm_out, conv_out

`up_{i}` is indexed by resolution level like `down_{i}` (up_0 is the full-resolution block and
runs last); diffusers numbers its up blocks the other way round (up_blocks.{L-1-i}).
Inner names are listed in `layers.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepMLP,
    Upsample,
    conv3x3,
    group_norm,
    timestep_embedding,
)

Array = jax.Array
Dtype = Any


class DownLevel(nn.Module):
    """One encoder level: `num_res_blocks` ResBlocks (each optionally followed by attention),
    then an optional 2x downsampling.

    Returns the output and the list of activations the decoder concatenates back in
    (one per ResBlock, plus the downsampled output).
    """

    channels: int
    num_res_blocks: int
    use_attention: bool
    downsample: bool
    num_heads: int
    head_dim: int | None
    dropout: float
    use_scale_shift_norm: bool
    resblock_updown: bool
    downsample_padding: int
    num_groups: int
    norm_eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, h: Array, emb: Array, *, train: bool) -> tuple[Array, list[Array]]:
        """h: [B, H, W, C_in], emb: [B, D] -> ([B, H', W', channels], skips)."""
        res = functools.partial(
            ResBlock, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
            num_groups=self.num_groups, norm_eps=self.norm_eps, dtype=self.dtype,
        )
        skips = []
        for j in range(self.num_res_blocks):
            h = res(self.channels, name=f"res_{j}")(h, emb, train=train)
            if self.use_attention:
                h = AttentionBlock(
                    self.num_heads, self.head_dim, self.num_groups, self.norm_eps, self.dtype,
                    name=f"attn_{j}",
                )(h)
            skips.append(h)
        if self.downsample:
            if self.resblock_updown:
                h = res(self.channels, resample="down", name="downsample")(h, emb, train=train)
            else:
                h = Downsample(
                    self.channels, self.downsample_padding, self.dtype, name="downsample"
                )(h)
            skips.append(h)
        return h, skips


class UpLevel(nn.Module):
    """One decoder level: `num_res_blocks + 1` ResBlocks, each on the concatenation of the
    running activation and one encoder skip (optionally followed by attention), then an optional
    2x upsampling."""

    channels: int
    num_res_blocks: int
    use_attention: bool
    upsample: bool
    num_heads: int
    head_dim: int | None
    dropout: float
    use_scale_shift_norm: bool
    resblock_updown: bool
    num_groups: int
    norm_eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, h: Array, emb: Array, skips: Sequence[Array], *, train: bool) -> Array:
        """h: [B, H, W, C], emb: [B, D], skips: num_res_blocks + 1 encoder activations, skips[j]
        concatenated before res_j -> [B, H', W', channels]."""
        if len(skips) != self.num_res_blocks + 1:
            raise ValueError(f"UpLevel needs {self.num_res_blocks + 1} skips, got {len(skips)}")
        res = functools.partial(
            ResBlock, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
            num_groups=self.num_groups, norm_eps=self.norm_eps, dtype=self.dtype,
        )
        for j, skip in enumerate(skips):
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)  # [B, H, W, C + C_skip]
            h = res(self.channels, name=f"res_{j}")(h, emb, train=train)
            if self.use_attention:
                h = AttentionBlock(
                    self.num_heads, self.head_dim, self.num_groups, self.norm_eps, self.dtype,
                    name=f"attn_{j}",
                )(h)
        if self.upsample:
            if self.resblock_updown:
                h = res(self.channels, resample="up", name="upsample")(h, emb, train=train)
            else:
                h = Upsample(self.channels, self.dtype, name="upsample")(h)
        return h


class MidBlock(nn.Module):
    """ResBlock -> self-attention -> ResBlock at the lowest resolution (shape-preserving)."""

    channels: int
    num_heads: int
    head_dim: int | None
    dropout: float
    use_scale_shift_norm: bool
    num_groups: int
    norm_eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, h: Array, emb: Array, *, train: bool) -> Array:
        """h: [B, H, W, channels] -> [B, H, W, channels]."""
        res = functools.partial(
            ResBlock, self.channels, dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm, num_groups=self.num_groups,
            norm_eps=self.norm_eps, dtype=self.dtype,
        )
        h = res(name="res_0")(h, emb, train=train)
        h = AttentionBlock(
            self.num_heads, self.head_dim, self.num_groups, self.norm_eps, self.dtype, name="attn"
        )(h)
        return res(name="res_1")(h, emb, train=train)


class UNet(nn.Module):
    """Noise-prediction U-Net on NHWC images.

    Attributes:
      out_channels: channels of the prediction (3 for RGB eps; 6 when also learning variances).
      base_channels: width of level 0; level i has base_channels * channel_mult[i] channels.
      channel_mult: per-level width multipliers; there are len(channel_mult) resolution levels
        and len(channel_mult) - 1 downsamplings, so H and W must be divisible by
        2 ** (len(channel_mult) - 1).
      num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
      attention_levels: indices of levels that get self-attention after every ResBlock
        (level i works at resolution H / 2**i). The middle block always has attention.
      num_heads: attention heads (used when head_dim is None).
      head_dim: channels per attention head; overrides num_heads when set.
      dropout: dropout rate inside ResBlocks (active only with train=True).
      use_scale_shift_norm: ADM-style (1 + scale) * norm(h) + shift time conditioning.
      resblock_updown: resample with ResBlocks instead of strided conv / nearest+conv (ADM).
      downsample_padding: padding of the strided conv, 1 (symmetric) or 0 (bottom/right only,
        the original DDPM/TensorFlow alignment); see `layers.Downsample`.
      num_groups: GroupNorm groups (every width must be divisible by it).
      norm_eps: GroupNorm epsilon.
      num_classes: if set, class-conditional: an embedding table with num_classes + 1 rows is
        added to the time embedding; row `num_classes` is the null (unconditional) class used
        for classifier-free guidance.
      flip_sin_to_cos / freq_shift: timestep sinusoid convention (see `timestep_embedding`).
      patch_size: fold each p x p patch of pixels into channels before `conv_in` and unfold
        after `conv_out` (space-to-depth, as in Hoogeboom et al. 2023's "simple diffusion"), so
        the first level runs at H/p x W/p. On CPUs, where 3x3 convolutions at full resolution
        dominate the cost, p=2 makes a step several times cheaper for small images.
      dtype: compute dtype (e.g. jnp.bfloat16). Parameters are always float32 and the output is
        returned in float32.
    """

    out_channels: int
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1,)
    num_heads: int = 1
    head_dim: int | None = None
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    downsample_padding: int = 1
    num_groups: int = 32
    norm_eps: float = 1e-5
    num_classes: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    patch_size: int = 1
    dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def _check_inputs(self, x: Array, t: Array, labels: Array | None) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape [B, H, W, C] (NHWC), got shape {x.shape}")
        B, H, W, _ = x.shape
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(
                f"UNet: image height and width must be divisible by {f} "
                f"(= patch_size * 2**(len(channel_mult)-1) with patch_size={self.patch_size}, "
                f"channel_mult={self.channel_mult}); got input "
                f"shape {tuple(x.shape)} ([B, H, W, C]). Pad or resize the images, or use fewer "
                f"resolution levels."
            )
        for lvl in self.attention_levels:
            if not 0 <= lvl < len(self.channel_mult):
                raise ValueError(
                    f"UNet: attention_levels={self.attention_levels} has level {lvl}, but there "
                    f"are only levels 0..{len(self.channel_mult) - 1}"
                )
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, B)):
            raise ValueError(f"UNet: t must be a scalar or shape [B]=[{B}], got shape {t.shape}")
        if labels is not None and self.num_classes is None:
            raise ValueError(
                "UNet: labels were given but the model is unconditional (num_classes=None). "
                "Build it with num_classes=<number of classes> or call it without labels."
            )
        if labels is None and self.num_classes is not None:
            raise ValueError(
                f"UNet: this model is class-conditional (num_classes={self.num_classes}) and needs "
                f"labels of shape [B]; for unconditional outputs pass the null class, "
                f"labels=jnp.full((B,), {self.num_classes})."
            )
        if labels is not None and (
            labels.shape != (B,) or not jnp.issubdtype(labels.dtype, jnp.integer)
        ):
            raise ValueError(
                f"UNet: labels must be integers of shape [B]=[{B}], "
                f"got {labels.dtype}{list(labels.shape)}"
            )

    @nn.compact
    def __call__(
        self, x: Array, t: Array, labels: Array | None = None, *, train: bool = False
    ) -> Array:
        """Predict the network output for noisy images.

        Args:
          x: [B, H, W, C] noisy images (NHWC).
          t: [B] or scalar timesteps on the training scale (e.g. 0..999), float or int.
          labels: [B] int class ids in [0, num_classes] (num_classes = null class), or None for
            an unconditional model.
          train: enables dropout (needs the 'dropout' rng).
        Returns:
          [B, H, W, out_channels] float32.
        """
        t = jnp.asarray(t)
        labels = None if labels is None else jnp.asarray(labels)
        self._check_inputs(x, t, labels)
        B = x.shape[0]
        t = jnp.broadcast_to(t.astype(jnp.float32), (B,))  # [B]

        emb_dim = 4 * self.base_channels
        emb = timestep_embedding(
            t, self.base_channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )  # [B, base_channels] float32
        emb = TimestepMLP(emb_dim, self.dtype, name="time_embed")(emb)  # [B, emb_dim]
        if self.num_classes is not None:
            emb = emb + nn.Embed(
                self.num_classes + 1, emb_dim, dtype=self.dtype, param_dtype=jnp.float32,
                embedding_init=nn.initializers.normal(1.0), name="class_embed",
            )(labels)

        common = dict(
            num_heads=self.num_heads, head_dim=self.head_dim, dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm, num_groups=self.num_groups,
            norm_eps=self.norm_eps, dtype=self.dtype,
        )
        num_levels = len(self.channel_mult)

        x = space_to_depth(x, self.patch_size)                     # [B, H/p, W/p, C*p*p]
        h = conv3x3(self.base_channels, self.dtype, "conv_in")(x)  # [B, H/p, W/p, base]
        skips = [h]
        for i, mult in enumerate(self.channel_mult):
            h, level_skips = DownLevel(
                self.base_channels * mult, self.num_res_blocks,
                use_attention=i in self.attention_levels, downsample=i < num_levels - 1,
                resblock_updown=self.resblock_updown, downsample_padding=self.downsample_padding,
                name=f"down_{i}", **common,
            )(h, emb, train=train)
            skips.extend(level_skips)

        h = MidBlock(h.shape[-1], name="mid", **common)(h, emb, train=train)

        for i in reversed(range(num_levels)):
            # the decoder takes encoder activations back in reverse order of production
            level_skips = [skips.pop() for _ in range(self.num_res_blocks + 1)]
            h = UpLevel(
                self.base_channels * self.channel_mult[i], self.num_res_blocks,
                use_attention=i in self.attention_levels, upsample=i > 0,
                resblock_updown=self.resblock_updown, name=f"up_{i}", **common,
            )(h, emb, level_skips, train=train)
        assert not skips, "every encoder activation is consumed by the decoder"

        h = group_norm(self.num_groups, self.norm_eps, self.dtype, "norm_out")(h)
        h = nn.silu(h)
        p = self.patch_size
        h = conv3x3(self.out_channels * p * p, self.dtype, "conv_out", zero=True)(h)
        h = depth_to_space(h, p)                                  # [B, H, W, out]
        return h.astype(jnp.float32)


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


# DDPM CIFAR-10 network (Ho et al. 2020, Appendix B): 32x32 input, four levels 32/16/8/4,
# attention at 16x16, dropout 0.1, DDPM sinusoid convention.
ddpm_cifar10 = functools.partial(
    UNet,
    out_channels=3,
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_levels=(1,),
    num_heads=1,
    dropout=0.1,
    downsample_padding=0,
    num_groups=32,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1.0,
)

# Small CPU-friendly network for 28x28x1 digits: levels 28/14/7 with 16/32/64 channels,
# attention only at 7x7. On CPU the 3x3 convolutions at 28x28 (and above all their weight
# gradients) dominate the step time, so level 0 is kept narrow and width is added where the
# images are small: 16 channels at level 0 costs about a third of 32.
tiny = functools.partial(
    UNet,
    out_channels=1,
    base_channels=16,
    channel_mult=(1, 2, 4),
    num_res_blocks=1,
    attention_levels=(2,),
    num_heads=1,
    dropout=0.0,
    num_groups=8,
)

CONFIGS = {"ddpm_cifar10": ddpm_cifar10, "tiny": tiny}
