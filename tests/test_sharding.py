"""Scale-out: mesh and layout rules, FSDP / tensor parallel equivalence, restore onto another
mesh, and saving on SIGTERM (2 processes: test_multiprocess.py)."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from conftest import run_python
from jaxdiff import sharding
from jaxdiff.checkpoint import Checkpointer
from jaxdiff import config as config_lib
from jaxdiff.models import flux, mmdit, t5, text, unet, vae
from jaxdiff.train import build, loop
from jaxdiff.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_params():
    model = unet.tiny(num_classes=10)
    return jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))["params"]


def _named_leaves(tree):
    return [(tuple(sharding._key_name(k) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


# ---------------------------------------------------------------------------------------------
# The logical-axis table and rule tables (no devices needed)


def test_logical_axes_cover_every_leaf_of_the_tiny_unet():
    leaves = _named_leaves(_tiny_params())
    by_path = {}
    for path, leaf in leaves:
        axes = sharding.logical_axes(path, leaf.shape)
        by_path["/".join(path)] = axes
        assert len(axes) == leaf.ndim, (path, axes)
        if path[-1] in ("kernel", "embedding"):
            # every weight matrix has named in/out dimensions, so it can be split
            assert [a for a in axes if a is not None] in (["embed", "mlp"], ["mlp", "embed"], ["vocab", "embed"]), path
        else:
            assert path[-1] in ("bias", "scale") and leaf.ndim == 1, path
    # Megatron alternation: q/k/v and the first time-MLP layer column-parallel, the attention
    # output projection and the second time-MLP layer row-parallel; biases follow the out axis.
    assert by_path["mid/attn/query/kernel"] == ("embed", "mlp")
    assert by_path["mid/attn/proj_out/kernel"] == ("mlp", "embed")
    assert by_path["mid/attn/proj_out/bias"] == ("embed",)
    assert by_path["time_embed/dense_0/kernel"] == ("embed", "mlp")
    assert by_path["time_embed/dense_1/kernel"] == ("mlp", "embed")
    assert by_path["mid/res_0/conv_0/kernel"] == (None, None, "embed", "mlp")
    assert by_path["mid/res_0/conv_0/bias"] == ("mlp",)
    assert by_path["mid/res_0/norm_0/scale"] == by_path["mid/res_0/norm_0/bias"] == ("norm",)
    assert by_path["class_embed/embedding"] == ("vocab", "embed")


def test_logical_axes_of_text_encoder_and_vae_style_names():
    cases = {
        ("text", "embeddings", "token_embedding", "embedding"): ((49408, 768), ("vocab", "embed")),
        ("text", "layers_0", "self_attn", "q_proj", "kernel"): ((768, 768), ("embed", "mlp")),
        ("text", "layers_0", "self_attn", "out_proj", "kernel"): ((768, 768), ("mlp", "embed")),
        ("text", "layers_0", "mlp", "fc1", "kernel"): ((768, 3072), ("embed", "mlp")),
        ("text", "layers_0", "mlp", "fc2", "kernel"): ((3072, 768), ("mlp", "embed")),
        ("text", "layers_0", "mlp", "fc2", "bias"): ((768,), ("embed",)),
        ("text", "layers_0", "layer_norm1", "bias"): ((768,), ("norm",)),
        ("unet", "attn1", "to_out_0", "kernel"): ((320, 320), ("mlp", "embed")),
        ("unet", "ff", "net_2", "kernel"): ((1280, 320), ("mlp", "embed")),
        ("unet", "transformer", "proj_out", "kernel"): ((1, 1, 320, 320), (None, None, "mlp", "embed")),
        ("vae", "decoder", "conv_in", "kernel"): ((3, 3, 4, 512), (None, None, "embed", "mlp")),
        ("vae", "quant_conv", "kernel"): ((1, 1, 8, 8), (None, None, "embed", "mlp")),
        ("opt", "count"): ((), ()),
    }
    for path, (shape, want) in cases.items():
        assert sharding.logical_axes(path, shape) == want, path


def _network_params():
    """Abstract parameter trees of jaxdiff's networks: every U-Net config (the pixel ones also
    class-conditional and with ADM's scale-shift norm and ResBlock resampling), the Stable
    Diffusion VAE, both CLIP text encoders, the T5 encoder, an SD3.5 MMDiT and a tiny Flux
    transformer."""
    def shapes(module, *args, **kwargs):
        return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]

    trees = {}
    for name, config in unet.CONFIGS.items():
        variants = {"": {}}
        if config().context_dim is None:
            variants.update(classes={"num_classes": 10}, adm={"use_scale_shift_norm": True, "resblock_updown": True})
        for variant, kwargs in variants.items():
            module = config(**kwargs)
            trees[f"unet.{name}.{variant}"] = shapes(module, **module.example_inputs())
    trees["vae"] = shapes(vae.StableDiffusionVAE(), jnp.zeros((1, 8, 8, 3)))
    for name, encoder in (("sd1", text.SD1TextEncoder), ("sd2", text.SD2TextEncoder)):
        trees[f"text.{name}"] = shapes(encoder(), jnp.zeros((1, 1), jnp.int32))
    sd35 = mmdit.SD35Medium(num_layers=2, dual_attention_layers=(0,))
    trees["mmdit.sd35_medium"] = shapes(sd35, **sd35.example_inputs())
    trees["text.t5xxl"] = shapes(t5.T5XXLEncoder(), jnp.zeros((1, 1), jnp.int32))
    tiny_flux = flux.FluxDev(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8, axes_dims_rope=(2, 2, 4))
    trees["flux"] = shapes(tiny_flux, **tiny_flux.example_inputs())
    return trees


def test_a_rule_names_every_parameter_of_every_network():
    trees = _network_params()
    assert len(trees) == 15
    for name, tree in trees.items():
        assert sharding.unnamed_parameters(tree) == [], name
    # The rules used, and their layouts on the SD U-Net and the text encoder.
    sd, clip = trees["unet.sd15."], trees["text.sd1"]

    def rule(tree, *path):
        return sharding.parameter_rule(path, _leaf(tree, path).shape).name

    assert rule(sd, "down_0", "attn_0", "block_0", "cross_attn", "proj_out", "kernel").startswith("transformer")
    assert rule(sd, "down_0", "attn_0", "proj_in", "kernel").startswith("transformer")         # 1x1 conv
    assert rule(sd, "down_0", "attn_0", "block_0", "norm_2", "scale") == "normalisation"
    assert rule(clip, "layer_0", "attn", "out", "kernel") == "attention output"
    assert sharding.logical_axes(("layer_0", "attn", "out", "kernel"), (768, 768)) == ("mlp", "embed")
    assert sharding.logical_axes(("layer_0", "attn", "out", "bias"), (768,)) == ("embed",)
    assert sharding.logical_axes(("add_embed", "dense_1", "kernel"), (1280, 1280)) == ("mlp", "embed")
    used = {sharding.parameter_rule(path, leaf.shape).name for tree in trees.values()
            for path, leaf in _named_leaves(tree)}
    assert used == {r.name for r in sharding.PARAMETER_RULES}


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_a_training_state_has_no_unnamed_parameters():
    cfg = config_lib.get_config()
    params = _tiny_params()
    state = jax.eval_shape(lambda: state_lib.create(jax.tree.map(jnp.zeros_like, params),
                                                         build.build_optimizer(cfg), jax.random.PRNGKey(0)))
    assert sharding.unnamed_parameters(state) == []
    assert len(jax.tree.leaves(state)) > 3 * len(jax.tree.leaves(params))      # params, EMA, Adam moments, ...


class _Unknown(nn.Module):
    """A block with layer names no rule knows: a Dense "gate", a LayerNorm "ln", a raw parameter."""

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="ln")(nn.Dense(8, name="gate")(x))
        return x * self.param("pos_embed", nn.initializers.zeros, (8,))


def test_a_layer_no_rule_knows_is_listed_and_warned_about():
    params = jax.eval_shape(lambda: _Unknown().init(jax.random.key(0), jnp.zeros((1, 8))))["params"]
    assert sharding.unnamed_parameters(params) == ["gate/bias", "gate/kernel", "ln/bias", "ln/scale", "pos_embed"]
    assert sharding.logical_axes(("gate", "kernel"), (8, 8)) == (None, None)
    # A renamed layer of a real network is caught the same way.
    tiny = _tiny_params()
    tiny = dict(tiny, mid=dict(tiny["mid"], attn={("out_projection" if k == "proj_out" else k): v
                                                  for k, v in tiny["mid"]["attn"].items()}))
    assert sharding.unnamed_parameters(tiny) == ["mid/attn/out_projection/bias", "mid/attn/out_projection/kernel"]
    # A table that splits by logical axes warns (one device: any table fits); one that does not, stays quiet.
    mesh = sharding.make_mesh(jax.devices()[:1])
    with pytest.warns(UserWarning, match=r"2 parameter\(s\) named by no sharding rule .*mid/attn/out_projection"):
        sharding.tree_shardings(tiny, mesh, "fsdp_tp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharding.tree_shardings(tiny, mesh, "fsdp")
        sharding.tree_shardings(_tiny_params(), mesh, "fsdp_tp")


def test_a_rule_table_that_does_not_fit_the_mesh_is_refused():
    refused = [
        # (the whole message once; the ending that names the fix for the others)
        ("fsdp", dict(data=8), "rules 'fsdp' split parameters over the fsdp axis, but the mesh (data=8, fsdp=1, "
                               "tensor=1) has fsdp=1, so nothing would be split; set --config.mesh.fsdp (e.g. "
                               "--config.mesh.data=1 --config.mesh.fsdp=-1) or --config.mesh.rules=dp"),
        ("fsdp_tp", dict(fsdp=8), "has tensor=1; set --config.mesh.tensor (e.g. 2) or --config.mesh.rules=fsdp"),
        ("fsdp_tp", dict(tensor=2), "has fsdp=1, so nothing would be split; set --config.mesh.fsdp (e.g. "
                                    "--config.mesh.data=1 --config.mesh.fsdp=-1)"),
        ("dp", dict(data=2, fsdp=4), "has fsdp=4 but rules 'dp' replicate every parameter over it; set "
                                     "--config.mesh.rules=fsdp, or --config.mesh.fsdp=1 to put those devices on data"),
        ("fsdp", dict(fsdp=4, tensor=2), "has tensor=2 but rules 'fsdp' split nothing over it, so its devices would "
                                         "repeat each other's work; set --config.mesh.rules=fsdp_tp or "
                                         "--config.mesh.tensor=1"),
        ("dp", dict(data=4, tensor=2), "has tensor=2 but rules 'dp' split nothing over it"),
    ]
    for rules, shape, message in refused:
        for table in (rules, sharding.RULES[rules]):                # by name or as a Rules object
            with pytest.raises(sharding.ShardingError) as err:
                sharding.check_rules(_mesh(**shape), table)
            assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    for rules, shape in [("dp", dict(data=8)), ("fsdp", dict(fsdp=8)), ("fsdp", dict(data=2, fsdp=4)),
                         ("fsdp_tp", dict(fsdp=4, tensor=2)), ("fsdp_tp", dict(data=2, fsdp=2, tensor=2))]:
        sharding.check_rules(_mesh(**shape), rules)
    for rules in sharding.RULES:                                    # one device: every table
        sharding.check_rules(_mesh(), rules)


_FIT = """
import json, jax
from jaxdiff import cli, config as config_lib, sharding
from jaxdiff.models import unet
assert len(jax.devices()) == 8
out = {}
c = config_lib.get_config()
c.mesh.rules = "fsdp"                                  # with the default mesh: data=-1, fsdp=1
try:
    sharding.mesh_from_config(c.mesh)
