"""CLIP text encoder: parity with transformers' CLIPTextModel, conversion and folder round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert import clip
from jaxdiff.errors import CheckpointError
from jaxdiff.models.text import CLIPTextEncoder, SD1TextEncoder, SD2TextEncoder

try:  # the PyTorch reference: the tests that need it skip without it (see `_reference`)
    import torch
    import transformers
except ModuleNotFoundError:
    torch = transformers = None
NO_TORCH = "the PyTorch reference (torch, transformers) is not installed"

VOCAB, T, EOS = 99, 16, 5


def _reference(hidden_act="quick_gelu", eos_token_id=2, seed=0, qk_std=0.6):
    """A tiny random CLIPTextModel whose weights are large enough that a wrong mapping shows."""
    if torch is None:
        pytest.skip(NO_TORCH)
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=T, hidden_act=hidden_act,
        layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # q/k large so the softmax is far from uniform (a wrong head split or a missing
            # causal mask changes the output by O(1)); norms away from the identity.
            std = 0.3
            if "q_proj" in name or "k_proj" in name:
                std = qk_std
            elif "embedding" in name:
                std = 1.0
            p.normal_(0.0, std)
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model


def _input_ids():
    """[3, T]: random ids, an EOS (id 5, never the largest) then padding 1, at varied places."""
    rng = np.random.default_rng(0)
    ids = rng.integers(6, VOCAB, size=(3, T))
    for row, n in zip(ids, (4, 9, T - 1)):
        row[n] = EOS
        row[n + 1:] = 1
    return ids.astype(np.int32)


def _torch_outputs(model, ids, skip=1):
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        skipped = model.final_layer_norm(out.hidden_states[-(skip + 1)])  # diffusers' clip_skip
    return (out.last_hidden_state.numpy(), out.pooler_output.numpy(), skipped.numpy(),
            [h.numpy() for h in out.hidden_states])


def _state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("hidden_act,eos_token_id", [
    ("quick_gelu", 2), ("gelu", 2), ("quick_gelu", EOS), ("gelu", EOS)])
def test_matches_transformers(hidden_act, eos_token_id):
    ref = _reference(hidden_act, eos_token_id)
    module = clip.module_from_config(ref.config.to_dict())
    assert module.hidden_act == hidden_act
    assert module.eos_token_id == (None if eos_token_id == 2 else EOS)
    params = clip.params_from_torch(_state_dict(ref), module)
    ids = _input_ids()
    last_ref, pooled_ref, skipped_ref, hidden_ref = _torch_outputs(ref, ids)
    if eos_token_id == EOS:  # the two pooling rules must really pick different tokens here
        assert not np.array_equal(ids.argmax(-1), (ids == EOS).argmax(-1))

    out = module.apply({"params": params}, ids, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, T, 32) and out.pooled.shape == (3, 32)
    assert _rel(out.last_hidden_state, last_ref) < 1e-4  # measured ~3e-7
    assert _rel(out.pooled, pooled_ref) < 1e-4
    assert len(out.hidden_states) == len(hidden_ref) == 4
    for h, h_ref in zip(out.hidden_states, hidden_ref):
        assert _rel(h, h_ref) < 1e-4

    skipped = module.apply({"params": params}, ids, skip_layers=1)
    assert _rel(skipped.last_hidden_state, skipped_ref) < 1e-4
    assert _rel(skipped.last_hidden_state, last_ref) > 0.1  # skipping a layer really differs
    assert _rel(skipped.pooled, pooled_ref) < 1e-4  # pooled stays the full-depth output
    assert skipped.hidden_states is None


def test_projection_head_matches_transformers_and_round_trips(tmp_path):
    """CLIPTextModelWithProjection (SDXL's second encoder): text_embeds = pooled @ projection."""
    config = _reference().config.to_dict()
    config.update(projection_dim=24, architectures=["CLIPTextModelWithProjection"])
    torch.manual_seed(1)
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    module = clip.module_from_config(ref.config.to_dict())
    assert module.projection_dim == 24
    sd = _state_dict(ref)
    assert "text_projection.weight" in sd
    params = clip.params_from_torch(sd, module)
    ids = _input_ids()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    out = module.apply({"params": params}, ids, output_hidden_states=True)
    assert out.text_embeds.shape == (3, 24)
    assert _rel(out.text_embeds, want.text_embeds.numpy()) < 1e-4              # measured ~3e-7
    assert _rel(out.hidden_states[-2], want.hidden_states[-2].numpy()) < 1e-4
    assert _rel(out.text_embeds, out.pooled[:, :24]) > 0.1                     # the head really acts
    clip.save(tmp_path / "te2", module, params)
    back = transformers.CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "te2")).eval()
    with torch.no_grad():
        again = back(torch.from_numpy(ids.astype(np.int64))).text_embeds.numpy()
    np.testing.assert_allclose(again, want.text_embeds.numpy(), atol=1e-5)
    assert clip.module_from_config(ref.config.to_dict(), dtype=jnp.float32) == clip.load(tmp_path / "te2")[0]


