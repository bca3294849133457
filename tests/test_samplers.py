"""DDPM / DDIM against diffusers' schedulers, the sampler registry, and the no-recompile contract.

Parity: the same smooth nonlinear model function is written in jnp (float32, ours) and torch
(float64, the reference, with its alphas_cumprod recomputed in float64 from its own float32
betas); whole trajectories must agree to 1e-5 in the norm-relative sense
max_i ||x_i - ref_i|| / ||ref_i||. Stochastic steps get the same noise on both sides: ours draws
z_i = normal(fold_in(key, i)) (the sampler contract), which is handed to the reference
(`variance_noise` for DDIM, the noise generator for DDPM).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules

try:  # the PyTorch reference: only the parity tests need it, the others run without it
    import diffusers
    import torch
    from diffusers.schedulers import scheduling_ddpm as ddpm_module
except ModuleNotFoundError:
    torch = diffusers = ddpm_module = None
needs_torch = pytest.mark.skipif(torch is None, reason="the PyTorch reference (torch, diffusers) is not installed")

SHAPE = (2, 4, 4, 3)
SCHED_CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
KEY = jax.random.PRNGKey(7)


def _model_jnp(x, t):
    """A fixed smooth nonlinear 'network': x [B, ...], t [B] float32."""
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.7 * jnp.tanh(1.1 * x + 0.5 * jnp.sin(t / 150.0)) + 0.2 * x * jnp.cos(t / 400.0) + 0.05 * t / 1000.0


def _model_torch(x, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return 0.7 * torch.tanh(1.1 * x + 0.5 * torch.sin(t / 150.0)) + 0.2 * x * torch.cos(t / 400.0) + 0.05 * t / 1000.0


MODEL = jax.tree_util.Partial(_model_jnp)


def _schedule():
    s = SCHED_CFG
    return schedules.discrete(s["beta_schedule"], s["num_train_timesteps"], s["beta_start"], s["beta_end"])


def _noise(seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), SHAPE, jnp.float32)


def _step_noises(n):
    """The z_i our stochastic steps draw: normal(fold_in(KEY, i)), as float64 torch tensors."""
    return [torch.from_numpy(np.asarray(jax.random.normal(jax.random.fold_in(KEY, i), SHAPE, jnp.float32),
                                        np.float64)) for i in range(n)]


def _float64(ref):
    """Recompute the reference's alphas_cumprod in float64 from its float32 betas."""
    ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), dim=0)
    return ref


def _rel_err(ours, ref):
    ours = np.asarray(ours, np.float64).reshape(len(ref), -1)
    ref = np.stack([r.numpy().reshape(-1) for r in ref])
    return float(np.max(np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)))


def _ddim_reference(num_steps, *, eta, set_alpha_to_one, use_clipped_model_output=False, **cfg):
    ref = _float64(diffusers.DDIMScheduler(**SCHED_CFG, set_alpha_to_one=set_alpha_to_one, **cfg))
    ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else ref.alphas_cumprod[0]
    ref.set_timesteps(num_steps)
    x = torch.from_numpy(np.asarray(_noise(), np.float64))
    zs = _step_noises(num_steps)
    traj = []
    for i, t in enumerate(ref.timesteps):
        out = ref.step(_model_torch(x, t), t, x, eta=eta, use_clipped_model_output=use_clipped_model_output,
                       variance_noise=zs[i] if eta > 0 else None)
        x = out.prev_sample
        traj.append(x)
    return ref.timesteps.numpy(), traj


def _ddpm_reference(num_steps, monkeypatch, **cfg):
    ref = _float64(diffusers.DDPMScheduler(**SCHED_CFG, **cfg))
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    ref.set_timesteps(num_steps)
    zs = _step_noises(num_steps)
    current = {}
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: current["z"])
    x = torch.from_numpy(np.asarray(_noise(), np.float64))
    traj = []
    for i, t in enumerate(ref.timesteps):
        current["z"] = zs[i]
        x = ref.step(_model_torch(x, t), t, x).prev_sample
        traj.append(x)
    return ref.timesteps.numpy(), traj


def _ours(sampler):
    state = sampler.init(_noise())
    x0, traj = sampling.sample(sampler, MODEL, _noise(), KEY, return_trajectory=True)
    np.testing.assert_array_equal(traj[-1], x0)
    return np.asarray(state.timesteps), traj


