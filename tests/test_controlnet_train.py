"""ControlNet training on a frozen Stable Diffusion base (`jaxdiff/train/controlnet.py`): only the
ControlNet is trained and saved, the controlled U-Net starts as the base exactly, resume is exact,
and the exported folder loads in diffusers and draws what jaxdiff draws with it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_resumes_bit_exact, tree_equal
from test_export import _tiny_config as _text_config
from test_lora_train import _saved_arrays

from jaxdiff import config as config_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.errors import CheckpointError, ConfigError
from jaxdiff.models import lora as lora_lib
from jaxdiff.pipelines.export import export_run
from jaxdiff.train import build, loop
from jaxdiff.train import controlnet as cn_train

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_controlnet.py")
PROMPTS = ["a handwritten seven", "a handwritten three"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny digits_text run, trained 4 steps and exported: the frozen base folder."""
    root = tmp_path_factory.mktemp("cn_base")
    loop.train(_text_config(), str(root / "run"), progress=False, write_samples=None)
    export_run(str(root / "run"), str(root / "sd"), ema=False)
    return str(root / "sd")


def _cn_config(base_dir):
    c = config_lib.load(EXPERIMENT)
    tiny = _text_config()
    c.text, c.data, c.optim = tiny.text, tiny.data, tiny.optim
    c.controlnet.base = base_dir
    c.controlnet.embedding_channels = (8, 16)
    c.controlnet.holdout = 10
    c.optim.learning_rate = 2e-2                  # a few steps that move the ControlNet visibly
    c.train.steps = 4
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    return c


def _task(base_dir, workdir):
    return build.build_task(_cn_config(base_dir), sharding_lib.make_mesh(), workdir=workdir)


@pytest.fixture(scope="module")
def cn_run(base, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("cn_run") / "run")
    state = loop.train(_cn_config(base), run, progress=False, write_samples=None)
    return run, state


@pytest.fixture(scope="module")
def task(base, cn_run):
    """The run's task (read once: the base, the cached latents and states, the controls)."""
    return _task(base, cn_run[0])


