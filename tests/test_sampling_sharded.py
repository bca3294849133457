"""Sampling on a mesh: the pixel model and the Stable Diffusion pipelines split the batch (and with
`rules="fsdp"` the parameters) over all devices, and give the images one device gives, whatever
the device or process count; batches the mesh does not divide are padded and cut back."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import jaxdiff
from conftest import run_python, train_tiny_run
from jaxdiff import images as images_lib
from jaxdiff import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 5 and 3 images on 8 devices: both runs are padded. A: guided DDIM; B: stochastic DDPM through
# the null class (its in-loop noise must not depend on the layout either).
CASES = {
    "guided_ddim": dict(num=5, sampler="ddim", num_steps=3, seed=1, labels=[0, 1, 2, 3, 4], guidance_scale=2.0),
    "ddpm": dict(num=3, sampler="ddpm", num_steps=3, seed=2),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A work dir holding a 2-step tiny class-conditional pixel model."""
    return pathlib.Path(train_tiny_run(tmp_path_factory.mktemp("run"), batch_size=8, steps=2,
                                       devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def one_device(checkpoint):
    """Each case's float images on a single device."""
    model = jaxdiff.load(str(checkpoint), mesh=sharding.make_mesh(jax.devices()[:1]))
    return {name: model.sample(**kw, output_type="latent") for name, kw in CASES.items()}


_PIXEL_8 = """
import json, jax, numpy as np
import jaxdiff
from jaxdiff import sampling
assert len(jax.devices()) == 8
CASES = {cases}
seen = []
original = sampling.sample
def spy(plan, model_fn, noise, key, **kw):
    seen.append(model_fn)
    return original(plan, model_fn, noise, key, **kw)
sampling.sample = spy
report = {{}}
for rules in ("dp", "fsdp"):
    model = jaxdiff.load("{work}", rules=rules)
    out = {{name: model.sample(**kw, output_type="latent") for name, kw in CASES.items()}}
    np.savez("{tmp}/pixel_" + rules + ".npz", **out)
    # The parameters the jitted loop was handed are the model's, laid out by the rules.
    params = jax.tree.leaves(model.ema_params)
    handed = jax.tree.leaves(seen[-1])
    assert all(any(p is h for h in handed) for p in params)
    dev0 = jax.devices()[0]
    on_dev0 = sum(s.data.nbytes for p in params for s in p.addressable_shards if s.device == dev0)
    split = [p for p in params if "fsdp" in p.sharding.spec]
    # A second call with a new seed, labels and guidance scale reuses the compiled loop.
    compiled = sampling._run._cache_size()
    model.sample(**dict(CASES["guided_ddim"], seed=7, labels=[5, 6, 7, 8, 9], guidance_scale=3.0))
    report[rules] = dict(bytes_on_device0=on_dev0 / sum(p.nbytes for p in params),
                         split_leaves=len(split), leaves=len(params),
                         largest_shard=list(max(split, key=lambda p: p.size).addressable_shards[0].data.shape)
                         if split else None,
                         largest=list(max(split, key=lambda p: p.size).shape) if split else None,
                         recompiled=sampling._run._cache_size() - compiled)
print(json.dumps(report))
"""


def test_pixel_sampling_on_8_devices_matches_1_device(checkpoint, one_device, tmp_path):
    proc = run_python(_PIXEL_8.format(cases=CASES, work=checkpoint, tmp=tmp_path), devices=8, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    for rules in ("dp", "fsdp"):
        got = np.load(tmp_path / f"pixel_{rules}.npz")
        for name, want in one_device.items():
            assert got[name].shape == want.shape == (CASES[name]["num"], 16, 16, 1)
            err = float(np.abs(got[name] - want).max())
            print(rules, name, err)
            assert err < 1e-5, (rules, name, err)
        assert report[rules]["recompiled"] == 0, report
    assert one_device["guided_ddim"].std() > 0.1          # images, not a constant
    assert not np.allclose(one_device["guided_ddim"][0], one_device["guided_ddim"][1])
    dp, fsdp = report["dp"], report["fsdp"]
    assert dp["bytes_on_device0"] == 1.0 and dp["split_leaves"] == 0
    # ZeRO-3 layout: almost all bytes split 8 ways (only norms / small biases replicated).
    assert fsdp["bytes_on_device0"] < 0.2 and fsdp["split_leaves"] > 20, fsdp
    assert np.prod(fsdp["largest"]) == 8 * np.prod(fsdp["largest_shard"]), fsdp


# ---------------------------------------------------------------------------------------------
# Stable Diffusion (the tiny random diffusers folder of test_pipeline_sd)

try:  # building that folder needs the PyTorch reference: without it only these tests skip
    from test_pipeline_sd import PROMPT, SIZE, _picture, tiny  # tiny: a fixture
except (ImportError, pytest.skip.Exception):
    PROMPT = SIZE = _picture = None

    @pytest.fixture(scope="module")
    def tiny():
        pytest.skip("the PyTorch reference (torch, diffusers, transformers) is not installed")

_SD_CALLS = """
def calls(pipe):
    return dict(
        text=pipe(PROMPT, num_images=3, num_steps=2, guidance_scale=7.5, seed=1, output_type="np"),
        img2img=pipe.img2img(PICTURE, PROMPT, strength=0.5, num_images=3, num_steps=2, guidance_scale=7.5,
                             seed=2, sampler="ddim", eta=1.0, output_type="np"))
"""

_SD_8 = """
import jax, numpy as np
from PIL import Image
from jaxdiff import sampling
from jaxdiff.pipelines.stable_diffusion import StableDiffusion
assert len(jax.devices()) == 8
PROMPT = {prompt!r}
PICTURE = Image.open("{tmp}/picture.png")
""" + _SD_CALLS + """
for rules in ("dp", "fsdp"):
    pipe = StableDiffusion.from_pretrained("{folder}", rules=rules)
    assert pipe.mesh.devices.size == 8
    params = jax.tree.leaves(pipe.params)
    frac = sum(p.addressable_shards[0].data.nbytes for p in params) / sum(p.nbytes for p in params)
    # text-to-image and img2img (both DDIM) share one compiled loop, and calling again adds none
    before = sampling._run._cache_size()
    out = calls(pipe)
    first = sampling._run._cache_size() - before
    calls(pipe)
    np.savez("{tmp}/sd_" + rules + ".npz", frac=frac, compiles=first,
             again=sampling._run._cache_size() - before - first, **out)
"""


def test_stable_diffusion_on_8_devices_matches_1_device(tiny, tmp_path):
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    folder, _ = tiny
    _picture().save(tmp_path / "picture.png")
    proc = run_python(_SD_8.format(prompt=PROMPT, tmp=tmp_path, folder=folder), devices=8, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]

    pipe = StableDiffusion.from_pretrained(folder, mesh=sharding.make_mesh(jax.devices()[:1]))
    scope = {"PROMPT": PROMPT, "PICTURE": Image.open(tmp_path / "picture.png")}
    exec(_SD_CALLS, scope)
    want = scope["calls"](pipe)
    for rules in ("dp", "fsdp"):
        got = np.load(tmp_path / f"sd_{rules}.npz")
        for name, w in want.items():
            assert got[name].shape == w.shape == (3, SIZE, SIZE, 3)
            err = float(np.abs(got[name] - w).max())
            print(rules, name, err)
            assert err < 1e-5, (rules, name, err)
        assert int(got["compiles"]) == 1 and int(got["again"]) == 0, (rules, got["compiles"], got["again"])
        frac = float(got["frac"])
        assert frac == 1.0 if rules == "dp" else frac < 0.3, (rules, frac)
    assert want["text"].std() > 0.05 and not np.allclose(want["text"][0], want["text"][1])


# ---------------------------------------------------------------------------------------------
# Two real processes x 4 CPU devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(args, tmp_path):
    """Run `jaxdiff ARGS` as 2 processes x 4 CPU devices; both succeed, only process 0 writes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env.pop("JAXDIFF_DEBUG", None)
    procs = [subprocess.Popen([sys.executable, "-m", "jaxdiff.cli", *args, "--process_id", str(i),
                               "--out", str(tmp_path / f"out{i}.png")], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "batch over 8 devices" in outs[0][0], outs[0][0]
    assert not (tmp_path / "out1.png").exists() and "wrote" not in outs[1][0]


@pytest.mark.slow
def test_two_processes_write_the_images_of_one(checkpoint, tmp_path):
    kw = CASES["guided_ddim"]
    args = ["sample", "--checkpoint", str(checkpoint), "--num", str(kw["num"]), "--steps", str(kw["num_steps"]),
            "--seed", str(kw["seed"]), "--labels", ",".join(map(str, kw["labels"])),
            "--guidance_scale", str(kw["guidance_scale"]), "--rules", "fsdp",
            "--coordinator_address", f"127.0.0.1:{_free_port()}", "--num_processes", "2"]
    _two_processes(args, tmp_path)

    model = jaxdiff.load(str(checkpoint), mesh=sharding.make_mesh(jax.devices()[:1]))
    want = model.sample(**kw)
    images_lib.save_grid(want, str(tmp_path / "want.png"))
    got = np.asarray(Image.open(tmp_path / "out0.png")).astype(int)
    ref = np.asarray(Image.open(tmp_path / "want.png")).astype(int)
    assert got.shape == ref.shape
    diff = np.abs(got - ref)
    print("max uint8 difference", diff.max(), "pixels differing", int((diff > 0).sum()))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.slow
def test_two_processes_generate_the_images_of_one(tiny, tmp_path):
    from jaxdiff.images import to_uint8
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    folder, _ = tiny
    args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--steps", "2", "--num", "3", "--seed", "4",
            "--guidance_scale", "7.5", "--rules", "fsdp", "--no-progress",
            "--coordinator_address", f"127.0.0.1:{_free_port()}", "--num_processes", "2"]
    _two_processes(args, tmp_path)

    pipe = StableDiffusion.from_pretrained(folder, mesh=sharding.make_mesh(jax.devices()[:1]))
    want = to_uint8(pipe(PROMPT, num_steps=2, num_images=3, seed=4, guidance_scale=7.5, output_type="np"))
    grid = np.asarray(Image.open(tmp_path / "out0.png")).astype(int)
    ref = images_lib.make_grid(want).astype(int)
    assert grid.shape == ref.shape
    diff = np.abs(grid - ref)
    print("max uint8 difference", diff.max(), "pixels differing", int((diff > 0).sum()))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


# ---------------------------------------------------------------------------------------------
# The pieces


def test_padding_repeats_the_last_row_and_is_cut_back():
    mesh = sharding.make_mesh(jax.devices()[:1])
    assert sharding.padded_batch(5, mesh) == 5
    x = sharding.put_batch(np.arange(3), mesh, 5)
    np.testing.assert_array_equal(np.asarray(x), [0, 1, 2, 2, 2])
    assert x.sharding == sharding.batch_sharding(mesh)
    fake = type("FakeMesh", (), {"shape": {"data": 2, "fsdp": 4, "tensor": 1}})()
    assert [sharding.padded_batch(n, fake) for n in (1, 8, 9)] == [8, 8, 16]


def test_unknown_rules_is_one_clear_error(checkpoint):
    with pytest.raises(sharding.ShardingError, match="unknown sharding rules 'zero'.*fsdp"):
        jaxdiff.load(str(checkpoint), rules="zero")
