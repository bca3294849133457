"""DiT (models/dit.py) against diffusers' DiTTransformer2DModel with the same converted random
weights, the converter both ways, the sharding rules, remat, and a sharded forward pass."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from jaxdiff import sharding
from jaxdiff.convert import dit as dit_convert
from jaxdiff.errors import CheckpointError
from jaxdiff.models import dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_dit(*, learn_sigma=True, channels=3, sample_size=8, patch=2, layers=2, classes=5, seed=0):
    """A tiny random diffusers DiT whose zero-initialised layers are made non-zero (so they are
    exercised) and whose per-block embedder copies are tied (as in converted checkpoints)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=channels,
        out_channels=2 * channels if learn_sigma else channels, num_layers=layers, sample_size=sample_size,
        patch_size=patch, num_embeds_ada_norm=classes, norm_eps=1e-5).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for block in m.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    return m


def _torch_forward(m, x, t, y):
    """diffusers' DiT forward from its own modules, with an unpatchify that also handles
    non-square grids (DiTTransformer2DModel.forward assumes h == w). x: NCHW numpy."""
    import torch
    import torch.nn.functional as F

    x, t, y = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)
    p, c_out = m.patch_size, m.out_channels
    h, w = x.shape[-2] // p, x.shape[-1] // p
    with torch.no_grad():
        tok = m.pos_embed(x)
        for block in m.transformer_blocks:
            tok = block(tok, timestep=t, class_labels=y)
        cond = m.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=tok.dtype)
        shift, scale = m.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        tok = m.proj_out_2(m.norm_out(tok) * (1 + scale[:, None]) + shift[:, None])
        out = tok.reshape(-1, h, w, p, p, c_out).permute(0, 5, 1, 3, 2, 4).reshape(-1, c_out, h * p, w * p)
    return out.numpy()


def _state(m):
    return {k: v.detach().numpy() for k, v in m.state_dict().items()}


def _inputs(shape, seed=0, classes=5):
    rs = np.random.RandomState(seed)
    B = shape[0]
    x = rs.randn(*shape).astype(np.float32)                       # NCHW
    t = np.array([3.0, 517.5, 999.0][:B], np.float32)
    y = np.array([1, classes, 0][:B], np.int64)                    # includes the null class
    return x, t, y


def _jax(module, params, x, t, y):
    out = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), t, jnp.asarray(y, jnp.int32))
    return np.asarray(out).transpose(0, 3, 1, 2)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_matches_diffusers_square(learn_sigma):
    m = _torch_dit(learn_sigma=learn_sigma)
    module = dit_convert.module_from_config(dict(m.config))
    assert module.learn_sigma == learn_sigma and module.hidden_size == 16 and module.depth == 2
    params = dit_convert.params_from_torch(_state(m), module)
    x, t, y = _inputs((3, 3, 8, 8))
    import torch
    with torch.no_grad():
        ref = m(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).sample.numpy()
    np.testing.assert_allclose(_torch_forward(m, x, t, y), ref, rtol=0, atol=1e-6)  # the reference helper
    out = _jax(module, params, x, t, y)
    assert out.shape == (3, 6 if learn_sigma else 3, 8, 8)
    assert _rel(out, ref) < 1e-4


@pytest.mark.parametrize("shape", [(2, 3, 6, 10), (2, 3, 12, 4), (2, 3, 16, 16)])
def test_matches_diffusers_non_square_odd_grids_and_other_sizes(shape):
    """6x10 with patch 2 is a 3x5 grid (odd, non-square); 16x16 is not the training size, so the
    positions are rescaled to the 4x4 training grid as diffusers does."""
    m = _torch_dit()
    module = dit_convert.module_from_config(dict(m.config))
    params = dit_convert.params_from_torch(_state(m), module)
    x, t, y = _inputs(shape, seed=1)
    ref = _torch_forward(m, x, t, y)
    assert _rel(_jax(module, params, x, t, y), ref) < 1e-4


def test_labels_time_and_positions_change_the_output():
    m = _torch_dit()
    module = dit_convert.module_from_config(dict(m.config))
    params = dit_convert.params_from_torch(_state(m), module)
    x, t, y = _inputs((2, 3, 8, 8))
    out = _jax(module, params, x, t, y)
    other_labels = _jax(module, params, x, t, np.array([2, 3]))
    other_time = _jax(module, params, x, t + 50, y)
    assert _rel(other_labels, out) > 1e-2 and _rel(other_time, out) > 1e-2
    # The position embedding matters: integer positions differ from rescaled ones off-size.
    x16, t16, y16 = _inputs((2, 3, 16, 16))
    rescaled = _jax(module, params, x16, t16, y16)
    integer = _jax(module.clone(sample_size=None), params, x16, t16, y16)
    assert _rel(integer, rescaled) > 1e-3


def test_round_trip_and_folder(tmp_path):
    m = _torch_dit(learn_sigma=False, layers=3)
    state = _state(m)
    module = dit_convert.module_from_config(dict(m.config))
    params = dit_convert.params_from_torch(state, module)
    back = dit_convert.params_to_torch(params, module)
    assert set(back) == set(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)
    dit_convert.save(tmp_path / "dit", module, params)
    import diffusers
    reread = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "dit")
    assert dict(reread.config)["num_layers"] == 3
    assert all(np.array_equal(v.numpy(), state[k]) for k, v in reread.state_dict().items())
    module2, params2 = dit_convert.load(tmp_path / "dit")
    assert module2 == module
    assert jax.tree.all(jax.tree.map(np.array_equal, params2, params))


