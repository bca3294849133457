"""Deep feature reuse (DeepCache, Ma et al. 2023): the U-Net's full call also returns its deep
feature and a shallow call runs from a cached one; the sampling loop carries the cache and runs
the whole network every k-th call, with k traced (k = 1 is the plain run); it composes with
classifier-free guidance and its truncation; the pixel and Stable Diffusion front ends take
`deep_cache=k`."""

import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff import samplers, sampling, schedules
from jaxdiff.models.unet import UNet
from jaxdiff.pipelines import core, pixel

SCHEDULE = schedules.discrete("scaled_linear", 1000, 0.00085, 0.012)
UNET = UNet(out_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
            num_groups=4, num_classes=3)
SHAPE = (2, 8, 8, 3)
NOISE = jax.random.normal(jax.random.PRNGKey(0), SHAPE, jnp.float32)
LABELS = jnp.asarray([0, 2], jnp.int32)
KEY = jax.random.PRNGKey(1)
COMPILE = "/jax/core/compile/backend_compile_duration"


def _params():
    """Random parameters with the zero-initialised output conv perturbed, so outputs depend on
    every block."""
    params = UNET.init(jax.random.PRNGKey(2), **UNET.example_inputs(2, 16))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


PARAMS = _params()


def network(params, x, t, labels):
    return UNET.apply({"params": params}, x, t, labels)


def reusing(params, x, t, labels, feature):
    return UNET.apply({"params": params}, x, t, labels, deep_feature=feature, return_deep_feature=True)


def _plain_fn():
    return jax.tree_util.Partial(core._conditional, jax.tree_util.Partial(network, PARAMS), LABELS)


def _reusing_fn():
    return jax.tree_util.Partial(core._conditional_reusing, jax.tree_util.Partial(reusing, PARAMS), LABELS)


def _sampler(steps=6, **kw):
    return samplers.get("ddim", SCHEDULE, steps, **kw)


# --------------------------------------------------------------------------------------------
# The U-Net's two calls.


def test_full_call_returns_the_plain_output_and_the_feature_the_shallow_call_continues_from():
    t = jnp.asarray([700.0, 300.0])
    plain = UNET.apply({"params": PARAMS}, NOISE, t, LABELS)
    out, feature = UNET.apply({"params": PARAMS}, NOISE, t, LABELS, return_deep_feature=True)
    np.testing.assert_array_equal(out, plain)
    assert feature.shape == UNET.deep_feature_shape(SHAPE) == (2, 8, 8, 16)
    # from its own feature the shallow branch recomputes the same output
    again, same = UNET.apply({"params": PARAMS}, NOISE, t, LABELS, deep_feature=feature, return_deep_feature=True)
    np.testing.assert_allclose(again, plain, atol=1e-5)
    assert same is feature
    # from another input's feature it differs: the deep part really is taken from the cache
    _, other = UNET.apply({"params": PARAMS}, NOISE[::-1], t, LABELS, return_deep_feature=True)
    assert np.abs(np.asarray(UNET.apply({"params": PARAMS}, NOISE, t, LABELS, deep_feature=other)) - plain).max() > 1e-2


def test_shallow_call_skips_the_deep_blocks():
    t = jnp.full((2,), 500.0)
    feature = jnp.zeros(UNET.deep_feature_shape(SHAPE))

    def flops(**kw):
        fn = jax.jit(lambda p, x: UNET.apply({"params": p}, x, t, LABELS, **kw))
        return fn.lower(PARAMS, NOISE).compile().cost_analysis()["flops"]

    full, shallow = flops(return_deep_feature=True), flops(deep_feature=feature)
    assert shallow < 0.6 * full, (shallow, full)


def test_bad_cache_points_are_one_line_errors():
    with pytest.raises(ValueError, match="cache_level must be an integer in \\[1, 1\\]"):
        UNET.apply({"params": PARAMS}, NOISE, jnp.zeros(2), LABELS, return_deep_feature=True, cache_level=2)
    with pytest.raises(ValueError, match="deep_feature must have shape \\[2, 8, 8, 16\\]"):
        UNET.apply({"params": PARAMS}, NOISE, jnp.zeros(2), LABELS, deep_feature=jnp.zeros((2, 4, 4, 16)))


# --------------------------------------------------------------------------------------------
# The loop.


