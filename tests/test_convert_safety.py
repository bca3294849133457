"""Hostile model folders: every file a converter opens stays inside its folder, and every malformed
file (index, config, safetensors, tokenizer files) is one CheckpointError line naming it.

The folders are real ones written by the converters' own `save` (a tiny U-Net, a tiny pipeline),
then tampered with.
"""

import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest

from jaxdiff import cli
from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import folder as folder_convert
from jaxdiff.convert import tensors
from jaxdiff.convert import unet as unet_convert
from jaxdiff.convert import vae as vae_convert
from jaxdiff.errors import CheckpointError
from jaxdiff.models.text import CLIPTextEncoder
from jaxdiff.models.tokenizer import CLIPTokenizer
from jaxdiff.models.unet import UNet
from jaxdiff.models.vae import AutoencoderKL
from conftest import write_clip_tokenizer

WEIGHTS = unet_convert.WEIGHTS_NAME
INDEX = WEIGHTS + ".index.json"


def _random_params(module, *args, **kwargs):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


UNET = UNet(out_channels=4, in_channels=4, base_channels=16, channel_mult=(1,), num_res_blocks=1,
            attention_levels=(0,), num_heads=1, num_groups=8, context_dim=16)


@pytest.fixture(scope="module")
def unet_params():
    return _random_params(UNET, **UNET.example_inputs())


@pytest.fixture
def unet_dir(tmp_path, unet_params):
    """A real diffusers U-Net folder (config.json + weights) inside `tmp_path/model`."""
    folder = tmp_path / "model"
    unet_convert.save(folder, UNET, unet_params)
    return folder


def _one_line_error(call, *patterns):
    """Run `call`, expect a CheckpointError whose message is one line matching every pattern."""
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


def _shard(folder, weight_map_to):
    """Replace the single weights file by an index whose weight_map sends every key to
    `weight_map_to` (a name as the index writes it)."""
    state = tensors.read_safetensors(str(folder / WEIGHTS))
    os.remove(folder / WEIGHTS)
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {
        k: weight_map_to for k in state}}))
    return state


# ------------------------------------------------------------------------------------------
# the folder cannot reach outside itself


def test_sharded_index_is_read_when_its_shards_are_inside(unet_dir, unet_params):
    state = _shard(unet_dir, "part-1.safetensors")
    tensors.write_safetensors(state, str(unet_dir / "part-1.safetensors"))
    _, got = unet_convert.load(unet_dir)
    jax.tree.map(np.testing.assert_array_equal, got, unet_params)


@pytest.mark.parametrize("where", ["parent", "absolute", "dotdot_inside_name"])
def test_index_naming_a_file_outside_is_refused(unet_dir, tmp_path, where):
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    name = {"parent": "../elsewhere/x.safetensors", "absolute": str(outside),
            "dotdot_inside_name": "sub/../../elsewhere/x.safetensors"}[where]
    state = _shard(unet_dir, name)
    tensors.write_safetensors(state, str(outside))  # a readable file: only the rule refuses it
    _one_line_error(lambda: unet_convert.load(unet_dir), repr(name), str(unet_dir), "refusing")


