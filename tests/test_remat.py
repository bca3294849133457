"""Rematerialised U-Net levels: same parameters, same loss, same gradients, and a gradient program
that really recomputes the forward pass. (What they save is measured by
experiments/bench_memory.py --remat on the SD-1.5-sized network: on toy networks XLA's
temporaries are dominated by parameter-sized and convolution-gradient buffers, so these tests
read the programs, not their memory.)

How remat shows in a program: the backward pass of a ResBlock needs the input of its second
convolution, i.e. the output of the first; with remat that convolution runs again in the backward
pass, so the gradient program holds at least one more convolution per ResBlock than without, and
JAX fences each recomputed block with an `optimization_barrier` (so XLA cannot merge it back into
the forward pass). The "dots" policy keeps the results of the non-batched matrix products (the
projections), "full" recomputes those too, so "full" holds more dot products than "dots".
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import config as config_lib
from jaxdiff import sharding
from jaxdiff.models.unet import UNet, tiny
from jaxdiff.train import build

SD_TINY = {"out_channels": 4, "base_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1,
           "attention_levels": (0, 1), "num_heads": 2, "num_groups": 8, "context_dim": 16}


def _loss_and_grads(model, params, inputs):
    """((loss, grads), the optimized HLO text of the compiled gradient program)."""
    def loss(p):
        out = model.apply({"params": p}, **inputs, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
        return jnp.mean(jnp.square(out - 0.1))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return compiled(params), compiled.as_text()


def _count(op: str, hlo: str) -> int:
    """Instructions `op` in optimized HLO text (`%name = f32[...] convolution(...)`) or in lowered
    StableHLO (`stablehlo.convolution`)."""
    return len(re.findall(rf"(?:= \S+ {op}\(|stablehlo\.{op}\b)", hlo))


def _num_resblocks(params) -> int:
    paths = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return sum(1 for p in paths if re.search(r"(^|/)res_\d+/conv_0/kernel$", p))


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
    (loss, grads), hlo = _loss_and_grads(base, params, inputs)
    (loss_r, grads_r), hlo_r = _loss_and_grads(checkpointed, params, inputs)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_r, grads)
    # ...and the compiled (XLA-optimized) gradient program recomputes: one more convolution per
    # ResBlock at least, which XLA did not merge back into the forward pass.
    n_res = _num_resblocks(params)
    assert n_res >= 4
    extra = _count("convolution", hlo_r) - _count("convolution", hlo)
    assert extra >= n_res, (extra, n_res)


def _lowered_gradient(remat: str) -> str:
    """StableHLO of the pixel tiny U-Net's gradient program under `remat` (lowering only)."""
    model = tiny(num_classes=10, remat=remat)
    inputs = model.example_inputs(batch=2, size=16)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs))["params"]

    def loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, **inputs)))
    return jax.jit(jax.grad(loss)).lower(params).as_text()


def test_remat_policies_recompute_what_they_name():
    """none: no barrier, no recomputation; dots: convolutions recomputed, the projections kept;
    full: convolutions and projections recomputed."""
    hlo = {r: _lowered_gradient(r) for r in ("none", "dots", "full")}
    conv = {r: _count("convolution", h) for r, h in hlo.items()}
    dot = {r: _count("dot_general", h) for r, h in hlo.items()}
    barrier = {r: _count("optimization_barrier", h) for r, h in hlo.items()}
    assert barrier["none"] == 0 and barrier["dots"] > 0 and barrier["full"] > 0, barrier
    assert conv["none"] < conv["dots"] == conv["full"], conv
    assert dot["none"] <= dot["dots"] < dot["full"], dot


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_train_remat_key_reaches_the_training_step(remat):
    """`train.remat` in the config changes the training step `build.build_trainer` compiles: the
    step built with it recomputes (barriers, one more convolution per ResBlock at least), the one
    built with "none" does not."""
    image_shape, num_classes = (16, 16, 1), 10
    programs = {}
    for key in ("none", remat):
        cfg = config_lib.get_config()
        cfg.data.batch_size = 2
        cfg.train.remat = key
        model = build.build_model(cfg, image_shape, num_classes)
        trainer = build.build_trainer(cfg, sharding.make_mesh(), model, build.build_schedule(cfg),
                                      build.build_optimizer(cfg), image_shape)
        batch = {"image": jax.ShapeDtypeStruct((2,) + image_shape, jnp.float32),
                 "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
        programs[key] = trainer.step.lower(trainer.abstract, batch).as_text()
    n_res = _num_resblocks(trainer.abstract.params)
    assert _count("optimization_barrier", programs["none"]) == 0
    assert _count("optimization_barrier", programs[remat]) >= n_res
    extra = _count("convolution", programs[remat]) - _count("convolution", programs["none"])
    assert extra >= n_res, (extra, n_res)


def test_bad_remat_policy():
    model = tiny(remat="sometimes")
    with pytest.raises(ValueError, match="remat='sometimes' is not valid; choose one of none, dots, full"):
        model.init(jax.random.PRNGKey(0), **model.example_inputs(batch=1, size=16))
