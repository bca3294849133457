"""Image folders: ``"folder:PATH"`` or the path of an existing directory.

Image files (png, jpg, jpeg, bmp, webp) are searched recursively, hidden files and folders
skipped. When every image lives below a class subfolder (``PATH/<class>/...``), labels are the
sorted subfolder names; otherwise the set is unlabeled (labels -1). Every file's header is
verified once at construction, so a broken file is one clear error rather than an exception
from a prefetch thread mid-training. Files are decoded per batch (nothing is held in memory):
``load(indices [B]) -> (float32 [B, H, W, C] in [-1, 1], int32 [B])``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from jaxdiff.data.source import Source, fit_pil, to_unit_range
from jaxdiff.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _list_images(root: str) -> list[str]:
    """Relative paths of image files below root, sorted; hidden files/dirs skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(found)


def _image_paths(root: str) -> tuple[list[str], list[str]]:
    """(relative, full) paths of the images below root; a clear error when there are none."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist or is not a directory.")
    rel = _list_images(root)
    if not rel:
        raise DataError(
            f"image folder {root!r} contains no images (looked recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)})."
        )
    return rel, [os.path.join(root, r) for r in rel]


def _native_shape(sizes: set[tuple[int, int]], modes: set[str]) -> tuple[int, int, int] | None:
    """(H, W, C) from the files' (W, H) sizes and PIL modes; None when the sizes differ."""
    if len(sizes) != 1:
        return None
    (w, h), = sizes
    return (h, w, 1 if modes <= _GRAY_MODES else 3)


def native_shape(root: str) -> tuple[int, int, int] | None:
    """(H, W, C) of the images below `root` as they are stored (C: 1 when every file is gray,
    else 3), or None when their sizes differ. Reads each file's header only."""
    _, paths = _image_paths(root)
    sizes, modes = set(), set()
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.add(im.size)
                modes.add(im.mode)
        except Exception as e:  # PIL raises many types for broken files
            raise DataError(f"unreadable image file {p}: {type(e).__name__}: {e}") from None
        if len(sizes) > 1:
            return None
    return _native_shape(sizes, modes)


def folder_source(root: str, image_size: int | None, channels: int | None, split) -> Source:
    """The images below `root` as a source of [S, S, C] images (image_size None: the files'
    own size, which must then be uniform; channels None: 1 when every file is gray, else 3)."""
    if split is not None:
        raise DataError(
            f"an image folder has no splits (got split={split!r}); point at the split's folder."
        )
    rel, paths = _image_paths(root)

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
    native = _native_shape(sizes, modes)
    if image_size is None and native is None:
        raise DataError(
            f"images in folder {root!r} have {len(sizes)} different sizes "
            f"(e.g. {sorted(sizes)[:3]}); pass image_size (--config.data.image_size=N) to "
            "resize them to one square size."
        )
    if channels is None:
        channels = 1 if modes <= _GRAY_MODES else 3
    # image_size None keeps the files' uniform size, square or not.
    height, width = native[:2] if image_size is None else (image_size, image_size)

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
                return fit_pil(im, channels, image_size)  # [H, W, C] uint8
        except Exception as e:
            raise DataError(f"cannot decode image file {p}: {type(e).__name__}: {e}") from None

    def load(indices):
        pixels = np.stack([read(paths[i]) for i in indices])  # [B, H, W, C]
        return to_unit_range(pixels), labels[indices]

    shape = (height, width, channels)
    return Source(f"folder {root}", len(paths), shape, num_classes, class_names, load, False,
                  native_shape=native)