def test_symlinks_out_of_the_folder_are_refused(unet_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in (WEIGHTS, "config.json"):  # each file in turn links out
        folder = tmp_path / f"linked_{name}"
        shutil.copytree(unet_dir, folder)
        shutil.move(folder / name, outside / name)
        os.symlink(outside / name, folder / name)
        _one_line_error(lambda f=folder: unet_convert.load(f), str(folder / name),
                        str(outside / name), "outside the model folder")
        os.remove(outside / name)


def test_symlinked_shard_out_of_the_folder_is_refused(unet_dir, tmp_path):
    state = _shard(unet_dir, "part-1.safetensors")
    tensors.write_safetensors(state, str(tmp_path / "part-1.safetensors"))
    os.symlink(tmp_path / "part-1.safetensors", unet_dir / "part-1.safetensors")
    _one_line_error(lambda: unet_convert.load(unet_dir), INDEX, "'part-1.safetensors'",
                    str(unet_dir), "refusing")


def test_symlinks_inside_the_folder_are_fine(unet_dir, unet_params):
    os.rename(unet_dir / WEIGHTS, unet_dir / "real.safetensors")
    os.symlink("real.safetensors", unet_dir / WEIGHTS)  # relative, inside
    (unet_dir / "sub").mkdir()
    os.rename(unet_dir / "config.json", unet_dir / "sub" / "config.json")
    os.symlink(unet_dir / "sub" / "config.json", unet_dir / "config.json")  # absolute, inside
    _, got = unet_convert.load(unet_dir)
    jax.tree.map(np.testing.assert_array_equal, got, unet_params)


def _hub_snapshot(root, unet_dir, repo_name):
    """The hub-cache layout: <repo>/snapshots/<rev>/unet/<file> -> ../../../blobs/<hash>."""
    repo = root / repo_name
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd" / "unet"
    snap.mkdir(parents=True)
    for i, name in enumerate((WEIGHTS, "config.json")):
        shutil.copy(unet_dir / name, repo / "blobs" / f"blob{i}")
        os.symlink(os.path.join("..", "..", "..", "blobs", f"blob{i}"), snap / name)
    return snap


def test_hub_cache_snapshot_links_into_its_blobs_load(unet_dir, unet_params, tmp_path):
    snap = _hub_snapshot(tmp_path, unet_dir, "models--org--tiny")
    _, got = unet_convert.load(snap)
    jax.tree.map(np.testing.assert_array_equal, got, unet_params)
    # the same links from a folder that is not a hub-cache repository are refused
    other = _hub_snapshot(tmp_path / "plain", unet_dir, "org-tiny")
    _one_line_error(lambda: unet_convert.load(other), "outside the model folder")


# ------------------------------------------------------------------------------------------
# malformed files: one line naming the file


@pytest.mark.parametrize("text, says", [
    ("{not json", "not readable JSON"),
    ('{"weight_map": {"a": "b.safetensors"', "not readable JSON"),  # truncated
    ("[1, 2]", "holds a JSON list"),
    ('"weights"', "holds a JSON str"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": ["a.safetensors"]}', "weight_map"),
    ('{"weight_map": {"conv_in.weight": 3}}', "weight_map"),
    ('{"weight_map": {"conv_in.weight": ""}}', "refusing"),
    ("[" * 100_000, "not readable JSON"),  # nesting deep enough to exhaust the parser
])
def test_malformed_index_is_one_line(unet_dir, text, says):
    _shard(unet_dir, "unused.safetensors")
    (unet_dir / INDEX).write_text(text)
    _one_line_error(lambda: unet_convert.load(unet_dir), INDEX, says)


@pytest.mark.parametrize("text, says", [
    ("[1, 2, 3]", "holds a JSON list"),
    ('"UNet2DConditionModel"', "holds a JSON str"),
    ("null", "holds a JSON NoneType"),
    ('{"_class_name": "UNet2DConditionModel", "block_out_', "not readable JSON"),  # truncated
    ("", "not readable JSON"),
    (b"\xff\xfe{\x00}", "not readable JSON"),  # not UTF-8
    ('{"_class_name": "UNet2DConditionModel", "block_out_channels": "wide"}', "wrong type"),
    ('{"_class_name": "UNet2DConditionModel", "layers_per_block": [1, 2]}', "layers_per_block"),
])
def test_malformed_config_is_one_line(unet_dir, text, says):
    path = unet_dir / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    _one_line_error(lambda: unet_convert.load(unet_dir), str(path), says)


def test_malformed_configs_of_vae_and_text_encoder_are_one_line(tmp_path):
    for load in (vae_convert.load, clip_convert.load):
        folder = tmp_path / load.__module__
        folder.mkdir()
        (folder / "config.json").write_text('["not", "a", "config"]')
        _one_line_error(lambda f=folder, load=load: load(f), str(folder / "config.json"),
                        "holds a JSON list")


def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _with_header(path, header, data):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def _lie_offsets(header):
    key = next(k for k in header if k != "__metadata__")
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start, end + 10**6]  # past the end of the file


def _lie_shape(header):
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [s * 2 for s in header[key]["shape"]]  # more data than it holds


def _lie_dtype(header):
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = "F8_E4M3"  # a dtype numpy has no name for (one byte, not four)
    header[key]["shape"][0] *= 4


def _lie_overlap(header):
    keys = [k for k in header if k != "__metadata__"]
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]


@pytest.mark.parametrize("tamper, says", [
    ("truncated", "not a readable safetensors file"),
    ("header_only", "not a readable safetensors file"),
    ("empty", "not a readable safetensors file"),
    ("huge_header_length", "not a readable safetensors file"),
    (_lie_offsets, "not a readable safetensors file"),
    (_lie_shape, "not a readable safetensors file"),
    (_lie_overlap, "not a readable safetensors file"),
    (_lie_dtype, "dtype"),
])
def test_truncated_or_lying_safetensors_is_one_line(unet_dir, tamper, says):
    path = unet_dir / WEIGHTS
    raw = path.read_bytes()
    if tamper == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif tamper == "header_only":
        path.write_bytes(raw[:8 + struct.unpack("<Q", raw[:8])[0]])
    elif tamper == "empty":
        path.write_bytes(b"")
    elif tamper == "huge_header_length":
        path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    else:
        header, data = _header(path)
        tamper(header)
        _with_header(path, header, data)
    _one_line_error(lambda: unet_convert.load(unet_dir), str(path), says)


