"""2-D convolution written as plain matrix products, for backends whose convolutions are slow.

On CPUs XLA runs `lax.conv_general_dilated` on some shapes well below the speed of its own 2-D
matrix product, and its bfloat16 convolutions do not reach the CPU's bf16 dot instructions
(AVX512-BF16, AMX), which XLA uses only for 2-D dots that accumulate in float32. A k x k
convolution is the same sum written as products of 2-D matrices:

    y[b, p, q, o] = sum_{i, j, c} x_pad[b, s*p + i, s*q + j, c] * w[i, j, c, o]

- "im2col": gather the k*k shifted windows side by side on the channel axis,
  [B, H', W', k*k*C] -> [B*H'*W', k*k*C], and multiply once by w as [k*k*C, O].
- "shifted": k*k products [B*H'*W', C] x [C, O], one per kernel tap, summed in float32.
- "winograd": for 3x3, stride 1, "same" padding on even-sized maps, Winograd's F(2x2, 3x3):
  transform each 4x4 tile of inputs and the kernel (sums and differences), 16 products
  [B*H*W/4, C] x [C, O], and transform back to the 2x2 tile of outputs: 16 multiply-adds per
  output and channel pair where the direct sum takes 36 (`winograd3x3`; other shapes under it
  run "shifted").
- "xla": `lax.conv_general_dilated` itself.

Their gradients are again 2-D products (the weight gradient is patches^T x dy) plus the
transpose of slicing (pads and adds).
In bfloat16 / float16 every product accumulates in float32 (`preferred_element_type`), which is
the form XLA lowers to the CPU's bf16 dot instructions; the result is cast back to the compute
dtype, as a convolution in that dtype would return.

The models use them through two hooks of flax's own layers, so parameter trees and converters do
not change: `nn.Conv(..., conv_general_dilated=conv_general)` picks the formulation per layer
shape (`choose`: XLA on GPU/TPU; on CPU the measured winners), and `nn.Dense(...,
dot_general=dot_general)` accumulates low-precision products in float32 on CPU.
`Upsample` convolves through `upsample_conv`, which on the CPU folds the 3x3 kernel onto the
low-resolution map (four 2x2 convolutions, `upsample_phases`) instead of upsampling first.
`batch_parts` says when a U-Net call on the CPU runs as two half batches, which XLA's runtime
runs side by side on its threads (`unet.UNet.__call__`). `formulation("xla")` turns all three
off inside a block (the benchmarks' baseline).

`Conv` is a drop-in for `flax.linen.Conv` with the same parameters (`kernel` [kh, kw, C, O],
`bias` [O]), so checkpoints and converters do not see which formulation ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any

IMPLS = ("auto", "xla", "im2col", "shifted", "winograd")
NHWC = ("NHWC", "HWIO", "NHWC")


# The formulation "auto" convolutions use; `formulation(...)` overrides it for a block of code.
# Read when a function is traced, so jit a function inside the block to get its formulation.
_FORMULATION = ["auto"]
LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def low_precision(dtype) -> bool:
    """Whether `dtype` is a 16-bit float (bfloat16 or float16), whose products accumulate in float32."""
    return jnp.dtype(dtype) in (jnp.dtype(d) for d in LOW_PRECISION)


@contextlib.contextmanager
def formulation(impl: str):
    """Trace the convolutions (and low-precision dense layers) of the models inside the block
    with `impl` ("auto", "xla", "im2col" or "shifted") instead of the automatic choice: the
    benchmarks use `formulation("xla")` to measure what the choice gains. The choice is made when
    a function is traced, and jit keeps one trace per function object: inside the block, jit a
    function object that was not traced outside it (e.g. a new lambda)."""
    resolve_impl(impl)
    _FORMULATION.append(impl)
    try:
        yield
    finally:
        _FORMULATION.pop()


def choose(x_shape, kernel_shape, dtype, backend: str | None = None, *, strides=(1, 1),
           padding=None) -> str:
    """The formulation "auto" picks for one convolution, x [B, H, W, C] * kernel [kh, kw, C, O]
    with `strides` and `padding` (default: stride 1, "same" padding).

    XLA's own convolution on GPU and TPU. On the CPU backend (jax 0.10, whose convolutions go to
    XNNPACK/Eigen), measured on an idle 2-core CPU (experiments/bench_conv.py per layer shape,
    experiments/bench_sd.py for the whole SD-1.5 U-Net, experiments/profile_ops.py for the
    DDPM CIFAR-10 U-Net):
    - "winograd" (`winograd3x3`, 2.25x fewer multiply-adds) for every 3x3, stride-1, "same"
      convolution on an even-sized map it covers: in bfloat16 / float16 with >= 32 input
      channels once the call holds >= 512 positions (B * H * W), or with < 1024 channels on maps
      of >= 16x16; in float32 with >= 128 channels on maps of >= 8x8, except that >= 1024
      channels on maps of <= 16x16 need >= 512 positions (below that, im2col). On the
      slower development CPU (f32 matmul peak ~200 GFLOP/s), SD-1.5's 64x64 level in bfloat16
      [1, 64, 64, 320] -> 320 takes 15-16 ms against 25 ms "shifted" and 17-18 ms in PyTorch
      (oneDNN), 960 -> 320 30-46 against 71-93 and 51; in float32 22 against 35 ms (XLA) and 33
      (PyTorch). With gradients, float32, freed host memory kept: the CIFAR-10 U-Net's
      [16, 32, 32, 128] -> 128 41 against 63 ms (XLA), [16, 8, 8, 256] -> 256 13 against 22.
      Whole programs in their own processes: the SD-1.5 call in bfloat16 2.90 s against 3.23 s
      (PyTorch 3.16), in float32 4.43 against 4.64 s; the CIFAR-10 forward 0.81 against 1.11 s;
      its AdamW train step 2.95 against 3.28 s (3.01 against 3.41 with host memory kept).
      On SD's deep levels the kernel transform (16 instead of 9 matrices, redone every call)
      weighs as much as the products at batch 1, but not once the batch fills 512 positions:
      bfloat16 [1, 16, 16, 1280] -> 1280 34 ms against 27 im2col and 35 "shifted" (PyTorch 24);
      [4, 16, 16, 1280] 66 against 111 im2col and 100 "shifted" (PyTorch 71); [4, 16, 16, 2560]
      134 against 185 "shifted" (PyTorch 160); [2, 16, 16, 1280] 43 against 54 (PyTorch 39);
      [8, 8, 8, 1280] 49 against 58 "shifted"; but [4, 8, 8, 1280] 34 against 25 im2col; with
      640 channels already at batch 1, [1, 16, 16, 640] -> 1280 8.9 against 11.9 im2col and 17.5
      "shifted" (PyTorch 9.9). Smaller maps and channel counts alike: [16, 16, 16, 256] 13
      against 32 "shifted" (PyTorch 11), [64, 16, 16, 64] 7.7 against 24. In float32
      [4, 16, 16, 1280] 112 against 173 im2col (PyTorch 158), [8, 8, 8, 1280] 76 against 95,
      while [1, 16, 16, 1280] stays im2col (45 against 55) and so does [4, 8, 8, 1280] (44
      against 57). On 4x4 maps it gained nothing. Its compiled programs are larger: the
      CIFAR-10 train step compiles in ~50-64 s against ~19-23 s (the persistent compilation
      cache pays that once per machine).
    - bfloat16 / float16 otherwise: on maps of <= 32x32 positions with >= 256 channels XLA's
      convolution runs at 30-150 GFLOP/s, while a 2-D dot accumulating in float32 runs several
      times faster. "im2col" (one dot on the kernel as it is) for >= 1024 channels on maps of
      <= 16x16: there the kernel outweighs the activations, and one dot per tap would copy
      each tap's [C, O] slice on every call ([1, 16, 16, 1280] -> 1280 27 against 35 ms; the
      SD-1.5 call at batch 1 holds 446 instead of 1,304 MiB of temporaries). One dot per tap
      ("shifted") for every other layer with >= 32 input channels (strided ones included);
      "im2col" for the few-channel input layer.
    - float32 otherwise: on maps of <= 16x16 positions with >= 1024 channels (SD's two deepest
      levels) XLA falls to 50-90 GFLOP/s, where "im2col" (one dot) runs 2-5x faster; on one
      input channel (grayscale images) "shifted", nine broadcast products, takes a quarter of
      XLA's time forward and half with gradients (0.11 against 0.43 ms at [64, 16, 16, 1] -> 16);
      elsewhere "xla" (other few-channel layers are slower as dots: [16, 32, 32, 3] -> 128 takes
      20 ms "shifted" against 0.5 ms in XLA).
    """
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "xla"
    B, H, W, C = x_shape
    if padding is None:                                   # "same": half the kernel on each side
        padding = tuple((k // 2, k // 2) for k in kernel_shape[:2])
    winograd = winograd_applies(x_shape, kernel_shape, strides, padding)
    positions = B * H * W
    deep = C >= 1024 and H * W <= 256          # SD's deepest levels: the kernel outweighs the map
    if deep:
        return "winograd" if winograd and positions >= 512 else "im2col"
    if low_precision(dtype):
        if winograd and C >= 32 and (positions >= 512 or (C < 1024 and H * W >= 16 * 16)):
            return "winograd"
        return "shifted" if C >= 32 else "im2col"
    if winograd and C >= 128 and H * W >= 8 * 8:
        return "winograd"
    if C == 1:
        return "shifted"
    return "xla"


def batch_parts(x_shape, backend: str | None = None) -> int:
    """Into how many independent slices "auto" cuts the batch of a U-Net call on x [B, H, W, C]
    (1: it runs whole). On one CPU device XLA's runtime runs operations that do not depend on
    each other at the same time on its threads, but the convolutions of a small network are too
    small to be split over them: the demo U-Net's forward at batch 64 kept 1.1 of 2 cores busy.
    Two half batches through the same weights are two independent chains that the runtime runs
    side by side. Measured on an idle 2-core CPU, demo U-Net forward (16x16): batch 16 5.4 ms
    whole, 5.6 ms in halves; batch 32 10.0 -> 9.3 ms; batch 64 18.3 -> 15.0; batch 128 34.5 ->
    27.3; the DDPM CIFAR-10 train step (batch 16, 32x32) 2.69 -> 2.22 s. On SD's 64x64 latents
    it gained nothing at batch 2, and 11% at batch 4 (bfloat16, four slices) for 2.8x the
    compile time. Rechecked on a second, slower 2-core CPU after `compiler.jit` moved the
    convolutions to XLA's own kernels: in one process holding both programs, whole and halved
    steps ran level (CIFAR-10 step 3.47-3.69 against 3.60-3.65 s), but in a process of its own
    (`profile_ops.py`, what a user runs) the whole CIFAR-10 step took 4.14 s against 3.59 s
    halved with host memory kept and 5.22 against 4.72 s with glibc's default allocator, and
    its threads were busy 1.48-1.78 of 2 against 1.78-1.97. So: halves when the call has >= 8192
    positions (B * H * W) on maps of <= 32x32, B even. Never on GPU/TPU or on a sharded batch
    (more than one device), nor under `formulation("xla")`. The compiled program holds the
    network once per slice: its compile takes longer."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or _FORMULATION[-1] == "xla" or jax.device_count() != 1:
        return 1
    B, H, W = x_shape[:3]
    small_maps, enough = H * W <= 32 * 32, B * H * W >= 8192
    return 2 if B % 2 == 0 and small_maps and enough else 1


