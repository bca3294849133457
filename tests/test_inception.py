"""The FID Inception-v3 against pytorch-fid's module with the same random weights (nothing is
downloaded: pytorch-fid's weight fetch is replaced by a no-op), the FID it gives, and the
converter's refusals."""

from unittest import mock

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxdiff.convert import inception as convert
from jaxdiff.errors import CheckpointError
from jaxdiff.metrics import distribution, features, stats
from jaxdiff.models.inception import InceptionV3, _resize_matrix

torch = pytest.importorskip("torch")


def _import_torchvision():
    """torchvision, or where its compiled ops cannot load against this torch build (a CUDA
    torchvision beside a CPU torch), its pure-Python part: pytorch-fid needs only the Inception
    modules of `torchvision.models`, never the compiled ops."""
    import importlib.metadata
    import importlib.util
    import sys
    import types

    try:
        import torchvision
        return
    except ImportError:
        pytest.skip("the pytorch-fid parity tests need pytorch-fid and torchvision, which are not in the test "
                    "extra (a CUDA torchvision beside the CPU torch breaks transformers' imports); see the "
                    "README's Evaluation section for the one-line private install that runs them")
    except (RuntimeError, OSError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    package.__version__ = importlib.metadata.version("torchvision")
    sys.modules["torchvision"] = package
    import torchvision.models.inception  # noqa: F401

    package.models = sys.modules["torchvision.models"]


pytorch_fid_inception = pytorch_fid_score = None


def _import_pytorch_fid():
    global pytorch_fid_inception, pytorch_fid_score
    _import_torchvision()
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    pytorch_fid_score = pytest.importorskip("pytorch_fid.fid_score")


def _randomise(module, seed):
    """Random conv / fc weights and batch-norm statistics (the default 0 / 1 would hide a
    mistake in the batch-norm mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith(("running_var", "bn.weight")):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("running_mean", "bias")):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:  # conv / fc weights, scaled to keep activations O(1)
                fan_in = int(np.prod(t.shape[1:]))
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)


@pytest.fixture(scope="module")
def reference():
    """(pytorch-fid's InceptionV3 returning pool3, its fc layer, the state dict) with random
    weights; fid_inception_v3's weight download and load are patched out."""
    _import_pytorch_fid()
    built = {}
    original = pytorch_fid_inception.fid_inception_v3

    def no_download():
        with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
                mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None):
            net = original()
        _randomise(net, seed=0)
        built["net"] = net
        return net

    with mock.patch.object(pytorch_fid_inception, "fid_inception_v3", no_download):
        model = pytorch_fid_inception.InceptionV3([3], use_fid_inception=True).eval()
    full = built["net"].eval()
    sd = {k: v.numpy() for k, v in full.state_dict().items()}
    return model, full.fc, sd


@pytest.fixture(scope="module")
def flax_params(reference):
    return convert.to_flax(reference[2])


def _torch_features(reference, images_unit_nhwc):
    model, fc, _ = reference
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_unit_nhwc.transpose(0, 3, 1, 2)))
        pool3 = model(x)[0][:, :, 0, 0]
        return pool3.numpy(), fc(pool3).numpy()


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_resize_matrix_matches_torch_bilinear():
    for n_in, n_out in ((16, 299), (400, 299), (299, 299), (7, 3)):
        x = torch.randn(1, 1, n_in, 1, dtype=torch.float64)
        want = torch.nn.functional.interpolate(x, size=(n_out, 1), mode="bilinear", align_corners=False)
        got = _resize_matrix(n_in, n_out).astype(np.float64) @ x[0, 0, :, 0].numpy()
        np.testing.assert_allclose(got, want[0, 0, :, 0].numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def weights_path(reference, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in reference[2].items()}, path)
    return path


# 64x67: the upsampling resize (default run); 299x299: no resize; 320x323: downsampling
@pytest.mark.parametrize("shape", [(64, 67), pytest.param((299, 299), marks=pytest.mark.slow),
                                   pytest.param((320, 323), marks=pytest.mark.slow)])
def test_pool3_and_logits_match_pytorch_fid(reference, weights_path, shape):
    rng = np.random.default_rng(shape[1])
    images = rng.random((2, *shape, 3), dtype=np.float32)                  # [0, 1]
    want_pool, want_logits = _torch_features(reference, images)
    pool3, logits = features.inception_outputs(images * 2 - 1, weights_path, batch_size=2)
    print(f"{shape}: pool3 rel {_rel(pool3, want_pool):.2e}, logits rel {_rel(logits, want_logits):.2e}")
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
    assert _rel(pool3, want_pool) < 1e-4
    assert _rel(logits, want_logits) < 1e-4
    # the two images differ, so the agreement is not about a constant output
    assert _rel(want_pool[0], want_pool[1]) > 1e-2


