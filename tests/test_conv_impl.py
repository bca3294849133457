"""The 2-D-matmul formulations of convolution and the CPU-friendly GroupNorm match what they
replace: `lax.conv_general_dilated` and `flax.linen.GroupNorm`, in values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import conv as conv_lib
from jaxdiff.models.layers import GroupNorm

# (x shape, kernel (kh, kw, C, O), strides, padding): the U-Net's 3x3 / stride-2 / 1x1 cases,
# Downsample's bottom-right padding, and odd, non-square sizes.
CASES = [
    ((2, 8, 8, 4), (3, 3, 4, 8), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
    ((1, 8, 6, 3), (3, 3, 3, 5), (2, 2), ((0, 1), (0, 1))),
    ((2, 7, 5, 6), (1, 1, 6, 4), (1, 1), ((0, 0), (0, 0))),
    ((1, 9, 7, 2), (3, 2, 2, 3), (2, 1), ((2, 0), (1, 1))),
    ((1, 6, 10, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1))),     # even, non-square: Winograd's tiles
]


def _xla(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("impl", ["im2col", "shifted", "winograd"])
def test_conv2d_matches_lax_conv_values_and_gradients(impl):
    rng = np.random.RandomState(0)
    for xs, ws, strides, padding in CASES:
        x = jnp.asarray(rng.randn(*xs), jnp.float32)
        w = jnp.asarray(rng.randn(*ws), jnp.float32)
        ref = _xla(x, w, strides, padding)
        out = conv_lib.conv2d(x, w, strides=strides, padding=padding, impl=impl)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
        g = jnp.asarray(rng.randn(*ref.shape), jnp.float32)          # a cotangent that is not all ones

        def loss(fn):
            return lambda x, w: jnp.sum(fn(x, w) * g)
        gref = jax.grad(loss(lambda x, w: _xla(x, w, strides, padding)), argnums=(0, 1))(x, w)
        gout = jax.grad(loss(lambda x, w: conv_lib.conv2d(x, w, strides=strides, padding=padding, impl=impl)),
                        argnums=(0, 1))(x, w)
        for a, b in zip(gout, gref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
        # The windows matter: the same kernel with its taps reversed gives another answer.
        if ws[0] * ws[1] > 1:
            flipped = conv_lib.conv2d(x, w[::-1, ::-1], strides=strides, padding=padding, impl=impl)
            assert float(jnp.abs(flipped - ref).max()) > 1e-2


def test_conv2d_bf16_accumulates_in_float32():
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(2, 8, 8, 64), jnp.float32)
    w = jnp.asarray(rng.randn(3, 3, 64, 16) / 24, jnp.float32)
    ref = _xla(x, w, (1, 1), ((1, 1), (1, 1)))
    for impl in ("im2col", "shifted", "winograd"):
        out = conv_lib.conv2d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), padding=((1, 1), (1, 1)), impl=impl)
        assert out.dtype == jnp.bfloat16
        rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        assert rel < 1e-2, (impl, rel)


def _count_dots(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_winograd_is_exact_on_small_integers_and_covers_only_its_shapes():
    """F(2x2, 3x3) only adds, subtracts and halves: on small integers every step is exact in
    float32, so it equals the direct sum bit for bit. It makes 16 products where the direct sum
    makes 9; a stride-2 or odd-sized convolution under "winograd" runs one product per tap."""
    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.randint(-4, 5, (2, 6, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.randint(-4, 5, (3, 3, 3, 4)), jnp.float32)
    pad = ((1, 1), (1, 1))
    ref = _xla(x, w, (1, 1), pad)
    out = conv_lib.conv2d(x, w, padding=pad, impl="winograd")
    np.testing.assert_array_equal(out, ref)
    assert float(jnp.abs(ref).max()) > 10
    assert _count_dots(lambda x, w: conv_lib.conv2d(x, w, padding=pad, impl="winograd"), x, w) == 16
    assert conv_lib.winograd_applies(x.shape, w.shape, (1, 1), pad)
    for shape, strides in (((2, 6, 8, 3), (2, 2)), ((2, 7, 8, 3), (1, 1))):
        xs = jnp.asarray(rng.randint(-4, 5, shape), jnp.float32)
        assert not conv_lib.winograd_applies(shape, w.shape, strides, pad)
        assert _count_dots(lambda x, w: conv_lib.conv2d(x, w, strides=strides, padding=pad, impl="winograd"),
                           xs, w) == 9
        np.testing.assert_array_equal(conv_lib.conv2d(xs, w, strides=strides, padding=pad, impl="winograd"),
                                      _xla(xs, w, strides, pad))
    assert not conv_lib.winograd_applies(x.shape, (3, 3, 3, 4), (1, 1), ((0, 0), (0, 0)))
    assert not conv_lib.winograd_applies(x.shape, (1, 1, 3, 4), (1, 1), ((0, 0), (0, 0)))


def test_conv_module_has_nn_conv_parameters_and_outputs():
    x = jnp.asarray(np.random.RandomState(2).randn(2, 8, 8, 3), jnp.float32)
    ref_mod = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    params = ref_mod.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda p: p + 0.1, params)                   # a non-zero bias
    for impl in ("xla", "im2col", "shifted", "auto"):
        mod = conv_lib.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), impl=impl)
        mine = mod.init(jax.random.PRNGKey(0), x)
        assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)
        np.testing.assert_allclose(mod.apply(params, x), ref_mod.apply(params, x), rtol=1e-5, atol=1e-5)


def test_conv_impl_refusal_is_one_line():
    with pytest.raises(ValueError, match="conv impl must be one of"):
        conv_lib.resolve_impl("fft")
    assert conv_lib.resolve_impl("auto") == "xla"
    assert conv_lib.resolve_impl("shifted") == "shifted"


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 32), 8), ((3, 4, 4, 12), 3), ((2, 10, 16), 4)])
def test_group_norm_matches_flax_values_and_gradients(shape, groups):
    rng = np.random.RandomState(3)
    x = jnp.asarray(rng.randn(*shape) * 3 + 2, jnp.float32)          # off-centre, so the mean matters
    params = {"params": {"scale": jnp.asarray(rng.rand(shape[-1]) + 0.5, jnp.float32),
                         "bias": jnp.asarray(rng.randn(shape[-1]), jnp.float32)}}
    ref_mod = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)
    mod = GroupNorm(num_groups=groups, epsilon=1e-5)
    assert jax.tree.map(jnp.shape, mod.init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, params)
    ref, out = ref_mod.apply(params, x), mod.apply(params, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # Groups matter: normalising with one group gives another answer.
    other = GroupNorm(num_groups=1, epsilon=1e-5).apply(params, x)
    assert float(jnp.abs(other - ref).max()) > 1e-2
    g = jnp.asarray(rng.randn(*shape), jnp.float32)

    def grads(m):
        return jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * g), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(grads(mod)), jax.tree.leaves(grads(ref_mod))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_group_norm_bf16_and_refusal():
    x = jnp.asarray(np.random.RandomState(4).randn(2, 4, 4, 16) * 50, jnp.float32)
    p = GroupNorm(num_groups=4).init(jax.random.PRNGKey(0), x)
    ref = GroupNorm(num_groups=4).apply(p, x)
    out = GroupNorm(num_groups=4, dtype=jnp.bfloat16).apply(p, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)
    with pytest.raises(ValueError, match="not divisible into 5 groups"):
        GroupNorm(num_groups=5).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        GroupNorm(num_groups=4, activation="relu").init(jax.random.PRNGKey(0), x)


def test_group_norm_silu_is_taken_before_the_one_rounding():
    """activation="silu" equals SiLU of the norm in float32 (same values and gradients) and in
    bf16 is SiLU of the float32 norm rounded once: closer to it than a rounded norm's SiLU."""
    rng = np.random.RandomState(5)
    x = jnp.asarray(rng.randn(2, 8, 8, 32) * 3 + 1, jnp.float32)
    p = GroupNorm(num_groups=8).init(jax.random.PRNGKey(0), x)
    p = jax.tree.map(lambda a: a + jnp.asarray(rng.randn(*a.shape) * 0.3, jnp.float32), p)
    fused, plain = GroupNorm(num_groups=8, activation="silu"), GroupNorm(num_groups=8)
    ref = nn.silu(plain.apply(p, x))
    np.testing.assert_allclose(fused.apply(p, x), ref, rtol=1e-6, atol=1e-6)
    g = jnp.asarray(rng.randn(*x.shape), jnp.float32)
    ga = jax.grad(lambda p, x: jnp.sum(fused.apply(p, x) * g), argnums=(0, 1))(p, x)
    gb = jax.grad(lambda p, x: jnp.sum(nn.silu(plain.apply(p, x)) * g), argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    xb = x.astype(jnp.bfloat16)
    exact = nn.silu(plain.apply(p, xb.astype(jnp.float32)))
    once = GroupNorm(num_groups=8, dtype=jnp.bfloat16, activation="silu").apply(p, xb)
    twice = nn.silu(GroupNorm(num_groups=8, dtype=jnp.bfloat16).apply(p, xb))
    assert once.dtype == twice.dtype == jnp.bfloat16
    np.testing.assert_array_equal(once, exact.astype(jnp.bfloat16))
    err_once = float(jnp.abs(once.astype(jnp.float32) - exact).max())
    err_twice = float(jnp.abs(twice.astype(jnp.float32) - exact).max())
    assert err_once < err_twice


def test_automatic_choice_follows_the_measured_rules():
    f32, bf16 = jnp.float32, jnp.bfloat16
    # GPU / TPU: always XLA's convolution.
    assert conv_lib.choose((1, 8, 8, 1280), (3, 3, 1280, 1280), f32, backend="gpu") == "xla"
    assert conv_lib.choose((1, 64, 64, 320), (3, 3, 320, 320), bf16, backend="tpu") == "xla"
    # CPU, float32: im2col for the deep, small maps until the batch fills 512 positions;
    # Winograd for wide 3x3 "same" convolutions on maps of >= 8x8; XLA for the rest.
    assert conv_lib.choose((1, 16, 16, 1280), (3, 3, 1280, 1280), f32, backend="cpu") == "im2col"
    assert conv_lib.choose((4, 8, 8, 1280), (3, 3, 1280, 1280), f32, backend="cpu") == "im2col"
    assert conv_lib.choose((2, 16, 16, 1280), (3, 3, 1280, 1280), f32, backend="cpu") == "winograd"
    assert conv_lib.choose((8, 8, 8, 2560), (3, 3, 2560, 1280), f32, backend="cpu") == "winograd"
    assert conv_lib.choose((8, 16, 16, 1280), (3, 3, 1280, 1280), f32, backend="cpu", strides=(2, 2),
                           padding=((1, 1), (1, 1))) == "im2col"
    assert conv_lib.choose((1, 32, 32, 1280), (3, 3, 1280, 1280), f32, backend="cpu") == "winograd"
    assert conv_lib.choose((1, 8, 8, 256), (3, 3, 256, 256), f32, backend="cpu") == "winograd"
    assert conv_lib.choose((16, 32, 32, 128), (3, 3, 128, 128), f32, backend="cpu") == "winograd"
    assert conv_lib.choose((1, 4, 4, 256), (3, 3, 256, 256), f32, backend="cpu") == "xla"
    assert conv_lib.choose((1, 32, 32, 64), (3, 3, 64, 64), f32, backend="cpu") == "xla"
    assert conv_lib.choose((1, 9, 9, 256), (3, 3, 256, 256), f32, backend="cpu") == "xla"
    assert conv_lib.choose((16, 32, 32, 128), (3, 3, 128, 128), f32, backend="cpu", strides=(2, 2),
                           padding=((1, 1), (1, 1))) == "xla"
    # CPU, bf16: Winograd from 512 positions (or < 1024 channels on >= 16x16 maps), else
    # im2col for deep small maps, one dot per tap, or im2col for the few-channel input layer.
    assert conv_lib.choose((1, 64, 64, 320), (3, 3, 320, 320), bf16, backend="cpu") == "winograd"
    assert conv_lib.choose((4, 32, 32, 640), (3, 3, 640, 640), bf16, backend="cpu") == "winograd"
    assert conv_lib.choose((1, 16, 16, 1280), (3, 3, 1280, 1280), bf16, backend="cpu") == "im2col"
    assert conv_lib.choose((4, 8, 8, 1280), (3, 3, 1280, 1280), bf16, backend="cpu") == "im2col"
    assert conv_lib.choose((2, 16, 16, 1280), (3, 3, 1280, 1280), bf16, backend="cpu") == "winograd"
    assert conv_lib.choose((1, 16, 16, 640), (3, 3, 640, 1280), bf16, backend="cpu") == "winograd"
    assert conv_lib.choose((16, 8, 8, 256), (3, 3, 256, 256), bf16, backend="cpu") == "winograd"
    assert conv_lib.choose((1, 8, 8, 256), (3, 3, 256, 256), bf16, backend="cpu") == "shifted"
    assert conv_lib.choose((4, 16, 16, 1280), (3, 3, 1280, 1280), bf16, backend="cpu", strides=(2, 2),
                           padding=((1, 1), (1, 1))) == "im2col"
    assert conv_lib.choose((1, 64, 64, 320), (3, 3, 320, 320), bf16, backend="cpu", strides=(2, 2),
                           padding=((1, 1), (1, 1))) == "shifted"
    assert conv_lib.choose((1, 64, 64, 320), (1, 1, 320, 320), bf16, backend="cpu") == "shifted"
    assert conv_lib.choose((1, 64, 64, 4), (3, 3, 4, 320), bf16, backend="cpu") == "im2col"
    # CPU, float32, one input channel: nine broadcast products; three channels stay with XLA.
    assert conv_lib.choose((64, 16, 16, 1), (3, 3, 1, 16), f32, backend="cpu") == "shifted"
    assert conv_lib.choose((16, 32, 32, 3), (3, 3, 3, 128), f32, backend="cpu") == "xla"
    # A block forces one formulation, and the nesting unwinds.
    with conv_lib.formulation("xla"):
        assert conv_lib.resolve_impl("auto", (1, 8, 8, 1280), (3, 3, 1280, 1280), f32) == "xla"
        with conv_lib.formulation("shifted"):
            assert conv_lib.resolve_impl("auto") == "shifted"
    assert conv_lib.resolve_impl("auto", (1, 8, 8, 1280), (3, 3, 1280, 1280), f32) == \
        conv_lib.choose((1, 8, 8, 1280), (3, 3, 1280, 1280), f32)
    with pytest.raises(ValueError, match="conv impl must be one of"):
        with conv_lib.formulation("fft"):
            pass


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_conv_with_the_hook_equals_plain_flax_conv(dtype, monkeypatch):
    """`nn.Conv(conv_general_dilated=conv_general)` keeps flax's parameters and outputs, whichever
    formulation the rule picks (forced here so the small shapes take each path)."""
    rng = np.random.RandomState(4)
    x = jnp.asarray(rng.randn(2, 6, 6, 40), jnp.float32)
    for kernel, strides, padding in [((3, 3), (1, 1), ((1, 1), (1, 1))), ((3, 3), (2, 2), ((0, 1), (0, 1))),
                                     ((1, 1), (1, 1), "VALID"), ((3, 3), (1, 1), "SAME")]:
        ref_mod = nn.Conv(7, kernel, strides=strides, padding=padding, dtype=dtype)
        params = jax.tree.map(lambda p: p + 0.05, ref_mod.init(jax.random.PRNGKey(0), x))
        ref = ref_mod.apply(params, x).astype(jnp.float32)
        hooked = nn.Conv(7, kernel, strides=strides, padding=padding, dtype=dtype,
                         conv_general_dilated=conv_lib.conv_general)
        for impl in ("im2col", "shifted", "xla"):
            with conv_lib.formulation(impl):   # a new function per block: jit caches traces per function
                out = jax.jit(lambda p, x: hooked.apply(p, x))(params, x)
                jaxpr = str(jax.make_jaxpr(lambda p, x: hooked.apply(p, x))(params, x))
            assert ("conv_general_dilated" in jaxpr) == (impl == "xla"), impl      # the block chose the program
            assert out.dtype == ref_mod.apply(params, x).dtype
            tol = 1e-5 if dtype == jnp.float32 else 3e-2
            np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=tol, atol=tol * float(jnp.abs(ref).max()))
    # A dilated convolution is not covered: it goes to XLA whatever the block says.
    dil = nn.Conv(3, (3, 3), kernel_dilation=(2, 2), conv_general_dilated=conv_lib.conv_general)
    ref_dil = nn.Conv(3, (3, 3), kernel_dilation=(2, 2))
    p = ref_dil.init(jax.random.PRNGKey(1), x)
    with conv_lib.formulation("shifted"):
        np.testing.assert_allclose(dil.apply(p, x), ref_dil.apply(p, x), rtol=1e-6, atol=1e-6)


