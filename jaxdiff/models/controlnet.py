"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"; diffusers' `ControlNetModel`): a trainable copy of a U-Net's encoder and middle block that
reads a control image (edges, depth, pose, ...) and returns one residual per encoder activation
and one for the middle block, which the U-Net adds to its own (`UNet(..., down_residuals=,
mid_residual=)`).

    emb = the U-Net's time embedding [+ add_embed(text_embeds, time_ids)]        (SDXL ControlNets)
    h = conv_in(x) + cond_embed(control)                  control [B, f*h, f*w, 3] -> [B, h, w, base]
    h, skips = the U-Net's down levels (h)                 skips: conv_in's output, then each level's
    h = the U-Net's middle block (h)
    down_k = zero_down/conv_k(skips[k]) * scale_k          (1x1 convolutions, zero at initialisation)
    mid = zero_mid/conv_0(h) * scale_last

cond_embed (the paper's "tiny network E") maps the control image to the latent grid: conv_in,
then per stage a 3x3 convolution and a stride-2 3x3 convolution, SiLU after each, and a zero-init
conv_out; f = 2 ** (len(embedding_channels) - 1) (8, the VAE's factor, for Stable Diffusion).

`ControlNet` is a `UNet` (same fields, checks and encoder code: `UNet.embed`, `encode`, `middle`),
so its shared parameters have the U-Net's names and a ControlNet made from a U-Net
(`from_unet`) starts from the U-Net's weights where they overlap. Its own parameters:

    cond_embed/conv_in, cond_embed/conv_{k} (k = 0 .. 2 * (len(embedding_channels) - 1) - 1),
    cond_embed/conv_out, zero_down/conv_{k} (one per encoder activation), zero_mid/conv_0

The decoder fields (`out_channels`, `patch_size`, `resblock_updown`) are unused.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import conv3x3
from jaxdiff.models.unet import UNet

Array = jax.Array


def guess_mode_scales(num_residuals: int) -> np.ndarray:
    """diffusers' guess-mode weights of the residuals, shallow to deep: 10 ** linspace(-1, 0, n)
    (the deepest, the middle block's, gets 1), float32 [n]."""
    return np.logspace(-1.0, 0.0, num_residuals, dtype=np.float64).astype(np.float32)


class ControlEmbedding(nn.Module):
    """The control image [B, H, W, C] -> features [B, H / 2**(n-1), W / 2**(n-1), features] for
    `channels` = (c_0, ..., c_{n-1})."""

    channels: tuple[int, ...]
    features: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, image: Array) -> Array:
        h = nn.silu(conv3x3(self.channels[0], self.dtype, "conv_in")(image.astype(self.dtype)))
        for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            h = nn.silu(conv3x3(c_in, self.dtype, f"conv_{2 * i}")(h))
            h = nn.silu(nn.Conv(c_out, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                param_dtype=jnp.float32, name=f"conv_{2 * i + 1}")(h))  # [B, H/2, W/2, c_out]
        return conv3x3(self.features, self.dtype, "conv_out", zero=True)(h)


class ZeroConvs(nn.Module):
    """One 1x1 convolution per input (zero at initialisation, so a new ControlNet adds nothing):
    [x_k [B, h, w, C_k]] -> [conv_k(x_k)]."""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, xs):
        return [nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.zeros, name=f"conv_{k}")(x) for k, x in enumerate(xs)]


