"""The LCM sampler against diffusers' `LCMScheduler`.

Whole trajectories on a fixed smooth model function (jnp float32 ours, torch float64 the
reference with its alphas_cumprod recomputed in float64). The noise injected between steps is
ours, z_i = normal(fold_in(key, i)), handed to the reference in place of its own draw (its module's
`randn_tensor`), so the comparison covers the stochastic steps exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules
from jaxdiff.samplers import lcm as lcm_lib

SHAPE = (2, 4, 4, 3)
CFG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
KEY = jax.random.PRNGKey(11)


def _model_jnp(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return 0.7 * jnp.tanh(1.1 * x + 0.5 * jnp.sin(t / 150.0)) + 0.2 * x * jnp.cos(t / 400.0) + 0.05 * t / 1000.0


MODEL = jax.tree_util.Partial(_model_jnp)


def _schedule():
    return schedules.discrete(CFG["beta_schedule"], CFG["num_train_timesteps"], CFG["beta_start"], CFG["beta_end"])


def _noise():
    return jax.random.normal(jax.random.PRNGKey(0), SHAPE, jnp.float32)


def _reference(num_steps, monkeypatch, **cfg):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_lcm

    def model(x, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return (0.7 * torch.tanh(1.1 * x + 0.5 * torch.sin(t / 150.0)) + 0.2 * x * torch.cos(t / 400.0)
                + 0.05 * t / 1000.0)

    ref = diffusers.LCMScheduler(**CFG, **cfg)
    ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), dim=0)
    ref.set_timesteps(num_steps)
    zs = [torch.from_numpy(np.asarray(jax.random.normal(jax.random.fold_in(KEY, i), SHAPE), np.float64))
          for i in range(num_steps)]
    current = {}
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: current["z"])
    x = torch.from_numpy(np.asarray(_noise(), np.float64))
    traj = []
    for i, t in enumerate(ref.timesteps):
        current["z"] = zs[i]
        x = ref.step(model(x, t), t, x).prev_sample
        traj.append(x.numpy())
    return ref.timesteps.numpy(), np.stack(traj)


def _ours(sampler, key=KEY):
    x0, traj = sampling.sample(sampler, MODEL, _noise(), key, return_trajectory=True)
    np.testing.assert_array_equal(traj[-1], x0)
    return np.asarray(sampler.plan.timesteps), np.asarray(traj, np.float64)


def _rel_err(ours, ref):
    ours, ref = ours.reshape(len(ref), -1), ref.reshape(len(ref), -1)
    return float(np.max(np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)))


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers(num_steps, monkeypatch):
    ts, traj = _ours(samplers.get("lcm", _schedule(), num_steps))
    ref_ts, ref_traj = _reference(num_steps, monkeypatch)
    np.testing.assert_array_equal(ts, ref_ts)
    assert _rel_err(traj, ref_traj) < 1e-5


@pytest.mark.parametrize("cfg", [{"prediction_type": "v_prediction", "original_inference_steps": 20,
                                      "timestep_scaling": 0.05},
                                 {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.8}])
def test_lcm_options_match_diffusers(cfg, monkeypatch):
    ts, traj = _ours(samplers.get("lcm", _schedule(), 3, **cfg))
    ref_ts, ref_traj = _reference(3, monkeypatch, **cfg)
    np.testing.assert_array_equal(ts, ref_ts)
    assert _rel_err(traj, ref_traj) < 1e-5


def test_the_parity_is_not_trivial():
    """The injected noise, the boundary scalings and original_inference_steps each change the result."""
    sched = _schedule()
    _, base_traj = _ours(samplers.get("lcm", sched, 4))
    _, other_key = _ours(samplers.get("lcm", sched, 4), key=jax.random.PRNGKey(12))
    assert _rel_err(other_key, base_traj) > 1e-2               # the steps between do inject noise
    _, one = _ours(samplers.get("lcm", sched, 1))
    _, one_other_key = _ours(samplers.get("lcm", sched, 1), key=jax.random.PRNGKey(12))
    np.testing.assert_array_equal(one, one_other_key)          # ... but never at the last step
    _, scaled = _ours(samplers.get("lcm", sched, 4, timestep_scaling=0.01))
    assert _rel_err(scaled, base_traj) > 1e-3                  # c_skip / c_out matter at small scaling
    ts20 = np.asarray(samplers.get("lcm", sched, 4, original_inference_steps=20).plan.timesteps)
    np.testing.assert_array_equal(ts20, [999, 749, 499, 249])
    np.testing.assert_array_equal(np.asarray(samplers.get("lcm", sched, 4).plan.timesteps), [999, 759, 499, 259])


def test_boundary_condition_is_the_identity_at_zero():
    c_skip, c_out = lcm_lib.boundary_scalings(np.array([0.0, 1.0, 999.0]), 10.0)
    np.testing.assert_allclose(c_skip, [1.0, 0.25 / 100.25, 0.25 / (9990.0 ** 2 + 0.25)])
    np.testing.assert_allclose(c_out, [0.0, 10.0 / np.sqrt(100.25), 9990.0 / np.sqrt(9990.0 ** 2 + 0.25)])


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, original_inference_steps=50\]"):
        samplers.get("lcm", _schedule(), 51)
    with pytest.raises(ValueError, match="original_inference_steps must be an integer"):
        samplers.get("lcm", _schedule(), 4, original_inference_steps=0)
    with pytest.raises(ValueError, match="timestep_scaling must lie in"):
        samplers.get("lcm", _schedule(), 4, timestep_scaling=-1.0)


def test_padded_plans_keep_their_results():
    sched = _schedule()
    exact = [_ours(samplers.get("lcm", sched, n))[1][-1] for n in (2, 4)]
    padded = [sampling.sample(samplers.get("lcm", sched, n, max_steps=8), MODEL, _noise(), KEY) for n in (2, 4)]
    for e, p in zip(exact, padded):
        np.testing.assert_allclose(p, e, rtol=1e-6, atol=1e-6)


def test_an_lcm_folder_config_picks_the_lcm_sampler():
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.convert import scheduler as scheduler_convert

    config = dict(diffusers.LCMScheduler(original_inference_steps=40, timestep_scaling=5.0).config,
                  _class_name="LCMScheduler")
    name = scheduler_convert.default_sampler(config)
    assert name == "lcm"
    opts = scheduler_convert.sampler_options(name, config)
    assert opts["original_inference_steps"] == 40 and opts["timestep_scaling"] == 5.0