def resolve_impl(impl: str, x_shape=None, kernel_shape=None, dtype=jnp.float32, *,
                 strides=(1, 1), padding=None) -> str:
    """The formulation `impl` stands for: itself, or for "auto" the one `formulation()` sets, else
    `choose(x_shape, kernel_shape, dtype, strides=..., padding=...)` (XLA when the shapes are not
    given)."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = _FORMULATION[-1]
    if impl != "auto":
        return impl
    if x_shape is None:
        return "xla"
    return choose(x_shape, kernel_shape, dtype, strides=strides, padding=padding)


def _plain_nhwc(lhs: Array, rhs: Array, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count: int, preferred_element_type) -> bool:
    """A 2-D NHWC/HWIO convolution without dilation, groups or a requested output type: what the
    formulations here (and the upsampling fold) cover; anything else goes to XLA."""
    return (lhs.ndim == 4 and feature_group_count == 1 and preferred_element_type is None
            and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))


def upsample_nearest(x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def conv_general(lhs: Array, rhs: Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count: int = 1, precision=None,
                 preferred_element_type=None) -> Array:
    """`lax.conv_general_dilated` with the automatic formulation, for `flax.linen.Conv(...,
    conv_general_dilated=conv_general)`: the parameters and their names stay flax's own.
    Convolutions it does not cover (dilated, grouped, not NHWC/HWIO, other ranks) go to XLA."""
    def xla():
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision,
                                        preferred_element_type=preferred_element_type)

    if not _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                       preferred_element_type):
        return xla()
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    impl = resolve_impl("auto", lhs.shape, rhs.shape, lhs.dtype, strides=window_strides, padding=padding)
    if impl == "xla":
        return xla()
    return conv2d(lhs, rhs, strides=window_strides, padding=padding, impl=impl)


def upsample_phases(x_shape, kernel_shape, dtype, backend: str | None = None) -> bool:
    """Whether "auto" runs nearest x2 upsampling + a 3x3 convolution (`upsample_conv`) on the
    low-resolution map x [B, H, W, C] as four 2x2 convolutions, one per output phase.

    Each output pixel (2i + a, 2j + b) of the upsampled map sees only four distinct input pixels,
    so its 3x3 taps fold into a 2x2 kernel (rows: w0 | w1 + w2 for a = 0, w0 + w1 | w2 for a = 1;
    the same for columns): 16 instead of 36 multiply-adds per output and channel pair, forward
    and in both gradients, and no 4x larger upsampled map. The sums are reordered: outputs within
    1.2e-6 of the largest. Measured on a 2-core CPU in float32 (experiments/bench_upsample.py),
    forward + gradients [8, 16, 16, 256] -> [8, 32, 32, 256]: 58.5 -> 30.3 ms; forward alone,
    SD-1.5's and its VAE's upsamplers at batch 1: 16x16x1280 68.7 -> 39.2 ms, 32x32x640 64.6 ->
    31.9, 64x64x512 158 -> 73. Taken on the CPU in float32 under "auto" where the upsampled map's
    convolution would be XLA's own or "winograd" (the same 16 multiply-adds per output, but on
    the 4x larger map: forward + gradients [8, 16, 16, 256] -> [8, 32, 32, 256] 66.6 ms against
    50.5 folded, and level or slower on the other shapes measured), with fewer than 1024
    channels. On SD's deep levels the four small convolutions become im2col dots that lose to
    the upsampled map's own formulation: 8x8x1280 17.9 ms im2col against 22.5 folded at batch 1;
    since Winograd covers the upsampled map, 16x16x1280 120.6 against 136.6 ms at batch 1 and
    8x8x1280 129 against 196 ms at batch 4. In bfloat16 the convolutions are already dots
    ("shifted", "im2col" or "winograd") on the upsampled map, and GPU/TPU keep XLA's
    convolution."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or _FORMULATION[-1] != "auto" or low_precision(dtype) or len(x_shape) != 4:
        return False
    B, H, W, C = x_shape
    return (tuple(kernel_shape[:2]) == (3, 3) and C < 1024
            and choose((B, 2 * H, 2 * W, C), kernel_shape, dtype, backend) in ("xla", "winograd"))


