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

from jaxdiff import analytic, samplers, sampling, schedules

D = 6
MU = np.linspace(-1.0, 1.5, D)
SD = np.linspace(0.2, 0.9, D)
SCHEDULE = schedules.discrete("linear")


# The exact denoiser, the exact flow map and the error measurement live in `jaxdiff.analytic`
# (shared with experiments/plot_sampler_convergence.py).
MODEL = analytic.exact_model(MU, SD, SCHEDULE)


def _pf_ode_map(x_T, a_T, a_0):
    return analytic.pf_ode_map(x_T, a_T, a_0, MU, SD)


_rms = analytic.rms


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


# --------------------------------------------------------------------------------------------
# Every deterministic sampler converges to the exact probability-flow solution at its order.
# --------------------------------------------------------------------------------------------

# (name, options, expected slope, tolerance on the fitted log-log slope, step counts).
# The tolerances: with 8..64 steps the pre-asymptotic terms (relative size O(1 / num_steps)) bend a
# straight-line fit by up to ~0.15 (measured: Euler -0.99, DPM-Solver++ order 1 -0.99, Heun -2.15,
# DPM-Solver++(2M) -1.88 midpoint / -1.92 heun); 0.25 leaves room for that and still tells order
# 1 from 2. The third-order multistep solver warms up with one first-order step, whose O(h^2)
# local error is a one-off, so its *global* order is 2 with a small constant: measured -2.35
# (local slopes -2.41, -2.39, -2.27 falling towards 2); it must be at least as steep as 2.1 and
# beat the second-order solver at every step count.
# LMS (Adams-Bashforth in sigma) takes very unequal steps in sigma on this plan (the first one
# spans sigma 157 -> 20), so it reaches its asymptotic regime late: on 32..128 steps the local
# slopes are order 2: -1.81, -1.89; order 3: -2.58, -2.79; order 4: -3.30, -3.63 (float32 noise
# takes over near 256 steps), steepening towards the order. The fit must lie within 0.35 of the
# order (0.6 for order 4), and the higher orders must be more accurate at 128 steps.
# UniPC with order-p predictor and corrector is of order p + 1 (Zhao et al. 2023, sec. 3.2); the
# trajectory holds the predictions (each corrected at the next call). Measured fits: p = 1 -1.77
# (local slopes -1.65, -1.82, -1.82), p = 2 -2.74 (bh2) / -2.94 (bh1), p = 3 -3.85 on 8..32
# steps (at 64 steps its error, 4e-7, reaches float32 rounding); tolerances 0.3-0.35.
# PNDM steps from t to t - T // num_steps whatever the spacing, so its step counts divide T into
# even steps (10..100); on this problem it is already at ~2e-5 at t = 499 with 10 steps, so it is
# measured on the longer interval down to t = 99, where both warm-ups (Runge-Kutta or
# skip_prk_steps) give the same clean order 2 (fits -2.06, -2.05). Its fourth-order Adams
# extrapolation averages the noise estimate uniformly in t while the transfer part (a DDIM
# step) weights it by the exponential-integrator kernel, which leaves an O(h^3) local error.
PNDM_STEPS = (10, 20, 50, 100)
STEPS = (8, 16, 32, 64)
LMS_STEPS = (32, 64, 128)
ORDER_CASES = [
    ("euler", {}, 1.0, 0.25, STEPS),
    ("heun", {}, 2.0, 0.25, STEPS),
    ("dpmpp_2m", dict(solver_order=1), 1.0, 0.25, STEPS),
    ("dpmpp_2m", dict(solver_order=2), 2.0, 0.25, STEPS),
    ("dpmpp_2m", dict(solver_order=2, solver_type="heun"), 2.0, 0.25, STEPS),
    ("dpmpp_2m", dict(solver_order=3), 2.35, 0.25, STEPS),
    ("unipc", dict(solver_order=1), 2.0, 0.3, STEPS),
    ("unipc", dict(solver_order=2), 3.0, 0.35, STEPS),
    ("unipc", dict(solver_order=2, solver_type="bh1"), 3.0, 0.35, STEPS),
    ("unipc", dict(solver_order=3), 4.0, 0.35, STEPS[:3]),
    ("pndm", dict(target=99), 2.0, 0.25, PNDM_STEPS),
    ("pndm", dict(target=99, skip_prk_steps=True), 2.0, 0.25, PNDM_STEPS),
    ("lms", dict(order=1), 1.0, 0.25, LMS_STEPS),
    ("lms", dict(order=2), 2.0, 0.35, LMS_STEPS),
    ("lms", dict(order=3), 3.0, 0.35, LMS_STEPS),
    ("lms", dict(order=4), 4.0, 0.6, LMS_STEPS),
]


