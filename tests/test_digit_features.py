"""The digit feature network shipped in the package: its file, its accuracy, FID-digits, and the
determinism of the script that trained it."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors import safe_open

from jaxdiff import data
from jaxdiff.metrics import distribution, features, reference, stats

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "train_digit_features.py"
ACCURACY_FLOOR = 0.95


@pytest.fixture(scope="module")
def digits():
    examples, _ = data.load_examples("digits", image_size=16, channels=1)
    return examples["image"], examples["label"]


def _script():
    spec = importlib.util.spec_from_file_location("train_digit_features", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_file_matches_its_identity(tmp_path):
    assert features.file_sha256(features.DIGIT_WEIGHTS) == features.DIGIT_WEIGHTS_SHA256
    assert features.DIGIT_WEIGHTS_SHA256 in features.DIGIT_FEATURE_NET
    with safe_open(features.DIGIT_WEIGHTS, "np") as f:
        info = json.loads(f.metadata()["jaxdiff"])
    assert info["heldout_accuracy"] == pytest.approx(features.DIGIT_HELDOUT_ACCURACY)
    params = features.digit_params()
    shapes = jax.eval_shape(lambda: features.DigitNet().init(
        jax.random.key(0), np.zeros((1, *features.DIGIT_IMAGE_SHAPE), np.float32)))["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
    # the identity binds reference statistics to this network
    path = str(tmp_path / "ref.npz")
    s = stats.from_features(np.random.default_rng(0).normal(size=(8, features.DIGIT_FEATURE_DIM)))
    reference.save_reference(path, s, feature_net=features.DIGIT_FEATURE_NET)
    assert reference.load_reference(path, feature_net=features.DIGIT_FEATURE_NET,
                                     dim=features.DIGIT_FEATURE_DIM).n == 8


def test_heldout_accuracy_is_the_reported_one(digits):
    images, labels = digits
    _, held = features.digit_split(len(images))
    logits = features._digit_apply(features.digit_params(), images[held])[1]
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == labels[held]))
    assert accuracy == pytest.approx(features.DIGIT_HELDOUT_ACCURACY, abs=1e-3)
    assert accuracy >= ACCURACY_FLOOR


def test_fid_digits_real_vs_real_small_real_vs_noise_large(digits):
    images, labels = digits
    train, held = features.digit_split(len(images))
    f_held = features.digit_features(images[held], batch_size=256)           # [1000, 128], padded last batch
    assert f_held.shape == (1000, features.DIGIT_FEATURE_DIM) and f_held.dtype == np.float32
    f_real = features.digit_features(images[train[:1000]])
    noise = np.random.default_rng(0).uniform(-1, 1, images[held].shape).astype(np.float32)
    f_noise = features.digit_features(noise)
    ones = features.digit_features(images[train][labels[train] == 1][:500])  # one digit only
    real = distribution.fid(stats.from_features(f_real), stats.from_features(f_held))
    only_ones = distribution.fid(stats.from_features(ones), stats.from_features(f_held))
    vs_noise = distribution.fid(stats.from_features(f_noise), stats.from_features(f_held))
    print(f"FID-digits real/real {real:.3f}  ones/real {only_ones:.3f}  noise/real {vs_noise:.3f}")
    assert real < 0.05 * only_ones < vs_noise
    # batching does not change features
    np.testing.assert_allclose(features.digit_features(images[held[:7]], batch_size=3), f_held[:7],
                               rtol=1e-5, atol=1e-6)


def test_digit_features_refuse_other_shapes():
    with pytest.raises(ValueError, match=r"reads images \[N, 16, 16, 1\].*got shape \(2, 28, 28, 1\)"):
        features.digit_features(np.zeros((2, 28, 28, 1), np.float32))


def test_training_script_first_steps_are_deterministic(tmp_path):
    script = _script()
    p1, l1, _ = script.train(steps=6)
    p2, l2, _ = script.train(steps=6)
    assert np.array_equal(l1, l2)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    assert l1[-1] < l1[0]                                                    # it is learning
    out = tmp_path / "w.safetensors"
    script.main(["--steps", "3", "--out", str(out)])
    assert features.file_sha256(str(out)) != features.DIGIT_WEIGHTS_SHA256   # 3 steps != shipped
