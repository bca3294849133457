"""eps <-> x0 <-> v conversions: round trips for every prediction type and broadcasting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parameterization as P

TYPES = P.PREDICTION_TYPES


def _data(shape=(3, 4, 4, 2)):
    k0, k1 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(k0, shape)
    eps = jax.random.normal(k1, shape)
    ab = jnp.asarray([0.9, 0.4, 0.02], jnp.float32)                  # [B], one level per example
    return x0, eps, ab


@pytest.mark.parametrize("ptype", TYPES)
def test_round_trip(ptype):
    x0, eps, ab = _data()
    x_t = P.diffuse(x0, eps, ab)
    pred = P.target(ptype, x0, eps, ab)
    np.testing.assert_allclose(P.to_x0(pred, x_t, ab, ptype), x0, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(P.to_eps(pred, x_t, ab, ptype), eps, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(P.to_v(pred, x_t, ab, ptype), P.v_target(x0, eps, ab), rtol=1e-4, atol=2e-5)
    a = np.sqrt(np.asarray(ab))[:, None, None, None]
    np.testing.assert_allclose(P.to_score(pred, x_t, ab, ptype), -np.asarray(eps) / np.sqrt(1 - a ** 2),
                               rtol=1e-4, atol=1e-4)
    for other in TYPES:
        np.testing.assert_allclose(P.convert(pred, x_t, ab, ptype, other), P.target(other, x0, eps, ab),
                                   rtol=1e-4, atol=2e-5)


def test_targets_by_hand():
    x0, eps, ab = _data()
    a = np.sqrt(np.asarray(ab))[:, None, None, None]
    s = np.sqrt(1 - np.asarray(ab))[:, None, None, None]
    np.testing.assert_allclose(P.target("epsilon", x0, eps, ab), eps)
    np.testing.assert_allclose(P.target("sample", x0, eps, ab), x0)
    np.testing.assert_allclose(P.target("v_prediction", x0, eps, ab), a * eps - s * x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(P.diffuse(x0, eps, ab), a * x0 + s * eps, rtol=1e-6, atol=1e-6)


def test_alpha_bar_broadcasting():
    x0, eps, ab = _data()
    # [B], [B, 1, 1, 1] and a scalar give the same results as explicit broadcasting.
    full = P.target("v_prediction", x0, eps, ab)
    np.testing.assert_allclose(P.target("v_prediction", x0, eps, ab[:, None, None, None]), full)
    one = P.target("v_prediction", x0, eps, 0.4)
    np.testing.assert_allclose(one[1], full[1], rtol=1e-6)
    assert not np.allclose(one[0], full[0])


def test_v_identity():
    # |v|^2 + |x_t|^2 = |eps|^2 + |x0|^2 (v and x_t are a rotation of (eps, x0)).
    x0, eps, ab = _data()
    v, x_t = P.v_target(x0, eps, ab), P.diffuse(x0, eps, ab)
    np.testing.assert_allclose(v ** 2 + x_t ** 2, eps ** 2 + x0 ** 2, rtol=1e-4, atol=1e-5)


def test_bf16_prediction_promotes_to_float32():
    x0, eps, ab = _data()
    x_t = P.diffuse(x0, eps, ab)
    out = P.to_x0(eps.astype(jnp.bfloat16), x_t, ab, "epsilon")
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out[:2], x0[:2], rtol=3e-2, atol=3e-2)


def test_unknown_prediction_type():
    x0, eps, ab = _data()
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction"):
        P.target("score", x0, eps, ab)
    with pytest.raises(ValueError, match="valid"):
        P.to_x0(x0, x0, ab, "eps")


def test_flow_conversions_recover_x0_and_eps():
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(4, 3, 5)).astype(np.float32)
    eps = rng.normal(size=(4, 3, 5)).astype(np.float32)
    sigma = np.array([0.0, 0.25, 0.7, 1.0], np.float32)
    x_s = P.flow_interpolate(x0, eps, sigma)
    np.testing.assert_allclose(x_s[1], 0.75 * x0[1] + 0.25 * eps[1], rtol=1e-6)
    np.testing.assert_allclose(x_s[0], x0[0], rtol=1e-6)
    np.testing.assert_allclose(x_s[3], eps[3], rtol=1e-6)
    v = P.flow_velocity(x0, eps)
    x0_hat, eps_hat = P.flow_x0_eps(v, x_s, sigma)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-5)
    # The straight path is the VP path rescaled: x_s / (1 - sigma) = x_t / sqrt(abar).
    abar = np.asarray(P.flow_to_alpha_bar(sigma[1:3]))
    x_t = P.diffuse(x0[1:3], eps[1:3], abar)
    np.testing.assert_allclose(np.asarray(x_s[1:3]) / (1 - sigma[1:3, None, None]),
                               np.asarray(x_t) / np.sqrt(abar)[:, None, None], rtol=1e-5)
