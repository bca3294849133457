"""SD3 / SD3.5 transformer: the Flax MMDiT (jaxdiff/models/mmdit.py) against diffusers'
SD3Transformer2DModel with the same random weights (converted by jaxdiff/convert/sd3.py), the
converter both ways and through a folder, the options (qk RMS norm, dual attention, cropped
position table on non-square latents) and the conditioning inputs, all on tiny models built here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomise_unit_gain

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.convert import sd3 as convert
from jaxdiff.errors import CheckpointError
from jaxdiff.models import mmdit
from jaxdiff.sharding import rules as sharding_rules

CTX, POOLED, SEQ = 16, 32, 5
TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": CTX,
        "caption_projection_dim": 16, "pooled_projection_dim": POOLED, "pos_embed_max_size": 10}
SD35 = dict(TINY, in_channels=8, out_channels=8, qk_norm="rms_norm", dual_attention_layers=(0,))


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _torch_model(**config):
    return randomise_unit_gain(diffusers.SD3Transformer2DModel(**config).eval(), seed=1)


def _convert(model):
    module = convert.module_from_config(dict(model.config))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return module, convert.params_from_torch(state, module), state


def _inputs(seed, batch, height, width, channels):
    rng = np.random.RandomState(seed)
    return {"x": rng.randn(batch, height, width, channels).astype(np.float32),
            "t": rng.uniform(0, 1000, batch).astype(np.float32),
            "context": rng.randn(batch, SEQ, CTX).astype(np.float32),
            "pooled": rng.randn(batch, POOLED).astype(np.float32)}


def _reference(model, x, t, context, pooled):
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(context),
                    torch.from_numpy(pooled), torch.from_numpy(t)).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def sd3():
    model = _torch_model(**TINY)
    return (model, *_convert(model))


@pytest.fixture(scope="module")
def sd35():
    model = _torch_model(**SD35)
    return (model, *_convert(model))


# ---------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("shape", [(2, 8, 8), (1, 12, 16), (2, 20, 6)], ids=["square", "wide", "tall-edge"])
def test_sd3_matches_diffusers(sd3, shape):
    """SD3.0 layout (no qk norm, no dual attention); non-square latents use an off-centre crop
    of the position table, the tall one reaches the table's edge (20 / 2 = 10 rows)."""
    model, module, params, _ = sd3
    inputs = _inputs(0, *shape, 4)
    out = module.apply({"params": params}, **inputs)
    ref = _reference(model, **inputs)
    assert out.shape == ref.shape == (*shape, 4)
    assert _rel(out, ref) < 1e-4


@pytest.mark.parametrize("shape", [(2, 8, 8), (1, 6, 14)], ids=["square", "wide"])
def test_sd35_qk_norm_and_dual_attention_match_diffusers(sd35, shape):
    model, module, params, _ = sd35
    assert module.qk_norm == "rms_norm" and tuple(module.dual_attention_layers) == (0,)
    assert "attn2" in params["block_0"] and "attn2" not in params["block_1"]
    inputs = _inputs(1, *shape, 8)
    assert _rel(module.apply({"params": params}, **inputs), _reference(model, **inputs)) < 1e-4


def test_qk_norm_and_dual_attention_change_the_output(sd35):
    """Parity above cannot be trivial: dropping the RMS norms of queries and keys, or the second
    attention (zeroing its gate), moves the output by O(1)."""
    _, module, params, _ = sd35
    inputs = _inputs(2, 2, 8, 8, 8)
    out = np.asarray(module.apply({"params": params}, **inputs))

    def strip(tree):
        return {k: strip(v) for k, v in tree.items() if not k.startswith("norm_")} if isinstance(tree, dict) else tree

    no_norm = module.clone(qk_norm=None).apply({"params": strip(params)}, **inputs)
    assert _rel(no_norm, out) > 0.05
    adaln = params["block_0"]["adaln"]
    D = module.width
    gate = dict(adaln, kernel=adaln["kernel"].copy(), bias=adaln["bias"].copy())
    gate["kernel"][:, 8 * D:] = 0
    gate["bias"][8 * D:] = 0
    no_attn2 = module.apply({"params": dict(params, block_0=dict(params["block_0"], adaln=gate))}, **inputs)
    assert _rel(no_attn2, out) > 0.05


def test_pooled_text_context_and_time_each_change_the_output(sd3):
    _, module, params, _ = sd3
    inputs = _inputs(3, 2, 8, 8, 4)
    run = jax.jit(lambda **kw: module.apply({"params": params}, **kw))
    out = np.asarray(run(**inputs))
    for key, seed in (("pooled", 4), ("context", 5), ("t", 6)):
        other = dict(inputs, **{key: _inputs(seed, 2, 8, 8, 4)[key]})
        assert _rel(run(**other), out) > 0.05, key
    # a longer context is fine (the parameters do not depend on its length) and changes the output
    longer = dict(inputs, context=np.concatenate([inputs["context"], inputs["context"][:, :2]], 1))
    assert _rel(run(**longer), out) > 1e-3


