"""Tests for the pixel-space U-Net (jaxdiff/models/unet.py) and its layers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxdiff.convert import unet as convert_unet
from jaxdiff.models.layers import AttentionBlock, ResBlock, timestep_embedding
from jaxdiff.models.unet import CONFIGS, UNet, ddpm_cifar10, tiny

B = 2
MNIST = (B, 28, 28, 1)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def _jitted_init(model):
    # eager op-by-op init of a whole U-Net is several times slower than compiling it
    return jax.jit(model.init)


def _init(model, x_shape, labels=None):
    x, t = jnp.zeros(x_shape), jnp.zeros((x_shape[0],))
    return _jitted_init(model)(jax.random.key(0), x, t, labels)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, train):
    def apply(params, x, t, labels, rngs):
        return model.apply(params, x, t, labels, train=train, rngs=rngs)

    return jax.jit(apply)


def _apply(model, params, x, t, labels=None, *, train=False, rngs=None):
    """model.apply, compiled once per (model, train)."""
    return _jitted_apply(model, train)(params, x, t, labels, rngs or {})


def _wake(params, key=jax.random.key(42), std=0.05):
    """Replace every all-zero leaf (zero-initialised output layers, biases) with small noise.

    The reference initialisation zeroes the last conv of every residual branch and conv_out, so a
    fresh network outputs exactly 0; tests that compare outputs need a non-trivial function.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    new = [
        std * jax.random.normal(k, p.shape, p.dtype) if not np.any(np.asarray(p)) else p
        for k, p in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, new)


def _inputs(key=jax.random.key(1)):
    x = jax.random.normal(key, MNIST)
    t = jnp.array([3.0, 871.0])
    return x, t


@pytest.fixture(scope="module")
def tiny_params():
    return _wake(_init(tiny(), MNIST))


@pytest.fixture(scope="module")
def tiny_cond():
    model = tiny(num_classes=10)
    return model, _wake(_init(model, MNIST, jnp.zeros((B,), jnp.int32)))


# ---------------------------------------------------------------------------------------------
# shapes, dtypes, precision


def test_tiny_output_shape_dtype_and_params_float32(tiny_params):
    x, t = _inputs()
    out = _apply(tiny(), tiny_params, x, t)
    assert out.shape == MNIST and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 1e-3  # non-trivial function
    # The only variable collection is 'params' (no batch stats), all float32.
    assert set(tiny_params.keys()) == {"params"}
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(tiny_params))


def test_fresh_init_is_identity_of_residuals_and_zero_output():
    # Reference init: conv_out is zero, so an untrained network predicts exactly 0.
    model = tiny()
    params = _init(model, MNIST)
    x, t = _inputs()
    np.testing.assert_array_equal(_apply(model, params, x, t), 0.0)


def test_scalar_timestep_broadcasts(tiny_params):
    x, _ = _inputs()
    a = _apply(tiny(), tiny_params, x, 500.0)
    b = _apply(tiny(), tiny_params, x, jnp.full((B,), 500.0))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # and the timestep actually matters
    c = _apply(tiny(), tiny_params, x, jnp.full((B,), 20.0))
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_class_conditional_shape_and_label_effect(tiny_cond):
    model, params = tiny_cond
    x, t = _inputs()
    out0 = _apply(model, params, x, t, jnp.array([0, 0]))
    out7 = _apply(model, params, x, t, jnp.array([7, 7]))
    null = _apply(model, params, x, t, jnp.full((B,), 10))
    for o in (out0, out7, null):
        assert o.shape == MNIST and o.dtype == jnp.float32 and np.all(np.isfinite(o))
    assert float(jnp.max(jnp.abs(out0 - out7))) > 1e-3
    assert float(jnp.max(jnp.abs(out0 - null))) > 1e-3


def test_null_class_row_exists(tiny_cond):
    model, params = tiny_cond
    table = params["params"]["class_embed"]["embedding"]
    assert table.shape == (10 + 1, 4 * model.base_channels)  # row 10 is the null class


