"""Ahead-of-time warm-up (jaxdiff/pipelines/warmup.py): after `warmup(...)` the call with the same
shapes compiles nothing in the same process, counted with JAX's backend-compile events; the
counter is live (a new shape compiles); a warm-up of other shapes leaves the call working and its
result unchanged; nothing the warm-up did leaks into the call (prompt cache, safety flags); bad
sizes are one line. (The suite shares a persistent compilation cache, so a program may be loaded
from it rather than compiled: the counts below take both, `CompileCounter.events`.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli_generate import folder  # noqa: F401  (the tiny Stable Diffusion folder fixture)

from jaxdiff.pipelines import core, warmup


@pytest.fixture(scope="module")
def sd_folder(folder):  # noqa: F811
    """The tiny Stable Diffusion folder of tests/test_cli_generate.py (jaxdiff-written, initial weights)."""
    return folder


@pytest.fixture(scope="module")
def sd(sd_folder):
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    return StableDiffusion.from_pretrained(sd_folder, max_steps=4)


def _digits_model(image_size: int = 8):
    """A class-conditional pixel model at initial weights (no training needed to count programs)."""
    from jaxdiff import config as config_lib
    from jaxdiff.pipelines.pixel import DiffusionModel
    from jaxdiff.train import build

    cfg = config_lib.get_config()
    shape = (image_size, image_size, 1)
    module = build.build_model(cfg, shape, 10)
    state = jax.jit(build.init_state_fn(module, build.build_optimizer(cfg), shape, 0))()
    return DiffusionModel(config=cfg, module=module, schedule=build.build_schedule(cfg), params=state.params,
                          ema_params=state.ema_params, image_shape=shape)


def test_pixel_call_after_warmup_compiles_nothing():
    model = _digits_model()
    run = dict(num_steps=3, labels=[1, 2, 3], guidance_scale=2.0, seed=1)
    report = model.warmup(3, **run)
    assert report.programs + report.cache_hits >= 2 and report.seconds > 0, report   # the loop, [0, 1] conversion
    with warmup.CompileCounter() as c:
        images = model.sample(3, **run)
    assert c.events == 0, c.names
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
    # The counter is live: a batch of another size compiles the loop again.
    with warmup.CompileCounter() as c:
        model.sample(2, num_steps=3, labels=[1, 2], guidance_scale=2.0)
    assert c.events >= 1
    # A warm-up of one shape does not disturb a call of another: same images as a model never warmed.
    model.warmup(5, num_steps=3)
    fresh = _digits_model()
    assert np.array_equal(model.sample(3, **run), fresh.sample(3, **run))


def test_sd_call_after_warmup_compiles_nothing(sd):
    run = dict(num_images=2, num_steps=3, guidance_scale=5.0, output_type="np", height=16, width=16)
    report = sd.warmup(["", ""], **run)       # two prompts: the encoders' batch and N = 4 images
    # the text encoder, the sampling loop, the decoder, the [0, 1] conversion (and small host programs)
    assert report.programs + report.cache_hits >= 4, report
    assert len(sd.prompts.cache) == 0         # the warm-up's dummy embeddings are not cached
    assert "_encode" not in vars(sd.prompts) and sd.safety_checker is None
    with warmup.CompileCounter() as c:
        images = sd(["a cat", "a dog"], seed=3, **run)
    assert c.events == 0, c.names
    assert images.shape == (4, 16, 16, 3) and np.isfinite(images).all() and images.std() > 0
    # Another size was not warmed: it compiles, and works.
    with warmup.CompileCounter() as c:
        other = sd("a cat", num_images=1, num_steps=3, guidance_scale=5.0, output_type="np", height=32, width=16)
    assert c.events >= 1 and other.shape == (1, 32, 16, 3)


def test_sd_warmup_with_progress_and_pil(sd):
    run = dict(num_steps=2, guidance_scale=1.0, progress=True, height=16, width=16)   # unguided, per-step bar
    sd.warmup("", **run)
    with warmup.CompileCounter() as c:
        pictures = sd("a cat", **run)
    assert c.events == 0, c.names
    assert len(pictures) == 1 and pictures[0].size == (16, 16)


def test_bad_sizes_are_one_line(sd):
    for kwargs in (dict(height=30, width=16), dict(height=0.5), dict(num_images=0), dict(num_images="2"),
                   dict(num_steps=-1)):
        with pytest.raises(ValueError) as e:
            sd.warmup("", **kwargs)
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="multiples of 4"):
        sd.warmup("", height=10, width=16)
    model = _digits_model()
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="number of images") as e:
            model.warmup(bad)
        assert "\n" not in str(e.value)
    # a refused warm-up leaves the core and the pipeline as they were
    assert core.COMPILE_ONLY.get() is None and "_encode" not in vars(sd.prompts) and sd.safety_checker is None


def test_report_reads_as_one_line():
    r = warmup.Report(programs=7, cache_hits=2, seconds=1.25)
    assert str(r) == "compiled 7 programs in 1.2 s, loaded 2 from the compilation cache"
    assert str(r._replace(cache_hits=0)) == "compiled 7 programs in 1.2 s"


def test_generate_warmup_flag(sd_folder, tmp_path):
    import re

    from conftest import run_cli

    proc = run_cli("generate", "--model", str(sd_folder), "--prompt", "a cat", "--steps", "2", "--height", "16",
                   "--width", "16", "--warmup", "--no-progress", "--out", str(tmp_path / "w.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^jaxdiff generate: compiled \d+ programs in [\d.]+ s", proc.stderr, re.M), proc.stderr[-2000:]
    assert (tmp_path / "w.png").is_file()


def test_bf16_call_after_warmup_compiles_nothing(sd_folder):
    """A bf16 pipeline casts its weight matrices once per request (core.cast_weights); the warm-up
    compiles that cast and the loop on bf16 weights, so the call still compiles nothing."""
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    pipe = StableDiffusion.from_pretrained(sd_folder, jnp.bfloat16, max_steps=4)
    run = dict(num_steps=2, guidance_scale=3.0, output_type="np", height=16, width=16)
    pipe.warmup("", **run)
    with warmup.CompileCounter() as c:
        images = pipe("a cat", **run)
    assert c.events == 0, c.names
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all() and images.std() > 0
