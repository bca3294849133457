"""Tests for jaxdiff.data: digits, exact resume, per-process sharding, TFDS, folders.

Nothing here downloads: TFDS is exercised through ``tfds.testing.mock_data``, a tiny
dataset prepared locally as array_record, and an empty data_dir (checked in a
subprocess with a timeout and with sockets disabled).
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from jaxdiff import data


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
            assert x[k].dtype == y[k].dtype


def row_keys(images):
    """One hashable key per image [N, H, W, C] -> list of N bytes."""
    return [im.tobytes() for im in images]


# ----------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------


def test_digits_batches_shape_range_labels():
    ds = data.build("digits", batch_size=125, seed=0)
    assert ds.image_shape == (28, 28, 1)
    assert ds.num_classes == 10
    assert ds.num_examples == 5000 and ds.total_examples == 5000
    batches = take(ds.iterator(), 40)  # exactly one epoch
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (125, 28, 28, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (125,) and b["label"].dtype == np.int32
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    # Real digits: mostly black background, both extremes present.
    assert images.min() == -1.0 and images.max() == 1.0
    assert -0.8 < images.mean() < -0.65
    # One epoch visits every example exactly once: 500 of each digit.
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 500))
    everything, all_labels = data.load_images("digits", return_labels=True)
    assert everything.shape == (5000, 28, 28, 1)
    assert sorted(row_keys(images)) == sorted(row_keys(everything))
    # Images keep their labels through shuffling.
    by_key = dict(zip(row_keys(everything), all_labels))
    assert [by_key[k] for k in row_keys(images[:50])] == labels[:50].tolist()


def test_digits_determinism_and_seeds():
    a = take(data.build("digits", batch_size=64, seed=3).iterator(), 3)
    b = take(data.build("digits", batch_size=64, seed=3).iterator(), 3)
    c = take(data.build("digits", batch_size=64, seed=4).iterator(), 3)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_digits_reshuffles_each_epoch():
    it = data.build("digits", batch_size=1000, seed=0).iterator()
    epoch1, epoch2 = take(it, 5), take(it, 5)
    l1 = np.concatenate([b["label"] for b in epoch1])
    l2 = np.concatenate([b["label"] for b in epoch2])
    np.testing.assert_array_equal(np.bincount(l1), np.bincount(l2))  # same examples
    assert not np.array_equal(l1, l2)  # different order


def test_digits_resize_and_rgb():
    ds = data.build("digits", batch_size=8, image_size=32, channels=3)
    assert ds.image_shape == (32, 32, 3)
    b = next(ds.iterator())
    assert b["image"].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(b["image"][..., 0], b["image"][..., 2])
    assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["image"].std() > 0.3


def test_random_flip_mirrors_some_examples():
    plain = take(data.build("digits", batch_size=256, seed=1).iterator(), 2)
    flipped = take(data.build("digits", batch_size=256, seed=1, random_flip=True).iterator(), 2)
    again = take(data.build("digits", batch_size=256, seed=1, random_flip=True).iterator(), 2)
    assert_same_batches(flipped, again)  # deterministic given seed
    n_flipped = 0
    for p, f in zip(plain, flipped):
        np.testing.assert_array_equal(p["label"], f["label"])  # same order as without flips
        same = (p["image"] == f["image"]).all(axis=(1, 2, 3))
        mirrored = (p["image"][:, :, ::-1] == f["image"]).all(axis=(1, 2, 3))
        assert (same | mirrored).all()
        n_flipped += int((mirrored & ~same).sum())
    assert 150 < n_flipped < 362  # ~half of 512


# ----------------------------------------------------------------------------------
# exact resume
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, k, m",
    [
        (dict(batch_size=32, seed=7), 5, 6),
        # straddles the end of the first epoch (5000 / 128 = 39.06 batches), with flips
        # and with prefetch threads
        (dict(batch_size=128, seed=2, random_flip=True, num_threads=2), 38, 4),
    ],
)
def test_exact_resume(kwargs, k, m):
    ds = data.build("digits", **kwargs)
    it = ds.iterator()
    take(it, k)
    state = it.get_state()
    restored_state = json.loads(json.dumps(state))  # what a checkpoint stores
    assert restored_state == state
    expected = take(it, m)

    fresh = data.build("digits", **kwargs).iterator()
    fresh.set_state(restored_state)
    assert_same_batches(take(fresh, m), expected)
    assert_same_batches(take(ds.iterator(state=restored_state), m), expected)
    # and restoring is not a no-op: a fresh iterator gives different batches
    assert not np.array_equal(next(ds.iterator())["image"], expected[0]["image"])


def test_iterator_state_in_a_jaxdiff_checkpoint(tmp_path):
    """The trainer's way: `jaxdiff.checkpoint.Checkpointer` saves the iterator's position with
    the state (asynchronously) and `restore(..., data_iterator=...)` moves a fresh iterator to
    it."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.checkpoint import Checkpointer

    ds = data.build("digits", batch_size=16, seed=5, random_flip=True)
    it = ds.iterator()
    take(it, 4)
    ck = Checkpointer(str(tmp_path / "checkpoints"))
    ck.save(4, {"w": jnp.ones(3)}, it, "{}")
    take(it, 2)  # moving on while the save is written must not change what was saved
    expected = take(it, 3)
    ck.close()

    restored = ds.iterator()
    assert not np.array_equal(next(ds.iterator())["image"], expected[0]["image"])  # not a no-op
    ck = Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    _, step = ck.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, data_iterator=restored)
    assert step == 4 and ck.has_data_state(4)
    ck.close()
    take(restored, 2)
    assert_same_batches(take(restored, 3), expected)


