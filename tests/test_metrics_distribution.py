"""FID / KID / precision-recall / IS maths, streaming and sharded statistics, reference files.

Truth comes from closed forms (Gaussians with known covariances, hand-made point sets and
probabilities), from scipy's general `sqrtm` at float64, and from direct O(n^2) sums."""

import json
import zipfile

import numpy as np
import pytest
import scipy.linalg
from conftest import _WritesMarker, make_hostile_pickle, run_python

from jaxdiff.errors import CheckpointError
from jaxdiff.metrics import distribution, reference, stats


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def _random_cov(d, seed, scale=1.0):
    a = np.random.default_rng(seed).normal(size=(d, 2 * d)) * scale
    return a @ a.T / (2 * d)


# ---------------------------------------------------------------------------------------------
# Frechet distance


def _commuting_closed_form(mu1, a, mu2, b):
    """FD between N(mu1, Q diag(a) Q^T) and N(mu2, Q diag(b) Q^T): |dmu|^2 + sum (sqrt a - sqrt b)^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def test_frechet_distance_diagonal_and_commuting_closed_forms():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 0.5
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    want = _commuting_closed_form(mu1, a, mu2, b)
    got = distribution.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert abs(got - want) <= 1e-10 * want, (got, want)
    q = _rotation(d, 1)                                                 # shared eigenvectors
    got = distribution.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert abs(got - want) <= 1e-9 * want, (got, want)
    # rank-deficient covariances (fewer samples than dimensions): eigenvalues that are 0 in exact
    # arithmetic come out slightly negative and must be clipped, not turned into NaN
    a[:5], b[3:7] = 0.0, 0.0
    want = _commuting_closed_form(mu1, a, mu2, b)
    got = distribution.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert np.isfinite(got) and abs(got - want) <= 1e-7 * want, (got, want)


def test_frechet_distance_non_commuting_against_scipy_sqrtm():
    rng = np.random.default_rng(2)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(d, 3), _random_cov(d, 4, scale=2.0)
    assert not np.allclose(s1 @ s2, s2 @ s1)                            # the hard case
    want = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    got = distribution.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - want) <= 1e-10 * want, (got, want)
    assert distribution.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-12)   # symmetric
    got32 = distribution.frechet_distance(mu1, s1, mu2, s2, dtype="float32")
    assert abs(got32 - want) <= 1e-5 * want, (got32, want)
    # the cross term matters: dropping it (or using tr S1 S2) gives a different number
    assert abs(want - float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2))) > 0.1 * want


def test_frechet_distance_of_a_set_with_itself_is_zero_and_fid_takes_stats_and_references():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 3.0
    s = stats.from_features(x)
    assert distribution.fid(s, s) <= 1e-9 * np.trace(s.cov)
    y = x[:, ::-1].copy()
    sy = stats.from_features(y)
    ref = reference.Reference(sy.mean, sy.cov, sy.n, "net")
    want = float(np.sum((s.mean - sy.mean) ** 2) + np.trace(s.cov) + np.trace(sy.cov)
                 - 2 * np.trace(scipy.linalg.sqrtm(s.cov @ sy.cov)).real)
    assert distribution.fid(s, ref) == pytest.approx(want, rel=1e-9)
    assert distribution.fid(ref, s) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="8-d") as err:
        distribution.fid(s, stats.from_features(x[:, :8]))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"sigma2 has shape \(9, 9\)"):
        distribution.frechet_distance(s.mean, s.cov, s.mean, s.cov[:9, :9])


# ---------------------------------------------------------------------------------------------
# KID


def _mmd2_direct(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b/d + 1)^3, by explicit loops over pairs (float64)."""
    m, d = x.shape
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m ** 2