SPACINGS = ("leading", "trailing", "linspace")
PTYPES = ("epsilon", "v_prediction", "sample")


# num_steps = 7 does not divide 1000, so the spacings (and the reference's t - T // n rule for
# DDIM's previous level) all differ.
@needs_torch
@pytest.mark.parametrize("ptype,clip", list(itertools.product(PTYPES, [False, True])))
@pytest.mark.parametrize("spacing,offset,alpha_one",
                         [(s, o, a) for s in SPACINGS for o in (0, 1) for a in (True, False)])
def test_ddim_matches_diffusers(spacing, offset, alpha_one, ptype, clip):
    cfg = dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype, clip_sample=clip)
    sampler = samplers.get("ddim", _schedule(), 7, eta=0.0, set_alpha_to_one=alpha_one, **cfg)
    ts, traj = _ours(sampler)
    ref_ts, ref_traj = _ddim_reference(7, eta=0.0, set_alpha_to_one=alpha_one, **cfg)
    np.testing.assert_array_equal(ts, ref_ts)
    assert _rel_err(traj, ref_traj) < 1e-5


@needs_torch
@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("ptype", PTYPES)
def test_ddim_eta_matches_diffusers(eta, ptype):
    cfg = dict(timestep_spacing="trailing", prediction_type=ptype, clip_sample=False)
    sampler = samplers.get("ddim", _schedule(), 7, eta=eta, **cfg)
    _, traj = _ours(sampler)
    _, ref_traj = _ddim_reference(7, eta=eta, set_alpha_to_one=True, **cfg)
    assert _rel_err(traj, ref_traj) < 1e-5


@needs_torch
@pytest.mark.parametrize("option", ["thresholding", "use_clipped_model_output"])
def test_ddim_x0_processing_matches_diffusers(option):
    if option == "thresholding":
        ours_cfg = ref_cfg = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                                  prediction_type="epsilon")
        extra = {}
    else:
        ours_cfg = ref_cfg = dict(clip_sample=True, clip_sample_range=0.8, prediction_type="epsilon")
        extra = dict(use_clipped_model_output=True)
    sampler = samplers.get("ddim", _schedule(), 7, eta=0.5, **ours_cfg, **extra)
    _, traj = _ours(sampler)
    _, ref_traj = _ddim_reference(7, eta=0.5, set_alpha_to_one=True, **ref_cfg, **extra)
    assert _rel_err(traj, ref_traj) < 1e-5


@needs_torch
@pytest.mark.parametrize("ptype,clip,variance",
                         list(itertools.product(PTYPES, [False, True], ["fixed_small", "fixed_large"])))
@pytest.mark.parametrize("spacing,offset", [(s, o) for s in SPACINGS for o in (0, 1)])
def test_ddpm_matches_diffusers(spacing, offset, ptype, clip, variance, monkeypatch):
    cfg = dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype, clip_sample=clip,
               variance_type=variance)
    sampler = samplers.get("ddpm", _schedule(), 7, **cfg)
    ts, traj = _ours(sampler)
    ref_ts, ref_traj = _ddpm_reference(7, monkeypatch, **cfg)
    np.testing.assert_array_equal(ts, ref_ts)
    assert _rel_err(traj, ref_traj) < 1e-5