def test_module_matches_pytorch_fid_without_resize(reference, flax_params):
    """The module itself, resize off, on the 75x75 minimum input (cheap: 16x fewer pixels)."""
    images = np.random.default_rng(2).random((2, 75, 75, 3), dtype=np.float32)
    model = reference[0]
    model.resize_input = False
    try:
        want_pool, want_logits = _torch_features(reference, images)
    finally:
        model.resize_input = True
    pool3, logits = jax.jit(InceptionV3(resize=False).apply)({"params": flax_params}, images)
    print(f"75x75 no resize: pool3 rel {_rel(np.asarray(pool3), want_pool):.2e}")
    assert _rel(np.asarray(pool3), want_pool) < 1e-4
    assert _rel(np.asarray(logits), want_logits) < 1e-4


def test_converter_round_trip_is_exact(reference, flax_params):
    sd = reference[2]
    back = convert.to_torch(flax_params)
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
    assert all(np.array_equal(back[k], sd[k]) for k in back)


# The Frechet distance of 2048-d features takes a 2048x2048 matrix square root on each side
# (~1 min each on a 2-core machine): the default run compares the first 64 pool3 features, the
# slow run all of them.
@pytest.mark.parametrize("dim", [64, pytest.param(2048, marks=pytest.mark.slow)])
def test_fid_matches_pytorch_fid(reference, weights_path, dim):
    rng = np.random.default_rng(1)
    a = rng.random((6, 64, 67, 3), dtype=np.float32)
    b = np.clip(a[::-1] * 0.7 + 0.2 * rng.random(a.shape, dtype=np.float32), 0, 1)
    fa, fb = _torch_features(reference, a)[0][:, :dim], _torch_features(reference, b)[0][:, :dim]
    want = pytorch_fid_score.calculate_frechet_distance(
        fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    ga = features.inception_features(a * 2 - 1, weights_path, batch_size=2)[:, :dim]   # model space
    gb = features.inception_features(b * 2 - 1, weights_path, batch_size=2)[:, :dim]
    got = distribution.fid(stats.from_features(ga), stats.from_features(gb))
    print(f"FID {dim}-d: jaxdiff {got:.6f}, pytorch-fid {want:.6f}")
    assert want > 1e-3
    assert abs(got - want) / want < 1e-3, (got, want)


def test_converter_refusals(reference, tmp_path):
    sd = {k: np.ascontiguousarray(v) for k, v in reference[2].items()}
    good = tmp_path / "w.safetensors"
    save_file(sd, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors is not a readable safetensors") as e:
        convert.load_inception(str(truncated))
    assert "\n" not in str(e.value)

    wrong = dict(sd)
    del wrong["Mixed_6b.branch7x7_2.conv.weight"]
    wrong["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    bad = tmp_path / "keys.safetensors"
    save_file(wrong, str(bad))
    with pytest.raises(CheckpointError) as e:
        convert.load_inception(str(bad))
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing 1 key(s): Mixed_6b.branch7x7_2.conv.weight" in msg
    assert "unexpected 1 key(s): AuxLogits.fc.weight" in msg

    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    pth.write_bytes(b"not opened")
    with mock.patch("builtins.open", side_effect=AssertionError("opened")), \
            pytest.raises(CheckpointError, match="is a pickle; jaxdiff never unpickles"):
        convert.load_inception(str(pth))


def test_fid_pooling_quirks_change_the_features(reference, flax_params):
    """The parity above is not trivial: with PyTorch's default average pool (padded zeros
    counted), as torchvision's Inception uses, the same weights give other features."""
    from jaxdiff.models import inception

    images = np.random.default_rng(2).random((2, 75, 75, 3), dtype=np.float32)
    apply = InceptionV3(resize=False).apply
    fid_pool = np.asarray(apply({"params": flax_params}, images)[0])

    def zeros_counted(x):
        return inception.nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=True)

    with mock.patch.object(inception, "avg_pool_valid_only", zeros_counted):
        other = np.asarray(apply({"params": flax_params}, images)[0])
    assert _rel(other, fid_pool) > 1e-3
