"""Distances between the feature distributions of real and generated images: FID, KID,
precision and recall, Inception Score. Only the maths: the features come from a feature network
(later work) as `[N, D]` arrays, or as streamed statistics (`metrics.stats`).

    from jaxdiff.metrics import distribution, reference, stats

    # FID from two feature sets [N, D], [M, D] (or streamed: stats.update batch by batch)
    a, b = stats.from_features(real_feats), stats.from_features(fake_feats)
    distribution.fid(a, b)                                        # float
    # FID against a reference statistics file (mu, sigma, n, feature network id)
    ref = reference.load_reference("cifar10_train.npz", feature_net="inception-v3-pt")
    distribution.fid(ref, b)
    distribution.frechet_distance(mu1, sigma1, mu2, sigma2)       # from the Gaussians themselves

    distribution.kid(real_feats, fake_feats)                      # (mean, std) over 100 subsets of 1000
    distribution.precision_recall(real_feats, fake_feats, k=3)    # (precision, recall) in [0, 1]
    distribution.inception_score(probs, splits=10)                # (mean, std); probs [N, K]

Notation and sources:

    Frechet distance (Heusel et al. 2017, eq. 6; Dowson and Landau 1982) between N(mu1, S1) and
    N(mu2, S2):   d^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^{1/2} S2 S1^{1/2})^{1/2}.
    tr (S1 S2)^{1/2} of the papers equals the last trace: S1 S2 is similar to the symmetric
    PSD matrix S1^{1/2} S2 S1^{1/2}, so both square roots are taken with `jnp.linalg.eigh`
    (symmetric eigendecomposition, available on CPU, GPU and TPU; no scipy `sqrtm`, no general
    `eig`), tiny negative eigenvalues from rounding clipped to 0, and the result clipped at 0.
    KID (Binkowski et al. 2018, eq. 4 with the kernel of sec. 4): the unbiased estimator
        MMD_u^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                  - 2 sum_{i, j} k(x_i, y_j) / m^2,          k(x, y) = (x . y / d + 1)^3,
    averaged over `num_subsets` random subsets of m = min(subset_size, N, M) rows of each set.
    Precision and recall (Kynkaanniemi et al. 2019, eqs. 1-3): the manifold of a set is the union
    of balls around its points whose radius is the distance to the point's k-th nearest neighbour
    in the set (itself excluded); precision = fraction of generated points inside the real
    manifold, recall = fraction of real points inside the generated one (`<=` on the boundary).
    Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), p(y) the mean of p(y|x)
    over each of `splits` equal parts (N // splits rows each; the remainder is left out, as the
    usual implementations do), reported as the mean and std (ddof 0) over the parts.

Precision: the d x d and N x N work runs with jax in float64 where the backend has it (CPU, GPU:
inside a `jax.enable_x64` scope, whatever the global setting) and in float32 on TPU; pass
`dtype="float32"` to force single precision (faster on GPUs with slow float64). The Frechet
distance's final sum |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr(...) is taken in numpy float64 on the
host. Distance matrices for precision and recall are formed `block` rows at a time
(`block x N`, never `N x N`), and KID's subsets one at a time.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler

_HIGH = jax.lax.Precision.HIGHEST


def _dtype(dtype) -> np.dtype:
    """float64 unless asked otherwise or on TPU (which has no float64)."""
    if dtype is None:
        return np.dtype(np.float32 if jax.default_backend() == "tpu" else np.float64)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _scope(dtype: np.dtype):
    return jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()


def _features(x, name: str) -> tuple[int, int]:
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"{name} must be a [N, D] feature array, got shape {tuple(getattr(x, 'shape', ()))}")
    return tuple(x.shape)


# ---------------------------------------------------------------------------------------------
# Frechet distance (FID)


@compiler.jit
def _trace_sqrt_product(s1: jax.Array, s2: jax.Array) -> jax.Array:
    """tr (S1^{1/2} S2 S1^{1/2})^{1/2} for symmetric PSD S1, S2 [D, D]."""
    lam, u = jnp.linalg.eigh(s1)                                       # S1 = U diag(lam) U^T
    root = (u * jnp.sqrt(jnp.clip(lam, 0.0))) @ u.T                     # S1^{1/2} [D, D]
    inner = jnp.matmul(jnp.matmul(root, s2, precision=_HIGH), root, precision=_HIGH)  # [D, D]
    inner = (inner + inner.T) / 2                                      # symmetric up to rounding
    return jnp.sum(jnp.sqrt(jnp.clip(jnp.linalg.eigvalsh(inner), 0.0)))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, dtype=None) -> float:
    """The squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    mu1, mu2: [D]; sigma1, sigma2: symmetric PSD [D, D] (an FID when these are Inception
    features' statistics). dtype: of the eigendecompositions (default float64, float32 on TPU).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, value, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)),
                               ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
        if value.shape != shape or d < 1:
            raise ValueError(f"{name} has shape {value.shape}; frechet_distance needs means [D] and "
                             f"covariances [D, D] of one D (mu1 gives D = {d})")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} holds NaN or infinite values")
    dtype = _dtype(dtype)
    with _scope(dtype):
        cross = float(_trace_sqrt_product(jnp.asarray(sigma1, dtype), jnp.asarray(sigma2, dtype)))
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross
    return max(float(value), 0.0)


