"""LoRA training on a frozen Stable Diffusion base (`jaxdiff/train/lora.py`): only the adapters are
trained and saved, the base is an input of the compiled step, resume is exact, and the exported
file loads in diffusers and draws what jaxdiff draws with it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_resumes_bit_exact, run_cli
from test_export import _tiny_config as _text_config

from jaxdiff import config as config_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.errors import CheckpointError, ConfigError
from jaxdiff.models import lora as lora_lib
from jaxdiff.pipelines.export import export_run
from jaxdiff.train import build, loop
from jaxdiff.train import lora as lora_train

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_lora.py")
PROMPTS = ["a bold seven", "a handwritten three"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny digits_text run, trained 4 steps and exported: the frozen base folder."""
    root = tmp_path_factory.mktemp("lora_base")
    loop.train(_text_config(), str(root / "run"), progress=False, write_samples=None)
    export_run(str(root / "run"), str(root / "sd"), ema=False)
    return str(root / "sd")


def _lora_config(base_dir):
    c = config_lib.load(EXPERIMENT)
    tiny = _text_config()
    c.text, c.data, c.optim = tiny.text, tiny.data, tiny.optim
    c.lora.base = base_dir
    c.lora.rank = 2
    c.lora.alpha = 4.0
    c.lora.keep = 0.1
    c.optim.learning_rate = 2e-2                  # a few steps that move the adapters visibly
    c.train.steps = 4
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    return c


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("lora_run") / "run")
    state = loop.train(_lora_config(base), run, progress=False, write_samples=None)
    return run, state


def test_the_state_holds_only_adapters_and_starts_at_the_base(base, lora_run):
    run, state = lora_run
    cfg = _lora_config(base)
    paths = lora_train.target_paths(build.build_task(cfg, sharding_lib.make_mesh(), workdir=run).base_params,
                                    cfg.lora.targets)
    assert len(paths) > 0 and all(p.endswith("kernel") for p in paths)
    leaves = lora_lib.flat(state.params)
    assert sorted(leaves) == sorted(f"{p}/{k}" for p in paths for k in ("down", "up"))
    assert all(v.shape[-1] == 2 or v.shape[0] == 2 for v in leaves.values())
    assert int(state.step) == 4


