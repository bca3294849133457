"""Reference statistics files: the Gaussian (mu, sigma) of a dataset's features, saved once and
compared against at every evaluation.

    from jaxdiff.metrics import distribution, reference, stats

    s = stats.from_features(real_feats)                       # or streamed with stats.update
    reference.save_reference("cifar10_train.npz", s, feature_net="inception-v3-pt")
    ref = reference.load_reference("cifar10_train.npz", feature_net="inception-v3-pt", dim=2048)
    distribution.fid(ref, stats.from_features(fake_feats))

The file is an uncompressed `.npz` (numpy zip) holding plain arrays only, read with
`allow_pickle=False`:

    format       "jaxdiff-feature-stats"
    version      1 (int64)
    mu           float64 [D]
    sigma        float64 [D, D]   unbiased covariance (ddof 1)
    n            int64            how many feature vectors
    feature_net  str              identity of the feature network (a name plus a weights hash),
                                  so statistics of one network are never compared with another's

It is written atomically (`jaxdiff.files.atomic_write`): a reader sees the old file or the whole
new one. Reading refuses, with one CheckpointError line naming the file, anything that is not
such a file: missing, not a zip / truncated, a pickled object, a missing or malformed entry, a
newer version, NaNs, a covariance that is not square and symmetric, another feature network or
another dimension than the caller expects.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

from jaxdiff.errors import CheckpointError
from jaxdiff.files import atomic_write

FORMAT = "jaxdiff-feature-stats"
VERSION = 1
_KEYS = ("format", "version", "mu", "sigma", "n", "feature_net")


class Reference(NamedTuple):
    """mu: float64 [D]; sigma: float64 [D, D]; n: feature vectors behind them; feature_net: the
    network's identity string."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    feature_net: str

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def save_reference(path, stats, *, feature_net: str) -> None:
    """Write `stats` (a `stats.FeatureStats` with n >= 2, or a Reference) to `path` atomically,
    tagged with `feature_net`, a non-empty identity of the feature network."""
    if not isinstance(feature_net, str) or not feature_net.strip():
        raise ValueError(f"feature_net must name the feature network (e.g. 'inception-v3-pt:<sha256>'), "
                         f"got {feature_net!r}")
    if isinstance(stats, Reference):
        mu, sigma, n = stats.mu, stats.sigma, stats.n
    else:
        mu, sigma, n = stats.mean, stats.cov, stats.n
    arrays = {"format": np.array(FORMAT), "version": np.array(VERSION, np.int64),
              "mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
              "n": np.array(n, np.int64), "feature_net": np.array(feature_net)}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:              # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
            f.flush()

    atomic_write(os.fspath(path), write)


def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except OSError as e:
        raise CheckpointError(f"{path} is not readable ({e})") from None
    if not magic.startswith(b"PK"):
        what = ("a pickle, which is never loaded" if magic[:1] == b"\x80" else
                "a single .npy array" if magic == b"\x93NUMPY" else "not a zip archive")
        raise CheckpointError(f"{path} is not a reference statistics .npz file ({what})")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _KEYS if k not in data.files]
            if missing:
                raise CheckpointError(f"{path} is not a jaxdiff reference statistics file: it lacks "
                                      f"{', '.join(missing)} (has {', '.join(data.files) or 'nothing'})")
            return {k: data[k] for k in _KEYS}
    except CheckpointError:
        raise
    except ValueError as e:
        if "pickle" in str(e):
            raise CheckpointError(f"{path} holds pickled objects; reference statistics are plain arrays "
                                  "and are never unpickled") from None
        raise CheckpointError(f"{path} is not a readable .npz file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise CheckpointError(f"{path} is not a readable .npz file (truncated or damaged: {e})") from None
    except (zlib.error, struct.error, KeyError) as e:  # a damaged member
        raise CheckpointError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None


def _text(value: np.ndarray, path: str, key: str) -> str:
    if value.shape != () or value.dtype.kind != "U":
        raise CheckpointError(f"{path}: {key} must be a string, got a {value.dtype} array of shape {value.shape}")
    return str(value)


def _integer(value: np.ndarray, path: str, key: str) -> int:
    if value.shape != () or value.dtype.kind not in "iu":
        raise CheckpointError(f"{path}: {key} must be an integer, got a {value.dtype} array of shape {value.shape}")
    return int(value)


def load_reference(path, *, feature_net: str | None = None, dim: int | None = None) -> Reference:
    """The statistics in `path`, checked (see the module docstring). feature_net / dim: what the
    caller will compare them with; a file made with another network or of another dimension is
    refused."""
    path = os.fspath(path)
    data = _read(path)
    if _text(data["format"], path, "format") != FORMAT:
        raise CheckpointError(f"{path} is a {str(data['format'])!r} file, not {FORMAT!r}")
    version = _integer(data["version"], path, "version")
    if version != VERSION:
        raise CheckpointError(f"{path} is reference statistics version {version}; this jaxdiff reads "
                              f"version {VERSION} (write it again with save_reference)")
    net, n = _text(data["feature_net"], path, "feature_net"), _integer(data["n"], path, "n")
    mu, sigma = data["mu"], data["sigma"]
    if mu.dtype.kind != "f" or sigma.dtype.kind != "f":
        raise CheckpointError(f"{path}: mu and sigma must be float arrays, got {mu.dtype} and {sigma.dtype}")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.shape[0] < 1:
        raise CheckpointError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected [D] and [D, D]")
    if n < 2:
        raise CheckpointError(f"{path}: n is {n}; a covariance needs at least 2 feature vectors")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise CheckpointError(f"{path}: mu or sigma holds NaN or infinite values")
    if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-8 * max(1.0, float(np.abs(sigma).max()))):
        raise CheckpointError(f"{path}: sigma is not symmetric, so it is not a covariance")
    if feature_net is not None and net != feature_net:
        raise CheckpointError(f"{path} holds statistics of feature network {net!r}, not {feature_net!r}; "
                              "compute the reference with the same network as the samples")
    if dim is not None and mu.shape[0] != int(dim):
        raise CheckpointError(f"{path} holds {mu.shape[0]}-d statistics, the features are {dim}-d; "
                              "compute the reference with the same network as the samples")
    return Reference(mu.astype(np.float64), sigma.astype(np.float64), n, net)
