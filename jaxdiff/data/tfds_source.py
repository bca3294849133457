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

import re
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


def _not_available(
    name: str, split: str, data_dir_root: Any, variant_dir: Any, why: str
) -> DatasetNotAvailableError:
    return DatasetNotAvailableError(
        f"TFDS dataset '{name}' (split '{split}') is not available offline: {why} "
        f"Looked in data_dir={str(data_dir_root)!r} (expected {str(variant_dir)!r}). "
        "jaxdiff never downloads. Fix: on a machine with network run "
        f"`tfds build {name.split(':')[0]} --file_format=array_record --data_dir DIR` "
        "(or copy an already prepared dataset folder), then pass data_dir=DIR "
        "(or set TFDS_DATA_DIR)."
    )


def _open_tfds(name: str, split: str, data_dir: str | None):
    """tfds.data_source without any network access; clear errors otherwise."""
    import tensorflow_datasets as tfds  # imported lazily: ~0.4 s, only when asked for

    try:
        # download=False: never prepare; try_gcs=False: never read gs://tfds-data.
        # (tfds 4.9.x also ships with gcs_utils._is_gcs_disabled = True.)
        return tfds.data_source(name, split=split, download=False, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        raise DataError(
            f"unknown TFDS dataset '{name}': {first} (community namespaces such as "
            "'huggingface:' are not supported: they need network access)."
        ) from None
    except Exception as e:  # diagnose below
        error = e
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as e2:
        raise DataError(f"cannot open TFDS dataset '{name}': {type(e2).__name__}: {e2}") from None
    if not builder.is_prepared():
        raise _not_available(
            name, split, builder.data_dir_root, builder.data_dir, "it has not been prepared there."
        ) from None
    text = f"{type(error).__name__}: {error}"
    if "file format" in text.lower():
        raise _not_available(
            name, split, builder.data_dir_root, builder.data_dir,
            "it is prepared as tfrecord, which has no random access; tfds.data_source "
            "needs array_record (`tfds convert_format --dataset_version_dir=... "
            "--out_file_format=array_record` converts it).",
        ) from None
    raise DataError(f"cannot open TFDS dataset '{name}' split '{split}': {text}") from None


def tfds_source(spec, image_size, channels, split, data_dir, image_key, label_key) -> Source:
    """The TFDS dataset `spec` ('NAME[:VERSION][:SPLIT]', without 'tfds:') as a source of
    [S, S, C] images from feature `image_key`, labels from the ClassLabel `label_key`."""
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
    if image_size is None and (None in shape[:2] or -1 in shape[:2]):
        raise DataError(
            f"TFDS dataset '{name}' has images of varying size {shape}; pass image_size."
        )
    native_c = shape[2] if len(shape) == 3 else 1
    if channels is None:
        channels = {1: 1, 2: 1, 3: 3, 4: 3}.get(native_c, 3)
    height, width = (image_size, image_size) if image_size is not None else shape[:2]

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
        num_classes, class_names, load, False,
    )

