"""2-D convolution written as plain matrix products, for backends whose convolutions are slow.

On some CPUs XLA runs `lax.conv_general_dilated` (and above all its gradients) well below the
speed of its own 2-D matrix product, and bfloat16 convolutions do not reach the CPU's bf16
matrix units (AMX), which XLA uses only for 2-D dots. A k x k convolution is the same sum
written as products of 2-D matrices:

    y[b, p, q, o] = sum_{i, j, c} x_pad[b, s*p + i, s*q + j, c] * w[i, j, c, o]

- "im2col": gather the k*k shifted windows side by side on the channel axis,
  [B, H', W', k*k*C] -> [B*H'*W', k*k*C], and multiply once by w as [k*k*C, O].
- "shifted": k*k products [B*H'*W', C] x [C, O], one per kernel tap, summed in float32.
- "xla": `lax.conv_general_dilated` itself.

Their gradients are again 2-D products (the weight gradient is patches^T x dy) plus the
transpose of slicing (pads and adds).
In bfloat16 / float16 every product accumulates in float32 (`preferred_element_type`), which is
the form XLA lowers to the CPU's bf16 dot instructions; the result is cast back to the compute
dtype, as a convolution in that dtype would return.

`Conv` is a drop-in for `flax.linen.Conv` with the same parameters (`kernel` [kh, kw, C, O],
`bias` [O]), so checkpoints and converters do not see which formulation ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any

IMPLS = ("auto", "xla", "im2col", "shifted")


def resolve_impl(impl: str) -> str:
    """The formulation "auto" stands for: "xla" on every backend for now.

    On the 2-core development CPU (jax 0.10.2, whose CPU backend hands convolutions and dots to
    XNNPACK's YNN fusions) neither matmul form beat XLA's convolution on the U-Nets' layer
    shapes in float32, forward or backward (experiments/bench_conv.py); in bfloat16 "shifted"
    won only at 8x8-32x32 resolutions. The formulations stay for measuring other CPUs.
    """
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
    return "xla" if impl == "auto" else impl


def _matmul(a: Array, b: Array) -> Array:
    """[M, K] x [K, N] -> [M, N], accumulated in float32 for 16-bit inputs."""
    low = a.dtype in (jnp.bfloat16, jnp.float16)
    out = lax.dot_general(
        a, b, (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32 if low else None,
    )
    return out


def _windows(x: Array, kh: int, kw: int, strides: tuple[int, int], out_hw: tuple[int, int]):
    """The kh*kw shifted strided views of a padded x: each [B, H', W', C], row-major taps."""
    sh, sw = strides
    ho, wo = out_hw
    B, _, _, C = x.shape
    views = []
    for i in range(kh):
        for j in range(kw):
            views.append(lax.slice(
                x, (0, i, j, 0), (B, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, C),
                (1, sh, sw, 1),
            ))  # [B, H', W', C]
    return views


def conv2d(
    x: Array,
    kernel: Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
    impl: str = "auto",
) -> Array:
    """Cross-correlation of NHWC images with an HWIO kernel, as `lax.conv_general_dilated`.

    Args:
      x: [B, H, W, C].
      kernel: [kh, kw, C, O], same dtype as x.
      strides: (sh, sw).
      padding: ((top, bottom), (left, right)), explicit pixels of zeros.
      impl: "auto", "xla", "im2col" or "shifted" (see the module docstring).
    Returns:
      [B, H', W', O] in x's dtype, H' = (H + top + bottom - kh) // sh + 1 (W' likewise).
    """
    impl = resolve_impl(impl)
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(a), int(b)) for a, b in padding)
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kh, kw, C, O = kernel.shape
    B, H, W, _ = x.shape
    ho = (H + padding[0][0] + padding[0][1] - kh) // strides[0] + 1
    wo = (W + padding[1][0] + padding[1][1] - kw) // strides[1] + 1
    if kh == kw == 1 and strides == (1, 1) and padding == ((0, 0), (0, 0)):
        y = _matmul(x.reshape(B * H * W, C), kernel.reshape(C, O))  # [BHW, O]
        return y.reshape(B, H, W, O).astype(x.dtype)
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))  # [B, H+pt+pb, W+pl+pr, C]
    views = _windows(xp, kh, kw, strides, (ho, wo))
    if impl == "im2col":
        patches = jnp.concatenate(views, axis=-1).reshape(B * ho * wo, kh * kw * C)  # [M, kh*kw*C]
        y = _matmul(patches, kernel.reshape(kh * kw * C, O))  # [M, O]
    else:
        w = kernel.reshape(kh * kw, C, O)  # [taps, C, O]
        y = sum(_matmul(v.reshape(B * ho * wo, C), w[n]) for n, v in enumerate(views))  # [M, O]
    return y.reshape(B, ho, wo, O).astype(x.dtype)  # [B, H', W', O]


class Conv(nn.Module):
    """`flax.linen.Conv` for NHWC images with explicit padding, computed by `conv2d`.

    Same parameters as `nn.Conv(features, kernel_size, ...)`: `kernel` [kh, kw, C, O] and
    `bias` [O] (when use_bias), stored in `param_dtype`, computed in `dtype`.

    Attributes:
      features: O.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: ((top, bottom), (left, right)).
      impl: "auto", "xla", "im2col" or "shifted".
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, H, W, C] -> [B, H', W', features] in `dtype`."""
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = conv2d(x, kernel, strides=self.strides, padding=self.padding, impl=self.impl)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)  # [B, H', W', O]
        return y
