"""Likelihood bounds (bits/dim) against the closed-form NLL of Gaussian data under the exact denoiser:
the DDPM and discrete VDM bounds fall toward it as the number of steps grows, and the
continuous-time VDM bound sits on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from jaxdiff import analytic, schedules
from jaxdiff.metrics import likelihood as lk

D, B = 4, 2048
SCHEDULE = schedules.discrete("linear")
KEY = jax.random.PRNGKey(1)


def _data(quantized=False):
    rng = np.random.default_rng(0)
    mu = rng.uniform(-0.3, 0.3, D).astype(np.float32)
    sd = rng.uniform(0.2, 0.5, D).astype(np.float32)
    x = (mu + sd * rng.normal(size=(B, D))).astype(np.float32)
    if quantized:                                          # the 256 levels of 8-bit data on [-1, 1]
        x = np.round((np.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1
        h = 1 / 255
        mass = norm.cdf((x + h - mu) / sd) - norm.cdf((x - h - mu) / sd)
        nll = -np.log(mass)
    else:
        nll = 0.5 * np.log(2 * np.pi * sd ** 2) + 0.5 * ((x - mu) / sd) ** 2
    return mu, sd, x.astype(np.float32), float(nll.sum(1).mean() / (D * np.log(2)))


def _exact(mu, sd):
    """The exact eps-prediction at fractional timesteps (the VDM bound's noise levels)."""
    mu, sd = jnp.asarray(mu), jnp.asarray(sd)

    def model_fn(x, t):
        return analytic.exact_prediction(mu, sd, lk.alpha_bar_at(SCHEDULE, t)[:, None], x)
    return model_fn


@pytest.fixture(scope="module")
def gaussian():
    mu, sd, x, nll = _data()
    return _exact(mu, sd), x, nll


def _gap(bound, nll):
    return float(np.mean(bound.total)) - nll


def test_ddpm_bound_approaches_the_nll_as_steps_grow(gaussian):
    model, x, nll = gaussian
    large = [_gap(lk.ddpm_bound(model, SCHEDULE, x, KEY, num_steps=k, variance="large", decoder="gaussian"), nll)
             for k in (10, 100, 1000)]
    small = [_gap(lk.ddpm_bound(model, SCHEDULE, x, KEY, num_steps=k, variance="small", decoder="gaussian"), nll)
             for k in (10, 100, 1000)]
    assert large[0] > large[1] > large[2] > -0.02, large
    assert large[2] < 0.1 and large[0] > 0.1, large
    # The fixed variance matters: beta~ is far too small near t = 0 and converges from far above.
    assert small[0] > 100 and small[0] > small[1] > small[2] > large[2], small
    # Terms: the prior is negligible at t = T - 1; everything is per dimension in bits.
    b = lk.ddpm_bound(model, SCHEDULE, x, KEY, num_steps=10, variance="large", decoder="gaussian")
    np.testing.assert_allclose(b.total, b.prior + b.diffusion + b.decoder, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(b.prior)) < 1e-3


def test_vdm_bounds_discrete_fall_to_the_continuous_one_which_is_the_nll(gaussian):
    model, x, nll = gaussian
    discrete = [_gap(lk.vdm_bound(model, SCHEDULE, x, KEY, num_steps=k, decoder="gaussian"), nll)
                for k in (10, 100, 1000)]
    assert discrete[0] > discrete[1] > discrete[2] > 0, discrete
    cont = lk.vdm_bound(model, SCHEDULE, x, KEY, num_samples=256, decoder="gaussian")
    gap = _gap(cont, nll)
    err = float(np.std(np.asarray(cont.total) - nll) / np.sqrt(B))
    assert abs(gap) < 0.05 and abs(gap) < 4 * err + 0.01, (gap, err)
    assert gap < discrete[2]
    # The VDM discrete bound is the DDPM bound with the posterior ("small") variance: on 1000
    # VDM steps (u = i / 1000, t = 0.999 i) it is near the 1000-timestep DDPM "small" bound.
    ddpm = _gap(lk.ddpm_bound(model, SCHEDULE, x, KEY, variance="small", decoder="gaussian"), nll)
    assert abs(ddpm - discrete[2]) < 0.15 * ddpm, (ddpm, discrete[2])


def test_a_worse_denoiser_has_a_larger_bound(gaussian):
    model, x, nll = gaussian
    mu, sd, _, _ = _data()
    worse = _exact(mu + 0.2, sd)
    good = lk.vdm_bound(model, SCHEDULE, x, KEY, num_samples=64, decoder="gaussian")
    bad = lk.vdm_bound(worse, SCHEDULE, x, KEY, num_samples=64, decoder="gaussian")
    assert _gap(bad, nll) > _gap(good, nll) + 0.1


def test_discretized_decoder_bounds_the_8bit_nll():
    mu, sd, x, nll = _data(quantized=True)
    model = _exact(mu, sd)
    b = lk.ddpm_bound(model, SCHEDULE, x, KEY, num_steps=100, variance="large")           # discretized
    gap = _gap(b, nll)
    assert -0.02 < gap < 0.15, gap
    # Against the continuous density the 8-bit figure is shifted by log2(127.5) per dimension.
    cont = lk.ddpm_bound(model, SCHEDULE, x, KEY, num_steps=100, variance="large", decoder="gaussian")
    assert float(np.mean(b.total - cont.total)) == pytest.approx(np.log2(127.5), abs=0.05)
    # The edge bins take the tails: a point at -1 far below the mean costs little.
    edge = lk.discretized_gaussian_nll(jnp.array([-1.0, 1.0]), jnp.array([-0.5, 0.5]), 0.1)
    np.testing.assert_allclose(edge, -norm.logcdf(-5 + 10 / 255), rtol=1e-3)


def test_bad_arguments_are_one_line_errors(gaussian):
    model, x, _ = gaussian
    with pytest.raises(ValueError, match="decoder"):
        lk.ddpm_bound(model, SCHEDULE, x, KEY, decoder="logistic")
    with pytest.raises(ValueError, match="variance"):
        lk.ddpm_bound(model, SCHEDULE, x, KEY, variance="learned")
    with pytest.raises(ValueError, match="num_steps"):
        lk.ddpm_bound(model, SCHEDULE, x, KEY, num_steps=1)
    with pytest.raises(ValueError, match="batch"):
        lk.vdm_bound(model, SCHEDULE, x[0], KEY)
    np.testing.assert_array_equal(lk.ddpm_timesteps(1000, 4), [0, 333, 666, 999])