@pytest.mark.parametrize("conditional", [False, True])
def test_bf16_compute_close_to_float32(conditional, tiny_params, tiny_cond):
    if conditional:
        model32, params = tiny_cond
        labels = jnp.array([3, 10])
    else:
        model32, params, labels = tiny(), tiny_params, None
    model16 = model32.clone(dtype=jnp.bfloat16)
    # Initialising the bf16 model still gives float32 parameters.
    params16 = jax.eval_shape(
        lambda: _init(model16, MNIST, None if labels is None else jnp.zeros((B,), jnp.int32))
    )
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))

    x, t = _inputs()
    ref = _apply(model32, params, x, t, labels)
    out = _apply(model16, params, x, t, labels)
    assert out.dtype == jnp.float32 and out.shape == MNIST
    assert np.all(np.isfinite(out))
    # One ResBlock in bf16 is off by ~0.3% (0.7% on its residual branch); the errors compound
    # over the ~20 blocks of the network to ~2% relative (measured 1.9-2.4% over seeds).
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    cos = float(jnp.vdot(out, ref) / (jnp.linalg.norm(out) * jnp.linalg.norm(ref)))
    assert rel < 5e-2 and cos > 0.999, (rel, cos)
    assert rel > 1e-4  # bf16 really was used


# ---------------------------------------------------------------------------------------------
# parameter counts


def test_ddpm_cifar10_parameter_count():
    """Ho et al. (2020) report 35.7M parameters for the CIFAR-10 network.

    We get exactly 35,746,307, the same as diffusers' UNet2DModel built with the configuration of
    the converted `google/ddpm-cifar10-32` checkpoint (checked below when diffusers is installed).
    Tolerance: the paper rounds to 0.1M, so the true count lies in [35.65M, 35.75M).
    """
    shapes = jax.eval_shape(lambda: _init(ddpm_cifar10(), (1, 32, 32, 3)))
    n = _count(shapes)
    assert abs(n - 35.7e6) < 0.05e6, n
    assert n == 35_746_307


def test_ddpm_cifar10_count_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # shapes only, no allocation or initialisation
        ref = diffusers.UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6,
        )
    n_ref = sum(p.numel() for p in ref.parameters())
    shapes = jax.eval_shape(lambda: _init(ddpm_cifar10(), (1, 32, 32, 3)))
    assert _count(shapes) == n_ref


def test_tiny_parameter_count():
    """tiny: base 16, channel_mult (1, 2, 4), 1 res block, attention at 7x7, 1 -> 1 channels:
    686,769 parameters."""
    shapes = jax.eval_shape(lambda: _init(tiny(), MNIST))
    assert _count(shapes) == 686_769
    # class conditioning adds exactly the (num_classes + 1) x (4 * base) table
    cond = jax.eval_shape(lambda: _init(tiny(num_classes=10), MNIST, jnp.zeros((B,), jnp.int32)))
    assert _count(cond) == 686_769 + 11 * 64


def test_configs_registry():
    assert CONFIGS["ddpm_cifar10"] is ddpm_cifar10 and CONFIGS["tiny"] is tiny
    assert isinstance(tiny(), UNet)


def test_parameter_names_are_stable():
    shapes = jax.eval_shape(lambda: _init(tiny(), MNIST))
    names = {"/".join(k) for k in flatten_dict(shapes["params"])}
    for expected in [
        "time_embed/dense_0/kernel", "time_embed/dense_1/kernel", "conv_in/kernel",
        "down_0/res_0/norm_0/scale", "down_0/res_0/conv_0/kernel", "down_0/res_0/time_proj/kernel",
        "down_0/res_0/norm_1/scale", "down_0/res_0/conv_1/kernel", "down_0/downsample/conv/kernel",
        "down_1/res_0/skip/kernel", "down_2/attn_0/query/kernel", "down_2/attn_0/key/kernel",
        "down_2/attn_0/value/kernel", "down_2/attn_0/proj_out/kernel", "down_2/attn_0/norm/scale",
        "mid/res_0/conv_0/kernel", "mid/attn/query/kernel", "mid/res_1/conv_1/kernel",
        "up_2/res_1/conv_0/kernel", "up_2/attn_1/query/kernel", "up_1/upsample/conv/kernel",
        "up_0/res_1/skip/kernel", "norm_out/scale", "conv_out/kernel",
    ]:
        assert expected in names, expected
    # no resampling at the ends of the U
    assert not any(n.startswith(("down_2/downsample", "up_0/upsample")) for n in names)


