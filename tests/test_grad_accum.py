"""Gradient accumulation (`train.grad_accum_steps`): k micro-batches of B/k give the update of one
batch of B. The loss here reads each example's noise and timestep from the batch, so the k
micro-batches see exactly the examples, noise and timesteps of the big batch, and the two updates
must agree to float32 rounding; on an 8-device fsdp mesh too."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_python

from jaxdiff import config as config_lib
from jaxdiff import parameterization, schedules
from jaxdiff.errors import ConfigError
from jaxdiff.models import unet as unet_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train.step import (
    accumulated_value_and_grad,
    make_train_step,
    micro_batches,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, K = 8, 4
MODEL = functools.partial(unet_lib.tiny, base_channels=8, channel_mult=(1,), attention_levels=(),
                          num_groups=4, num_classes=10)


def drawn_loss(model, seen=None):
    """The denoising loss with the draws carried by the batch (`noise`, `t`) instead of the key."""
    abar_all = schedules.discrete("linear", num_train_timesteps=1000).alphas_cumprod

    def loss_fn(params, batch, key):
        if seen is not None:
            seen.append(batch["image"].shape)                           # at trace time
        abar = abar_all[batch["t"]]                                      # [b]
        x_t = parameterization.diffuse(batch["image"], batch["noise"], abar)
        pred = model.apply({"params": params}, x_t, batch["t"].astype(jnp.float32), labels=batch["label"])
        target = parameterization.target("v_prediction", batch["image"], batch["noise"], abar)
        return jnp.mean(jnp.square(pred - target))

    return loss_fn


def make_batch(seed=0, b=B):
    r = np.random.default_rng(seed)
    return {"image": jnp.asarray(r.uniform(-1, 1, (b, 8, 8, 1)), jnp.float32),
            "noise": jnp.asarray(r.standard_normal((b, 8, 8, 1)), jnp.float32),
            "t": jnp.asarray(r.integers(0, 1000, b), jnp.int32),
            "label": jnp.asarray(r.integers(0, 10, b), jnp.int32)}


@functools.cache
def init_params(model):
    return jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                                      labels=jnp.zeros((1,), jnp.int32))["params"])()


def fresh_state(model, tx):
    return state_lib.create(jax.tree.map(jnp.copy, init_params(model)), tx, jax.random.PRNGKey(1))


def test_micro_batches_are_a_strided_split():
    x = jnp.arange(12 * 2).reshape(12, 2)
    m = micro_batches({"x": x}, 3)["x"]
    assert m.shape == (3, 4, 2)
    for i in range(3):
        np.testing.assert_array_equal(m[i], x[i::3])


def test_k_micro_batches_give_the_big_batch_update():
    model = MODEL(out_channels=1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
    seen = []
    loss_fn = drawn_loss(model, seen)
    batch = make_batch()
    big, m_big = jax.jit(make_train_step(loss_fn, tx, ema_decay=0.9))(fresh_state(model, tx), batch)
    acc_step = jax.jit(make_train_step(loss_fn, tx, ema_decay=0.9, grad_accum_steps=K))
    acc, m_acc = acc_step(fresh_state(model, tx), batch)
    # What the equality rules out: with every micro-batch a copy of the first (rows i::K all equal to
    # rows 0::K), the same step gives that micro-batch's update, which is not the big batch's.
    one, _ = acc_step(fresh_state(model, tx), jax.tree.map(lambda x: jnp.repeat(x[::K], K, axis=0), batch))
    assert seen == [(B, 8, 8, 1), (B // K, 8, 8, 1)]            # the k = 4 step really ran on B/4 rows
    assert int(big.step) == int(acc.step) == 1                  # one update, one step count
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_acc["grad_norm"], m_big["grad_norm"], rtol=1e-5)
    start = fresh_state(model, tx).params
    for name, a, b, p0 in zip(["params", "ema"], [acc.params, acc.ema_params], [big.params, big.ema_params],
                              [start, start]):
        moved = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(p0)))
        diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        assert moved > 1e-4, name                                # the update is not trivial
        assert diff < 1e-6, (name, diff)
    one_diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(one.params),
                                                                     jax.tree.leaves(big.params)))
    assert one_diff > 1e-4


def test_micro_batches_draw_from_folded_keys():
    """With the loss's own draws, micro-batch i uses fold_in(key, i): different noise per micro-batch."""
    def loss_fn(params, batch, key):
        return jnp.sum(params["w"] * jax.random.normal(key, ()))

    params = {"w": jnp.ones(())}
    key = jax.random.PRNGKey(5)
    loss, _ = accumulated_value_and_grad(loss_fn, 3)(params, {"x": jnp.zeros((6,))}, key)
    want = np.mean([float(jax.random.normal(jax.random.fold_in(key, i), ())) for i in range(3)])
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_grad_accum_steps_is_validated_in_one_line():
    c = config_lib.get_config()
    c.train.grad_accum_steps = 0
    with pytest.raises(ConfigError, match="train.grad_accum_steps must be a positive integer"):
        config_lib.validate(c)
    c.train.grad_accum_steps = 5
    with pytest.raises(ConfigError, match="a divisor of data.batch_size=64") as e:
        config_lib.validate(c)
    assert "\n" not in str(e.value)
    c.train.grad_accum_steps = 4
    config_lib.validate(c)


_SHARDED = r"""
import functools, sys
sys.path.insert(0, "{repo}/tests")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxdiff import config as config_lib, sharding
from jaxdiff.errors import ConfigError
from jaxdiff.train import state as state_lib
from jaxdiff.train.step import accumulation_options, make_train_step
from test_grad_accum import MODEL, drawn_loss, fresh_state, make_batch

mesh = sharding.make_mesh(data=2, fsdp=4)
model = MODEL(out_channels=1)
tx = state_lib.make_optimizer(1e-3, warmup_steps=0)
abstract = fresh_state(model, tx)
state_sh = sharding.tree_shardings(abstract, mesh, "fsdp")
batch = make_batch(b=32)
batch_sh = sharding.batch_sharding(mesh)
c = config_lib.get_config()
c.data.batch_size = 32
out = {{}}
for k in (1, 4):
    c.train.grad_accum_steps = k
    step = jax.jit(make_train_step(drawn_loss(model), tx, **accumulation_options(c, mesh)), donate_argnums=(0,),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)))
    state = jax.device_put(fresh_state(model, tx), state_sh)
    new, _ = step(state, jax.device_put(batch, batch_sh))
    out[k] = new.params
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[4])))
print("DIFF", diff)
c.train.grad_accum_steps = 8
try:
    accumulation_options(c, mesh)
except ConfigError as e:
    print("REFUSED", e)
"""


def test_accumulation_on_an_8_device_fsdp_mesh():
    proc = run_python(_SHARDED.format(repo=REPO), devices=8, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = float(proc.stdout.split("DIFF")[1].split()[0])
    assert diff < 1e-6, diff
    assert "REFUSED train.grad_accum_steps=8: data.batch_size=32 must be a multiple of 8 x 8" in proc.stdout
