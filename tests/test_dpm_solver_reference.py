"""DPM-Solver++ through the fast path against a direct loop.

The fast path is what `samplers.get("dpmpp_*")` builds: per-step linear coefficients computed on the
host (A, B [K], C in VP coordinates) and run by `sampling.sample`'s one scan. The reference below
is the obvious per-step loop, written out in float64 numpy in the variance-exploding latent
x = x_t / alpha with lambda = -log(sigma) (the form of k-diffusion's samplers): it keeps the last
denoised values, forms the divided differences and applies the exponential-integrator update at
every step, with the same injected noise z_i = normal(fold_in(key, i)) for the SDE. It shares no code
with the sampler, so a wrong coefficient, a history slot off by one or a wrong noise scale shows up
as a trajectory mismatch (the perturbation test checks that it does).

The model is a closed-form data predictor of the model input, x0_hat = g(x_t), smooth and nonlinear
(so the divided differences are nonzero and vary from step to step).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules

SHAPE = (2, 5, 3)
KEY = jax.random.PRNGKey(11)
SCHEDULE = schedules.discrete("scaled_linear", 1000, 0.00085, 0.012)
TOL = 2e-6                                   # norm-relative, per step (float32 fast path vs float64)
RHO = 7.0


def _g(x):
    return 0.8 * np.tanh(1.5 * x) + 0.15 * np.sin(2.0 * x)


def _model(x, t):
    """The network: x0_hat from the model input x_t [B, ...]; t [B] is not used."""
    del t
    return 0.8 * jnp.tanh(1.5 * x) + 0.15 * jnp.sin(2.0 * x)


MODEL = jax.tree_util.Partial(_model)


def _noise():
    return jax.random.normal(jax.random.PRNGKey(5), SHAPE, jnp.float32)


def _karras_sigmas(num_steps):
    """Karras et al. 2022 eq. 5 between the schedule's smallest and largest sigma, then 0."""
    abar = schedules.alphas_cumprod_float64(SCHEDULE)
    train = np.sqrt((1.0 - abar) / abar)
    lo, hi = train[0] ** (1 / RHO), train[-1] ** (1 / RHO)
    return np.append((hi + np.linspace(0.0, 1.0, num_steps) * (lo - hi)) ** RHO, 0.0)