except sharding.ShardingError as e:
    out["config"] = str(e)
c.mesh.data, c.mesh.fsdp = 1, -1
out["fits"] = list(sharding.mesh_from_config(c.mesh).devices.shape)
model = unet.tiny()
params = jax.eval_shape(lambda: model.init(jax.random.key(0), **model.example_inputs()))["params"]
try:
    sharding.tree_shardings(params, sharding.make_mesh(data=8), "fsdp")
except sharding.ShardingError as e:
    out["tree"] = str(e)
out["inference"] = {r: list(sharding.inference_mesh(r).devices.shape) for r in sharding.RULES}
for r in sharding.RULES:
    sharding.tree_shardings(params, sharding.inference_mesh(r), r)
out["rc"] = cli.main(["train", "--config.mesh.rules=fsdp_tp", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                      "--workdir", "{workdir}", "--no-progress"])
print(json.dumps(out))
"""


def test_the_trainer_refuses_a_rule_table_its_mesh_does_not_fit(tmp_path):
    """On 8 devices: the config's mesh and rules are checked where the trainer builds them, the
    command line reports one line naming the fix and trains nothing, and the pipelines' default
    meshes fit every table."""
    proc = run_python(_FIT.replace("{workdir}", str(tmp_path / "run")), devices=8, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"].startswith("rules 'fsdp' split parameters over the fsdp axis, but the mesh (data=8, fsdp=1")
    assert out["fits"] == [1, 8, 1]
    assert "--config.mesh.fsdp" in out["tree"]
    assert out["inference"] == {"dp": [8, 1, 1], "fsdp": [1, 8, 1], "fsdp_tp": [1, 4, 2]}
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("jaxdiff train:")]
    assert out["rc"] == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("jaxdiff train: error: rules 'fsdp_tp' split the mlp dimension over the tensor axis")
    assert err[0].endswith("set --config.mesh.tensor (e.g. 2) or --config.mesh.rules=fsdp")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_rule_tables_shard_what_they_promise():
    leaves = _named_leaves(_tiny_params())
    total = sum(leaf.size for _, leaf in leaves)
    for name, mesh in [("dp", _mesh(data=8)), ("fsdp", _mesh(fsdp=8)), ("fsdp_tp", _mesh(fsdp=4, tensor=2))]:
        rules = sharding.RULES[name]
        sharded = 0
        for path, leaf in leaves:
            spec = tuple(sharding.param_spec(path, leaf.shape, mesh, rules))
            for axis, size in zip(spec, leaf.shape):
                if axis is not None:
                    assert size % mesh.shape[axis] == 0, (name, path, spec)
            assert spec.count("fsdp") <= 1 and spec.count("tensor") <= 1
            if name == "dp":
                assert all(a is None for a in spec), path
            if name == "fsdp" and leaf.size >= rules.fsdp_min_size:
                # the largest dimension that 8 divides carries the fsdp axis
                dims = [s for s in leaf.shape if s % 8 == 0]
                assert dims and leaf.shape[spec.index("fsdp")] == max(dims), (path, spec)
            if name == "fsdp_tp":
                axes = sharding.logical_axes(path, leaf.shape)
                for a, s, size in zip(axes, spec, leaf.shape):
                    assert (s == "tensor") == (a == "mlp" and size % 2 == 0), (path, spec)
            sharded += leaf.size if any(spec) else 0
        assert (sharded / total > 0.95) == (name != "dp"), (name, sharded / total)


def test_state_shardings_cover_optimizer_state():
    cfg = config_lib.get_config()
    params = _tiny_params()
    tx = build.build_optimizer(cfg)
    state = jax.eval_shape(lambda: state_lib.create(
        jax.tree.map(jnp.zeros_like, params), tx, jax.random.PRNGKey(0)))
    mesh, rules = _mesh(fsdp=8), sharding.RULES["fsdp"]
    # The AdamW moments mirror the parameters' paths and shapes, hence their layout.
    want = [sharding.param_spec(path, leaf.shape, mesh, rules) for path, leaf in _named_leaves(params)]
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(adam) == 1
    for moment in (adam[0].mu, adam[0].nu):
        got = [sharding.param_spec(path, leaf.shape, mesh, rules) for path, leaf in _named_leaves(moment)]
        assert got == want
    # On a real mesh: one sharding per leaf; step, Adam's count and the key replicated.
    real = sharding.make_mesh(jax.devices()[:1])
    shardings = sharding.tree_shardings(state, real, "fsdp")
    assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(state))
    replicated = jax.sharding.PartitionSpec()
    assert shardings.step.spec == replicated and shardings.rng.spec == replicated
    sizes = [leaf.size for _, leaf in _named_leaves(params)]
    assert sum(n for n, s in zip(sizes, want) if any(s)) > 0.95 * sum(sizes)


def test_bad_mesh_config_is_one_clear_error(small_config, tmp_path, capsys):
    n = len(jax.devices())
    with pytest.raises(sharding.ShardingError, match=rf"needs {3 * n} devices but {n} are present; set --config.mesh"):
        sharding.make_mesh(data=3 * n)
    with pytest.raises(sharding.ShardingError, match="at most one -1"):
        sharding.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(sharding.ShardingError, match="does not fit"):
        sharding.make_mesh(data=-1, fsdp=n + 1)
    with pytest.raises(sharding.ShardingError, match="unknown sharding rules 'zero3'"):
        sharding.get_rules("zero3")
    # Through the command line: one line naming the fix, exit status 2, nothing trained.
    from jaxdiff import cli
    rc = cli.main(["train", "--config.mesh.fsdp=3", "--config.mesh.data=1", "--workdir", str(tmp_path),
                   "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "mesh data=1, fsdp=3, tensor=1 needs 3 devices" in err[0]
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# 8 fake devices: the layouts give the same training as 1 device

_EQUIVALENCE = """
import json, jax, numpy as np
from jaxdiff import config as config_lib, sharding
from jaxdiff.checkpoint import Checkpointer
from jaxdiff import config as config_lib
from jaxdiff.train import build, loop
from jaxdiff.train import state as state_lib
assert len(jax.devices()) == 8
c = config_lib.get_config()
c.data.image_size = 16; c.data.batch_size = 16; c.optim.warmup_steps = 1
STEPS = {steps}
ds = build.build_task(c, sharding.make_mesh(jax.devices()[:1]))
it = ds.iterator()
batches = [next(it) for _ in range(STEPS)]
model = build.build_model(c, ds.image_shape, ds.num_classes)