class ControlNet(UNet):
    """A ControlNet for a U-Net with the same encoder fields (see `UNet`).

    Attributes (besides the U-Net's):
      conditioning_channels: channels of the control image (3: RGB).
      embedding_channels: widths of `cond_embed`'s stages; the control image is
        2 ** (len - 1) times the latent size (diffusers: conditioning_embedding_out_channels).
      global_pool_conditions: average every residual over its pixels (shuffle ControlNets).
    """

    out_channels: int = 0   # unused: a ControlNet has no decoder
    conditioning_channels: int = 3
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    @classmethod
    def from_unet(cls, unet: UNet, **fields) -> ControlNet:
        """The ControlNet of `unet`'s encoder (its init has the U-Net's parameter names where the
        two overlap, so `params["down_0"] = unet_params["down_0"]` etc. copies them)."""
        shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNet)
                  if f.init and f.name not in ("parent", "name")}
        return cls(**shared, **fields)

    @property
    def control_factor(self) -> int:
        """The control image is this many times the latent height and width."""
        return 2 ** (len(self.embedding_channels) - 1)

    @property
    def num_residuals(self) -> int:
        """Down residuals (one per encoder activation) plus the middle block's."""
        n = len(self.channel_mult)
        return 1 + n * self.num_res_blocks + (n - 1) + 1

    def example_inputs(self, batch: int = 1, size: int | None = None, in_channels: int | None = None) -> dict:
        out = super().example_inputs(batch, size, in_channels)
        h, w = out["x"].shape[1:3]
        f = self.control_factor
        out["control"] = jnp.zeros((batch, h * f, w * f, self.conditioning_channels))
        return out

    def _check_control(self, x: Array, control: Array, scale: Array) -> None:
        B, h, w, _ = x.shape
        want = (B, h * self.control_factor, w * self.control_factor, self.conditioning_channels)
        if tuple(control.shape) != want:
            raise ValueError(f"ControlNet: the control image must have shape {list(want)} ([B, H, W, C]: "
                             f"{self.control_factor} x the latent size {h}x{w}, {self.conditioning_channels} "
                             f"channels), got {list(control.shape)}")
        if scale.ndim > 2 or (scale.ndim >= 1 and scale.shape[0] not in (1, B)) or (
                scale.ndim == 2 and scale.shape[1] not in (1, self.num_residuals)):
            raise ValueError(f"ControlNet: scale must be a number, [B] or [B, {self.num_residuals}] (one per "
                             f"residual), got shape {list(scale.shape)}")
        if self.patch_size != 1 or self.resblock_updown:
            raise ValueError("ControlNet: patch_size must be 1 and resblock_updown False (as diffusers' ControlNetModel)")

    @nn.compact
    def __call__(self, x: Array, t: Array, control: Array, labels: Array | None = None, *,
                 context: Array | None = None, text_embeds: Array | None = None, time_ids: Array | None = None,
                 scale: Array | float = 1.0, train: bool = False) -> tuple[list[Array], Array]:
        """The residuals for a U-Net call on the same x, t and conditioning.

        Args:
          x: [B, h, w, C] noisy latents; t: [B] or scalar timesteps; context, text_embeds,
            time_ids, labels: as the U-Net's.
          control: [B, f*h, f*w, conditioning_channels] control image in [0, 1] (f = control_factor).
          scale: the residuals' weight: a number, [B], or [B, num_residuals] (one per residual,
            shallow to deep, the middle block's last; e.g. `guess_mode_scales`).
        Returns:
          (down residuals: num_residuals - 1 arrays shaped like the U-Net's encoder activations,
          mid residual [B, h/2**(L-1), w/2**(L-1), C_mid]), float32.
        """
        t = jnp.asarray(t)
        context = None if context is None else jnp.asarray(context)
        control, scale = jnp.asarray(control), jnp.asarray(scale, jnp.float32)
        self._check_inputs(x, t, labels, context, text_embeds, time_ids)
        self._check_control(x, control, scale)
        B = x.shape[0]
        emb = self.embed(t, B, labels, text_embeds, time_ids)                         # [B, 4 * base]
        h = conv3x3(self.base_channels, self.dtype, "conv_in")(x)                      # [B, h, w, base]
        h = h + ControlEmbedding(tuple(self.embedding_channels), self.base_channels, self.dtype,
                                 name="cond_embed")(control)
        h, skips = self.encode(h, emb, context, train)
        h = self.middle(h, emb, context, train)
        outs = ZeroConvs(self.dtype, name="zero_down")(skips) + ZeroConvs(self.dtype, name="zero_mid")([h])
        weights = jnp.broadcast_to(scale.reshape(scale.shape + (1,) * (2 - scale.ndim)),
                                   (B, self.num_residuals))                          # [B, R]
        outs = [o.astype(jnp.float32) * weights[:, k, None, None, None] for k, o in enumerate(outs)]
        if self.global_pool_conditions:
            outs = [jnp.mean(o, axis=(1, 2), keepdims=True) for o in outs]         # [B, 1, 1, C]
        return outs[:-1], outs[-1]