def test_kid_against_direct_sum_over_pairs():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) * 1.3 + 0.4
    # whole sets (subset_size >= size: each subset is a permutation, MMD^2 does not depend on order)
    mean, std = distribution.kid(x[:30], y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(_mmd2_direct(x[:30], y), rel=1e-10) and std < 1e-10
    # subsets: the documented draw (numpy generator, x's subsets first, without replacement)
    gen = np.random.default_rng(11)
    ix = [gen.choice(40, 12, replace=False) for _ in range(4)]
    iy = [gen.choice(30, 12, replace=False) for _ in range(4)]
    want = np.array([_mmd2_direct(x[i], y[j]) for i, j in zip(ix, iy)])
    mean, std = distribution.kid(x, y, num_subsets=4, subset_size=12, seed=11)
    assert mean == pytest.approx(want.mean(), rel=1e-10) and std == pytest.approx(want.std(), rel=1e-9)
    mean32, _ = distribution.kid(x, y, num_subsets=4, subset_size=12, seed=11, dtype="float32")
    assert mean32 == pytest.approx(want.mean(), rel=1e-4)
    with pytest.raises(ValueError, match="5-d"):
        distribution.kid(x, y[:, :5])


def test_kid_is_unbiased_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(7)
    same = np.array([distribution.kid(rng.normal(size=(10, 4)), rng.normal(size=(10, 4)), num_subsets=1)[0]
                     for _ in range(200)])
    se = same.std() / np.sqrt(len(same))
    assert abs(same.mean()) < 4 * se, (same.mean(), se)    # a biased (V-statistic) MMD^2 is ~30 se above 0
    shifted = distribution.kid(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 1.0,
                               num_subsets=20, subset_size=50)
    assert shifted[0] > 10 * shifted[1] / np.sqrt(20) > 0


# ---------------------------------------------------------------------------------------------
# Precision and recall


def _pr_direct(real, fake, k):
    """Full distance matrices in numpy float64 (k-th neighbour excluding the point itself)."""
    def radii(p):
        d = np.linalg.norm(p[:, None] - p[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def inside(q, p, r):
        return np.mean(np.any(np.linalg.norm(q[:, None] - p[None], axis=-1) <= r[None], axis=1))

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_on_hand_made_sets():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(20, 5)), rng.normal(size=(30, 5)) + 100.0          # far-apart clusters
    assert distribution.precision_recall(a, b) == (0.0, 0.0)
    assert distribution.precision_recall(a, a) == (1.0, 1.0)
    real = np.concatenate([a, b])
    assert distribution.precision_recall(real, a) == (1.0, 20 / 50)           # fake = part of real
    assert distribution.precision_recall(a, real) == (20 / 50, 1.0)
    # points on a line: real at 0..9; the k-th neighbour radius decides, with `<=` on the boundary
    line = lambda v: np.stack([np.asarray(v, float), np.zeros(len(v))], 1)
    real, fake = line(range(10)), line([12.0, 12.5, 13.0, 100.0])
    assert distribution.precision_recall(real, fake, k=1) == (0.0, 0.0)       # radii 1 / 0.5 (87 at 100)
    assert distribution.precision_recall(real, fake, k=3) == (0.25, 1.0)      # 9's radius 3 reaches 12


def test_precision_recall_in_blocks_matches_full_matrices():
    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=(53, 7)), rng.normal(size=(41, 7)) * 0.7 + 0.6
    for k in (1, 3):
        want = _pr_direct(real, fake, k)
        assert 0 < want[0] < 1 and 0 < want[1] < 1
        assert distribution.precision_recall(real, fake, k=k, block=8) == pytest.approx(want, abs=1e-12)
    assert distribution.precision_recall(real, fake, block=1000) == distribution.precision_recall(real, fake, block=5)
    with pytest.raises(ValueError, match="k must be"):
        distribution.precision_recall(real, fake[:3], k=3)


# ---------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_on_hand_made_probabilities():
    assert distribution.inception_score(np.full((100, 7), 1 / 7)) == pytest.approx((1.0, 0.0), abs=1e-12)
    onehot = np.eye(5)[np.tile(np.arange(5), 20)]                       # 100 rows, each split has every class twice
    assert distribution.inception_score(onehot) == pytest.approx((5.0, 0.0), abs=1e-12)
    p = np.array([[1.0, 0.0], [0.5, 0.5]] * 2)                          # two splits of the same two rows
    py = np.array([0.75, 0.25])
    want = np.exp(0.5 * (np.log(1 / 0.75) + 0.5 * np.log(0.5 / py[0]) + 0.5 * np.log(0.5 / py[1])))
    assert distribution.inception_score(p, splits=2) == pytest.approx((want, 0.0), abs=1e-12)
    mean, std = distribution.inception_score(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), splits=2)
    assert (mean, std) == pytest.approx((1.5, 0.5), abs=1e-12)          # splits score 2 and 1
    with pytest.raises(ValueError, match="logits"):
        distribution.inception_score(np.log(np.full((10, 3), 1 / 3)))


