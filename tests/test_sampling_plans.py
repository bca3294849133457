"""Plans of one fixed length: step counts up to `max_steps` and img2img start steps share one
compiled loop, and a late-starting run matches diffusers' img2img driving of the same scheduler.

The reference for `start_step=k` is what diffusers' img2img pipelines do: `set_timesteps(N)`,
`set_begin_index(k * order)`, noise the clean image with `add_noise` at `timesteps[k * order]`,
then step through the remaining timesteps. Same model functions and float64 reference as
test_samplers.py; whole remaining trajectories must agree to 1e-5 relative.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules
from test_samplers import KEY, MODEL, SCHED_CFG, SHAPE, _model_torch, _noise, _rel_err
from test_samplers_sigma import _Float64Torch, _float64

try:  # the PyTorch reference: only the img2img parity test needs it, the others run without it
    import diffusers
    import torch
except ModuleNotFoundError:
    torch = diffusers = None
needs_torch = pytest.mark.skipif(torch is None, reason="the PyTorch reference (torch, diffusers) is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N, MAX = 7, 12
SCHED = schedules.discrete(SCHED_CFG["beta_schedule"], SCHED_CFG["num_train_timesteps"], SCHED_CFG["beta_start"],
                           SCHED_CFG["beta_end"])
X0 = 0.8 * jnp.tanh(jax.random.normal(jax.random.PRNGKey(3), SHAPE, jnp.float32))   # a "clean image"

# (name, options): every family, stochastic ones included (same key, same noise per call).
PADDABLE = [
    ("ddim", {}), ("ddim", {"eta": 0.7}), ("ddpm", {}), ("euler", {}), ("euler_ancestral", {}), ("heun", {}),
    ("edm", {"s_churn": 2.0}), ("lms", {}), ("dpmpp_2m", {}), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}),
    ("unipc", {"solver_order": 3}), ("pndm", {}), ("pndm", {"skip_prk_steps": True}),
]


def _run(sampler, **kw):
    return sampling.sample(sampler, MODEL, _noise(), KEY, return_trajectory=True, **kw)


@pytest.mark.parametrize("name,opts", PADDABLE)
def test_padded_plan_gives_the_same_run(name, opts):
    """A plan padded to the length of a MAX-step one makes the same calls and gives the same
    result; the padding iterations leave the sample as it is."""
    x, traj = _run(samplers.get(name, SCHED, N, **opts))
    x_pad, traj_pad = _run(samplers.get(name, SCHED, N, max_steps=MAX, **opts))
    n_calls, n_max = traj.shape[0], traj_pad.shape[0]
    assert n_max > n_calls
    np.testing.assert_allclose(x_pad, x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(traj_pad[:n_calls], traj, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(traj_pad[n_calls:], np.broadcast_to(x_pad, (n_max - n_calls,) + SHAPE))


@pytest.mark.parametrize("name,opts", PADDABLE + [("ddim_inverse", {})])
@pytest.mark.parametrize("num_steps", [4, 9])
def test_model_calls_is_the_plan_length(name, opts, num_steps):
    """The per-family count `get(..., max_steps=)` pads to is the length of the plan it builds."""
    sampler = samplers.get(name, SCHED, num_steps, **opts)
    assert samplers.model_calls(name, num_steps, **opts) == sampler.plan.timesteps.shape[0]
    assert sampler.init(_noise()).timesteps.shape[0] == sampler.plan.timesteps.shape[0]


def test_padding_builds_the_plan_once_and_pads_the_registered_length():
    """`max_steps` pads to the registered `model_calls` of the longest plan; the factory runs once."""
    built = []

    def two_calls_per_step(schedule, num_steps, *, eta=0.0):
        built.append(num_steps)
        plan = samplers.get("ddim", schedule, num_steps, eta=eta).plan
        twice = jax.tree.map(lambda a: jnp.repeat(a, 2, axis=0), (plan.timesteps, plan.input_scales, plan.plan))
        plan = plan._replace(timesteps=twice[0], input_scales=twice[1], plan=twice[2], num_calls=2 * plan.num_calls,
                             signal_scales=None, noise_scales=None)
        return samplers.get("ddim", schedule, num_steps)._replace(plan=plan)

    try:
        samplers.register("two_calls", two_calls_per_step, model_calls=lambda n, **_: 2 * n)
        sampler = samplers.get("two_calls", SCHED, 3, max_steps=5, eta=0.5)
        assert built == [3]
        assert sampler.plan.timesteps.shape == (10,) and int(sampler.plan.num_calls) == 6
        np.testing.assert_array_equal(sampler.plan.timesteps[6:], sampler.plan.timesteps[5])
        assert samplers.model_calls("two_calls", 7) == 14
        # Registered without a count, the family is taken to call once per step: an undercount is refused.
        samplers.register("two_calls", two_calls_per_step)
        with pytest.raises(ValueError, match="planned 6 model calls for 3 steps, more than the 5"):
            samplers.get("two_calls", SCHED, 3, max_steps=5)
    finally:
        samplers._REGISTRY.pop("two_calls", None)
        samplers._MODEL_CALLS.pop("two_calls", None)


def test_steps_start_guidance_and_eta_share_one_compile():
    """What a sampling service changes between requests (number of steps up to max_steps, the
    img2img start step, eta, the guidance scale, the conditioning) reuses one compiled loop; the
    network is traced once."""
    traces = []

    def apply(w, x, t, cond):
        traces.append(1)                                            # runs only while tracing
        return w * jnp.tanh(x + cond[:, None, None, None]) + t[:, None, None, None] / 1000.0

    def run(num_steps, *, start_step=0, eta=0.0, scale=1.0, cond=0.5):
        sampler = samplers.get("ddim", SCHED, num_steps, max_steps=50, eta=eta, start_step=start_step)
        guided = sampling.cfg(jax.tree_util.Partial(apply, jnp.float32(0.9)), scale,
                              jnp.full((SHAPE[0],), cond), jnp.zeros((1,)))
        return sampling.sample(sampler, guided, _noise(), KEY, x0=X0 if start_step else None)

    cache0 = sampling._run._cache_size()
    outs = [run(10), run(25), run(50), run(30, start_step=12), run(30, start_step=3, eta=0.5),
            run(20, scale=7.5), run(20, scale=3.0, cond=-1.0)]
    assert len(traces) == 1 and sampling._run._cache_size() == cache0 + 1
    flat = np.stack([np.asarray(o).ravel() for o in outs])
    assert np.min(np.linalg.norm(flat[:, None] - flat[None], axis=-1) + np.eye(len(outs))) > 1e-3   # all differ
    # Without max_steps a new step count is a new program (so the counters can fail).
    sampling.sample(samplers.get("ddim", SCHED, 11), jax.tree_util.Partial(apply, jnp.float32(0.9), cond=jnp.ones(2)),
                    _noise(), KEY)
    assert sampling._run._cache_size() == cache0 + 2


# --------------------------------------------------------------------------------------------
# img2img against diffusers.
# --------------------------------------------------------------------------------------------

def _img2img_reference(ref, start_step, order=1, **step_kw):
    """diffusers' img2img loop over a scheduler: the trajectory after each remaining call."""
    _float64(ref)
    ref.set_timesteps(N)
    if hasattr(ref, "sigmas"):
        ref.sigmas = ref.sigmas.double()
    begin = start_step * order
    if hasattr(type(ref), "set_begin_index"):           # DDIM keeps no step index
        ref.set_begin_index(begin)
    noise = torch.from_numpy(np.asarray(_noise(), np.float64))
    x0 = torch.from_numpy(np.asarray(X0, np.float64))
    timesteps = ref.timesteps[begin:]
    x = ref.add_noise(x0, noise, timesteps[:1])
    module = sys.modules[type(ref).__module__]
    module.torch = _Float64Torch()
    traj = []
    try:
        for t in timesteps:
            out = _model_torch(ref.scale_model_input(x, t), t)
            x = ref.step(out, t, x, **step_kw).prev_sample.double()
            traj.append(x)
    finally:
        module.torch = torch
    return traj


