import pytest

from jaxdiff import config as config_lib


def test_overrides_parse_to_field_types():
    c = config_lib.get_config()
    rest = config_lib.apply_overrides(c, ["--config.train.steps=12", "--config.optim.learning_rate", "1e-4",
                                          "--config.data.random_flip=true", "--config.data.dataset=tfds:mnist",
                                          "--workdir", "w"])
    assert rest == ["--workdir", "w"]
    assert c.train.steps == 12 and isinstance(c.train.steps, int)
    assert c.optim.learning_rate == 1e-4
    assert c.data.random_flip is True
    assert c.data.dataset == "tfds:mnist"


def test_int_accepted_for_float_field():
    c = config_lib.get_config()
    config_lib.override(c, "optim.learning_rate", "1")
    assert c.optim.learning_rate == 1.0 and isinstance(c.optim.learning_rate, float)


@pytest.mark.parametrize("key", ["train.stepz", "nope", "train.steps.x", "train"])
def test_unknown_key_is_an_error_naming_it(key):
    c = config_lib.get_config()
    with pytest.raises(config_lib.ConfigError, match="unknown config key"):
        config_lib.override(c, key, "1")


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(config_lib.ConfigError, match="train.steps"):
        config_lib.override(config_lib.get_config(), "train.stepz", "1")


def test_wrong_type_is_an_error():
    c = config_lib.get_config()
    with pytest.raises(config_lib.ConfigError, match="train.steps.*expected int"):
        config_lib.override(c, "train.steps", "many")
    with pytest.raises(config_lib.ConfigError, match="boolean"):
        config_lib.override(c, "data.random_flip", "perhaps")


def test_experiment_files_load_and_inherit(tmp_path):
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    c = config_lib.load(str(root / "experiments" / "cifar10_ddpm.py"))
    assert c.model.name == "ddpm_cifar10" and c.data.dataset == "tfds:cifar10"
    assert set(c.keys()) == set(config_lib.get_config().keys())
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(config_lib.ConfigError, match="get_config"):
        config_lib.load(str(bad))
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.load(str(tmp_path / "missing.py"))


def test_json_round_trip():
    c = config_lib.get_config()
    c.train.steps = 7
    back = config_lib.from_json(config_lib.to_json(c))
    assert back.to_dict() == c.to_dict()


@pytest.mark.parametrize("name", ["digits", "digits_text", "digits_dit", "mnist_tfds", "cifar10_ddpm", "cifar10_dit"])
def test_every_experiment_config_validates(name):
    """(digits_lora and digits_controlnet validate only with their base folder, see their tests.)"""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    c = config_lib.load(str(root / "experiments" / f"{name}.py"))
    config_lib.validate(c)
    assert set(c.keys()) >= set(config_lib.get_config().keys())
