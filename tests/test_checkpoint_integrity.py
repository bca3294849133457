"""The checks that decide whether a checkpoint step is trusted, one by one, on hand-made folders:
the manifest (its format, atomic write, what it covers), each structure and file problem and the
order they are found in, the share wording of non-finite values, the single-process agreement,
and which paths name a checkpoint. No orbax save: each test takes milliseconds."""

import hashlib
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.checkpoint import integrity, manager, messages
from jaxdiff.errors import CheckpointError


def _step(tmp_path, name="3"):
    """A step folder as orbax leaves it: item folders plus top-level files of its own."""
    step = tmp_path / name
    (step / "state" / "d").mkdir(parents=True)
    (step / "config").mkdir()
    (step / "state" / "_METADATA").write_text("{}")
    (step / "state" / "d" / "arr").write_bytes(b"\x00\x01" * 50)
    (step / "config" / "metadata").write_text('{"lr": 1}')
    (step / "_CHECKPOINT_METADATA").write_text("top")
    return str(step)


def test_manifest_lists_every_item_file_with_size_and_sha256(tmp_path):
    folder = _step(tmp_path)
    manifest = integrity.write_manifest(folder)
    with open(os.path.join(folder, integrity.MANIFEST)) as f:
        assert json.load(f) == manifest
    assert manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == ["config/metadata", "state/_METADATA", "state/d/arr"]  # no top-level files
    arr = manifest["files"]["state/d/arr"]
    assert arr == {"bytes": 100, "sha256": hashlib.sha256(b"\x00\x01" * 50).hexdigest()}
    assert not os.path.exists(os.path.join(folder, integrity.MANIFEST + ".partial"))
    entries, problem = integrity.read_manifest(folder)
    assert problem == "" and entries == sorted((k, v["bytes"], v["sha256"]) for k, v in manifest["files"].items())
    assert integrity.check_files(folder, entries) == ""
    assert integrity.structure_problem(folder) == ""


def test_each_file_problem_is_named(tmp_path):
    folder = _step(tmp_path)
    integrity.write_manifest(folder)
    entries, _ = integrity.read_manifest(folder)
    arr = os.path.join(folder, "state", "d", "arr")
    with open(arr, "r+b") as f:                                          # same size, one byte flipped
        f.seek(10)
        f.write(b"\xff")
    assert integrity.check_files(folder, entries) == "state/d/arr does not match its checksum"
    os.truncate(arr, 40)
    assert integrity.check_files(folder, entries) == "state/d/arr has 40 bytes, 100 expected"
    os.remove(arr)
    assert integrity.check_files(folder, entries) == "state/d/arr is missing"
    # Sizes are checked for every file before any hash is computed.
    big = [("config/metadata", 9, "0" * 64), ("state/_METADATA", 3, "0" * 64)]
    assert integrity.check_files(folder, big) == "state/_METADATA has 2 bytes, 3 expected"
    assert integrity.check_files(folder, big[:1]) == "config/metadata does not match its checksum"


def test_manifest_problems(tmp_path):
    folder = _step(tmp_path)
    assert integrity.read_manifest(folder) == (None, "")
    for text in ("{", '{"files": 3}', '{"files": {"a": {"bytes": "x"}}}', "[]"):
        with open(os.path.join(folder, integrity.MANIFEST), "w") as f:
            f.write(text)
        assert integrity.read_manifest(folder) == (None, "checksums.json is unreadable"), text


def test_structure_problems_in_the_order_they_are_checked(tmp_path):
    assert integrity.structure_problem(str(tmp_path / "nope")) == "its folder is missing"
    (tmp_path / "empty").mkdir()
    assert integrity.structure_problem(str(tmp_path / "empty")) == "its folder is empty"
    folder = _step(tmp_path)
    os.remove(os.path.join(folder, "state", "_METADATA"))
    assert integrity.structure_problem(folder) == "state/_METADATA is missing"
    with open(os.path.join(folder, "config", "metadata"), "w") as f:
        f.write("{not json")
    assert integrity.structure_problem(folder) == "config/metadata is not valid JSON"
    os.remove(os.path.join(folder, "config", "metadata"))
    assert integrity.structure_problem(folder) == "config/metadata is missing"