def _close_but_not_equal(got, plain, unrelated):
    """A non-trivial difference from the plain result, well under that of an unrelated sample."""
    diff, scale = np.abs(got - plain).mean(), np.abs(unrelated - plain).mean()
    assert 1e-3 < diff < 0.3 * scale, (diff, scale)


def test_k1_is_the_plain_run_and_k2_differs_but_stays_close():
    sampler = _sampler()
    plain = np.asarray(sampling.sample(sampler, _plain_fn(), NOISE, KEY))
    unrelated = np.asarray(sampling.sample(sampler, _plain_fn(), NOISE[::-1], KEY))
    one = np.asarray(sampling.sample(sampler, _reusing_fn(), NOISE, KEY, reuse_every=1))
    two = np.asarray(sampling.sample(sampler, _reusing_fn(), NOISE, KEY, reuse_every=2))
    np.testing.assert_allclose(one, plain, atol=1e-6)
    _close_but_not_equal(two, plain, unrelated)


CALLS = []


def _note(kind, t):
    CALLS.append((kind, int(t[0])))


def stub(x, t, feature):
    """A reuse-convention model_fn that records which branch ran; its feature remembers t."""
    if feature is None:
        jax.debug.callback(_note, "full", t)
        return 0.1 * x, t
    jax.debug.callback(_note, "shallow", feature)
    return 0.1 * x, feature


@pytest.mark.parametrize("every", [1, 3])
def test_the_full_calls_are_every_kth_from_the_first_call_of_a_late_padded_start(every):
    sampler = _sampler(7, max_steps=10, start_step=2)              # five real calls, ten planned
    CALLS.clear()
    jax.block_until_ready(sampling.sample(sampler, jax.tree_util.Partial(stub), NOISE, KEY, reuse_every=every))
    timesteps = [int(v) for v in np.asarray(sampler.plan.timesteps)[2:7]]
    kinds = [k for k, _ in CALLS]
    assert kinds == (["full"] * 5 if every == 1 else ["full", "shallow", "shallow", "full", "shallow"])
    # a shallow call reads the feature of the last full call
    assert [t for _, t in CALLS] == ([timesteps[i] for i in (0, 1, 2, 3, 4)] if every == 1
                                     else [timesteps[i] for i in (0, 0, 0, 3, 3)])


def test_every_k_runs_one_compiled_program():
    noise = jax.random.normal(jax.random.PRNGKey(5), (3, 8, 8, 3))       # a shape no other test compiles
    fn = jax.tree_util.Partial(core._conditional_reusing, jax.tree_util.Partial(reusing, PARAMS),
                               jnp.asarray([0, 1, 2], jnp.int32))
    compiles = collections.Counter()

    def listen(event, duration, **kw):
        if event == COMPILE:
            compiles[kw.get("fun_name", "?")] += 1

    sampler = _sampler()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        outs = [np.asarray(sampling.sample(sampler, fn, noise, KEY, reuse_every=k)) for k in (1, 2, 3)]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles["jit(_run)"] == 1, compiles
    assert not np.array_equal(outs[1], outs[2])


def test_bad_intervals_are_one_line_errors():
    for bad in (0, -2, 2.5, True, "3", 10 ** 6):
        with pytest.raises(ValueError, match="reuse_every must be an integer from 1 to 1000"):
            sampling.sample(_sampler(), _reusing_fn(), NOISE, KEY, reuse_every=bad)


# --------------------------------------------------------------------------------------------
# With classifier-free guidance.


def guided_net(params, x, t, labels, *feature):
    if feature:
        return reusing(params, x, t, labels, feature[0])
    return network(params, x, t, labels)


def _cfg(reuse, cutoff=None):
    net = jax.tree_util.Partial(guided_net, PARAMS)
    return sampling.cfg(net, 1.5, LABELS, jnp.full((1,), 3, jnp.int32), guidance_cutoff=cutoff, reuse=reuse)


