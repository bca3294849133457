"""Layout rules and safetensors I/O shared by all checkpoint mappings."""

import numpy as np
import pytest

from jaxdiff.convert import tensors as T


def test_conv_layout_round_trip_and_matches_flax_conv():
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from flax import linen as nn

    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)   # [O, I, kh, kw]
    b = rng.normal(size=(5,)).astype(np.float32)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)   # NCHW
    np.testing.assert_array_equal(T.conv_to_torch(T.conv_to_flax(w)), w)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                     padding=1).numpy()
    out = nn.Conv(5, (3, 3), padding=1).apply(
        {"params": {"kernel": T.conv_to_flax(w), "bias": b}}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)


def test_linear_layout_and_leaf_names():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)       # [O=2, I=3]
    x = np.ones(3, np.float32)
    assert np.allclose(x @ T.linear_to_flax(w), w @ x)
    np.testing.assert_array_equal(T.linear_to_torch(T.linear_to_flax(w)), w)
    np.testing.assert_array_equal(T.linear_to_flax(w[:, :, None, None]), w.T)
    assert T.weight_to_flax("weight", np.ones(4))[0] == "scale"
    assert T.weight_to_flax("weight", np.ones((2, 3)))[1].shape == (3, 2)
    assert T.weight_to_flax("weight", np.ones((2, 3, 1, 1)))[1].shape == (1, 1, 3, 2)
    assert T.weight_to_flax("bias", np.ones(4))[0] == "bias"
    with pytest.raises(T.CheckpointError, match="running_mean"):
        T.weight_to_flax("running_mean", np.ones(4))


def test_key_checks_name_missing_and_unexpected():
    with pytest.raises(T.CheckpointError, match=r"missing 1 key\(s\): a/b; unexpected 1 key\(s\): c"):
        T.check_same_keys({("c",)}, {("a", "b")}, what="unet")
    T.check_same_keys({("a",)}, {("a",)}, what="unet")
    with pytest.raises(T.CheckpointError, match=r"a has \(2,\), expected \(3,\)"):
        T.check_same_shapes({("a",): np.ones(2)}, {("a",): np.ones(3)}, what="unet")


def test_safetensors_round_trip_bf16(tmp_path):
    import ml_dtypes

    path = str(tmp_path / "w.safetensors")
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)}
    T.write_safetensors(tensors, path, metadata={"format": "pt"})
    back = T.read_safetensors(path)
    assert back["b"].dtype == ml_dtypes.bfloat16
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])


def test_pickles_refused_and_bad_files_named(tmp_path):
    for suffix in (".bin", ".ckpt", ".pt"):
        with pytest.raises(T.CheckpointError, match="never unpickles"):
            T.read_safetensors(str(tmp_path / f"model{suffix}"))
    with pytest.raises(T.CheckpointError, match="not found"):
        T.read_safetensors(str(tmp_path / "absent.safetensors"))
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(T.CheckpointError, match="not a readable safetensors"):
        T.read_safetensors(str(bad))
