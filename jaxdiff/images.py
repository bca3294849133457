"""Images in and out, with one convention for every pipeline.

    model space   float [-1, 1]    what networks and datasets use (`[..., H, W, C]`)
    unit floats   float [0, 1]     what pipelines return as output_type="np" (as diffusers does)
    uint8         0..255           round(unit * 255): output_type="uint8", PNG files
    PIL           list of images   output_type="pil"

    to_unit(x)            model space -> unit floats (clipped)
    to_uint8(x)           unit floats -> uint8
    to_output(x, kind)    unit floats -> "np" | "uint8" | "pil"
    read_images / read_masks   what users hand img2img / inpainting (PIL, uint8 or unit floats)
    make_grid / save_grid      uint8 [N, H, W, C] -> one picture / PNG
"""

from __future__ import annotations

import math
import os

import numpy as np

OUTPUT_TYPES = ("pil", "np", "uint8", "latent")


def check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")


def to_unit(x) -> np.ndarray:
    """x: [..., H, W, C] floats in [-1, 1] -> float32 in [0, 1] (values outside are clipped)."""
    return np.clip(np.asarray(x, np.float32) / 2 + 0.5, 0.0, 1.0)


def to_uint8(x) -> np.ndarray:
    """x: [..., H, W, C] floats in [0, 1] -> uint8 round(x * 255) (values outside are clipped), the
    rounding diffusers' `numpy_to_pil` uses."""
    return np.round(np.clip(np.asarray(x, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def to_pil(x) -> list:
    """x: [N, H, W, C] floats in [0, 1] -> a list of N PIL images (grayscale for C = 1)."""
    from PIL import Image

    pixels = to_uint8(x)
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]


def to_output(x, output_type: str):
    """Unit floats [N, H, W, C] as output_type "np" (float32, as is), "uint8" or "pil"."""
    check_output_type(output_type)
    if output_type == "uint8":
        return to_uint8(x)
    if output_type == "pil":
        return to_pil(x)
    if output_type == "latent":
        raise ValueError("output_type 'latent' is the sampler's result, not an image")
    return np.asarray(x, np.float32)


# --------------------------------------------------------------------------------------------
# Images handed in by users (img2img, inpainting).
# --------------------------------------------------------------------------------------------

def repeat_to(arrays: np.ndarray, n: int, what: str) -> np.ndarray:
    """[1 or n, ...] -> [n, ...] (a ValueError naming `what` for any other count)."""
    if arrays.shape[0] == n:
        return arrays
    if arrays.shape[0] == 1:
        return np.repeat(arrays, n, axis=0)
    raise ValueError(f"{arrays.shape[0]} {what}s for {n} outputs (len(prompts) * num_images); give 1 or {n}")


def _pil_list(x):
    from PIL import Image

    if isinstance(x, Image.Image):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(i, Image.Image) for i in x):
        return list(x)
    return None


def _as_unit_floats(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 0..255 or floats in [0, 1] -> float32 in [0, 1]; anything else is a ValueError."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise ValueError(f"{what} must hold numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError(f"{what} holds NaN or infinite values")
    if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"{what} values must lie in [0, 1] (float) or 0..255 (uint8), got {x.min():.3g}..{x.max():.3g}")
    return np.clip(x, 0.0, 1.0)


def read_images(image, n: int | None, height: int | None, width: int | None, multiple: int) -> np.ndarray:
    """PIL image(s), or arrays [B, H, W, 3] / [H, W, 3] of uint8 or floats in [0, 1] -> float32
    [n, H, W, 3] in [-1, 1] (B must be 1 or n; n=None keeps the B given). PIL images are resized (Lanczos) to height x width
    when both are given; H and W must be multiples of `multiple`."""
    pil = _pil_list(image)
    if pil is not None:
        from PIL import Image
        size = None if height is None or width is None else (int(width), int(height))
        pil = [p.convert("RGB") for p in pil]
        pil = [p if size is None or p.size == size else p.resize(size, Image.LANCZOS) for p in pil]
        if len({p.size for p in pil}) > 1:
            raise ValueError("all images must have the same size")
        x = np.stack([np.asarray(p, np.float32) / 255.0 for p in pil])
    else:
        x = np.asarray(image)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"image must be a PIL image or an array [B, H, W, 3] / [H, W, 3] (NHWC, RGB), "
                             f"got shape {list(np.shape(image))}")
        x = _as_unit_floats(x, "image")
        if (height and x.shape[1] != height) or (width and x.shape[2] != width):
            raise ValueError(f"image arrays are not resized: got {x.shape[1]}x{x.shape[2]}, asked for "
                             f"{height}x{width}; resize it or pass a PIL image")
    h, w = x.shape[1:3]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(f"image height and width must be multiples of {multiple} (and positive), got {h}x{w}; resize "
                         f"or crop it (e.g. to {max(multiple, h // multiple * multiple)}x"
                         f"{max(multiple, w // multiple * multiple)}, or pass height= and width= with a PIL image)")
    x = x * 2.0 - 1.0
    return x if n is None else repeat_to(x, n, "image")


def read_masks(mask, n: int, height: int, width: int) -> np.ndarray:
    """PIL mask(s), or arrays [B, H, W] / [B, H, W, 1] / [H, W] of uint8 or floats in [0, 1] ->
    float32 [n, H, W, 1] in {0, 1} (binarised at 0.5; 1 = white = repaint)."""
    pil = _pil_list(mask)
    if pil is not None:
        from PIL import Image
        pil = [p.convert("L") for p in pil]
        pil = [p if p.size == (width, height) else p.resize((width, height), Image.LANCZOS) for p in pil]
        m = np.stack([np.asarray(p, np.float32) / 255.0 for p in pil])[..., None]
    else:
        m = np.asarray(mask)
        if m.ndim == 2:
            m = m[None, ..., None]
        elif m.ndim == 3:
            m = m[..., None]
        if m.ndim != 4 or m.shape[-1] != 1:
            raise ValueError(f"mask must be a PIL image or an array [B, H, W] / [B, H, W, 1] / [H, W], got shape "
                             f"{list(np.shape(mask))}")
        m = _as_unit_floats(m, "mask")
    if m.shape[1:3] != (height, width):
        raise ValueError(f"mask is {m.shape[1]}x{m.shape[2]} but the image is {height}x{width}; they must match")
    return repeat_to((m >= 0.5).astype(np.float32), n, "mask")


# --------------------------------------------------------------------------------------------
# Grids.
# --------------------------------------------------------------------------------------------

def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """images: uint8 [N, H, W, C] -> one picture [rows*(H+pad)+pad, cols*(W+pad)+pad, C]."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, images.dtype)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str, ncols: int | None = None, upscale: int | None = None,
              pnginfo=None) -> str:
    """Write uint8 images [N, H, W, C] as one PNG grid (one image alone is written as it is);
    small images are enlarged (nearest) so a grid of 16x16 digits is legible on a screen. The
    file appears whole or not at all (written beside it, then renamed). pnginfo: PIL `PngInfo`
    text chunks to embed (the writers pass the recipe, `jaxdiff.provenance.save_png`)."""
    from PIL import Image

    images = np.asarray(images)
    grid = images[0] if len(images) == 1 and ncols is None else make_grid(images, ncols)
    if upscale is None:
        upscale = max(1, 64 // images.shape[1])
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    Image.fromarray(np.ascontiguousarray(grid)).save(tmp, format="PNG", pnginfo=pnginfo)
    os.replace(tmp, path)
    return path
