"""Closed-form truth for Gaussian data: the exact denoiser and the exact probability-flow solution.

Data x0 ~ N(mu, diag(sd^2)). At level abar, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is Gaussian
and the posterior mean (the ideal denoiser, Tweedie's formula) is

    E[x0 | x_t] = mu + sqrt(abar) sd^2 / (abar sd^2 + 1 - abar) (x_t - sqrt(abar) mu),

so a "network" returning the exact prediction (eps, x0 or v) can be written down, and the
probability-flow ODE (Song et al. 2021, eq. 13) maps x at level a_T to level a_0 by the affine map

    (x_T - sqrt(a_T) mu) / sqrt(a_T sd^2 + 1 - a_T) * sqrt(a_0 sd^2 + 1 - a_0) + sqrt(a_0) mu

(each coordinate stays at the same quantile of its marginal). Used by the tests of the samplers
(`tests/test_sampling_gaussian.py`) and by `experiments/plot_sampler_convergence.py`.

    model_fn = analytic.exact_model(mu, sd, schedule)                 # eps-prediction
    err, nfe = analytic.pf_ode_error("heun", schedule, 16, mu, sd)     # rms error at t = 499

Flow matching has its own closed forms below (`flow_velocity`, `exact_flow_model`, `flow_map`,
`flow_ode_error`): the velocity E[eps - x0 | x_sigma] is affine in x, and so is the flow map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parameterization, samplers, sampling, schedules

# Samplers that integrate x_t / sqrt(abar) (the "sigma-space" ones): their latent is rescaled.
SIGMA_SPACE = ("euler", "euler_ancestral", "heun", "edm", "lms")


def posterior_mean(mu, sd, alpha_bar, x):
    """E[x0 | x_t = x] for N(mu, sd^2) data. mu, sd: [D]; alpha_bar: broadcastable to x [B, D]."""
    return mu + jnp.sqrt(alpha_bar) * sd ** 2 / (alpha_bar * sd ** 2 + 1 - alpha_bar) * (x - jnp.sqrt(alpha_bar) * mu)


def exact_prediction(mu, sd, alpha_bar, x, prediction_type: str = "epsilon"):
    """The exact `prediction_type` output at x [B, D] for level alpha_bar ([B, 1] or scalar)."""
    x0 = posterior_mean(mu, sd, alpha_bar, x)
    a, s = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
    eps = (x - a * x0) / s
    return parameterization.target_coefs(parameterization.check_prediction_type(prediction_type), x0, eps, a, s)


def _exact_eps(mu, sd, alphas_cumprod, x, t):
    """x: [B, D], t: [B] (integer-valued float: a training timestep)."""
    return exact_prediction(mu, sd, alphas_cumprod[t.astype(jnp.int32)][:, None], x, "epsilon")


def _exact_x0(mu, sd, alphas_cumprod, x, t):
    return exact_prediction(mu, sd, alphas_cumprod[t.astype(jnp.int32)][:, None], x, "sample")


def _exact_v(mu, sd, alphas_cumprod, x, t):
    return exact_prediction(mu, sd, alphas_cumprod[t.astype(jnp.int32)][:, None], x, "v_prediction")


_MODEL_FNS = {"epsilon": _exact_eps, "sample": _exact_x0, "v_prediction": _exact_v}


def exact_model(mu, sd, schedule, prediction_type: str = "epsilon") -> jax.tree_util.Partial:
    """model_fn(x [B, D], t [B]) -> the exact `prediction_type` prediction for N(mu, sd^2) data under
    a discrete `schedule` (t must be an integer training timestep). mu, sd: [D]; held as traced
    leaves (float32), so new values reuse the compiled sampling loop."""
    fn = _MODEL_FNS[parameterization.check_prediction_type(prediction_type)]
    return jax.tree_util.Partial(fn, jnp.asarray(mu, jnp.float32), jnp.asarray(sd, jnp.float32),
                                 jnp.asarray(schedule.alphas_cumprod, jnp.float32))


def pf_ode_map(x_T, a_T, a_0, mu, sd):
    """The exact probability-flow ODE solution at level a_0 from x_T [B, D] at level a_T (float64)."""
    mu, sd = np.asarray(mu, np.float64), np.asarray(sd, np.float64)
    return (np.asarray(x_T, np.float64) - np.sqrt(a_T) * mu) / np.sqrt(a_T * sd ** 2 + 1 - a_T) \
        * np.sqrt(a_0 * sd ** 2 + 1 - a_0) + np.sqrt(a_0) * mu


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def landing_call(name: str, options: dict, level: int) -> int:
    """Index of the model call whose output is the finished sample at plan level `level` (>= 1)
    of sampler `name` (see the call counts in `jaxdiff.samplers`)."""
    if name in ("heun", "edm"):
        return 2 * level - 1                            # predictor + corrector per step
    if name == "pndm":
        if options.get("skip_prk_steps"):
            return level                                # the first step takes two calls
        return 4 * level - 1 if level <= 3 else level + 8       # three 4-call Runge-Kutta steps
    return level - 1


def pf_ode_error(name: str, schedule, num_steps: int, mu, sd, target: int = 499, *, batch: int = 64,
                 seed: int = 0, **options) -> tuple[float, int]:
    """(rms error, model calls spent) of the deterministic sampler `name` with `num_steps`
    ("trailing" spacing) against the exact flow from t = 999 to t = `target`, on `batch` draws of
    N(mu, sd^2) data driven by the exact eps-prediction.

    `target` must be a level the run lands on (num_steps * (999 - target) / 1000 whole steps; for
    DDIM, which steps by T // num_steps, num_steps must also divide T); ValueError otherwise.
    Measuring at an intermediate level, not at t = 0, keeps the last step onto sigma = 0 (first
    order in every sampler, and a step of unbounded length in log-SNR) out of the comparison, so
    the error reflects the solver on a fixed interval.
    """
    d = np.shape(mu)[0]
    sampler = samplers.get(name, schedule, num_steps, timestep_spacing="trailing", **options)
    state = sampler.init(jnp.zeros((1, d)))
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (batch, d)))
    _, traj = sampling.sample(sampler, exact_model(mu, sd, schedule), noise, jax.random.PRNGKey(seed + 1),
                              return_trajectory=True)
    k = landing_call(name, options, num_steps * (999 - target) // 1000)
    if float(state.timesteps[k + 1]) != target:         # the next call must start from that level
        raise ValueError(f"{name} with {num_steps} steps does not land on t = {target} "
                         f"(call {k + 1} starts at t = {float(state.timesteps[k + 1])})")
    ac = schedules.alphas_cumprod_float64(schedule)
    landed = getattr(state.plan, "sqrt_alpha_bar_prev", None)   # DDIM steps to t - T // num_steps,
    if landed is not None:                                       # which must be the next planned level
        planned = np.append(np.asarray(state.plan.sqrt_alpha_bar)[1:k + 2], np.sqrt(ac[target]))[:k + 1]
        if not np.allclose(np.asarray(landed)[:k + 1], planned, rtol=1e-6, atol=0.0):
            raise ValueError(f"{name} with {num_steps} steps does not step between its planned levels "
                             f"(it steps by T // num_steps; choose num_steps dividing T)")
    scale = np.sqrt(ac[999]) if name in SIGMA_SPACE else 1.0
    exact = pf_ode_map(noise * float(state.init_sigma) * scale, ac[999], ac[target], mu, sd)
    x = np.asarray(traj[k], np.float64) * (np.sqrt(ac[target]) if name in SIGMA_SPACE else 1.0)
    return rms(x, exact), k + 1


# --------------------------------------------------------------------------------------------
# Flow matching: x_sigma = (1 - sigma) x0 + sigma eps, the network returns v = eps - x0.
# --------------------------------------------------------------------------------------------
#
# x_sigma is Gaussian with mean (1 - sigma) mu and variance var = (1 - sigma)^2 sd^2 + sigma^2, and
#
#     E[x0 | x]  = mu + (1 - sigma) sd^2 / var (x - (1 - sigma) mu),
#     E[eps | x] = sigma / var (x - (1 - sigma) mu),
#
# so the exact velocity v(x, sigma) = E[eps - x0 | x] is affine in x, and the flow ODE
# dx / dsigma = v keeps each coordinate at its quantile: from level sigma_T to sigma_0
#
#     x_0 = (x_T - (1 - sigma_T) mu) / sqrt(var(sigma_T)) * sqrt(var(sigma_0)) + (1 - sigma_0) mu.

FLOW_SAMPLERS = ("flow_euler", "flow_heun", "dpmpp_2m", "unipc")


def flow_velocity(mu, sd, sigma, x):
    """The exact velocity E[eps - x0 | x_sigma = x] for N(mu, sd^2) data. mu, sd: [D]; sigma:
    broadcastable to x [B, D]."""
    a = 1.0 - sigma
    var = a ** 2 * sd ** 2 + sigma ** 2
    centred = x - a * mu
    return sigma / var * centred - (mu + a * sd ** 2 / var * centred)


def _exact_flow_v(mu, sd, num_train_timesteps, x, t):
    """x: [B, D], t: [B] = sigma T (the flow models' timestep)."""
    return flow_velocity(mu, sd, (t / num_train_timesteps)[:, None], x)


def exact_flow_model(mu, sd, num_train_timesteps: int) -> jax.tree_util.Partial:
    """model_fn(x [B, D], t [B]) -> the exact velocity for N(mu, sd^2) data, reading sigma = t / T
    (the flow-model convention). With T a power of two, t / T is exact in float32; samplers that
    hand the network floor(sigma T) (DPM-Solver++ / UniPC on flow sigmas, as the reference) then
    see sigma to within 1 / T."""
    return jax.tree_util.Partial(_exact_flow_v, jnp.asarray(mu, jnp.float32), jnp.asarray(sd, jnp.float32),
                                 jnp.asarray(num_train_timesteps, jnp.float32))


def flow_map(x_T, sigma_T, sigma_0, mu, sd):
    """The exact flow-ODE solution at level sigma_0 from x_T [B, D] at level sigma_T (float64)."""
    mu, sd = np.asarray(mu, np.float64), np.asarray(sd, np.float64)

    def std(s):
        return np.sqrt((1.0 - s) ** 2 * sd ** 2 + s ** 2)

    return (np.asarray(x_T, np.float64) - (1.0 - sigma_T) * mu) / std(sigma_T) * std(sigma_0) + (1.0 - sigma_0) * mu


def flow_landings(name: str, state) -> tuple[float, np.ndarray]:
    """(start level, level reached after each call [N] (nan where a call's output is provisional,
    a Heun predictor)) of a flow sampler's plan."""
    p = state.plan
    if name == "flow_euler":
        return float(p.sigma[0]), np.asarray(p.sigma_next, np.float64)
    if name == "flow_heun":
        return float(p.sigma_from[0]), np.where(np.asarray(p.correct) > 0, np.asarray(p.sigma_to, np.float64), np.nan)
    s = np.asarray(p.s, np.float64)                    # dpmpp_2m / unipc on flow levels: sigma of each call
    return float(s[0]), np.append(s[1:], 0.0)


def flow_ode_error(name: str, schedule, num_steps: int, mu, sd, target_sigma: float = 0.5, *, batch: int = 64,
                   seed: int = 0, **options) -> tuple[float, int, float]:
    """(rms error, model calls spent, level) of flow sampler `name` with `num_steps` against the exact
    flow ODE, at the first level the run reaches at or below `target_sigma` (an intermediate level,
    as `pf_ode_error`: the multistep solvers' last step onto sigma = 0 is first order), driven by
    the exact velocity of N(mu, sd^2) data from x = noise at the plan's first level."""
    d = np.shape(mu)[0]
    sampler = samplers.get(name, schedule, num_steps, **options)
    state = sampler.init(jnp.zeros((1, d)))
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (batch, d)))
    _, traj = sampling.sample(sampler, exact_flow_model(mu, sd, schedule.num_train_timesteps), noise,
                              jax.random.PRNGKey(seed + 1), return_trajectory=True)
    start, landed = flow_landings(name, state)
    k = int(np.flatnonzero(landed <= target_sigma)[0])
    exact = flow_map(noise, start, landed[k], mu, sd)
    return rms(traj[k], exact), k + 1, float(landed[k])
