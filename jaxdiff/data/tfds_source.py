"""TFDS datasets read offline through ``tfds.data_source`` (array_record, random access, no
TensorFlow).

``"tfds:NAME"`` or ``"tfds:NAME:SPLIT"`` (split defaults to ``train``; ``NAME`` may carry a
config and version, ``"tfds:mnist:3.0.1:test"``). The dataset must already be prepared in
``data_dir``; nothing is ever downloaded and GCS is never consulted. A dataset that is not
prepared raises :class:`DatasetNotAvailableError`, one line naming the ``tfds build`` command
that prepares it. Examples are decoded per batch:
``load(indices [B]) -> (float32 [B, H, W, C] in [-1, 1], int32 [B])``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from typing import Any

import numpy as np

from jaxdiff.data.source import Source, fit_array, to_unit_range
from jaxdiff.errors import DataError, DatasetNotAvailableError

# NAME[:VERSION][:SPLIT]; the split may itself contain ':' (``train[:10%]``).
_TFDS_RE = re.compile(r"^(?P<name>[^:\[\]]+?(?::\d+\.[\d*]+\.[\d*]+)?)(?::(?P<split>.+))?$")


def _parse_tfds(spec: str) -> tuple[str, str | None]:
    m = _TFDS_RE.match(spec)
    if not m or not m.group("name").strip():
        raise DataError(
            f"cannot parse TFDS dataset {spec!r}; expected 'tfds:NAME' or 'tfds:NAME:SPLIT'."
        )
    return m.group("name").strip(), m.group("split")


def _not_available(name: str, split: str, data_dir: Any, variant_dir: Any, why: str,
                   fix: str | None = None) -> DatasetNotAvailableError:
    base = name.split(":")[0]
    fix = fix or (
        f"on a machine with network run `tfds build {base} --file_format=array_record "
        "--data_dir DIR` (or copy an already prepared dataset folder into DIR)"
    )
    return DatasetNotAvailableError(
        f"TFDS dataset '{name}' (split '{split}') is not available offline: {why} "
        f"Looked in data_dir={str(data_dir)!r} (expected {str(variant_dir)!r}). "
        f"jaxdiff never downloads. Fix: {fix}, then pass --config.data.data_dir=DIR "
        "(data_dir=DIR in Python, or set TFDS_DATA_DIR)."
    )


# TFDS logs through absl.logging, i.e. the Python logger "absl", and repeats itself: for an
# unprepared dataset `builder.is_prepared()` warns "Variant folder X has no dataset_info.json" on
# every call (tfds.data_source calls it even with download=False, and explaining the failure
# calls it again), and every open of a prepared one logs "Load dataset info from X" anew.
# _open_tfds looks a dataset up once and asks is_prepared() only to explain a failure, and
# _tfds_logs_once holds TFDS's lines back while a dataset is opened: when the open fails, the
# one-line DataError says what they said and they are dropped; when it succeeds, each line is
# passed on once per process.
_ABSL_LOGGER = "absl"
_tfds_lines_shown: set[tuple[int, str]] = set()
_tfds_open_lock = threading.Lock()


class _HoldTfdsRecords(logging.Filter):
    """Keeps back (in ``held``) the records TFDS's own code logs; passes every other record."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}tensorflow_datasets{os.sep}" in record.pathname:
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def _tfds_logs_once():
    """Holds back TFDS's log records while the block runs. If it raises (jaxdiff's one-line
    error, which says what they said) they are dropped; otherwise each line not yet shown in
    this process is passed on."""
    logger = logging.getLogger(_ABSL_LOGGER)
    with _tfds_open_lock:
        hold = _HoldTfdsRecords()
        logger.addFilter(hold)
        try:
            yield
        finally:
            logger.removeFilter(hold)
        for record in hold.held:
            key = (record.levelno, record.getMessage())
            if key not in _tfds_lines_shown:
                _tfds_lines_shown.add(key)
                logger.handle(record)


def _open_tfds(name: str, split: str, data_dir: str | None):
    """What ``tfds.data_source(name, split=split, data_dir=data_dir, download=False,
    try_gcs=False)`` returns, looking the dataset up once, with no network access and one
    clear error when it cannot be read."""
    import tensorflow_datasets as tfds  # imported lazily: ~0.4 s, only when asked for

    with _tfds_logs_once():
        try:
            # try_gcs=False: never read gs://tfds-data (tfds 4.9.x also ships with
            # gcs_utils._is_gcs_disabled = True). Without a data_dir, tfds.data_source asks the
            # builder for array_record; so does this.
            kwargs = {} if data_dir else {"file_format": "array_record"}
            builder = tfds.builder(name, data_dir=data_dir, try_gcs=False, **kwargs)
        except tfds.core.registered.DatasetNotFoundError as e:
            first = str(e).splitlines()[0] if str(e) else repr(e)
            raise DataError(
                f"unknown TFDS dataset '{name}': {first} (community namespaces such as "
                "'huggingface:' are not supported: they need network access)."
            ) from None
        except Exception as e:
            raise DataError(f"cannot open TFDS dataset '{name}': {type(e).__name__}: {e}") from None
        try:
            # Reads what is prepared; never prepares or downloads.
            return builder.as_data_source(split=split)
        except Exception as e:  # diagnose below
            error = e
        root = data_dir or builder.data_dir_root
        if not builder.is_prepared():
            raise _not_available(
                name, split, root, builder.data_dir, "it has not been prepared there."
            ) from None
        text = f"{type(error).__name__}: {error}"
        if "file format" in text.lower():
            raise _not_available(
                name, split, root, builder.data_dir,
                "it is prepared as tfrecord, which has no random access; tfds.data_source "
                "needs array_record.",
                fix=("convert it in place with `tfds convert_format --dataset_version_dir="
                     f"{builder.data_dir} --out_file_format=array_record`"),
            ) from None
        raise DataError(f"cannot open TFDS dataset '{name}' split '{split}': {text}") from None