def test_low_precision_dense_accumulates_in_float32():
    rng = np.random.RandomState(5)
    x = jnp.asarray(rng.randn(4, 1024), jnp.float32)
    w = jnp.asarray(rng.randn(1024, 8) / 32, jnp.float32)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    out = conv_lib.dot_general(xb, wb, dims)
    assert out.dtype == jnp.bfloat16
    # Against the exact product of the rounded inputs, the float32-accumulated result is off by
    # one bf16 rounding of the output at most.
    exact_b = np.asarray(xb, np.float64) @ np.asarray(wb, np.float64)
    assert np.abs(np.asarray(out, np.float64) - exact_b).max() <= 2 ** -8 * np.abs(exact_b).max()
    assert np.abs(np.asarray(out, np.float64) - exact).max() < 0.05 * np.abs(exact).max()
    # float32 inputs are untouched.
    np.testing.assert_array_equal(conv_lib.dot_general(x, w, dims), jax.lax.dot_general(x, w, dims))


def test_batch_parts_follows_the_measured_rule():
    """Halves on one CPU device for calls of >= 8192 positions on maps of <= 32x32, B even."""
    if jax.device_count() != 1:
        pytest.skip("the rule keeps a sharded batch whole")
    assert conv_lib.batch_parts((64, 16, 16, 1), backend="cpu") == 2     # the demo sampling batch
    assert conv_lib.batch_parts((16, 32, 32, 3), backend="cpu") == 2     # the CIFAR-10 train batch
    assert conv_lib.batch_parts((16, 16, 16, 1), backend="cpu") == 1     # too small to gain
    assert conv_lib.batch_parts((63, 16, 16, 1), backend="cpu") == 1     # odd batch
    assert conv_lib.batch_parts((8, 64, 64, 4), backend="cpu") == 1      # SD latents
    assert conv_lib.batch_parts((64, 16, 16, 1), backend="gpu") == 1
    with conv_lib.formulation("xla"):
        assert conv_lib.batch_parts((64, 16, 16, 1), backend="cpu") == 1