def test_with_guidance_and_its_truncation_k1_is_the_plain_run():
    sampler = _sampler()
    cutoff = sampling.guidance_cutoff(sampler, 0.5)
    for c in (None, cutoff):
        plain = np.asarray(sampling.sample(sampler, _cfg(False, c), NOISE, KEY))
        one = np.asarray(sampling.sample(sampler, _cfg(True, c), NOISE, KEY, reuse_every=1))
        two = np.asarray(sampling.sample(sampler, _cfg(True, c), NOISE, KEY, reuse_every=2))
        np.testing.assert_allclose(one, plain, atol=1e-5)
        _close_but_not_equal(two, plain, np.asarray(sampling.sample(sampler, _cfg(False, c), NOISE[::-1], KEY)))


def test_unguided_calls_read_the_conditional_half_of_the_cache():
    def net(x, t, cond, feature):                 # the output is the feature; a full call's is cond
        if feature is None:
            feature = jnp.broadcast_to(cond[:, None], x.shape[:2]).astype(jnp.float32)      # [rows, H]
        return jnp.broadcast_to(feature[:, :, None, None], x.shape), feature

    cond, uncond = jnp.asarray([1.0, 2.0]), jnp.asarray([0.0])
    x, late = jnp.zeros(SHAPE), jnp.full((2,), 100.0)
    guided = sampling.cfg(jax.tree_util.Partial(net), 3.0, cond, uncond, guidance_cutoff=500.0, reuse=True)
    _, cache = guided(x, jnp.full((2,), 900.0), None)             # a full guided call: rows [uncond; cond]
    np.testing.assert_array_equal(cache[:, 0], [0.0, 0.0, 1.0, 2.0])
    out, kept = guided(x, late, cache)                           # an unguided shallow call
    np.testing.assert_array_equal(out[:, 0, 0, 0], [1.0, 2.0])
    _, fresh = guided(x, late, None)                             # an unguided full call fills both halves
    np.testing.assert_array_equal(fresh[:, 0], [1.0, 2.0, 1.0, 2.0])


# --------------------------------------------------------------------------------------------
# The front ends.


@pytest.fixture(scope="module")
def model():
    unet = UNet(out_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
                num_groups=4, num_classes=3)
    params = unet.init(jax.random.PRNGKey(0), **unet.example_inputs(1, 8, 1))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    config = ml_collections.ConfigDict({"diffusion": {"prediction_type": "epsilon"}})
    return pixel.DiffusionModel(config=config, module=unet, schedule=SCHEDULE, params=params, ema_params=params,
                                image_shape=(8, 8, 1))


def test_pixel_front_end_takes_deep_cache(model):
    opts = dict(num_steps=4, seed=0, labels=[0, 1], guidance_scale=2.0, output_type="latent")
    plain = model.sample(2, **opts)
    np.testing.assert_array_equal(model.sample(2, deep_cache=1, **opts), plain)        # 1: off
    _close_but_not_equal(model.sample(2, deep_cache=2, **opts), plain, model.sample(2, **{**opts, "seed": 1}))
    for bad in (-1, 2.5, True, 5000):
        with pytest.raises(ValueError, match="deep_cache must be an integer from 1 to 1000"):
            model.sample(2, deep_cache=bad, **opts)


def test_deep_cache_needs_a_unet():
    job = core.Job(network=network, params=PARAMS, sampler=_sampler(), shape=SHAPE[1:], num=2, deep_cache=2)
    with pytest.raises(ValueError, match="deep_cache needs a U-Net"):
        core.check(job)


@pytest.mark.slow
def test_stable_diffusion_front_end_takes_deep_cache(tmp_path):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from test_pipeline_sd import _components, _pipeline

    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    _pipeline(diffusers.StableDiffusionPipeline, _components(tmp_path, 4, scheduler)).save_pretrained(
        str(tmp_path / "model"), safe_serialization=True)
    pipe = StableDiffusion.from_pretrained(tmp_path / "model")
    opts = dict(num_steps=6, seed=0, output_type="latent", guidance_scale=3.0)
    plain = pipe("a cat", **opts)
    np.testing.assert_array_equal(pipe("a cat", deep_cache=0, **opts), plain)                  # 0: off
    _close_but_not_equal(pipe("a cat", deep_cache=2, **opts), plain, pipe("a cat", **{**opts, "seed": 1}))
    cut = pipe("a cat", deep_cache=2, guidance_end=0.5, **opts)
    assert np.isfinite(cut).all() and not np.array_equal(cut, plain)
    with pytest.raises(ValueError, match="deep_cache must be an integer from 1 to 1000"):
        pipe("a cat", deep_cache=-3, **opts)
