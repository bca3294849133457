"""Classifier-free guidance (`sampling.cfg`): closed form, diffusers' rescale, traced knobs, and
use with every registered sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules

SHAPE = (3, 4, 4, 2)
KEY = jax.random.PRNGKey(0)


def _net(w, x, t, cond):
    """A conditional 'network': x [2B, ...], t [2B], cond {"emb": [2B, 2], "gain": [2B]}."""
    emb = cond["emb"][:, None, None, :]                                   # [2B, 1, 1, 2]
    gain = cond["gain"][:, None, None, None]
    return w * jnp.tanh(x * gain + emb) + 0.1 * jnp.cos(t / 300.0)[:, None, None, None]


def _cond(seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"emb": jax.random.normal(k1, (SHAPE[0], 2)), "gain": 1.0 + 0.3 * jax.random.normal(k2, (SHAPE[0],))}


UNCOND = {"emb": jnp.zeros((1, 2)), "gain": jnp.ones((1,))}      # one null conditioning, broadcast
NET = jax.tree_util.Partial(_net, jnp.float32(0.8))


def _x(seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), SHAPE)


def _numpy_cfg(x, t, cond, scale, rescale):
    """The closed form in float64 numpy (population std; the ratio is the same either way)."""
    def net(c):
        return np.asarray(_net(jnp.float32(0.8), x, t, jax.tree.map(jnp.asarray, c)), np.float64)
    unc = {"emb": np.zeros((SHAPE[0], 2)), "gain": np.ones((SHAPE[0],))}
    out_c, out_u = net(cond), net(unc)
    g = out_u + scale * (out_c - out_u)
    std = lambda a: a.reshape(len(a), -1).std(axis=1)[:, None, None, None]       # noqa: E731
    return rescale * g * std(out_c) / std(g) + (1 - rescale) * g, out_c, out_u


@pytest.mark.parametrize("scale,rescale", [(7.5, 0.0), (7.5, 0.7), (1.0, 0.0), (0.0, 0.0), (3.0, 1.0)])
def test_cfg_matches_closed_form(scale, rescale):
    x, t, cond = _x(), jnp.full((SHAPE[0],), 500.0), _cond(2)
    out = sampling.cfg(NET, scale, cond, UNCOND, guidance_rescale=rescale)(x, t)
    expect, out_c, out_u = _numpy_cfg(x, t, cond, scale, rescale)
    assert out.shape == SHAPE and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expect, rtol=2e-5, atol=2e-5)
    if scale == 1.0:
        np.testing.assert_allclose(out, out_c, rtol=1e-6, atol=1e-6)       # w = 1: the conditional model
    if scale == 0.0:
        np.testing.assert_allclose(out, out_u, rtol=1e-6, atol=1e-6)       # w = 0: the unconditional one
    if rescale == 1.0:                                                     # phi = 1: std matches the conditional
        std = lambda a: np.asarray(a).reshape(SHAPE[0], -1).std(axis=1)    # noqa: E731
        np.testing.assert_allclose(std(out), std(out_c), rtol=1e-5)


def test_rescale_matches_diffusers():
    torch = pytest.importorskip("torch")
    try:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    except ImportError:
        pytest.skip("diffusers' rescale_noise_cfg not importable")
    g, c = jax.random.normal(jax.random.PRNGKey(3), SHAPE) * 2.0, jax.random.normal(jax.random.PRNGKey(4), SHAPE)
    for phi in (0.0, 0.3, 0.7, 1.0):
        ref = rescale_noise_cfg(torch.from_numpy(np.asarray(g, np.float64)),
                                torch.from_numpy(np.asarray(c, np.float64)), guidance_rescale=phi).numpy()
        np.testing.assert_allclose(sampling.rescale_guidance(g, c, phi), ref, rtol=1e-5, atol=1e-6)


def test_one_batched_network_call():
    calls = []

    def spy(x, t, cond):
        calls.append((x.shape, t.shape, jax.tree.map(jnp.shape, cond)))
        return _net(0.8, x, t, cond)

    sampling.cfg(spy, 5.0, _cond(2), UNCOND)(_x(), jnp.full((SHAPE[0],), 10.0))
    assert calls == [((6,) + SHAPE[1:], (6,), {"emb": (6, 2), "gain": (6,)})]


def test_new_scales_and_conditioning_do_not_recompile():
    traces = []

    def counted(x, t, cond):
        traces.append(1)                                 # runs only while tracing
        return _net(0.8, x, t, cond)

    sampler = samplers.get("euler", schedules.discrete("linear"), 6)
    noise = _x(5)
    cache0 = sampling._run._cache_size()
    outs = [sampling.sample(sampler, sampling.cfg(counted, w, _cond(c), UNCOND, guidance_rescale=phi), noise, KEY)
            for w, phi, c in [(7.5, 0.0, 2), (3.0, 0.0, 2), (3.0, 0.7, 2), (3.0, 0.7, 9)]]
    assert len(traces) == 1 and sampling._run._cache_size() == cache0 + 1
    for a, b in zip(outs, outs[1:]):                     # each knob really changed the run
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


@pytest.mark.parametrize("name", sorted(set(samplers.names()) - {"ddim_inverse"}))
def test_cfg_works_with_every_sampler(name):
    """With w = 1 guidance is the conditional model, through any sampler; w = 4 differs."""
    sched = schedules.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    sampler = samplers.get(name, sched, 4)
    cond, noise = _cond(2), _x(6)
    direct = jax.tree_util.Partial(lambda c, x, t: _net(0.8, x, t, c), cond)
    ref = np.asarray(sampling.sample(sampler, direct, noise, KEY))
    one = np.asarray(sampling.sample(sampler, sampling.cfg(NET, 1.0, cond, UNCOND), noise, KEY))
    four = np.asarray(sampling.sample(sampler, sampling.cfg(NET, 4.0, cond, UNCOND), noise, KEY))
    assert np.all(np.isfinite(four))
    np.testing.assert_allclose(one, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(four - ref).max() > 1e-3