def _error_at_midpoint(name, num_steps, target=499, **options):
    """rms error against the exact flow from t = 999 to t = `target`, a level that every run of
    `num_steps` in the case's step counts lands on ("trailing" spacing; `analytic.pf_ode_error`
    raises if the run does not land there). Measuring there, not at t = 0, keeps the last step onto
    sigma = 0 (first order in every sampler, and a step of unbounded length in log-SNR) out of the
    comparison, so the error reflects the solver on a fixed interval."""
    return analytic.pf_ode_error(name, SCHEDULE, num_steps, MU, SD, target, **options)[0]


@pytest.mark.parametrize("name,options,order,tol,steps", ORDER_CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}" for c in ORDER_CASES])
def test_deterministic_samplers_converge_at_their_order(name, options, order, tol, steps):
    steps = np.array(steps)
    options = dict(options)
    target = options.pop("target", 499)
    errs = np.array([_error_at_midpoint(name, n, target, **options) for n in steps])
    assert np.all(np.diff(errs) < 0), errs
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope + order) < tol, (slope, errs)
    assert errs[0] < 0.05, errs                           # converging to the right answer from the start
    if name == "dpmpp_2m" and options.get("solver_order") == 3:
        second = np.array([_error_at_midpoint(name, n, solver_order=2) for n in steps])
        assert np.all(errs < second), (errs, second)
    if name == "lms" and options["order"] > 1:
        lower = _error_at_midpoint(name, int(steps[-1]), order=options["order"] - 1)
        assert errs[-1] < lower, (errs[-1], lower)
    if name == "pndm":                                    # far more accurate than DDIM (= first-order DPM-Solver++)
        assert errs[0] < 0.1 * _error_at_midpoint("dpmpp_2m", int(steps[0]), target, solver_order=1), errs


def test_first_order_solvers_are_ddim():
    """DDIM (eta = 0) is Euler's method for the ODE in (x_t / sqrt(abar), sigma) and the
    first-order DPM-Solver++ step: on the same levels the three trajectories coincide (Euler's
    in VE coordinates, divided by the input scale)."""
    noise = jax.random.normal(jax.random.PRNGKey(3), (16, D))
    ddim = sampling.sample(_ddim(20), MODEL, noise, jax.random.PRNGKey(0), return_trajectory=True)[1]
    dpm = sampling.sample(samplers.get("dpmpp_2m", SCHEDULE, 20, timestep_spacing="trailing", solver_order=1),
                          MODEL, noise, jax.random.PRNGKey(0), return_trajectory=True)[1]
    euler = samplers.get("euler", SCHEDULE, 20, timestep_spacing="trailing")
    state = euler.init(noise)
    # Start Euler at the VE latent x_T / sqrt(abar_T) = noise / input_scales[0].
    eul = sampling.sample(euler, MODEL, noise / (float(state.init_sigma) * float(state.input_scales[0])),
                          jax.random.PRNGKey(0), return_trajectory=True)[1]
    scales = np.append(np.asarray(state.input_scales[1:]), 1.0)[:, None, None]      # sqrt(abar) of each landing
    np.testing.assert_allclose(dpm, ddim, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(eul) * scales, ddim, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------
# EDM's stochastic sampler (Karras et al. 2022, Alg. 2): its output law, exactly.
# --------------------------------------------------------------------------------------------

def _exact_eps_continuous(mu, sd, log_sigmas, x, t):
    """Exact eps-prediction at fractional t: sigma(t) interpolates log-sigma linearly between
    training timesteps (the inverse of how sigma-space samplers pick t). x: [B, D], t: [B]."""
    lo = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, log_sigmas.shape[0] - 2)
    w = t - lo
    log_sigma = (1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]
    a = (1.0 / (1.0 + jnp.exp(2 * log_sigma)))[:, None]                                  # [B, 1]
    return analytic.exact_prediction(mu, sd, a, x, "epsilon")