# ---------------------------------------------------------------------------------------------
# Streaming statistics


def test_streaming_statistics_equal_batch_statistics_and_merge_in_any_order():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(257, 9)) @ rng.normal(size=(9, 9)) + 1e4        # large mean, unit spread
    s = stats.init(9)
    cuts = np.sort(rng.choice(np.arange(1, 257), 12, replace=False))
    for part in np.split(x, cuts):
        s = stats.update(s, part)
    assert s.n == 257
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    pieces = [stats.from_features(p) for p in np.split(x, [40, 41, 200])]
    m1 = stats.merge(stats.merge(pieces[0], pieces[1]), stats.merge(pieces[2], pieces[3]))
    m2 = stats.merge(pieces[3], stats.merge(pieces[1], stats.merge(pieces[2], pieces[0])))
    for m in (m1, m2):
        assert m.n == 257
        np.testing.assert_allclose(m.mean, s.mean, rtol=1e-14)
        np.testing.assert_allclose(m.m2, s.m2, rtol=1e-10, atol=1e-8)
    padded = np.concatenate([x[:10], np.full((6, 9), 7e5)])             # padding rows left out
    np.testing.assert_allclose(stats.batch_stats(padded, count=10).m2, stats.batch_stats(x[:10]).m2, rtol=1e-12)
    # a jax.Array batch: centred float32 moments on the device, merged in float64 on the host
    import jax.numpy as jnp
    dev = stats.update(stats.update(stats.init(9), jnp.asarray(x[:100] - 1e4, jnp.float32)),
                       jnp.asarray(np.concatenate([x[100:] - 1e4, np.zeros((3, 9))]), jnp.float32), count=157)
    np.testing.assert_allclose(dev.mean, s.mean - 1e4, atol=1e-5)
    np.testing.assert_allclose(dev.cov, s.cov, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="9-d features, the batch has 8-d"):
        stats.update(s, x[:, :8])


_SHARDED = """
import json, jax, jax.numpy as jnp, numpy as np
from jaxdiff import sharding
from jaxdiff.metrics import stats
assert len(jax.devices()) == 8
mesh = sharding.make_mesh(data=8)
rng = np.random.default_rng(0)
x = (rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6)) + 5.0).astype(np.float32)
host = stats.from_features(x.astype(np.float64))
one = stats.from_features(jnp.asarray(x), batch_size=30)
s = stats.init(6)
for i in (0, 30):                                    # two batches of 30 rows, padded to 32 on the mesh
    batch = sharding.put_batch(x[i:i + 30], mesh, 32)
    feats = jax.jit(lambda b: b * 1.0)(batch)         # features as a jitted network leaves them
    assert len(feats.sharding.device_set) == 8 and not feats.sharding.is_fully_replicated
    s = stats.update(s, feats, count=30)
out = {"n": s.n, "err_host": float(np.abs(s.cov - host.cov).max() / np.abs(host.cov).max()),
       "err_mean": float(np.abs(s.mean - host.mean).max()),
       "err_one": float(np.abs(s.cov - one.cov).max() / np.abs(one.cov).max())}
print("RESULT", json.dumps(out))
"""


def test_sharded_statistics_equal_unsharded():
    proc = run_python(_SHARDED, devices=8, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["n"] == 60
    assert out["err_host"] < 1e-6 and out["err_mean"] < 1e-5 and out["err_one"] < 1e-6, out


# ---------------------------------------------------------------------------------------------
# Reference statistics files


def _saved(tmp_path, name="ref.npz", net="inception-v3:abc123", d=4):
    x = np.random.default_rng(12).normal(size=(50, d))
    path = tmp_path / name
    reference.save_reference(path, stats.from_features(x), feature_net=net)
    return path, stats.from_features(x)


def test_reference_file_round_trip(tmp_path):
    path, s = _saved(tmp_path)
    ref = reference.load_reference(path, feature_net="inception-v3:abc123", dim=4)
    assert ref.n == 50 and ref.feature_net == "inception-v3:abc123"
    np.testing.assert_array_equal(ref.mu, s.mean)
    np.testing.assert_array_equal(ref.sigma, s.cov)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]          # no temporary left behind
    assert distribution.fid(ref, s) <= 1e-12
    reference.save_reference(path, ref, feature_net="other")           # overwrite in place
    assert reference.load_reference(path).feature_net == "other"


