"""LoRA as a parameter transform (`jaxdiff.models.lora`) against its closed form and PyTorch's
down-then-up convolutions, and the file formats (`jaxdiff.convert.lora`): kohya names in
diffusers and LDM spelling, older diffusers keys, alphas from tensors and metadata, writing and
reading back. No sampling; tiny networks built from configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tree_equal
from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import lora as lora_convert
from jaxdiff.convert import unet as unet_convert
from jaxdiff.errors import CheckpointError
from jaxdiff.models import lora
from jaxdiff.pipelines.lora import tables

UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "layers_per_block": 1,
               "sample_size": 8, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 32,
               "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "norm_num_groups": 8,
               "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4}
TEXT_CONFIG = {"vocab_size": 60, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
               "num_attention_heads": 4}


@pytest.fixture(scope="module")
def nets():
    unet = unet_convert.module_from_config(UNET_CONFIG)
    text = clip_convert.module_from_config(TEXT_CONFIG)
    return unet, text, tables(unet, text)


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_merge_is_the_closed_form_for_dense_and_conv_kernels():
    rng = np.random.default_rng(0)
    params = {"d": {"kernel": _rand(rng, 5, 6), "bias": _rand(rng, 6)}, "c": {"kernel": _rand(rng, 3, 3, 4, 7)},
              "p": {"kernel": _rand(rng, 1, 1, 4, 7)}}
    a = {"d/kernel": lora.Lora(_rand(rng, 5, 2), _rand(rng, 2, 6), np.float32(3.0)),
         "c/kernel": lora.Lora(_rand(rng, 3, 3, 4, 3), _rand(rng, 3, 7), np.float32(1.5)),
         "p/kernel": lora.Lora(_rand(rng, 4, 2), _rand(rng, 2, 7), np.float32(2.0))}       # Dense pair, 1x1 conv
    b = {"d/kernel": lora.Lora(_rand(rng, 5, 4), _rand(rng, 4, 6), np.float32(4.0))}
    out = jax.jit(lora.merge)(params, {"a": a, "b": b}, {"a": np.float32(0.7), "b": np.float32(-1.2)})
    want_d = params["d"]["kernel"] + 0.7 * 1.5 * a["d/kernel"].down @ a["d/kernel"].up \
        - 1.2 * 1.0 * b["d/kernel"].down @ b["d/kernel"].up
    want_c = params["c"]["kernel"] + 0.7 * 0.5 * np.einsum("hwir,ro->hwio", a["c/kernel"].down, a["c/kernel"].up)
    want_p = params["p"]["kernel"] + 0.7 * 1.0 * (a["p/kernel"].down @ a["p/kernel"].up)[None, None]
    np.testing.assert_allclose(out["d"]["kernel"], want_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["c"]["kernel"], want_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["p"]["kernel"], want_p, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["d"]["bias"], params["d"]["bias"])
    assert np.abs(want_d - params["d"]["kernel"]).max() > 1.0
    with pytest.raises(ValueError, match="c/kernel has down"):
        lora.check(params, {"c/kernel": a["d/kernel"]})
    with pytest.raises(ValueError, match="e/kernel is not a parameter"):
        lora.check(params, {"e/kernel": a["d/kernel"]})


def test_kohya_conv_lora_is_torchs_kxk_down_then_1x1_up(nets):
    """A kohya conv LoRA (down 3x3 [r, in, 3, 3], up 1x1 [out, r, 1, 1], alpha) read through the
    converter and merged into the kernel gives what PyTorch computes as conv(x, W) + s * (alpha /
    r) * up(down(x))."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    _, _, t = nets
    rng = np.random.default_rng(1)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    e = t["unet"]["down_blocks.0.resnets.0.conv1"]
    kh, kw, cin, cout = e.shape
    r, alpha, s = 3, 6.0, 0.8
    down, up = _rand(rng, r, cin, 3, 3), _rand(rng, cout, r, 1, 1)
    adapters = lora_convert.from_state_dict({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                             f"{name}.alpha": np.float32(alpha)}, t)
    path = "/".join(e.flax)
    assert set(adapters) == {"unet"} and set(adapters["unet"]) == {path}
    w = _rand(rng, kh, kw, cin, cout)
    merged = lora.merge({"k": w}, {"x": {"k": adapters["unet"][path]}}, {"x": np.float32(s)})["k"]
    x = _rand(rng, 2, 6, 6, cin)
    ours = jax.lax.conv_general_dilated(x, merged, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    base = F.conv2d(xt, torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), padding=1)
    low = F.conv2d(F.conv2d(xt, torch.from_numpy(down), padding=1), torch.from_numpy(up))
    theirs = (base + s * alpha / r * low).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(theirs - base.numpy().transpose(0, 2, 3, 1)).max() > 1.0


