"""Diffusion U-Net: pixel-space DDPM (Ho et al. 2020) with ADM options (Dhariwal & Nichol
2021), and the text-conditioned latent U-Net of Stable Diffusion (Rombach et al. 2022; diffusers'
`UNet2DConditionModel`), as one module.

Topology, for `L = len(channel_mult)` resolution levels and `R = num_res_blocks`:

    emb = time_embed(sinusoid(t)) [+ class_embed(labels)] [+ add_embed(text_embeds, time_ids)]
    h = conv_in(x)                                         -> skip
    down_i (i = 0..L-1): R x (res_j [, attn_j])            -> skip after each
                         downsample (i < L-1)              -> skip
    mid: res_0, attn, res_1
    up_i (i = L-1..0):   (R+1) x (concat(h, skip.pop()), res_j [, attn_j])
                         upsample (i > 0)
    out = conv_out(SiLU(norm_out(h)))

"attn" is spatial self-attention (`layers.AttentionBlock`) in the pixel network
(`context_dim=None`) and a cross-attention transformer (`attention.SpatialTransformer`) on a
context sequence (text-encoder hidden states) when `context_dim` is set; the mid block's attention
is of the same kind. SDXL's micro-conditioning ("text_time": pooled text embedding and size/crop
numbers added to the time embedding) is `add_embed`.

Parameter tree (names are stable; `convert/` maps diffusers checkpoints onto them):

    time_embed/{dense_0,dense_1}    class_embed/embedding [num_classes + 1, 4 * base_channels]
    add_embed/{dense_0,dense_1}     (only with addition_embed_dim)
    conv_in
    down_{i}/res_{j}, down_{i}/attn_{j}, down_{i}/downsample
    mid/res_0, mid/attn, mid/res_1
    up_{i}/res_{j}, up_{i}/attn_{j}, up_{i}/upsample
    norm_out, conv_out

`up_{i}` is indexed by resolution level like `down_{i}` (up_0 is the full-resolution block and
runs last); diffusers numbers its up blocks the other way round (up_blocks.{L-1-i}).
Inner names are listed in `layers.py` and `attention.py`.

Deep feature reuse (DeepCache, Ma et al. 2023): `__call__(..., return_deep_feature=True)` also
returns the feature the deep levels hand the shallow decoder levels, and `__call__(...,
deep_feature=f)` runs only the shallow branch from such a cached feature (`deep_feature_shape`
documents the cache point, `cache_level`); the parameter tree is the same.

On one CPU device a large enough call runs as two half batches through the same parameters
(`conv.batch_parts`: XLA's runtime runs the two independent halves side by side, 1.2x faster for
the demo network at batch 64); `__call__` checks and slices the inputs, `forward` is the network.

Why this file is long: the one U-Net serves the pixel DDPM/ADM networks, SD 1/2 and SDXL, with
ControlNet residuals and deep feature reuse on the same call path; the input checks that give
one-line errors for each of those conditioning kinds are most of its length (the levels
themselves live in `levels.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import conv
from jaxdiff.models.layers import (TimestepMLP, conv3x3, depth_to_space, group_norm, space_to_depth,
                                   timestep_embedding)
from jaxdiff.models.levels import REMAT_POLICIES, DownLevel, MidBlock, UpLevel, add_residuals  # noqa: F401

Array = jax.Array
Dtype = Any


class UNet(nn.Module):
    """Noise-prediction U-Net on NHWC images (pixels or latents).

    Attributes:
      out_channels: channels of the prediction (3 for RGB eps; 6 when also learning variances;
        4 for Stable Diffusion latents).
      base_channels: width of level 0; level i has base_channels * channel_mult[i] channels.
      channel_mult: per-level width multipliers; there are len(channel_mult) resolution levels
        and len(channel_mult) - 1 downsamplings, so H and W must be divisible by
        2 ** (len(channel_mult) - 1).
      num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
      attention_levels: indices of levels that get attention after every ResBlock
        (level i works at resolution H / 2**i). The middle block always has attention.
      num_heads: attention heads (used when head_dim is None): one count for every level, or a
        tuple with one per level (the middle block uses the last level's). Stable Diffusion
        1.x uses 8 everywhere; 2.x uses (5, 10, 20, 20), i.e. 64 channels per head. (diffusers
        calls this number `attention_head_dim` in its configs.)
      head_dim: channels per attention head; overrides num_heads when set.
      dropout: dropout rate inside ResBlocks (active only with train=True).
      use_scale_shift_norm: ADM-style (1 + scale) * norm(h) + shift time conditioning.
      resblock_updown: resample with ResBlocks instead of strided conv / nearest+conv (ADM).
      downsample_padding: padding of the strided conv, 1 (symmetric) or 0 (bottom/right only,
        the original DDPM/TensorFlow alignment); see `layers.Downsample`.
      num_groups: GroupNorm groups (every width must be divisible by it).
      norm_eps: GroupNorm epsilon (ResBlocks, pixel attention, output norm).
      num_classes: if set, class-conditional: an embedding table with num_classes + 1 rows is
        added to the time embedding; row `num_classes` is the null (unconditional) class used
        for classifier-free guidance.
      flip_sin_to_cos / freq_shift: timestep sinusoid convention (see `timestep_embedding`).
      patch_size: fold each p x p patch of pixels into channels before `conv_in` and unfold
        after `conv_out` (space-to-depth, as in Hoogeboom et al. 2023's "simple diffusion"), so
        the first level runs at H/p x W/p. On CPUs, where 3x3 convolutions at full resolution
        dominate the cost, p=2 makes a step several times cheaper for small images.
      in_channels: channels of x, checked when set (4 for SD latents, 9 for SD inpainting:
        latents + mask + masked-image latents); None takes them from x.
      context_dim: width of the conditioning sequence (768 for SD 1.x's CLIP ViT-L, 1024 for
        SD 2.x's OpenCLIP ViT-H, 2048 for SDXL). When set, every attention is a cross-attention
        transformer (`attention.SpatialTransformer`) and the call needs `context`; None is the
        pixel network with spatial self-attention.
      transformer_depth: TransformerBlocks per SpatialTransformer, one number or one per level
        (the middle block uses the last level's); SDXL uses (1, 2, 10).
      use_linear_projection: SpatialTransformer projections as linear layers (SD 2.x, SDXL)
        rather than 1x1 convolutions (SD 1.x).
      upcast_attention: attention in float32 whatever `dtype` (see `attention.Attention`).
      addition_embed_dim: SDXL micro-conditioning. If set, `add_embed` (an MLP like
        `time_embed`) maps concat(text_embeds, sinusoid(time_ids)) of this width to the time
        embedding, to which it is added; the call then needs `text_embeds` and `time_ids`.
        (diffusers: `addition_embed_type="text_time"`, `projection_class_embeddings_input_dim`.)
      addition_time_embed_dim: sinusoid width per entry of time_ids (SDXL: 256).
      sample_size: the spatial size the network was trained at (SD 1.5: 64 latents for
        512-pixel images). Not used by the network; kept for pipelines and checkpoints.
      remat: rematerialise every ResBlock and attention block in the backward pass to save
        activation memory: "none", "dots" or "full" (see `REMAT_POLICIES`); the forward pass and
        the parameters are the same.
      dtype: compute dtype (e.g. jnp.bfloat16). Parameters are always float32 and the output is
        returned in float32.
      attention_impl: the attention kernel of every attention layer, "auto", "xla", "blocked",
        "cudnn" or "pallas" (see `flash.attend`); the parameters are the same.
    """

    out_channels: int
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1,)
    num_heads: int | tuple[int, ...] = 1
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
    in_channels: int | None = None
    context_dim: int | None = None
    transformer_depth: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_dim: int | None = None
    addition_time_embed_dim: int = 256
    sample_size: int | None = None
    remat: str = "none"
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def per_level(self, name: str) -> tuple[int, ...]:
        """`num_heads` or `transformer_depth` spelled out with one entry per level."""
        value, n = getattr(self, name), len(self.channel_mult)
        if isinstance(value, int):
            return (value,) * n
        value = tuple(value)
        if len(value) != n:
            raise ValueError(
                f"UNet: {name}={value} has {len(value)} entries but there are {n} levels "
                f"(channel_mult={self.channel_mult}); give one number or one per level"
            )
        return value

    def example_inputs(self, batch: int = 1, size: int | None = None,
                       in_channels: int | None = None) -> dict[str, Array]:
        """Zero inputs of the right shapes for `init` / `jax.eval_shape`:
        `module.init(key, **module.example_inputs())`.

        size defaults to the smallest valid H = W; in_channels to the field (else 4 with
        context_dim, 3 without). The sequence length of `context` is 1 (parameters do not
        depend on it)."""
        size = size or self.downsample_factor
        c = in_channels or self.in_channels or (4 if self.context_dim is not None else 3)
        out = {"x": jnp.zeros((batch, size, size, c)), "t": jnp.zeros((batch,))}
        if self.num_classes is not None:
            out["labels"] = jnp.zeros((batch,), jnp.int32)
        if self.context_dim is not None:
            out["context"] = jnp.zeros((batch, 1, self.context_dim))
        if self.addition_embed_dim is not None:
            n_ids = 1 if self.addition_embed_dim > self.addition_time_embed_dim else 0
            out["text_embeds"] = jnp.zeros(
                (batch, self.addition_embed_dim - n_ids * self.addition_time_embed_dim))
            out["time_ids"] = jnp.zeros((batch, n_ids))
        return out

    def _check_inputs(self, x: Array, t: Array, labels: Array | None, context: Array | None,
                      text_embeds: Array | None, time_ids: Array | None) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape [B, H, W, C] (NHWC), got shape {x.shape}")
        B, H, W, C = x.shape
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(
                f"UNet: image height and width must be divisible by {f} "
                f"(= patch_size * 2**(len(channel_mult)-1) with patch_size={self.patch_size}, "
                f"channel_mult={self.channel_mult}); got input "
                f"shape {tuple(x.shape)} ([B, H, W, C]). Pad or resize the images, or use fewer "
                f"resolution levels."
            )
        if self.in_channels is not None and C != self.in_channels:
            raise ValueError(
                f"UNet: x has {C} channels ([B, H, W, C]={tuple(x.shape)}) but the network was "
                f"built for in_channels={self.in_channels}"
            )
        for lvl in self.attention_levels:
            if not 0 <= lvl < len(self.channel_mult):
                raise ValueError(
                    f"UNet: attention_levels={self.attention_levels} has level {lvl}, but there "
                    f"are only levels 0..{len(self.channel_mult) - 1}"
                )
        self.per_level("num_heads"), self.per_level("transformer_depth")  # raise if mis-sized
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
        if context is not None and self.context_dim is None:
            raise ValueError(
                "UNet: context was given but the model has no cross-attention "
                "(context_dim=None). Build it with context_dim=<width of the context vectors> "
                "or call it without context."
            )
        if context is None and self.context_dim is not None:
            raise ValueError(
                f"UNet: this model is text-conditioned (context_dim={self.context_dim}) and needs "
                f"context of shape [B, S, {self.context_dim}], the text encoder's hidden states "
                f"(for unconditional outputs, those of the empty prompt)."
            )
        if context is not None and (
            context.ndim != 3 or context.shape[0] != B or context.shape[2] != self.context_dim
        ):
            raise ValueError(
                f"UNet: context must have shape [B, S, context_dim]=[{B}, S, {self.context_dim}], "
                f"got {list(context.shape)}"
            )
        self._check_added(B, text_embeds, time_ids)

    def _check_added(self, B: int, text_embeds: Array | None, time_ids: Array | None) -> None:
        given = text_embeds is not None or time_ids is not None
        if given and self.addition_embed_dim is None:
            raise ValueError(
                "UNet: text_embeds/time_ids were given but the model has no added "
                "conditioning (addition_embed_dim=None); call it without them."
            )
        if self.addition_embed_dim is None:
            return
        if text_embeds is None or time_ids is None:
            raise ValueError(
                f"UNet: this model adds micro-conditioning to the time embedding "
                f"(addition_embed_dim={self.addition_embed_dim}) and needs text_embeds [B, D] "
                f"(the pooled text embedding) and time_ids [B, n] (SDXL: original size, crop "
                f"top-left and target size, n=6)."
            )
        te, ti = jnp.shape(text_embeds), jnp.shape(time_ids)
        if len(te) != 2 or len(ti) != 2 or te[0] != B or ti[0] != B:
            raise ValueError(
                f"UNet: text_embeds must be [B, D] and time_ids [B, n] with B={B}, got "
                f"{list(te)} and {list(ti)}"
            )
        width = te[1] + ti[1] * self.addition_time_embed_dim
        if width != self.addition_embed_dim:
            raise ValueError(
                f"UNet: text_embeds {list(te)} and time_ids {list(ti)} give D + n * "
                f"{self.addition_time_embed_dim} = {width} features, but the network was built "
                f"for addition_embed_dim={self.addition_embed_dim}"
            )

    # The encoder half, shared with `controlnet.ControlNet` (called inside a compact __call__, so
    # the submodules they make belong to the caller and keep the names listed above).

    def _level_fields(self) -> dict:
        return {
            "head_dim": self.head_dim, "dropout": self.dropout,
            "use_scale_shift_norm": self.use_scale_shift_norm, "num_groups": self.num_groups,
            "norm_eps": self.norm_eps, "context_dim": self.context_dim,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention, "remat": self.remat, "dtype": self.dtype,
            "attention_impl": self.attention_impl,
        }

    def embed(self, t: Array, batch: int, labels: Array | None, text_embeds: Array | None,
              time_ids: Array | None) -> Array:
        """The time embedding [B, 4 * base_channels] (time_embed [+ class_embed] [+ add_embed]);
        t: [B] or scalar."""
        t = jnp.broadcast_to(jnp.asarray(t).astype(jnp.float32), (batch,))  # [B]
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
        if self.addition_embed_dim is not None:
            ids = timestep_embedding(
                jnp.asarray(time_ids).reshape(-1), self.addition_time_embed_dim,
                flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
            ).reshape(batch, -1)  # [B, n * addition_time_embed_dim]
            added = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), ids], axis=-1)
            emb = emb + TimestepMLP(emb_dim, self.dtype, name="add_embed")(added)
        return emb

    def encode(self, h: Array, emb: Array, context: Array | None, train: bool, levels: int | None = None
               ) -> tuple[Array, list[Array]]:
        """The down levels on h = conv_in(x) [B, H, W, base] -> (the lowest level's output, the
        encoder activations: h, then each level's, the skips the decoder takes back). `levels`
        runs only the first that many levels (None: all)."""
        heads, depth = self.per_level("num_heads"), self.per_level("transformer_depth")
        num_levels = len(self.channel_mult)
        skips = [h]
        for i, mult in enumerate(self.channel_mult[:levels]):
            h, level_skips = DownLevel(
                channels=self.base_channels * mult, num_res_blocks=self.num_res_blocks,
                use_attention=i in self.attention_levels, downsample=i < num_levels - 1,
                resblock_updown=self.resblock_updown, downsample_padding=self.downsample_padding,
                num_heads=heads[i], transformer_depth=depth[i], name=f"down_{i}",
                **self._level_fields(),
            )(h, emb, context, train)
            skips.extend(level_skips)
        return h, skips

    def middle(self, h: Array, emb: Array, context: Array | None, train: bool) -> Array:
        """The middle block: [B, h, w, C] -> [B, h, w, C]."""
        heads, depth = self.per_level("num_heads"), self.per_level("transformer_depth")
        return MidBlock(
            channels=h.shape[-1], num_heads=heads[-1], transformer_depth=depth[-1], name="mid",
            **self._level_fields(),
        )(h, emb, context, train)

    def __call__(
        self,
        x: Array,
        t: Array,
        labels: Array | None = None,
        *,
        context: Array | None = None,
        text_embeds: Array | None = None,
        time_ids: Array | None = None,
        down_residuals: Sequence[Array] | None = None,
        mid_residual: Array | None = None,
        train: bool = False,
        deep_feature: Array | None = None,
        return_deep_feature: bool = False,
        cache_level: int = 1,
    ) -> Array | tuple[Array, Array]:
        """Predict the network output for noisy images.

        Args:
          x: [B, H, W, C] noisy images or latents (NHWC).
          t: [B] or scalar timesteps on the training scale (e.g. 0..999), float or int.
          labels: [B] int class ids in [0, num_classes] (num_classes = null class), or None for
            a model without classes.
          context: [B, S, context_dim] conditioning sequence (text-encoder hidden states) when
            context_dim is set, else None.
          text_embeds: [B, D] pooled text embedding and time_ids: [B, n] micro-conditioning
            numbers, both only when addition_embed_dim is set (SDXL).
          down_residuals: one array per encoder activation (conv_in's output, then each down
            level's, shaped like them), added to them before the decoder takes them back (a
            ControlNet's residuals; diffusers' `down_block_additional_residuals`).
          mid_residual: [B, H/f, W/f, C_mid] added to the middle block's output (diffusers'
            `mid_block_additional_residual`).
          train: enables dropout (needs the 'dropout' rng).
          deep_feature, return_deep_feature, cache_level: deep feature reuse (DeepCache, Ma et
            al. 2023), see `deep_feature_shape`. With return_deep_feature=True the call also
            returns the deep feature [B, h_c, w_c, C_c]: the input of decoder level
            `cache_level - 1`, i.e. what the levels >= cache_level and the middle block hand
            the shallow part of the decoder. Given `deep_feature` (such an array from an
            earlier call), the call runs only the shallow branch on it: the time embedding,
            conv_in, encoder levels < cache_level (their skips), decoder levels < cache_level
            and the output head; the deeper blocks are not run. The parameters are the same.
        Returns:
          [B, H, W, out_channels] float32; with return_deep_feature=True, (that, the deep
          feature in the compute dtype; the given one when `deep_feature` was given).
        """
        t = jnp.asarray(t)
        labels = None if labels is None else jnp.asarray(labels)
        context = None if context is None else jnp.asarray(context)
        self._check_inputs(x, t, labels, context, text_embeds, time_ids)
        reuse = deep_feature is not None or return_deep_feature
        if reuse:
            want = self.deep_feature_shape(x.shape, cache_level)
            if deep_feature is not None and tuple(deep_feature.shape) != want:
                raise ValueError(f"UNet: deep_feature must have shape {list(want)} (cache_level={cache_level}), "
                                 f"got {list(deep_feature.shape)}")
            if deep_feature is not None and (down_residuals is not None or mid_residual is not None):
                raise ValueError("UNet: a shallow call from deep_feature takes no ControlNet residuals")
        batch = {"x": x, "t": jnp.broadcast_to(t, x.shape[:1]), "labels": labels, "context": context,
                 "text_embeds": text_embeds, "time_ids": time_ids, "down_residuals": down_residuals,
                 "mid_residual": mid_residual, "deep_feature": deep_feature}
        flags = {"train": train, "return_deep_feature": return_deep_feature, "cache_level": cache_level}
        parts = conv.batch_parts(x.shape)
        if any(jnp.shape(a)[:1] != x.shape[:1] for a in jax.tree.leaves(batch)):
            parts = 1                          # a mis-sized input: `forward`'s check names the whole shapes
        if parts == 1:
            return self.forward(**batch, **flags)
        # independent slices of the batch through the same parameters (see `conv.batch_parts`);
        # dropout draws a new key for each call
        size = x.shape[0] // parts
        outs = [self.forward(**jax.tree.map(lambda a, i=i: a[i * size:(i + 1) * size], batch), **flags)
                for i in range(parts)]
        out = jax.tree.map(lambda *o: jnp.concatenate(o), *outs)
        return (out[0], deep_feature) if return_deep_feature and deep_feature is not None else out

    @nn.compact
    def forward(self, x: Array, t: Array, labels: Array | None, context: Array | None,
                text_embeds: Array | None, time_ids: Array | None, down_residuals: Sequence[Array] | None,
                mid_residual: Array | None, deep_feature: Array | None, *, train: bool,
                return_deep_feature: bool, cache_level: int) -> Array | tuple[Array, Array]:
        """`__call__` on checked inputs (t: [B]), the whole network; `__call__` may run it on
        slices of the batch."""
        reuse = deep_feature is not None or return_deep_feature
        emb = self.embed(t, x.shape[0], labels, text_embeds, time_ids)           # [B, 4 * base]

        x = space_to_depth(x, self.patch_size)                     # [B, H/p, W/p, C*p*p]
        h = conv3x3(self.base_channels, self.dtype, "conv_in")(x)  # [B, H/p, W/p, base]
        num_levels = len(self.channel_mult)
        if deep_feature is None:
            h, skips = self.encode(h, emb, context, train)
            h = self.middle(h, emb, context, train)
            skips, h = add_residuals(skips, h, down_residuals, mid_residual)
            top = num_levels - 1                                   # the first decoder level to run
        else:
            _, skips = self.encode(h, emb, context, train, levels=cache_level)
            # decoder levels < cache_level take back conv_in's output and the skips of encoder
            # levels < cache_level, all but the last level's downsampled output
            skips = skips[:cache_level * (self.num_res_blocks + 1)]
            h = deep_feature.astype(self.dtype)                    # [B, h_c, w_c, C_c]
            top = cache_level - 1
        feature = deep_feature

        heads, depth = self.per_level("num_heads"), self.per_level("transformer_depth")
        for i in reversed(range(top + 1)):
            if reuse and deep_feature is None and i == cache_level - 1:
                feature = h                                        # [B, h_c, w_c, C_c]
            # the decoder takes encoder activations back in reverse order of production
            level_skips = [skips.pop() for _ in range(self.num_res_blocks + 1)]
            h = UpLevel(
                channels=self.base_channels * self.channel_mult[i],
                num_res_blocks=self.num_res_blocks, use_attention=i in self.attention_levels,
                upsample=i > 0, resblock_updown=self.resblock_updown, num_heads=heads[i],
                transformer_depth=depth[i], name=f"up_{i}", **self._level_fields(),
            )(h, emb, level_skips, context, train)
        assert not skips, "every encoder activation is consumed by the decoder"

        h = group_norm(self.num_groups, self.norm_eps, self.dtype, "norm_out", activation="silu")(h)
        p = self.patch_size
        h = conv3x3(self.out_channels * p * p, self.dtype, "conv_out", zero=True)(h)
        h = depth_to_space(h, p)                                  # [B, H, W, out]
        h = h.astype(jnp.float32)
        return (h, feature) if return_deep_feature else h

    def deep_feature_shape(self, x_shape: Sequence[int], cache_level: int = 1) -> tuple[int, ...]:
        """The shape of the deep feature that deep feature reuse caches for inputs x of shape
        [B, H, W, C]: [B, H / (p * 2**(cache_level-1)), W / (...), base_channels *
        channel_mult[cache_level]], the upsampled output of decoder level `cache_level`.

        cache_level: how many resolution levels stay live in a shallow call, 1 <= cache_level <
        len(channel_mult). The default, 1, keeps only the full-resolution level (the paper's
        choice for its largest speed-ups): the shallow call runs conv_in, encoder level 0,
        decoder level 0 and the output head. Larger values keep more levels, so shallow calls
        cost more and stay closer to the full network."""
        levels = len(self.channel_mult)
        if isinstance(cache_level, bool) or not isinstance(cache_level, int) or not 1 <= cache_level < levels:
            raise ValueError(f"UNet: cache_level must be an integer in [1, {levels - 1}] for {levels} levels "
                             f"(channel_mult={self.channel_mult}), got {cache_level!r}")
        B, H, W = x_shape[:3]
        f = self.patch_size * 2 ** (cache_level - 1)
        return (B, H // f, W // f, self.base_channels * self.channel_mult[cache_level])


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

# Stable Diffusion 1.x (1.4, 1.5; runwayml/stable-diffusion-v1-5 unet): 64x64x4 latents for
# 512-pixel images, text context from CLIP ViT-L/14 (768 wide), 8 heads at every level, 1x1-conv
# transformer projections. 859,520,964 parameters, as diffusers' UNet2DConditionModel.
sd15 = functools.partial(
    UNet,
    out_channels=4,
    in_channels=4,
    base_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attention_levels=(0, 1, 2),
    num_heads=8,
    num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0.0,
    context_dim=768,
    sample_size=64,
)

# Stable Diffusion 2.x (2.0, 2.1 and their 512 "base" versions): OpenCLIP ViT-H/14 context
# (1024 wide), 64 channels per head, linear transformer projections. The 768-pixel v-prediction
# checkpoints also set upcast_attention (and sample_size=96). 865,910,724 parameters.
sd21 = functools.partial(
    sd15,
    num_heads=(5, 10, 20, 20),
    use_linear_projection=True,
    context_dim=1024,
    sample_size=96,
)

# SDXL base 1.0: three levels (320, 640, 1280) with cross-attention at the lower two, 2 and 10
# transformer blocks deep, context 2048 (two text encoders concatenated), and micro-conditioning
# on the pooled text embedding (1280) plus six size/crop numbers (6 x 256): 2,567,463,684
# parameters.
sdxl = functools.partial(
    sd15,
    channel_mult=(1, 2, 4),
    attention_levels=(1, 2),
    num_heads=(5, 10, 20),
    transformer_depth=(1, 2, 10),
    use_linear_projection=True,
    context_dim=2048,
    addition_embed_dim=2816,
    addition_time_embed_dim=256,
    sample_size=128,
)

CONFIGS = {"ddpm_cifar10": ddpm_cifar10, "tiny": tiny, "sd15": sd15, "sd21": sd21, "sdxl": sdxl}