def run(rules, devices, **shape):
    c.mesh.rules = rules
    mesh = sharding.make_mesh(devices, **shape)
    tr = build.build_trainer(c, mesh, model, build.build_schedule(c), build.build_optimizer(c), ds.image_shape)
    state = tr.init()
    init = jax.tree.map(np.asarray, state.params)
    losses = []
    for b in batches:
        state, m = tr.step(state, sharding.shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    return state, init, losses, tr

def norm(leaves):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves)))

ref, init, ref_losses, _ = run("dp", jax.devices()[:1])
a = jax.tree.leaves(ref.params)
moved = norm([np.asarray(x) - y for x, y in zip(a, jax.tree.leaves(init))])
out = {{"moved": moved}}
for rules, shape in {layouts}:
    state, _, losses, tr = run(rules, jax.devices(), **shape)
    b = jax.tree.leaves(state.params)
    shards = {{}}
    for name, tree in (("params", state.params), ("mu", state.opt_state[1][0].mu), ("ema", state.ema_params)):
        x = tree["down_2"]["res_0"]["conv_1"]["kernel"]
        shards[name] = [list(s.data.shape) for s in x.addressable_shards]
    out[rules] = {{
        "rel": norm([np.asarray(x) - np.asarray(y) for x, y in zip(a, b)]) / moved,
        "max_abs": max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b)),
        "loss_rel": max(abs(x - y) / abs(y) for x, y in zip(losses, ref_losses)),
        "shards": shards,
        "sharded_fraction": sum(x.size for x in b if not x.sharding.is_fully_replicated) / sum(x.size for x in b),
    }}
    if rules == "fsdp":
        # Elastic restore: this 8-device FSDP state, checkpointed, loads onto 4 devices as dp.
        ck = Checkpointer("{tmp}/ckpt")
        ck.save(STEPS, state, it, "{{}}"); ck.wait()
        c.mesh.rules = "dp"
        mesh4 = sharding.make_mesh(jax.devices()[:4])
        tr4 = build.build_trainer(c, mesh4, model, build.build_schedule(c), build.build_optimizer(c), ds.image_shape)
        back, step = ck.restore(tr4.abstract)
        out["restore"] = {{
            "step": step,
            "equal": all(np.array_equal(np.asarray(x), np.asarray(y))
                         for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(back))),
            "devices": sorted({{len(x.sharding.device_set) for x in jax.tree.leaves(back)}}),
            "replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(back)),
        }}
        ck.close()
