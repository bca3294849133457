"""Schedules: identities, closed forms, coordinate round trips, and parity with diffusers."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules

CONFIGS = {
    "linear": dict(beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(),
}


@pytest.mark.parametrize("name", schedules.DISCRETE_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_is_cumprod_of_one_minus_betas(name, zero_snr):
    s = schedules.discrete(name, rescale_betas_zero_snr=zero_snr, **CONFIGS[name])
    betas = np.asarray(s.betas, np.float64)
    assert s.betas.dtype == jnp.float32 and s.alphas_cumprod.dtype == jnp.float32
    assert s.betas.shape == s.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1.0 - betas), rtol=1e-6, atol=1e-12)
    # The float64 host recomputation rounds to exactly the stored float32 values.
    np.testing.assert_array_equal(schedules.alphas_cumprod_float64(s).astype(np.float32), np.asarray(s.alphas_cumprod))
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_linear_and_scaled_linear_endpoints():
    lin = np.asarray(schedules.discrete("linear", 1000, 0.0001, 0.02).betas)
    np.testing.assert_allclose(lin[[0, -1]], [0.0001, 0.02], rtol=1e-6)
    np.testing.assert_allclose(np.diff(lin), (0.02 - 0.0001) / 999, rtol=1e-3)
    sl = np.asarray(schedules.discrete("scaled_linear", 1000, 0.00085, 0.012).betas, np.float64)
    np.testing.assert_allclose(np.diff(np.sqrt(sl)), (math.sqrt(0.012) - math.sqrt(0.00085)) / 999, rtol=1e-4)


def test_squaredcos_matches_closed_form():
    T = 1000
    s = schedules.discrete("squaredcos_cap_v2", T)
    betas = np.asarray(s.betas, np.float64)
    t = (np.arange(T) + 1) / T
    closed = np.asarray(schedules.cosine_alpha_bar(t), np.float64)
    uncapped = betas < 0.999 - 1e-6
    assert uncapped.sum() >= T - 2                      # the cap only bites at the very end
    # abar_i = f((i + 1) / T) / f(0) wherever no earlier beta was capped.
    n = np.argmin(uncapped) if not uncapped.all() else T
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[:n], closed[:n], rtol=2e-5, atol=1e-7)
    # And by hand, one value: f(t) = cos(((t + s) / (1 + s)) pi / 2)^2, s = 0.008.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    assert float(s.alphas_cumprod[499]) == pytest.approx(f(0.5) / f(0.0), rel=1e-5)


def test_zero_terminal_snr():
    for name in schedules.DISCRETE_SCHEDULES:
        plain = schedules.discrete(name, **CONFIGS[name])
        zsnr = schedules.discrete(name, rescale_betas_zero_snr=True, **CONFIGS[name])
        ab = np.asarray(zsnr.alphas_cumprod)
        assert ab[-1] == 0.0
        assert float(zsnr.betas[-1]) == 1.0
        assert math.sqrt(ab[0]) == pytest.approx(math.sqrt(float(plain.alphas_cumprod[0])), rel=1e-6)
        # sqrt(abar) is an affine map of the original: check it at a middle point.
        s0 = np.sqrt(np.asarray(plain.alphas_cumprod, np.float64))
        expect = (s0 - s0[-1]) * s0[0] / (s0[0] - s0[-1])
        np.testing.assert_allclose(np.sqrt(ab.astype(np.float64)), expect, rtol=1e-5, atol=1e-7)
    # numpy and jax implementations agree.
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(np.asarray(schedules.rescale_zero_terminal_snr(jnp.asarray(betas, jnp.float32))),
                               schedules.rescale_zero_terminal_snr(betas), rtol=2e-4, atol=1e-6)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="linear, scaled_linear, squaredcos_cap_v2"):
        schedules.discrete("cosine_v3")


@pytest.mark.parametrize("name", schedules.DISCRETE_SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_matches_diffusers(name, zero_snr):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name,
                                  rescale_betas_zero_snr=zero_snr, **CONFIGS[name])
    ours = schedules.discrete(name, 1000, rescale_betas_zero_snr=zero_snr, **CONFIGS[name])
    # The reference builds in float32 arithmetic, ours in float64 rounded to float32. Its
    # zero-SNR rescale reads betas back as 1 - abar_t / abar_{t-1} in float32, which keeps only
    # ~3 digits of a beta ~ 1e-4; the float64 reference below pins those betas down instead.
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=5e-3 if zero_snr else 2e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-9)
    if zero_snr:
        np.testing.assert_allclose(
            np.asarray(schedules.rescale_zero_terminal_snr(np.asarray(ref.betas, np.float64))),
            diffusers.schedulers.scheduling_ddpm.rescale_zero_terminal_snr(ref.betas.double()).numpy(), rtol=1e-10)


def test_coordinate_round_trips():
    ab = jnp.asarray(np.geomspace(1e-4, 0.9999, 101), jnp.float32)
    sigma = schedules.alpha_bar_to_sigma(ab)
    lsnr = schedules.alpha_bar_to_log_snr(ab)
    np.testing.assert_allclose(schedules.sigma_to_alpha_bar(sigma), ab, rtol=1e-5)
    np.testing.assert_allclose(schedules.log_snr_to_alpha_bar(lsnr), ab, rtol=1e-5)
    np.testing.assert_allclose(schedules.sigma_to_log_snr(sigma), lsnr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(schedules.log_snr_to_sigma(lsnr), sigma, rtol=1e-5)
    # Known values: abar = 0.5 <-> sigma = 1 <-> log-SNR = 0; abar = 0.2 <-> sigma = 2.
    assert float(schedules.alpha_bar_to_sigma(0.5)) == pytest.approx(1.0)
    assert float(schedules.alpha_bar_to_log_snr(0.5)) == pytest.approx(0.0, abs=1e-7)
    assert float(schedules.alpha_bar_to_sigma(0.2)) == pytest.approx(2.0)
    assert float(schedules.alpha_bar_to_log_snr(0.2)) == pytest.approx(math.log(0.25))
    s = schedules.discrete("linear")
    np.testing.assert_allclose(s.sigmas, schedules.alpha_bar_to_sigma(s.alphas_cumprod))
    np.testing.assert_allclose(s.log_snr, -2 * np.log(np.asarray(s.sigmas)), rtol=1e-5, atol=1e-5)


def test_continuous_cosine():
    c = schedules.cosine()
    t = jnp.linspace(0.0, 1.0, 11)
    ab = np.asarray(c.alpha_bar(t))
    assert ab[0] == pytest.approx(1.0) and ab[-1] == pytest.approx(0.0, abs=1e-7)
    assert np.all(np.diff(ab) < 0)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    np.testing.assert_allclose(ab, [f(u) / f(0) for u in np.linspace(0, 1, 11)], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c.sigma(0.3), schedules.alpha_bar_to_sigma(c.alpha_bar(0.3)), rtol=1e-6)
    np.testing.assert_allclose(c.log_snr(0.3), schedules.alpha_bar_to_log_snr(c.alpha_bar(0.3)), rtol=1e-6)
    np.testing.assert_allclose(schedules.cosine_alpha_bar(t), ab, rtol=1e-6)


def test_timestep_from_sigma():
    s = schedules.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    ts = jnp.asarray([0, 1, 250, 999])
    np.testing.assert_allclose(schedules.timestep_from_sigma(s, s.sigmas[ts]), ts, atol=2e-3)
    mid = jnp.exp(0.5 * (jnp.log(s.sigmas[10]) + jnp.log(s.sigmas[11])))
    assert float(schedules.timestep_from_sigma(s, mid)) == pytest.approx(10.5, abs=2e-3)
    # Out of range clips to the ends.
    np.testing.assert_allclose(schedules.timestep_from_sigma(s, jnp.asarray([1e-6, 1e6])), [0.0, 999.0])


def test_from_betas_validates():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        schedules.from_betas([0.1, 0.0])
    with pytest.raises(ValueError, match="1-D"):
        schedules.from_betas(np.zeros((2, 2)) + 0.1)
