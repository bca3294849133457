"""The CPU speed paths keep the numbers: the U-Net's convolutions and dense layers give the same
output under every formulation (`models/conv.py`), and a bf16 pipeline that casts its weight
matrices once per request (`core.cast_weights`) gives what the per-call casts gave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers, schedules
from jaxdiff.models import conv as conv_lib
from jaxdiff.models import lora as lora_lib
from jaxdiff.models.unet import UNet
from jaxdiff.pipelines import core


def _unet(dtype):
    return UNet(out_channels=4, in_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,), head_dim=8, num_groups=8, context_dim=16,
                use_linear_projection=False, dtype=dtype)


def _inputs():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 8, 8, 4), jnp.float32)
    t = jnp.asarray([10.0, 700.0], jnp.float32)
    ctx = jnp.asarray(rng.randn(2, 5, 16), jnp.float32)
    return x, t, ctx


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unet_output_is_the_same_under_every_formulation(dtype):
    x, t, ctx = _inputs()
    module = _unet(dtype)
    params = module.init(jax.random.PRNGKey(0), x, t, context=ctx)["params"]
    params = jax.tree.map(lambda p: p + 0.02 * jnp.sign(p + 1e-3), params)     # zero-initialised layers matter too
    outs = {}
    for impl in ("xla", "im2col", "shifted"):
        with conv_lib.formulation(impl):   # a new function per block: jit caches traces per function
            outs[impl] = np.asarray(jax.jit(lambda *a, **k: module.apply(*a, **k))({"params": params}, x, t,
                                                                                   context=ctx), np.float32)
            jaxpr = str(jax.make_jaxpr(lambda *a, **k: module.apply(*a, **k))({"params": params}, x, t, context=ctx))
        assert ("conv_general_dilated" in jaxpr) == (impl == "xla"), impl       # every conv took the path
    scale = np.abs(outs["xla"]).max()
    assert scale > 0.1
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for impl in ("im2col", "shifted"):
        np.testing.assert_allclose(outs[impl], outs["xla"], rtol=tol, atol=tol * scale)


def test_cast_weights_casts_kernels_only_and_merges_adapters_first():
    x, t, ctx = _inputs()
    params = _unet(jnp.float32).init(jax.random.PRNGKey(0), x, t, context=ctx)["params"]
    cast = core.cast_weights(params, jnp.bfloat16)
    flat, cflat = lora_lib.flat(params), lora_lib.flat(cast)
    kernels = [p for p in flat if p.endswith("kernel")]
    assert kernels and all(cflat[p].dtype == jnp.bfloat16 for p in kernels)
    others = [p for p in flat if not p.endswith("kernel")]
    assert others and all(cflat[p].dtype == jnp.float32 for p in others)
    for p in kernels:
        np.testing.assert_array_equal(np.asarray(cflat[p], np.float32),
                                      np.asarray(flat[p].astype(jnp.bfloat16), np.float32))
    # An adapted tree is merged in float32, then cast: what the network does inside each call.
    target = kernels[0]
    adapters = {"a": lora_lib.init(params, [target], 2, jax.random.PRNGKey(1))}
    adapters["a"][target] = adapters["a"][target]._replace(up=jnp.ones_like(adapters["a"][target].up))
    adapted = lora_lib.Adapted(params, adapters, {"a": jnp.float32(0.7)})
    merged = lora_lib.merge(params, adapters, {"a": jnp.float32(0.7)})
    got = lora_lib.flat(core.cast_weights({"base": adapted}, jnp.bfloat16)["base"])
    assert got[target].dtype == jnp.bfloat16
    want = np.asarray(lora_lib.flat(merged)[target], np.float32)
    # equal up to one bf16 rounding (the jitted merge may round the float32 sum differently)
    assert np.all(np.abs(np.asarray(got[target], np.float32) - want) <= 2 ** -8 * np.abs(want) + 1e-6)
    assert np.abs(np.asarray(got[target], np.float32) - np.asarray(cflat[target], np.float32)).max() > 1e-2


def test_a_bf16_run_with_weights_cast_once_equals_the_per_call_casts():
    x, t, ctx = _inputs()
    module = _unet(jnp.bfloat16)
    params = module.init(jax.random.PRNGKey(0), x, t, context=ctx)["params"]
    params = jax.tree.map(lambda p: p + 0.02 * jnp.sign(p + 1e-3), params)
    seen = []

    def network(params, x, t, cond):
        seen.append({str(l.dtype) for l in jax.tree.leaves(params) if l.ndim >= 2})
        return module.apply({"params": params}, x, t, context=cond)

    sampler = samplers.get("ddim", schedules.discrete("scaled_linear", 1000, 0.00085, 0.012), 3)
    common = dict(network=network, params=params, sampler=sampler, shape=(8, 8, 4), num=2, seed=1,
                  cond=np.asarray(ctx), uncond=np.zeros((1, 5, 16), np.float32), guidance_scale=4.0)
    per_call = core.run(core.Job(**common), _mesh(), output_type="latent")
    assert seen[-1] == {"float32"}
    once = core.run(core.Job(**common, weights_dtype=jnp.bfloat16), _mesh(), output_type="latent")
    assert seen[-1] == {"bfloat16"}                      # the loop was handed bf16 matrices
    assert np.abs(per_call).max() > 0.1
    np.testing.assert_allclose(once, per_call, rtol=1e-5, atol=1e-5 * np.abs(per_call).max())


def _mesh():
    from jaxdiff import sharding
    return sharding.inference_mesh("dp", jax.devices()[:1])
