"""Pickled checkpoints are refused, never opened: every loader and command, handed real pickles
whose unpickling would run code (`conftest.make_hostile_pickle`: torch's zip and legacy formats,
plain pickle), answers with one CheckpointError line, and the code never runs (its marker file
never appears).

The first test shows the files are live: loading them the usual way does run the code.
"""

import os
import pickle
import shutil
import warnings

import jax
import numpy as np
import pytest
from conftest import HOSTILE_PICKLE_FORMATS, make_hostile_pickle, write_clip_tokenizer

from jaxdiff import cli
from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import folder as folder_convert
from jaxdiff.convert import single_file, tensors
from jaxdiff.convert import unet as unet_convert
from jaxdiff.convert import vae as vae_convert
from jaxdiff.errors import CheckpointError
from jaxdiff.models.text import CLIPTextEncoder
from jaxdiff.models.unet import UNet
from jaxdiff.models.vae import AutoencoderKL

torch = pytest.importorskip("torch")

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"


class Markers:
    """Hostile files made in one test, each with its own marker path; `none_ran()` checks them all."""

    def __init__(self, root):
        self.root, self.made = root, []

    def make(self, path, fmt="torch"):
        marker = self.root / f"ran_{len(self.made)}"
        self.made.append(marker)
        return make_hostile_pickle(path, marker, fmt)

    def none_ran(self):
        ran = [str(m) for m in self.made if m.exists()]
        assert not ran, f"unpickled: {ran}"
        return True


@pytest.fixture
def markers(tmp_path):
    root = tmp_path / "markers"
    root.mkdir()
    return Markers(root)


def _refused(call, *patterns):
    """`call()` raises one CheckpointError line holding every pattern."""
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


def _random_params(module, *args, **kwargs):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


UNET = UNet(out_channels=4, in_channels=4, base_channels=16, channel_mult=(1,), num_res_blocks=1,
            attention_levels=(0,), num_heads=1, num_groups=8, context_dim=16)
VAE = AutoencoderKL(block_out_channels=(16,), layers_per_block=1, norm_num_groups=8)
TEXT = CLIPTextEncoder(vocab_size=514, max_position_embeddings=8, hidden_size=16, intermediate_size=24,
                       num_layers=1, num_heads=1)


@pytest.fixture(scope="module")
def clean_pipeline(tmp_path_factory):
    """A tiny, loadable Stable Diffusion folder (safetensors) written by save_pretrained."""
    tmp = tmp_path_factory.mktemp("clean")
    write_clip_tokenizer(tmp / "tok", max_length=8)
    components = {
        "unet": (UNET, _random_params(UNET, **UNET.example_inputs())),
        "vae": (VAE, _random_params(VAE, np.zeros((1, 8, 8, 3), np.float32))),
        "text_encoder": (TEXT, _random_params(TEXT, np.zeros((1, 8), np.int32))),
        "scheduler": {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000},
    }
    folder_convert.save_pretrained(tmp / "pipe", components, tokenizer_dir=tmp / "tok")
    folder_convert.load_pretrained(tmp / "pipe")  # loads as written
    return tmp / "pipe"


@pytest.fixture
def pipeline(clean_pipeline, tmp_path):
    out = tmp_path / "pipe"
    shutil.copytree(clean_pipeline, out)
    return out


