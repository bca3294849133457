"""The invisible watermark of Stability AI's SDXL release, as diffusers' SDXL pipelines embed it.

    marked = embed_watermark(images)       # unit floats [N, H, W, 3] (RGB) -> the same, marked
    read_watermark_bits(marked[0])         # -> bool [48]
    detect_watermark(marked[0])            # -> True

diffusers (`pipelines/stable_diffusion_xl/watermark.py`) hands each decoded image, as float BGR
in 0..255, to the `invisible-watermark` package's "dwtDct" encoder with a fixed 48-bit message
(`WATERMARK_BITS`). That encoder works on one chroma plane in a Haar wavelet domain:

    1. BGR -> YUV (OpenCV's float formulas):  Y = .299 R + .587 G + .114 B,
       U = .492 (B - Y) + d,  V = .877 (R - Y) + d    (d = 0.5 for float images, 128 for uint8)
    2. the U plane cropped to a multiple of 4 -> one level of the 2-D Haar transform; only the
       approximation band cA [H/2, W/2] (each 2x2 pixel block's sum / 2) is changed
    3. cA is cut into 4x4 blocks, numbered row by row; block k carries bit b = m[k mod 48]: its
       largest-magnitude entry other than the first, c, is moved to the middle of the lower
       (b = 0) or upper (b = 1) half of its quantisation cell of width s = 36:
           |c| <- (floor(|c| / s) + 1/4 + b/2) s,   sign kept
    4. inverse Haar, YUV -> BGR.

Despite the method's name no DCT is taken: the block entries are moved directly. Two quirks of
the reference are kept so that the pixels agree with it: the inverse transform receives the
horizontal and vertical detail bands swapped, which transposes every 2x2 pixel block of the
cropped U plane; and the YUV -> BGR -> YUV round trip of OpenCV's rounded coefficients is not
exact, which shifts every pixel by up to ~0.03 / 255.

Reading (`read_watermark_bits`) repeats steps 1-3: a block's bit is 1 when its chosen entry sits
in the upper half of its cell; each message bit is the majority vote of the blocks that carry
it. `reference=True` reads exactly as the reference decoder does (uint8 planes in OpenCV's
14-bit fixed point); the default reads in the float domain the mark was written in, which finds
it far more often (see `watermark_scores`). `detect_watermark` accepts at most `MAX_BIT_ERRORS` of the 48 bits wrong
(an unmarked image passes by chance with probability ~2e-10).

Images narrower than 256 pixels are left as they are (diffusers skips them), as are images
under 256 x 256 pixels in area (the reference refuses those). `StableDiffusion` marks the decoded
images after they are clipped to [0, 1], diffusers before its clamp: where the VAE decodes a
pixel outside [-1, 1] the two can differ there; elsewhere the pixels are the reference's, bit for
bit (tests/test_provenance.py).
"""

from __future__ import annotations

import numpy as np

# The 48-bit message of Stability AI's generative-models demo, which diffusers embeds.
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = np.array([int(b) for b in bin(WATERMARK_MESSAGE)[2:]], bool)
SCALE = 36.0          # quantisation cell width in the U plane's cA band
BLOCK = 4             # cA blocks are BLOCK x BLOCK
MAX_BIT_ERRORS = 4
MIN_WIDTH, MIN_AREA = 256, 256 * 256


def _fma(a, b, c) -> np.ndarray:
    """a * b + c rounded once to float32, as OpenCV's vectorised colour conversion computes it."""
    return (np.asarray(a, np.float64) * np.float32(b) + np.asarray(c, np.float64)).astype(np.float32)


def _yuv(bgr: np.ndarray, delta: float):
    """bgr: [H, W, 3] float32 -> (Y, U, V) planes [H, W] float32, by OpenCV's BGR2YUV for floats
    (the same coefficients and fused multiply-adds, so ties between cA entries break alike)."""
    b, g, r = bgr[..., 0], bgr[..., 1], bgr[..., 2]
    y = _fma(b, 0.114, _fma(g, 0.587, r * np.float32(0.299)))
    return y, _fma(b - y, 0.492, np.float32(delta)), _fma(r - y, 0.877, np.float32(delta))


def _bgr(y: np.ndarray, u: np.ndarray, v: np.ndarray, delta: float) -> np.ndarray:
    """(Y, U, V) planes [H, W] float32 -> bgr [H, W, 3] float32, by OpenCV's YUV2BGR for floats."""
    du, dv = u - np.float32(delta), v - np.float32(delta)
    return np.stack([_fma(du, 2.032, y), _fma(dv, -0.581, _fma(du, -0.395, y)), _fma(dv, 1.140, y)], axis=-1)


