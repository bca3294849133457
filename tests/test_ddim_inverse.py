"""DDIM inversion (`samplers.get("ddim_inverse", ...)` run by `sampling.invert`) against diffusers'
`DDIMInverseScheduler`: the whole trajectory, over its options, to 1e-5 relative.

The reference runs in float64: diffusers' own betas, their cumulative product taken in float64
(as jaxdiff plans from float32 betas), float64 samples and model outputs. The model function is
closed-form and depends on the timestep it is called at, so a plan calling it at the wrong level
fails the comparison.

Which timestep the network sees is the pipeline's choice, not the scheduler's: jaxdiff calls it at
the level of the current sample (t - T // N, or 0 at the clean end), the reference loop below does
the same. diffusers' own inverting pipelines (DiffEdit, Pix2Pix-Zero) call it at the target
timestep t instead; `test_the_call_timestep_matters` shows that the two differ.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

T, B, D = 1000, 3, 16


def _model(x, t, xp):
    """A smooth stand-in for a network: bounded, nonlinear in x, and clearly dependent on t
    (x: [B, D], t: [B]); xp is jnp or torch."""
    t = t[:, None] / 137.0
    return 0.8 * xp.tanh(x) + 0.4 * xp.sin(1.7 * x + t) - 0.2 * xp.cos(t)


def _data():
    return np.random.RandomState(0).randn(B, D) * 0.9   # some entries beyond +-1: clipping acts


def _reference(num_steps, *, beta_schedule="scaled_linear", rescale_betas_zero_snr=False,
               call_at="current", **options):
    """diffusers' DDIMInverseScheduler trajectory [N, B, D] (float64)."""
    inv = diffusers.DDIMInverseScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012,
                                         beta_schedule=beta_schedule,
                                         rescale_betas_zero_snr=rescale_betas_zero_snr, **options)
    inv.alphas_cumprod = torch.cumprod(1.0 - inv.betas.double(), 0)
    inv.initial_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if inv.config.set_alpha_to_one
                                 else inv.alphas_cumprod[0])
    inv.set_timesteps(num_steps)
    x = torch.from_numpy(_data())
    traj = []
    for t in inv.timesteps:
        t = int(t)
        level = max(t - T // num_steps, 0) if call_at == "current" else t
        out = _model(x, torch.full((B,), float(level), dtype=torch.float64), torch)
        x = inv.step(out, t, x).prev_sample
        assert x.dtype == torch.float64
        traj.append(x.numpy())
    return np.stack(traj)


def _ours(num_steps, *, beta_schedule="scaled_linear", rescale_betas_zero_snr=False, **options):
    sched = schedules.discrete(beta_schedule, T, beta_start=0.00085, beta_end=0.012,
                               rescale_betas_zero_snr=rescale_betas_zero_snr)
    inverse = samplers.get("ddim_inverse", sched, num_steps, **options)
    fn = lambda x, t: _model(x, t.astype(jnp.float32), jnp)
    latent, traj = sampling.invert(inverse, fn, jnp.asarray(_data(), jnp.float32), return_trajectory=True)
    traj = np.asarray(traj, np.float64)
    assert traj.shape == (num_steps, B, D)
    np.testing.assert_array_equal(traj[-1], latent)
    return traj


def _rel_errors(ours, ref):
    """Per step: max |ours - ref| / max |ref|."""
    return np.abs(ours - ref).max(axis=(1, 2)) / np.abs(ref).max(axis=(1, 2))


# The grid: every combination of spacing, set_alpha_to_one, steps_offset (leading only: trailing
# ignores it in both libraries), prediction type and clipping; "sample" prediction is left out
# with set_alpha_to_one=True, whose first step starts at abar = 1 where x0 carries no information
# about eps (diffusers divides by zero there; jaxdiff's docstring says to use False).
GRID = [dict(timestep_spacing=spacing, set_alpha_to_one=one, steps_offset=offset, prediction_type=pred,
             clip_sample=clip)
        for spacing, one, offset, pred, clip in itertools.product(
            ("leading", "trailing"), (True, False), (0, 1), ("epsilon", "v_prediction", "sample"), (False, True))
        if not (spacing == "trailing" and offset) and not (pred == "sample" and one)]


@pytest.mark.parametrize("options", GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_trajectory_matches_diffusers(options):
    num_steps = 10 if options["timestep_spacing"] == "leading" else 7   # 7: T // N = 142 does not divide T
    ref = _reference(num_steps, **options)
    ours = _ours(num_steps, **options)
    errs = _rel_errors(ours, ref)
    print(f"max relative error {errs.max():.1e}")
    assert errs.max() < 1e-5, errs                                             # measured <= 3e-7
    assert np.isfinite(ref).all() and _distance(ref[-1], _data()) > 0.3       # it travelled


@pytest.mark.parametrize("case", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="squaredcos_cap_v2", clip_sample=False),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False),
    dict(clip_sample=True, clip_sample_range=0.5),
    dict(prediction_type="v_prediction", set_alpha_to_one=False, clip_sample=False),
])
def test_schedules_and_clip_range_match_diffusers(case):
    ref = _reference(20, **case)
    errs = _rel_errors(_ours(20, **case), ref)
    assert errs.max() < 1e-5, errs


