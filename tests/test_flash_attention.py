"""The blocked (online-softmax) attention kernel and the attention_impl switch
(jaxdiff/models/flash.py) against XLA's plain attention: values and gradients, float32 and
bfloat16, self and cross attention, lengths that do not divide the blocks, key masks; the whole
tiny SD U-Net; the memory the kernel saves (XLA's compiled memory analysis); and which kernel
each backend gets."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import flash
from jaxdiff.models.unet import UNet


def _qkv(seed, B, T, S, N, D, dtype=jnp.float32):
    r = jax.random.split(jax.random.key(seed), 4)
    q = 2.0 * jax.random.normal(r[0], (B, T, N, D))  # peaked softmax: the max-shift matters
    k = jax.random.normal(r[1], (B, S, N, D))
    v = jax.random.normal(r[2], (B, S, N, D))
    w = jax.random.normal(r[3], (B, T, N, D))  # cotangent weights for the gradient check
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


@jax.jit
def _xla(q, k, v, mask=None):
    m = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")


@jax.jit
def _blocked(q, k, v, mask=None):
    # Blocks smaller than every length here, so each case spans several blocks plus padding.
    return flash.blocked_attention(q, k, v, mask, block_q=16, block_k=32)


def _value_and_grads(f, q, k, v, w, mask):
    @jax.jit
    def run(q, k, v, w, mask):
        out, pull = jax.vjp(lambda *a: f(*a, mask), q, k, v)
        return (out, *pull(w.astype(out.dtype)))

    return [np.asarray(a, np.float32) for a in run(q, k, v, w, mask)]


# (T, S, N, D, masked): self-attention at CLIP's 77, cross-attention 33 -> 77 and 64 -> 7,
# a length just over a block multiple, one head and several heads.
CASES = [(77, 77, 2, 8, False), (33, 77, 3, 16, False), (64, 7, 4, 8, False),
         (130, 130, 1, 4, False), (77, 77, 2, 8, True), (33, 50, 3, 8, True)]


@pytest.mark.parametrize("T,S,N,D,masked", CASES)
def test_blocked_equals_plain_attention_float32(T, S, N, D, masked):
    q, k, v, w = _qkv(T + S, 2, T, S, N, D)
    # Key padding: the first sequence keeps 60% of its keys, the second all of them.
    mask = (jnp.arange(S)[None] < jnp.array([[max(1, int(0.6 * S))], [S]])) if masked else None
    want = _value_and_grads(_xla, q, k, v, w, mask)
    got = _value_and_grads(_blocked, q, k, v, w, mask)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5, err_msg=name)
    if masked:  # the mask is not a no-op: dropping keys moves the first sequence's output by O(1)
        unmasked = np.asarray(_blocked(q, k, v))
        assert np.abs(unmasked[0] - want[0][0]).max() > 0.1
        np.testing.assert_allclose(unmasked[1], want[0][1], atol=1e-5)
        assert np.abs(want[2][0, max(1, int(0.6 * S)):]).max() == 0.0  # masked keys get no gradient


@pytest.mark.parametrize("T,S", [(77, 77), (33, 77)])
def test_blocked_bfloat16_is_as_close_to_float32_as_xla(T, S):
    """bf16 inputs: both kernels form logits and the softmax in float32, so the blocked one is as
    close to the float32 result as XLA's (measured: both ~4e-3 on values; stated bound 2e-2)."""
    q, k, v, w = _qkv(T * S, 2, T, S, 4, 16)
    exact = _value_and_grads(_xla, q, k, v, w, None)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    xla16 = _value_and_grads(_xla, *bf, w, None)
    blk16 = _value_and_grads(_blocked, *bf, w, None)
    assert all(a.dtype == np.float32 for a in blk16)
    assert _blocked(*bf).dtype == jnp.bfloat16
    for name, b, x, e in zip(("out", "dq", "dk", "dv"), blk16, xla16, exact):
        scale = np.abs(e).max()
        err_b, err_x = np.abs(b - e).max() / scale, np.abs(x - e).max() / scale
        assert err_b < 2e-2, (name, err_b)
        assert err_b < 2 * err_x + 2e-3, (name, err_b, err_x)