def _refused(path, match, **kw):
    with pytest.raises(CheckpointError, match=match) as err:
        reference.load_reference(path, **kw)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_reference_file_refusals(tmp_path):
    path, s = _saved(tmp_path)
    _refused(path, "feature network 'inception-v3:abc123', not 'clip'", feature_net="clip")
    _refused(path, "4-d statistics, the features are 2048-d", dim=2048)
    _refused(tmp_path / "missing.npz", "not found")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 40):
        (tmp_path / "cut.npz").write_bytes(data[:cut])
        _refused(tmp_path / "cut.npz", "not a readable .npz")
    (tmp_path / "text.npz").write_text("mu,sigma\n1,2\n")
    _refused(tmp_path / "text.npz", "not a zip archive")
    np.save(tmp_path / "one.npy", np.zeros(3))
    _refused(tmp_path / "one.npy", "single .npy array")

    def rewrite(name, **changes):
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        arrays.update(changes)
        arrays = {k: v for k, v in arrays.items() if v is not None}
        with open(tmp_path / name, "wb") as f:
            np.savez(f, **arrays)
        return tmp_path / name

    _refused(rewrite("nosigma.npz", sigma=None), "lacks sigma")
    _refused(rewrite("v2.npz", version=np.array(2)), "version 2")
    _refused(rewrite("fmt.npz", format=np.array("something-else")), "not 'jaxdiff-feature-stats'")
    _refused(rewrite("dims.npz", sigma=np.eye(3)), r"expected \[D\] and \[D, D\]")
    _refused(rewrite("asym.npz", sigma=s.cov + np.triu(np.ones((4, 4)), 1)), "not symmetric")
    _refused(rewrite("nan.npz", mu=np.array([0.0, np.nan, 0.0, 0.0])), "NaN")
    _refused(rewrite("n.npz", n=np.array(1)), "n is 1")


def test_reference_file_never_unpickles(tmp_path):
    marker = tmp_path / "ran"
    path, _ = _saved(tmp_path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["feature_net"] = np.array([_WritesMarker(marker)], dtype=object)
    with open(tmp_path / "obj.npz", "wb") as f:
        np.savez(f, **arrays)
    _refused(tmp_path / "obj.npz", "never unpickled")
    _refused(make_hostile_pickle(tmp_path / "p.npz", marker, fmt="pickle"), "a pickle, which is never loaded")
    _refused(make_hostile_pickle(tmp_path / "t.npz", marker, fmt="torch"), "lacks")
    assert zipfile.is_zipfile(tmp_path / "t.npz") and not marker.exists()


_PROCESS = """
import json, sys, jax, jax.numpy as jnp, numpy as np
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
from jaxdiff import sharding
from jaxdiff.metrics import stats
assert jax.process_count() == 2 and len(jax.devices()) == 4
i = jax.process_index()
x = np.random.default_rng(0).normal(size=(80, 5)) * np.arange(1, 6) + 100.0   # the same on both
mine = x[i * 40:(i + 1) * 40]                                                 # this process's images
host = stats.merge_processes(stats.from_features(mine, batch_size=16))       # host float64, merged
mesh = sharding.make_mesh()
dev = stats.init(5)
for j in range(0, 40, 20):                    # a global batch of 40: 20 rows from each process
    dev = stats.update(dev, sharding.shard_batch({{"f": mine[j:j + 20].astype(np.float32)}}, mesh)["f"])
full = stats.from_features(x)
print("RESULT", json.dumps({{"n": [host.n, dev.n],
      "host": float(np.abs(host.cov - full.cov).max() / np.abs(full.cov).max()),
      "host_mean": float(np.abs(host.mean - full.mean).max()),
      "dev": float(np.abs(dev.cov - full.cov).max() / np.abs(full.cov).max()),
      "single": float(np.abs(stats.from_features(mine).cov - full.cov).max() / np.abs(full.cov).max())}}))
"""


def test_two_processes_merge_to_the_statistics_of_all_features():
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS.format(port=port), str(i)], env=env, cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        r = json.loads(out.split("RESULT", 1)[1])
        assert r["n"] == [80, 80]
        assert r["host"] < 1e-12 and r["host_mean"] < 1e-12, r        # float64 merge of the two halves
        assert r["dev"] < 1e-5, r                                       # float32 device moments
        assert r["single"] > 1e-2, r                                    # one half alone is not the answer