# (diffusers module, the LDM module kohya's SDXL files name; this tiny U-Net has one ResBlock per level)
LDM = [("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
       ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "input_blocks.3.1.transformer_blocks.0.attn2.to_k"),
       ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
       ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
       ("up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2", "output_blocks.1.1.transformer_blocks.0.ff.net.2"),
       ("up_blocks.1.resnets.1.conv2", "output_blocks.3.0.out_layers.3"),
       ("time_embedding.linear_1", "time_embed.0")]


def _pairs(t, modules, rank, rng, key):
    """Random kohya tensors (down, up, alpha) for `modules` (diffusers names) under `key(module)`."""
    out = {}
    for module in modules:
        e = t["unet"][module]
        cin, cout = (e.shape[2], e.shape[3]) if len(e.shape) == 4 else e.shape
        k = e.shape[:2] if len(e.shape) == 4 else ()
        out[f"{key(module)}.lora_down.weight"] = _rand(rng, rank, cin, *k)
        out[f"{key(module)}.lora_up.weight"] = _rand(rng, cout, rank, *((1, 1) if k else ()))
        out[f"{key(module)}.alpha"] = np.float32(rank + 1)
    return out


def test_kohya_names_in_diffusers_and_ldm_spelling_load_the_same_adapter(nets):
    _, _, t = nets
    ldm = dict(LDM)
    diffusers_names = _pairs(t, ldm, 2, np.random.default_rng(2), lambda m: "lora_unet_" + m.replace(".", "_"))
    ldm_names = _pairs(t, ldm, 2, np.random.default_rng(2), lambda m: "lora_unet_" + ldm[m].replace(".", "_"))
    a = lora_convert.from_state_dict(diffusers_names, t)
    b = lora_convert.from_state_dict(ldm_names, t)
    assert len(a["unet"]) == len(LDM) and tree_equal(a, b)
    assert {p.split("/")[0] for p in a["unet"]} == {"down_0", "down_1", "mid", "up_0", "up_1", "time_embed"}


def test_older_diffusers_keys_and_text_encoder_prefixes(nets):
    _, _, t = nets
    rng = np.random.default_rng(3)
    attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    q, o = _rand(rng, 4, 64), _rand(rng, 64, 4)
    te_a, te_b = _rand(rng, 2, 32), _rand(rng, 32, 2)
    peft_keys = {f"{attn}.to_q.lora_A.weight": q, f"{attn}.to_q.lora_B.weight": o,
                 f"{attn}.to_out.0.lora_A.weight": q, f"{attn}.to_out.0.lora_B.weight": o,
                 "text_encoder.encoder.layers.1.mlp.fc2.lora_A.weight": _rand(rng, 2, 37),
                 "text_encoder.encoder.layers.1.mlp.fc2.lora_B.weight": te_b}
    old = {f"{attn}.processor.to_q_lora.down.weight": q, f"{attn}.processor.to_q_lora.up.weight": o,
           f"{attn}.processor.to_out_lora.down.weight": q, f"{attn}.processor.to_out_lora.up.weight": o,
           "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.down.weight":
               peft_keys["text_encoder.encoder.layers.1.mlp.fc2.lora_A.weight"],
           "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer.up.weight": te_b}
    a, b = lora_convert.from_state_dict(peft_keys, t), lora_convert.from_state_dict(old, t)
    assert tree_equal(a, b)
    assert set(a["text_encoder"]) == {"layer_1/mlp/fc2/kernel"}
    assert set(a["unet"]) == {"down_1/attn_0/block_0/self_attn/query/kernel",
                              "down_1/attn_0/block_0/self_attn/proj_out/kernel"}
    np.testing.assert_array_equal(a["unet"]["down_1/attn_0/block_0/self_attn/query/kernel"].down, q.T)
    with pytest.raises(CheckpointError, match="text_encoder.encoder.layers.1.mlp.fc2.lora_A.weight"):
        lora_convert.from_state_dict({**peft_keys, "text_encoder.encoder.layers.1.mlp.fc2.lora_A.weight": te_a}, t)


def test_alphas_from_metadata_patterns_and_rslora(nets):
    _, _, t = nets
    rng = np.random.default_rng(4)
    attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    sd = {}
    for m in ("attn1.to_q", "attn2.to_q", "attn1.to_v"):
        sd[f"{attn}.{m}.lora_A.weight"], sd[f"{attn}.{m}.lora_B.weight"] = _rand(rng, 4, 64), _rand(rng, 64, 4)
    alphas = lambda meta: {p.split("/")[-3] + "/" + p.split("/")[-2]: float(w.alpha)  # noqa: E731
                           for p, w in lora_convert.from_state_dict(sd, t, metadata=meta)["unet"].items()}
    assert alphas({}) == {"self_attn/query": 4.0, "cross_attn/query": 4.0, "self_attn/value": 4.0}
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_q": 2}}
    assert alphas(meta) == {"self_attn/query": 8.0, "cross_attn/query": 2.0, "self_attn/value": 8.0}
    assert alphas({**meta, "unet.use_rslora": True}) == {"self_attn/query": 16.0, "cross_attn/query": 4.0,
                                                         "self_attn/value": 16.0}   # alpha / sqrt(4) = 4 / 4


