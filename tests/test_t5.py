"""T5 text encoder: parity with transformers' T5EncoderModel, conversion both ways, folder
loading (sharded included), sharding rules, and the T5 tokenizer against T5TokenizerFast."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sharding
from jaxdiff.convert import t5 as t5_convert
from jaxdiff.convert import tensors
from jaxdiff.errors import CheckpointError
from jaxdiff.models import t5

VOCAB = 120
# (relative_attention_num_buckets, relative_attention_max_distance): SD3 / Flux's own setting,
# and a small one that sequences of these tests outrun (every bucket kind is used).
RELATIVE = [(32, 128), (8, 12)]


def _reference(buckets=32, max_distance=128, feed_forward_proj="gated-gelu", seed=0, widen=True):
    """A tiny random T5EncoderModel. widen: weights large enough that a wrong mapping shows (q/k
    big enough that the softmax is far from uniform, a strong position bias, norms away from 1);
    else transformers' own initialisation."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=buckets, relative_attention_max_distance=max_distance,
        feed_forward_proj=feed_forward_proj, dropout_rate=0.0, layer_norm_epsilon=1e-6)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():
        if not widen:
            return model
        for name, p in model.named_parameters():
            std = 1.0 if ("shared" in name or "relative_attention_bias" in name) else 0.3
            p.normal_(0.0, std)
            if "layer_norm" in name:
                p.add_(1.0)
    return model