# ---------------------------------------------------------------------------------------------
# timestep embedding


def test_timestep_embedding_closed_form():
    dim, half = 16, 8
    emb = timestep_embedding(jnp.array([0.0, 1.0, 999.0]), dim)  # DDPM: sin first, shift 1
    assert emb.shape == (3, dim) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(emb[0, :half], 0.0)  # sin(0)
    np.testing.assert_array_equal(emb[0, half:], 1.0)  # cos(0)
    # frequencies 10000 ** (-k / (half - 1)): first is 1, last is exactly 1e-4
    freqs = 10000.0 ** (-np.arange(half) / (half - 1))
    np.testing.assert_allclose(emb[1, :half], np.sin(freqs), atol=1e-6)
    np.testing.assert_allclose(emb[1, half:], np.cos(freqs), atol=1e-6)
    assert math.isclose(float(emb[1, 0]), math.sin(1.0), abs_tol=1e-6)
    assert math.isclose(float(emb[2, half - 1]), math.sin(999.0 * 1e-4), abs_tol=1e-6)
    np.testing.assert_allclose(emb[2, :half], np.sin(999.0 * freqs), atol=1e-4)

    # ADM / Stable Diffusion convention: cos first, frequencies 10000 ** (-k / half)
    emb2 = timestep_embedding(jnp.array([5.0]), dim, flip_sin_to_cos=True, freq_shift=0)
    f2 = 10000.0 ** (-np.arange(half) / half)
    np.testing.assert_allclose(emb2[0], np.concatenate([np.cos(5 * f2), np.sin(5 * f2)]), atol=1e-5)

    # odd width: trailing zero column; scalar t accepted
    emb3 = timestep_embedding(7.0, 9)
    assert emb3.shape == (1, 9) and float(emb3[0, -1]) == 0.0