IMG2IMG = [
    ("ddim", {}, lambda: diffusers.DDIMScheduler(**SCHED_CFG), 1),
    ("ddim", {"timestep_spacing": "trailing"}, lambda: diffusers.DDIMScheduler(**SCHED_CFG, timestep_spacing="trailing"), 1),
    ("euler", {}, lambda: diffusers.EulerDiscreteScheduler(**SCHED_CFG), 1),
    ("euler", {"use_karras_sigmas": True}, lambda: diffusers.EulerDiscreteScheduler(**SCHED_CFG, use_karras_sigmas=True), 1),
    ("heun", {}, lambda: diffusers.HeunDiscreteScheduler(**SCHED_CFG), 2),
    ("dpmpp_2m", {}, lambda: diffusers.DPMSolverMultistepScheduler(**SCHED_CFG), 1),
    ("dpmpp_2m", {"solver_order": 3, "use_karras_sigmas": True},
     lambda: diffusers.DPMSolverMultistepScheduler(**SCHED_CFG, solver_order=3, use_karras_sigmas=True), 1),
    ("unipc", {}, lambda: diffusers.UniPCMultistepScheduler(**SCHED_CFG), 1),
    ("unipc", {"solver_order": 3}, lambda: diffusers.UniPCMultistepScheduler(**SCHED_CFG, solver_order=3), 1),
]


