"""The samplers beyond DDPM / DDIM (Euler, Euler ancestral, Heun, EDM, LMS, DPM-Solver++ ODE / SDE,
UniPC, PNDM) against diffusers' schedulers, and their plans.

Same approach as test_samplers.py: the same smooth model function in jnp (float32, ours) and torch
(float64, the reference: alphas_cumprod recomputed in float64 from its float32 betas, and its
float32 casts and sigma arithmetic made float64; its plans keep their float32-rounded levels).
The whole trajectory must agree to max_i ||x_i - ref_i|| / ||ref_i|| < 1e-5 (measured: <= 1.4e-6,
typically 2e-7). The model sees the scaled input and the (possibly fractional) training timestep
on both sides, so a wrong input scale or timestep fails the test. Stochastic steps get the same
noise z_i = normal(fold_in(key, i)) on both sides (the reference's noise function is patched).
EDM's Algorithm 2 has no reference scheduler; its output law is checked exactly in
test_sampling_gaussian.py.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules
from test_samplers import KEY, MODEL, SCHED_CFG, _model_jnp, _model_torch, _noise, _rel_err, _step_noises

try:  # the PyTorch reference: only the parity tests need it, the others run without it
    import diffusers
    import torch
    from diffusers.schedulers import scheduling_dpmsolver_multistep as dpm_module
    from diffusers.schedulers import (
        scheduling_euler_ancestral_discrete as euler_a_module,
    )
except ModuleNotFoundError:
    torch = diffusers = dpm_module = euler_a_module = None
needs_torch = pytest.mark.skipif(torch is None, reason="the PyTorch reference (torch, diffusers) is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # numpy 2 notes inside diffusers

SPACINGS = ("leading", "trailing", "linspace")
PTYPES = ("epsilon", "v_prediction", "sample")
N = 7  # does not divide 1000: the spacings all differ


def _with_ptypes(grid, ptypes=PTYPES, every=3):
    """Every config of `grid` with "epsilon", every `every`-th one also with the other prediction
    types (the prediction type only changes how D(x) is read, tested on a spread of plans)."""
    return [(*cfg, "epsilon") for cfg in grid] + [(*cfg, p) for cfg in grid[::every] for p in ptypes if p != "epsilon"]


def _schedule(ref=None):
    """Our schedule; for zero terminal SNR the reference's own betas: its float32 rescaling differs
    from ours (float64, then rounded) by up to 2e-4 relative in beta, which is a schedule
    difference (test_schedules.py), not a sampler one."""
    if ref is not None:
        return schedules.from_betas(ref.betas.numpy())
    s = SCHED_CFG
    return schedules.discrete(s["beta_schedule"], s["num_train_timesteps"], s["beta_start"], s["beta_end"])


def _float64(ref, zero_snr=False):
    ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), dim=0)
    if zero_snr:
        ref.alphas_cumprod[-1] = 2.0 ** -24
    return ref


class _Float64Torch:
    """`torch` as a reference scheduler module sees it while stepping: its `sample.to(torch.float32)`
    casts become float64, so the reference stays float64. (On zero-terminal-SNR plans the first
    Euler step cancels |x| ~ sigma_max ~ 4096 down to ~sigma_1 ~ 10, so float32 rounding of the
    sample, or of sigma_1 - sigma_0, alone would put ~1e-5 of error into the reference.)"""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


def _drive(ref, num_steps, zs=None, patch=None, **step_kw):
    """Run a diffusers scheduler the way its pipelines do; returns (timesteps, init sigma, traj)."""
    ref.set_timesteps(num_steps)
    if hasattr(ref, "sigmas"):
        ref.sigmas = ref.sigmas.double()        # the same (float32-rounded) levels, float64 arithmetic
    x = torch.from_numpy(np.asarray(_noise(), np.float64)) * ref.init_noise_sigma
    module = sys.modules[type(ref).__module__]
    module.torch = _Float64Torch()
    traj = []
    try:
        for i, t in enumerate(ref.timesteps):
            if patch is not None:
                patch["z"] = zs[i]
            out = _model_torch(ref.scale_model_input(x, t), t)
            x = ref.step(out, t, x, **step_kw).prev_sample.double()
            traj.append(x)
    finally:
        module.torch = torch
    return ref.timesteps.numpy(), float(ref.init_noise_sigma), traj


def _ours(sampler):
    state = sampler.init(_noise())
    x0, traj = sampling.sample(sampler, MODEL, _noise(), KEY, return_trajectory=True)
    np.testing.assert_array_equal(traj[-1], x0)
    return np.asarray(state.timesteps), float(state.init_sigma), traj


def _check(sampler, ref_result, tol=1e-5):
    ts, init_sigma, traj = _ours(sampler)
    ref_ts, ref_init, ref_traj = ref_result
    np.testing.assert_allclose(ts, ref_ts.astype(np.float64), rtol=1e-6, atol=1e-4)
    assert init_sigma == pytest.approx(ref_init, rel=1e-6)
    err = _rel_err(traj, ref_traj)
    assert err < tol, err
    return err


# --------------------------------------------------------------------------------------------
# Euler / Euler ancestral.
# --------------------------------------------------------------------------------------------

EULER_GRID = [(s, o, k, f) for s in SPACINGS for o in (0, 1) for k in (False, True) for f in ("zero", "sigma_min")
              if not (o and s != "leading")]


@needs_torch
@pytest.mark.parametrize("spacing,offset,karras,final,ptype", _with_ptypes(EULER_GRID))
def test_euler_matches_diffusers(spacing, offset, karras, final, ptype):
    cfg = dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype, use_karras_sigmas=karras,
               final_sigmas_type=final)
    ref = _float64(diffusers.EulerDiscreteScheduler(**SCHED_CFG, **cfg))
    _check(samplers.get("euler", _schedule(), N, **cfg), _drive(ref, N))


@needs_torch
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,karras", [("trailing", False), ("linspace", True), ("leading", False)])
def test_euler_zero_terminal_snr_matches_diffusers(spacing, karras, ptype):
    """Zero-terminal-SNR schedules: abar_{T-1} floored at 2^-24 (sigma_max ~ 4096) as the reference."""
    cfg = dict(timestep_spacing=spacing, prediction_type=ptype, use_karras_sigmas=karras)
    ref = _float64(diffusers.EulerDiscreteScheduler(**SCHED_CFG, rescale_betas_zero_snr=True, **cfg), zero_snr=True)
    _check(samplers.get("euler", _schedule(ref), N, **cfg), _drive(ref, N))


@needs_torch
def test_euler_karras_sigma_bounds_match_diffusers():
    cfg = dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)
    ref = _float64(diffusers.EulerDiscreteScheduler(**SCHED_CFG, **cfg))
    _check(samplers.get("euler", _schedule(), N, **cfg), _drive(ref, N))


def _euler_a_reference(num_steps, monkeypatch, zero_snr=False, **cfg):
    ref = diffusers.EulerAncestralDiscreteScheduler(**SCHED_CFG, rescale_betas_zero_snr=zero_snr, **cfg)
    schedule = _schedule(ref if zero_snr else None)
    patch = {}
    monkeypatch.setattr(euler_a_module, "randn_tensor", lambda *a, **k: patch["z"])
    return schedule, _drive(_float64(ref, zero_snr), num_steps, zs=_step_noises(num_steps), patch=patch)


@needs_torch
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])     # the reference has no "sample" here
@pytest.mark.parametrize("spacing,offset,zero_snr", [(s, 0, False) for s in SPACINGS] + [("leading", 1, False),
                                                                                         ("trailing", 0, True)])
def test_euler_ancestral_matches_diffusers(spacing, offset, zero_snr, ptype, monkeypatch):
    cfg = dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype)
    schedule, ref_result = _euler_a_reference(N, monkeypatch, zero_snr=zero_snr, **cfg)
    _check(samplers.get("euler_ancestral", schedule, N, **cfg), ref_result)


def test_euler_ancestral_is_stochastic_and_shares_the_euler_plan():
    kw = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", timestep_spacing="trailing")
    anc, det = samplers.get("euler_ancestral", _schedule(), N, **kw), samplers.get("euler", _schedule(), N, **kw)
    sa, sd = anc.init(_noise()), det.init(_noise())
    for a, b in [(sa.timesteps, sd.timesteps), (sa.input_scales, sd.input_scales), (sa.init_sigma, sd.init_sigma),
                 (sa.plan.now.sigma, sd.plan.now.sigma)]:
        np.testing.assert_array_equal(a, b)
    # sigma_down^2 + sigma_up^2 = sigma_next^2, and the last step still ends on sigma_min > 0.
    np.testing.assert_allclose(sa.plan.sigma_down ** 2 + sa.plan.sigma_up ** 2, sd.plan.sigma_down ** 2, rtol=1e-5)
    assert float(sd.plan.sigma_down[-1]) > 0
    run = lambda k: np.asarray(sampling.sample(anc, MODEL, _noise(), jax.random.PRNGKey(k)))  # noqa: E731
    a, b = run(1), run(2)
    assert np.abs(a - b).max() > 1e-2
    np.testing.assert_array_equal(a, run(1))


# --------------------------------------------------------------------------------------------
# Heun.
# --------------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("spacing,offset,karras,clip,ptype", _with_ptypes(
    [(s, 0, k, False) for s in SPACINGS for k in (False, True)]
    + [("leading", 1, False, False), ("linspace", 0, False, True)]))
def test_heun_matches_diffusers(spacing, offset, karras, clip, ptype):
    cfg = dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype, use_karras_sigmas=karras,
               clip_sample=clip, clip_sample_range=0.8)
    ref = _float64(diffusers.HeunDiscreteScheduler(**SCHED_CFG, **cfg))
    sampler = samplers.get("heun", _schedule(), N, **cfg)
    assert sampler.init(_noise()).timesteps.shape == (2 * N - 1,)
    _check(sampler, _drive(ref, N))


def test_heun_single_step_is_euler():
    heun, euler = samplers.get("heun", _schedule(), 1), samplers.get("euler", _schedule(), 1)
    np.testing.assert_allclose(sampling.sample(heun, MODEL, _noise(), KEY),
                               sampling.sample(euler, MODEL, _noise(), KEY), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, ODE and SDE).
# --------------------------------------------------------------------------------------------

def _dpm_reference(num_steps, monkeypatch, ref_cfg, ref=None):
    ref = _float64(ref or diffusers.DPMSolverMultistepScheduler(**SCHED_CFG, **ref_cfg), ref_cfg.get(
        "rescale_betas_zero_snr", False))
    patch = {}
    monkeypatch.setattr(dpm_module, "randn_tensor", lambda *a, **k: patch["z"])
    return _drive(ref, num_steps, zs=_step_noises(num_steps), patch=patch)


DPM_GRID = [(s, k, f) for s in SPACINGS for k in (False, True) for f in ("zero", "sigma_min")]
# Order 2 on every plan (and all prediction types on a spread of them); orders 1 and 3 on a spread.
DPM_CASES = (_with_ptypes([(*g, 2) for g in DPM_GRID])
             + [(*g, order, "epsilon") for g in DPM_GRID[1::3] for order in (1, 3)])


@needs_torch
@pytest.mark.parametrize("spacing,karras,final,order,ptype", DPM_CASES)
def test_dpmpp_2m_matches_diffusers(spacing, karras, final, ptype, order, monkeypatch):
    cfg = dict(timestep_spacing=spacing, use_karras_sigmas=karras, final_sigmas_type=final, prediction_type=ptype,
               solver_order=order)
    sampler = samplers.get("dpmpp_2m", _schedule(), N, **cfg)
    _check(sampler, _dpm_reference(N, monkeypatch, dict(cfg, algorithm_type="dpmsolver++")))


@needs_torch
@pytest.mark.parametrize("name,order", [("dpmpp_2m", 2), ("dpmpp_2m", 3), ("dpmpp_2m_sde", 2), ("dpmpp_3m_sde", 3)])
@pytest.mark.parametrize("extra", [dict(solver_type="heun"),
                                   dict(lower_order_final=False, final_sigmas_type="sigma_min"),
                                   dict(euler_at_final=True, final_sigmas_type="sigma_min", lower_order_final=False),
                                   dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
                                   dict(timestep_spacing="leading", steps_offset=1),
                                   dict(timestep_spacing="trailing", prediction_type="v_prediction")])
def test_dpm_solver_options_match_diffusers(name, order, extra, monkeypatch):
    algorithm = "sde-dpmsolver++" if name.endswith("sde") else "dpmsolver++"
    cfg = dict(extra, solver_order=order)
    sampler = samplers.get(name, _schedule(), N, **cfg)
    _check(sampler, _dpm_reference(N, monkeypatch, dict(cfg, algorithm_type=algorithm)))


@needs_torch
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_dpm_solver_zero_terminal_snr_and_many_steps_match_diffusers(name, monkeypatch):
    """Zero terminal SNR (v-prediction, trailing, as Lin et al. 2023 recommend) and 20 steps, where
    the higher orders run to the end (lower_order_final applies below 15 steps only)."""
    algorithm = "sde-dpmsolver++" if name.endswith("sde") else "dpmsolver++"
    cfg = dict(timestep_spacing="trailing", prediction_type="v_prediction", final_sigmas_type="sigma_min")
    ref = diffusers.DPMSolverMultistepScheduler(**SCHED_CFG, rescale_betas_zero_snr=True, algorithm_type=algorithm,
                                                solver_order=samplers.options(name)["solver_order"], **cfg)
    sampler = samplers.get(name, _schedule(ref), 20, **cfg)
    _check(sampler, _dpm_reference(20, monkeypatch, dict(cfg, rescale_betas_zero_snr=True), ref=ref))


def test_dpm_solver_sde_is_stochastic_and_ode_is_not():
    runs = {name: [np.asarray(sampling.sample(samplers.get(name, _schedule(), N), MODEL, _noise(),
                                              jax.random.PRNGKey(k))) for k in (1, 2)]
            for name in ("dpmpp_2m", "dpmpp_2m_sde")}
    np.testing.assert_array_equal(*runs["dpmpp_2m"])
    assert np.abs(runs["dpmpp_2m_sde"][0] - runs["dpmpp_2m_sde"][1]).max() > 1e-2


# --------------------------------------------------------------------------------------------
# LMS.
# --------------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("spacing,offset,karras,order,ptype", _with_ptypes(
    [(s, 0, k, 4) for s in SPACINGS for k in (False, True)]
    + [("leading", 1, False, 4), ("linspace", 0, False, 1), ("linspace", 0, True, 2), ("trailing", 0, False, 3)]))
def test_lms_matches_diffusers(spacing, offset, karras, order, ptype):
    cfg = dict(timestep_spacing=spacing, steps_offset=offset, prediction_type=ptype, use_karras_sigmas=karras)
    ref = _float64(diffusers.LMSDiscreteScheduler(**SCHED_CFG, **cfg))
    _check(samplers.get("lms", _schedule(), N, order=order, **cfg), _drive(ref, N, order=order))


def test_lms_order_one_is_euler():
    lms, euler = samplers.get("lms", _schedule(), N, order=1), samplers.get("euler", _schedule(), N)
    np.testing.assert_allclose(sampling.sample(lms, MODEL, _noise(), KEY),
                               sampling.sample(euler, MODEL, _noise(), KEY), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# UniPC.
# --------------------------------------------------------------------------------------------

def _unipc_reference(num_steps, ref_cfg, ref=None):
    ref = _float64(ref or diffusers.UniPCMultistepScheduler(**SCHED_CFG, **ref_cfg),
                   ref_cfg.get("rescale_betas_zero_snr", False))
    return _drive(ref, num_steps)


@needs_torch
@pytest.mark.parametrize("spacing,karras,final,order,ptype", DPM_CASES)
def test_unipc_matches_diffusers(spacing, karras, final, ptype, order):
    cfg = dict(timestep_spacing=spacing, use_karras_sigmas=karras, final_sigmas_type=final, prediction_type=ptype,
               solver_order=order)
    _check(samplers.get("unipc", _schedule(), N, **cfg), _unipc_reference(N, cfg))


@pytest.mark.parametrize("order", [2, 3])
# "bh1" onto sigma = 0 is NaN in the reference (B(h) = -inf times a zero first-order residual);
# ours gives the first-order step there, so bh1 is compared ending on sigma_min.
@needs_torch
@pytest.mark.parametrize("extra", [dict(solver_type="bh1", final_sigmas_type="sigma_min"),
                                   dict(lower_order_final=False, final_sigmas_type="sigma_min"),
                                   dict(disable_corrector=[0, 3]), dict(timestep_spacing="leading", steps_offset=1),
                                   dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)])
def test_unipc_options_match_diffusers(order, extra):
    cfg = dict(extra, solver_order=order)
    _check(samplers.get("unipc", _schedule(), N, **cfg), _unipc_reference(N, cfg))


@needs_torch
def test_unipc_zero_terminal_snr_and_many_steps_match_diffusers():
    cfg = dict(timestep_spacing="trailing", prediction_type="v_prediction", solver_order=3)
    ref = diffusers.UniPCMultistepScheduler(**SCHED_CFG, rescale_betas_zero_snr=True, **cfg)
    _check(samplers.get("unipc", _schedule(ref), 20, **cfg),
           _unipc_reference(20, dict(cfg, rescale_betas_zero_snr=True), ref=ref))


# --------------------------------------------------------------------------------------------
# EDM (Alg. 2): the deterministic limit, the churn window and the plan.
# --------------------------------------------------------------------------------------------

def test_edm_without_churn_is_heun_on_karras_sigmas():
    heun = samplers.get("heun", _schedule(), N, use_karras_sigmas=True, prediction_type="v_prediction")
    for opts in (dict(s_churn=0.0), dict(s_churn=40.0, s_tmin=1e4)):          # no churn / churn window missed
        edm = samplers.get("edm", _schedule(), N, prediction_type="v_prediction", **opts)
        a, b = edm.init(_noise()), heun.init(_noise())
        np.testing.assert_array_equal(a.timesteps, b.timesteps)
        np.testing.assert_array_equal(a.input_scales, b.input_scales)
        np.testing.assert_allclose(sampling.sample(edm, MODEL, _noise(), KEY),
                                   sampling.sample(heun, MODEL, _noise(), KEY), rtol=1e-6, atol=1e-6)


def test_edm_churn_raises_the_predictor_levels():
    steps = 5
    sched = _schedule()
    det = samplers.get("edm", sched, steps).init(_noise())
    sto = samplers.get("edm", sched, steps, s_churn=2.5, s_tmax=5.0).init(_noise())     # gamma = 0.5 -> 0.414
    gamma = np.sqrt(2) - 1
    sig = np.asarray(det.plan.sigma_from, np.float64)
    inside = (sig <= 5.0)
    pred = np.asarray(det.plan.correct) == 0
    np.testing.assert_allclose(sto.plan.sigma_from, np.where(inside, sig * (1 + gamma), sig), rtol=1e-6)
    raised = pred & inside
    np.testing.assert_allclose(sto.plan.now.sigma[raised], sig[raised] * (1 + gamma), rtol=1e-6)
    assert np.all(sto.timesteps[raised] > det.timesteps[raised])            # noisier level, later timestep
    np.testing.assert_array_equal(sto.timesteps[~raised], det.timesteps[~raised])
    np.testing.assert_allclose(sto.input_scales, 1 / np.sqrt(np.asarray(sto.plan.now.sigma, np.float64) ** 2 + 1),
                               rtol=1e-6)
    assert float(sto.init_sigma) == pytest.approx(float(det.init_sigma), rel=1e-6)       # sigma_max is outside
    # The churn after a corrector (end of step i) raises sigma_{i+1} to sigma_hat_{i+1}.
    to = np.asarray(det.plan.sigma_to, np.float64)
    expect = np.where(~pred & (to <= 5.0), to * np.sqrt((1 + gamma) ** 2 - 1), 0.0)
    np.testing.assert_allclose(sto.plan.churn_std, expect, rtol=1e-5, atol=1e-7)


def test_edm_knobs_are_traced():
    traces = []

    def counted(x, t):
        traces.append(1)
        return _model_jnp(x, t)

    sched = _schedule()
    outs = [np.asarray(sampling.sample(samplers.get("edm", sched, N, **o), counted, _noise(), KEY))
            for o in (dict(s_churn=1.0), dict(s_churn=5.0, s_noise=1.05), dict(s_churn=5.0, s_tmin=0.5, s_tmax=20.0))]
    assert len(traces) == 1
    assert np.abs(outs[0] - outs[1]).max() > 1e-3 and np.abs(outs[1] - outs[2]).max() > 1e-3


# --------------------------------------------------------------------------------------------
# PNDM.
# --------------------------------------------------------------------------------------------

def _pndm_reference(num_steps, set_alpha_to_one, **cfg):
    ref = _float64(diffusers.PNDMScheduler(**SCHED_CFG, set_alpha_to_one=set_alpha_to_one, **cfg))
    ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else ref.alphas_cumprod[0]
    return _drive(ref, num_steps)


@needs_torch
@pytest.mark.parametrize("spacing,offset,skip,alpha_one,ptype", _with_ptypes(      # no "sample" in the reference
    [(s, 0, k, False) for s in SPACINGS for k in (False, True)]
    + [("leading", 1, False, True), ("leading", 1, True, True), ("trailing", 0, False, True)],
    ptypes=("epsilon", "v_prediction"), every=2))
def test_pndm_matches_diffusers(spacing, offset, skip, alpha_one, ptype):
    cfg = dict(timestep_spacing=spacing, steps_offset=offset, skip_prk_steps=skip, prediction_type=ptype)
    sampler = samplers.get("pndm", _schedule(), N, set_alpha_to_one=alpha_one, **cfg)
    assert sampler.init(_noise()).timesteps.shape == ((N + 1) if skip else (N + 9),)
    _check(sampler, _pndm_reference(N, alpha_one, **cfg))


def test_sigma_samplers_fill_the_state():
    """init_sigma, input scales 1 / sqrt(sigma^2 + 1) and fractional Karras timesteps."""
    sampler = samplers.get("euler", _schedule(), 10, use_karras_sigmas=True)
    state = sampler.init(_noise())
    sig = np.asarray(state.plan.now.sigma, np.float64)
    np.testing.assert_allclose(state.input_scales, 1 / np.sqrt(sig ** 2 + 1), rtol=1e-6)
    assert float(state.init_sigma) == pytest.approx(sig[0], rel=1e-6)
    assert np.any(np.abs(state.timesteps - np.round(state.timesteps)) > 1e-3)
    assert np.all(np.diff(state.timesteps) < 0) and np.all(np.diff(sig) < 0)
    # EDM eq. 5: sigma^(1/7) is evenly spaced.
    np.testing.assert_allclose(np.diff(sig ** (1 / 7)), np.diff(sig ** (1 / 7))[0], rtol=1e-4)
    # "leading" spacing: init_sigma = sqrt(sigma_max^2 + 1), as the reference.
    lead = samplers.get("euler", _schedule(), 10, timestep_spacing="leading").init(_noise())
    assert float(lead.init_sigma) == pytest.approx(np.sqrt(float(lead.plan.now.sigma[0]) ** 2 + 1), rel=1e-6)


NEW_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc", "lms", "pndm",
                "edm")


@pytest.mark.parametrize("name", NEW_SAMPLERS)
def test_new_samplers_are_registered_and_do_not_recompile_for_new_plans(name):
    """A rebuilt sampler with another plan (spacing) of the same length reuses the compiled loop;
    the network is traced once."""
    traces = []

    def counted(x, t):
        traces.append(1)
        return _model_jnp(x, t)

    assert name in samplers.names()
    model = jax.tree_util.Partial(counted)
    cache0 = sampling._run._cache_size()
    outs = [np.asarray(sampling.sample(samplers.get(name, _schedule(), N, timestep_spacing=sp), model, _noise(), KEY))
            for sp in ("linspace", "trailing")]
    assert len(traces) == 1 and sampling._run._cache_size() == cache0 + 1
    assert np.all(np.isfinite(outs[0])) and np.abs(outs[0] - outs[1]).max() > 1e-4
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'not_an_option'"):
        samplers.get(name, _schedule(), N, not_an_option=1)


def _model_bf16(x, t):
    return _model_jnp(x.astype(jnp.bfloat16), t).astype(jnp.bfloat16)


# One sampler per step function (euler / euler_ancestral, heun / edm, dpmpp_* share theirs).
@pytest.mark.parametrize("name", ["euler_ancestral", "edm", "lms", "dpmpp_3m_sde", "unipc", "pndm"])
def test_bf16_model_keeps_float32_sampler_math(name):
    sampler = samplers.get(name, _schedule(), N)
    ref = np.asarray(sampling.sample(sampler, MODEL, _noise(), KEY, return_trajectory=True)[0])
    out = sampling.sample(sampler, jax.tree_util.Partial(_model_bf16), _noise(), KEY, return_trajectory=True)[0]
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
    assert 0 < rel < 2e-2, rel


def test_sigma_sampler_option_errors():
    sched = _schedule()
    with pytest.raises(ValueError, match="final_sigmas_type='one'.*zero, sigma_min"):
        samplers.get("euler", sched, 10, final_sigmas_type="one")
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'eta'"):
        samplers.get("euler", sched, 10, eta=0.5)
    with pytest.raises(ValueError, match="timestep_spacing='middle'"):
        samplers.get("euler_ancestral", sched, 10, timestep_spacing="middle")
    with pytest.raises(ValueError, match="prediction_type='eps'"):
        samplers.get("euler", sched, 10, prediction_type="eps")
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        samplers.get("euler", sched, 10, use_karras_sigmas="yes")
    with pytest.raises(ValueError, match="solver_order=4"):
        samplers.get("dpmpp_2m", sched, 10, solver_order=4)
    with pytest.raises(ValueError, match="solver_type='bh1'.*midpoint, heun"):
        samplers.get("dpmpp_2m", sched, 10, solver_type="bh1")
    with pytest.raises(ValueError, match="solver_type='midpoint'.*bh1, bh2"):
        samplers.get("unipc", sched, 10, solver_type="midpoint")
    with pytest.raises(ValueError, match="non-finite"):
        samplers.get("unipc", sched, 10, lower_order_final=False, final_sigmas_type="zero")
    with pytest.raises(ValueError, match=r"s_churn must lie in \[0.0, inf\]"):
        samplers.get("edm", sched, 10, s_churn=-1.0)
    with pytest.raises(ValueError, match="order must be an integer"):
        samplers.get("lms", sched, 10, order=0)
