"""Schedules to the last detail: defaults equal to the reference scheduler's, the smallest valid
inputs accepted and the invalid ones refused, the beta cap, the cosine offset honoured wherever it
is passed, coordinate conversions at their ends and in float32. Host arithmetic on tiny arrays."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules


def test_defaults_are_the_reference_defaults():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler()                                 # 1000 steps, linear 1e-4 .. 0.02
    ours = schedules.discrete("linear")
    assert ours.num_train_timesteps == 1000
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=1e-6)
    assert float(ours.betas[0]) == pytest.approx(1e-4) and float(ours.betas[-1]) == pytest.approx(0.02)


def test_smallest_schedules():
    two = schedules.discrete("linear", 2, 0.1, 0.3)
    np.testing.assert_allclose(two.betas, [0.1, 0.3], rtol=1e-6)
    np.testing.assert_allclose(two.alphas_cumprod, [0.9, 0.9 * 0.7], rtol=1e-6)
    with pytest.raises(ValueError, match="num_train_timesteps must be >= 2, got 1"):
        schedules.discrete("linear", 1)
    one = schedules.from_betas([0.5])
    np.testing.assert_allclose(one.alphas_cumprod, [0.5])
    assert schedules.from_betas([1.0]).alphas_cumprod[0] == 0.0       # beta = 1 is allowed (zero terminal SNR)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        schedules.from_betas([])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        schedules.from_betas([0.5, 1.5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        schedules.from_betas([-0.1, 0.5])


def test_betas_for_alpha_bar_by_hand():
    f = lambda t: 1.0 - 0.5 * t                                       # abar(0) = 1, abar(1) = 0.5
    betas = schedules.betas_for_alpha_bar(f, 4)
    grid = [1.0, 0.875, 0.75, 0.625, 0.5]
    np.testing.assert_allclose(betas, [1 - grid[i + 1] / grid[i] for i in range(4)], rtol=1e-12)
    assert betas.dtype == np.float64 and betas.shape == (4,)
    steep = lambda t: np.maximum(1.0 - t, 0.0)                        # the last beta would be 1
    np.testing.assert_allclose(schedules.betas_for_alpha_bar(steep, 4)[-1], 0.999)
    np.testing.assert_allclose(schedules.betas_for_alpha_bar(steep, 4, max_beta=0.9)[-2:], [0.5, 0.9])


def test_cosine_offset_is_honoured():
    s = 0.1
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    expect = [f(u) / f(0) for u in (0.0, 0.25, 0.5, 0.9)]
    np.testing.assert_allclose(schedules.cosine_alpha_bar(jnp.asarray([0.0, 0.25, 0.5, 0.9]), s=s), expect, rtol=1e-5)
    c = schedules.cosine(s)
    assert float(c.s) == pytest.approx(s) and c.s.dtype == jnp.float32
    np.testing.assert_allclose(c.alpha_bar(jnp.asarray([0.0, 0.25, 0.5, 0.9])), expect, rtol=1e-5)
    assert float(schedules.cosine().s) == pytest.approx(0.008)
    assert float(schedules.cosine_alpha_bar(1.0)) == pytest.approx(0.0, abs=1e-7)


def test_conversions_at_the_ends_and_in_float32():
    ab = jnp.asarray([0.0, 1.0])
    sigma = schedules.alpha_bar_to_sigma(ab)
    assert np.isinf(sigma[0]) and sigma[1] == 0.0
    lsnr = schedules.alpha_bar_to_log_snr(ab)
    assert lsnr[0] == -np.inf and lsnr[1] == np.inf
    assert float(schedules.sigma_to_alpha_bar(0.0)) == 1.0 and float(schedules.sigma_to_alpha_bar(jnp.inf)) == 0.0
    assert float(schedules.log_snr_to_alpha_bar(0.0)) == 0.5
    assert float(schedules.log_snr_to_sigma(0.0)) == 1.0 and float(schedules.sigma_to_log_snr(1.0)) == 0.0
    assert float(schedules.log_snr_to_sigma(-2 * math.log(3.0))) == pytest.approx(3.0)
    assert float(schedules.sigma_to_log_snr(3.0)) == pytest.approx(-2 * math.log(3.0))
    assert float(schedules.log_snr_to_alpha_bar(math.log(4.0))) == pytest.approx(0.8)
    assert float(schedules.sigma_to_alpha_bar(3.0)) == pytest.approx(0.1)
    for fn in (schedules.alpha_bar_to_sigma, schedules.sigma_to_alpha_bar, schedules.alpha_bar_to_log_snr,
               schedules.log_snr_to_alpha_bar, schedules.sigma_to_log_snr, schedules.log_snr_to_sigma):
        assert fn(np.float64(0.5)).dtype == jnp.float32                # float32 unless x64 is enabled
        assert fn(1).dtype == jnp.float32                              # integers are promoted


def test_timestep_from_sigma_keeps_the_shape_and_interpolates_in_log_sigma():
    s = schedules.from_betas(np.linspace(0.01, 0.2, 5))
    sig = np.asarray(s.sigmas, np.float64)
    # A quarter of the way between timesteps 2 and 3 in log-sigma (not in sigma).
    q = np.exp(0.75 * np.log(sig[2]) + 0.25 * np.log(sig[3]))
    grid = jnp.asarray([[sig[0], q], [sig[4], sig[1]]], jnp.float32)
    out = schedules.timestep_from_sigma(s, grid)
    assert out.shape == (2, 2) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[0.0, 2.25], [4.0, 1.0]], atol=1e-4)
    lin = 0.5 * (sig[2] + sig[3])                                      # midway in sigma is past 2.5 in log-sigma
    assert float(schedules.timestep_from_sigma(s, lin)) > 2.5