def test_masking_is_traced_only_when_needed():
    """Without a mask and with S a multiple of the key block, the kernel selects nothing on its
    [B, N, bq, bk] blocks (each select is a pass over them); a mask or padded keys bring the
    selects back, forward and backward."""
    def block_selects(T, S, mask=None):
        q, k, v, _ = _qkv(0, 2, T, S, 3, 8)
        f = lambda q, k, v: _blocked(q, k, v, mask).sum()
        text = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v))
        return len(re.findall(r"\[2,3,16,\d+\] = select_n", text))

    assert block_selects(64, 96) == 0
    assert block_selects(64, 96, jnp.arange(96)[None] < jnp.array([[50], [96]])) > 0
    assert block_selects(64, 77) > 0  # 77 keys pad to 96: the padding is masked


def test_a_fully_masked_query_gets_zeros_not_nans():
    q, k, v, _ = _qkv(0, 2, 9, 40, 2, 8)
    mask = jnp.array([[False] * 40, [True] * 40])
    out = _blocked(q, k, v, mask)
    g = jax.jit(jax.grad(lambda q: _blocked(q, k, v, mask).sum()))(q)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(out[1], _xla(q, k, v)[1], atol=1e-5)


def _tiny_sd_unet(impl):
    return UNet(out_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(0, 1), head_dim=8, num_groups=8, context_dim=24,
                transformer_depth=1, attention_impl=impl)


def test_tiny_sd_unet_blocked_equals_xla_forward_and_parameter_gradients(monkeypatch):
    # Small default blocks so the U-Net's attentions (T = 64 and 16, S = T or 77) span several.
    monkeypatch.setattr(flash, "BLOCK_Q", 48)
    monkeypatch.setattr(flash, "BLOCK_K", 32)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 8, 8, 4), jnp.float32)
    t = jnp.asarray([10.0, 700.0])
    ctx = jnp.asarray(rng.randn(2, 77, 24), jnp.float32)
    xla, blocked = _tiny_sd_unet("xla"), _tiny_sd_unet("blocked")
    params = xla.init(jax.random.key(0), x, t, context=ctx)
    # Non-zero output projections (they start at zero), so attention reaches the output.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)

    def output_and_grads(module):
        def loss(p, c):
            out = module.apply(p, x, t, context=c)
            return jnp.mean(out ** 2), out

        return jax.jit(lambda p, c: jax.value_and_grad(loss, has_aux=True)(p, c))

    (_, out_x), gx = output_and_grads(xla)(params, ctx)
    run_blocked = output_and_grads(blocked)
    (_, out_b), gb = run_blocked(params, ctx)
    scale = float(np.abs(np.asarray(out_x)).max())
    np.testing.assert_allclose(out_b, out_x, atol=2e-5 * scale)
    worst = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12))
                for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gb)))
    assert worst < 1e-4, worst
    # The switch took effect: only the blocked network traces the custom-VJP kernel.
    def jaxpr(m):
        return str(jax.make_jaxpr(lambda p: m.apply(p, x, t, context=ctx))(params))

    assert "custom_vjp_call" in jaxpr(blocked) and "custom_vjp_call" not in jaxpr(xla)
    # ... and the attention matters: another context moves the output far beyond the tolerance.
    (_, other), _ = run_blocked(params, ctx[::-1])
    assert np.abs(np.asarray(other) - np.asarray(out_b)).max() > 1e3 * 2e-5 * scale


def _temp_bytes(f, *shapes):
    compiled = jax.jit(f).lower(*shapes).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None, "memory_analysis() is None on this backend"
    return analysis.temp_size_in_bytes