# ----------------------------------------------------------------------------------
# per-process sharding
# ----------------------------------------------------------------------------------


def test_process_shards_are_disjoint_and_cover_the_dataset():
    everything = set(row_keys(data.load_images("digits")))
    seen = []
    for i in range(2):
        ds = data.build("digits", batch_size=125, seed=0, process_index=i, process_count=2)
        assert ds.num_examples == 2500
        batches = take(ds.iterator(), 20)  # one epoch of this shard
        keys = row_keys(np.concatenate([b["image"] for b in batches]))
        assert len(set(keys)) == 2500  # each example of the shard once
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == everything


def test_uneven_shards_count_every_example():
    counts = [data.build("digits", batch_size=4, process_index=i, process_count=3).num_examples
              for i in range(3)]
    assert counts == [1667, 1667, 1666]


# ----------------------------------------------------------------------------------
# argument errors
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("nope", {}, "unknown dataset 'nope'"),
        ("digits", dict(channels=2), "channels must be 1, 3"),
        ("digits", dict(image_size=0), "image_size"),
        ("digits", dict(split="test"), "one split"),
        ("digits", dict(process_index=2, process_count=2), "process_index"),
        ("digits", dict(batch_size=0), "batch_size"),
        ("digits", dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise_data_error(name, kwargs, match):
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(data.DataError, match=match):
        data.build(name, **kwargs)


def test_error_classes():
    assert issubclass(data.DataError, ValueError)
    assert issubclass(data.DatasetNotAvailableError, data.DataError)


# ----------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------


def test_tfds_mnist_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):
        ds = data.build("tfds:mnist", batch_size=8, seed=0, data_dir=str(tmp_path))
        assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10 and ds.num_examples == 20
        it = ds.iterator()
        batches = take(it, 3)  # crosses the epoch boundary
        state = it.get_state()
        expected = take(it, 2)
        resumed = ds.iterator(state=state)
        assert_same_batches(take(resumed, 2), expected)
        ds3 = data.build("tfds:mnist:test", batch_size=4, image_size=16, channels=3,
                         data_dir=str(tmp_path))
        b3 = next(ds3.iterator())
    for b in batches:
        assert b["image"].shape == (8, 28, 28, 1) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and set(b["label"].tolist()) <= set(range(10))
        assert -1 <= b["image"].min() and b["image"].max() <= 1
    assert b3["image"].shape == (4, 16, 16, 3)


TINY_NAME = "jaxdiff_tiny_digits"