# Stored channels -> the channels kept by default (alpha dropped).
_DEFAULT_CHANNELS = {1: 1, 2: 1, 3: 3, 4: 3}


def _open_images(spec: str, split: str | None, data_dir: str | None, image_key: str):
    """Opens `spec` and checks its image feature: (name, split, data source, features,
    stored shape [H, W] or [H, W, C] with None/-1 for a size that varies)."""
    name, name_split = _parse_tfds(spec)
    if name_split is not None and split is not None and name_split != split:
        raise DataError(f"split given twice: {spec!r} and split={split!r}.")
    split = split or name_split or "train"
    source = _open_tfds(name, split, data_dir)
    features = source.dataset_info.features
    if image_key not in features:
        raise DataError(
            f"TFDS dataset '{name}' has no feature {image_key!r} (features: "
            f"{sorted(features.keys())}); pass image_key."
        )
    shape = tuple(features[image_key].shape)
    if len(shape) not in (2, 3):
        raise DataError(
            f"TFDS feature {name}/{image_key} has shape {shape}; expected [H, W] or [H, W, C]."
        )
    return name, split, source, features, shape


def _native_shape(shape: tuple) -> tuple[int, int, int] | None:
    """The (H, W, C) a stored feature shape gives without resizing; None when H or W varies."""
    if None in shape[:2] or -1 in shape[:2]:
        return None
    stored_c = shape[2] if len(shape) == 3 else 1
    return (int(shape[0]), int(shape[1]), _DEFAULT_CHANNELS.get(stored_c, 3))


def native_shape(spec: str, split: str | None, data_dir: str | None,
                 image_key: str = "image") -> tuple[int, int, int] | None:
    """(H, W, C) of the TFDS dataset `spec`'s images as stored (C as ``channels=None`` keeps
    it), or None when their size varies. Reads the dataset's metadata only."""
    return _native_shape(_open_images(spec, split, data_dir, image_key)[-1])


def tfds_source(spec, image_size, channels, split, data_dir, image_key, label_key) -> Source:
    """The TFDS dataset `spec` ('NAME[:VERSION][:SPLIT]', without 'tfds:') as a source of
    [S, S, C] images from feature `image_key`, labels from the ClassLabel `label_key`."""
    name, split, source, features, shape = _open_images(spec, split, data_dir, image_key)
    native = _native_shape(shape)
    if image_size is None and native is None:
        raise DataError(
            f"TFDS dataset '{name}' has images of varying size {shape}; pass image_size "
            "(--config.data.image_size=N)."
        )
    if channels is None:
        channels = _DEFAULT_CHANNELS.get(shape[2] if len(shape) == 3 else 1, 3)
    height, width = native[:2] if image_size is None else (image_size, image_size)

    num_classes, class_names = None, None
    if label_key is not None and label_key in features:
        import tensorflow_datasets as tfds

        feat = features[label_key]
        if not isinstance(feat, tfds.features.ClassLabel):
            raise DataError(
                f"TFDS feature {name}/{label_key} is {type(feat).__name__}, not a ClassLabel; "
                "pass label_key=None to train unconditionally."
            )
        num_classes = int(feat.num_classes)
        class_names = tuple(feat.names)
    else:
        label_key = None
    what = f"tfds:{name}:{split}/{image_key}"

    # Batched reads are ~1.7x faster on array_record; probe once, since some wrappers
    # (e.g. tfds.testing.mock_data) expose a __getitems__ that does not work.
    try:
        source.__getitems__([0])
        read_many = source.__getitems__
    except Exception:
        read_many = lambda keys: [source[k] for k in keys]  # noqa: E731

    def load(indices):
        pixels, labels = [], []
        for ex in read_many([int(i) for i in indices]):
            pixels.append(fit_array(np.asarray(ex[image_key]), channels, image_size, what))
            labels.append(-1 if label_key is None else int(ex[label_key]))
        return to_unit_range(np.stack(pixels)), np.asarray(labels, dtype=np.int32)

    return Source(
        f"tfds {name} ({split})", len(source), (int(height), int(width), channels),
        num_classes, class_names, load, False, native_shape=native,
    )