@needs_torch
def test_ddpm_every_timestep_matches_diffusers(monkeypatch):
    """All 1000 steps on the linear schedule (beta ~ 1e-4 per step). Posterior coefficients formed
    from float32 abar would be off by up to 4e-4 and the trajectory by ~6e-5; the float64 plan
    keeps it near 1e-6."""
    cfg = dict(prediction_type="epsilon", clip_sample=False, variance_type="fixed_small")
    linear = dict(SCHED_CFG, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    monkeypatch.setitem(globals(), "SCHED_CFG", linear)
    sampler = samplers.get("ddpm", _schedule(), 1000, **cfg)
    _, traj = _ours(sampler)
    _, ref_traj = _ddpm_reference(1000, monkeypatch, **cfg)
    assert _rel_err(traj, ref_traj) < 1e-5


@needs_torch
def test_ddpm_thresholding_matches_diffusers(monkeypatch):
    cfg = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    sampler = samplers.get("ddpm", _schedule(), 7, **cfg)
    _, traj = _ours(sampler)
    _, ref_traj = _ddpm_reference(7, monkeypatch, **cfg)
    assert _rel_err(traj, ref_traj) < 1e-5


def test_public_surface_example():
    sched = schedules.discrete("scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)
    sampler = samplers.get("ddim", sched, num_steps=50, eta=0.0, timestep_spacing="leading",
                           steps_offset=1, prediction_type="epsilon")
    state = sampler.init(_noise())
    np.testing.assert_array_equal(state.timesteps, np.arange(49, -1, -1) * 20 + 1)
    assert state.timesteps.dtype == jnp.float32 and state.index.dtype == jnp.int32
    np.testing.assert_array_equal(state.input_scales, np.ones(50))
    assert float(state.init_sigma) == 1.0
    x0 = sampling.sample(sampler, MODEL, _noise(), KEY)
    x0b, traj = sampling.sample(sampler, MODEL, _noise(), KEY, return_trajectory=True)
    assert x0.shape == SHAPE and x0.dtype == jnp.float32 and traj.shape == (50,) + SHAPE
    np.testing.assert_array_equal(x0, x0b)
    np.testing.assert_array_equal(traj[-1], x0)


def test_model_sees_training_timesteps_as_float_batch():
    seen = []

    def spy(x, t):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), t)
        assert t.shape == (SHAPE[0],) and t.dtype == jnp.float32
        return jnp.zeros_like(x)

    sampler = samplers.get("ddpm", _schedule(), 5, timestep_spacing="trailing")
    sampling.sample(sampler, spy, _noise(), KEY)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.stack(seen), np.repeat([[999], [799], [599], [399], [199]], SHAPE[0], axis=1))


def _final(sampler, key=KEY, model=MODEL):
    """x0 of a run, through the same compiled program as the parity tests (7 steps, trajectory)."""
    return np.asarray(sampling.sample(sampler, model, _noise(), key, return_trajectory=True)[0])


def test_ddim_eta0_is_deterministic_and_eta_adds_noise():
    det = samplers.get("ddim", _schedule(), 7, eta=0.0, clip_sample=False)
    np.testing.assert_array_equal(_final(det, jax.random.PRNGKey(1)), _final(det, jax.random.PRNGKey(2)))
    sto = samplers.get("ddim", _schedule(), 7, eta=1.0, clip_sample=False)
    c, d = _final(sto, jax.random.PRNGKey(1)), _final(sto, jax.random.PRNGKey(2))
    assert np.abs(c - d).max() > 1e-2
    np.testing.assert_array_equal(c, _final(sto, jax.random.PRNGKey(1)))


def test_ddpm_is_stochastic_and_reproducible():
    sampler = samplers.get("ddpm", _schedule(), 7, clip_sample=False)
    a, b = _final(sampler, jax.random.PRNGKey(1)), _final(sampler, jax.random.PRNGKey(2))
    assert np.abs(a - b).max() > 1e-2
    np.testing.assert_array_equal(a, _final(sampler, jax.random.PRNGKey(1)))


def test_ddim_eta1_equals_ddpm_fixed_small():
    """With eta = 1, DDIM's eq. 12 is DDPM's posterior step (eq. 7) with sigma^2 = beta_tilde, so
    with the same noise (same key and index) the two samplers agree (unclipped predictions)."""
    ddim = samplers.get("ddim", _schedule(), 7, eta=1.0, clip_sample=False)
    ddpm = samplers.get("ddpm", _schedule(), 7, variance_type="fixed_small", clip_sample=False)
    a, b = _final(ddim), _final(ddpm)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.abs(a - _final(samplers.get("ddim", _schedule(), 7, eta=0.0, clip_sample=False))).max() > 1e-2


def test_bf16_model_output_keeps_float32_math():
    sampler = samplers.get("ddim", _schedule(), 7, clip_sample=False)
    ref = _final(sampler)
    bf16 = jax.tree_util.Partial(_model_bf16)
    out = _final(sampler, model=bf16)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < rel < 2e-2


def _model_bf16(x, t):
    return _model_jnp(x.astype(jnp.bfloat16), t).astype(jnp.bfloat16)


def _toy_step(state, x, model_output, key):
    """A made-up two-calls-per-step sampler: x <- model output; memory accumulates the outputs."""
    del x, key
    return model_output, state._replace(index=state.index + 1, memory=state.memory + model_output)


