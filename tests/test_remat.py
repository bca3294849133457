"""Rematerialised U-Net levels: same parameters, same loss, same gradients. (What they save is
measured by experiments/bench_memory.py --remat on the SD-1.5-sized network: on toy networks
XLA's temporaries are dominated by parameter-sized buffers.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.unet import UNet, tiny

SD_TINY = dict(out_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
               num_heads=2, num_groups=8, context_dim=16)


def _loss_and_grads(model, params, inputs):
    def loss(p):
        out = model.apply({"params": p}, **inputs, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
        return jnp.mean(jnp.square(out - 0.1))
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("kind", ["pixel", "cross_attention"])
@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_changes_memory_not_math(kind, remat):
    base = tiny(num_classes=10, dropout=0.1) if kind == "pixel" else UNet(**SD_TINY, dropout=0.1)
    checkpointed = base.clone(remat=remat)
    inputs = base.example_inputs(batch=2, size=16)
    inputs["x"] = jax.random.normal(jax.random.PRNGKey(1), inputs["x"].shape)
    inputs["t"] = jnp.array([10.0, 700.0])
    if "context" in inputs:
        inputs["context"] = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 16))
    params = base.init(jax.random.PRNGKey(0), **inputs)["params"]
    assert (jax.tree.structure(checkpointed.init(jax.random.PRNGKey(0), **inputs)["params"])
            == jax.tree.structure(params))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(4), p.shape), params)
    loss, grads = _loss_and_grads(base, params, inputs)
    loss_r, grads_r = _loss_and_grads(checkpointed, params, inputs)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_r, grads)


def test_bad_remat_policy():
    model = tiny(remat="sometimes")
    with pytest.raises(ValueError, match="remat='sometimes' is not valid; choose one of none, dots, full"):
        model.init(jax.random.PRNGKey(0), **model.example_inputs(batch=1, size=16))