def test_blocked_saves_at_least_the_logits_memory():
    """T = S = 4096, 8 heads, float32: the logits alone are 512 MiB. XLA's compiled temp
    buffers (CPU memory_analysis) fall by at least that with the blocked kernel, forward and
    forward + backward (measured: 1024 -> 41 MiB and 1546 -> 53 MiB)."""
    B, T, N, D = 1, 4096, 8, 40
    logits = B * N * T * T * 4
    x = jax.ShapeDtypeStruct((B, T, N, D), jnp.float32)
    grad = lambda f: jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2))
    for make in (lambda f: f, grad):
        plain = _temp_bytes(make(_xla), x, x, x)
        blocked = _temp_bytes(make(flash.blocked_attention), x, x, x)
        assert plain >= logits  # the figure is real: XLA does hold the logits
        assert plain - blocked >= logits, (plain / 2**20, blocked / 2**20)


def test_auto_picks_by_backend_and_size():
    small, big = ((2, 256, 8, 40), (2, 77, 8, 40)), ((2, 4096, 8, 40), (2, 4096, 8, 40))
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert flash.choose("auto", *small, f32, backend="cpu") == "xla"
    assert flash.choose("auto", *big, f32, backend="cpu") == "blocked"
    # On the CPU the blocked kernel is chosen once T and S both fill a block of 512, far below
    # the memory threshold (32x32 latents: 32 MiB of logits at batch 1); elsewhere not.
    mid = ((1, 1024, 8, 40), (1, 1024, 8, 40))
    assert flash.choose("auto", *mid, f32, backend="cpu") == "blocked"
    assert flash.choose("auto", *mid, f32, backend="gpu") == "xla"
    assert flash.choose("auto", (64, 256, 8, 40), (64, 256, 8, 40), f32, backend="cpu") == "xla"
    assert flash.choose("auto", (1, 4096, 8, 40), (1, 77, 8, 40), f32, backend="cpu") == "xla"
    assert flash.choose("auto", *small, bf16, backend="gpu") == "cudnn"
    assert flash.choose("auto", *big, f32, backend="gpu") == "blocked"  # cuDNN wants half inputs
    assert flash.choose("auto", *big, bf16, backend="tpu") == "pallas"
    assert flash.choose("auto", *small, f32, backend="tpu") == "xla"  # S = 77: not a 128 multiple
    assert flash.choose("auto", *big, f32, masked=True, backend="tpu") == "blocked"
    for impl in ("xla", "blocked"):
        for backend in ("cpu", "gpu", "tpu"):
            assert flash.choose(impl, *small, f32, backend=backend) == impl
    assert flash.choose("cudnn", *small, bf16, backend="gpu") == "cudnn"
    assert flash.choose("pallas", *big, f32, backend="tpu") == "pallas"


@pytest.mark.parametrize("impl,backend,dtype,shapes,message", [
    ("cudnn", "cpu", jnp.bfloat16, None, r"attention_impl='cudnn' needs a GPU, but JAX's backend is 'cpu'"),
    ("cudnn", "gpu", jnp.float32, None, r"needs bfloat16 or float16 inputs, got float32"),
    ("pallas", "cpu", jnp.float32, None, r"attention_impl='pallas' needs a TPU, but JAX's backend is 'cpu'"),
    ("pallas", "tpu", jnp.float32, ((1, 4096, 8, 40), (1, 77, 8, 40)), r"multiples of 128 .* S=77"),
    ("flash", "cpu", jnp.float32, None, r"attention_impl='flash' is not valid; choose one of auto, xla"),
])
def test_unavailable_kernels_are_refused_in_one_line(impl, backend, dtype, shapes, message):
    shapes = shapes or ((1, 256, 8, 40), (1, 256, 8, 40))
    with pytest.raises(ValueError, match=message) as e:
        flash.choose(impl, *shapes, dtype, backend=backend)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
def test_asking_the_cpu_for_a_gpu_or_tpu_kernel_fails_clearly(impl):
    assert jax.default_backend() == "cpu"
    q, k, v, _ = _qkv(0, 1, 16, 16, 2, 8, jnp.bfloat16)
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' needs a"):
        flash.attend(q, k, v, implementation=impl)
    x, ctx = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 7, 24))
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' needs a"):
        _tiny_sd_unet(impl).init(jax.random.key(0), x, jnp.zeros(()), context=ctx)
