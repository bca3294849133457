"""Dataset names: the string that names a dataset, opened as a :class:`Source`.

=====================================  ==============================================
``"digits"``                           the embedded 5,000 MNIST digits (``digits.py``)
``"captioned_digits"``                 the same digits with captions (``digits.py``)
``"tfds:NAME[:SPLIT]"``                a prepared TFDS dataset (``tfds_source.py``)
``"folder:PATH"`` or an existing dir   image files below PATH (``folder.py``)
=====================================  ==============================================

Sizes: ``native_shape(name)`` is a dataset's (H, W, C) as stored, found without decoding
pixels; ``resolve_image_size(name, cfg.data.image_size)`` turns a config's size (-1: by
dataset, 0: native, N: N x N) into the ``image_size`` to build with. Only the embedded digits
are shrunk by default (to the demo's 16x16); every other dataset keeps its native size unless
a size is asked for.
"""

from __future__ import annotations

import os

import numpy as np

from jaxdiff.data import digits, folder, tfds_source
from jaxdiff.data.source import Source
from jaxdiff.errors import DataError

# data.image_size in a config: -1 picks the size by dataset (see resolve_image_size).
AUTO_IMAGE_SIZE = -1


def _kind(name) -> tuple[str, str | None]:
    """('digits' | 'captioned_digits' | 'tfds' | 'folder', the rest of the name)."""
    if not isinstance(name, (str, os.PathLike)):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}.")
    name = os.fspath(name)
    if name in digits.DATASETS:
        return name, None
    if name.startswith("tfds:"):
        return "tfds", name[5:]
    if name.startswith("folder:"):
        return "folder", os.path.expanduser(name[7:])
    if os.path.isdir(name):
        return "folder", name
    raise DataError(
        f"unknown dataset {name!r}: use 'digits', 'captioned_digits', 'tfds:NAME[:SPLIT]', "
        "'folder:PATH' or the path of an existing image folder."
    )


def open_source(
    name: str,
    *,
    image_size: int | None,
    channels: int | None,
    split: str | None,
    data_dir: str | None,
    image_key: str,
    label_key: str | None,
) -> Source:
    """The source `name` names, preprocessed to [S, S, C] (S = image_size, C = channels; None
    keeps the source's own)."""
    kind, rest = _kind(name)
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}.")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None (keep the source's), got {channels!r}.")
    image_size = None if image_size is None else int(image_size)
    if kind == "digits":
        return digits.digits_source(image_size, channels, split)
    if kind == "captioned_digits":
        return digits.captioned_digits_source(image_size, channels, split)
    if kind == "tfds":
        return tfds_source.tfds_source(
            rest, image_size, channels, split, data_dir, image_key, label_key)
    return folder.folder_source(rest, image_size, channels, split)


def native_shape(
    name: str,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    image_key: str = "image",
) -> tuple[int, int, int] | None:
    """(H, W, C) of a dataset's images as stored, i.e. the image_shape ``build(name,
    image_size=None, channels=None)`` gives; None when the size varies from image to image
    (then a size must be chosen). Decodes no pixels: the digits' shape is known, a folder's
    comes from its files' headers, a TFDS dataset's from its metadata.
    """
    kind, rest = _kind(name)
    if kind in digits.DATASETS:
        digits.check_split(split)
        return digits.NATIVE_SHAPE
    if kind == "tfds":
        return tfds_source.native_shape(rest, split, data_dir, image_key)
    if split is not None:
        raise DataError(
            f"an image folder has no splits (got split={split!r}); point at the split's folder."
        )
    return folder.native_shape(rest)


def resolve_image_size(name: str, image_size: int | None) -> int | None:
    """The `image_size` to build dataset `name` with, from a config's ``data.image_size``.

    ``-1`` (``AUTO_IMAGE_SIZE``): the embedded digits at the demo's 16x16
    (``digits.DEMO_IMAGE_SIZE``), every other dataset at its native size (None);
    ``0`` or None: the native size (None); ``N > 0``: resized to N x N.
    """
    kind, _ = _kind(name)
    if image_size is None or image_size == 0:
        return None
    if not isinstance(image_size, (int, np.integer)) or image_size < AUTO_IMAGE_SIZE:
        raise DataError(
            f"image_size must be -1 (by dataset), 0 (native) or a positive size, got "
            f"{image_size!r}."
        )
    if image_size == AUTO_IMAGE_SIZE:
        return digits.DEMO_IMAGE_SIZE if kind in digits.DATASETS else None
    return int(image_size)