def _gaussian(x, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of FeatureStats (`.mean`, `.cov`) or a Reference (`.mu`, `.sigma`)."""
    if hasattr(x, "mu") and hasattr(x, "sigma"):
        return x.mu, x.sigma
    if hasattr(x, "mean") and hasattr(x, "cov"):
        return x.mean, x.cov
    raise ValueError(f"{name} must be stats.FeatureStats or a reference.Reference, got {type(x).__name__}")


def fid(a, b, *, dtype=None) -> float:
    """FID between two sets given as `stats.FeatureStats` (streamed features) or
    `reference.Reference` (a statistics file); their feature dimensions must agree."""
    (mu1, s1), (mu2, s2) = _gaussian(a, "a"), _gaussian(b, "b")
    if np.shape(mu1) != np.shape(mu2):
        raise ValueError(f"cannot compare statistics of {np.shape(mu1)[0]}-d and {np.shape(mu2)[0]}-d "
                         "features; both must come from the same feature network")
    return frechet_distance(mu1, s1, mu2, s2, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# KID


def _kernel(a: jax.Array, b: jax.Array) -> jax.Array:
    """k(a_i, b_j) = (a_i . b_j / d + 1)^3: a [m, D], b [m, D] -> [m, m]."""
    return (jnp.matmul(a, b.T, precision=_HIGH) / a.shape[1] + 1.0) ** 3


@compiler.jit
def _mmd2_subsets(x: jax.Array, y: jax.Array, ix: jax.Array, iy: jax.Array) -> jax.Array:
    """Unbiased MMD^2 on each subset: x [N, D], y [M, D], ix, iy [S, m] row indices -> [S]."""
    m = ix.shape[1]

    def one(idx):
        xs, ys = x[idx[0]], y[idx[1]]                                       # [m, D] each
        kxx, kyy, kxy = _kernel(xs, xs), _kernel(ys, ys), _kernel(xs, ys)   # [m, m] each
        within = (kxx.sum() - jnp.trace(kxx) + kyy.sum() - jnp.trace(kyy)) / (m * (m - 1))
        return within - 2.0 * kxy.sum() / (m * m)

    return jax.lax.map(one, jnp.stack([ix, iy], axis=1))                   # [S]


def kid(x, y, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        dtype=None) -> tuple[float, float]:
    """Kernel Inception Distance between feature sets x [N, D] and y [M, D]: the mean and std
    (ddof 0) of the unbiased MMD^2 over `num_subsets` subsets of min(subset_size, N, M) rows drawn
    without replacement (numpy generator seeded by `seed`)."""
    (n, d), (n2, d2) = _features(x, "x"), _features(y, "y")
    if d != d2:
        raise ValueError(f"x has {d}-d features and y {d2}-d ones; both must come from one feature network")
    m = min(int(subset_size), n, n2)
    if m < 2 or int(num_subsets) < 1:
        raise ValueError(f"KID needs subsets of at least 2 rows and num_subsets >= 1; got subsets of {m} "
                         f"(subset_size {subset_size}, {n} and {n2} rows) and num_subsets {num_subsets}")
    rng = np.random.default_rng(seed)
    ix = np.stack([rng.choice(n, m, replace=False) for _ in range(num_subsets)])    # [S, m]
    iy = np.stack([rng.choice(n2, m, replace=False) for _ in range(num_subsets)])   # [S, m]
    dtype = _dtype(dtype)
    with _scope(dtype):
        values = np.asarray(_mmd2_subsets(jnp.asarray(x, dtype), jnp.asarray(y, dtype),
                                          jnp.asarray(ix), jnp.asarray(iy)), np.float64)
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------
# Precision and recall


def _row_blocks(x: jax.Array, block: int) -> jax.Array:
    """x [N, D] -> [ceil(N / block), block, D], zero rows appended (their results are dropped)."""
    pad = -x.shape[0] % block
    return jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1])


def _sq_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """|a_i - b_j|^2: a [b, D], b [N, D] -> [b, N], clipped at 0."""
    d2 = (jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :]
          - 2.0 * jnp.matmul(a, b.T, precision=_HIGH))
    return jnp.maximum(d2, 0.0)


@functools.partial(compiler.jit, static_argnames=("k", "block"))
def _kth_neighbour_sq(points: jax.Array, k: int, block: int) -> jax.Array:
    """Squared distance of each of points [N, D] to its k-th nearest other point -> [N]."""
    def one(rows):                                                          # [block, D]
        d2 = _sq_distances(rows, points)                                    # [block, N]
        return -jax.lax.top_k(-d2, k + 1)[0][:, k]                          # 0th is the point itself
    return jax.lax.map(one, _row_blocks(points, block)).reshape(-1)[:points.shape[0]]


@functools.partial(compiler.jit, static_argnames=("block",))
def _inside(queries: jax.Array, points: jax.Array, radii_sq: jax.Array, block: int) -> jax.Array:
    """Whether each of queries [Q, D] lies in some ball (points [N, D], radii_sq [N]) -> bool [Q]."""
    def one(rows):
        return jnp.any(_sq_distances(rows, points) <= radii_sq[None, :], axis=1)   # [block]
    return jax.lax.map(one, _row_blocks(queries, block)).reshape(-1)[:queries.shape[0]]


def precision_recall(real, fake, *, k: int = 3, block: int = 1024, dtype=None) -> tuple[float, float]:
    """Improved precision and recall of `fake` [M, D] against `real` [N, D] with k-nearest-
    neighbour balls (Kynkaanniemi et al. 2019; k = 3 as in the paper). Distances are computed
    `block` query rows at a time (memory block x max(N, M))."""
    (n, d), (n2, d2) = _features(real, "real"), _features(fake, "fake")
    if d != d2:
        raise ValueError(f"real has {d}-d features and fake {d2}-d ones; both must come from one feature network")
    if not 1 <= int(k) < min(n, n2):
        raise ValueError(f"k must be at least 1 and below both set sizes ({n}, {n2}), got {k}")
    if int(block) < 1:
        raise ValueError(f"block must be a positive number of rows, got {block}")
    dtype = _dtype(dtype)
    with _scope(dtype):
        real, fake = jnp.asarray(real, dtype), jnp.asarray(fake, dtype)
        precision = _inside(fake, real, _kth_neighbour_sq(real, int(k), int(block)), int(block))
        recall = _inside(real, fake, _kth_neighbour_sq(fake, int(k), int(block)), int(block))
    return float(np.mean(np.asarray(precision))), float(np.mean(np.asarray(recall)))


# ---------------------------------------------------------------------------------------------
# Inception Score


def inception_score(probs, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class probabilities probs [N, K] (rows summing to 1): the mean and std
    (ddof 0) over `splits` parts of exp(mean_x KL(p(y|x) || p(y))). Host numpy float64."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"probs must be [N, K] class probabilities, got shape {p.shape}")
    if int(splits) < 1 or p.shape[0] < int(splits):
        raise ValueError(f"splits must be between 1 and the number of rows {p.shape[0]}, got {splits}")
    if not (np.all(p >= 0) and np.allclose(p.sum(1), 1.0, atol=1e-3)):
        raise ValueError("probs must be non-negative with rows summing to 1 (softmax outputs, not logits)")
    size = p.shape[0] // int(splits)
    parts = p[:size * int(splits)].reshape(int(splits), size, p.shape[1])    # [S, N/S, K]
    marginal = parts.mean(axis=1, keepdims=True)                            # [S, 1, K]
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(parts > 0, parts * (np.log(parts) - np.log(marginal)), 0.0).sum(-1)  # [S, N/S]
    scores = np.exp(kl.mean(axis=1))                                        # [S]
    return float(scores.mean()), float(scores.std())
