"""Streaming feature statistics: the mean and covariance of 50k feature vectors without holding
them, mergeable across batches, devices and processes.

    s = stats.init(2048)                          # empty statistics of 2048-d features
    for batch in batches:                         # features [B, D]: numpy, or a jax.Array
        s = stats.update(s, feats(batch))         #   laid out over a mesh's batch axis
    s = stats.update(s, padded, count=n)          # only the first n rows of a padded batch count
    s = stats.merge(s_process0, s_process1)       # order-independent (up to float64 rounding)
    s = stats.merge_processes(s)                  # every process: the statistics of all processes'
    s.n, s.mean, s.cov                            # int, [D], [D, D] (float64, ddof=1 like np.cov)

`FeatureStats` holds the count `n`, the mean `[D]` and the centred scatter
`m2 = sum_i (x_i - mean)(x_i - mean)^T` `[D, D]`, all float64 numpy arrays on the host. Two sets
merge with Chan, Golub and LeVeque's pairwise update (1979):

    n = na + nb,   delta = mean_b - mean_a,
    mean = mean_a + delta * nb / n,
    m2 = m2_a + m2_b + delta delta^T * na * nb / n

which never forms the raw sum of outer products (whose difference from n mean mean^T cancels
catastrophically when the mean is large against the spread, as for post-ReLU features).

Where a batch's own moments are computed:
- numpy features: on the host, in float64.
- a `jax.Array` (e.g. features computed under `jit` on a mesh, batch split over `data`): on the
  devices, in float32 with the batch centred at its own mean before the `[D, B] x [B, D]`
  product (HIGHEST matmul precision), so XLA sums the shards' partial products across devices
  and only `n`, a `[D]` mean and a `[D, D]` scatter come back to the host, where they are merged
  in float64. A sharded batch and the same batch on one device give the same statistics (to
  float32 summation order), and in a multi-process run every process receives the same
  replicated result: no gather of the features is needed.

A multi-process run that streams host (numpy) features instead, each process its own images,
calls `merge_processes` once at the end: it all-gathers each process's (n, mean, m2) (in float64)
and merges them in process order, so every process ends with the same statistics.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler


class FeatureStats(NamedTuple):
    """n: how many feature vectors; mean: float64 [D]; m2: centred scatter float64 [D, D]."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def cov(self) -> np.ndarray:
        """The unbiased covariance [D, D] (divides by n - 1, as `np.cov` and the FID papers)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, these statistics hold {self.n}")
        return self.m2 / (self.n - 1)


def init(dim: int) -> FeatureStats:
    """Empty statistics of `dim`-dimensional features."""
    if int(dim) < 1:
        raise ValueError(f"feature dimension must be a positive integer, got {dim}")
    return FeatureStats(0, np.zeros([dim], np.float64), np.zeros([dim, dim], np.float64))


def merge(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """The statistics of the union of two disjoint sets (Chan et al.'s pairwise update)."""
    if a.dim != b.dim:
        raise ValueError(f"cannot merge statistics of {a.dim}-d and {b.dim}-d features")
    if b.n == 0:
        return a
    if a.n == 0:
        return b
    n = a.n + b.n
    delta = b.mean - a.mean                                                      # [D]
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + np.outer(delta, delta) * (a.n * b.n / n)                  # [D, D]
    return FeatureStats(n, mean, m2)


def merge_processes(s: FeatureStats) -> FeatureStats:
    """The merge of every process's `s` (a collective: every process must call it); `s` itself
    in a single-process run."""
    if jax.process_count() == 1:
        return s
    from jax.experimental import multihost_utils

    with jax.enable_x64(True):                     # keep float64 / int64 through the transfer
        n, mean, m2 = (np.asarray(multihost_utils.process_allgather(np.asarray(v)))
                       for v in (np.array(s.n, np.int64), s.mean, s.m2))     # [P], [P, D], [P, D, D]
    return functools.reduce(merge, (FeatureStats(int(n[i]), mean[i], m2[i]) for i in range(len(n))),
                            init(s.dim))


@compiler.jit
def _device_moments(x: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, D] (any layout), count: rows that count -> (mean [D], centred scatter [D, D]),
    float32, replicated."""
    x = x.astype(jnp.float32)
    keep = (jnp.arange(x.shape[0]) < count)[:, None]                             # [B, 1]
    mean = jnp.sum(jnp.where(keep, x, 0.0), axis=0) / jnp.maximum(count, 1)      # [D]
    centred = jnp.where(keep, x - mean, 0.0)                                     # [B, D]
    m2 = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)     # [D, D]
    return mean, m2


def batch_stats(features, count: int | None = None) -> FeatureStats:
    """The statistics of one batch `features` [B, D] (only its first `count` rows when given:
    the rows a batch was padded with to fit a mesh are left out). Host float64 for numpy input,
    device float32 (centred) for a `jax.Array`; see the module docstring."""
    shape = tuple(features.shape)
    if len(shape) != 2:
        raise ValueError(f"features must be a [batch, dim] array, got shape {shape}")
    count = shape[0] if count is None else int(count)
    if not 0 <= count <= shape[0]:
        raise ValueError(f"count must be between 0 and the batch size {shape[0]}, got {count}")
    if count == 0:
        return init(shape[1])
    if isinstance(features, jax.Array):
        mean, m2 = _device_moments(features, jnp.int32(count))
        return FeatureStats(count, np.asarray(mean, np.float64), np.asarray(m2, np.float64))
    x = np.asarray(features, np.float64)[:count]                                 # [n, D]
    mean = x.mean(axis=0)
    centred = x - mean
    return FeatureStats(count, mean, centred.T @ centred)


def update(s: FeatureStats, features, count: int | None = None) -> FeatureStats:
    """`s` with the batch `features` [B, D] (its first `count` rows) added."""
    if features.ndim == 2 and features.shape[1] != s.dim:
        raise ValueError(f"these statistics are of {s.dim}-d features, the batch has {features.shape[1]}-d ones")
    return merge(s, batch_stats(features, count))


def from_features(features, batch_size: int | None = None) -> FeatureStats:
    """The statistics of all of `features` [N, D], streamed in batches of `batch_size` rows
    (default: all at once)."""
    if features.ndim != 2:
        raise ValueError(f"features must be a [batch, dim] array, got shape {tuple(features.shape)}")
    step = max(features.shape[0], 1) if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return functools.reduce(lambda s, i: update(s, features[i:i + step]),
                            range(0, features.shape[0], step), init(features.shape[1]))