def test_controls_follow_the_digit():
    """Edges: the Sobel magnitude against its closed form on a square; skeleton: a 3-pixel-wide bar
    thins to its one-pixel centre line."""
    img = -np.ones((1, 8, 8, 1), np.float32)
    img[0, 2:6, 2:6] = 1.0
    e = cn_train.sobel_edges(img)[0]
    assert e[3, 3] == 0 and e[0, 0] == 0                       # flat inside and far outside
    # (3, 1), left of the square: gx = 1 + 2 + 1 = 4, gy = 0; the largest, at the corner (2, 2):
    # gx = gy = 2 + 1 = 3, so |g| = 3 sqrt(2), and every magnitude is divided by it.
    assert e[3, 1] == pytest.approx(4.0 / (3.0 * np.sqrt(2.0)), rel=1e-6)
    assert e[2, 2] == pytest.approx(1.0) and e.max() == pytest.approx(1.0)
    bar = -np.ones((1, 9, 9, 1), np.float32)
    bar[0, 1:8, 3:6] = 1.0
    s = cn_train.skeleton(bar)[0]
    assert s.sum() == s[:, 4].sum() == 4 and s[2:6, 4].all()    # the middle column (Zhang-Suen shortens the ends)
    rgb = cn_train.control_images("edges", img)
    assert rgb.shape == (1, 8, 8, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    with pytest.raises(ValueError, match="edges, skeleton"):
        cn_train.control_images("canny", img)


def test_held_out_digits_span_every_class_and_are_never_trained_on():
    cfg = config_lib.load(EXPERIMENT)
    arrays = cn_train.load_examples(cfg)[:3]
    (train_images, train_labels, _), (held_images, held_labels, _) = cn_train.split(cfg, arrays)
    assert len(held_labels) == cfg.controlnet.holdout and len(train_labels) + len(held_labels) == len(arrays[1])
    assert np.bincount(held_labels, minlength=10).min() >= cfg.controlnet.holdout // 10 - 1   # the set is sorted by class
    seen = {im.tobytes() for im in train_images}
    assert sum(im.tobytes() in seen for im in held_images) <= 1        # (a duplicate digit at most)
    cfg.controlnet.holdout = len(arrays[1])
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        cn_train.split(cfg, arrays)


def test_state_and_checkpoint_hold_only_the_controlnet(task, cn_run):
    run, state = cn_run
    net = task.controlnet
    fresh = cn_train.init_params(net, task.base_params, jax.random.PRNGKey(0))
    cn_shapes = {p: np.shape(v) for p, v in lora_lib.flat(fresh).items()}
    assert {p: np.shape(v) for p, v in lora_lib.flat(state.params).items()} == cn_shapes
    assert int(state.step) == 4
    saved = _saved_arrays(run, 4)
    big = {p: s for p, s in saved.items() if s and not p.startswith("rng")}
    for copy in ("params/", "ema_params/"):
        assert {p[len(copy):]: s for p, s in big.items() if p.startswith(copy)} == cn_shapes
    cn_size = sum(int(np.prod(s)) for s in cn_shapes.values())
    assert sum(int(np.prod(s)) for s in big.values()) == 4 * cn_size      # params, EMA, Adam's two moments
    decoder = [p for p in lora_lib.flat(task.base_params) if p.startswith("up_")]
    assert decoder and not any(p.split("/", 1)[1] in decoder for p in big if "/" in p)  # no U-Net decoder saved


def test_init_copies_the_encoder_and_the_controlled_unet_is_the_base(task, cn_run):
    """At step 0 the ControlNet's shared weights are the U-Net's (as diffusers' from_unet) and its
    zero convolutions make the controlled U-Net equal the base bit for bit; after training it does not."""
    _, state = cn_run
    net, unet, params = task.controlnet, task.model, jax.tree.map(jnp.asarray, task.base_params)
    fresh = cn_train.init_params(net, params, jax.random.PRNGKey(3))
    shared = [k for k in fresh if k not in cn_train.OWN]
    assert "down_0" in shared and "mid" in "".join(shared)
    assert all(tree_equal(fresh[k], params[k]) for k in shared)
    batch = {k: jnp.asarray(v) for k, v in next(task.iterator()).items()}
    x, t = batch["image"], jnp.linspace(10.0, 900.0, batch["image"].shape[0])
    apply = cn_train.controlled_apply(net, unet)
    plain = unet.apply({"params": params}, x, t, context=batch["context"])
    at_init = apply({"params": fresh}, x, t, base=params, control=batch["control"], context=batch["context"])
    assert np.array_equal(np.asarray(at_init), np.asarray(plain))
    trained = apply({"params": state.params}, x, t, base=params, control=batch["control"], context=batch["context"])
    assert float(jnp.abs(trained - plain).max()) > 1e-3


def test_the_base_is_an_input_of_the_compiled_step(base, task):
    """The step takes the base's arrays as (non-donated) arguments: a changed base changes the
    loss without a recompile, and the base survives the step."""
    cfg = _cn_config(base)
    mesh = sharding_lib.make_mesh()
    trainer = cn_train.build_trainer(cfg, mesh, task, build.build_schedule(cfg), build.build_optimizer(cfg))
    batch = sharding_lib.shard_batch(next(task.iterator()), mesh)
    (frozen,) = trainer.frozen
    _, m1 = trainer.step(trainer.init(), batch, frozen)
    _, m2 = trainer.step(trainer.init(), batch, jax.tree.map(lambda x: x * 1.05, frozen))
    _, m3 = trainer.step(trainer.init(), batch, frozen)
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
    assert float(m1["loss"]) != float(m2["loss"]) and float(m1["loss"]) == float(m3["loss"])
    assert trainer.step._cache_size() == 1


def test_resume_is_bit_exact(base, tmp_path):
    assert_resumes_bit_exact(_cn_config(base), tmp_path / "full", tmp_path / "split", stop_at=2)


def test_exported_controlnet_loads_in_diffusers_and_draws_what_jaxdiff_draws(base, cn_run, task, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    run, state = cn_run
    folder = cn_train.export_controlnet(run, str(tmp_path / "controlnet"), ema=False)
    ref_net = diffusers.ControlNetModel.from_pretrained(folder)
    # The folder holds the trained weights exactly (one row of each kind).
    sd = ref_net.state_dict()
    np.testing.assert_array_equal(sd["controlnet_mid_block.weight"].numpy()[:, :, 0, 0],
                                  np.asarray(state.params["zero_mid"]["conv_0"]["kernel"])[0, 0].T)
    controls = task.controls[:2]                                          # [2, 16, 16, 3] in [0, 1]
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kwargs = {"num_steps": 6, "guidance_scale": 3.0, "latents": noise, "output_type": "np"}
    pipe = StableDiffusion.from_pretrained(base, controlnet=folder)
    ours = pipe(PROMPTS, control_image=controls, **kwargs)
    off = pipe(PROMPTS, control_image=controls, controlnet_conditioning_scale=0.0, **kwargs)
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=ref_net, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = ref(PROMPTS, image=torch.from_numpy(controls.transpose(0, 3, 1, 2)), num_inference_steps=6,
                     guidance_scale=3.0, output_type="np", latents=torch.from_numpy(noise.transpose(0, 3, 1, 2))).images
    err = float(np.abs(ours - theirs).max())
    change = float(np.abs(ours - off).max())
    print(f"jaxdiff vs diffusers max error {err:.2e}; the ControlNet changes the image by {change:.3f}")
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert change > 2e-2, change                 # the trained ControlNet changes the image (20x the tolerance)


def test_export_refuses_a_run_that_is_not_a_controlnet_run(base, tmp_path):
    text_run = os.path.join(os.path.dirname(base), "run")
    with pytest.raises(CheckpointError, match="not a ControlNet run") as e:
        cn_train.export_controlnet(text_run, str(tmp_path / "x"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, match", [
    ("controlnet.control", "canny", "controlnet.control must be one of edges, skeleton"),
    ("controlnet.init", "copy", "controlnet.init must be one of random, unet"),
    ("controlnet.embedding_channels", (), "non-empty list of positive integers"),
    ("controlnet.embedding_channels", (16, 0), "non-empty list of positive integers"),
    ("controlnet.holdout", -1, "controlnet.holdout must be an integer >= 0"),
    ("controlnet.base", "", "must name a Stable Diffusion folder"),
    ("text.dropout", 1.5, "text.dropout"),
])
def test_controlnet_config_errors_are_one_line(tmp_path, key, value, match):
    cfg = config_lib.load(EXPERIMENT)
    cfg.controlnet.base = str(tmp_path)
    config_lib.validate(cfg)                                          # the experiment's own config is valid
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError, match=match) as e:
        config_lib.validate(cfg)
    assert "\n" not in str(e.value)
    cfg[section][name] = config_lib.load(EXPERIMENT)[section][name]
    cfg.controlnet.base = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="is not a folder"):
        config_lib.validate(cfg)


def test_embedding_widths_must_match_the_autoencoder(base, tmp_path):
    cfg = _cn_config(base)
    cfg.controlnet.embedding_channels = (8, 16, 32)                   # 1/4, but the base's autoencoder is 1/2
    with pytest.raises(ConfigError, match="give it 2 widths") as e:
        build.build_task(cfg, sharding_lib.make_mesh(), workdir=str(tmp_path))
    assert "\n" not in str(e.value)