def _distance(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_every_option_changes_the_trajectory():
    """So the parity above can fail: each option, flipped alone, moves the reference by far more
    than the tolerance."""
    base = dict(timestep_spacing="leading", set_alpha_to_one=False, steps_offset=0,
                prediction_type="epsilon", clip_sample=True)
    ref = _reference(10, **base)
    flips = dict(timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=1,
                 prediction_type="v_prediction", clip_sample=False)
    for name, value in flips.items():
        moved = _distance(_reference(10, **{**base, name: value}), ref)
        assert moved > 1e-3, (name, moved)
    assert _distance(_reference(10, **{**base, "prediction_type": "sample"}), ref) > 1e-3
    assert _distance(_reference(10, **{**base, "clip_sample_range": 0.5}), ref) > 1e-3
    assert _distance(_reference(10, **base, beta_schedule="linear"), ref) > 1e-3


def test_the_call_timestep_matters():
    """The network evaluated at the target timestep (diffusers' inverting pipelines) instead of the
    current level (jaxdiff) gives another latent: the reference above is not blind to it."""
    options = dict(timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)
    ours = _ours(10, **options)
    assert _rel_errors(ours, _reference(10, **options)).max() < 1e-5
    at_target = _reference(10, call_at="target", **options)
    assert _distance(ours, at_target) > 1e-2, _distance(ours, at_target)


def test_inversion_runs_ddim_backwards():
    """Closed form: with a network that ignores x, each DDIM step is affine, and the inverse's
    step k undoes the forward step N - 1 - k exactly (both use the same pair of levels): one
    inverse step followed by the matching forward step returns the input."""
    sched = schedules.discrete("scaled_linear", T, beta_start=0.00085, beta_end=0.012)
    x = jnp.asarray(_data(), jnp.float32)
    eps = jnp.asarray(np.random.RandomState(1).randn(B, D), jnp.float32)
    fn = lambda x, t: eps
    num_steps = 10
    inverse = samplers.get("ddim_inverse", sched, num_steps, clip_sample=False, set_alpha_to_one=False)
    forward = samplers.get("ddim", sched, num_steps, clip_sample=False, set_alpha_to_one=False)
    _, traj = sampling.invert(inverse, fn, x, return_trajectory=True)
    back = sampling.sample(forward, fn, traj[-1], jax.random.PRNGKey(0), return_trajectory=True)[1]
    # forward step j maps inverse state N-1-j to N-2-j; the last forward step lands on the data
    np.testing.assert_allclose(np.asarray(back[-1]), np.asarray(x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(back[:-1]), np.asarray(traj[:-1][::-1]), atol=1e-5)
    assert math.isfinite(float(jnp.abs(traj[-1]).max())) and float(jnp.abs(traj[-1] - x).max()) > 0.5
