"""Sampling on a mesh: the pixel model and the Stable Diffusion pipelines split the batch (and with
`rules="fsdp"` the parameters) over all devices, and give the images one device gives, whatever
the device count (2 processes: test_multiprocess.py); batches the mesh does not divide are padded
and cut back."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

import jaxdiff
from conftest import run_python, train_tiny_run
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
