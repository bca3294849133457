"""CLIP image encoder: images -> one pooled embedding per image, and the preprocessing CLIP expects.

The network is the vision tower of CLIP (Radford et al. 2021), a ViT (Dosovitskiy et al. 2021):
the image is cut into p x p patches, each linearly embedded (a bias-free p x p convolution of
stride p), a learned class token is put in front, learned position embeddings are added, a
LayerNorm ("pre-norm", CLIP's addition) is applied, then `num_layers` pre-LayerNorm transformer
layers with full (non-causal) self-attention; the class token's final state, LayerNormed, is the
pooled output, and a bias-free linear head maps it into the joint image-text space:

    h_0 = pre_norm(concat([class_embedding, patches(x) @ W_patch]) + position_embedding)  # [B, 1+P, D]
    h_l = h' + MLP(LN_2(h')),   h' = h_{l-1} + Attn(LN_1(h_{l-1}))    (l = 1..num_layers)
    pooled = post_norm(h_L[:, 0])                                                          # [B, D]
    image_embeds = pooled @ visual_projection                        (with projection_dim)  # [B, E]

Public API
----------
    CLIPVisionEncoder(image_size, patch_size, hidden_size, intermediate_size, num_layers,
                      num_heads, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      projection_dim=None, num_channels=3, dtype=jnp.float32)
    module.apply({"params": params}, pixel_values)      # [B, S, S, 3] NHWC, S = image_size
        -> CLIPVisionOutput(last_hidden_state [B, 1 + (S/p)^2, D], pooled [B, D],
                            image_embeds [B, E] or None)
    preprocess(images, size=224, crop_size=224, mean=CLIP_MEAN, std=CLIP_STD) -> [N, crop, crop, 3]
    CLIPViTL14 = OpenAI CLIP ViT-L/14 image tower with its projection (224 px, 768-d embeddings)

With `projection_dim=E` the module is transformers' `CLIPVisionModelWithProjection` (or the image
half of `CLIPModel`); without it, `CLIPVisionModel`.

Preprocessing (`preprocess`) is transformers' `CLIPImageProcessor` in numpy/JAX: resize so the
shortest side is `size` (bicubic, antialiased when shrinking; the long side becomes
int(size * long / short)), round to 8-bit levels as the PIL resize does, center crop
`crop_size` x `crop_size` (top = (h - crop) // 2), and normalize with the per-channel mean and std
(`CLIP_MEAN`, `CLIP_STD` for every OpenAI CLIP; a folder's `preprocessor_config.json` may name
others, see convert/clip_vision.py). Resampling kernels differ slightly between PIL and
`jax.image.resize`, so values agree with transformers to a few 8-bit levels, not bit for bit.

Parameters and their transformers names (each prefixed `vision_model.`, except the head):

    jaxdiff                                  transformers CLIPVisionModel(WithProjection)
    patch_embedding/kernel [p, p, 3, D]      embeddings.patch_embedding.weight [D, 3, p, p]
    class_embedding [D]                      embeddings.class_embedding
    position_embedding/embedding             embeddings.position_embedding.weight
    pre_norm/{scale,bias}                    pre_layrnorm.{weight,bias}   (sic)
    layer_{i}/...                            encoder.layers.{i}.... (as the text tower, models/text.py)
    post_norm/{scale,bias}                   post_layernorm.{weight,bias}
    visual_projection/kernel [D, E]          visual_projection.weight [E, D]   (never prefixed)

Precision: parameters are float32; `dtype` is the compute dtype of the attention, MLP and
LayerNorm outputs, while the residual stream between layers is kept in float32.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler
from jaxdiff.models.text import ACTIVATIONS, CLIPEncoderLayer

Array = jax.Array
Dtype = Any

# OpenAI CLIP's per-channel image statistics (RGB), what every CLIP preprocessor config carries.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_embed_init = nn.initializers.normal(0.02)


class CLIPVisionOutput(NamedTuple):
    """What `CLIPVisionEncoder` returns (a pytree).

    last_hidden_state: [B, 1 + P, D] the last layer's output (class token first), not normed.
    pooled: [B, D] post-LayerNorm class token state.
    image_embeds: [B, E] the projected pooled state (modules with a projection_dim), or None.
    """

    last_hidden_state: Array
    pooled: Array
    image_embeds: Array | None = None


class CLIPVisionEncoder(nn.Module):
    """CLIP vision transformer (transformers' `CLIPVisionModel(WithProjection)`), see the module
    docstring.

    Attributes:
      image_size: input side S in pixels (224 for ViT-L/14); inputs must be S x S.
      patch_size: patch side p (divides S).
      hidden_size: width D.
      intermediate_size: MLP hidden units.
      num_layers: transformer layers.
      num_heads: attention heads (divide hidden_size).
      hidden_act: "quick_gelu" (OpenAI CLIP) or "gelu" (exact; OpenCLIP).
      layer_norm_eps: LayerNorm epsilon.
      projection_dim: width E of the bias-free `visual_projection` head, or None for no head.
      num_channels: input channels (3).
      dtype: compute dtype; parameters are float32.
    """

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    num_channels: int = 3
    dtype: Dtype = jnp.float32

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @nn.compact
    def __call__(self, pixel_values: Array) -> CLIPVisionOutput:
        """pixel_values: [B, S, S, C] normalized as `preprocess` does."""
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide image_size={self.image_size}")
        want = (self.image_size, self.image_size, self.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}] (NHWC, "
                             f"preprocessed to image_size), got shape {tuple(pixel_values.shape)}")
        B, D, p = pixel_values.shape[0], self.hidden_size, self.patch_size

        patches = nn.Conv(D, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=jnp.float32,
                          name="patch_embedding")(pixel_values)  # [B, S/p, S/p, D]
        patches = patches.reshape(B, -1, D).astype(jnp.float32)  # [B, P, D], row-major grid
        cls = self.param("class_embedding", _embed_init, (D,), jnp.float32)
        h = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, D)), patches], axis=1)  # [B, 1+P, D]
        pos = nn.Embed(self.num_patches + 1, D, dtype=jnp.float32, param_dtype=jnp.float32,
                       embedding_init=_embed_init, name="position_embedding")
        h = h + pos(jnp.arange(self.num_patches + 1))[None]  # [B, 1+P, D]

        def norm(name):
            return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                param_dtype=jnp.float32, name=name)

        h = norm("pre_norm")(h).astype(jnp.float32)
        for i in range(self.num_layers):
            h = CLIPEncoderLayer(self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                                 dtype=self.dtype, causal=False, name=f"layer_{i}")(h)
        pooled = norm("post_norm")(h[:, 0])  # [B, D]
        embeds = None
        if self.projection_dim is not None:
            embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                              param_dtype=jnp.float32, name="visual_projection")(pooled)  # [B, E]
        return CLIPVisionOutput(h, pooled, embeds)


# OpenAI CLIP ViT-L/14 image tower with its projection (the image half of
# openai/clip-vit-large-patch14, and the tower inside Stable Diffusion's safety checker).
CLIPViTL14 = functools.partial(
    CLIPVisionEncoder, image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
    num_layers=24, num_heads=16, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


# ------------------------------------------------------------------------------------------
# preprocessing


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side `size` and the longer int(size * long / short), as
    transformers' shortest-edge resize computes it."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def preprocess(images, size: int = 224, crop_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD,
               *, crop: bool = True) -> np.ndarray:
    """CLIP's image preprocessing: images [N, H, W, 3] (uint8 0..255, or floats in [0, 1]) ->
    float32 [N, crop_size, crop_size, 3] normalized pixel values (see the module docstring).

    crop: center crop to crop_size (CLIP's processors always do); with crop=False the resized
      [N, h, w, 3] image is returned (e.g. for a square input already at `size`).
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] RGB, got shape {tuple(x.shape)}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    height, width = x.shape[1:3]
    h, w = resized_shape(height, width, size)
    if crop and (h < crop_size or w < crop_size):
        raise ValueError(f"crop_size={crop_size} is larger than the resized image {h}x{w} (size={size})")
    x = _resize(jnp.asarray(x), h, w)  # [N, h, w, 3]
    if crop:
        top, left = (h - crop_size) // 2, (w - crop_size) // 2
        x = x[:, top:top + crop_size, left:left + crop_size]  # [N, crop, crop, 3]
    return np.asarray(_normalize(x, jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)))


@functools.partial(compiler.jit, static_argnums=(1, 2))
def _resize(x: Array, h: int, w: int) -> Array:
    """Bicubic (antialiased when shrinking), then clipped and rounded to 8-bit levels, as the
    uint8 PIL resize of transformers' processor."""
    if x.shape[1:3] != (h, w):
        x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bicubic", antialias=True)
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0) / 255.0


@compiler.jit
def _normalize(x: Array, mean: Array, std: Array) -> Array:
    return (x - mean) / std
