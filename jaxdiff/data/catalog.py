"""Dataset names: the string that names a dataset, opened as a :class:`Source`.

=====================================  ==============================================
``"digits"``                           the embedded 5,000 MNIST digits (``digits.py``)
``"captioned_digits"``                 the same digits with captions (``digits.py``)
``"tfds:NAME[:SPLIT]"``                a prepared TFDS dataset (``tfds_source.py``)
``"folder:PATH"`` or an existing dir   image files below PATH (``folder.py``)
=====================================  ==============================================
"""

from __future__ import annotations

import os

import numpy as np

from jaxdiff.data.digits import captioned_digits_source, digits_source
from jaxdiff.data.folder import folder_source
from jaxdiff.data.source import Source
from jaxdiff.data.tfds_source import tfds_source
from jaxdiff.errors import DataError


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
    if not isinstance(name, (str, os.PathLike)):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}.")
    name = os.fspath(name)
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}.")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None (keep the source's), got {channels!r}.")
    image_size = None if image_size is None else int(image_size)
    if name == "digits":
        return digits_source(image_size, channels, split)
    if name == "captioned_digits":
        return captioned_digits_source(image_size, channels, split)
    if name.startswith("tfds:"):
        return tfds_source(name[5:], image_size, channels, split, data_dir, image_key, label_key)
    if name.startswith("folder:"):
        return folder_source(os.path.expanduser(name[7:]), image_size, channels, split)
    if os.path.isdir(name):
        return folder_source(name, image_size, channels, split)
    raise DataError(
        f"unknown dataset {name!r}: use 'digits', 'captioned_digits', 'tfds:NAME[:SPLIT]', "
        "'folder:PATH' "
        "or the path of an existing image folder."
    )