@pytest.mark.parametrize("flip,shift,dim", [(False, 1, 32), (True, 0, 32), (True, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    torch = pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = np.array([0.0, 1.0, 17.5, 500.0, 999.0], np.float32)
    ref = embeddings.get_timestep_embedding(
        torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    ).numpy()
    ours = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    # float32 arguments up to ~1000 rad: a 1-ulp difference in a frequency moves sin by ~1e-4
    np.testing.assert_allclose(ours, ref, atol=2e-4)


# ---------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_block_matches_reference(heads):
    C = 16
    x = jax.random.normal(jax.random.key(3), (2, 3, 5, C))
    block = AttentionBlock(num_heads=heads, num_groups=4)
    params = _wake(block.init(jax.random.key(0), x), std=0.3)
    out = block.apply(params, x)

    # plain-numpy version: GroupNorm, per-head softmax(q k^T / sqrt(d)) v, projection, residual
    p = jax.tree.map(np.asarray, params["params"])
    xn = np.asarray(x, np.float64)
    g = xn.reshape(2, 15, 4, C // 4)  # [B, T, G, C/G]
    g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5)
    n = g.reshape(2, 15, C) * p["norm"]["scale"] + p["norm"]["bias"]  # [B, T, C]
    q, k, v = (n @ p[m]["kernel"] + p[m]["bias"] for m in ("query", "key", "value"))
    d = C // heads
    split = lambda a: a.reshape(2, 15, heads, d).transpose(0, 2, 1, 3)  # noqa: E731 [B, N, T, D]
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)  # [B, N, T, T]
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = (w @ split(v)).transpose(0, 2, 1, 3).reshape(2, 15, C)  # [B, T, C]
    ref = xn.reshape(2, 15, C) + o @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    np.testing.assert_allclose(out.reshape(2, 15, C), ref, rtol=1e-4, atol=1e-4)

    # head_dim is an alternative spelling of the same split
    same = AttentionBlock(head_dim=C // heads, num_groups=4).apply(params, x)
    np.testing.assert_allclose(same, out, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# errors


def test_indivisible_image_size_raises():
    model = tiny()  # 3 levels -> H, W must be multiples of 4
    with pytest.raises(ValueError, match=r"divisible by 4.*\(2, 30, 30, 1\)"):
        _init(model, (2, 30, 30, 1))
    with pytest.raises(ValueError, match="divisible by 8"):
        _init(ddpm_cifar10(), (1, 32, 36, 3))


def test_labels_without_num_classes_raises(tiny_params):
    x, t = _inputs()
    with pytest.raises(ValueError, match="num_classes=None"):
        _apply(tiny(), tiny_params, x, t, jnp.array([1, 2]))


def test_num_classes_without_labels_raises(tiny_cond):
    model, params = tiny_cond
    x, t = _inputs()
    with pytest.raises(ValueError, match="null class"):
        _apply(model, params, x, t)


def test_bad_attention_level_raises():
    with pytest.raises(ValueError, match="attention_levels"):
        _init(tiny(attention_levels=(3,)), MNIST)


# ---------------------------------------------------------------------------------------------
# dropout and variants


def test_dropout_only_in_training(tiny_params):
    model = tiny(dropout=0.3)  # same parameters as tiny()
    params = tiny_params
    x, t = _inputs()
    r1, r2 = {"dropout": jax.random.key(1)}, {"dropout": jax.random.key(2)}
    a = _apply(model, params, x, t, train=True, rngs=r1)
    a_again = _apply(model, params, x, t, train=True, rngs=r1)
    b = _apply(model, params, x, t, train=True, rngs=r2)
    np.testing.assert_array_equal(a, a_again)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    e1 = _apply(model, params, x, t, train=False, rngs=r1)
    e2 = _apply(model, params, x, t, train=False, rngs=r2)
    e3 = _apply(model, params, x, t)  # no rng needed at eval
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(e1, e3)
    assert float(jnp.max(jnp.abs(a - e1))) > 1e-3


def test_adm_variants_shapes():
    """Scale-shift norm, ResBlock resampling and head_dim all build and run."""
    model = tiny(use_scale_shift_norm=True, resblock_updown=True, head_dim=16, num_classes=3)
    # (level 2 has 64 channels -> 4 heads of 16)
    labels = jnp.array([0, 3])
    params = _wake(_init(model, MNIST, labels))
    flat = {"/".join(k): v for k, v in flatten_dict(params["params"]).items()}
    # scale-shift: the time projection produces 2 * C_out (scale and shift)
    assert flat["down_0/res_0/time_proj/kernel"].shape == (64, 2 * 16)
    # resampling ResBlocks replace the plain conv resamplers
    assert "down_0/downsample/conv_0/kernel" in flat and "up_1/upsample/conv_1/kernel" in flat
    x, t = _inputs()
    out = _apply(model, params, x, t, labels)
    assert out.shape == MNIST and np.all(np.isfinite(out))


# ---------------------------------------------------------------------------------------------
# parity with diffusers' UNet2DModel (same random weights)

@pytest.mark.parametrize("downsample_padding", [0, 1])
def test_matches_diffusers_unet2d(downsample_padding):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, norm_eps=1e-6,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=downsample_padding,
        num_class_embeds=5, attention_head_dim=16,
    ).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            # Random everywhere. With small weights the softmax is nearly uniform and the
            # attention output nearly constant over pixels, which the next GroupNorm removes:
            # then a wrong head split changes the output by only ~2e-5. These scales make it
            # ~4e-3, well above the tolerance.
            std = 0.05
            if ".to_q." in name or ".to_k." in name:
                std = 1.0
            elif ".to_v." in name or ".to_out." in name:
                std = 0.3
            p.normal_(0.0, std)
    model = UNet(
        out_channels=3, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_levels=(1,), head_dim=16, num_groups=8, norm_eps=1e-6, flip_sin_to_cos=False,
        freq_shift=1, downsample_padding=downsample_padding, num_classes=5,
    )
    # the supported converter: config.json -> module, state dict -> parameter tree
    assert convert_unet.module_from_config(dict(ref.config)) == model.clone(
        in_channels=3, sample_size=16)
    params = {"params": convert_unet.params_from_torch(
        {k: v.numpy() for k, v in ref.state_dict().items()}, model)}
    expected = jax.eval_shape(lambda: _init(model, (1, 16, 16, 3), jnp.zeros((1,), jnp.int32)))
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, expected)

    x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    y = np.array([1, 4])
    with torch.no_grad():
        out_ref = ref(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
            class_labels=torch.from_numpy(y),
        ).sample.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC
    out = np.asarray(_apply(model, params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    rel = np.linalg.norm(out - out_ref) / np.linalg.norm(out_ref)
    assert rel < 1e-4, rel  # measured ~1e-6


def test_pixel_checkpoint_round_trip(tmp_path):
    """save() writes a folder diffusers' UNet2DModel reads back with the same weights (the
    null-class row is dropped on export), and load() restores module and parameters."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model = tiny(num_classes=3, head_dim=16)
    shapes = jax.eval_shape(lambda: _init(model, MNIST, jnp.zeros((B,), jnp.int32)))["params"]
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    convert_unet.save(tmp_path, model, params)
    ref = diffusers.UNet2DModel.from_pretrained(tmp_path)
    assert list(ref.config.down_block_types) == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
    assert ref.config.attention_head_dim == 16 and ref.config.num_class_embeds == 3
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    np.testing.assert_array_equal(state["class_embedding.weight"],
                                  params["class_embed"]["embedding"][:3])
    np.testing.assert_array_equal(state["down_blocks.2.attentions.0.to_q.weight"],
                                  params["down_2"]["attn_0"]["query"]["kernel"].T)
    module, loaded = convert_unet.load(tmp_path)
    assert module == model.clone(in_channels=1)
    flat, back = flatten_dict(params), flatten_dict(jax.tree.map(np.asarray, loaded))
    assert flat.keys() == back.keys()
    for k in flat:
        expected = flat[k]
        if k[-1] == "embedding":  # the null row comes back as zeros
            expected = np.concatenate([expected[:-1], np.zeros_like(expected[-1:])])
        np.testing.assert_array_equal(back[k], expected)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_matches_diffusers(scale_shift):
    """Covers the scale-shift conditioning, (1 + scale) * norm(h) + shift with scale first."""
    torch = pytest.importorskip("torch")
    resnet = pytest.importorskip("diffusers.models.resnet")
    torch.manual_seed(0)
    ref = resnet.ResnetBlock2D(
        in_channels=16, out_channels=32, temb_channels=24, groups=4, eps=1e-5,
        time_embedding_norm="scale_shift" if scale_shift else "default",
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}

    def conv(name):
        return {"kernel": sd[f"{name}.weight"].transpose(2, 3, 1, 0), "bias": sd[f"{name}.bias"]}

    def norm(name):
        return {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}

    params = {"params": {
        "norm_0": norm("norm1"), "conv_0": conv("conv1"), "norm_1": norm("norm2"),
        "conv_1": conv("conv2"), "skip": conv("conv_shortcut"),
        "time_proj": {"kernel": sd["time_emb_proj.weight"].T, "bias": sd["time_emb_proj.bias"]},
    }}
    x = np.random.RandomState(0).randn(2, 8, 8, 16).astype(np.float32)
    emb = np.random.RandomState(1).randn(2, 24).astype(np.float32)
    with torch.no_grad():
        out_ref = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(emb))
    out_ref = out_ref.numpy().transpose(0, 2, 3, 1)
    block = ResBlock(32, num_groups=4, use_scale_shift_norm=scale_shift)
    out = block.apply(params, jnp.asarray(x), jnp.asarray(emb))
    np.testing.assert_allclose(out, out_ref, rtol=1e-4, atol=1e-4)


def test_patch_size_folds_pixels_into_channels_and_back():
    from jaxdiff.models.layers import depth_to_space, space_to_depth

    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 2, 3, 12)
    # pixel (1, 1) of patch (0, 0), channel 2 sits at channel index (1*2 + 1)*3 + 2
    assert float(y[0, 0, 0, 11]) == float(x[0, 1, 1, 2])
    assert jnp.array_equal(depth_to_space(y, 2), x)


def test_patch_size_network_shapes_and_divisibility():
    m = UNet(out_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
             attention_levels=(1,), num_groups=8, patch_size=2)
    x = jnp.ones((2, 28, 28, 1))
    params = m.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)))
    assert params["params"]["conv_in"]["kernel"].shape[2] == 4       # 2x2x1 pixels per input
    assert params["params"]["conv_out"]["kernel"].shape[3] == 4
    assert m.apply(params, x, jnp.zeros((2,))).shape == (2, 28, 28, 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        m.init(jax.random.PRNGKey(0), jnp.ones((1, 26, 26, 1)), jnp.zeros((1,)))