def _state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _torch_out(model, ids, mask=None):
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=None if mask is None else torch.from_numpy(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


def _inputs(length, batch=3, seed=0):
    """ids [B, S] and a padding mask [B, S]: row 0 full, the others padded (id 0) from varied places."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row in range(1, batch):
        n = max(1, length * row // (batch + 1))
        ids[row, n:], mask[row, n:] = 0, 0
    return ids, mask


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module", params=RELATIVE, ids=lambda r: f"buckets{r[0]}-dist{r[1]}")
def converted(request):
    ref = _reference(*request.param)
    module = t5_convert.module_from_config(ref.config.to_dict())
    return ref, module, t5_convert.params_from_torch(_state_dict(ref), module)


# ------------------------------------------------------------------------------------------
# the network


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (16, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    pytest.importorskip("torch")
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 400
    offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    for bidirectional in (True, False):
        want = T5Attention._relative_position_bucket(offsets, bidirectional=bidirectional,
                                                     num_buckets=num_buckets, max_distance=max_distance)
        got = t5.relative_position_buckets(length, length, num_buckets, max_distance, bidirectional)
        np.testing.assert_array_equal(got, want.numpy())
        # every bucket is exercised (bidirectional: offset 0 is in the lower half, so the upper
        # half's first bucket stays empty)
        assert set(np.unique(got)) == set(range(num_buckets)) - ({num_buckets // 2} if bidirectional else set())


@pytest.mark.parametrize("length", [1, 9, 40])
def test_matches_transformers(converted, length):
    ref, module, params = converted
    ids, mask = _inputs(length)
    out = module.apply({"params": params}, jnp.asarray(ids))
    assert out.shape == (3, length, 32) and out.dtype == jnp.float32
    assert _rel(out, _torch_out(ref, ids)) < 1e-4
    if length > 1:  # with the padding mask (masked rows and full rows alike)
        masked = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
        assert _rel(masked, _torch_out(ref, ids, mask)) < 1e-4
        # the mask matters: padded keys change the unpadded positions of a padded row
        assert _rel(masked[1, :mask[1].sum()], out[1, :mask[1].sum()]) > 1e-2


def test_relu_feed_forward_matches_transformers():
    ref = _reference(8, 12, feed_forward_proj="relu")
    module = t5_convert.module_from_config(ref.config.to_dict())
    assert module.feed_forward_proj == "relu"
    params = t5_convert.params_from_torch(_state_dict(ref), module)
    assert set(params["layer_0"]["mlp"]) == {"wi", "wo"}
    ids, mask = _inputs(11)
    out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert _rel(out, _torch_out(ref, ids, mask)) < 1e-4


def test_relative_position_bias_matters(converted):
    _, module, params = converted
    ids, _ = _inputs(40)
    out = module.apply({"params": params}, jnp.asarray(ids))
    zeroed = jax.tree.map(lambda x: x, params)
    zeroed["relative_attention_bias"] = {"embedding": np.zeros_like(
        params["relative_attention_bias"]["embedding"])}
    assert _rel(module.apply({"params": zeroed}, jnp.asarray(ids)), out) > 0.05
    # ... and so does its setting: the same weights read with other buckets give other outputs
    other = module.clone(relative_attention_max_distance=module.relative_attention_max_distance // 2)
    assert _rel(other.apply({"params": params}, jnp.asarray(ids)), out) > 1e-3


def test_bf16_compute_is_close_and_finite():
    # transformers' initialisation (a softmax as sharp as the widened test weights' loses a few
    # percent in bf16 logits; this one, closer to trained weights, stays within 1e-2)
    ref = _reference(widen=False)
    module = t5_convert.module_from_config(ref.config.to_dict())
    params = t5_convert.params_from_torch(_state_dict(ref), module)
    ids, mask = _inputs(24)
    want = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    got = module.clone(dtype=jnp.bfloat16).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(got)))
    assert _rel(got, want) < 1e-2


def test_input_shapes_are_checked():
    module = t5.T5Encoder(VOCAB, 16, 4, 32, 1, 4)
    params = module.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, S\]"):
        module.apply(params, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        module.apply(params, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="feed_forward_proj must be one of"):
        module.clone(feed_forward_proj="gated-swish").apply(params, jnp.zeros((1, 3), jnp.int32))


def test_xxl_preset_has_the_released_size():
    shapes = jax.eval_shape(lambda: t5.T5XXLEncoder().init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 4_762_310_656
    assert shapes["relative_attention_bias"]["embedding"].shape == (32, 64)


# ------------------------------------------------------------------------------------------
# conversion


def test_conversion_round_trips_both_ways(converted):
    ref, module, params = converted
    sd = _state_dict(ref)
    back = t5_convert.params_to_torch(params, module)
    assert set(back) == set(sd) and t5_convert.TIED in sd
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    again = t5_convert.params_from_torch(back, module)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    # either name of the tied embedding is read alone; `shared` wins when both are there
    for keep in (t5_convert.SHARED, t5_convert.TIED):
        only = {k: v for k, v in sd.items() if k not in (t5_convert.SHARED, t5_convert.TIED)}
        only[keep] = sd[keep]
        np.testing.assert_array_equal(
            t5_convert.params_from_torch(only, module)["token_embedding"]["embedding"], sd[keep])
    # a whole T5's decoder and LM head are skipped
    whole = dict(sd, **{"decoder.final_layer_norm.weight": np.ones(32, np.float32),
                        "lm_head.weight": np.ones((VOCAB, 32), np.float32)})
    jax.tree.map(np.testing.assert_array_equal, t5_convert.params_from_torch(whole, module), params)


def test_key_and_shape_errors_are_one_line(converted):
    ref, module, _ = converted
    sd = _state_dict(ref)
    q = "encoder.block.1.layer.0.SelfAttention.q.weight"
    with pytest.raises(CheckpointError, match=rf"missing 1 key\(s\): {q}") as e:
        t5_convert.params_from_torch({k: v for k, v in sd.items() if k != q}, module)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"wi_0.weight has \(64, 16\), expected \(64, 32\)"):
        t5_convert.params_from_torch(dict(sd, **{
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": np.zeros((64, 16), np.float32)}), module)


def test_config_round_trip_and_refusals():
    transformers = pytest.importorskip("transformers")
    module = t5_convert.module_from_config({"architectures": ["T5EncoderModel"], "d_model": 32,
                                            "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                                            "vocab_size": VOCAB, "feed_forward_proj": "gated-gelu"})
    written = t5_convert.config_to_transformers(module)
    assert t5_convert.module_from_config(written) == module
    config = transformers.T5Config(**written)
    assert (config.is_gated_act, config.dense_act_fn) == (True, "gelu_new")
    for bad, match in [({"model_type": "umt5"}, "model_type='umt5'"),
                       ({"architectures": ["T5ForSequenceClassification"]}, "not supported"),
                       ({"is_decoder": True}, "encoder only"),
                       ({"feed_forward_proj": "gated-swish"}, "feed_forward_proj='gated-swish'")]:
        with pytest.raises(CheckpointError, match=match):
            t5_convert.module_from_config(dict(written, **bad))


def test_save_load_and_transformers_reads_it(converted, tmp_path):
    transformers = pytest.importorskip("transformers")
    ref, module, params = converted
    folder = tmp_path / "text_encoder_3"
    t5_convert.save(folder, module, params)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert t5_convert.TIED not in tensors.read_safetensors(str(folder / "model.safetensors"))
    loaded_module, loaded = t5_convert.load(folder)
    assert loaded_module == module
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    theirs = transformers.T5EncoderModel.from_pretrained(folder).eval()
    ids, mask = _inputs(10)
    np.testing.assert_allclose(_torch_out(theirs, ids, mask), _torch_out(ref, ids, mask), rtol=0, atol=0)
    # the pipeline root is named in the message
    with pytest.raises(CheckpointError, match="text_encoder_3/ subfolder"):
        t5_convert.load(tmp_path)


def test_loads_a_sharded_folder_and_refuses_an_index_leading_outside(converted, tmp_path):
    ref, module, params = converted
    folder = tmp_path / "text_encoder_2"
    ref.save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()
    loaded_module, loaded = t5_convert.load(folder)
    assert loaded_module == module
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    bf16_module, _ = t5_convert.load(folder, jnp.bfloat16)
    assert bf16_module.dtype == jnp.bfloat16
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    index["weight_map"] = {k: "../outside.safetensors" for k in index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name inside the model folder"):
        t5_convert.load(folder)


# ------------------------------------------------------------------------------------------
# sharding


def test_every_parameter_has_logical_axes(converted):
    params = converted[2]
    assert sharding.unnamed_parameters(params) == []
    D, F = 32, 64
    assert sharding.logical_axes(("layer_0", "mlp", "wi_0", "kernel"), (D, F)) == ("embed", "mlp")
    assert sharding.logical_axes(("layer_0", "mlp", "wi_1", "kernel"), (D, F)) == ("embed", "mlp")
    assert sharding.logical_axes(("layer_0", "mlp", "wo", "kernel"), (F, D)) == ("mlp", "embed")
    assert sharding.logical_axes(("layer_0", "attn", "out", "kernel"), (D, D)) == ("mlp", "embed")
    assert sharding.logical_axes(("relative_attention_bias", "embedding"), (32, 4)) == ("vocab", "embed")
    assert sharding.logical_axes(("final_norm", "scale"), (D,)) == ("norm",)


# ------------------------------------------------------------------------------------------
# the tokenizer

PIECES = ["<pad>", "</s>", "<unk>", "\u2581", "\u2581a", "\u2581cat", "\u2581dog", "\u2581photo",
          "\u2581of", "\u2581the", "\u2581on", "\u2581mat", "\u2581red", "ing", "s", "ed", ",", ".",
          *"abcdefghijklmnopqrstuvwxyz"]
PROMPTS = ["a photo of a cat", "the red dog  on the mat, purring.", "", "  leading and trailing  ",
           "x" * 40, "a cat " * 30, "a dog</s> on a mat", "\u00dcn\u00efcode \ufb01 dogs!"]


def _tokenizer_backend(transformers5_form: bool):
    """A tiny T5-style Unigram tokenizer. transformers5_form: the pipeline transformers 5 rebuilds
    from any T5 tokenizer.json (no normaliser here, whitespace split then Metaspace); else the
    form transformers 4.x's converter wrote (a normaliser and Metaspace alone), which transformers
    applies as written when handed the tokenizer object."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    vocab = [(p, 0.0 if i < 3 else -1.0 - (i * 7) % 5) for i, p in enumerate(PIECES)]
    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    if transformers5_form:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip(left=False, right=True),
                                               normalizers.Replace(tokenizers.Regex(" {2,}"), "\u2581")])
        tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return tok


