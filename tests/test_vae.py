"""AutoencoderKL against diffusers' AutoencoderKL with the same random weights, and the
diffusers-folder converter."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert import tensors as T
from jaxdiff.convert import vae as convert
from jaxdiff.errors import CheckpointError
from conftest import randomise_unit_gain
from jaxdiff.models.vae import (
    DiagonalGaussian,
    StableDiffusionVAE,
    decode_latents,
    scale_latents,
    vae_latents,
)

try:  # the PyTorch reference: the tests that need it skip without it (see `tiny`)
    import diffusers
    import torch
except ModuleNotFoundError:
    torch = diffusers = None
NO_TORCH = "the PyTorch reference (torch, diffusers) is not installed"
needs_torch = pytest.mark.skipif(torch is None, reason=NO_TORCH)

TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64],
    layers_per_block=1, norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.3, shift_factor=0.1,
)
SIZE = 32  # image side; latents are SIZE / 2

# config.json of Stable Diffusion 1.x's `vae` folder
SD_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _randomise(model, seed=0):
    return randomise_unit_gain(model, seed)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Jitted entry points, one compile per (module, shapes): far cheaper than op-by-op dispatch.
_latents = jax.jit(vae_latents, static_argnums=0)
_decode_latents = jax.jit(decode_latents, static_argnums=0, static_argnames="float32")


@functools.cache
def _jit(module, method):
    return jax.jit(functools.partial(module.apply, method=method))


def _state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny():
    """(diffusers reference, its state dict, our module, our params, images)."""
    if torch is None:
        pytest.skip(NO_TORCH)
    ref = _randomise(diffusers.AutoencoderKL(**TINY).eval())
    sd = _state_dict(ref)
    module = convert.module_from_config(dict(ref.config))
    params = convert.params_from_torch(sd, module)
    x = np.random.RandomState(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    return ref, sd, module, params, x


# ---------------------------------------------------------------------------------------------
# parity with diffusers


def test_encode_sample_and_decode_match_diffusers(tiny):
    ref, _, module, params, x = tiny
    with torch.no_grad():
        post_ref = ref.encode(_nchw(x)).latent_dist
        z_ref = post_ref.sample(generator=torch.Generator().manual_seed(5))
        kl_ref = post_ref.kl().numpy()
    noise = _nhwc(torch.randn(z_ref.shape, generator=torch.Generator().manual_seed(5)))
    post = _jit(module, "encode")({"params": params}, jnp.asarray(x))
    assert post.mean.shape == (2, SIZE // 2, SIZE // 2, 4) and post.mean.dtype == jnp.float32
    assert _rel(post.mean, _nhwc(post_ref.mean)) < 1e-4  # measured ~4e-7
    assert _rel(post.logvar, _nhwc(post_ref.logvar)) < 1e-4
    assert _rel(post.reparameterize(jnp.asarray(noise)), _nhwc(z_ref)) < 1e-4
    np.testing.assert_allclose(post.kl(), kl_ref, rtol=1e-4)
    # the posterior is not degenerate: mean and std both matter
    assert float(jnp.std(post.mean)) > 0.1 and 0.05 < float(jnp.mean(post.std)) < 20

    z = np.random.RandomState(1).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    with torch.no_grad():
        out_ref = _nhwc(ref.decode(_nchw(z)).sample)
    out = _jit(module, "decode")({"params": params}, jnp.asarray(z))
    assert out.shape == (2, SIZE, SIZE, 3) and out.dtype == jnp.float32
    assert _rel(out, out_ref) < 1e-4  # measured ~5e-7


def test_scaled_latents_follow_the_pipeline_convention(tiny):
    """vae_latents = (mean - shift) * scale; decode_latents undoes it before decoding, as
    diffusers' pipelines do around the VAE."""
    ref, _, module, params, x = tiny
    latents = _latents(module, params, jnp.asarray(x))
    with torch.no_grad():
        mean_ref = ref.encode(_nchw(x)).latent_dist.mean
        expected = (mean_ref - 0.1) * 0.3
        images_ref = _nhwc(ref.decode(expected / 0.3 + 0.1).sample)
    assert _rel(latents, _nhwc(expected)) < 1e-4
    assert _rel(_decode_latents(module, params, latents), images_ref) < 1e-4

    key = jax.random.key(3)
    drawn = _latents(module, params, jnp.asarray(x), key)
    post = _jit(module, "encode")({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(drawn, scale_latents(module, post.sample(key)), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(drawn - latents))) > 1e-2


@needs_torch
def test_variant_without_quant_convs_or_mid_attention_matches_diffusers():
    """Stable Diffusion 3-style options: no 1x1 quant convs, shift_factor; plus no mid attention."""
    cfg = dict(TINY, block_out_channels=[16, 32], use_quant_conv=False,
               use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.06)
    ref = _randomise(diffusers.AutoencoderKL(**cfg).eval(), seed=1)
    module = convert.module_from_config(dict(ref.config))
    assert not (module.use_quant_conv or module.use_post_quant_conv or module.mid_attention)
    params = convert.params_from_torch(_state_dict(ref), module)
    assert "quant_conv" not in params and "attn" not in params["encoder"]["mid"]
    x = np.random.RandomState(2).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        mean_ref = ref.encode(_nchw(x)).latent_dist.mean
        out_ref = _nhwc(ref.decode(mean_ref).sample)
    out, post = _jit(module, "__call__")({"params": params}, jnp.asarray(x))
    assert _rel(post.mean, _nhwc(mean_ref)) < 1e-4
    assert _rel(out, out_ref) < 1e-4


@needs_torch
def test_posterior_splits_moments_and_clips_logvar_like_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = np.random.RandomState(0).randn(2, 3, 3, 4).astype(np.float32) * 5
    moments[0, 0, 0, 2], moments[0, 0, 1, 3] = -50.0, 30.0  # log-variances beyond the range
    post = DiagonalGaussian.from_moments(jnp.asarray(moments))
    post_ref = DiagonalGaussianDistribution(_nchw(moments))
    np.testing.assert_array_equal(post.mean, _nhwc(post_ref.mean))
    np.testing.assert_array_equal(post.logvar, _nhwc(post_ref.logvar))
    assert float(post.logvar[0, 0, 0, 0]) == -30.0 and float(post.logvar[0, 0, 1, 1]) == 20.0


# ---------------------------------------------------------------------------------------------
# precision


def test_bf16_compute_is_close_and_float32_decode_is_really_float32(tiny):
    _, _, module, params, x = tiny
    bf16 = module.clone(dtype=jnp.bfloat16)
    latents32 = _latents(module, params, jnp.asarray(x))
    latents16 = _latents(bf16, params, jnp.asarray(x))
    assert latents16.dtype == jnp.float32 and np.all(np.isfinite(latents16))
    assert _rel(latents16, latents32) < 3e-2

    images32 = _decode_latents(module, params, latents32)
    forced = _decode_latents(bf16, params, latents32)  # float32 decode is the default
    low = _decode_latents(bf16, params, latents32, float32=False)
    assert forced.dtype == low.dtype == jnp.float32
    np.testing.assert_allclose(forced, images32, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(low))
    assert 1e-4 < _rel(low, images32) < 3e-2  # bf16 compute really ran, and is close


# ---------------------------------------------------------------------------------------------
# configuration


SD_VAE_PARAMETERS = 83_653_863  # diffusers' AutoencoderKL from SD_CONFIG (checked below)


def test_stable_diffusion_vae_config_and_parameter_count():
    ours = jax.eval_shape(
        lambda: StableDiffusionVAE().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    assert sum(math.prod(a.shape) for a in jax.tree.leaves(ours)) == SD_VAE_PARAMETERS
    assert convert.module_from_config(SD_CONFIG) == StableDiffusionVAE()


@needs_torch
def test_stable_diffusion_vae_parameter_count_matches_diffusers():
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL.from_config(SD_CONFIG)
    assert sum(p.numel() for p in ref.parameters()) == SD_VAE_PARAMETERS


def test_config_round_trip(tiny):
    ref, _, module, _, _ = tiny
    back = convert.config_to_diffusers(module)
    for key, value in back.items():
        if not key.startswith("_"):
            assert ref.config[key] == value or list(ref.config[key]) == value, key
    assert convert.module_from_config(back) == module
    assert convert.module_from_config(back, dtype=jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("change, match", [
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
     "AttnDownEncoderBlock2D"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types has 1 entries"),
    ({"act_fn": "gelu"}, "act_fn 'gelu'"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"frobnicate": 1}, "unsupported option.*frobnicate"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
])
def test_unsupported_config_named(change, match):
    with pytest.raises(CheckpointError, match=match):
        convert.module_from_config({**TINY, **change})


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_deprecated_attention_names_and_conv_shaped_weights_load(tiny):
    _, sd, module, params, _ = tiny
    old = {}
    for key, value in sd.items():
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{dep}.")
                if value.ndim == 2:
                    value = value[:, :, None, None]  # stored as a 1x1 conv
        old[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    got = convert.params_from_torch(old, module)
    jax.tree.map(np.testing.assert_array_equal, got, params)


def test_missing_unexpected_and_misshapen_keys_named(tiny):
    _, sd, module, _, _ = tiny
    missing = {k: v for k, v in sd.items() if k != "decoder.up_blocks.0.resnets.1.conv2.bias"}
    with pytest.raises(CheckpointError,
                       match=r"missing 1 key\(s\): decoder\.up_blocks\.0\.resnets\.1\.conv2\.bias"):
        convert.params_from_torch(missing, module)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): encoder\.extra\.weight"):
        convert.params_from_torch({**sd, "encoder.extra.weight": np.ones(3)}, module)
    bad = dict(sd, **{"decoder.conv_out.weight": np.ones((4, 32, 3, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.weight has \(4, 32, 3, 3\), "
                                              r"expected \(3, 32, 3, 3\) \(for decoder/conv_out/kernel\)"):
        convert.params_from_torch(bad, module)


def test_save_load_round_trip_and_diffusers_loads_saved_folder(tiny, tmp_path):
    ref, sd, module, params, x = tiny
    folder = str(tmp_path / "vae")
    convert.save(folder, module, params)
    module2, params2 = convert.load(folder)
    assert module2 == module
    jax.tree.map(np.testing.assert_array_equal, params2, params)

    loaded = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    sd2 = _state_dict(loaded)
    assert sd2.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(sd2[k], sd[k], err_msg=k)
    assert loaded.config.scaling_factor == 0.3 and loaded.config.shift_factor == 0.1
    with torch.no_grad():
        out_ref = _nhwc(loaded(_nchw(x)).sample)  # decode of the posterior mode
    out, _ = _jit(module, "__call__")({"params": params}, jnp.asarray(x))
    assert _rel(out, out_ref) < 1e-4

    module16, _ = convert.load(folder, dtype=jnp.bfloat16)
    assert module16.dtype == jnp.bfloat16


def test_load_refuses_pickles_and_names_missing_files(tmp_path):
    folder = tmp_path / "vae"
    with pytest.raises(CheckpointError, match="not found.*config.json"):
        convert.load(str(folder))
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        convert.load(str(folder))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="never unpickles"):
        convert.load(str(folder))


def test_sharded_safetensors_folder_loads(tiny, tmp_path):
    _, sd, module, params, _ = tiny
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(convert.config_to_diffusers(module)))
    keys = sorted(sd)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, ks in shards.items():
        T.write_safetensors({k: sd[k] for k in ks}, str(folder / name))
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (folder / (convert.WEIGHTS_NAME + ".index.json")).write_text(json.dumps({"weight_map": weight_map}))
    _, got = convert.load(str(folder))
    jax.tree.map(np.testing.assert_array_equal, got, params)


# ---------------------------------------------------------------------------------------------
# input errors


@pytest.mark.parametrize("shape, method, match", [
    ((1, 31, SIZE, 3), "encode", "divisible by 2"),
    ((1, 3, SIZE, SIZE), "encode", r"channels-first \(NCHW\)"),
    ((1, SIZE, SIZE, 4), "encode", r"images must have shape \[B, H, W, 3\]"),
    ((1, 8, 8, 3), "decode", r"latents must have shape \[B, H, W, 4\]"),
    ((8, 8, 4), "decode", r"latents must have shape \[B, H, W, 4\]"),
])
def test_wrong_input_shape_is_one_clear_error(tiny, shape, method, match):
    _, _, module, params, _ = tiny
    with pytest.raises(ValueError, match=match):
        module.apply({"params": params}, jnp.zeros(shape), method=method)