def _tiny_examples(n, seed):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), i % 3) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    """A real array_record TFDS dataset prepared locally (no network, no TensorFlow)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxdiffTinyDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24, 0), "test": self._generate_examples(9, 1)}

        def _generate_examples(self, n, seed):
            for i, (img, label) in enumerate(_tiny_examples(n, seed)):
                yield i, {"image": img, "label": label}

    root = tmp_path_factory.mktemp("tfds")
    builder = JaxdiffTinyDigits(data_dir=str(root), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return str(root)


def test_tfds_prepared_array_record_dataset(tiny_tfds_dir):
    truth = {img.tobytes(): label for img, label in _tiny_examples(9, 1)}
    for name, split in [(f"tfds:{TINY_NAME}:test", None), (f"tfds:{TINY_NAME}", "test")]:
        ds = data.build(name, split=split, batch_size=3, data_dir=tiny_tfds_dir)
        assert ds.num_examples == 9 and ds.num_classes == 3 and ds.class_names == ("a", "b", "c")
        batches = take(ds.iterator(), 3)
        seen = {}
        for b in batches:
            pixels = np.round((b["image"] + 1) * 127.5).astype(np.uint8)  # back to uint8
            for img, label in zip(pixels, b["label"]):
                seen[img.tobytes()] = int(label)
        assert seen == truth  # every test example once, with its label
    assert data.build(f"tfds:{TINY_NAME}", batch_size=2, data_dir=tiny_tfds_dir).num_examples == 24
    unlabeled = data.build(
        f"tfds:{TINY_NAME}", batch_size=2, data_dir=tiny_tfds_dir, label_key=None
    )
    assert unlabeled.num_classes is None
    assert next(unlabeled.iterator())["label"].tolist() == [-1, -1]
    shards = [data.build(f"tfds:{TINY_NAME}", batch_size=2, data_dir=tiny_tfds_dir,
                         process_index=i, process_count=2).num_examples for i in range(2)]
    assert shards == [12, 12]
    with pytest.raises(data.DataError, match="Unknown split 'validation'"):
        data.build(f"tfds:{TINY_NAME}:validation", batch_size=2, data_dir=tiny_tfds_dir)
    with pytest.raises(data.DataError, match="no feature 'img'"):
        data.build(f"tfds:{TINY_NAME}", batch_size=2, data_dir=tiny_tfds_dir, image_key="img")


# Runs in a fresh interpreter with sockets disabled and TFDS's expensive steps (download and
# prepare, download managers, GCS downloads, tfds.load / tfds.data_source) replaced by recorders:
# any such attempt is recorded and fails at once instead of hanging or building a dataset. A
# last probe calls one of them directly, so the recorders are shown to be in the path.
_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    attempts, expensive = [], []
    def _blocked(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network disabled in this test")
    socket.getaddrinfo = _blocked
    socket.create_connection = _blocked
    socket.socket.connect = _blocked
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import gcs_utils
    def _recorder(name):
        def record(*args, **kwargs):
            expensive.append(name)
            raise RuntimeError(name + " called")
        return record
    for owner, names in [(tfds.core.DatasetBuilder, ["download_and_prepare"]),
                         (tfds.download.DownloadManager, ["download", "download_and_extract", "extract",
                                                          "download_kaggle_data"]),
                         (gcs_utils, ["download_gcs_dataset", "download_gcs_folder"]),
                         (tfds, ["load", "data_source"])]:
        for name in names:
            setattr(owner, name, _recorder(name))
    from jaxdiff import data
    out = []
    for name, data_dir in json.loads(sys.argv[1]):
        try:
            data.build(name, batch_size=4, data_dir=data_dir)
            out.append({"name": name, "error": None})
        except data.DataError as e:
            out.append({"name": name, "error": type(e).__name__, "message": str(e)})
    report = {"results": out, "network_attempts": attempts, "expensive": list(expensive)}
    try:
        tfds.builder("mnist", data_dir=json.loads(sys.argv[1])[0][1]).download_and_prepare()
    except RuntimeError:
        pass
    report["probe"] = expensive[len(report["expensive"]):]
    print("RESULT" + json.dumps(report))
    """
)


def test_tfds_not_prepared_fails_before_any_download_or_prepare(tmp_path):
    """An unprepared dataset is one DatasetNotAvailableError raised before anything expensive:
    no socket is opened and no download, prepare, GCS download or tfds.load / data_source call
    is made (each is a recorder in the child process; the timeout only guards against a hang).
    (TFDS's builder still asks gs://tfds-data for metadata it lacks locally; GCS is disabled in
    tfds 4.9, and a socket opened for it would be counted in network_attempts.)"""
    pytest.importorskip("tensorflow_datasets")
    empty = tmp_path / "tfds_empty"
    empty.mkdir()
    env = dict(os.environ, TFDS_DATA_DIR=str(empty), HOME=str(tmp_path))
    cases = [("tfds:mnist", str(empty)), ("tfds:cifar10:test", str(empty)), ("tfds:mnist", None),
             ("tfds:surely_not_a_dataset", str(empty))]
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, json.dumps(cases)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    report = json.loads(line[len("RESULT"):])
    assert report["network_attempts"] == [] and report["expensive"] == []
    assert report["probe"] == ["download_and_prepare"]  # the recorders do sit in TFDS's path
    mnist, cifar, mnist_default_dir, unknown = report["results"]
    for r, ds_name in [(mnist, "mnist"), (cifar, "cifar10"), (mnist_default_dir, "mnist")]:
        assert r["error"] == "DatasetNotAvailableError", r
        msg = r["message"]
        assert f"'{ds_name}'" in msg and str(empty) in msg
        assert f"tfds build {ds_name}" in msg and "data_dir" in msg
    assert "split 'test'" in cifar["message"]
    assert unknown["error"] == "DataError" and "surely_not_a_dataset" in unknown["message"]