def test_write_then_read_back_with_mixed_ranks_and_alphas(nets, tmp_path):
    """The file carries the rank and alpha patterns that diffusers' LoraConfig is built from, and
    jaxdiff reads it back to the same adapters."""
    peft = pytest.importorskip("peft")
    unet, text, t = nets
    rng = np.random.default_rng(5)
    sd = _pairs(t, dict(LDM), 2, rng, lambda m: "lora_unet_" + m.replace(".", "_"))
    sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] = _rand(rng, 3, 32, 3, 3)
    sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] = _rand(rng, 32, 3, 1, 1)
    sd["lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight"] = _rand(rng, 2, 32)
    sd["lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight"] = _rand(rng, 32, 2)
    adapters = lora_convert.from_state_dict(sd, t)
    path = lora_convert.write(tmp_path / "out", adapters, t)
    assert tree_equal(lora_convert.read(tmp_path / "out", t), adapters)
    from safetensors import safe_open
    with safe_open(path, "np") as f:
        meta = json.loads(f.metadata()[lora_convert.METADATA_KEY])
        keys = set(f.keys())
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in keys
    assert "text_encoder.encoder.layers.0.self_attn.k_proj.lora_B.weight" in keys
    assert meta["unet.r"] == 2 and meta["unet.rank_pattern"] == {r"down_blocks\.0\.resnets\.0\.conv1": 3}
    assert meta["unet.lora_alpha"] == 3 and meta["unet.alpha_pattern"] == {}
    for part in ("unet", "text_encoder"):
        config = peft.LoraConfig(**{k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(part + ".")})
        assert config.r == meta[f"{part}.r"]
    with pytest.raises(CheckpointError, match="no LoRA weights"):
        lora_convert.write(tmp_path / "empty", {}, t)


def test_init_starts_at_the_base_and_only_the_adapter_trains():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):                                        # [B, 6, 6, 3] -> [B, 6, 6, 5]
            h = nn.Conv(8, (3, 3), name="conv")(x)
            return nn.Dense(5, name="dense")(jax.nn.gelu(h))

    net, x = Net(), jnp.asarray(_rand(np.random.default_rng(6), 2, 6, 6, 3))
    params = net.init(jax.random.key(0), x)["params"]
    adapter = lora.init(params, ["conv/kernel", "dense/kernel"], 2, jax.random.key(1))
    assert adapter["conv/kernel"].down.shape == (3, 3, 3, 2) and adapter["dense/kernel"].up.shape == (2, 5)
    assert tree_equal(lora.merge(params, {"t": adapter}, {"t": 1.0}), params)

    def loss(adapter):
        p = lora.merge(params, {"t": adapter}, {"t": jnp.float32(1.0)})
        return jnp.mean(net.apply({"params": p}, x) ** 2)

    grads = jax.jit(jax.grad(loss))(adapter)
    assert all(float(jnp.abs(g.up).max()) > 0 for g in grads.values())     # up starts at 0, its gradient does not
    with pytest.raises(ValueError, match="not a Dense or Conv kernel"):
        lora.init(params, ["conv/bias"], 4, jax.random.key(1))


def test_save_lora_writes_what_read_loads(nets, tmp_path):
    """`jaxdiff.save_lora` (the function training will call) on fresh adapters of both networks."""
    import jaxdiff

    unet, text, t = nets
    shapes = {"unet": {}, "text_encoder": {}}
    for part in shapes:
        for e in t[part].values():
            shapes[part].setdefault("/".join(e.flax), np.zeros(e.shape, np.float32))
    params = {part: lora.unflat(flat) for part, flat in shapes.items()}
    adapters = {"unet": lora.init(params["unet"], ["mid/attn/block_0/cross_attn/key/kernel", "conv_in/kernel"], 2,
                                  jax.random.key(0), alpha=3.0),
                "text_encoder": lora.init(params["text_encoder"], ["layer_1/attn/out/kernel"], 1, jax.random.key(1))}
    adapters = jax.tree.map(lambda x: x + 0.5, adapters)                 # up non-zero
    path = jaxdiff.save_lora(tmp_path / "one.safetensors", adapters, unet=unet, text_encoder=text)
    assert path.endswith("one.safetensors")
    back = lora_convert.read(path, t)
    assert tree_equal(jax.device_get(adapters), back)
