"""Variational autoencoder with a KL-regularised latent (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", sec. 3 and appendix G), the first stage of Stable
Diffusion. Numerically it follows diffusers' `AutoencoderKL`, so its checkpoints load directly
(see `jaxdiff.convert.vae`).

Topology, for `L = len(block_out_channels)` levels and `R = layers_per_block`:

    encoder:  conv_in
              down_i (i = 0..L-1): R x res_j, downsample (i < L-1; pads bottom/right only)
              mid: res_0, attn (one head, GroupNorm), res_1
              norm_out, SiLU, conv_out -> 2 * latent_channels (mean, log-variance)
    quant_conv (1x1, optional)
    post_quant_conv (1x1, optional)
    decoder:  conv_in
              mid: res_0, attn, res_1
              up_i (i = L-1..0): (R + 1) x res_j, upsample (i > 0; nearest x2 + conv)
              norm_out, SiLU, conv_out -> out_channels

The ResBlocks carry no time embedding. `up_{i}` is indexed by resolution level like `down_{i}`
(up_0 runs last, at full resolution); diffusers numbers its up blocks the other way round
(up_blocks.{L-1-i}). Parameter tree:

    encoder/{conv_in, down_{i}/res_{j}, down_{i}/downsample, mid/{res_0,attn,res_1},
             norm_out, conv_out}
    quant_conv, post_quant_conv
    decoder/{conv_in, mid/{res_0,attn,res_1}, up_{i}/res_{j}, up_{i}/upsample, norm_out,
             conv_out}

Latent scaling convention of the diffusion model that runs on top:

    latents = (z - shift_factor) * scaling_factor          (`vae_latents`)
    z       = latents / scaling_factor + shift_factor      (`decode_latents`, before decoding)

Use through `apply` with a method name:

    posterior = vae.apply(variables, images, method="encode")    # images in [-1, 1]
    images = vae.apply(variables, z, method="decode")
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    conv3x3,
    default_init,
    group_norm,
)

Array = jax.Array
Dtype = Any

# Every GroupNorm of the autoencoder (ResBlocks, attention, output norms) uses this epsilon.
NORM_EPS = 1e-6
# The posterior log-variance is clipped to this range, as in the reference implementation.
LOGVAR_RANGE = (-30.0, 20.0)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))).

    Attributes:
      mean: [B, h, w, latent_channels] float32.
      logvar: [B, h, w, latent_channels] float32, clipped to LOGVAR_RANGE.
    """

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> "DiagonalGaussian":
        """moments: [B, h, w, 2 * C], mean first then log-variance along channels."""
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)  # each [B, h, w, C]
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def mode(self) -> Array:
        """The most likely latent (the mean)."""
        return self.mean

    def reparameterize(self, noise: Array) -> Array:
        """mean + std * noise, for a given standard normal `noise` of the mean's shape."""
        return self.mean + self.std * noise

    def sample(self, key: jax.Array) -> Array:
        """A draw z ~ q(z | x), float32, of the mean's shape."""
        return self.reparameterize(jax.random.normal(key, self.mean.shape, jnp.float32))

    def kl(self) -> Array:
        """KL(q || N(0, I)) per example: [B] (summed over h, w and channels)."""
        return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class _MidBlock(nn.Module):
    """ResBlock -> (single-head self-attention) -> ResBlock, shape-preserving."""

    channels: int
    num_groups: int
    attention: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, h: Array) -> Array:
        """h: [B, H, W, channels] -> [B, H, W, channels]."""
        res = functools.partial(
            ResBlock, self.channels, num_groups=self.num_groups, norm_eps=NORM_EPS,
            dtype=self.dtype,
        )
        h = res(name="res_0")(h)
        if self.attention:
            h = AttentionBlock(
                num_heads=1, num_groups=self.num_groups, norm_eps=NORM_EPS, dtype=self.dtype,
                name="attn",
            )(h)
        return res(name="res_1")(h)