def _fold(w: Array, axis: int) -> tuple[Array, Array]:
    """A 3-tap kernel axis folded for the two phases of a nearest x2 upsampling along it."""
    a, b, c = jnp.split(w, 3, axis=axis)
    return jnp.concatenate([a, b + c], axis), jnp.concatenate([a + b, c], axis)


def upsample_conv(lhs: Array, rhs: Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count: int = 1, precision=None,
                  preferred_element_type=None) -> Array:
    """Nearest-neighbour x2 upsampling of `lhs` [B, H, W, C], then `conv_general` with `rhs`: for
    `flax.linen.Conv(..., conv_general_dilated=upsample_conv)` applied to the low-resolution map
    (the parameters stay flax's own). "auto" on the CPU runs it as four phase convolutions
    (`upsample_phases`); anything else upsamples and convolves."""
    args = (lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, precision,
            preferred_element_type)
    foldable = (tuple(window_strides) == (1, 1) and not isinstance(padding, str)
                and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
                and _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                                feature_group_count, preferred_element_type))
    if not (foldable and upsample_phases(lhs.shape, rhs.shape, lhs.dtype)):
        return conv_general(upsample_nearest(lhs), rhs, window_strides, padding, *args)
    rows = []
    for a, w_rows in enumerate(_fold(rhs, 0)):
        # phase a reads low-resolution rows (i-1, i) for a = 0 and (i, i+1) for a = 1
        pad_h = (1, 0) if a == 0 else (0, 1)
        rows.append(jnp.stack([conv_general(lhs, w, (1, 1), (pad_h, (1, 0) if b == 0 else (0, 1)),
                                            dimension_numbers=NHWC, precision=precision)
                               for b, w in enumerate(_fold(w_rows, 1))], axis=3))   # [B, H, W, 2, O]
    y = jnp.stack(rows, axis=2)                                                     # [B, H, 2, W, 2, O]
    B, H, _, W, _, O = y.shape
    return y.reshape(B, 2 * H, 2 * W, O)


def dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None, preferred_element_type=None) -> Array:
    """`lax.dot_general` for `flax.linen.Dense(..., dot_general=dot_general)`: on the CPU backend a
    bfloat16 / float16 product accumulates in float32 and is rounded back once, the form XLA lowers
    to the CPU's bf16 dot instructions (~2.3x the rate of a bf16-accumulating dot on the
    development CPU). Unchanged elsewhere, and under `formulation("xla")`."""
    low = low_precision(lhs.dtype) and rhs.dtype == lhs.dtype
    if (low and preferred_element_type is None and _FORMULATION[-1] != "xla"
            and jax.default_backend() == "cpu"):
        out = lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32)
        return out.astype(lhs.dtype)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type)


def _matmul(a: Array, b: Array) -> Array:
    """[M, K] x [K, N] -> [M, N], accumulated in float32 for 16-bit inputs."""
    low = low_precision(a.dtype)
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
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(a), int(b)) for a, b in padding)
    impl = resolve_impl(impl, x.shape, kernel.shape, x.dtype, strides=strides, padding=padding)
    if impl == "winograd":
        if winograd_applies(x.shape, kernel.shape, strides, padding):
            return winograd3x3(x, kernel)
        impl = "shifted"                       # what "winograd" does not cover runs one dot per tap
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


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016): a 2x2 tile of outputs from the
# 4x4 tile of inputs around it, y = A^T [(G g G^T) * (B^T d B)] A, as 16 products per channel pair
# where the direct sum takes 36. The transforms along one axis, on lists of equal-shaped arrays:
def _winograd_data(d):
    """B^T d for the four rows (or columns) d0..d3 of input tiles."""
    d0, d1, d2, d3 = d
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _winograd_kernel(g):
    """G g for the three taps g0..g2 of a kernel axis."""
    g0, g1, g2 = g
    return [g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2]