def _reference_tokens(reference, prompts, length):
    out = reference(prompts, padding="max_length", max_length=length, truncation=True)
    return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])


@pytest.mark.parametrize("transformers5_form", [True, False], ids=["v5-file", "v4-file"])
def test_tokenizer_matches_t5_tokenizer_fast(tmp_path, transformers5_form):
    from jaxdiff.models.t5_tokenizer import T5Tokenizer

    transformers = pytest.importorskip("transformers")
    backend = _tokenizer_backend(transformers5_form)
    theirs = transformers.T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
                                          unk_token="<unk>", extra_ids=0)
    theirs.save_pretrained(tmp_path)
    if transformers5_form:  # what a pipeline gets from the saved folder
        theirs = transformers.T5TokenizerFast.from_pretrained(tmp_path)
    ours = T5Tokenizer.from_dir(tmp_path)
    assert (ours.eos_token_id, ours.pad_token_id, ours.model_max_length) == (1, 0, 512)
    for length in (16, 7):
        got = ours(PROMPTS, max_length=length)
        want_ids, want_mask = _reference_tokens(theirs, PROMPTS, length)
        np.testing.assert_array_equal(got.input_ids, want_ids)
        np.testing.assert_array_equal(got.attention_mask, want_mask)
        assert got.input_ids.dtype == np.int32 and got.input_ids.shape == (len(PROMPTS), length)
    long = ours("a cat " * 30, max_length=16)
    assert long.input_ids[0, -1] == 1 and long.attention_mask.all()  # truncated, EOS kept last
    empty = ours("", max_length=4)
    np.testing.assert_array_equal(empty.input_ids, [[1, 0, 0, 0]])
    np.testing.assert_array_equal(empty.attention_mask, [[1, 0, 0, 0]])
    assert ours.decode(ours("a photo of a cat", max_length=8).input_ids[0]) == "a photo of a cat"


def test_tokenizer_folder_errors(tmp_path):
    from jaxdiff.models.t5_tokenizer import T5Tokenizer

    with pytest.raises(CheckpointError, match="tokenizer folder not found"):
        T5Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "tokenizer_3").mkdir()
    (tmp_path / "tokenizer_3" / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match=r"holds spiece.model but no tokenizer.json") as e:
        T5Tokenizer.from_dir(tmp_path / "tokenizer_3")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"has no tokenizer.json .*tokenizer_3/ subfolder"):
        T5Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_3" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*tokenizer.json"):
        T5Tokenizer.from_dir(tmp_path / "tokenizer_3")
    _tokenizer_backend(True).save(str(tmp_path / "tokenizer_3" / "tokenizer.json"))
    (tmp_path / "tokenizer_3" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<blank>"}))
    with pytest.raises(CheckpointError, match="the pad token '<blank>' is not in the tokenizer's vocabulary"):
        T5Tokenizer.from_dir(tmp_path / "tokenizer_3")
