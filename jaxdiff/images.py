"""Images in and out: [-1, 1] floats <-> uint8, and sample grids as PNG."""

from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(x) -> np.ndarray:
    """x: [..., H, W, C] floats in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """images: uint8 [N, H, W, C] -> one uint8 picture [rows*(H+pad)+pad, cols*(W+pad)+pad, C]."""
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


def save_grid(images: np.ndarray, path: str, ncols: int | None = None, upscale: int | None = None) -> str:
    """Write uint8 images [N, H, W, C] as one PNG grid; small images are enlarged (nearest) so a
    grid of 28x28 digits is legible on a screen."""
    from PIL import Image

    grid = make_grid(images, ncols)
    if upscale is None:
        upscale = max(1, 64 // images.shape[1])
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
