"""The name-table skeleton (convert/names.py) and safetensors I/O (convert/tensors.py) shared by
all checkpoint mappings."""

import numpy as np
import pytest

from jaxdiff.convert import names as N
from jaxdiff.convert import tensors as T
from jaxdiff.errors import CheckpointError


def test_conv_layout_round_trip_and_matches_flax_conv():
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from flax import linen as nn

    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)   # [O, I, kh, kw]
    b = rng.normal(size=(5,)).astype(np.float32)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)   # NCHW
    np.testing.assert_array_equal(N.conv_to_torch(N.conv_to_flax(w)), w)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                     padding=1).numpy()
    out = nn.Conv(5, (3, 3), padding=1).apply(
        {"params": {"kernel": N.conv_to_flax(w), "bias": b}}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)


def test_linear_layout():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)       # [O=2, I=3]
    x = np.ones(3, np.float32)
    assert np.allclose(x @ N.linear_to_flax(w), w @ x)
    np.testing.assert_array_equal(N.linear_to_torch(N.linear_to_flax(w)), w)
    np.testing.assert_array_equal(N.linear_to_flax(w[:, :, None, None]), w.T)


def _tree():
    """A toy flax tree: a conv, a dense, a norm, an embedding, as `eval_shape` would give."""
    shape = lambda *s: np.broadcast_to(np.float32(0), s)  # noqa: E731
    return {"conv": {"kernel": shape(3, 3, 2, 4), "bias": shape(4)},
            "block_0": {"dense": {"kernel": shape(4, 6), "bias": shape(6)},
                        "norm": {"scale": shape(6), "bias": shape(6)}},
            "embed": {"embedding": shape(5, 6)}}


RULES = N.Rules([("conv", "conv_in"), (r"block_(\d+)/dense", r"blocks.\1.proj"),
                 (r"block_(\d+)/norm", lambda i: f"blocks.{int(i) + 1}.ln"),
                 ("embed", "tok")])


def test_rules_and_the_leaf_rule_build_the_table():
    assert RULES("block_0/norm") == "blocks.1.ln"
    with pytest.raises(KeyError):
        RULES("block_0/other")
    table = {e.flax: e for e in N.from_tree(_tree(), RULES)}
    assert (table[("conv", "kernel")].torch, table[("conv", "kernel")].layout) == (
        "conv_in.weight", N.CONV)
    assert table[("block_0", "dense", "kernel")].layout is N.LINEAR
    assert table[("block_0", "norm", "scale")][1:4] == ("blocks.1.ln.weight", (6,), N.SAME)
    assert table[("embed", "embedding")].torch == "tok.weight"
    assert N.torch_shapes(tuple(table.values()))["conv_in.weight"] == (4, 2, 3, 3)
    with pytest.raises(CheckpointError, match="no torch name for parameter extra/kernel"):
        N.from_tree({**_tree(), "extra": {"kernel": np.zeros((2, 2))}}, RULES)


def _random_state(table, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in N.torch_shapes(table).items()}


def test_to_flax_and_to_torch_are_inverse_with_fused_and_special_layouts():
    # as OpenCLIP fuses q/k/v: the dense and norm biases (both [6]) as parts of one tensor [12]
    special = {("block_0", "dense", "bias"): dict(torch="blocks.0.fused_bias", part=(0, 2)),
               ("block_0", "norm", "bias"): dict(torch="blocks.0.fused_bias", part=(1, 2)),
               ("embed", "embedding"): dict(layout=N.NULL_ROW),
               ("block_0", "dense", "kernel"): dict(layout=N.CONV1X1)}
    table = [e._replace(**special.get(e.flax, {})) for e in N.from_tree(_tree(), RULES)]
    table = tuple(table)
    shapes = N.torch_shapes(table)
    assert shapes["blocks.0.fused_bias"] == (12,)
    assert shapes["blocks.0.proj.weight"] == (6, 4, 1, 1)      # CONV1X1
    assert shapes["tok.weight"] == (4, 6)                       # NULL_ROW: one row fewer
    state = _random_state(table)
    params = N.to_flax(state, table, what="toy")
    assert params["block_0"]["dense"]["kernel"].shape == (4, 6)
    np.testing.assert_array_equal(params["block_0"]["norm"]["bias"],
                                  state["blocks.0.fused_bias"][6:])
    np.testing.assert_array_equal(params["embed"]["embedding"][-1], np.zeros(6))  # the null row
    np.testing.assert_array_equal(params["conv"]["kernel"], N.conv_to_flax(state["conv_in.weight"]))
    back = N.to_torch(params, table, what="toy")
    assert back.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
        assert back[k].flags.c_contiguous and back[k].dtype == np.float32
    # a CONV1X1 tensor is also read in its linear form
    linear = {**state, "blocks.0.proj.weight": state["blocks.0.proj.weight"][:, :, 0, 0]}
    got = N.to_flax(linear, table, what="toy")["block_0"]["dense"]["kernel"]
    np.testing.assert_array_equal(got, params["block_0"]["dense"]["kernel"])


def test_key_and_shape_errors_are_one_line_in_the_files_names():
    table = N.from_tree(_tree(), RULES)
    state = _random_state(table)
    with pytest.raises(CheckpointError, match=r"^toy: missing 1 key\(s\): tok\.weight; "
                                              r"unexpected 1 key\(s\): extra$"):
        N.to_flax({**{k: v for k, v in state.items() if k != "tok.weight"}, "extra": 0}, table,
                  what="toy")
    with pytest.raises(CheckpointError, match=r"^toy: 1 shape mismatch\(es\): blocks\.0\.proj\."
                                              r"weight has \(4, 6\), expected \(6, 4\) "
                                              r"\(for block_0/dense/kernel\)$"):
        N.to_flax({**state, "blocks.0.proj.weight": np.zeros((4, 6))}, table, what="toy")
    params = N.to_flax(state, table, what="toy")
    params["conv"]["bias"] = np.zeros(3)
    with pytest.raises(CheckpointError, match=r"conv/bias has \(3,\), expected \(4,\)"):
        N.to_torch(params, table, what="toy")
    del params["conv"]
    with pytest.raises(CheckpointError, match=r"missing 2 key\(s\): conv/bias, conv/kernel"):
        N.to_torch({"params": params}, table, what="toy")


def test_key_checks_name_missing_and_unexpected():
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): a/b; unexpected 1 key\(s\): c"):
        N.check_same_keys({("c",)}, {("a", "b")}, what="unet")
    N.check_same_keys({("a",)}, {("a",)}, what="unet")
    with pytest.raises(CheckpointError, match=r"a has \(2,\), expected \(3,\)"):
        N.check_same_shapes({("a",): np.ones(2)}, {("a",): np.ones(3)}, what="unet")


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temp file left


def test_pickles_refused_and_bad_files_named(tmp_path):
    for suffix in (".bin", ".ckpt", ".pt"):
        with pytest.raises(CheckpointError, match="never unpickles"):
            T.read_safetensors(str(tmp_path / f"model{suffix}"))
    with pytest.raises(CheckpointError, match="not found"):
        T.read_safetensors(str(tmp_path / "absent.safetensors"))
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        T.read_safetensors(str(bad))