print(json.dumps(out))
"""


def _equivalence(tmp_path, layouts, steps=3):
    code = _EQUIVALENCE.format(steps=steps, layouts=layouts, tmp=tmp_path)
    out = run_python(code, devices=8, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout.strip().splitlines()[-1])  # measured drift, shown with pytest -s
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_close(result, rules):
    r = result[rules]
    assert result["moved"] > 1e-2, result      # training really moved the parameters
    # Same updates up to float summation order (sharded vs single-device reductions).
    assert r["rel"] < 1e-4 and r["max_abs"] < 1e-5 and r["loss_rel"] < 1e-5, (rules, r)


def test_fsdp_on_8_devices_matches_1_device_and_restores_on_4(tmp_path):
    result = _equivalence(tmp_path, [("fsdp", dict(data=1, fsdp=8))])
    _check_close(result, "fsdp")
    r = result["fsdp"]
    # [3, 3, 64, 64] kernel: split 8 ways on one 64 dimension, its Adam moment and EMA alike
    for name in ("params", "mu", "ema"):
        assert len(r["shards"][name]) == 8 and sorted(sorted(s) for s in r["shards"][name]) == [[3, 3, 8, 64]] * 8
    assert r["sharded_fraction"] > 0.95
    rs = result["restore"]
    assert rs == {"step": 3, "equal": True, "devices": [4], "replicated": True}, rs


def test_dp_fsdp_and_fsdp_tp_on_8_devices_match_1_device(tmp_path):
    result = _equivalence(tmp_path, [("dp", dict(data=8)), ("fsdp", dict(data=2, fsdp=4)),
                                     ("fsdp_tp", dict(data=1, fsdp=4, tensor=2))])
    for rules in ("dp", "fsdp", "fsdp_tp"):
        _check_close(result, rules)
    assert result["dp"]["sharded_fraction"] == 0
    assert result["fsdp"]["shards"]["params"] == [[3, 3, 16, 64]] * 8
    # fsdp over in-channels (4 ways), tensor over out-channels (2 ways)
    assert result["fsdp_tp"]["shards"]["params"] == [[3, 3, 16, 32]] * 8
    assert result["fsdp_tp"]["shards"]["mu"] == [[3, 3, 16, 32]] * 8


# ---------------------------------------------------------------------------------------------
# SIGTERM: save the current step, exit 0, resume equals an uninterrupted run


def _overrides(steps):
    return ["--config.data.image_size=16", "--config.data.batch_size=16", f"--config.train.steps={steps}",
            "--config.train.log_every=1", "--config.train.checkpoint_every=1000",
            "--config.optim.warmup_steps=2", "--config.sample.num=4", "--config.sample.steps=3"]


def test_sigterm_saves_the_current_step_and_resume_is_exact(small_config, tmp_path):
    steps = 30
    workdir = tmp_path / "preempted"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxdiff.cli", "train", *_overrides(steps), "--workdir", str(workdir),
         "--no-progress"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 1 <= saved[0] < steps, saved
    assert f"preempted at step {saved[0]} of {steps}" in err
    assert not (workdir / "samples.png").exists()

    cfg = small_config
    cfg.train.steps, cfg.train.checkpoint_every, cfg.optim.warmup_steps = steps, 1000, 2
    # The saved checkpoint is complete: it restores on its own, at the step the run reached.
    ck = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    assert ck.read_config(saved[0])["train"]["steps"] == steps
    ck.close()
    resumed = loop.train(cfg, str(workdir), progress=False, write_samples=False)
    full = loop.train(cfg, str(tmp_path / "full"), progress=False, write_samples=False)
    assert int(resumed.step) == int(full.step) == steps
    for name in ("params", "ema_params", "opt_state", "rng"):
        a, b = jax.tree.leaves(getattr(full, name)), jax.tree.leaves(getattr(resumed, name))
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)), name
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    full_rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]