def test_tfds_prepared_as_tfrecord_names_the_conversion(tiny_tfds_dir, tmp_path):
    """A set prepared as tfrecord (no random access) is one error naming convert_format."""
    import shutil

    root = tmp_path / "tfrecord"
    shutil.copytree(tiny_tfds_dir, root)
    info_path = root / TINY_NAME / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    assert info["fileFormat"] == "array_record"
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(data.DatasetNotAvailableError) as e:
        data.build(f"tfds:{TINY_NAME}", batch_size=2, data_dir=str(root))
    msg = str(e.value)
    assert "tfrecord" in msg and f"data_dir={str(root)!r}" in msg
    assert f"--dataset_version_dir={info_path.parent} --out_file_format=array_record" in msg


def test_tfds_log_lines_are_not_repeated_in_process(tiny_tfds_dir, caplog, monkeypatch):
    """Opening a prepared dataset again logs nothing TFDS already said in this process."""
    from jaxdiff.data import tfds_source

    monkeypatch.setattr(tfds_source, "_tfds_lines_shown", set())  # as in a fresh process
    caplog.set_level(logging.INFO)
    for split in ["train", "test", "train"]:
        data.build(f"tfds:{TINY_NAME}:{split}", batch_size=2, data_dir=tiny_tfds_dir)
    # (jaxdiff's own one-line summary comes once per build, by design)
    lines = [r.getMessage() for r in caplog.records if r.name != "jaxdiff.data"]
    assert sum("Load dataset info" in ln for ln in lines) == 1, lines
    repeated = {ln for ln in lines if lines.count(ln) > 1}
    assert not repeated, repeated


# Opens a mock-prepared dataset twice and an unprepared one twice, with every log line shown.
_LOG_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("jaxdiff.data").setLevel(logging.WARNING)  # a summary per build
    import tensorflow_datasets as tfds
    from jaxdiff import data
    empty, mock_dir = sys.argv[1], sys.argv[2]
    with tfds.testing.mock_data(num_examples=4):
        for name in ["tfds:mnist", "tfds:mnist:test", "tfds:mnist"]:
            data.build(name, batch_size=2, data_dir=mock_dir)
    for name in ["tfds:mnist", "tfds:mnist", "tfds:mnist:3.0.1"]:
        try:
            data.build(name, batch_size=2, data_dir=empty)
        except data.DatasetNotAvailableError as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
    """
)


def test_tfds_open_prints_each_line_once(tmp_path):
    """What a user sees: each line once; for an unprepared set only jaxdiff's one line."""
    pytest.importorskip("tensorflow_datasets")
    empty, mock_dir = tmp_path / "empty", tmp_path / "mock"
    empty.mkdir()
    mock_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT, str(empty), str(mock_dir)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(tmp_path)),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("DatasetNotAvailableError: ")]
    assert len(errors) == 3, proc.stderr
    # jaxdiff's error names the fix; TFDS's own lookup noise says nothing more.
    assert "`tfds build mnist --file_format=array_record" in errors[0]
    assert "--config.data.data_dir=DIR" in errors[0] and str(empty) in errors[0]
    assert not [ln for ln in lines if "dataset_info.json" in ln or "Failed to load" in ln]
    others = [ln for ln in lines if ln not in errors]
    repeated = {ln for ln in others if others.count(ln) > 1}
    assert not repeated, proc.stderr


# ----------------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------------


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


RED, GREEN = (255, 0, 0), (0, 255, 0)


def _solid(color, size=(8, 8)):
    return np.broadcast_to(np.array(color, np.uint8), (*size, 3)).copy()


