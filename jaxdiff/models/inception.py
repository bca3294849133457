"""Inception-v3 as FID computes it: the 2015-12-05 TensorFlow graph, in pytorch-fid's layout.

    net = InceptionV3()
    params = jaxdiff.convert.inception.load_inception("pt_inception-2015-12-05-6726825d.safetensors")
    pool3, logits = net.apply({"params": params}, images)    # images [B, H, W, 3] in [0, 1]
    # pool3 [B, 2048] (the FID features), logits [B, 1008] (Inception Score)

The network is the FID variant, not the torchvision one: its four pooling quirks reproduce the
TensorFlow graph that published FID numbers were measured with, and the weights have to match
them (pytorch-fid's `FIDInceptionA/C/E_1/E_2`):

    Mixed_5b..5d (A), Mixed_6b..6e (C), Mixed_7b (E_1)   3x3 average pool, stride 1, the padded
                                                         zeros left out of each average
    Mixed_7c (E_2)                                       3x3 *max* pool, stride 1, padding 1

Inputs of any size are first resized to 299x299 bilinearly with half-pixel centres and no
antialiasing (PyTorch's `F.interpolate(..., mode="bilinear", align_corners=False)`), then mapped
from [0, 1] to [-1, 1]. Every convolution is a `BasicConv`: convolution without bias, batch norm
with frozen statistics (eps 1e-3), ReLU. The parameter tree keeps pytorch-fid's module names
(`Conv2d_1a_3x3/conv/kernel`, `Mixed_5b/branch1x1/bn/mean`, `fc/kernel`) so the converter is a
rename and a transpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nn.Module):
    """Batch norm with stored statistics: y = (x - mean) / sqrt(var + eps) * scale + bias.
    x: [..., C]."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
    """Conv (no bias) -> frozen batch norm -> ReLU. x: [B, H, W, Cin] -> [B, H', W', features]."""

    features: int
    kernel: int | Sequence[int] = 1
    stride: int = 1
    padding: int | Sequence[int] = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=(self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def max_pool(x, stride: int, padding: int = 0):
    """3x3 max pool, padded with -inf (a padded cell never wins). x: [B, H, W, C]."""
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


def avg_pool_valid_only(x):
    """3x3 average pool, stride 1, padding 1, each mean over the cells inside the image only
    (TensorFlow's SAME average pool; PyTorch's count_include_pad=False). x: [B, H, W, C]."""
    pad = ((1, 1), (1, 1))
    total = nn.pool(x, 0.0, jax.lax.add, (3, 3), (1, 1), pad)                      # [B, H, W, C]
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = nn.pool(ones, 0.0, jax.lax.add, (3, 3), (1, 1), pad)                   # [1, H, W, 1]
    return total / count


class InceptionA(nn.Module):
    """Mixed_5b..5d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1. [B, 35, 35, C]."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(48, name="branch5x5_1")(x)
        b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(avg_pool_valid_only(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a, the 35 -> 17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool/2."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e, factorised 7x7 convolutions (1x7 and 7x1) at 17x17."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c, name="branch7x7_1")(x)
        b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c, name="branch7x7dbl_1")(x)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, name="branch_pool")(avg_pool_valid_only(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a, the 17 -> 8 reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, name="branch3x3_1")(x)
        b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b / 7c at 8x8, with split 1x3 / 3x1 outputs. `max_pool_branch`: the pool branch
    takes a 3x3 max pool (Mixed_7c in the FID graph) instead of the valid-only average."""

    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = BasicConv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        pooled = max_pool(x, 1, padding=1) if self.max_pool_branch else avg_pool_valid_only(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation with half-pixel centres and no
    antialiasing: source = (i + 0.5) * n_in / n_out - 0.5, clamped below at 0."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def resize_bilinear(x, size: int = INPUT_SIZE):
    """x: [B, H, W, C] -> [B, size, size, C], as PyTorch's bilinear, align_corners=False."""
    rh = jnp.asarray(_resize_matrix(x.shape[1], size))                              # [S, H]
    rw = jnp.asarray(_resize_matrix(x.shape[2], size))                              # [S, W]
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("sh,bhwc->bswc", rh, x, precision=hp)                            # [B, S, W, C]
    return jnp.einsum("tw,bswc->bstc", rw, x, precision=hp)                         # [B, S, S, C]


class InceptionV3(nn.Module):
    """The FID Inception-v3. __call__(x: [B, H, W, 3] in [0, 1]) -> (pool3 [B, 2048],
    logits [B, 1008]); H, W of any size >= 75 when `resize` is False, any size otherwise."""

    resize: bool = True
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 takes images [B, H, W, 3], got shape {tuple(x.shape)}")
        x = x.astype(jnp.float32)
        if self.resize:
            x = resize_bilinear(x)                                                  # [B, 299, 299, 3]
        x = 2.0 * x - 1.0
        x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)                    # [B, 149, 149, 32]
        x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)                              # [B, 147, 147, 32]
        x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)                   # [B, 147, 147, 64]
        x = max_pool(x, 2)                                                          # [B, 73, 73, 64]
        x = BasicConv(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)                             # [B, 71, 71, 192]
        x = max_pool(x, 2)                                                          # [B, 35, 35, 192]
        x = InceptionA(32, name="Mixed_5b")(x)                                      # [B, 35, 35, 256]
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)                                      # [B, 35, 35, 288]
        x = InceptionB(name="Mixed_6a")(x)                                          # [B, 17, 17, 768]
        for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)                                          # [B, 8, 8, 1280]
        x = InceptionE(name="Mixed_7b")(x)                                          # [B, 8, 8, 2048]
        x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))                                            # [B, 2048]
        logits = nn.Dense(self.num_classes, name="fc")(pool3)                       # [B, 1008]
        return pool3, logits