def _count_convs(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


def _upsample_then_conv(x, w, b):
    return _xla(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), w, (1, 1), ((1, 1), (1, 1))) + b


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 4, 4, 3)])
def test_upsample_folded_into_four_phase_convs_equals_upsample_then_conv(shape):
    """`Upsample` on the CPU in float32: four 2x2 convolutions of the low-resolution map (16
    instead of 36 products per output) give the upsampled map's 3x3 convolution, in values and
    in the gradients of the input, kernel and bias; odd, non-square maps."""
    from jaxdiff.models.layers import Upsample
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(*shape), jnp.float32)
    m = Upsample(5)
    p = m.init(jax.random.PRNGKey(0), x)
    p = jax.tree.map(lambda a: jnp.asarray(rng.randn(*a.shape), jnp.float32), p)   # a bias that is not 0
    kernel, bias = p["params"]["conv"]["kernel"], p["params"]["conv"]["bias"]
    g = jnp.asarray(rng.randn(shape[0], 2 * shape[1], 2 * shape[2], 5), jnp.float32)

    def phases(x, kernel, bias):
        return m.apply({"params": {"conv": {"kernel": kernel, "bias": bias}}}, x)

    assert conv_lib.upsample_phases(shape, kernel.shape, jnp.float32, backend="cpu")
    if jax.default_backend() == "cpu":
        assert _count_convs(phases, x, kernel, bias) == 4                   # the folded path ran
    ref = _upsample_then_conv(x, kernel, bias)
    out = phases(x, kernel, bias)
    assert out.shape == ref.shape == (shape[0], 2 * shape[1], 2 * shape[2], 5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6 * float(jnp.abs(ref).max()))
    grads = jax.grad(lambda *a: jnp.sum(phases(*a) * g), argnums=(0, 1, 2))(x, kernel, bias)
    grads_ref = jax.grad(lambda *a: jnp.sum(_upsample_then_conv(*a) * g), argnums=(0, 1, 2))(x, kernel, bias)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(jnp.abs(b).max()))