def test_untied_embedders_and_unsupported_options_are_one_line_errors():
    m = _torch_dit()
    state = _state(m)
    module = dit_convert.module_from_config(dict(m.config))
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    state[key] = state[key] + 1
    with pytest.raises(CheckpointError, match="shares one") as e:
        dit_convert.params_from_torch(state, module)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="norm_elementwise_affine"):
        dit_convert.module_from_config(dict(m.config, norm_elementwise_affine=True))


def test_zero_init_outputs_zero_and_configs():
    module = dit.tiny(learn_sigma=True)
    inputs = module.example_inputs(batch=2, size=8, in_channels=1)
    params = module.init(jax.random.key(0), **inputs)["params"]
    out = module.apply({"params": params}, jax.random.normal(jax.random.key(1), (2, 6, 10, 1)), jnp.ones(2),
                       jnp.array([0, 10]))
    assert out.shape == (2, 6, 10, 2) and float(jnp.max(jnp.abs(out))) == 0.0   # adaLN-Zero
    sizes = {name: (f().hidden_size, f().depth, f().num_heads, f().patch_size) for name, f in dit.CONFIGS.items()}
    assert sizes["DiT_XL_2"] == (1152, 28, 16, 2) and sizes["DiT_S_8"] == (384, 12, 6, 8)
    assert sizes["DiT_B_4"] == (768, 12, 12, 4) and sizes["DiT_L_2"] == (1024, 24, 16, 2)
    with pytest.raises(ValueError, match="divisible by patch_size=2"):
        module.apply({"params": params}, jnp.zeros((1, 7, 8, 1)), jnp.ones(1), jnp.array([0]))


def test_every_parameter_is_named_for_sharding():
    tree = jax.eval_shape(lambda: dit.DiT_S_2(learn_sigma=True).init(
        jax.random.key(0), **dit.DiT_S_2().example_inputs(size=8)))["params"]
    assert sharding.unnamed_parameters(tree) == []
    heads = sharding.logical_axes(("block_3", "attn", "query", "kernel"), (384, 384))
    mlp = sharding.logical_axes(("block_3", "mlp", "proj_in", "kernel"), (384, 1536))
    assert heads == ("embed", "mlp") and mlp == ("embed", "mlp")
    assert sharding.logical_axes(("block_3", "mlp", "proj_out", "kernel"), (1536, 384)) == ("mlp", "embed")
    assert sharding.parameter_rule(("block_0", "adaln", "kernel"), (384, 2304)).name == "adaLN modulation"


def test_remat_keeps_loss_and_gradients():
    base = dit.DiT(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    inputs = base.example_inputs(batch=2, size=8, in_channels=2)
    params = base.init(jax.random.key(0), **inputs)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 2))

    def loss(module):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(jnp.square(
            module.apply({"params": p}, x, jnp.array([5.0, 600.0]), jnp.array([0, 3])) - 0.1))))(params)

    (l0, g0), (l1, g1) = loss(base), loss(base.clone(remat="full"))
    assert float(l0) > 0 and abs(float(l1) - float(l0)) < 1e-6
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1))) < 1e-6
    hlo = jax.jit(jax.grad(lambda p: jnp.sum(base.clone(remat="full").apply(
        {"params": p}, x, jnp.ones(2), jnp.array([0, 1]))))).lower(params).as_text()
    assert "optimization_barrier" in hlo


_SHARDED = """
import json, jax, jax.numpy as jnp, numpy as np
from jaxdiff import sharding
from jaxdiff.models import dit
assert len(jax.devices()) == 8
module = dit.DiT(patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10, learn_sigma=True)
params = module.init(jax.random.key(0), **module.example_inputs(size=8, in_channels=3))["params"]
params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
x = jax.random.normal(jax.random.key(2), (8, 6, 10, 3))
t = jnp.linspace(0, 999, 8)
y = jnp.arange(8) % 11
fwd = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))
ref = np.asarray(fwd(params, x, t, y))
out = {}
for rules, shape in (("fsdp", dict(data=1, fsdp=8)), ("fsdp_tp", dict(data=1, fsdp=4, tensor=2))):
    mesh = sharding.make_mesh(jax.devices(), **shape)
    placed = sharding.place(params, sharding.tree_shardings(params, mesh, rules))
    got = np.asarray(fwd(placed, sharding.place(x, sharding.batch_sharding(mesh)), t, y))
    split = sum(1 for p in jax.tree.leaves(placed) if not p.sharding.is_fully_replicated)
    out[rules] = {"err": float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))), "split": split,
                  "q": list(placed["block_0"]["attn"]["query"]["kernel"].addressable_shards[0].data.shape)}
print(json.dumps(out))
"""


def test_sharded_forward_equals_unsharded():
    proc = run_python(_SHARDED, devices=8, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for rules in ("fsdp", "fsdp_tp"):
        assert out[rules]["err"] < 1e-5 and out[rules]["split"] > 10, out
    assert out["fsdp_tp"]["q"] == [16, 32]      # [64, 64] query kernel: fsdp 4 x heads over tensor 2
