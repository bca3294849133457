"""`config.validate`: every value the trainer would trip over later is refused up front, in one
line naming the key and the fix; `loop.train` calls it before anything is built."""

import math
import os

import pytest

from jaxdiff import config as config_lib
from jaxdiff.errors import ConfigError, TrainingError

# (key, bad value, text the message must hold besides the key)
BAD = [
    ("train.steps", 0, "positive integer"),
    ("train.steps", -5, "positive integer"),
    ("train.keep_checkpoints", 0, "positive integer"),
    ("train.keep_checkpoints", -1, "positive integer"),
    ("train.checkpoint_every", 0, "positive integer"),
    ("train.log_every", 0, "positive integer"),
    ("train.sample_every", -1, ">= 0"),
    ("train.remat", "some", "none"),
    ("diffusion.prediction_type", "eps", "epsilon"),
    ("diffusion.schedule", "cosine", "scaled_linear"),
    ("diffusion.label_dropout", 1.5, "[0, 1]"),
    ("diffusion.label_dropout", -0.1, "[0, 1]"),
    ("diffusion.label_dropout", math.nan, "[0, 1]"),
    ("diffusion.min_snr_gamma", math.inf, "finite"),
    ("diffusion.beta_end", math.nan, "finite"),
    ("diffusion.num_train_timesteps", 1, ">= 2"),
    ("sample.sampler", "dimm", "ddim"),
    ("sample.steps", 0, "positive integer"),
    ("sample.num", 0, "positive integer"),
    ("sample.guidance_scale", math.nan, "finite"),
    ("sample.guidance_scale", math.inf, "finite"),
    ("optim.learning_rate", 0.0, "> 0"),
    ("optim.learning_rate", -1e-3, "> 0"),
    ("optim.learning_rate", math.nan, "finite"),
    ("optim.learning_rate", math.inf, "finite"),
    ("optim.ema_decay", 1.5, "[0, 1]"),
    ("optim.ema_decay", -0.1, "[0, 1]"),
    ("optim.b2", 1.0, "[0, 1)"),
    ("optim.grad_clip", math.nan, "finite"),
    ("optim.warmup_steps", -1, ">= 0"),
    ("data.batch_size", 0, "positive integer"),
    ("data.batch_size", -8, "positive integer"),
    ("data.channels", 2, "0, 1, 3"),
    ("model.dropout", 1.0, "[0, 1)"),
    ("model.dropout", -0.5, "[0, 1)"),
    ("model.name", "tinny", "tiny"),
    ("model.dtype", "fp16", "bfloat16"),
    ("mesh.rules", "zero3", "fsdp"),
]


@pytest.mark.parametrize("key,value,needle", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_values_are_one_line_naming_the_key_and_the_fix(key, value, needle):
    cfg = config_lib.get_config()
    section, leaf = key.split(".")
    with cfg.ignore_type():
        cfg[section][leaf] = value
    with pytest.raises(ConfigError) as info:
        config_lib.validate(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert f"config key {key} " in message and needle in message, message
    assert f"--config.{key}=" in message, message          # the fix: the override to pass


def test_the_base_config_and_every_experiment_pass():
    import pathlib

    config_lib.validate(config_lib.get_config())
    root = pathlib.Path(__file__).resolve().parents[1]
    for name in ("digits", "digits_text", "cifar10_ddpm", "mnist_tfds"):
        config_lib.validate(config_lib.load(str(root / "experiments" / f"{name}.py")))


def test_model_dtypes_are_the_trainers():
    from jaxdiff.train import build

    assert set(config_lib.MODEL_DTYPES) == set(build.DTYPES)


def test_latent_sections_are_checked_when_present():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = config_lib.load(str(root / "experiments" / "digits_text.py"))
    cfg.text.dropout = 2.0
    with pytest.raises(ConfigError, match="text.dropout"):
        config_lib.validate(cfg)
    cfg.text.dropout = 0.1
    cfg.vae.learning_rate = math.nan
    with pytest.raises(ConfigError, match="vae.learning_rate"):
        config_lib.validate(cfg)


def test_nan_and_inf_overrides_reach_validation():
    """`--config.optim.learning_rate=nan` parses (as a float) so `validate` can explain it."""
    cfg = config_lib.get_config()
    config_lib.override(cfg, "sample.guidance_scale", "nan")
    assert math.isnan(cfg.sample.guidance_scale)
    config_lib.override(cfg, "optim.learning_rate", "-inf")
    assert cfg.optim.learning_rate == -math.inf
    with pytest.raises(ConfigError, match="expected float"):
        config_lib.override(cfg, "optim.learning_rate", "fast")


# --------------------------------------------------------------------------------------------
# the work dir


def test_work_dir_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file.*--workdir"):
        config_lib.validate(config_lib.get_config(), str(f))
    with pytest.raises(ConfigError, match=f"lies under the file {f}.*--workdir"):
        config_lib.validate(config_lib.get_config(), str(f / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_work_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for workdir in (ro, ro / "run"):
            with pytest.raises(ConfigError, match="cannot be written.*--workdir"):
                config_lib.validate(config_lib.get_config(), str(workdir))
    finally:
        ro.chmod(0o755)


def test_unwritable_work_dir_probe(tmp_path, monkeypatch):
    """The probe file is what decides (the check works for root and on read-only mounts too)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError, match=r"work dir .* cannot be written \(Permission denied"):
        config_lib.validate(config_lib.get_config(), str(tmp_path / "run"))


def test_probe_leaves_nothing_behind(tmp_path):
    config_lib.validate(config_lib.get_config(), str(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []                   # nothing created, the probe removed
    (tmp_path / "w").mkdir()
    config_lib.validate(config_lib.get_config(), str(tmp_path / "w"))
    assert list((tmp_path / "w").iterdir()) == []


# --------------------------------------------------------------------------------------------
# the trainer


def test_train_validates_before_building_anything(tmp_path, small_config):
    from jaxdiff.train import loop

    small_config.train.log_every = 0        # today: a ZeroDivisionError after compiling
    work = tmp_path / "run"
    with pytest.raises(ConfigError, match="train.log_every"):
        loop.train(small_config, str(work), progress=False)
    assert not work.exists()


def test_resume_compares_the_seed():
    from jaxdiff.train import loop

    cfg = config_lib.get_config()
    saved = cfg.to_dict()
    cfg.seed = 1
    with pytest.raises(TrainingError, match=r"used seed 0, this config has seed 1; pass --config.seed=0"):
        loop._check_resumable(saved, cfg)
    cfg.seed = 0
    loop._check_resumable(saved, cfg)