_AC = schedules.alphas_cumprod_float64(SCHEDULE)
MODEL_CONTINUOUS = jax.tree_util.Partial(_exact_eps_continuous, jnp.asarray(MU, jnp.float32),
                                         jnp.asarray(SD, jnp.float32),
                                         jnp.asarray(0.5 * np.log((1 - _AC) / _AC), jnp.float32))


def _edm_exact_moments(sigmas, s_churn):
    """Mean and variance [D] of Alg. 2's output, propagated in float64. In VE coordinates
    D(x; s) = MU + k(s) (x - MU), k(s) = SD^2 / (SD^2 + s^2), so each Heun step maps x_hat - MU
    to F (x_hat - MU) for a scalar F per dimension, and the churn adds variance."""
    n = len(sigmas) - 1
    gamma = min(s_churn / n, np.sqrt(2) - 1)
    k = lambda s: SD ** 2 / (SD ** 2 + s ** 2)                                   # noqa: E731
    m, v = np.zeros(D), np.zeros(D)                                              # of x - MU, before churn
    m -= MU
    v += (sigmas[0] * (1 + gamma)) ** 2                                          # x_hat_0 = sigma_hat_0 noise
    for i in range(n):
        s_hat, s_next = sigmas[i] * (1 + gamma), sigmas[i + 1]
        if i > 0:
            v = v + s_hat ** 2 - sigmas[i] ** 2                                  # lines 5-6
        d = (1 - k(s_hat)) / s_hat
        f = 1 + (s_next - s_hat) * d                                             # Euler predictor (line 8)
        if s_next > 0:                                                           # trapezoidal corrector (line 11)
            f = 1 + (s_next - s_hat) * 0.5 * (d + (1 - k(s_next)) / s_next * f)
        m, v = f * m, f ** 2 * v
    return m + MU, v


@pytest.mark.parametrize("s_churn", [0.0, 40.0])
def test_edm_stochastic_sampler_has_the_exact_law(s_churn):
    """4096 samples of 16-step Alg. 2 (gamma = sqrt(2) - 1 at every step when s_churn = 40) match
    the exact output moments to 4.5 standard errors; a churn noise off by 10% (s_noise = 1.1)
    moves the output std by 6-10 standard errors at this size."""
    n, steps = 4096, 16
    sampler = samplers.get("edm", SCHEDULE, steps, s_churn=s_churn)
    state = sampler.init(jnp.zeros((1, D)))
    sigmas = np.append(np.asarray(samplers.get("heun", SCHEDULE, steps, use_karras_sigmas=True)
                                  .init(jnp.zeros((1, D))).plan.sigma_from[::2], np.float64), 0.0)
    x = np.asarray(sampling.sample(sampler, MODEL_CONTINUOUS, jax.random.normal(jax.random.PRNGKey(5), (n, D)),
                                   jax.random.PRNGKey(6)), np.float64)
    m, v = _edm_exact_moments(sigmas, s_churn)
    sd = np.sqrt(v)
    np.testing.assert_array_less(np.abs(x.mean(0) - m), 4.5 * sd / np.sqrt(n))
    np.testing.assert_array_less(np.abs(x.std(0) - sd), 4.5 * sd / np.sqrt(2 * n))
    assert float(state.init_sigma) == pytest.approx(sigmas[0] * (1 + min(s_churn / steps, np.sqrt(2) - 1)), rel=1e-5)
    if s_churn:   # the churn visibly changes the law (so the test can tell it was applied)
        _, v0 = _edm_exact_moments(sigmas, 0.0)
        assert np.max(np.abs(np.sqrt(v0) / sd - 1)) > 0.03
