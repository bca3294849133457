"""The sampling driver against a plain Python loop written from the sampler contract (the loop in
`samplers/base.py`'s docstring): text-to-image, img2img from a late start, padded plans, DDIM
inversion, trajectories, progress reports, the lowered program, and the argument checks. A
closed-form model and 3-5 step plans: seconds for the file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules

SCHED = schedules.discrete("scaled_linear", 1000, 0.00085, 0.012)
SHAPE = (2, 3, 3, 1)
KEY = jax.random.PRNGKey(1)


def _model(x, t):
    """A smooth stand-in for a network: depends on both x and the timestep."""
    return 0.3 * jnp.tanh(x) + 1e-3 * t[:, None, None, None] * jnp.cos(x)


MODEL = jax.tree_util.Partial(_model)


def _noise(seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), SHAPE, jnp.float32)


def _reference(sampler, noise, key, x0=None):
    """The contract, step by step on the host: (result, [x after each planned call])."""
    state = sampler.init(noise)
    x = state.init_sigma * noise
    if x0 is not None:
        i = int(state.index)
        x = state.signal_scales[i] * x0 + state.noise_scales[i] * noise
    trajectory = []
    for _ in range(int(state.timesteps.shape[0])):
        if int(state.index) < int(state.num_calls):
            t, scale = samplers.base.next_call(state)
            out = _model(scale * x, jnp.full((noise.shape[0],), t, jnp.float32))
            x, state = sampler.step(state, x, out, key)
        trajectory.append(x)
    return x, jnp.stack(trajectory)


@pytest.mark.parametrize("name,opts", [("ddim", {"eta": 0.5}), ("euler_ancestral", {}), ("heun", {})])
def test_sample_is_the_contract_loop(name, opts):
    sampler = samplers.get(name, SCHED, 4, **opts)
    x, traj = sampling.sample(sampler, MODEL, _noise(), KEY, return_trajectory=True)
    ref, ref_traj = _reference(sampler, _noise(), KEY)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(traj, ref_traj, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(traj[-1], x)
    assert x.dtype == jnp.float32 and traj.shape == (samplers.base.num_model_calls(sampler.plan),) + SHAPE
    # The key matters for a stochastic sampler, and the default key is PRNGKey(0).
    np.testing.assert_allclose(sampling.sample(sampler, MODEL, _noise(), None),
                               _reference(sampler, _noise(), jax.random.PRNGKey(0))[0], rtol=1e-5, atol=1e-6)


def test_img2img_late_start_and_padding_follow_the_contract():
    x0 = 0.5 * jnp.ones(SHAPE)
    sampler = samplers.get("ddim", SCHED, 5, max_steps=8, start_step=2)
    x, traj = sampling.sample(sampler, MODEL, _noise(), KEY, x0=x0, return_trajectory=True)
    ref, ref_traj = _reference(sampler, _noise(), KEY, x0=x0)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(traj, ref_traj, rtol=1e-5, atol=1e-6)
    # Without x0 the same plan starts from init_sigma * noise at the late index.
    np.testing.assert_allclose(sampling.sample(sampler, MODEL, _noise(), KEY),
                               _reference(sampler, _noise(), KEY)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(x, sampling.sample(sampler, MODEL, _noise(), KEY))


def test_a_dtype_other_than_float32_is_integrated_in_float32():
    sampler = samplers.get("ddim", SCHED, 3)
    bf = sampling.sample(sampler, lambda x, t: _model(x, t).astype(jnp.bfloat16), _noise().astype(jnp.bfloat16), KEY)
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(bf, _reference(sampler, _noise(), KEY)[0], atol=5e-2)


def test_invert_runs_the_inverse_plan_from_the_data():
    inverse = samplers.get("ddim_inverse", SCHED, 4)
    data = 0.5 * _noise(3)
    z, traj = sampling.invert(inverse, MODEL, data, return_trajectory=True)
    ref, ref_traj = _reference(inverse, data, jax.random.PRNGKey(0))
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(traj, ref_traj, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sampling.invert(inverse, MODEL, data), z, rtol=1e-6)
    assert not np.allclose(z, data)


def test_progress_reports_each_call_of_this_run():
    seen = []
    sampler = samplers.get("ddim", SCHED, 5, max_steps=7, start_step=1)
    x = sampling.sample(sampler, MODEL, _noise(), KEY, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    np.testing.assert_allclose(x, sampling.sample(sampler, MODEL, _noise(), KEY), rtol=1e-6)
    # Nested listeners: the innermost one hears, and it is removed afterwards.
    outer = []
    with sampling._listening(lambda d, t: outer.append(d)):
        sampling.sample(sampler, MODEL, _noise(), KEY, progress=lambda d, t: None)
        sampling._report(3, 4)
    assert outer == [3] and sampling._LISTENERS == []
    sampling._report(1, 1)                                           # no listener: nothing happens


def test_lowered_program_is_the_one_sample_runs():
    sampler = samplers.get("euler", SCHED, 3)
    lowered = sampling.lower(sampler, MODEL, _noise(), KEY, return_trajectory=True)
    x, traj = lowered.compile()(sampler, MODEL, _noise(), KEY, jnp.zeros(SHAPE), jnp.asarray(False))
    np.testing.assert_allclose(x, sampling.sample(sampler, MODEL, _noise(), KEY), rtol=1e-6)
    assert traj.shape == (3,) + SHAPE


def test_argument_checks():
    sampler = samplers.get("ddim", SCHED, 3)
    with pytest.raises(ValueError, match=r"x0 has shape \(1, 3, 3, 1\) but noise has shape \(2, 3, 3, 1\)"):
        sampling.sample(sampler, MODEL, _noise(), KEY, x0=jnp.zeros((1, 3, 3, 1)))
    with pytest.raises(ValueError, match="model_fn must be callable .* got int"):
        sampling.sample(sampler, 3, _noise(), KEY)
    no_levels = sampler._replace(plan=sampler.plan._replace(signal_scales=None, noise_scales=None))
    with pytest.raises(ValueError, match="cannot start from an image x0"):
        sampling.sample(no_levels, MODEL, _noise(), KEY, x0=jnp.zeros(SHAPE))
    sampling.sample(no_levels, MODEL, _noise(), KEY)                 # fine without an image
    partial = jax.tree_util.Partial(_model)
    assert sampling._as_partial(partial) is partial


def test_guidance_rescale_leaves_a_flat_prediction_alone():
    guided = jnp.stack([jnp.full((2, 2, 1), 3.0), jnp.arange(4.0).reshape(2, 2, 1)])   # example 0: std 0
    cond = jnp.stack([jnp.arange(4.0).reshape(2, 2, 1), 2 * jnp.arange(4.0).reshape(2, 2, 1)])
    out = np.asarray(sampling.rescale_guidance(guided, cond, 0.7))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0], np.asarray(guided[0]))
    np.testing.assert_allclose(out[1], 0.7 * 2 * np.asarray(guided[1]) + 0.3 * np.asarray(guided[1]), rtol=1e-6)


def test_lower_checks_its_arguments_like_sample():
    sampler = samplers.get("ddim", SCHED, 3)
    with pytest.raises(ValueError, match="x0 has shape"):
        sampling.lower(sampler, MODEL, _noise(), KEY, x0=jnp.zeros((1, 3, 3, 1)))


def test_guidance_scales_of_any_number_type_share_one_trace():
    """Scales are float32 leaves whatever the caller passes (int, float, array), so a new kind of
    number never retraces the loop."""
    traces = []

    def net(x, t, cond):
        traces.append(1)
        return 0.1 * x * cond[:, None, None, None] + 1e-4 * t[:, None, None, None]

    sampler = samplers.get("ddim", SCHED, 3)
    cond, uncond = jnp.asarray([1.0, 2.0]), jnp.zeros((1,))
    outs = [sampling.sample(sampler, sampling.cfg(net, w, cond, uncond, guidance_rescale=r), _noise(), KEY)
            for w, r in ((7, 0), (2.5, 0.5), (jnp.float32(3.0), jnp.asarray(1.0)))]
    assert len(traces) == 1
    for leaf in jax.tree.leaves(sampling.cfg(net, 7, cond, uncond, guidance_rescale=0))[-2:]:
        assert leaf.dtype == jnp.float32 and not leaf.weak_type
    assert not np.allclose(outs[0], outs[1])