def _dwt(x: np.ndarray, axis: int):
    """One Haar step along `axis` (even length n) -> (approximation, detail), each n/2 long there,
    rounded as PyWavelets computes them: x0 c + x1 c and x0 c - x1 c, c = sqrt(1/2)."""
    x = np.moveaxis(x, axis, 0)
    c = x.dtype.type(np.sqrt(0.5)) if x.dtype.kind == "f" else np.sqrt(0.5)
    a, d = x[0::2] * c + x[1::2] * c, x[0::2] * c - x[1::2] * c
    return np.moveaxis(a, 0, axis), np.moveaxis(d, 0, axis)


def _idwt(a: np.ndarray, d: np.ndarray, axis: int) -> np.ndarray:
    """The inverse of `_dwt` along `axis`, rounded as PyWavelets computes it."""
    a, d = np.moveaxis(a, axis, 0), np.moveaxis(d, axis, 0)
    c = a.dtype.type(np.sqrt(0.5))
    out = np.empty((2 * a.shape[0],) + a.shape[1:], a.dtype)
    out[0::2], out[1::2] = a * c + d * c, a * c - d * c
    return np.moveaxis(out, 0, axis)


def _haar2(plane: np.ndarray):
    """plane: [H, W] (H, W even) -> (cA, cH, cV, cD), each [H/2, W/2]: down the rows first, then
    along them, as `pywt.dwt2(plane, "haar")`. cA is each 2x2 block's sum / 2."""
    lo, hi = _dwt(plane, 0)
    (aa, ad), (da, dd) = _dwt(lo, 1), _dwt(hi, 1)
    return aa, da, ad, dd


def _haar_approx(plane: np.ndarray) -> np.ndarray:
    """The cA band [H/2, W/2] of `_haar2`."""
    return _dwt(_dwt(plane, 0)[0], 1)[0]


def _blocks(ca: np.ndarray) -> tuple[np.ndarray, int, int]:
    """cA [h, w] -> (its whole 4x4 blocks [nb, 16] numbered row by row, rows, cols of blocks)."""
    nbi, nbj = ca.shape[0] // BLOCK, ca.shape[1] // BLOCK
    blocks = ca[:nbi * BLOCK, :nbj * BLOCK].reshape(nbi, BLOCK, nbj, BLOCK)         # [bi, 4, bj, 4]
    return blocks.transpose(0, 2, 1, 3).reshape(nbi * nbj, BLOCK * BLOCK), nbi, nbj  # [nb, 16]


def _chosen(blocks: np.ndarray) -> np.ndarray:
    """[nb, 16] -> the index of each block's largest-magnitude entry after the first, [nb]."""
    return np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1


def _u_plane_uint8(bgr: np.ndarray) -> np.ndarray:
    """bgr: uint8 [H, W, 3] -> the U plane as OpenCV computes it for uint8 images: 14-bit fixed
    point coefficients, Y rounded first, then U = round(.492 (B - Y) + 128) clipped to 0..255.
    int64 [H, W]."""
    b, g, r = (bgr[..., i].astype(np.int64) for i in range(3))
    shift = 14
    half, fixed = 1 << (shift - 1), lambda c: round(c * (1 << shift))
    y = (r * fixed(0.299) + g * fixed(0.587) + b * fixed(0.114) + half) >> shift
    u = ((b - y) * fixed(0.492) + (128 << shift) + half) >> shift
    return np.clip(u, 0, 255)


def _too_small(h: int, w: int) -> bool:
    return w < MIN_WIDTH or h * w < MIN_AREA