def test_the_blocked_attention_kernel_gives_the_same_output(sd35):
    """The joint sequence (64 image + 5 text tokens) through the online-softmax kernel in blocks of
    16 queries and keys, padded and masked at the end, as through XLA's attention."""
    from jaxdiff.models import flash

    _, module, params, _ = sd35
    inputs = _inputs(10, 1, 16, 16, 8)
    out = module.clone(attention_impl="xla").apply({"params": params}, **inputs)
    old = flash.BLOCK_Q, flash.BLOCK_K
    flash.BLOCK_Q = flash.BLOCK_K = 16
    try:
        blocked = module.clone(attention_impl="blocked").apply({"params": params}, **inputs)
    finally:
        flash.BLOCK_Q, flash.BLOCK_K = old
    assert _rel(blocked, np.asarray(out)) < 1e-5


def test_bfloat16_stays_close(sd3):
    _, module, params, _ = sd3
    inputs = _inputs(7, 2, 8, 8, 4)
    out = module.apply({"params": params}, **inputs)
    low = module.clone(dtype=jnp.bfloat16).apply({"params": params}, **inputs)
    assert low.dtype == jnp.bfloat16 and bool(jnp.isfinite(low).all())
    low, out = np.asarray(low, np.float32), np.asarray(out)
    # measured 6.5e-2 (diffusers' own bfloat16 copy of this unit-gain model: 4.9e-2); > 1e-3: bf16 was used
    assert 1e-3 < np.linalg.norm(low - out) / np.linalg.norm(out) < 0.1


# ---------------------------------------------------------------------------------------------
# the converter


def test_converter_round_trips_and_saves_a_folder_diffusers_reads(sd35, tmp_path):
    model, module, params, state = sd35
    back = convert.params_to_torch(params, module)
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    assert back["pos_embed.pos_embed"].shape == (1, 100, 16)
    convert.save(tmp_path / "transformer", module, params)
    reread = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    assert dict(reread.config)["qk_norm"] == "rms_norm"
    inputs = _inputs(8, 1, 8, 8, 8)
    assert _rel(_reference(reread, **inputs), _reference(model, **inputs)) < 1e-6
    module2, params2 = convert.load(tmp_path / "transformer")
    assert module2 == module
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)))


def test_position_table_is_the_reference_sincos(sd3):
    _, module, _, state = sd3
    table = mmdit.sincos_table(16, TINY["pos_embed_max_size"], TINY["sample_size"] // 2)
    np.testing.assert_allclose(table, state["pos_embed.pos_embed"][0], atol=1e-6)
    fresh = jax.eval_shape(lambda: module.init(jax.random.key(0), **module.example_inputs()))
    assert fresh["params"]["pos_embed"]["embedding"].shape == table.shape


def test_every_parameter_has_a_sharding_rule(sd35):
    _, _, params, _ = sd35
    assert sharding_rules.unnamed_parameters(params) == []
    assert sharding_rules.logical_axes(("block_0", "attn", "context_query", "kernel"), (16, 16)) == ("embed", "mlp")
    assert sharding_rules.logical_axes(("block_0", "attn", "context_out", "kernel"), (16, 16)) == ("mlp", "embed")


def test_bad_inputs_and_configs_are_one_line_errors(sd3):
    _, module, params, state = sd3
    inputs = _inputs(9, 1, 8, 8, 4)
    for bad, match in (({"x": inputs["x"][:, :7]}, "multiple of the patch size"),
                       ({"x": np.zeros((1, 24, 8, 4), np.float32)}, "exceeds the position grid"),
                       ({"context": inputs["context"][..., :3]}, "context of shape"),
                       ({"pooled": inputs["pooled"][:, :3]}, "pooled of shape")):
        with pytest.raises(ValueError, match=match):
            module.apply({"params": params}, **dict(inputs, **bad))
    with pytest.raises(CheckpointError, match="qk_norm='layer_norm'"):
        convert.module_from_config(dict(TINY, qk_norm="layer_norm"))
    with pytest.raises(CheckpointError, match="caption_projection_dim=24 differs"):
        convert.module_from_config(dict(TINY, caption_projection_dim=24))
    with pytest.raises(CheckpointError, match="does not know: frobnicate"):
        convert.module_from_config(dict(TINY, frobnicate=1))
    with pytest.raises(CheckpointError, match="missing 1 key"):
        convert.params_from_torch({k: v for k, v in state.items() if k != "proj_out.bias"}, module)