def _pickle_only(folder, safetensors_name, pickle_name, markers, fmt="torch"):
    """Replace a part's safetensors weights by a hostile pickle named as diffusers / transformers
    name theirs."""
    os.remove(folder / safetensors_name)
    return markers.make(folder / pickle_name, fmt)


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", HOSTILE_PICKLE_FORMATS)
def test_the_hostile_files_do_run_code_when_unpickled(tmp_path, fmt):
    """Control: without the refusal these files would have run code (torch.load's default
    weights_only=True refuses them too; a loader passing weights_only=False would not)."""
    marker = tmp_path / "ran"
    path = make_hostile_pickle(tmp_path / "model.bin", marker, fmt)
    with pytest.raises(pickle.UnpicklingError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes the plain pickle's protocol 4
        torch.load(str(path), weights_only=True)
    assert not marker.exists()
    if fmt == "pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(str(path), weights_only=False)
    assert marker.read_text() == "unpickled"


@pytest.mark.parametrize("fmt", HOSTILE_PICKLE_FORMATS)
def test_model_folders_holding_only_pickles_are_refused(pipeline, markers, fmt):
    unet, vae, text = pipeline / "unet", pipeline / "vae", pipeline / "text_encoder"
    _pickle_only(unet, UNET_WEIGHTS, "diffusion_pytorch_model.bin", markers, fmt)
    _pickle_only(vae, UNET_WEIGHTS, "diffusion_pytorch_model.bin", markers, fmt)
    _pickle_only(text, TEXT_WEIGHTS, "pytorch_model.bin", markers, fmt)
    for load, folder, name in [(unet_convert.load, unet, "diffusion_pytorch_model.bin"),
                               (vae_convert.load, vae, "diffusion_pytorch_model.bin"),
                               (clip_convert.load, text, "pytorch_model.bin")]:
        _refused(lambda load=load, folder=folder: load(folder), str(folder / name), "is a pickle",
                 "never unpickles", "safetensors")
    # a variant's pickle (fp16 files) is refused the same way
    os.remove(unet / "diffusion_pytorch_model.bin")
    markers.make(unet / "diffusion_pytorch_model.fp16.bin", fmt)
    _refused(lambda: unet_convert.load(unet, variant="fp16"), "diffusion_pytorch_model.fp16.bin", "is a pickle")
    assert markers.none_ran()


@pytest.mark.parametrize("part, weights, pickled", [
    ("unet", UNET_WEIGHTS, "diffusion_pytorch_model.bin"),
    ("vae", UNET_WEIGHTS, "diffusion_pytorch_model.bin"),
    ("text_encoder", TEXT_WEIGHTS, "pytorch_model.bin"),
])
def test_a_pipeline_with_one_pickled_part_is_refused_by_every_front_door(pipeline, markers, tmp_path,
                                                                           capsys, part, weights, pickled):
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    _pickle_only(pipeline / part, weights, pickled, markers)
    where = str(pipeline / part / pickled)
    _refused(lambda: folder_convert.load_pretrained(pipeline), where, "is a pickle")
    _refused(lambda: StableDiffusion.from_pretrained(pipeline), where, "is a pickle")
    out = tmp_path / "x.png"
    code = cli.main(["generate", "--model", str(pipeline), "--prompt", "a cat", "--steps", "1",
                     "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("jaxdiff generate: error: " + where + " is a pickle"), err
    assert not out.exists()
    assert markers.none_ran()


def test_pickles_next_to_safetensors_are_left_unread(pipeline, markers):
    """A folder holding both reads the safetensors file and never opens the pickle."""
    for part, name in [("unet", "diffusion_pytorch_model.bin"), ("vae", "diffusion_pytorch_model.bin"),
                       ("text_encoder", "pytorch_model.bin")]:
        markers.make(pipeline / part / name)
    parts = folder_convert.load_pretrained(pipeline)
    assert parts["unet"][0].context_dim == 16
    assert markers.none_ran()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl", ".CKPT"])
@pytest.mark.parametrize("fmt", HOSTILE_PICKLE_FORMATS)
def test_single_file_pickles_are_refused(markers, tmp_path, capsys, suffix, fmt):
    path = str(markers.make(tmp_path / f"v1-5{suffix}", fmt))
    _refused(lambda: single_file.load_single_file(path), path, "is a pickle", "never unpickles")
    _refused(lambda: tensors.read_safetensors(path), path, "is a pickle")
    out = tmp_path / "converted"
    _refused(lambda: single_file.to_diffusers_folder(path, out), path, "is a pickle")
    code = cli.main(["convert", "--single_file", path, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"jaxdiff convert: error: {path} is a pickle"), err
    assert not out.exists()
    assert markers.none_ran()


def test_pickles_disguised_as_safetensors_are_not_unpickled(pipeline, markers, tmp_path):
    """The name decides nothing: a pickle under a safetensors name is read as safetensors, which
    it is not, and refused as unreadable."""
    disguised = str(markers.make(tmp_path / "v1-5.safetensors", "torch_legacy"))
    _refused(lambda: single_file.load_single_file(disguised), disguised, "not a readable safetensors file")
    weights = pipeline / "unet" / UNET_WEIGHTS
    os.remove(weights)
    markers.make(weights, "pickle")
    _refused(lambda: unet_convert.load(pipeline / "unet"), str(weights), "not a readable safetensors file")
    assert markers.none_ran()


@pytest.mark.parametrize("fmt", HOSTILE_PICKLE_FORMATS)
def test_run_loaders_and_generate_never_open_a_pickle(markers, tmp_path, capsys, fmt):
    """`jaxdiff.load` / `jaxdiff sample` / `jaxdiff export` read orbax run folders, `jaxdiff
    generate` diffusers folders: a pickle file, or a folder of them, is not one."""
    import jaxdiff
    from jaxdiff.pipelines.export import export_run

    run = tmp_path / "run"
    for name in ("model.ckpt", "model.pt", "ema.pkl", "pytorch_model.bin"):
        markers.make(run / name, fmt)
    for target in [run, run / "model.ckpt", run / "ema.pkl"]:
        _refused(lambda t=target: jaxdiff.load(str(t)), "no checkpoint at", str(target))
        _refused(lambda t=target: export_run(t, tmp_path / "exported"), "no checkpoint at", str(target))
        assert cli.main(["sample", "--checkpoint", str(target), "--no-progress",
                         "--out", str(tmp_path / "s.png")]) == 2
        assert cli.main(["generate", "--model", str(target), "--prompt", "a cat", "--no-progress",
                         "--out", str(tmp_path / "g.png")]) == 2
        assert cli.main(["export", str(target), "--out", str(tmp_path / "exported")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 9, lines
    for line in lines:
        assert line.startswith(("jaxdiff sample: error: no checkpoint at", "jaxdiff generate: error: ",
                                "jaxdiff export: error: no checkpoint at")), line
    assert not any((tmp_path / name).exists() for name in ("s.png", "g.png", "exported"))
    assert markers.none_ran()


@pytest.mark.parametrize("part, weights, pickled", [
    ("vae", UNET_WEIGHTS, "diffusion_pytorch_model.bin"),
    ("text_encoder", TEXT_WEIGHTS, "pytorch_model.bin"),
])
def test_a_latent_run_with_a_pickled_frozen_part_is_refused(clean_pipeline, markers, tmp_path, part, weights,
                                                            pickled):
    """A latent text run loads its frozen autoencoder and text encoder from folders in the work
    dir (or `vae.path`): a pickle there is refused before training starts."""
    from jaxdiff import config as config_lib
    from jaxdiff.train import frozen

    workdir = tmp_path / "run"
    for name in (frozen.VAE_DIR, frozen.TEXT_ENCODER_DIR, frozen.TOKENIZER_DIR):
        shutil.copytree(clean_pipeline / name, workdir / name)
    _pickle_only(workdir / part, weights, pickled, markers)
    cfg = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_text.py"))
    images = np.zeros((2, 8, 8, 3), np.float32)
    _refused(lambda: frozen.build_or_load(cfg, str(workdir), images, ["a"]), str(workdir / part / pickled),
             "is a pickle")
    cfg.vae.path = str(workdir / "vae")  # named in the config: the same
    _refused(lambda: frozen.build_or_load(cfg, str(workdir), images, ["a"]), str(workdir / part / pickled),
             "is a pickle")
    assert markers.none_ran()
