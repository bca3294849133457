"""The shuffled, resumable grain batch pipeline over any :class:`Source`.

Every batch is a dict of numpy arrays::

    {"image": float32 [B, H, W, C] in [-1, 1], "label": int32 [B], **extras}

``label`` is always present; it is -1 for unlabeled data, and then
``ImageDataset.num_classes`` is None. ``extras`` are a source's per-example fields (e.g.
``"caption"``: int32 [B] for ``captioned_digits``).

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
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time

import grain
import numpy as np

from jaxdiff.data.catalog import open_source
from jaxdiff.data.source import Source, array_source
from jaxdiff.errors import DataError

_log = logging.getLogger("jaxdiff.data")


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


def _hwc(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def _summary(description: str, n: int, shape, native) -> str:
    """'NAME: N images HxWxC, native size' or '..., resized from native HxWxC (how)'."""
    how = "center crop to square, bicubic"
    if native is None:
        size = f"resized from native sizes that vary ({how})"
    elif tuple(native[:2]) != tuple(shape[:2]):
        size = f"resized from native {_hwc(native)} ({how})"
    else:
        size = "native size"
    if native is not None and native[2] != shape[2]:
        size += f", {native[2]} -> {shape[2]} channel(s)"
    return f"{description}: {n:,} images {_hwc(shape)}, {size}"


class ImageDataset:
    """One process's view of an image dataset, batched, shuffled, repeated forever.

    Attributes:
      image_shape: (H, W, C) of every image after preprocessing.
      native_shape: (H, W, C) of the images as stored, or None when it varies by image.
      resized: whether the images are resized (image_shape differs from the native H, W).
      summary: one line naming the set, its size and any resize, for the trainer to print:
        "folder /photos: 1,200 images 16x16x3, resized from native 512x512x3 (center crop,
        bicubic)".
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
        source: Source,
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
        self.native_shape = source.native_shape
        self.resized = (source.native_shape is None
                        or tuple(source.native_shape[:2]) != tuple(source.image_shape[:2]))
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

    @property
    def summary(self) -> str:
        return _summary(self.description, self.total_examples, self.image_shape,
                        self.native_shape)

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.description}, image_shape={self.image_shape}, "
            f"native_shape={self.native_shape}, "
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
        None keeps the source size (must be uniform). ``native_shape(name)`` tells the size
        beforehand; ``resolve_image_size`` turns a config's ``data.image_size`` into this.
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
      ``ds.native_shape``, ``ds.resized`` and ``ds.summary`` say whether (and from what) the
      images are resized; the summary is also logged at INFO on the "jaxdiff.data" logger.

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
    source = open_source(
        name, image_size=image_size, channels=channels, split=split, data_dir=data_dir,
        image_key=image_key, label_key=label_key,
    )
    ds = ImageDataset(
        source, batch_size=int(batch_size), seed=int(seed), random_flip=bool(random_flip),
        process_index=int(process_index), process_count=int(process_count), num_threads=num_threads,
    )
    _log.info("%s", ds.summary)
    return ds


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
    source = array_source(description, images, labels, num_classes, None, extras, captions)
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
    source = open_source(
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
    source = open_source(
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