# ------------------------------------------------------------------------------------------
# tokenizer files and whole pipeline folders


def _tokenizer_dir(root):
    """A minimal CLIP tokenizer folder: byte vocabulary, no merges, BOS and EOS."""
    write_clip_tokenizer(root / "tokenizer_src", max_length=8)
    return root / "tokenizer_src"


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json",
                                  "special_tokens_map.json", "tokenizer.json"])
def test_tokenizer_files_linking_out_are_refused(tmp_path, name):
    tok = _tokenizer_dir(tmp_path)
    CLIPTokenizer.from_dir(tok)  # reads as it is
    outside = tmp_path / "outside"
    outside.mkdir()
    if (tok / name).exists():
        shutil.move(tok / name, outside / name)
    else:
        (outside / name).write_text("{}")
    os.symlink(outside / name, tok / name)
    _one_line_error(lambda: CLIPTokenizer.from_dir(tok), str(tok / name), str(outside / name),
                    "outside the tokenizer folder")


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
@pytest.mark.parametrize("text, says", [("[1]", "holds a JSON list"), ('"x"', "holds a JSON str"),
                                        ('{"pad_token": ', "not readable JSON")])
def test_tokenizer_json_of_the_wrong_type_is_one_line(tmp_path, name, text, says):
    tok = _tokenizer_dir(tmp_path)
    (tok / name).write_text(text)
    _one_line_error(lambda: CLIPTokenizer.from_dir(tok), str(tok / name), says)


def test_tokenizer_symlink_inside_is_fine(tmp_path):
    tok = _tokenizer_dir(tmp_path)
    want = CLIPTokenizer.from_dir(tok)("a cat")
    os.rename(tok / "vocab.json", tok / "vocab.real.json")
    os.symlink("vocab.real.json", tok / "vocab.json")
    np.testing.assert_array_equal(CLIPTokenizer.from_dir(tok)("a cat"), want)


@pytest.fixture
def pipeline_dir(tmp_path, unet_params):
    """A tiny Stable Diffusion pipeline folder written by save_pretrained."""
    vae = AutoencoderKL(block_out_channels=(16,), layers_per_block=1, norm_num_groups=8)
    text = CLIPTextEncoder(vocab_size=514, max_position_embeddings=8, hidden_size=16,
                           intermediate_size=24, num_layers=1, num_heads=1)
    components = {
        "unet": (UNET, unet_params),
        "vae": (vae, _random_params(vae, np.zeros((1, 8, 8, 3), np.float32))),
        "text_encoder": (text, _random_params(text, np.zeros((1, 8), np.int32))),
        "scheduler": {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000},
    }
    tok = _tokenizer_dir(tmp_path)
    (tmp_path / "secret.txt").write_text("not for the pipeline")
    os.symlink(tmp_path / "secret.txt", tok / "notes.txt")  # not a tokenizer file: never copied
    out = tmp_path / "pipe"
    assert folder_convert.save_pretrained(out, components, tokenizer_dir=tok) == []
    assert sorted(os.listdir(out / "tokenizer")) == ["merges.txt", "special_tokens_map.json",
                                                     "tokenizer_config.json", "vocab.json"]
    return out


def test_pipeline_folder_loads_and_its_parts_cannot_link_out(pipeline_dir, tmp_path):
    parts = folder_convert.load_pretrained(pipeline_dir)
    assert parts["unet"][0].context_dim == parts["text_encoder"][0].hidden_size == 16
    moved = tmp_path / "elsewhere_vae"
    shutil.move(pipeline_dir / "vae", moved)
    os.symlink(moved, pipeline_dir / "vae")
    _one_line_error(lambda: folder_convert.load_pretrained(pipeline_dir), "vae",
                    str(pipeline_dir), "outside the model folder")


@pytest.mark.parametrize("name", ["model_index.json", os.path.join("scheduler",
                                                                   "scheduler_config.json")])
def test_pipeline_json_of_the_wrong_type_is_one_line(pipeline_dir, name):
    (pipeline_dir / name).write_text("[]")
    _one_line_error(lambda: folder_convert.load_pretrained(pipeline_dir),
                    str(pipeline_dir / name), "holds a JSON list")


def test_cli_reports_a_hostile_folder_in_one_line(pipeline_dir, tmp_path, capsys):
    unet_dir = pipeline_dir / "unet"
    state = _shard(unet_dir, "../../outside.safetensors")
    tensors.write_safetensors(state, str(tmp_path / "outside.safetensors"))
    code = cli.main(["generate", "--model", str(pipeline_dir), "--prompt", "a cat",
                     "--no-progress", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("jaxdiff generate: error:"), err
    assert "'../../outside.safetensors'" in err[0] and "refusing" in err[0]
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------
# writing


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
