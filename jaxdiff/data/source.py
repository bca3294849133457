"""What a source is: random access to preprocessed examples, and the pixel conversion every
source shares.

A :class:`Source` is what each dataset kind (``digits.py``, ``folder.py``, ``tfds_source.py``)
hands the pipeline: ``load(indices int [B]) -> (images float32 [B, H, W, C] in [-1, 1],
labels int32 [B])``, one call per batch, plus what the pipeline needs to know about the set.

Pixels enter as uint8 ``[H, W]`` or ``[H, W, C]`` in any of gray, gray+alpha, RGB or RGBA and
leave as uint8 ``[S, S, channels]`` (``fit_array`` / ``fit_pil``: convert mode, center-crop to
a square, bicubic resize), then float32 in [-1, 1] (``to_unit_range``: 0 -> -1, 255 -> 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image

from jaxdiff.errors import DataError


def to_unit_range(x: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1] (0 -> -1, 255 -> 1 exactly)."""
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def fit_pil(img: Image.Image, channels: int, image_size: int | None) -> np.ndarray:
    """PIL image -> uint8 [S, S, channels]: convert mode, center-crop to square, resize."""
    mode = "L" if channels == 1 else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    if image_size is not None and img.size != (image_size, image_size):
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.resize(
            (image_size, image_size),
            resample=Image.Resampling.BICUBIC,
            box=(left, top, left + s, top + s),
        )
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr  # [S, S, C]


def fit_array(x: np.ndarray, channels: int, image_size: int | None, what: str) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> uint8 [S, S, channels]."""
    if x.dtype != np.uint8:
        raise DataError(f"{what}: expected uint8 pixels, got dtype {x.dtype}.")
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
        raise DataError(
            f"{what}: cannot convert an image of shape {tuple(x.shape)} to {channels} "
            "channel(s); expected [H, W] or [H, W, C] with C in 1 (gray), 2 (gray+alpha), "
            "3 (RGB), 4 (RGBA)."
        )
    c = x.shape[-1]
    same_size = image_size is None or x.shape[:2] == (image_size, image_size)
    if same_size and c == channels:
        return x
    if same_size and c == 1 and channels == 3:
        return np.repeat(x, 3, axis=-1)
    img = Image.fromarray(x[..., 0] if c == 1 else x)  # mode L, LA, RGB or RGBA
    return fit_pil(img, channels, image_size)


@dataclasses.dataclass
class Source:
    """A random-access image source after preprocessing.

    ``load(indices)`` returns ``(images float32 [B, H, W, C] in [-1, 1], labels int32 [B])``
    with ``(H, W, C) = image_shape``. ``native_shape`` is the (H, W, C) the images have before
    any resize (what ``image_size=None, channels=None`` gives), or None when it varies from
    image to image.
    """

    description: str
    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int | None
    class_names: tuple[str, ...] | None
    load: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    in_memory: bool
    # Per-example arrays [N, ...] gathered into every batch under their key (e.g. "caption").
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # Distinct caption strings of a captioned source; batch["caption"] indexes them.
    captions: tuple[str, ...] | None = None
    native_shape: tuple[int, int, int] | None = None


def array_source(description, images, labels, num_classes, class_names, extras=None,
                 captions=None, native_shape=None) -> Source:
    """A source over float32 images [N, H, W, C] and int32 labels [N] held in memory
    (``native_shape`` None: the arrays are native)."""

    def load(indices):
        return images[indices], labels[indices]

    return Source(
        description, len(images), tuple(images.shape[1:]), num_classes, class_names, load, True,
        dict(extras or {}), captions, native_shape or tuple(images.shape[1:]),
    )