def test_bf16_compute_is_close_and_finite():
    # Milder q/k than the parity tests: with very sharp softmaxes bf16's rounding of q and k
    # alone moves the output by ~2%, which says nothing about this implementation.
    ref = _reference("gelu", EOS, qk_std=0.3)
    module = clip.module_from_config(ref.config.to_dict(), dtype=jnp.bfloat16)
    params = clip.params_from_torch(_state_dict(ref), module)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    ids = _input_ids()
    last_ref, pooled_ref, skipped_ref, _ = _torch_outputs(ref, ids)
    out = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, ids)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out.last_hidden_state, np.float32)).all()
    assert _rel(out.last_hidden_state, last_ref) < 2e-2  # measured ~7e-3
    assert _rel(out.pooled, pooled_ref) < 2e-2


def test_save_load_round_trip_and_transformers_reads_it(tmp_path):
    ref = _reference("quick_gelu", 2)
    module = clip.module_from_config(ref.config.to_dict())
    params = clip.params_from_torch(_state_dict(ref), module)
    clip.save(tmp_path / "te", module, params)

    module2, params2 = clip.load(tmp_path / "te")
    assert module2 == module
    flat, flat2 = jax.tree.leaves_with_path(params), jax.tree.leaves_with_path(params2)
    assert [k for k, _ in flat] == [k for k, _ in flat2]
    for (_, a), (_, b) in zip(flat, flat2):
        np.testing.assert_array_equal(a, b)

    reread = transformers.CLIPTextModel.from_pretrained(tmp_path / "te").eval()
    ids = _input_ids()
    for a, b in zip(_torch_outputs(reread, ids)[:3], _torch_outputs(ref, ids)[:3]):
        np.testing.assert_array_equal(a, b)  # same float32 weights, same network
    assert reread.config.eos_token_id == 2

    module_eos = module.clone(eos_token_id=EOS)  # a real eos id survives the round trip too
    clip.save(tmp_path / "te_eos", module_eos, params)
    assert clip.load(tmp_path / "te_eos")[0].eos_token_id == EOS
    reread = transformers.CLIPTextModel.from_pretrained(tmp_path / "te_eos")
    assert reread.config.eos_token_id == EOS


