"""The Stable Diffusion U-Net topology (jaxdiff/models/unet.py + attention.py) against diffusers'
UNet2DConditionModel, and the U-Net checkpoint converter (jaxdiff/convert/unet.py).

Tiny random diffusers models are built here (offline); the jaxdiff network gets their weights
through the converter and must give the same output.
"""

import functools
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxdiff.convert import unet as convert_unet
from jaxdiff.errors import CheckpointError
from jaxdiff.models.unet import CONFIGS, sd15, sd21, sdxl, tiny

try:  # the PyTorch reference: the tests that need it skip without it (see `_case`)
    import diffusers
    import torch
except ModuleNotFoundError:
    torch = diffusers = None
NO_TORCH = "the PyTorch reference (torch, diffusers) is not installed"
needs_torch = pytest.mark.skipif(torch is None, reason=NO_TORCH)

B, SIZE, SEQ, CTX = 2, 16, 7, 32
TEXT = 24  # SDXL-style pooled text width in the tiny model


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _randomise(ref, seed: int) -> None:
    """Random weights everywhere. Large q/k make the softmax peaked, so the attention output
    varies over pixels and a wrong head split or a lost context shows far above tolerance
    (see test_test_would_catch_wrong_heads_and_lost_context). With small GEGLU inputs,
    a * GELU(g) ~ a * g / 2 would not tell value from gate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            std = 0.05
            if ".to_q." in name or ".to_k." in name:
                std = 1.0
            elif ".to_v." in name or ".to_out." in name:
                std = 0.3
            elif ".ff.net.0." in name:
                std = 0.5  # GEGLU pre-activations ~3: a * GELU(g) is far from g * GELU(a)
            p.copy_(torch.randn(p.shape, generator=g) * std)


class Case(NamedTuple):
    ref: object       # the diffusers model
    module: object    # the jaxdiff UNet built from its config
    params: dict      # converted weights
    inputs: dict      # jaxdiff call kwargs (x NHWC)
    expected: np.ndarray  # diffusers output, NHWC


def _torch_out(ref, inputs) -> np.ndarray:
    kw = {}
    if "text_embeds" in inputs:
        kw["added_cond_kwargs"] = {k: torch.from_numpy(inputs[k])
                                   for k in ("text_embeds", "time_ids")}
    with torch.no_grad():
        out = ref(torch.from_numpy(inputs["x"].transpose(0, 3, 1, 2)),
                  torch.from_numpy(inputs["t"]), torch.from_numpy(inputs["context"]), **kw)
    return out.sample.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


def _case(seed: int, in_channels: int = 4, **config) -> Case:
    if torch is None:
        pytest.skip(NO_TORCH)
    ref = diffusers.UNet2DConditionModel(
        sample_size=SIZE, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=CTX, **config,
    ).eval()
    _randomise(ref, seed)
    module = convert_unet.module_from_config(dict(ref.config))
    params = convert_unet.params_from_torch(
        {k: v.numpy() for k, v in ref.state_dict().items()}, module)
    rng = np.random.RandomState(seed)
    inputs = {
        "x": rng.randn(B, SIZE, SIZE, in_channels).astype(np.float32),
        "t": np.array([10.0, 700.0], np.float32),
        "context": rng.randn(B, SEQ, CTX).astype(np.float32),
    }
    if config.get("addition_embed_type") == "text_time":
        inputs["text_embeds"] = rng.randn(B, TEXT).astype(np.float32)
        inputs["time_ids"] = np.array([[16, 16, 0, 0, 16, 16], [32, 24, 2, 3, 16, 16]],
                                      np.float32)
    return Case(ref, module, params, inputs, _torch_out(ref, inputs))


@functools.lru_cache(maxsize=None)
def _jitted(module):
    def apply(params, inputs):
        rest = {k: v for k, v in inputs.items() if k not in ("x", "t")}
        return module.apply({"params": params}, inputs["x"], inputs["t"], **rest)

    return jax.jit(apply)


def _apply(module, params, inputs):
    """module.apply on the inputs dict, compiled once per module (and cached on disk)."""
    return np.asarray(_jitted(module)(params, inputs))


@pytest.fixture(scope="module")
def sd1():
    """SD 1.x style: one head count for every level, 1x1-conv transformer projections."""
    return _case(
        0, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)


@pytest.fixture(scope="module")
def sd2():
    """SD 2.x style: per-level head counts (16 and 8 channels per head), linear projections,
    float32 attention."""
    return _case(
        1, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=(2, 8), use_linear_projection=True, upcast_attention=True)


@pytest.fixture(scope="module")
def xl():
    """SDXL style: per-level transformer depth (the mid block takes the last level's, 2) and
    text_time micro-conditioning."""
    return _case(
        2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT + 6 * 8)


# ---------------------------------------------------------------------------------------------
# parity


@needs_torch
@pytest.mark.parametrize("name", ["sd1", "sd2", "xl"])
def test_matches_diffusers(name, request):
    case = request.getfixturevalue(name)
    out = _apply(case.module, case.params, case.inputs)
    assert out.shape == (B, SIZE, SIZE, 4) and out.dtype == np.float32
    assert float(np.std(case.expected)) > 1e-2  # a non-trivial function
    rel = _rel(out, case.expected)
    assert rel < 1e-4, rel  # measured 2-4e-7


def test_config_fields_follow_the_checkpoint(sd1, sd2, xl):
    assert sd1.module.num_heads == 4 and sd1.module.attention_levels == (0,)
    assert sd1.module.context_dim == CTX and not sd1.module.use_linear_projection
    assert sd1.params["down_0"]["attn_0"]["proj_in"]["kernel"].shape == (1, 1, 32, 32)  # conv
    assert sd2.module.num_heads == (2, 8) and sd2.module.upcast_attention
    assert sd2.params["mid"]["attn"]["proj_in"]["kernel"].shape == (64, 64)  # linear
    assert xl.module.transformer_depth == (1, 2) and xl.module.addition_embed_dim == TEXT + 48
    assert set(xl.params["mid"]["attn"]) == {"norm", "proj_in", "block_0", "block_1", "proj_out"}
    assert set(xl.params["add_embed"]) == {"dense_0", "dense_1"}


def test_test_would_catch_wrong_heads_and_lost_context(sd2):
    """The parity tolerance (1e-4) is far below what a wrong head split or an ignored context
    would give with these weights."""
    wrong_heads = _apply(sd2.module.clone(num_heads=(2, 4)), sd2.params, sd2.inputs)
    assert _rel(wrong_heads, sd2.expected) > 1e-2  # measured 0.12 (0.12-0.19 over seeds)
    flat_context = dict(sd2.inputs, context=np.broadcast_to(
        sd2.inputs["context"].mean(1, keepdims=True), sd2.inputs["context"].shape))
    assert _rel(_apply(sd2.module, sd2.params, flat_context), sd2.expected) > 1e-1  # 0.67


def test_bf16_compute_is_finite_and_close(sd1):
    module = sd1.module.clone(dtype=jnp.bfloat16)
    out = _apply(module, sd1.params, sd1.inputs)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    rel = _rel(out, sd1.expected)
    # measured 4.7e-3 (5e-3..8e-3 over seeds): bf16 was really used, and stays close
    assert 1e-4 < rel < 2e-2, rel


def test_inpainting_unet_with_nine_input_channels():
    case = _case(3, in_channels=9, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    assert case.module.in_channels == 9
    assert case.params["conv_in"]["kernel"].shape == (3, 3, 9, 32)
    assert _rel(_apply(case.module, case.params, case.inputs), case.expected) < 1e-4
    four = dict(case.inputs, x=case.inputs["x"][..., :4])
    with pytest.raises(ValueError, match="in_channels=9"):
        jax.eval_shape(lambda: _apply(case.module, case.params, four))


# ---------------------------------------------------------------------------------------------
# folders


@needs_torch
@pytest.mark.parametrize("name", ["sd1", "sd2", "xl"])
def test_save_load_round_trip_and_diffusers_reads_it(name, request, tmp_path):
    case = request.getfixturevalue(name)
    convert_unet.save(tmp_path, case.module, case.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]

    module, params = convert_unet.load(tmp_path)
    assert module == case.module
    a, b = flatten_dict(case.params), flatten_dict(params)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=str(k))

    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, low_cpu_mem_usage=False)
    want = case.ref.state_dict()
    got = ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # diffusers' output from our folder matches our network's
    ours = _apply(case.module, case.params, case.inputs)
    assert _rel(_torch_out(ref.eval(), case.inputs), ours) < 1e-4


def test_pickle_only_folder_is_refused(sd1, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(sd1.ref.config)))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle.*safetensors"):
        convert_unet.load(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        convert_unet.load(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_unexpected_and_misshaped_keys_are_named(sd1):
    state = {k: v.numpy() for k, v in sd1.ref.state_dict().items()}
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): " + key.replace(".", r"\.")):
        convert_unet.params_from_torch(missing, sd1.module)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): extra\.weight"):
        convert_unet.params_from_torch({**state, "extra.weight": np.zeros(3)}, sd1.module)
    ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight"  # [32, 128]
    bad = {**state, ff: state[ff].T}
    with pytest.raises(CheckpointError, match="ff/proj_out/kernel"):
        convert_unet.params_from_torch(bad, sd1.module)


@pytest.mark.parametrize("change, message", [
    ({"time_cond_proj_dim": 256}, "time_cond_proj_dim=256"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"only_cross_attention": True}, "only_cross_attention"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
     "SimpleCrossAttnDownBlock2D"),
    ({"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}, "must be 'UpBlock2D'"),
    ({"transformer_layers_per_block": [[1], [1]]}, "transformer_layers_per_block"),
    ({"attention_head_dim": [1, 2, 4]}, "3 entries but there are 2 levels"),
    ({"some_future_option": 3}, "some_future_option=3"),
])
def test_unsupported_configs_are_named(sd1, change, message):
    config = {**dict(sd1.ref.config), **change}
    with pytest.raises(CheckpointError, match=message):
        convert_unet.module_from_config(config)


def test_call_errors_name_the_fix(sd1, xl):
    m, p, inputs = sd1.module, sd1.params, sd1.inputs
    x, t, ctx = inputs["x"], inputs["t"], inputs["context"]
    check = lambda f: jax.eval_shape(f)  # noqa: E731  (shape checks run while tracing)
    with pytest.raises(ValueError, match=r"context_dim=32\) and needs context"):
        check(lambda: m.apply({"params": p}, x, t))
    with pytest.raises(ValueError, match=r"context must have shape \[B, S, context_dim\]"):
        check(lambda: m.apply({"params": p}, x, t, context=ctx[..., :16]))
    with pytest.raises(ValueError, match=r"context must have shape"):
        check(lambda: m.apply({"params": p}, x, t, context=ctx[:1]))
    pixel = tiny()
    with pytest.raises(ValueError, match=r"no cross-attention \(context_dim=None\)"):
        check(lambda: pixel.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), 0.0,
                                 context=jnp.zeros((1, 3, 8))))
    xin = {k: v for k, v in xl.inputs.items() if k != "time_ids"}
    with pytest.raises(ValueError, match="needs text_embeds"):
        check(lambda: _apply(xl.module, xl.params, xin))
    xin = dict(xl.inputs, text_embeds=xl.inputs["text_embeds"][:, :8])
    with pytest.raises(ValueError, match=f"addition_embed_dim={TEXT + 48}"):
        check(lambda: _apply(xl.module, xl.params, xin))
    with pytest.raises(ValueError, match="num_heads=.*3 entries but there are 2 levels"):
        check(lambda: m.clone(num_heads=(1, 2, 4)).apply({"params": p}, x, t, context=ctx))


# ---------------------------------------------------------------------------------------------
# full-size configs


# diffusers 0.6 wrote configs of this form for SD 1.x; keys added since are absent and take
# diffusers' defaults.
_SD1_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}


# counts of diffusers' UNet2DConditionModel for the same configs (checked below on the meta
# device, which allocates nothing)
PARAMETER_COUNTS = [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)]


@pytest.mark.parametrize("name, count", PARAMETER_COUNTS)
def test_parameter_counts(name, count):
    module = CONFIGS[name]()
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **module.example_inputs()))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == count


@needs_torch
@pytest.mark.parametrize("name, count", PARAMETER_COUNTS)
def test_parameter_counts_match_diffusers(name, count):
    module = CONFIGS[name]()
    config = convert_unet.config_to_diffusers(module)
    assert convert_unet.module_from_config(config) == module
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**config)
    assert sum(p.numel() for p in ref.parameters()) == count


def test_sd1_config_file_gives_the_sd15_network():
    assert convert_unet.module_from_config(_SD1_CONFIG) == sd15()
    sd2_config = {**_SD1_CONFIG, "attention_head_dim": [5, 10, 20, 20], "sample_size": 96,
                  "cross_attention_dim": 1024, "use_linear_projection": True,
                  "upcast_attention": True}
    assert convert_unet.module_from_config(sd2_config) == sd21(upcast_attention=True)
    assert CONFIGS["sd15"] is sd15 and CONFIGS["sd21"] is sd21 and CONFIGS["sdxl"] is sdxl
