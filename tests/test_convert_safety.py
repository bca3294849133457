"""Checkpoint files are written atomically (convert/tensors.py)."""

import json
import os

import pytest

from jaxdiff.convert import tensors


def test_json_and_safetensors_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    tensors.write_json({"b": 1, "a": [1, 2]}, str(path))
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", fail)  # a failing write leaves the old file, no temp file
    with pytest.raises(OSError, match="disk full"):
        tensors.write_json({"c": 3}, str(path))
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert os.listdir(tmp_path) == ["config.json"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