def test_folder_with_class_subfolders(tmp_path):
    for i in range(3):
        _save(tmp_path / "red" / f"{i}.png", _solid(RED))
        _save(tmp_path / "green" / "nested" / f"{i}.jpg", _solid(GREEN))
    ds = data.build(f"folder:{tmp_path}", batch_size=6, seed=0)
    assert ds.class_names == ("green", "red") and ds.num_classes == 2
    assert ds.image_shape == (8, 8, 3) and ds.num_examples == 6
    b = next(ds.iterator())
    assert sorted(b["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    for img, label in zip(b["image"], b["label"]):
        red_channel = img[..., 0].mean()
        assert (red_channel > 0.9) if label == 1 else (red_channel < -0.9)
    # a plain existing directory path works too
    assert data.build(str(tmp_path), batch_size=2).num_classes == 2


def test_folder_flat_is_unlabeled_and_exact(tmp_path):
    _save(tmp_path / "a.png", _solid(RED))
    _save(tmp_path / "b.bmp", _solid(GREEN))
    _save(tmp_path / "sub" / "c.png", _solid(RED))  # not every image is in a subfolder
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.build(f"folder:{tmp_path}", batch_size=3)
    assert ds.num_classes is None and ds.class_names is None and ds.num_examples == 3
    b = next(ds.iterator())
    assert b["label"].tolist() == [-1, -1, -1]
    colors = sorted(tuple(img[0, 0].tolist()) for img in b["image"])
    assert colors == [(-1.0, 1.0, -1.0), (1.0, -1.0, -1.0), (1.0, -1.0, -1.0)]


def test_folder_resize_and_channel_conversion(tmp_path):
    rgb_dir, gray_dir = tmp_path / "rgb", tmp_path / "gray"
    for i in range(2):
        _save(rgb_dir / f"{i}.png", _solid(RED, size=(10, 14)))  # H=10, W=14
        _save(gray_dir / f"{i}.png", np.full((5, 5), 200 - 100 * i, np.uint8))
    ds = data.build(str(rgb_dir), batch_size=2, image_size=6, channels=1)
    assert ds.image_shape == (6, 6, 1)
    img = next(ds.iterator())["image"]
    assert img.shape == (2, 6, 6, 1)
    luma = int(0.299 * 255 + 0.5)  # PIL's RGB -> L for pure red: 76
    np.testing.assert_allclose(img, luma / 127.5 - 1, atol=1e-6)

    gray = data.build(str(gray_dir), batch_size=2)
    assert gray.image_shape == (5, 5, 1)  # grayscale files keep one channel by default
    as_rgb = data.build(str(gray_dir), batch_size=2, channels=3, image_size=8)
    assert as_rgb.image_shape == (8, 8, 3)
    x = next(as_rgb.iterator())["image"]
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    expected = [100 / 127.5 - 1, 200 / 127.5 - 1]
    np.testing.assert_allclose(sorted(x[:, 4, 4, 0]), expected, atol=1e-6)


def test_folder_mixed_sizes_need_image_size(tmp_path):
    _save(tmp_path / "a.png", _solid(RED, (8, 8)))
    _save(tmp_path / "b.png", _solid(RED, (9, 9)))
    with pytest.raises(data.DataError, match="different sizes.*image_size"):
        data.build(str(tmp_path), batch_size=2)
    assert data.build(str(tmp_path), batch_size=2, image_size=4).image_shape == (4, 4, 3)


def test_folder_corrupt_file_is_one_clear_error(tmp_path):
    _save(tmp_path / "cls" / "good.png", _solid(RED))
    bad = tmp_path / "cls" / "broken.png"
    bad.write_bytes(b"\x89PNG but not really" + os.urandom(64))
    with pytest.raises(data.DataError) as info:
        data.build(f"folder:{tmp_path}", batch_size=1)
    assert str(bad) in str(info.value) and "corrupt" in str(info.value)


def test_folder_truncated_png_is_caught(tmp_path):
    good = tmp_path / "a.png"
    _save(good, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    blob = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.DataError, match="cut.png"):
        data.build(str(tmp_path), batch_size=1)


def test_folder_empty_or_missing(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(data.DataError, match="contains no images"):
        data.build(f"folder:{tmp_path / 'empty'}", batch_size=1)
    with pytest.raises(data.DataError, match="does not exist"):
        data.build(f"folder:{tmp_path / 'missing'}", batch_size=1)
