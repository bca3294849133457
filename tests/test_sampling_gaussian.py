"""Analytic truth: on Gaussian data the exact denoiser is known in closed form.

Data x0 ~ N(mu, diag(sd^2)). At level abar, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is Gaussian
and E[x0 | x_t] = mu + sqrt(abar) sd^2 / (abar sd^2 + 1 - abar) (x_t - sqrt(abar) mu), so a
"network" returning the exact eps-prediction can be written down. Consequences tested here:

* the probability-flow ODE maps x_T at abar_T to x_0 at abar_0 by the affine map
  (x_T - sqrt(a_T) mu) / sqrt(a_T sd^2 + 1 - a_T) * sqrt(a_0 sd^2 + 1 - a_0) + sqrt(a_0) mu,
  and DDIM (eta = 0), a first-order solver of it, converges to it at rate 1 / num_steps;
* DDIM inversion (the same solver run backwards) recovers the noise, at the same rate;
* DDPM's steps are affine in x_t plus Gaussian noise, so its output law is exactly Gaussian with
  moments obtained by propagating mean and variance through the chain; samples must match them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules

D = 6
MU = np.linspace(-1.0, 1.5, D)
SD = np.linspace(0.2, 0.9, D)
SCHEDULE = schedules.discrete("linear")


def _exact_eps(mu, sd, alphas_cumprod, x, t):
    """Exact eps-prediction for N(mu, sd^2) data. x: [B, D], t: [B] (integer-valued float)."""
    a = alphas_cumprod[t.astype(jnp.int32)][:, None]                            # [B, 1]
    x0 = mu + jnp.sqrt(a) * sd ** 2 / (a * sd ** 2 + 1 - a) * (x - jnp.sqrt(a) * mu)
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)


MODEL = jax.tree_util.Partial(_exact_eps, jnp.asarray(MU, jnp.float32), jnp.asarray(SD, jnp.float32),
                              SCHEDULE.alphas_cumprod)


def _pf_ode_map(x_T, a_T, a_0):
    return (x_T - np.sqrt(a_T) * MU) / np.sqrt(a_T * SD ** 2 + 1 - a_T) * np.sqrt(a_0 * SD ** 2 + 1 - a_0) \
        + np.sqrt(a_0) * MU


def _rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def _ddim(num_steps, **kw):
    # "trailing" with num_steps dividing T starts at the noisiest timestep and each step lands
    # exactly on the next planned one; set_alpha_to_one: the run ends at abar = 1.
    return samplers.get("ddim", SCHEDULE, num_steps, timestep_spacing="trailing", clip_sample=False, **kw)


def test_ddim_converges_to_exact_probability_flow_solution():
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (64, D)))
    a_T = float(schedules.alphas_cumprod_float64(SCHEDULE)[-1])
    exact = _pf_ode_map(noise, a_T, 1.0)
    steps = np.array([10, 40, 100, 500])
    errs = np.array([_rms(sampling.sample(_ddim(n), MODEL, noise, jax.random.PRNGKey(1)), exact) for n in steps])
    assert np.all(np.diff(errs) < 0), errs
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert -1.15 < slope < -0.85, (slope, errs)          # first order
    assert errs[-1] < 4e-3, errs                          # (the data's rms spread is ~1)
    # A wrong plan (e.g. data-free eps = 0 everywhere) would sit at O(1) error, not converge.
    assert errs[0] < 0.2


def test_ddim_inversion_recovers_noise():
    """noise -> DDIM -> x0 -> DDIM inversion -> noise'. Both legs are first-order solvers of the
    same ODE, so |noise' - noise| = O(1 / num_steps); on this problem the constant is ~7
    (rms 6.8e-3 at 1000 steps), hence the 1e-2 bound and the ~4x ratio between 250 and 1000."""
    noise = jax.random.normal(jax.random.PRNGKey(2), (64, D))
    errs = {}
    for n in (250, 1000):
        x0 = sampling.sample(_ddim(n), MODEL, noise, jax.random.PRNGKey(0))
        inverse = samplers.get("ddim_inverse", SCHEDULE, n, timestep_spacing="trailing", clip_sample=False)
        latent, traj = sampling.invert(inverse, MODEL, x0, return_trajectory=True)
        assert traj.shape == (n, 64, D)
        np.testing.assert_array_equal(traj[-1], latent)
        errs[n] = _rms(latent, noise)
    assert errs[1000] < 1e-2, errs
    assert 3.0 < errs[250] / errs[1000] < 5.0, errs
    # The inverse starts from the data (the ODE's clean end) and ends on the noise level.
    state = inverse.init(x0)
    assert float(state.timesteps[0]) == 0.0 and float(state.timesteps[-1]) == 998.0
    assert float(state.plan.sqrt_alpha_bar[0]) == 1.0


def _ddpm_exact_moments(num_steps, variance_type):
    """Mean and variance [D] of DDPM's output, propagated exactly (float64) through its affine
    Gaussian steps x' = A x + b + std z from x_T ~ N(0, I) (Ho et al. 2020, eq. 6-7)."""
    ac = schedules.alphas_cumprod_float64(SCHEDULE)
    ratio = 1000 // num_steps
    ts = np.arange(num_steps)[::-1] * ratio                     # "leading" spacing
    m, v = np.zeros(D), np.ones(D)
    for i, t in enumerate(ts):
        a = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < num_steps else 1.0
        beta = 1 - a / a_prev
        c_x0 = np.sqrt(a_prev) * beta / (1 - a)
        c_xt = np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        var = (1 - a_prev) / (1 - a) * beta if variance_type == "fixed_small" else beta
        k = np.sqrt(a) * SD ** 2 / (a * SD ** 2 + 1 - a)          # x0_hat = MU + k (x - sqrt(a) MU)
        A, b = c_x0 * k + c_xt, c_x0 * (MU - k * np.sqrt(a) * MU)
        m, v = A * m + b, A ** 2 * v + (var if t > 0 else 0.0)
    return m, v


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_samples_have_the_exact_moments(variance_type):
    n, num_steps = 4096, 100
    sampler = samplers.get("ddpm", SCHEDULE, num_steps, variance_type=variance_type, clip_sample=False)
    x = np.asarray(sampling.sample(sampler, MODEL, jax.random.normal(jax.random.PRNGKey(5), (n, D)),
                                   jax.random.PRNGKey(6)), np.float64)
    m, v = _ddpm_exact_moments(num_steps, variance_type)
    sd = np.sqrt(v)
    # 4.5 standard errors per dimension (mean: sd / sqrt(n); std: ~sd / sqrt(2 n)).
    np.testing.assert_array_less(np.abs(x.mean(0) - m), 4.5 * sd / np.sqrt(n))
    np.testing.assert_array_less(np.abs(x.std(0) - sd), 4.5 * sd / np.sqrt(2 * n))
    # And the chain's law is near the data's (100 steps: a few % low in std for fixed_small).
    np.testing.assert_allclose(m, MU, atol=0.02)
    np.testing.assert_allclose(sd, SD, rtol=0.15)