@pytest.mark.parametrize("n,total,text", [
    (10, 10, "100% of values are"), (11, 10, "100% of values are"), (1, 100, "1% of values are"),
    (37, 100, "37% of values are"), (1, 101, "1 of 101 values is"), (2, 9000, "2 of 9,000 values are"),
    (1500, 200_000, "1,500 of 200,000 values are"),
])
def test_share_wording(n, total, text):
    assert integrity._share(n, total) == text


def test_nonfinite_summary_counts_nan_and_inf_of_float_leaves_only():
    tree = {"a": {"x": jnp.asarray([np.nan, np.inf, -np.inf, 1.0]), "i": jnp.asarray([1, 2], jnp.int32)},
            "b": jnp.ones(3), "c": [jnp.zeros(2), jnp.asarray([np.nan, 0.0])]}
    assert integrity.nonfinite_summary(tree) == (
        "a: 25% of values are NaN and 50% of values are Inf (first in a/x); c: 25% of values are NaN (first in c/1)")
    assert integrity.nonfinite_summary({"i": jnp.arange(3)}) is None
    assert integrity.nonfinite_summary({"f": np.ones(2, np.float32)}) is None
    assert integrity.nonfinite_summary({"f": np.asarray([np.inf], np.float32)}) == "f: 100% of values are Inf (first in f)"


def test_agree_and_first_line_in_one_process():
    assert messages.agree("step 3: bad") == "step 3: bad" and messages.agree("") == ""
    assert messages.first_line(ValueError("first\nsecond")) == "ValueError: first"
    assert messages.first_line(KeyError()) == "KeyError: "
    assert messages.first_line(OSError("  padded  ")) == "OSError: padded"


def test_resolve_names_the_checkpoints_folder_and_step(tmp_path):
    work = tmp_path / "run"
    (work / "checkpoints" / "12").mkdir(parents=True)
    ckpts = str(work / "checkpoints")
    assert manager.checkpoint_dir(str(work)) == ckpts
    assert manager.resolve(str(work)) == (ckpts, None)
    assert manager.resolve(ckpts) == (ckpts, None)
    assert manager.resolve(ckpts + "/12/") == (ckpts, 12)
    assert manager.resolve(ckpts + "/12") == (ckpts, 12)
    with pytest.raises(CheckpointError, match="the path does not exist"):
        manager.resolve(str(tmp_path / "missing"))
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="expected a work dir"):
        manager.resolve(str(tmp_path / "other"))
    (tmp_path / "file12").write_text("")
    with pytest.raises(CheckpointError, match="expected a work dir"):
        manager.resolve(str(tmp_path / "file12"))


def test_hashing_in_threads_for_large_steps_gives_each_files_digest(tmp_path):
    """Steps of 64 MiB and more are hashed on a thread pool (sparse files: no real bytes written)."""
    paths = []
    for i, size in enumerate((33 << 20, 31 << 20, 1 << 20)):
        path = tmp_path / f"f{i}"
        with open(path, "wb") as f:
            f.write(bytes([i + 1]))
            f.truncate(size)
        paths.append(path.name)
    digests = integrity._hash_all(str(tmp_path), paths)
    assert digests == [integrity._sha256(str(tmp_path / p)) for p in paths]
    assert len(set(digests)) == 3


def test_a_step_unreadable_without_checksums_is_skipped_with_the_reason(tmp_path):
    """No manifest: a cut array file is found by reading it, and the warning gives orbax's error
    (its type and first line), not an empty reason."""
    import warnings

    import jax

    from jaxdiff import data
    from jaxdiff.checkpoint import Checkpointer, CheckpointWarning

    directory = str(tmp_path / "checkpoints")
    it = data.build("digits", batch_size=4, seed=0).iterator()
    ck = Checkpointer(directory, async_save=False, checksums=False)
    for s in (1, 2):
        ck.save(s, {"w": jnp.arange(4000.0) * s}, it, "{}")
    ck.close()
    state_dir = os.path.join(directory, "2", "state")
    files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
    ck = Checkpointer(directory, read_only=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        state, step = ck.restore({"w": jax.ShapeDtypeStruct((4000,), jnp.float32)})
    ck.close()
    assert step == 1 and float(state["w"][1]) == 1.0
    skipped = [str(w.message) for w in record if issubclass(w.category, CheckpointWarning) and "skipped" in str(w.message)]
    assert len(skipped) == 1 and ": 2 (" in skipped[0]
    reason = skipped[0].split(": 2 (", 1)[1]
    assert not reason.startswith("NoneType") and reason.split(":", 1)[0].isidentifier(), reason