def _reference(sigmas, noise, zs, *, order, eta, lower_order_final=True):
    """The DPM-Solver++ multistep loop in sigma / lambda space, float64.

    eta = 0: DPM-Solver++(2M/3M) for the ODE; eta = 1: SDE-DPM-Solver++ (h_eta = 2h, the sample
    decays by e^{-h} and gets sigma_next sqrt(1 - e^{-2h}) z). Second-order steps use the midpoint
    form (Alg. 2: D = (1 + 1/(2r)) m0 - 1/(2r) m1), also while a third-order run warms up;
    third-order steps subtract phi_3 d2 for the ODE and (phi_3 + 1) d2 for the SDE, the weights of
    the reference scheduler that `samplers/dpm_solver.py` follows (k-diffusion's 3M SDE subtracts
    phi_3 d2 and warms up with phi_2 d; its module docstring says why neither is the Taylor weight).
    Orders: warm-up, at most 2 on the last-but-one step below 15 steps, and the last step (onto
    sigma = 0) returns the denoised value. Returns the VP latent x_t after every step.
    """
    n = len(sigmas) - 1
    lam = -np.log(np.maximum(sigmas, 1e-300))
    x = np.asarray(noise, np.float64) * np.sqrt(sigmas[0] ** 2 + 1.0)       # x_T = noise in VP coordinates
    denoised, traj = [], []
    for i in range(n):
        alpha = 1.0 / np.sqrt(sigmas[i] ** 2 + 1.0)
        denoised.insert(0, _g(alpha * x))                                     # newest first
        k = min(i + 1, order, 2 if (lower_order_final and n < 15 and i == n - 2) else order)
        if sigmas[i + 1] == 0:
            x = denoised[0]
        else:
            h = lam[i + 1] - lam[i]
            h_eta = h * (1.0 + eta)
            x = sigmas[i + 1] / sigmas[i] * np.exp(-eta * h) * x - np.expm1(-h_eta) * denoised[0]
            if k >= 2:
                r0 = (lam[i] - lam[i - 1]) / h
                d1_0 = (denoised[0] - denoised[1]) / r0
            if k == 2:
                x = x - 0.5 * np.expm1(-h_eta) * d1_0
            if k == 3:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = (denoised[1] - denoised[2]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = np.expm1(-h_eta) / h_eta + 1.0
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - (phi_3 + (1.0 if eta else 0.0)) * d2
            if eta:
                x = x + sigmas[i + 1] * np.sqrt(-np.expm1(-2.0 * eta * h)) * zs[i]
        traj.append(x / np.sqrt(sigmas[i + 1] ** 2 + 1.0))
    return np.stack(traj)


def _step_noises(n):
    return [np.asarray(jax.random.normal(jax.random.fold_in(KEY, i), SHAPE, jnp.float32), np.float64)
            for i in range(n)]


def _error(traj, ref):
    traj = np.asarray(traj, np.float64).reshape(len(ref), -1)
    ref = ref.reshape(len(ref), -1)
    return float(np.max(np.linalg.norm(traj - ref, axis=1) / np.linalg.norm(ref, axis=1)))


# (sampler, its solver order, eta of the reference)
SOLVERS = [("dpmpp_2m", 2, 0.0), ("dpmpp_2m_sde", 2, 1.0), ("dpmpp_3m_sde", 3, 1.0)]


def _fast(name, num_steps, **options):
    sampler = samplers.get(name, SCHEDULE, num_steps, use_karras_sigmas=True, prediction_type="sample", **options)
    np.testing.assert_allclose(sampler.plan.plan.s / sampler.plan.plan.a, _karras_sigmas(num_steps)[:-1], rtol=1e-5)
    return sampler


@pytest.mark.parametrize("num_steps", [4, 7, 12, 20])
@pytest.mark.parametrize("name,order,eta", SOLVERS)
def test_fast_path_matches_the_direct_loop(name, order, eta, num_steps):
    sampler = _fast(name, num_steps)
    _, traj = sampling.sample(sampler, MODEL, _noise(), KEY, return_trajectory=True)
    ref = _reference(_karras_sigmas(num_steps), _noise(), _step_noises(num_steps), order=order, eta=eta)
    assert _error(traj, ref) < TOL


def test_third_order_ode_and_lower_order_final_off():
    """dpmpp_2m with solver_order=3 is the ODE's third-order multistep; without lower_order_final
    every step after the warm-up but the last is third order."""
    for lower in (True, False):
        sampler = _fast("dpmpp_2m", 9, solver_order=3, lower_order_final=lower)
        _, traj = sampling.sample(sampler, MODEL, _noise(), KEY, return_trajectory=True)
        ref = _reference(_karras_sigmas(9), _noise(), None, order=3, eta=0.0, lower_order_final=lower)
        assert _error(traj, ref) < TOL, lower


@pytest.mark.parametrize("field,where", [("coef_x", (5,)), ("coef_hist", (5, 0)), ("coef_hist", (5, 1)),
                                         ("coef_hist", (5, 2)), ("coef_noise", (5,))])
def test_a_perturbed_coefficient_is_caught(field, where):
    """Scaling one coefficient of one step by 1 + 1e-3 moves the trajectory well past TOL: the
    comparison above can fail."""
    sampler = _fast("dpmpp_3m_sde", 12)
    coefs = sampler.plan.plan
    bad = coefs.replace(**{field: getattr(coefs, field).at[where].multiply(1.001)})
    bad = sampler._replace(plan=sampler.plan._replace(plan=bad))
    ref = _reference(_karras_sigmas(12), _noise(), _step_noises(12), order=3, eta=1.0)
    _, traj = sampling.sample(bad, MODEL, _noise(), KEY, return_trajectory=True)
    assert _error(traj, ref) > 10 * TOL
