"""jaxdiff.load(...).sample(...): reproducible, guided through sampling.cfg, validated inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import sampling, samplers
from conftest import train_tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("run"), batch_size=16, steps=4)


@pytest.fixture(scope="module")
def model(run_dir):
    return jaxdiff.load(run_dir)


def test_from_pretrained_opens_a_training_run(run_dir, model):
    other = jaxdiff.from_pretrained(run_dir)
    assert isinstance(other, jaxdiff.DiffusionModel)
    np.testing.assert_array_equal(other.sample(2, num_steps=3, seed=5), model.sample(2, num_steps=3, seed=5))


def test_loaded_model_has_config_params_and_ema(model):
    assert model.config.train.steps == 4
    assert model.image_shape == (16, 16, 1) and model.num_classes == 10
    assert jax.tree.structure(model.params) == jax.tree.structure(model.ema_params)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(model.ema_params)))


def test_sample_is_reproducible_from_the_seed(model):
    a = model.sample(3, num_steps=4, seed=5, labels=[1, 2, 3])
    b = model.sample(3, num_steps=4, seed=5, labels=[1, 2, 3])
    c = model.sample(3, num_steps=4, seed=6, labels=[1, 2, 3])
    assert a.dtype == np.uint8 and a.shape == (3, 16, 16, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # sampling in two batches gives the same images as one
    np.testing.assert_array_equal(model.sample(3, num_steps=4, seed=5, labels=[1, 2, 3], batch_size=2), a)


def test_guidance_matches_the_closed_form(model):
    """model.sample's guided run == a DDIM run whose model_fn applies uncond + s (cond - uncond)."""
    s, labels = 3.0, jnp.array([4, 7])
    params = model.ema_params

    def guided(x, t):
        cond = model.module.apply({"params": params}, x, t, labels)
        uncond = model.module.apply({"params": params}, x, t, jnp.full_like(labels, 10))
        return uncond + s * (cond - uncond)

    key = jax.random.PRNGKey(0)
    k_noise, k_sample = jax.random.split(key)
    noise = jax.random.normal(k_noise, (2, 16, 16, 1))
    plan = samplers.get("ddim", model.schedule, 4, prediction_type="v_prediction", use_clipped_model_output=True)
    want = jaxdiff.images.to_uint8(jaxdiff.images.to_unit(sampling.sample(plan, guided, noise, jax.random.fold_in(k_sample, 0))))
    got = model.sample(2, sampler="ddim", num_steps=4, seed=0, labels=[4, 7], guidance_scale=s)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1      # rounding to uint8 only
    unguided = model.sample(2, num_steps=4, seed=0, labels=[4, 7])
    np.testing.assert_array_equal(model.sample(2, num_steps=4, seed=0, labels=[4, 7], guidance_scale=1.0), unguided)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=[1, 2]), "expected 3 labels"),
    (dict(labels=[0, 1, 10]), r"labels must lie in \[0, 9\]"),
    (dict(sampler="nope"), "nope"),
    (dict(eta=2.0), "eta"),
])
def test_bad_sampling_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.sample(3, num_steps=4, **kwargs)