def test_driver_contract_for_multi_call_samplers():
    """The driver scales the noise by init_sigma, hands the network scale_i * x at t_i for every
    planned call, and carries fixed-shape memory: what Heun / multistep solvers need."""
    from jaxdiff.samplers import base

    ts, scales = np.array([10.0, 10.0, 20.0, 20.0]), np.array([1.0, 0.5, 0.25, 2.0])

    def prepare(plan, noise):
        return plan._replace(memory=jnp.zeros_like(noise))

    plan = base.new_state(ts, plan=(), init_sigma=3.0, input_scales=scales)
    toy = samplers.Sampler(plan=plan, prepare=jax.tree_util.Partial(prepare), step=jax.tree_util.Partial(_toy_step))
    model = jax.tree_util.Partial(lambda x, t: x + t[:, None, None, None])
    _, traj = sampling.sample(toy, model, _noise(), KEY, return_trajectory=True)
    x, expect = 3.0 * np.asarray(_noise()), []
    for t, c in zip(ts, scales):
        x = c * x + t
        expect.append(x)
    np.testing.assert_allclose(traj, np.stack(expect), rtol=1e-6)
    assert traj.shape == (4,) + SHAPE


def test_no_recompile():
    """New sampler objects (same static options and length), new parameter values, new eta,
    spacing, noise and key all reuse the compiled loop; the network is traced once per compile."""
    traces = []

    def apply(params, x, t):
        traces.append(1)                       # runs only while tracing
        return params["w"] * jnp.tanh(x) + params["b"] * t[:, None, None, None] / 1000.0

    def params(w):
        return {"w": jnp.float32(w), "b": jnp.float32(-w)}

    sched = _schedule()
    cache0 = sampling._run._cache_size()
    first = sampling.sample(samplers.get("ddim", sched, 20, eta=0.0), jax.tree_util.Partial(apply, params(1.0)),
                            _noise(), KEY)
    assert len(traces) == 1
    runs = [
        (samplers.get("ddim", sched, 20, eta=0.0), params(1.0)),                 # rebuilt, same options
        (samplers.get("ddim", sched, 20, eta=0.0), params(0.5)),                 # new parameter values
        (samplers.get("ddim", sched, 20, eta=0.8, timestep_spacing="trailing",
                      set_alpha_to_one=False, clip_sample=False), params(0.5)),  # traced options, new plan
    ]
    outs = [sampling.sample(s, jax.tree_util.Partial(apply, p), _noise(i + 1), jax.random.PRNGKey(i))
            for i, (s, p) in enumerate(runs)]
    assert len(traces) == 1
    assert sampling._run._cache_size() == cache0 + 1
    # The runs really differ (the parameters and options were not baked in).
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
    np.testing.assert_array_equal(first, sampling.sample(runs[0][0], jax.tree_util.Partial(apply, params(1.0)),
                                                         _noise(), KEY))
    # A different plan length does compile again (so the counters can fail).
    sampling.sample(samplers.get("ddim", sched, 30), jax.tree_util.Partial(apply, params(1.0)), _noise(), KEY)
    assert len(traces) == 2 and sampling._run._cache_size() == cache0 + 2


def test_registry_errors():
    sched = _schedule()
    with pytest.raises(ValueError, match=r"unknown sampler 'euler_x'.*ddim, ddim_inverse, ddpm"):
        samplers.get("euler_x", sched, 10)
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'etaa'.*valid options: .*eta"):
        samplers.get("ddim", sched, 10, etaa=0.5)
    with pytest.raises(ValueError, match="variance_type"):
        samplers.get("ddim", sched, 10, variance_type="fixed_small")     # a DDPM option
    with pytest.raises(ValueError, match=r"eta must lie in \[0.0, 1.0\]"):
        samplers.get("ddim", sched, 10, eta=1.5)
    with pytest.raises(ValueError, match="timestep_spacing='middle'.*leading, trailing, linspace"):
        samplers.get("ddim", sched, 10, timestep_spacing="middle")
    with pytest.raises(ValueError, match="variance_type='learned'.*fixed_small, fixed_large"):
        samplers.get("ddpm", sched, 10, variance_type="learned")
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        samplers.get("ddpm", sched, 10, prediction_type="eps")
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
        samplers.get("ddpm", sched, 1001)
    with pytest.raises(ValueError, match="steps_offset"):
        samplers.get("ddim", sched, 1000, steps_offset=1)
    assert samplers.options("ddim")["eta"] == 0.0
    assert samplers.options("ddpm")["variance_type"] == "fixed_small"