@needs_torch
@pytest.mark.parametrize("start_step", [2, 4])
@pytest.mark.parametrize("name,opts,make_ref,order", IMG2IMG, ids=[f"{c[0]}-{i}" for i, c in enumerate(IMG2IMG)])
def test_img2img_start_matches_diffusers(name, opts, make_ref, order, start_step):
    """A run built with start_step=k from x0 equals diffusers' img2img loop begun at step k: the
    image noised to that level, the multistep history warmed up again from there."""
    ref_traj = _img2img_reference(make_ref(), start_step, order)
    sampler = samplers.get(name, SCHED, N, max_steps=MAX, start_step=start_step, **opts)
    x, traj = _run(sampler, x0=X0)
    first = int(sampler.plan.index)
    assert first == start_step * order
    remaining = np.asarray(traj)[:len(ref_traj)]
    err = _rel_err(remaining, ref_traj)
    assert err < 1e-5, err
    np.testing.assert_array_equal(x, traj[len(ref_traj) - 1])


def test_img2img_from_the_first_step_noises_the_image():
    """start_step=0 with x0: the image noised to the first level, not pure noise, so the result
    depends on x0 (strength 1 in diffusers' terms); without x0 the run is unchanged."""
    sampler = samplers.get("dpmpp_2m", SCHED, N)
    plain = sampling.sample(sampler, MODEL, _noise(), KEY)
    from_image = sampling.sample(sampler, MODEL, _noise(), KEY, x0=X0)
    from_other = sampling.sample(sampler, MODEL, _noise(), KEY, x0=-X0)
    assert not np.allclose(from_image, from_other)
    # At the noisiest level abar ~ 0.005, so the image's contribution is small but present.
    assert 0 < np.linalg.norm(from_image - plain) / np.linalg.norm(plain) < 0.5


def test_plan_options_are_checked():
    with pytest.raises(ValueError, match=r"start_step must be an integer in \[0, num_steps=7\)"):
        samplers.get("ddim", SCHED, N, start_step=7)
    with pytest.raises(ValueError, match="max_steps must be an integer >= num_steps=7"):
        samplers.get("euler", SCHED, N, max_steps=5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'start_step' for sampler 'pndm'"):
        samplers.get("pndm", SCHED, N, start_step=2)
    with pytest.raises(ValueError, match="x0 has shape"):
        sampling.sample(samplers.get("ddim", SCHED, N), MODEL, _noise(), KEY, x0=X0[:1])
    assert "start_step" in samplers.options("unipc") and "start_step" not in samplers.options("pndm")
