"""The pieces of the pure training step, each against its closed form: the EMA warm start, label and
context dropout for guidance, the loss's draws (t over every training timestep, the key split) and
what it hands the network, and one update of `train_step` (key folded with the step, gradient,
step count, EMA, grad norm). Tiny functions, no U-Net: each check runs in well under a second."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import parameterization
from jaxdiff.train import state as state_lib
from jaxdiff.train.step import (
    context_condition,
    ema_update,
    label_condition,
    label_dropper,
    make_loss_fn,
    make_train_step,
)


def _tree(scale):
    return {"a": jnp.full((3,), 1.0 * scale), "b": {"c": jnp.arange(4.0) * scale}}


@pytest.mark.parametrize("step, expected", [(0, 0.1), (5, 6 / 15), (1000, 1001 / 1010), (100_000, 0.999)])
def test_ema_decay_warms_up_to_its_cap(step, expected):
    ema, params = _tree(1.0), _tree(3.0)
    out = ema_update(ema, params, 0.999, jnp.asarray(step, jnp.int32))
    for e, p, o in zip(jax.tree.leaves(ema), jax.tree.leaves(params), jax.tree.leaves(out)):
        np.testing.assert_allclose(o, expected * np.asarray(e) + (1 - expected) * np.asarray(p), rtol=1e-6)


def test_label_dropout_replaces_exactly_the_drawn_labels():
    labels = jnp.arange(64, dtype=jnp.int32) % 10
    key = jax.random.PRNGKey(3)
    assert label_dropper(0.5, None)(labels, key) is None
    np.testing.assert_array_equal(label_dropper(0.0, 10)(labels, key), labels)
    np.testing.assert_array_equal(label_dropper(1.0, 10)(labels, key), np.full(64, 10))
    dropped = np.asarray(label_dropper(0.25, 10)(labels, key))
    drawn = np.asarray(jax.random.uniform(key, (64,))) < 0.25
    assert 0 < drawn.sum() < 64
    np.testing.assert_array_equal(dropped, np.where(drawn, 10, np.asarray(labels)))


def test_label_condition_passes_labels_only_to_class_networks():
    batch = {"label": jnp.asarray([1, 2, 3], jnp.int32)}
    key = jax.random.PRNGKey(0)
    assert label_condition(0.5, None)(batch, key) == {}
    out = label_condition(0.0, 7)(batch, key)
    assert list(out) == ["labels"]
    np.testing.assert_array_equal(out["labels"], [1, 2, 3])


def test_context_dropout_replaces_whole_captions():
    b, s, d = 32, 3, 2
    context = jax.random.normal(jax.random.PRNGKey(1), (b, s, d))
    null = jnp.full((s, d), -5.0)
    key = jax.random.PRNGKey(4)
    np.testing.assert_array_equal(context_condition(0.0, null)({"context": context}, key)["context"], context)
    np.testing.assert_array_equal(context_condition(1.0, null)({"context": context}, key)["context"],
                                  np.broadcast_to(null, (b, s, d)))
    out = np.asarray(context_condition(0.3, null)({"context": context}, key)["context"])
    drawn = np.asarray(jax.random.uniform(key, (b, 1, 1))) < 0.3
    assert 0 < drawn.sum() < b
    np.testing.assert_array_equal(out, np.where(drawn, np.asarray(null)[None], np.asarray(context)))


def _abar(num_t=8):
    return jnp.asarray(np.linspace(0.99, 0.05, num_t), jnp.float32)


@pytest.mark.parametrize("prediction_type", parameterization.PREDICTION_TYPES)
def test_loss_draws_and_network_call_by_hand(prediction_type):
    """loss = mean_b mean((f(x_t, t) - target)^2) with (t, eps, dropout key) drawn from the four-way
    split of the key, t uniform over all T training timesteps, and the network called with
    train=True, t as float32 and the dropout key."""
    num_t, batch = 8, 256
    alphas_cumprod = _abar(num_t)
    seen = {}

    def apply_fn(variables, x_t, t, *, train, rngs, labels):
        seen.update(train=train, rngs=rngs, labels=labels, t=t)
        w = variables["params"]["w"]
        return w * x_t + 0.01 * t[:, None, None, None] + jax.random.normal(rngs["dropout"], x_t.shape) * 0.1

    x0 = jax.random.normal(jax.random.PRNGKey(5), (batch, 2, 2, 1))
    batch_dict = {"image": x0, "label": jnp.arange(batch, dtype=jnp.int32) % 3}
    key = jax.random.PRNGKey(11)
    loss = make_loss_fn(apply_fn, alphas_cumprod, prediction_type=prediction_type, null_label=3)(
        {"w": jnp.float32(0.7)}, batch_dict, key)

    k_t, k_eps, _, k_drop = jax.random.split(key, 4)
    t = np.asarray(jax.random.randint(k_t, (batch,), 0, num_t))
    assert set(t.tolist()) == set(range(num_t))          # every training timestep is drawn, none past T - 1
    eps = jax.random.normal(k_eps, x0.shape)
    abar = np.asarray(alphas_cumprod)[t]
    a, s = np.sqrt(abar)[:, None, None, None], np.sqrt(1 - abar)[:, None, None, None]
    x_t = a * np.asarray(x0) + s * np.asarray(eps)
    pred = 0.7 * x_t + 0.01 * t[:, None, None, None] + np.asarray(jax.random.normal(k_drop, x0.shape)) * 0.1
    target = {"epsilon": np.asarray(eps), "sample": np.asarray(x0),
              "v_prediction": a * np.asarray(eps) - s * np.asarray(x0)}[prediction_type]
    np.testing.assert_allclose(float(loss), np.mean((pred - target) ** 2), rtol=1e-5)
    assert seen["train"] is True and seen["t"].dtype == jnp.float32
    np.testing.assert_array_equal(seen["t"], t.astype(np.float32))
    np.testing.assert_array_equal(seen["labels"], batch_dict["label"])


def test_train_step_one_update_by_hand():
    """One SGD update: the key is fold_in(rng, step), params move by -lr * grad, the step
    count grows by one, the EMA uses the step before the update, grad_norm is the global norm."""
    lr = 0.1
    params = {"w": jnp.asarray([1.0, -2.0, 0.5]), "v": jnp.asarray([[0.3, 0.4]])}

    def loss_fn(p, batch, key):
        noise = jax.random.normal(key, (3,))
        return jnp.sum((p["w"] - batch["y"]) ** 2 * (1.0 + noise ** 2)) + jnp.sum(p["v"] ** 2)

    tx = optax.sgd(lr)
    state = state_lib.create(params, tx, jax.random.PRNGKey(9))
    state = state.replace(step=jnp.asarray(4, jnp.int32), ema_params=jax.tree.map(lambda x: x * 0.0, params))
    batch = {"y": jnp.asarray([0.5, 0.5, 0.5])}
    new, metrics = jax.jit(make_train_step(loss_fn, tx, ema_decay=0.9))(state, batch)

    key = jax.random.fold_in(jax.random.PRNGKey(9), 4)
    noise = np.asarray(jax.random.normal(key, (3,)))
    w, y = np.asarray(params["w"]), np.asarray(batch["y"])
    grad_w = 2 * (w - y) * (1 + noise ** 2)
    grad_v = 2 * np.asarray(params["v"])
    np.testing.assert_allclose(float(metrics["loss"]), np.sum((w - y) ** 2 * (1 + noise ** 2)) + 0.25, rtol=1e-6)
    np.testing.assert_allclose(new.params["w"], w - lr * grad_w, rtol=1e-6)
    np.testing.assert_allclose(new.params["v"], np.asarray(params["v"]) - lr * grad_v, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(np.sum(grad_w ** 2) + np.sum(grad_v ** 2)),
                               rtol=1e-6)
    assert int(new.step) == 5
    d = min(0.9, 5 / 14)                                      # warm-up decay at the old step 4
    np.testing.assert_allclose(new.ema_params["w"], (1 - d) * np.asarray(new.params["w"]), rtol=1e-6)
    np.testing.assert_array_equal(new.rng, state.rng)
    assert jax.tree.structure(new.opt_state) == jax.tree.structure(state.opt_state)


def test_min_snr_weights_each_examples_own_mean_error():
    """loss = mean_b w_b e_b with e_b example b's mean squared error: examples whose errors differ
    (here x0 of scale b under a zero prediction of the x0 target) are not pooled before weighting."""
    batch = 16
    alphas_cumprod = _abar(8)
    scales = jnp.arange(1.0, batch + 1.0)
    x0 = scales[:, None, None, None] * jnp.ones((batch, 2, 2, 1))

    def apply_fn(variables, x_t, t, *, train, rngs):
        return jnp.zeros_like(x_t)

    key = jax.random.PRNGKey(6)
    loss = make_loss_fn(apply_fn, alphas_cumprod, prediction_type="sample", min_snr_gamma=2.0)({}, {"image": x0}, key)
    t = np.asarray(jax.random.randint(jax.random.split(key, 4)[0], (batch,), 0, 8))
    abar = np.asarray(alphas_cumprod, np.float64)[t]
    w = np.minimum(abar / (1 - abar), 2.0)
    assert w.std() > 0.1
    np.testing.assert_allclose(float(loss), np.mean(w * np.asarray(scales) ** 2), rtol=1e-5)
