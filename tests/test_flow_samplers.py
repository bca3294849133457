"""Flow-matching samplers against diffusers' schedulers, whole trajectories.

flow_euler / flow_heun against `FlowMatchEulerDiscreteScheduler` / `FlowMatchHeunDiscreteScheduler`,
and dpmpp_2m / unipc on a FlowSchedule against `DPMSolverMultistepScheduler` /
`UniPCMultistepScheduler` with use_flow_sigmas=True, flow_shift and prediction_type
"flow_prediction". The reference runs its own loop on float64 torch latents; the "network" is a
fixed velocity field that depends on x and t (a linear map plus a t-dependent term), so every
step's update and every timestep handed to the network must match. Every x_i of the trajectory is
compared, norm-relative to 1e-5, and the timesteps to float32 rounding.

The samplers run padded to a fixed plan length (`max_steps`), so each family compiles once; a
separate test checks that the padding changes nothing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

T = 1000
SHAPE = (2, 12)
KEY = jax.random.PRNGKey(3)
TOL = 1e-5
MAX_STEPS = 12
W = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (SHAPE[1], SHAPE[1]))) * 0.25 / np.sqrt(SHAPE[1])
C = np.asarray(jax.random.normal(jax.random.PRNGKey(8), (SHAPE[1],)))


def _velocity(x, t):
    """The network: v = -0.7 x + x W + (t / T) c + 0.2 sin(t / 150). x: [B, D]; t: [B]."""
    t = t[:, None]
    return -0.7 * x + x @ W + (t / T) * C + 0.2 * jnp.sin(t / 150.0)


MODEL = jax.tree_util.Partial(_velocity)


def _velocity_torch(x, t):
    w, c = torch.from_numpy(W.astype(np.float64)), torch.from_numpy(C.astype(np.float64))
    t = float(t)
    return -0.7 * x + x @ w + (t / T) * c + 0.2 * np.sin(t / 150.0)


def _noise():
    return np.asarray(jax.random.normal(jax.random.PRNGKey(5), SHAPE, jnp.float32))


def _reference(scheduler, num_steps, noise, **set_kwargs):
    """(timesteps the network saw [n], x after every call [n, B, D]) of the diffusers loop."""
    scheduler.set_timesteps(num_steps, **set_kwargs)
    x = torch.from_numpy(noise.astype(np.float64))
    ts, traj = [], []
    for t in scheduler.timesteps:
        v = _velocity_torch(x, t)
        x = scheduler.step(v, t, x).prev_sample.to(torch.float64)
        ts.append(float(t))
        traj.append(x.numpy().copy())
    return np.array(ts), np.stack(traj)


def _ours(name, schedule, num_steps, noise, max_steps=MAX_STEPS, **opts):
    sampler = samplers.get(name, schedule, num_steps, max_steps=max_steps, **opts)
    n = int(sampler.plan.num_calls)
    _, traj = sampling.sample(sampler, MODEL, noise, KEY, return_trajectory=True)
    return np.asarray(sampler.plan.timesteps)[:n], np.asarray(traj)[:n]


def _assert_match(ours, ref):
    (ts, traj), (ref_ts, ref_traj) = ours, ref
    assert ts.shape == ref_ts.shape, (ts, ref_ts)
    np.testing.assert_allclose(ts, ref_ts, rtol=1e-6, atol=1e-4)
    err = np.abs(traj - ref_traj).reshape(len(ts), -1).max(axis=1)
    scale = np.abs(ref_traj).reshape(len(ts), -1).max(axis=1)
    assert np.all(err <= TOL * scale), (err / scale)


EULER_CASES = [
    # (schedule options, scheduler config, sampler options, set_timesteps kwargs, steps)
    ({"shift": 1.0}, {"shift": 1.0}, {}, {}, 4),
    ({"shift": 3.0}, {"shift": 3.0}, {}, {}, 9),
    ({"use_dynamic_shifting": True}, {"use_dynamic_shifting": True}, {"mu": 0.8}, {"mu": 0.8}, 7),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"},
     {"use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.3}, {"mu": 1.3}, 5),
    ({"shift": 3.0}, {"shift": 3.0, "use_karras_sigmas": True}, {"use_karras_sigmas": True}, {}, 8),
    ({"shift": 3.0}, {"shift": 3.0, "use_exponential_sigmas": True}, {"use_exponential_sigmas": True}, {}, 6),
    ({"shift": 3.0}, {"shift": 3.0, "use_beta_sigmas": True}, {"use_beta_sigmas": True}, {}, 6),
    ({"shift": 2.0}, {"shift": 2.0, "shift_terminal": 0.1}, {"shift_terminal": 0.1}, {}, 5),
    ({"shift": 3.0}, {"shift": 3.0}, {"sigmas": [1.0, 0.8, 0.5, 0.3, 0.1]},
     {"sigmas": [1.0, 0.8, 0.5, 0.3, 0.1]}, 5),
]


@pytest.mark.parametrize("case", range(len(EULER_CASES)))
def test_flow_euler_matches_diffusers(case):
    sched_opts, config, opts, set_kwargs, n = EULER_CASES[case]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, **config)
    noise = _noise()
    if "sigmas" in set_kwargs:
        ref = _reference(scheduler, None, noise, **set_kwargs)
    else:
        ref = _reference(scheduler, n, noise, **set_kwargs)
    _assert_match(_ours("flow_euler", schedules.flow(T, **sched_opts), n, noise, **opts), ref)


def test_flow_euler_invert_sigmas_matches_diffusers():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0, invert_sigmas=True)
    noise = _noise()
    ref = _reference(scheduler, 6, noise)
    _assert_match(_ours("flow_euler", schedules.flow(T, shift=3.0), 6, noise, invert_sigmas=True), ref)


@pytest.mark.parametrize("shift,n", [(1.0, 3), (3.0, 6)])
def test_flow_heun_matches_diffusers(shift, n):
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=T, shift=shift)
    noise = _noise()
    ours = _ours("flow_heun", schedules.flow(T, shift=shift), n, noise, max_steps=8)
    assert ours[0].shape == (2 * n - 1,)
    _assert_match(ours, _reference(scheduler, n, noise))


MULTISTEP_CASES = [(order, shift, n) for order in (1, 2, 3) for shift, n in [(1.0, 5), (3.0, 10)]]


@pytest.mark.parametrize("order,shift,n", MULTISTEP_CASES)
def test_dpmpp_flow_matches_diffusers(order, shift, n):
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, solver_order=order,
                                                      use_flow_sigmas=True, flow_shift=shift,
                                                      prediction_type="flow_prediction")
    noise = _noise()
    ours = _ours("dpmpp_2m", schedules.flow(T, shift=shift), n, noise, solver_order=order,
                 prediction_type="flow_prediction")
    _assert_match(ours, _reference(scheduler, n, noise))


@pytest.mark.parametrize("order,shift,n", MULTISTEP_CASES)
def test_unipc_flow_matches_diffusers(order, shift, n):
    scheduler = diffusers.UniPCMultistepScheduler(num_train_timesteps=T, solver_order=order, use_flow_sigmas=True,
                                                  flow_shift=shift, prediction_type="flow_prediction")
    noise = _noise()
    ours = _ours("unipc", schedules.flow(T, shift=shift), n, noise, solver_order=order,
                 prediction_type="flow_prediction")
    _assert_match(ours, _reference(scheduler, n, noise))


def test_multistep_flow_dynamic_shift_and_discrete_schedule_match_diffusers():
    """mu (dynamic shifting) for UniPC; use_flow_sigmas=True over a DiscreteSchedule for DPM-Solver++."""
    noise = _noise()
    scheduler = diffusers.UniPCMultistepScheduler(num_train_timesteps=T, use_flow_sigmas=True,
                                                  use_dynamic_shifting=True, prediction_type="flow_prediction")
    ours = _ours("unipc", schedules.flow(T, use_dynamic_shifting=True), 8, noise, mu=1.1,
                 prediction_type="flow_prediction")
    _assert_match(ours, _reference(scheduler, 8, noise, mu=1.1))
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, use_flow_sigmas=True, flow_shift=2.0,
                                                      prediction_type="flow_prediction")
    ours = _ours("dpmpp_2m", schedules.discrete("linear", T), 7, noise, use_flow_sigmas=True, flow_shift=2.0,
                 prediction_type="flow_prediction")
    _assert_match(ours, _reference(scheduler, 7, noise))


def test_dpmpp_flow_mu_matches_diffusers():
    """mu with dynamic shifting: the reference sets flow_shift = e^mu."""
    noise = _noise()
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, use_flow_sigmas=True,
                                                      use_dynamic_shifting=True, prediction_type="flow_prediction")
    ours = _ours("dpmpp_2m", schedules.flow(T, use_dynamic_shifting=True), 6, noise, mu=0.9,
                 prediction_type="flow_prediction")
    _assert_match(ours, _reference(scheduler, 6, noise, mu=0.9))


def test_flow_schedule_matches_the_reference_training_levels():
    for shift in (1.0, 3.0):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
        schedule = schedules.flow(T, shift=shift)
        np.testing.assert_allclose(np.asarray(schedule.sigmas)[::-1], scheduler.sigmas.numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(schedule.timesteps)[::-1], scheduler.timesteps.numpy(), rtol=1e-6)
    flux = schedules.flow(T, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    assert schedules.flow_mu(flux, 256) == pytest.approx(0.5) and schedules.flow_mu(flux, 4096) == pytest.approx(1.15)
    assert schedules.flow_mu(flux, 1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


def test_the_options_matter():
    """Parity above cannot be trivial: shift, spacing and order each change the trajectory."""
    noise = _noise()
    base_run = _ours("flow_euler", schedules.flow(T, shift=3.0), 6, noise)[1][-1]
    for other in [_ours("flow_euler", schedules.flow(T, shift=1.0), 6, noise)[1][-1],
                  _ours("flow_euler", schedules.flow(T, shift=3.0), 6, noise, use_karras_sigmas=True)[1][-1],
                  _ours("flow_heun", schedules.flow(T, shift=3.0), 6, noise, max_steps=8)[1][-1]]:
        assert np.abs(other - base_run).max() > 1e-3
    o1 = _ours("unipc", schedules.flow(T, shift=3.0), 10, noise, solver_order=1, prediction_type="flow_prediction")
    o2 = _ours("unipc", schedules.flow(T, shift=3.0), 10, noise, solver_order=2, prediction_type="flow_prediction")
    assert np.abs(o1[1][-1] - o2[1][-1]).max() > 1e-4


def test_padding_gives_the_same_result():
    noise = _noise()
    for name, opts in [("flow_euler", {}), ("flow_heun", {}), ("unipc", {"prediction_type": "flow_prediction"})]:
        schedule = schedules.flow(T, shift=3.0)
        plain = sampling.sample(samplers.get(name, schedule, 5, **opts), MODEL, noise, KEY)
        padded = sampling.sample(samplers.get(name, schedule, 5, max_steps=9, **opts), MODEL, noise, KEY)
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(padded))


def test_stochastic_flow_euler_is_seed_deterministic_and_differs():
    noise = _noise()
    schedule = schedules.flow(T, shift=3.0)
    sampler = samplers.get("flow_euler", schedule, 6, stochastic_sampling=True)
    a = np.asarray(sampling.sample(sampler, MODEL, noise, jax.random.PRNGKey(1)))
    b = np.asarray(sampling.sample(sampler, MODEL, noise, jax.random.PRNGKey(1)))
    c = np.asarray(sampling.sample(sampler, MODEL, noise, jax.random.PRNGKey(2)))
    d = np.asarray(sampling.sample(samplers.get("flow_euler", schedule, 6), MODEL, noise, jax.random.PRNGKey(1)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2 and np.abs(a - d).max() > 1e-2


def test_img2img_start_step_noises_on_the_flow_path():
    """start_step: the driver noises x0 to (1 - sigma_k) x0 + sigma_k eps, as the reference's scale_noise."""
    noise, x0 = _noise(), np.full(SHAPE, 0.5, np.float32)
    schedule = schedules.flow(T, shift=3.0)
    sampler = samplers.get("flow_euler", schedule, 8, start_step=3)
    sigma = float(sampler.plan.plan.sigma[3])
    _, traj = sampling.sample(sampler, MODEL, noise, KEY, x0=x0, return_trajectory=True)
    start = (1 - sigma) * x0 + sigma * noise
    full = samplers.get("flow_euler", schedule, 8)
    expected = start + (float(full.plan.plan.sigma_next[3]) - sigma) * np.asarray(
        _velocity(jnp.asarray(start), jnp.full((2,), float(full.plan.timesteps[3]))))
    np.testing.assert_allclose(np.asarray(traj[0]), expected, rtol=1e-5, atol=1e-6)     # the first call made


