"""Feature networks for FID, KID and precision / recall: images in, [N, D] float32 features out.

    from jaxdiff.metrics import distribution, features, stats
    real = features.digit_features(real_images)                  # [N, 128], shipped weights
    fake = features.digit_features(samples)
    distribution.fid(stats.from_features(real), stats.from_features(fake))      # "FID-digits"

    feats = features.inception_features(images, "pt_inception-2015-12-05-6726825d.safetensors")
    pool3, logits = features.inception_outputs(images, path)     # logits for the Inception Score

Images are in model space: float [N, H, W, C] in [-1, 1] (`jaxdiff.images`). Both functions run
in batches of `batch_size`, the last one padded, so each network compiles once per batch shape.

    inception   the FID Inception-v3 (`models.inception`), 2048-d pool3 features; any size (resized
                to 299x299 inside), 1 or 3 channels (grey is repeated). The weights never ship
                and are never downloaded: the user converts pytorch-fid's file once (see
                `jaxdiff.convert.inception`). Its identity, for reference files, is
                `inception_feature_net(path)`: "inception-v3-fid:sha256=<hash of the file>".
    digits      a small classifier trained on the embedded digits at 16x16 (the demo's size) by
                `experiments/train_digit_features.py`, shipped as `assets/digit_features.safetensors`;
                its 128-d features are the mean over positions of its last convolution, before
                the classifier layer. It reads [N, 16, 16, 1] only. Identity: DIGIT_FEATURE_NET.
"""

from __future__ import annotations

import functools
import hashlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler
from jaxdiff.convert.inception import load_inception
from jaxdiff.convert.tensors import read_safetensors
from jaxdiff.models.inception import InceptionV3

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DIGIT_WEIGHTS = os.path.join(ASSETS, "digit_features.safetensors")
DIGIT_IMAGE_SHAPE = (16, 16, 1)
DIGIT_FEATURE_DIM = 128
# The shipped weights: sha256 of the file, and the accuracy `train_digit_features.py` measured on
# the held-out digits (`digit_split`) when it wrote them.
DIGIT_WEIGHTS_SHA256 = "9d3c746d5409462552412948335a96d080dc666233480c89a92a6914f3fe0a95"
DIGIT_HELDOUT_ACCURACY = 0.965
DIGIT_FEATURE_NET = f"digits-cnn-16px-v1:sha256={DIGIT_WEIGHTS_SHA256}"
# The digits split: a permutation of the 5,000 embedded digits from this seed; the last
# DIGIT_HELDOUT of them are never trained on.
DIGIT_SPLIT_SEED = 20240613
DIGIT_HELDOUT = 1000


# ------------------------------------------------------------------------------------------
# the digit network


class DigitNet(nn.Module):
    """x: [B, 16, 16, 1] in [-1, 1] -> (features [B, 128], logits [B, 10]).
    3x3 convs 32 -> 64 (stride 2) -> 128 (stride 2), ReLU; features: mean over the 4x4 grid."""

    widths: tuple[int, ...] = (32, 64, DIGIT_FEATURE_DIM)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.relu(nn.Conv(w, (3, 3), strides=1 if i == 0 else 2, padding=1, name=f"conv_{i}")(x))
        feats = jnp.mean(x, axis=(1, 2))                                            # [B, 128]
        return feats, nn.Dense(self.num_classes, name="head")(feats)                # [B, 10]


def digit_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of the n embedded digits: a seeded permutation."""
    order = np.random.default_rng(DIGIT_SPLIT_SEED).permutation(n)
    return order[:-DIGIT_HELDOUT], order[-DIGIT_HELDOUT:]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def digit_params() -> dict:
    """The shipped DigitNet parameters (nested tree of float32 arrays)."""
    flat = read_safetensors(DIGIT_WEIGHTS)
    return jax.tree.map(jnp.asarray, _unflatten(flat))


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def flatten_params(params) -> dict[str, np.ndarray]:
    """A parameter tree -> {"conv_0.kernel": array}, the safetensors layout of the shipped file."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {".".join(k.key for k in path): np.ascontiguousarray(np.asarray(v, np.float32))
            for path, v in flat}


@compiler.jit
def _digit_apply(params, x):
    return DigitNet().apply({"params": params}, x)


def digit_features(images, *, batch_size: int = 500) -> np.ndarray:
    """images [N, 16, 16, 1] in [-1, 1] -> float32 [N, 128] features of the shipped digit net."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or tuple(images.shape[1:]) != DIGIT_IMAGE_SHAPE:
        raise ValueError(f"digit_features reads images [N, 16, 16, 1] in [-1, 1] (the digits at "
                         f"image_size=16), got shape {images.shape}")
    params = digit_params()
    return _batched(lambda x: _digit_apply(params, x)[0], images, batch_size)[0]


# ------------------------------------------------------------------------------------------
# Inception


@functools.lru_cache(maxsize=2)
def _inception_params(path: str, mtime: float) -> dict:
    return jax.tree.map(jnp.asarray, load_inception(path))


@compiler.jit
def _inception_apply(params, x):
    return InceptionV3().apply({"params": params}, (x + 1.0) * 0.5)


def inception_outputs(images, weights_path: str, *, batch_size: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """images [N, H, W, C] in [-1, 1], C 1 or 3 -> (pool3 float32 [N, 2048], logits float32
    [N, 1008]) of the FID Inception-v3 read from `weights_path` (safetensors)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"inception_features reads images [N, H, W, 1 or 3] in [-1, 1], got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    params = _inception_params(os.path.abspath(weights_path), os.path.getmtime(weights_path)
                               if os.path.exists(weights_path) else 0.0)
    return _batched(lambda x: _inception_apply(params, x), images, batch_size)


def inception_features(images, weights_path: str, *, batch_size: int = 50) -> np.ndarray:
    """images [N, H, W, C] in [-1, 1] -> float32 [N, 2048] pool3 features (see inception_outputs)."""
    return inception_outputs(images, weights_path, batch_size=batch_size)[0]


def inception_feature_net(weights_path: str) -> str:
    """The identity of the Inception features of a weights file, for reference statistics."""
    return f"inception-v3-fid:sha256={file_sha256(weights_path)}"


# ------------------------------------------------------------------------------------------


def _batched(fn, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, ...]:
    """Run fn over images in batches of batch_size (the last padded with zeros, then cut), so a
    jitted fn compiles once; fn returns an array or a tuple of arrays -> tuple of [N, ...]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    if n == 0:
        raise ValueError("no images to compute features of (got an empty batch)")
    b = min(batch_size, n)
    outs = []
    for start in range(0, n, b):
        chunk = images[start:start + b]                                             # [<=b, H, W, C]
        pad = b - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out = fn(chunk)
        out = out if isinstance(out, tuple) else (out,)
        outs.append(tuple(np.asarray(o, np.float32)[:b - pad] for o in out))
    return tuple(np.concatenate(parts) for parts in zip(*outs))
