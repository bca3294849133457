"""Truncated classifier-free guidance (`guidance_end`): guidance for the first fraction of the model
calls, the conditional prediction alone after. The fraction is traced, so every fraction runs
through one compiled loop; at 1 it is plain CFG, at 0 the conditional run, in between the guided
trajectory up to the cut, and the unguided calls evaluate only the B conditional rows."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules, sharding
from jaxdiff.pipelines import core
from jaxdiff.pipelines.stable_diffusion import GenerateOptions

TRACE = "/jax/core/compile/jaxpr_trace_duration"
SHAPE = (2, 4, 4, 3)
KEY = jax.random.PRNGKey(3)
ROWS = []                                  # the batch of every network call, in call order


def _record(rows):
    ROWS.append(int(rows))


def network(params, x, t, cond):
    """A fixed smooth conditional 'network': x [B, 4, 4, 3], t [B], cond {"c": [B, 3]}."""
    jax.debug.callback(_record, x.shape[0])
    t = t[:, None, None, None]
    c = cond["c"][:, None, None, :]
    return params * jnp.tanh(x + c * jnp.sin(t / 200.0)) + 0.1 * c


def _sampler(**kw):
    return samplers.get("ddim", schedules.discrete("scaled_linear", 1000, 0.00085, 0.012), 8, **kw)


COND = {"c": jnp.asarray([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], jnp.float32)}
UNCOND = {"c": jnp.zeros((1, 3), jnp.float32)}
NOISE = jax.random.normal(jax.random.PRNGKey(0), SHAPE, jnp.float32)
NET = jax.tree_util.Partial(network, jnp.float32(0.9))


def _run(sampler, fn):
    ROWS.clear()
    x, traj = sampling.sample(sampler, fn, NOISE, KEY, return_trajectory=True)
    jax.block_until_ready(x)
    return np.asarray(traj), list(ROWS)


def _truncated(sampler, end):
    return sampling.cfg(NET, 3.0, COND, UNCOND, guidance_cutoff=sampling.guidance_cutoff(sampler, end))


def test_the_ends_are_plain_cfg_and_the_conditional_run_and_compile_once():
    sampler = _sampler()
    plain, plain_rows = _run(sampler, sampling.cfg(NET, 3.0, COND, UNCOND))
    conditional, _ = _run(sampler, jax.tree_util.Partial(core._conditional, NET, COND))
    traces = collections.Counter()

    def listen(event, duration, **kw):
        if event == TRACE:
            traces[kw.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        runs = {end: _run(sampler, _truncated(sampler, end)) for end in (1.0, 0.0, 0.5, 0.25)}
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert traces["_run"] == 1, traces                          # one program for every fraction
    np.testing.assert_allclose(runs[1.0][0], plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(runs[0.0][0], conditional, rtol=1e-6, atol=1e-6)
    assert plain_rows == [4] * 8 and runs[1.0][1] == [4] * 8 and runs[0.0][1] == [2] * 8
    half, half_rows = runs[0.5]
    assert half_rows == [4] * 4 + [2] * 4                       # guided for 4 calls, then B rows only
    np.testing.assert_allclose(half[:4], plain[:4], rtol=1e-6, atol=1e-6)
    assert np.abs(half[4:] - plain[4:]).max() > 1e-2            # the cut matters ...
    assert np.abs(half - conditional).max() > 1e-2              # ... and so does the guided part
    assert runs[0.25][1] == [4] * 2 + [2] * 6


def test_the_cut_counts_the_calls_a_late_start_makes():
    sampler = _sampler(start_step=4)                              # 4 of the 8 calls remain
    ts = np.asarray(sampler.plan.timesteps)
    assert sampling.guidance_cutoff(sampler, 0.5) == ts[6]
    assert sampling.guidance_cutoff(sampler, 1.0) == -np.inf
    assert sampling.guidance_cutoff(sampler, 0.0) == ts[4]
    padded = samplers.get("ddim", schedules.discrete("scaled_linear", 1000, 0.00085, 0.012), 8, max_steps=20)
    assert sampling.guidance_cutoff(padded, 0.5) == np.asarray(padded.plan.timesteps)[4]
    with pytest.raises(ValueError, match=r"guidance_end must lie in \[0, 1\], got 1.5"):
        sampling.guidance_cutoff(sampler, 1.5)


def _core_network(params, x, t, cond):
    return params * jnp.tanh(x + cond["c"][:, None, None, :] * jnp.sin(t[:, None, None, None] / 200.0))


def test_the_core_job_and_the_sd_options_take_guidance_end():
    mesh = sharding.make_mesh(jax.devices()[:1])
    job = core.Job(network=_core_network, params=jnp.float32(0.9), sampler=_sampler(), shape=SHAPE[1:], num=2,
                   cond={"c": np.asarray(COND["c"])}, uncond={"c": np.zeros((1, 3), np.float32)},
                   guidance_scale=3.0)
    plain = core.run(job, mesh, output_type="latent")
    same = core.run(dataclasses.replace(job, guidance_end=1.0), mesh, output_type="latent")
    cut = core.run(dataclasses.replace(job, guidance_end=0.5), mesh, output_type="latent")
    np.testing.assert_allclose(same, plain, rtol=1e-6, atol=1e-6)
    assert np.abs(cut - plain).max() > 1e-3
    with pytest.raises(ValueError, match=r"guidance_end must lie in \[0, 1\], got 2"):
        core.check(dataclasses.replace(job, guidance_end=2.0))
    assert GenerateOptions.parse({"guidance_end": 0.3}).guidance_end == 0.3
    with pytest.raises(ValueError, match="guidance_end must lie in"):
        GenerateOptions.parse({"guidance_end": -0.1})