def test_clear_errors():
    schedule = schedules.flow(T, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu must be given"):
        samplers.get("flow_euler", schedule, 4)
    with pytest.raises(ValueError, match="only one of"):
        samplers.get("flow_euler", schedules.flow(), 4, use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="flow_prediction"):
        samplers.get("dpmpp_2m", schedules.discrete("linear"), 4, prediction_type="flow_prediction")
    with pytest.raises(TypeError, match="FlowSchedule"):
        samplers.get("flow_euler", schedules.cosine(), 4)


# --------------------------------------------------------------------------------------------
# Analytic truth: Gaussian data, exact velocity, exact (affine) flow map.
# --------------------------------------------------------------------------------------------

GAUSS_D = 6
GAUSS_MU = np.linspace(-1.0, 1.5, GAUSS_D)
GAUSS_SD = np.linspace(0.2, 0.9, GAUSS_D)
# T = 2^22: t / T is exact in float32, and DPM-Solver++ / UniPC (which hand the network floor(sigma T),
# as the reference) then see sigma to within 2.4e-7, below the errors measured here.
GAUSS_SCHEDULE = schedules.flow(2 ** 22, shift=3.0)
FLOW = {"prediction_type": "flow_prediction"}


def test_exact_flow_velocity_is_the_conditional_mean():
    """v(x, sigma) = E[eps - x0 | x_sigma = x], checked by regressing eps - x0 on x over many draws."""
    from jaxdiff import analytic
    rng = np.random.default_rng(0)
    sigma, n = 0.37, 400_000
    x0 = GAUSS_MU + GAUSS_SD * rng.standard_normal((n, GAUSS_D))
    eps = rng.standard_normal((n, GAUSS_D))
    x = (1 - sigma) * x0 + sigma * eps
    v = np.asarray(analytic.flow_velocity(GAUSS_MU, GAUSS_SD, sigma, x))
    residual = (eps - x0) - v                                   # uncorrelated with x, mean zero
    assert np.abs(residual.mean(0)).max() < 1e-2
    assert np.abs(((x - x.mean(0)) * residual).mean(0)).max() < 1e-2


@pytest.mark.parametrize("name,options,lo,hi", [
    ("flow_euler", {}, -1.35, -0.85),
    ("flow_heun", {}, -2.45, -1.8),
    ("dpmpp_2m", {"solver_order": 2, **FLOW}, -2.3, -1.8),
    ("unipc", {"solver_order": 2, **FLOW}, -3.6, -2.8),
    ("unipc", {"solver_order": 3, **FLOW}, -4.5, -3.4),
])
def test_flow_samplers_converge_at_their_order(name, options, lo, hi):
    """rms error against the exact flow map at the first level <= 0.5 the run reaches, for 16, 32, 64
    steps (padded to one program): log-log slope vs steps in [lo, hi] (Euler 1, Heun 2, DPM-Solver++(2M)
    2, UniPC-p p + 1: its corrector raises the order by one, as on VP schedules)."""
    from jaxdiff import analytic
    steps = np.array([16, 32, 64])
    rows = [analytic.flow_ode_error(name, GAUSS_SCHEDULE, int(n), GAUSS_MU, GAUSS_SD, max_steps=64, **options)
            for n in steps]
    errs = np.array([r[0] for r in rows])
    assert all(0.4 < r[2] <= 0.5 for r in rows), rows             # an intermediate level
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert lo < slope < hi, (slope, errs)
    assert errs[-1] < 5e-3, errs


def test_flow_scheduler_configs_convert():
    """A folder's FlowMatch scheduler config gives the flow schedule, sampler and options diffusers uses."""
    import warnings

    from jaxdiff.convert import scheduler as scheduler_convert
    diffusers = pytest.importorskip("diffusers")

    for cls, name in ((diffusers.FlowMatchEulerDiscreteScheduler, "flow_euler"),
                      (diffusers.FlowMatchHeunDiscreteScheduler, "flow_heun")):
        ref = cls(shift=3.0)
        config = dict(ref.config, _class_name=cls.__name__)
        schedule = scheduler_convert.schedule_from_config(config)
        assert isinstance(schedule, schedules.FlowSchedule)
        np.testing.assert_allclose(np.asarray(schedule.sigmas)[::-1], ref.sigmas.numpy()[:1000], rtol=1e-6)
        assert scheduler_convert.default_sampler(config) == name
        assert scheduler_convert.sampler_options(name, config)["shift"] == 3.0
    config = dict(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, use_beta_sigmas=True).config,
                  _class_name="FlowMatchEulerDiscreteScheduler")
    assert scheduler_convert.schedule_from_config(config).use_dynamic_shifting
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # flow_euler implements use_beta_sigmas: no warning
        scheduler_convert.warn_unsupported(config)