def _embed_one(rgb255: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """rgb255: float32 [H, W, 3] in 0..255 -> the marked image, same shape (see the docstring)."""
    h, w = rgb255.shape[:2]
    bgr = rgb255[..., ::-1]
    y, u, v = _yuv(bgr, 0.5)
    h4, w4 = h // 4 * 4, w // 4 * 4
    ca, ch, cv, cd = _haar2(u[:h4, :w4])                                          # [h4/2, w4/2] each
    blocks, nbi, nbj = _blocks(ca)
    rows = np.arange(len(blocks))
    pos = _chosen(blocks)
    value = blocks[rows, pos]
    bit = bits[rows % len(bits)].astype(np.float32)
    moved = (np.floor_divide(np.abs(value), np.float32(SCALE)) + 0.25 + 0.5 * bit) * np.float32(SCALE)
    blocks[rows, pos] = np.where(value >= 0, moved, -moved)
    ca = ca.copy()
    ca[:nbi * BLOCK, :nbj * BLOCK] = (blocks.reshape(nbi, nbj, BLOCK, BLOCK)
                                      .transpose(0, 2, 1, 3).reshape(nbi * BLOCK, nbj * BLOCK))
    # The inverse transform as the reference calls it: cH and cV trade places.
    u = u.copy()
    u[:h4, :w4] = _idwt(_idwt(ca, ch, 1), _idwt(cv, cd, 1), 0)
    return _bgr(y, u, v, 0.5)[..., ::-1]


def embed_watermark(images, bits=WATERMARK_BITS) -> np.ndarray:
    """Mark images as diffusers' SDXL watermarker does. images: float [N, H, W, 3] or [H, W, 3]
    RGB in [0, 1] -> float32, same shape, in [0, 1]. Images narrower than 256 or under 256x256
    pixels come back unchanged. bits: the message (default: SDXL's 48 bits)."""
    x = np.asarray(images, np.float32)
    one = x.ndim == 3
    x = x[None] if one else x
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"embed_watermark takes RGB images [N, H, W, 3], got shape {list(np.shape(images))}")
    if _too_small(*x.shape[1:3]):
        return x[0] if one else x
    bits = np.asarray(bits, bool)
    out = np.stack([_embed_one(255.0 * im, bits) for im in x])                     # [N, H, W, 3] 0..255
    out = np.clip(out.astype(np.float32) / 255.0, 0.0, 1.0)
    return out[0] if one else out


def _as_uint8_rgb(image) -> np.ndarray:
    """A PIL image, uint8 [H, W, 3] or floats [H, W, 3] in [0, 1] -> uint8 [H, W, 3]."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected one RGB image [H, W, 3], got shape {list(x.shape)}")
    if x.dtype != np.uint8:
        x = np.round(np.clip(x.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    return x


def watermark_scores(image, *, reference: bool = False) -> np.ndarray:
    """The per-bit vote of the blocks, float [48] in [0, 1] (1: every block says 1). image: a PIL
    image, or one RGB image [H, W, 3] (uint8, or floats in [0, 1]).

    reference=True reads as the `invisible-watermark` decoder does on a uint8 image (U plane in
    OpenCV's fixed point, offset 128): bit for bit its answer. The default reads in the
    embedder's own domain (float U plane, offset 0.5). The two differ because the reference
    embeds in float and decodes in uint8: the offset moves every cA entry by +255, so where the
    embedder chose a block's largest *magnitude* (often a negative entry) the uint8 decoder picks
    the largest *value*, another entry, about half the time. Measured on 20 photo crops
    (`experiments/watermark_robustness.py`): 70% of marked PNGs read with <= 4 wrong bits in the
    float domain, 20% with the reference rule."""
    x = _as_uint8_rgb(image)
    h, w = x.shape[:2]
    if _too_small(h, w):
        raise ValueError(f"a watermark is only embedded in images at least {MIN_WIDTH} wide and "
                         f"{MIN_AREA:,} pixels in area, got {w}x{h}")
    if reference:
        u = _u_plane_uint8(x[..., ::-1]).astype(np.float64)            # [H, W]
    else:
        u = _yuv(x[..., ::-1].astype(np.float32), 0.5)[1]               # [H, W]
    blocks, _, _ = _blocks(_haar_approx(u[:h // 4 * 4, :w // 4 * 4]))
    value = np.abs(blocks[np.arange(len(blocks)), _chosen(blocks)])
    votes = (value % SCALE > 0.5 * SCALE).astype(np.float64)            # [nb]
    n = len(WATERMARK_BITS)
    k = np.arange(len(votes)) % n
    return np.bincount(k, votes, minlength=n) / np.maximum(np.bincount(k, minlength=n), 1)


def read_watermark_bits(image, *, reference: bool = False) -> np.ndarray:
    """The 48 bits read from `image` (bool [48]) by the reference's vote rule (see
    `watermark_scores` for `reference`)."""
    return watermark_scores(image, reference=reference) * 255 > 127


def detect_watermark(image, bits=WATERMARK_BITS, max_errors: int = MAX_BIT_ERRORS, *,
                     reference: bool = False) -> bool:
    """Whether `image` carries the SDXL watermark `bits` (at most `max_errors` bits wrong). image:
    a PIL image or one RGB image [H, W, 3]; False for images too small to carry one. The mark
    does not survive JPEG: after a quality-90 re-encode none of 20 marked photo crops was
    detected (`experiments/watermark_robustness.py`)."""
    x = _as_uint8_rgb(image)
    if _too_small(*x.shape[:2]):
        return False
    return int(np.sum(read_watermark_bits(x, reference=reference) != np.asarray(bits, bool))) <= max_errors