def test_upsample_phases_follows_the_measured_rule():
    """Folded on the CPU in float32 where the upsampled map's convolution would be XLA's or
    Winograd's with < 1024 channels; not on SD's 1280-channel levels (the four small
    convolutions would be im2col dots), in bf16, on GPU/TPU or under "xla"."""
    k = (3, 3, 1280, 1280)
    assert conv_lib.upsample_phases((1, 32, 32, 640), (3, 3, 640, 640), jnp.float32, backend="cpu")
    assert conv_lib.choose((1, 64, 64, 640), (3, 3, 640, 640), jnp.float32, backend="cpu") == "winograd"
    assert conv_lib.upsample_phases((8, 16, 16, 256), (3, 3, 256, 256), jnp.float32, backend="cpu")
    assert conv_lib.choose((1, 32, 32, 1280), k, jnp.float32, backend="cpu") == "winograd"
    assert not conv_lib.upsample_phases((1, 16, 16, 1280), k, jnp.float32, backend="cpu")
    assert not conv_lib.upsample_phases((4, 8, 8, 1280), k, jnp.float32, backend="cpu")
    assert not conv_lib.upsample_phases((1, 8, 8, 1280), k, jnp.float32, backend="cpu")
    assert not conv_lib.upsample_phases((1, 16, 16, 1280), k, jnp.bfloat16, backend="cpu")
    assert not conv_lib.upsample_phases((1, 16, 16, 1280), k, jnp.float32, backend="gpu")
    assert not conv_lib.upsample_phases((1, 16, 16, 1280), (1, 1, 1280, 1280), jnp.float32, backend="cpu")
    with conv_lib.formulation("xla"):
        assert not conv_lib.upsample_phases((1, 16, 16, 1280), k, jnp.float32, backend="cpu")


