"""The shared sampler math and contract of `samplers/base.py`, each piece against its closed form:
the forward-process posterior (two identities it must satisfy), timestep plans (diffusers'
`set_timesteps`), levels, padding, state construction, history buffers, x0 clipping and dynamic
thresholding (by hand, per example), and the option checks. Host arithmetic and tiny arrays: the
whole file runs in a few seconds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.samplers import base

AB = np.array([0.999, 0.9, 0.5, 0.1, 0.01])


def test_posterior_matches_the_gaussian_identities():
    """With x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, a draw from q(x_t' | x_t, x0) is
    coef_x0 x0 + coef_xt x_t + sqrt(var) z; it must have the marginal of level t':
    signal coef_x0 + coef_xt sqrt(abar_t) = sqrt(abar_t') and noise variance
    coef_xt^2 (1 - abar_t) + var = 1 - abar_t'."""
    ab_t, ab_prev = AB[1:], AB[:-1]                      # abar_t < abar_t' (t' the less noisy level)
    coef_x0, coef_xt, var, beta = base.posterior(ab_t, ab_prev)
    np.testing.assert_allclose(beta, 1 - ab_t / ab_prev, rtol=1e-12)
    np.testing.assert_allclose(coef_x0 + coef_xt * np.sqrt(ab_t), np.sqrt(ab_prev), rtol=1e-12)
    np.testing.assert_allclose(coef_xt ** 2 * (1 - ab_t) + var, 1 - ab_prev, rtol=1e-12)
    # One value by hand: abar_t = 0.5, abar_t' = 0.9 -> beta = 4/9.
    c0, ct, v, b = base.posterior(0.5, 0.9)
    assert b == pytest.approx(4 / 9)
    assert c0 == pytest.approx(0.9 ** 0.5 * (4 / 9) / 0.5)
    assert ct == pytest.approx((5 / 9) ** 0.5 * 0.1 / 0.5)
    assert v == pytest.approx(0.1 / 0.5 * 4 / 9)


@pytest.mark.parametrize("spacing", base.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("num_steps,offset", [(10, 0), (7, 1), (1, 0), (1000, 0)])
def test_plan_timesteps_match_diffusers(spacing, num_steps, offset):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(num_steps)
    ours = base.plan_timesteps(1000, num_steps, spacing, steps_offset=offset)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_plan_timesteps_refuses_what_it_cannot_plan():
    with pytest.raises(ValueError, match="steps_offset=1 pushes the first timestep to 1000"):
        base.plan_timesteps(1000, 1000, "leading", steps_offset=1)
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
        base.plan_timesteps(1000, 1001, "leading")
    with pytest.raises(ValueError, match="num_steps"):
        base.plan_timesteps(1000, 0, "trailing")
    with pytest.raises(ValueError, match="num_steps"):
        base.plan_timesteps(1000, 2.5, "linspace")
    with pytest.raises(ValueError, match="timestep_spacing='middle' is not valid; choose one of: leading"):
        base.plan_timesteps(1000, 10, "middle")


def test_alpha_bar_at_uses_before_first_for_the_clean_end():
    ac = np.array([0.9, 0.8, 0.7])
    np.testing.assert_array_equal(base.alpha_bar_at(ac, np.array([2, 0, -1]), 1.0), [0.7, 0.9, 1.0])
    np.testing.assert_array_equal(base.alpha_bar_at(ac, np.array([-1]), 0.95), [0.95])


def test_levels():
    signal, noise = base.vp_levels(np.sqrt([0.25, 1.0, 1.0 + 1e-12]))
    np.testing.assert_allclose(signal, [0.5, 1.0, np.sqrt(1 + 1e-12)])
    np.testing.assert_allclose(noise, [np.sqrt(0.75), 0.0, 0.0])       # never the root of a negative
    assert signal.dtype == noise.dtype == np.float64
    ones, sigmas = base.ve_levels([0.5, 3.0])
    np.testing.assert_array_equal(ones, [1.0, 1.0])
    np.testing.assert_array_equal(sigmas, [0.5, 3.0])


def _state(n=4, **kw):
    ts = np.arange(n, 0, -1) * 100.0
    plan = {"a": np.arange(n, dtype=np.float32), "b": np.ones((n, 2), np.float32) * np.arange(n)[:, None]}
    return base.new_state(ts, plan, **kw)


def test_new_state():
    s = _state(init_sigma=3.0)
    assert s.index.dtype == jnp.int32 and int(s.index) == 0 and int(s.num_calls) == 4
    assert s.timesteps.dtype == jnp.float32 and s.init_sigma.dtype == jnp.float32
    np.testing.assert_array_equal(s.input_scales, np.ones(4))
    assert float(s.init_sigma) == 3.0 and s.signal_scales is None and s.noise_scales is None
    levels = (np.array([0.1, 0.2, 0.3, 0.4]), np.array([4.0, 3.0, 2.0, 1.0]))
    late = _state(init_sigma=9.0, input_scales=np.full(4, 0.5), levels=levels, start_call=2)
    assert int(late.index) == 2 and float(late.init_sigma) == 2.0       # the noise scale at the start
    np.testing.assert_array_equal(late.input_scales, np.full(4, 0.5))
    np.testing.assert_allclose(late.signal_scales, levels[0])
    np.testing.assert_allclose(late.noise_scales, levels[1])
    assert float(_state(init_sigma=9.0, levels=levels).init_sigma) == 9.0
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=f"start call {bad} lies outside the plan's 4 model calls"):
            _state(start_call=bad)


def test_next_call_current_and_step_key():
    s = _state(input_scales=np.array([1.0, 0.5, 0.25, 0.125]))._replace(index=jnp.asarray(2, jnp.int32))
    t, scale = base.next_call(s)
    assert float(t) == 200.0 and float(scale) == 0.25
    entry = base.current(s.plan, s.index)
    assert float(entry["a"]) == 2.0
    np.testing.assert_array_equal(entry["b"], [2.0, 2.0])
    key = jax.random.PRNGKey(5)
    np.testing.assert_array_equal(base.step_key(key, s), jax.random.fold_in(key, 2))
    assert base.num_model_calls(s) == 4


def test_pad_repeats_the_last_call_and_keeps_the_real_count():
    levels = (np.array([0.1, 0.2, 0.3, 0.4]), np.array([4.0, 3.0, 2.0, 1.0]))
    s = _state(levels=levels)
    p = base.pad(s, 7)
    assert base.num_model_calls(p) == 7 and int(p.num_calls) == 4
    np.testing.assert_array_equal(p.timesteps, [400, 300, 200, 100, 100, 100, 100])
    np.testing.assert_array_equal(p.plan["a"], [0, 1, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(p.plan["b"][4:], np.full((3, 2), 3.0))
    np.testing.assert_array_equal(p.noise_scales, [4, 3, 2, 1, 1, 1, 1])
    np.testing.assert_allclose(p.signal_scales, [0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4])
    np.testing.assert_array_equal(p.input_scales, np.ones(7))
    same = base.pad(s, 4)
    np.testing.assert_array_equal(same.timesteps, s.timesteps)
    with pytest.raises(ValueError, match="cannot pad a plan of 4 model calls to 3"):
        base.pad(s, 3)


def test_history_buffers():
    s = base.new_state(np.arange(3.0), (), memory=jnp.zeros((3,)))
    noise = jnp.ones((2, 5))
    h = base.history_init(s, noise).memory
    assert h.shape == (3, 2, 5) and h.dtype == jnp.float32 and not np.any(h)
    for i in (1.0, 2.0, 3.0, 4.0):
        h = base.push_history(h, jnp.full((2, 5), i))
    np.testing.assert_array_equal(h[:, 0, 0], [4.0, 3.0, 2.0])          # newest first, oldest dropped
    np.testing.assert_allclose(base.combine(jnp.asarray([1.0, 0.5, -2.0]), h), np.full((2, 5), 4 + 1.5 - 4.0))
    assert base.constant_init(s, noise) is s


def _options(**kw):
    opts = {"prediction_type": "epsilon", "clip_sample": False, "clip_sample_range": 1.0, "thresholding": False,
            "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
    opts.update(kw)
    return base.denoise_options(**opts)


def test_denoise_clips_x0_only_and_thresholding_takes_precedence():
    x = jnp.asarray([[3.0, -0.2, 0.1, 2.0]])
    eps = jnp.asarray([[0.5, 0.5, -0.5, 0.0]])
    a, s = jnp.float32(0.6), jnp.float32(0.8)
    x0_raw = (x - s * eps) / a
    x0, e = base.denoise(eps, x, a, s, _options())
    np.testing.assert_allclose(x0, x0_raw, rtol=1e-6)
    x0, e = base.denoise(eps, x, a, s, _options(clip_sample=True, clip_sample_range=1.5))
    np.testing.assert_allclose(x0, np.clip(x0_raw, -1.5, 1.5), rtol=1e-6)
    np.testing.assert_allclose(e, eps)                                   # eps is never clipped
    x0, _ = base.denoise(eps, x, a, s, _options(clip_sample=True, clip_sample_range=1.5, thresholding=True,
                                                dynamic_thresholding_ratio=0.5, sample_max_value=10.0))
    np.testing.assert_allclose(x0, base.dynamic_threshold(x0_raw, 0.5, 10.0), rtol=1e-6)
    opts = _options(clip_sample=True, clip_sample_range=2.0)
    assert float(opts.clip_range) == 2.0 and float(_options(clip_sample_range=2.0).clip_range) == np.inf
    assert opts.prediction_type == "epsilon" and opts.thresholding is False


def test_dynamic_threshold_by_hand():
    x0 = jnp.asarray(np.array([[[4.0, -2.0], [0.5, 1.0]], [[0.1, -0.2], [0.3, 0.4]]]))  # [B=2, 2, 2]
    out = np.asarray(base.dynamic_threshold(x0, 0.5, 3.0))
    for b in range(2):
        flat = np.abs(np.asarray(x0[b]).ravel())
        s = np.clip(np.quantile(flat, 0.5), 1.0, 3.0)                    # example 0: 1.5; example 1: 1
        np.testing.assert_allclose(out[b], np.clip(np.asarray(x0[b]), -s, s) / s, rtol=1e-6)
    assert out[0, 0, 0] == pytest.approx(1.0) and out[0, 1, 0] == pytest.approx(0.5 / 1.5)
    capped = np.asarray(base.dynamic_threshold(x0 * 10, 0.99, 3.0))     # s capped at max_value
    np.testing.assert_allclose(capped[0], np.clip(np.asarray(x0[0]) * 10, -3, 3) / 3, rtol=1e-6)


def test_option_checks():
    with pytest.raises(ValueError, match=r"clip_sample_range must lie in \[0.0, inf\], got -1.0"):
        _options(clip_sample_range=-1.0)
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        _options(dynamic_thresholding_ratio=1.5)
    with pytest.raises(ValueError, match="sample_max_value"):
        _options(sample_max_value=0.5)
    with pytest.raises(ValueError, match="prediction_type='eps' is not valid"):
        _options(prediction_type="eps")
    with pytest.raises(ValueError, match="clip_sample"):
        _options(clip_sample="yes")
    _options(clip_sample_range=0.0, dynamic_thresholding_ratio=1.0, sample_max_value=1.0)   # bounds are inclusive
    jax.jit(lambda v: base.check_range("eta", v, 0.0, 1.0) or v)(2.0)    # a traced value is not checked
    assert base.check_start_step(3, 4) == 3 and isinstance(base.check_start_step(2.0, 4), int)
    for bad in (4, -1, 1.5):
        with pytest.raises(ValueError, match=r"start_step must be an integer in \[0, num_steps=4\)"):
            base.check_start_step(bad, 4)
    base.check_num_steps(1, 10)
    base.check_num_steps(10, 10)
    assert base.one_call_per_step(7, eta=0.5) == 7