def _winograd_output(m):
    """A^T m: the two outputs of a tile from its four transformed products."""
    m0, m1, m2, m3 = m
    return [m0 + m1 + m2, m1 - m2 - m3]


def winograd_applies(x_shape, kernel_shape, strides, padding) -> bool:
    """Whether `winograd3x3` covers this convolution: a 3x3 kernel, stride 1, one pixel of zeros
    on every side ("same" output size), and a map of even height and width."""
    return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
            and x_shape[1] % 2 == 0 and x_shape[2] % 2 == 0)


def winograd3x3(x: Array, kernel: Array) -> Array:
    """x [B, H, W, C] (H, W even) * kernel [3, 3, C, O], stride 1, padding 1 -> [B, H, W, O] in
    x's dtype, by F(2x2, 3x3): 2.25x fewer multiply-adds than the direct sum.

    The data and kernel transforms (sums, differences and halvings) run in float32; each of the
    16 products [B*H*W/4, C] x [C, O] is a 2-D dot in x's dtype that accumulates in float32 (as
    in "shifted"), and the output transform adds float32 products. The rounding differs from the
    direct sum: in float32 the outputs are within ~1e-6 of the largest (2x the direct sum's
    error against a float64 reference), in bfloat16 ~1.5x the direct sum's error, because the
    transformed tiles and kernels are rounded to bfloat16 for the products."""
    B, H, W, C = x.shape
    O = kernel.shape[-1]
    f32 = jnp.float32
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(f32)          # [B, H+2, W+2, C]
    rows = _winograd_data([xp[:, k:k + H:2] for k in range(4)])             # 4 x [B, H/2, W+2, C]
    v = [_winograd_data([r[:, :, k:k + W:2] for k in range(4)]) for r in rows]  # [a][b]: [B, H/2, W/2, C]
    w = kernel.astype(f32)
    u = [_winograd_kernel([ur[j] for j in range(3)])                        # [a][b]: [C, O]
         for ur in _winograd_kernel([w[i] for i in range(3)])]
    m = [[_matmul(v[a][b].reshape(-1, C).astype(x.dtype), u[a][b].astype(x.dtype))  # float32
          .reshape(B, H // 2, W // 2, O) for b in range(4)] for a in range(4)]
    cols = [_winograd_output(m[a]) for a in range(4)]                       # [a][j]: tile column j
    y = [_winograd_output([cols[a][j] for a in range(4)]) for j in range(2)]  # [j][i]: output (i, j)
    # [B, H/2, 2, W/2, 2, O]: output row 2t + i, column 2s + j
    tiles = jnp.stack([jnp.stack([y[j][i] for j in range(2)], 3) for i in range(2)], 2)
    return tiles.reshape(B, H, W, O).astype(x.dtype)


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