def test_unet_in_halves_equals_the_whole_batch(monkeypatch):
    """A U-Net call cut into two half batches (`conv.batch_parts`) gives the whole call's
    outputs and gradients, with every per-sample input sliced (labels, context, ControlNet
    residuals, deep features), and really runs the network twice."""
    from jaxdiff.models.unet import UNet

    net = UNet(out_channels=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
               num_groups=4, num_classes=3, context_dim=6, flip_sin_to_cos=True)
    B, S = 4, 5
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(B, 8, 8, 2), jnp.float32)
    t = jnp.asarray([10.0, 400.0, 700.0, 999.0])
    labels = jnp.asarray([0, 1, 2, 3])
    context = jnp.asarray(rng.randn(B, S, 6), jnp.float32)
    params = net.init(jax.random.PRNGKey(0), x[:1], t[:1], labels[:1], context=context[:1])["params"]
    params = jax.tree.map(lambda p: p + 0.02 * jnp.asarray(rng.randn(*p.shape), p.dtype), params)  # no zero layers
    # ControlNet-style residuals, one per encoder activation (conv_in, res, downsample, res) and mid
    down = [jnp.asarray(rng.randn(B, *s), jnp.float32) * 0.1 for s in ((8, 8, 8), (8, 8, 8), (4, 4, 8), (4, 4, 16))]
    mid = jnp.asarray(rng.randn(B, 4, 4, 16), jnp.float32) * 0.1

    def call(p, x, **kw):
        return net.apply({"params": p}, x, t, labels, context=context, **kw)

    def loss(p, x):
        return jnp.sum(call(p, x, down_residuals=down, mid_residual=mid) ** 2)

    def run(parts):
        monkeypatch.setattr(conv_lib, "batch_parts", lambda shape, backend=None: parts)
        out = jax.jit(lambda p, x: call(p, x, down_residuals=down, mid_residual=mid))(params, x)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
        full, feature = jax.jit(lambda p, x: call(p, x, return_deep_feature=True))(params, x)
        shallow = jax.jit(lambda p, x, f: call(p, x, deep_feature=f))(params, x, feature)
        convs = _count_convs(lambda p, x: call(p, x), params, x)
        return out, grads, full, feature, shallow, convs

    whole, halves = run(1), run(2)
    assert halves[-1] == 2 * whole[-1] > 0                      # the network is in the program twice
    for a, b in zip(jax.tree.leaves(whole[:-1]), jax.tree.leaves(halves[:-1])):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5 * float(jnp.abs(a).max()))
    # the residuals are applied per sample: swapping two samples' residuals changes both outputs
    monkeypatch.setattr(conv_lib, "batch_parts", lambda shape, backend=None: 2)
    swapped = call(params, x, down_residuals=[d[::-1] for d in down], mid_residual=mid[::-1])
    assert float(jnp.abs(swapped - halves[0]).max()) > 1e-3
    # a mis-sized input is refused with the whole batch's shapes, not a half's
    with pytest.raises(ValueError, match=r"mid_residual must have the middle block's shape \[4, 4, 4, 16\]"):
        call(params, x, down_residuals=down, mid_residual=mid[:3])