def test_loads_both_naming_conventions(tmp_path):
    """transformers 5 saves unprefixed names; 4.x files say `text_model.` and may carry the
    position_ids buffer. Both give the same params."""
    from safetensors.numpy import save_file

    ref = _reference("gelu", EOS)
    ref.save_pretrained(tmp_path / "v5")
    module, params = clip.load(tmp_path / "v5")
    sd = {"text_model." + k: v for k, v in _state_dict(ref).items()}
    sd["text_model.embeddings.position_ids"] = np.arange(T, dtype=np.int64)[None]
    (tmp_path / "v4").mkdir()
    (tmp_path / "v4" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    save_file(sd, str(tmp_path / "v4" / "model.safetensors"), metadata={"format": "pt"})
    module4, params4 = clip.load(tmp_path / "v4")
    assert module4 == module
    jax.tree.map(np.testing.assert_array_equal, params, params4)
    out = module.apply({"params": params}, _input_ids())
    assert _rel(out.last_hidden_state, _torch_outputs(ref, _input_ids())[0]) < 1e-4


def test_key_and_shape_errors_name_the_key():
    ref = _reference()
    module = clip.module_from_config(ref.config.to_dict())
    sd = {"text_model." + k: v for k, v in _state_dict(ref).items()}

    missing = dict(sd)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): text_model\.encoder\.layers\.1"
                                              r"\.mlp\.fc2\.bias"):
        clip.params_from_torch(missing, module)

    extra = dict(sd, **{"text_model.text_projection.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(CheckpointError,
                       match=r"unexpected 1 key\(s\): text_model\.text_projection"):
        clip.params_from_torch(extra, module)

    bad = dict(sd, **{"text_model.encoder.layers.0.self_attn.q_proj.weight":
                      np.zeros((32, 16), np.float32)})
    with pytest.raises(CheckpointError,
                       match=r"q_proj\.weight has \(32, 16\), expected \(32, 32\)"):
        clip.params_from_torch(bad, module)

    deeper = module.clone(num_layers=4)  # a checkpoint with fewer layers than the module
    with pytest.raises(CheckpointError, match=r"missing 16 key\(s\): .*encoder\.layers\.3\."):
        clip.params_from_torch(sd, deeper)


def test_params_to_torch_is_the_inverse_in_transformers_layout():
    ref = _reference()
    module = clip.module_from_config(ref.config.to_dict())
    sd = _state_dict(ref)
    back = clip.params_to_torch(clip.params_from_torch(sd, module), module)
    assert set(back) == {"text_model." + k for k in sd}
    for k, v in sd.items():
        np.testing.assert_array_equal(back["text_model." + k], v)


def test_config_errors_and_folder_errors(tmp_path):
    base = _reference().config.to_dict()
    with pytest.raises(CheckpointError, match="gelu_new"):
        clip.module_from_config(dict(base, hidden_act="gelu_new"))
    with pytest.raises(CheckpointError, match="'CLIPVisionModel' is not supported"):
        clip.module_from_config(dict(base, architectures=["CLIPVisionModel"]))
    with pytest.raises(CheckpointError, match="whole CLIP model"):
        clip.module_from_config({"model_type": "clip", "text_config": base})

    with pytest.raises(CheckpointError, match="not found"):
        clip.load(tmp_path / "nope")
    (tmp_path / "pipe" / "text_encoder").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="text_encoder/ subfolder"):
        clip.load(tmp_path / "pipe")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(base))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="is a pickle; jaxdiff never unpickles"):
        clip.load(pickled)


def test_skip_layers_and_length_checked():
    module = CLIPTextEncoder(vocab_size=10, max_position_embeddings=8, hidden_size=8,
                             intermediate_size=16, num_layers=2, num_heads=2)
    init = lambda n, **kw: jax.eval_shape(  # noqa: E731  (traced only: no compile)
        lambda: module.init(jax.random.key(0), jnp.zeros((1, n), jnp.int32), **kw))
    assert init(8, skip_layers=1)["params"]["final_norm"]["scale"].shape == (8,)
    with pytest.raises(ValueError, match="skip_layers"):
        init(8, skip_layers=2)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        init(9)


# Stable Diffusion text_encoder/config.json files as released (the fields that matter).
SD15_CONFIG = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
               "vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 768,
               "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "bos_token_id": 0,
               "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 768}
SD21_CONFIG = dict(SD15_CONFIG, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, hidden_act="gelu", projection_dim=512)


SD_CONFIGS = [(SD1TextEncoder, SD15_CONFIG, 123_060_480), (SD2TextEncoder, SD21_CONFIG, 340_387_840)]


@pytest.mark.parametrize("variant,config,count", SD_CONFIGS)
def test_stable_diffusion_configs(variant, config, count):
    module = variant()
    assert clip.module_from_config(config) == module
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32)))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == count


@pytest.mark.skipif(torch is None, reason=NO_TORCH)
@pytest.mark.parametrize("variant,config,count", SD_CONFIGS)
def test_transformers_builds_the_same_size_from_the_config_written(variant, config, count):
    """transformers builds a network of the same size from the config we would write (no
    memory: meta device)."""
    module = variant()
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**clip.config_to_transformers(module)))
    assert sum(p.numel() for p in ref.parameters()) == count
