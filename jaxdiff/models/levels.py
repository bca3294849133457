"""The U-Net's resolution levels: an encoder level (ResBlocks, optional attention, downsample),
the middle block and a decoder level (ResBlocks on the concatenated skips, optional attention,
upsample), each a linen module the `UNet` in `unet.py` stacks; and the rematerialisation policies
that wrap their blocks.

Parameter names inside a level (`res_{j}`, `attn_{j}`, `downsample`, `upsample`; the mid block's
`res_0`, `attn`, `res_1`) are part of the U-Net's stable tree (see `unet.py`, `convert/unet.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import SpatialTransformer
from jaxdiff.models.layers import AttentionBlock, Downsample, ResBlock, Upsample

Array = jax.Array
Dtype = Any


# Rematerialisation (gradient checkpointing) of every residual and attention block, by how much
# of a block's forward pass the backward pass keeps: "none" keeps every activation; "dots" keeps
# the results of matrix multiplications without batch dimensions (the projections) and
# recomputes convolutions, norms and attention; "full" keeps only each block's input.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def checkpointed(cls, remat: str, static_argnums=()):
    """`cls` wrapped in `nn.remat` with the named policy (itself for "none"); parameter names do
    not change. static_argnums count `self` as 0."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"UNet: remat={remat!r} is not valid; choose one of {', '.join(REMAT_POLICIES)}")
    if remat == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[remat], static_argnums=static_argnums)



class _WithAttention(nn.Module):
    """Fields shared by the blocks that hold attention, and the choice of attention kind.

    Not used on its own: DownLevel, UpLevel and MidBlock derive from it.
    """

    num_heads: int
    head_dim: int | None
    num_groups: int
    norm_eps: float
    context_dim: int | None
    transformer_depth: int
    use_linear_projection: bool
    upcast_attention: bool
    dropout: float
    use_scale_shift_norm: bool
    remat: str
    dtype: Dtype
    attention_impl: str

    def res_block(self, out_channels: int, name: str, **kwargs) -> nn.Module:
        """A ResBlock of this level (rematerialised per `remat`), called as block(h, emb, train)."""
        block = checkpointed(ResBlock, self.remat, static_argnums=(3,))
        return block(out_channels, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                     num_groups=self.num_groups, norm_eps=self.norm_eps, dtype=self.dtype, name=name, **kwargs)

    def attention(self, h: Array, context: Array | None, name: str) -> Array:
        """Self-attention (pixel network) or the cross-attention transformer on `context`."""
        if self.context_dim is None:
            return checkpointed(AttentionBlock, self.remat)(
                self.num_heads, self.head_dim, self.num_groups, self.norm_eps, self.dtype,
                self.attention_impl, name=name,
            )(h)
        return checkpointed(SpatialTransformer, self.remat)(
            self.num_heads, self.head_dim, self.transformer_depth, self.num_groups,
            self.use_linear_projection, self.upcast_attention, self.dtype, self.attention_impl,
            name=name,
        )(h, context)


class DownLevel(_WithAttention):
    """One encoder level: `num_res_blocks` ResBlocks (each optionally followed by attention),
    then an optional 2x downsampling.

    Returns the output and the list of activations the decoder concatenates back in
    (one per ResBlock, plus the downsampled output).
    """

    channels: int
    num_res_blocks: int
    use_attention: bool
    downsample: bool
    resblock_updown: bool
    downsample_padding: int

    @nn.compact
    def __call__(
        self, h: Array, emb: Array, context: Array | None, train: bool = False
    ) -> tuple[Array, list[Array]]:
        """h: [B, H, W, C_in], emb: [B, D], context: [B, S, context_dim] or None
        -> ([B, H', W', channels], skips)."""
        skips = []
        for j in range(self.num_res_blocks):
            h = self.res_block(self.channels, f"res_{j}")(h, emb, train)
            if self.use_attention:
                h = self.attention(h, context, f"attn_{j}")
            skips.append(h)
        if self.downsample:
            if self.resblock_updown:
                h = self.res_block(self.channels, "downsample", resample="down")(h, emb, train)
            else:
                h = Downsample(
                    self.channels, self.downsample_padding, self.dtype, name="downsample"
                )(h)
            skips.append(h)
        return h, skips


class UpLevel(_WithAttention):
    """One decoder level: `num_res_blocks + 1` ResBlocks, each on the concatenation of the
    running activation and one encoder skip (optionally followed by attention), then an optional
    2x upsampling."""

    channels: int
    num_res_blocks: int
    use_attention: bool
    upsample: bool
    resblock_updown: bool

    @nn.compact
    def __call__(
        self, h: Array, emb: Array, skips: Sequence[Array], context: Array | None,
        train: bool = False,
    ) -> Array:
        """h: [B, H, W, C], emb: [B, D], skips: num_res_blocks + 1 encoder activations, skips[j]
        concatenated before res_j, context: [B, S, context_dim] or None
        -> [B, H', W', channels]."""
        if len(skips) != self.num_res_blocks + 1:
            raise ValueError(f"UpLevel needs {self.num_res_blocks + 1} skips, got {len(skips)}")
        for j, skip in enumerate(skips):
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)  # [B, H, W, C + C_skip]
            h = self.res_block(self.channels, f"res_{j}")(h, emb, train)
            if self.use_attention:
                h = self.attention(h, context, f"attn_{j}")
        if self.upsample:
            if self.resblock_updown:
                h = self.res_block(self.channels, "upsample", resample="up")(h, emb, train)
            else:
                h = Upsample(self.channels, self.dtype, name="upsample")(h)
        return h


class MidBlock(_WithAttention):
    """ResBlock -> attention -> ResBlock at the lowest resolution (shape-preserving)."""

    channels: int

    @nn.compact
    def __call__(self, h: Array, emb: Array, context: Array | None, train: bool = False) -> Array:
        """h: [B, H, W, channels], context: [B, S, context_dim] or None
        -> [B, H, W, channels]."""
        h = self.res_block(self.channels, "res_0")(h, emb, train)
        h = self.attention(h, context, "attn")
        return self.res_block(self.channels, "res_1")(h, emb, train)


def add_residuals(skips: list[Array], h: Array, down_residuals: Sequence[Array] | None,
                  mid_residual: Array | None) -> tuple[list[Array], Array]:
    """The encoder activations and the middle block's output with a ControlNet's residuals added
    (each residual shaped like its activation [B, h, w, C], or [B, 1, 1, C] from a pooling
    ControlNet; None adds nothing)."""
    def fits(got, want):
        return got == tuple(want) or got == (want[0], 1, 1, want[3])

    if down_residuals is not None:
        want, got = [s.shape for s in skips], [tuple(jnp.shape(r)) for r in down_residuals]
        if len(got) != len(want) or not all(map(fits, got, want)):
            raise ValueError(f"UNet: down_residuals must be {len(want)} arrays shaped like the encoder "
                             f"activations, {[list(s) for s in want]}; got {[list(s) for s in got]}")
        skips = [s + jnp.asarray(r).astype(s.dtype) for s, r in zip(skips, down_residuals)]
    if mid_residual is not None:
        if not fits(tuple(jnp.shape(mid_residual)), h.shape):
            raise ValueError(f"UNet: mid_residual must have the middle block's shape {list(h.shape)}, "
                             f"got {list(jnp.shape(mid_residual))}")
        h = h + jnp.asarray(mid_residual).astype(h.dtype)
    return skips, h
