"""`jaxdiff export`: a latent text-to-image run becomes a diffusers Stable Diffusion folder that
jaxdiff and diffusers load, and that samples what the run itself samples."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import run_cli, train_tiny_run
from test_latent_train import _tiny_config as latent_train_config

import jaxdiff
from jaxdiff import data as data_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.checkpoint import Checkpointer, resolve
from jaxdiff.errors import CheckpointError
from jaxdiff.pipelines import latent_text
from jaxdiff.pipelines.export import export_run
from jaxdiff.pipelines.stable_diffusion import StableDiffusion
from jaxdiff.train import build, loop

PROMPTS = ["a handwritten seven", "the digit 3"]


def _tiny_config():
    c = latent_train_config()                   # tests/test_latent_train.py's shrunk digits_text
    c.model.unet.attention_levels = (0, 1)      # cross-attention at both levels, as the experiment
    c.train.steps = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.optim.warmup_steps = 1
    c.optim.learning_rate = 3e-3                # a few steps that move the weights visibly
    c.sample.steps = 6
    return c


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = str(root / "run")
    loop.train(_tiny_config(), run, progress=False, write_samples=False)
    out = str(root / "sd")
    notes = export_run(run, out, ema=False)       # after 4 steps the EMA is still near the start
    return run, out, notes


def _run_images(run_dir, caption_ids, guidance, seed):
    """What the run's own sample writer draws for these captions, with the raw weights."""
    cfg = _tiny_config()
    directory, step = resolve(run_dir)
    ckpt = Checkpointer(directory, read_only=True)
    mesh = sharding_lib.inference_mesh("dp", jax.local_devices())
    task = build.build_task(cfg, mesh, workdir=run_dir)
    model = build.build_model(cfg, task.image_shape, None, task.context_dim)
    abstract = jax.eval_shape(build.init_state_fn(model, build.build_optimizer(cfg), task.image_shape, cfg.seed))
    state, _ = ckpt.restore(sharding_lib.with_shardings(abstract, sharding_lib.tree_shardings(abstract, mesh, "dp")),
                            step)
    ckpt.close()
    run = build.Run(cfg=cfg, workdir=run_dir, task=task, model=model, schedule=build.build_schedule(cfg),
                    progress=False)
    return latent_text.sample_images(run, state.params, caption_ids, guidance, seed), task


def test_the_folder_samples_what_the_run_samples(exported):
    run, out, notes = exported
    assert notes == []
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusion.from_pretrained(out)
    assert pipe.default_sampler == "ddim"
    cfg = _tiny_config()
    captions = [f"a handwritten {w}" for w in ("seven", "three")]
    all_captions = list(data_lib.digit_captions())
    ids = np.asarray([all_captions.index(c) for c in captions])
    want, _ = _run_images(run, ids, 4.0, 5)                                        # [2, 16, 16, 1]
    # The folder says steps_offset=1 (what diffusers' pipelines force); the run samples with 0.
    got = pipe(captions, num_steps=cfg.sample.steps, guidance_scale=4.0, seed=5, output_type="np", steps_offset=0)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    other = pipe(captions[::-1], num_steps=cfg.sample.steps, guidance_scale=4.0, seed=5, output_type="np",
                 steps_offset=0)
    # The caption matters (a run of 4 steps barely listens to it, but 100x the tolerance above).
    assert np.abs(other - got).max() > 1e-3, np.abs(other - got).max()


def test_diffusers_loads_the_folder_and_draws_the_same_images(exported):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    _, out, _ = exported
    ref = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = StableDiffusion.from_pretrained(out)
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = pipe(PROMPTS, num_steps=6, guidance_scale=3.0, latents=noise, output_type="np")
    with torch.no_grad():
        theirs = ref(PROMPTS, num_inference_steps=6, guidance_scale=3.0, output_type="np",
                     latents=torch.from_numpy(noise.transpose(0, 3, 1, 2))).images
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_export_from_the_command_line_and_its_refusals(exported, tmp_path):
    run, _, _ = exported
    res = run_cli("export", run, "--out", str(tmp_path / "cli_sd"), "--no-ema")
    assert res.returncode == 0, res.stderr
    assert os.path.isfile(tmp_path / "cli_sd" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        export_run(str(tmp_path / "nowhere"), str(tmp_path / "x"))
    res = run_cli("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    with pytest.raises(CheckpointError, match="jaxdiff export"):
        jaxdiff.load(run)                           # the pixel loader points the way
    pixel_run = train_tiny_run(tmp_path / "pixel", batch_size=4, steps=1)
    with pytest.raises(CheckpointError, match="pixel-space run"):
        export_run(pixel_run, str(tmp_path / "z"))
    assert not os.path.exists(tmp_path / "z")