def _saved_arrays(run, step):
    """{"/"-joined path: shape} of every array orbax saved for the state at `step`."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(os.path.join(run, "checkpoints", str(step), "state"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(sharding_lib.rules._key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat}


def test_checkpoint_holds_only_the_adapters(base, lora_run):
    run, state = lora_run
    saved = _saved_arrays(run, 4)
    adapter = {p: v.shape for p, v in lora_lib.flat(state.params).items()}
    adapter_size = sum(int(np.prod(s)) for s in adapter.values())
    # Every array with elements is an adapter leaf: the params, their EMA and Adam's two moments.
    big = {p: s for p, s in saved.items() if s and not p.startswith("rng")}
    assert all(p.endswith(("/down", "/up")) for p in big), sorted(big)[:5]
    assert sum(int(np.prod(s)) for s in big.values()) == 4 * adapter_size
    for copy in ("params/", "ema_params/"):
        assert {p[len(copy):]: s for p, s in big.items() if p.startswith(copy)} == adapter
    base_size = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(_task(base, run).base_params))
    assert 4 * adapter_size < base_size / 5, (adapter_size, base_size)


def _task(base_dir, workdir):
    return build.build_task(_lora_config(base_dir), sharding_lib.make_mesh(), workdir=workdir)


def test_the_base_is_an_input_of_the_compiled_step(base, lora_run):
    """Not a constant baked into the program: the step takes the base's arrays as arguments (none
    donated), holds no constant of their size, and a changed base changes the loss without a
    recompile."""
    run, _ = lora_run
    cfg = _lora_config(base)
    mesh = sharding_lib.make_mesh()
    task = _task(base, run)                       # reads the run's caches
    trainer = lora_train.build_trainer(cfg, mesh, task, build.build_schedule(cfg), build.build_optimizer(cfg))
    batch = sharding_lib.shard_batch(next(task.iterator()), mesh)
    (frozen,) = trainer.frozen
    lowered = trainer.step.lower(trainer.abstract, batch, frozen)
    n_in = len(jax.tree.leaves(lowered.args_info))
    assert n_in == sum(len(jax.tree.leaves(t)) for t in (trainer.abstract, batch, frozen))
    import re

    constants = [int(np.prod([int(d) for d in m.split("x")[:-1]] or [1]))
                 for m in re.findall(r"dense<[^>]*>\s*:\s*tensor<([0-9x]+[a-z0-9]+)>", lowered.as_text())]
    base_size = sum(x.size for x in jax.tree.leaves(frozen))
    assert sum(constants) < base_size / 10, (sum(constants), base_size)
    _, m1 = trainer.step(trainer.init(), batch, frozen)
    shifted = jax.tree.map(lambda x: x * 1.05, frozen)
    _, m2 = trainer.step(trainer.init(), batch, shifted)
    _, m3 = trainer.step(trainer.init(), batch, frozen)
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
    assert float(m1["loss"]) != float(m2["loss"]) and float(m1["loss"]) == float(m3["loss"])
    assert trainer.step._cache_size() == 1


def test_the_first_step_is_the_base_networks_loss_and_gradient(base, lora_run):
    """At step 0 the adapters' up is zero: the loss is the base network's, and the gradient of
    each up is (alpha / r) down^T dL/dW (closed form of W' = W + (alpha / r) down up)."""
    from jaxdiff.train.step import context_condition, make_loss_fn

    run, _ = lora_run
    cfg = _lora_config(base)
    task = _task(base, run)
    batch = {k: jnp.asarray(v) for k, v in next(task.iterator()).items()}
    full = make_loss_fn(task.model.apply, build.build_schedule(cfg).alphas_cumprod,
                        prediction_type=cfg.diffusion.prediction_type, min_snr_gamma=cfg.diffusion.min_snr_gamma,
                        condition=context_condition(cfg.text.dropout, task.null_context))
    params = jax.tree.map(jnp.asarray, task.base_params)
    adapters = lora_train.init_adapters(params, cfg, jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)
    loss, g_ad = jax.value_and_grad(lora_train.adapted_loss(full, cfg.lora.alpha))(adapters, batch, key, params)
    want, g_w = jax.value_and_grad(full)(params, batch, key)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    g_w, g_ad, ad = lora_lib.flat(g_w), lora_lib.flat(g_ad), lora_lib.flat(adapters)
    scale = cfg.lora.alpha / cfg.lora.rank
    for path in lora_train.target_paths(params, cfg.lora.targets):
        want_up = scale * ad[f"{path}/down"].T @ g_w[path]
        np.testing.assert_allclose(g_ad[f"{path}/up"], want_up, rtol=1e-4, atol=1e-7)
        assert float(jnp.abs(g_ad[f"{path}/down"]).max()) == 0.0       # up = 0: no gradient reaches down yet


def test_resume_is_bit_exact(base, tmp_path):
    cfg = _lora_config(base)
    assert_resumes_bit_exact(cfg, tmp_path / "full", tmp_path / "split", stop_at=2)


def test_exported_file_loads_in_diffusers_and_draws_what_jaxdiff_draws(base, lora_run, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.convert import lora as lora_convert
    from jaxdiff.pipelines import lora as lora_pipe
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    run, state = lora_run
    path = lora_train.export_lora(run, str(tmp_path / "bold.safetensors"), ema=False)
    pipe = StableDiffusion.from_pretrained(base)
    # The file holds the trained adapters exactly.
    back = lora_convert.read(path, lora_pipe.tables(pipe.unet))["unet"]
    trained = lora_train.as_loras(jax.device_get(state.params), 4.0)
    assert sorted(back) == sorted(trained)
    for p, w in trained.items():
        np.testing.assert_allclose(np.asarray(back[p].down), np.asarray(w.down), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(back[p].up), np.asarray(w.up), rtol=1e-6)
        assert float(back[p].alpha) == 4.0
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kwargs = {"num_steps": 6, "guidance_scale": 3.0, "latents": noise, "output_type": "np"}
    plain = pipe(PROMPTS, **kwargs)
    pipe.load_lora(path)
    ours = pipe(PROMPTS, **kwargs)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(path)
    with torch.no_grad():
        theirs = ref(PROMPTS, num_inference_steps=6, guidance_scale=3.0, output_type="np",
                     latents=torch.from_numpy(noise.transpose(0, 3, 1, 2))).images
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    change = float(np.abs(ours - plain).max())
    assert change > 2e-2, change                 # the LoRA changes the image (50x the tolerance)


def test_export_lora_from_the_command_line_and_its_refusals(base, lora_run, tmp_path):
    run, _ = lora_run
    res = run_cli("export-lora", run, "--out", str(tmp_path / "out"), "--no-ema")
    assert res.returncode == 0, res.stderr
    assert os.path.isfile(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    text_run = os.path.join(os.path.dirname(base), "run")
    with pytest.raises(CheckpointError, match="not a LoRA run"):
        lora_train.export_lora(text_run, str(tmp_path / "x"))
    res = run_cli("export-lora", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("key, value, match", [
    ("lora.rank", 0, "lora.rank must be a positive integer"),
    ("lora.alpha", float("nan"), "lora.alpha"),
    ("lora.targets", ("to_q", "to_x"), "did you mean to_"),
    ("lora.targets", (), "non-empty list"),
    ("lora.style", "thin", "lora.style must be one of"),
    ("lora.keep", 1.5, "lora.keep"),
    ("lora.text_encoder", True, "not trained yet"),
    ("lora.base", "", "must name a Stable Diffusion folder"),
    ("data.dataset", "digits", "needs --config.data.dataset=captioned_digits"),
])
def test_lora_config_errors_are_one_line(tmp_path, key, value, match):
    cfg = config_lib.load(EXPERIMENT)
    cfg.lora.base = str(tmp_path)
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError, match=match) as e:
        config_lib.validate(cfg)
    assert "\n" not in str(e.value)
    cfg.lora.base = str(tmp_path / "missing")
    cfg[section][name] = config_lib.load(EXPERIMENT)[section][name]
    with pytest.raises(ConfigError, match="is not a folder"):
        config_lib.validate(cfg)