class _Level(nn.Module):
    """`num_layers` ResBlocks followed by an optional 2x down- or upsampling."""

    channels: int
    num_layers: int
    resample: str | None  # None, "down" or "up"
    num_groups: int
    dtype: Dtype

    @nn.compact
    def __call__(self, h: Array) -> Array:
        """h: [B, H, W, C_in] -> [B, H', W', channels] (H' = H, H/2 or 2H)."""
        for j in range(self.num_layers):
            h = ResBlock(
                self.channels, num_groups=self.num_groups, norm_eps=NORM_EPS, dtype=self.dtype,
                name=f"res_{j}",
            )(h)
        if self.resample == "down":
            h = Downsample(self.channels, padding=0, dtype=self.dtype, name="downsample")(h)
        elif self.resample == "up":
            h = Upsample(self.channels, dtype=self.dtype, name="upsample")(h)
        return h


class Encoder(nn.Module):
    """Images -> posterior moments. x: [B, H, W, in] -> [B, H/f, W/f, 2 * latent] with
    f = 2 ** (len(block_out_channels) - 1)."""

    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    mid_attention: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        num_levels = len(self.block_out_channels)
        h = conv3x3(self.block_out_channels[0], self.dtype, "conv_in")(x)
        for i, ch in enumerate(self.block_out_channels):
            h = _Level(
                ch, self.layers_per_block, "down" if i < num_levels - 1 else None,
                self.norm_num_groups, self.dtype, name=f"down_{i}",
            )(h)
        h = _MidBlock(
            self.block_out_channels[-1], self.norm_num_groups, self.mid_attention, self.dtype,
            name="mid",
        )(h)
        h = group_norm(self.norm_num_groups, NORM_EPS, self.dtype, "norm_out", activation="silu")(h)
        return conv3x3(2 * self.latent_channels, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """Latents -> images. z: [B, h, w, latent] -> [B, h*f, w*f, out_channels]."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    mid_attention: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, z: Array) -> Array:
        h = conv3x3(self.block_out_channels[-1], self.dtype, "conv_in")(z)
        h = _MidBlock(
            self.block_out_channels[-1], self.norm_num_groups, self.mid_attention, self.dtype,
            name="mid",
        )(h)
        for i in reversed(range(len(self.block_out_channels))):
            h = _Level(
                self.block_out_channels[i], self.layers_per_block + 1, "up" if i > 0 else None,
                self.norm_num_groups, self.dtype, name=f"up_{i}",
            )(h)
        h = group_norm(self.norm_num_groups, NORM_EPS, self.dtype, "norm_out", activation="silu")(h)
        return conv3x3(self.out_channels, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """KL autoencoder on NHWC images (fields mirror diffusers' `AutoencoderKL` config).

    Attributes:
      in_channels / out_channels: image channels in and out (3 for RGB).
      latent_channels: channels of the latent z.
      block_out_channels: width of each resolution level; there are len - 1 downsamplings, so
        images shrink by `downsample_factor` = 2 ** (len - 1) per side.
      layers_per_block: ResBlocks per encoder level (the decoder has one more per level).
      norm_num_groups: GroupNorm groups (every width must be divisible by it).
      scaling_factor / shift_factor: latent scaling for the diffusion model on top (see the
        module docstring); not used by encode/decode themselves.
      use_quant_conv / use_post_quant_conv: the 1x1 convolutions after the encoder and before
        the decoder (absent in e.g. Stable Diffusion 3's autoencoder).
      mid_attention: self-attention in the middle blocks (diffusers' mid_block_add_attention).
      dtype: compute dtype. Parameters are float32; posteriors and decoded images are returned
        in float32.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_attention: bool = True
    dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """Image height and width must be multiples of this; latents are this much smaller."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        common = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
            mid_attention=self.mid_attention, dtype=self.dtype,
        )
        self.encoder = Encoder(self.latent_channels, **common)
        self.decoder = Decoder(self.out_channels, **common)
        def conv1x1(features: int) -> nn.Conv:
            return nn.Conv(features, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=default_init)

        self.quant_conv = conv1x1(2 * self.latent_channels) if self.use_quant_conv else None
        self.post_quant_conv = conv1x1(self.latent_channels) if self.use_post_quant_conv else None

    def _check(self, x: Array, channels: int, what: str, divisible: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            hint = ""
            if x.ndim == 4 and x.shape[1] == channels:
                hint = " It looks channels-first (NCHW): transpose with x.transpose(0, 2, 3, 1)."
            raise ValueError(
                f"AutoencoderKL: {what} must have shape [B, H, W, {channels}] (NHWC), got "
                f"{tuple(x.shape)}.{hint}"
            )
        H, W = x.shape[1:3]
        if H % divisible or W % divisible:
            raise ValueError(
                f"AutoencoderKL: image height and width must be divisible by {divisible} "
                f"(= 2**(len(block_out_channels)-1), block_out_channels="
                f"{tuple(self.block_out_channels)}); got {what} of shape {tuple(x.shape)}. "
                f"Pad or resize the images to a multiple of {divisible}."
            )

    def encode(self, x: Array) -> DiagonalGaussian:
        """x: [B, H, W, in_channels] images in [-1, 1] -> posterior over
        [B, H/f, W/f, latent_channels] (f = downsample_factor)."""
        self._check(x, self.in_channels, "images", self.downsample_factor)
        moments = self.encoder(x)  # [B, h, w, 2 * latent]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: Array) -> Array:
        """z: [B, h, w, latent_channels] unscaled latents -> [B, h*f, w*f, out_channels] float32
        images (nominally in [-1, 1], not clipped)."""
        self._check(z, self.latent_channels, "latents", 1)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: Array, key: jax.Array | None = None) -> tuple[Array, DiagonalGaussian]:
        """Reconstruct: decode a posterior sample (or its mean when `key` is None).

        x: [B, H, W, in_channels] -> ([B, H, W, out_channels] float32, posterior).
        """
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior


# The first-stage autoencoder of Stable Diffusion 1.x / 2.x (83,653,863 parameters).
StableDiffusionVAE = functools.partial(
    AutoencoderKL, in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    scaling_factor=0.18215,
)


# ------------------------------------------------------------------------------------------
# latent scaling


def scale_latents(vae: AutoencoderKL, z: Array) -> Array:
    """Autoencoder latents -> diffusion-model latents: (z - shift_factor) * scaling_factor."""
    shift = 0.0 if vae.shift_factor is None else vae.shift_factor
    return (z - shift) * vae.scaling_factor


def unscale_latents(vae: AutoencoderKL, latents: Array) -> Array:
    """Inverse of `scale_latents`: latents / scaling_factor + shift_factor."""
    shift = 0.0 if vae.shift_factor is None else vae.shift_factor
    return latents / vae.scaling_factor + shift


def vae_latents(
    vae: AutoencoderKL, params, images: Array, key: jax.Array | None = None
) -> Array:
    """Encode images to the scaled latents a latent diffusion model works on.

    Args:
      vae: the autoencoder (its `dtype` is the compute dtype).
      params: its parameters (the `"params"` collection).
      images: [B, H, W, in_channels] in [-1, 1].
      key: draw z from the posterior with this key; None takes the posterior mean.
    Returns:
      [B, H/f, W/f, latent_channels] float32.
    """
    posterior = vae.apply({"params": params}, images, method="encode")
    z = posterior.mode() if key is None else posterior.sample(key)
    return scale_latents(vae, z)


def decode_latents(
    vae: AutoencoderKL, params, latents: Array, *, float32: bool = True
) -> Array:
    """Decode scaled diffusion latents to images.

    Args:
      latents: [B, h, w, latent_channels] on the diffusion model's scale.
      float32: compute the decoder in float32 whatever `vae.dtype` is (the default, per the
        precision policy; parameters are float32 anyway); False computes in `vae.dtype`.
    Returns:
      [B, h*f, w*f, out_channels] float32 images, nominally in [-1, 1] (not clipped).
    """
    if float32:
        vae = vae.clone(dtype=jnp.float32)
    z = unscale_latents(vae, jnp.asarray(latents, jnp.float32))
    return vae.apply({"params": params}, z, method="decode")
