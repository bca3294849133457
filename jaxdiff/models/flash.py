"""Memory-efficient attention and the one switch that picks an attention kernel.

`attend(q, k, v, mask=None, implementation="auto")` computes softmax(q k^T / sqrt(D)) v by one of:

    "xla"      jax.nn.dot_product_attention's XLA path: forms the [B, N, T, S] logits.
    "blocked"  `blocked_attention` below: online softmax over key blocks (Milakov & Gimelshein
               2018; Rabe & Staats 2021; Dao et al. 2022, FlashAttention), never forms the full
               logits, on every backend.
    "cudnn"    jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused kernel (GPU,
               bfloat16/float16 inputs).
    "pallas"   the Pallas TPU flash-attention kernel (TPU; T and S multiples of 128, no mask).
    "auto"     by backend and size: cudnn on GPU when its dtype rules allow, pallas on TPU when
               the lengths allow, otherwise blocked when one call's logits would exceed
               AUTO_BLOCKED_BYTES (on the CPU already when T and S are both >= 512),
               else xla.

Blocked forward, per query block i and key block j (float32 statistics, m: running max, l:
running sum, acc: running weighted sum):

    s_ij = q_i k_j^T / sqrt(D)                      [B, N, bq, bk]
    m' = max(m, rowmax(s_ij));  p = exp(s_ij - m')
    l = l e^(m - m') + rowsum(p);  acc = acc e^(m - m') + p v_j;  m = m'
    o_i = acc / l;  lse_i = m + log l               (lse kept for the backward pass)

Gradients come from a custom VJP that recomputes each block's probabilities from the saved
log-sum-exp, p_ij = exp(s_ij - lse_i), instead of differentiating through the scan: JAX's
transpose of a scan would store every step's [bq, bk] probabilities (the full logits again),
and rematerialising the scan body would still keep one [T, D] accumulator per key block. The
custom VJP keeps only q, k, v, o and lse ([B, N, T]):

    delta_i = rowsum(do_i * o_i)
    dv_j += p_ij^T do_i;  dp = do_i v_j^T;  ds = p_ij (dp - delta_i) / sqrt(D)
    dq_i += ds k_j;  dk_j += ds^T q_i

Lengths that do not divide the block sizes are padded; padded keys are masked out and padded
queries dropped. A query whose every key is masked gets zeros. Without a mask and with S a
multiple of the key block, no masking is traced at all.

On the CPU the [B, N, bq, bk] float32 blocks outgrow the caches, so the kernel is written to pass
over each as few times as it can (three: the product writes it, the row max reads it, one fused
exp applies the 1/sqrt(D) scale and writes p; the row sum rides on the p v product as a column
of ones in v). SD-1.5's 64x64 self-attention in bfloat16 at batch 4 takes 0.42 s this way
against 0.81 s with a separate scale, sum, cast and mask pass each.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxdiff.models import conv as conv_lib

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn", "pallas")
# "auto" switches from xla to blocked when one call's float32 logits (B * N * T * S * 4 bytes)
# exceed this, and on the CPU already when both lengths fill a block of 512: there the blocked
# kernel is the faster one from that size up (experiments/bench_attention.py).
AUTO_BLOCKED_BYTES = 256 * 2**20
CPU_BLOCKED_MIN_LENGTH = 512
BLOCK_Q = 512
BLOCK_K = 512
_NEG = -1e30  # a finite "minus infinity": exp(_NEG - m) is 0 and never NaN


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _blocks(x: Array, size: int) -> Array:
    """[B, N, L, D] (L a multiple of size) -> [L / size, B, N, size, D]."""
    B, N, L, D = x.shape
    return x.reshape(B, N, L // size, size, D).transpose(2, 0, 1, 3, 4)


def _unblocks(x: Array) -> Array:
    """[nb, B, N, size, ...] -> [B, N, nb * size, ...]."""
    nb, B, N, size = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape(B, N, nb * size, *x.shape[4:])


def _logits(qb: Array, kb: Array, keep: Array | None) -> Array:
    """qb: [B, N, bq, D], kb: [B, N, bk, D], keep: [B, bk] or None -> float32 [B, N, bq, bk],
    unscaled (the 1/sqrt(D) is applied inside the exponentials, where it fuses for free)."""
    s = jnp.einsum("bnqd,bnkd->bnqk", qb, kb, preferred_element_type=jnp.float32)
    return s if keep is None else jnp.where(keep[:, None, None, :], s, _NEG)


def _key_blocks(k: Array, v: Array, keep: Array | None, bk: int) -> tuple:
    """The scan inputs over key blocks: k and v as [nk, B, N, bk, D] and keep [B, Sp] as
    [nk, B, bk] (left out when None)."""
    blocks = (_blocks(k, bk), _blocks(v, bk))
    if keep is None:
        return blocks
    return (*blocks, keep.reshape(keep.shape[0], -1, bk).transpose(1, 0, 2))


def _forward(q, k, v, keep, bq, bk):
    """q: [B, N, Tp, D], k, v: [B, N, Sp, D], keep: [B, Sp] or None (every key kept)
    -> o [B, N, Tp, D], lse [B, N, Tp] (of the scaled logits).

    Per key block the [B, N, bq, bk] float32 logits are passed over three times: written by the
    product, read for the row max, read once more by one fused exp (scale included) that writes
    p in v's dtype. The row sum l comes out of the p v product (v's last column is ones), not a
    fourth pass: in bfloat16 it then sums the same rounded p that multiplies v."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    D = v.shape[-1]                                              # acc carries [p v | l]
    ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)                # so p [v | 1] = [p v | sum_k p]
    xs = _key_blocks(k, jnp.concatenate([v, ones], -1), keep, bk)

    def one_query_block(qb):                                     # [B, N, bq, D]
        def step(carry, blk):
            m, acc = carry                                       # raw-logit max, [p v | l]
            kb, vb, kp = blk if keep is not None else (*blk, None)
            s = _logits(qb, kb, kp)                              # [B, N, bq, bk]
            m_new = jnp.maximum(m, s.max(-1))                    # [B, N, bq]
            p = jnp.exp((s - m_new[..., None]) * scale)
            if kp is not None:
                p = jnp.where(kp[:, None, None, :], p, 0.0)      # fully masked rows stay 0
            corr = jnp.exp((m - m_new) * scale)
            acc = acc * corr[..., None] + jnp.einsum(
                "bnqk,bnkd->bnqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return (m_new, acc), None

        B, N = qb.shape[:2]
        init = (jnp.full((B, N, bq), _NEG, jnp.float32), jnp.zeros((B, N, bq, D + 1), jnp.float32))
        (m, acc), _ = jax.lax.scan(step, init, xs)
        l = acc[..., D]
        safe = jnp.where(l > 0, l, 1.0)
        o = acc[..., :D] / safe[..., None]                       # [B, N, bq, D]
        lse = jnp.where(l > 0, m * scale + jnp.log(safe), jnp.inf)  # inf: p = exp(s - inf) = 0
        return o.astype(qb.dtype), lse

    o, lse = jax.lax.map(one_query_block, _blocks(q, bq))        # [nq, B, N, bq, (D)]
    return _unblocks(o), _unblocks(lse)


def _backward(q, k, v, keep, o, lse, do, bq, bk):
    """Gradients wrt q, k, v (see the module docstring), each in its input's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # [B, N, Tp]
    qbs, dobs = _blocks(q, bq), _blocks(do, bq)                  # [nq, B, N, bq, D]
    lses = _blocks(lse[..., None], bq)[..., 0]                   # [nq, B, N, bq]
    deltas = _blocks(delta[..., None], bq)[..., 0]               # [nq, B, N, bq]
    xs = _key_blocks(k, v, keep, bk)

    def one_key_block(dq, blk):                                  # dq: [nq, B, N, bq, D] float32
        kb, vb, kp = blk if keep is not None else (*blk, None)   # [B, N, bk, D], [B, bk]

        def step(carry, qblk):
            dk, dv = carry
            qb, dob, lseb, deltab = qblk
            s = _logits(qb, kb, kp)                              # [B, N, bq, bk]
            p = jnp.exp(s * scale - lseb[..., None])             # the forward's probabilities
            f32 = {"preferred_element_type": jnp.float32}
            dv = dv + jnp.einsum("bnqk,bnqd->bnkd", p.astype(dob.dtype), dob, **f32)
            dp = jnp.einsum("bnqd,bnkd->bnqk", dob, vb, **f32)
            ds = (p * (dp - deltab[..., None]) * scale)          # [B, N, bq, bk] float32
            dqb = jnp.einsum("bnqk,bnkd->bnqd", ds.astype(kb.dtype), kb, **f32)
            dk = dk + jnp.einsum("bnqk,bnqd->bnkd", ds.astype(qb.dtype), qb, **f32)
            return (dk, dv), dqb

        zeros = jnp.zeros(kb.shape, jnp.float32)
        (dk, dv), dqs = jax.lax.scan(step, (zeros, zeros), (qbs, dobs, lses, deltas))
        return dq + dqs, (dk, dv)

    dq0 = jnp.zeros(qbs.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, xs)
    return (_unblocks(dq).astype(q.dtype), _unblocks(dk).astype(k.dtype),
            _unblocks(dv).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, keep, bq, bk):
    return _forward(q, k, v, keep, bq, bk)[0]


def _flash_fwd(q, k, v, keep, bq, bk):
    o, lse = _forward(q, k, v, keep, bq, bk)
    return o, (q, k, v, keep, o, lse)


def _flash_bwd(bq, bk, res, do):
    q, k, v, keep, o, lse = res
    dq, dk, dv = _backward(q, k, v, keep, o, lse, do, bq, bk)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blocked_attention(q: Array, k: Array, v: Array, mask: Array | None = None, *,
                      block_q: int | None = None, block_k: int | None = None) -> Array:
    """Attention without the full logits (see the module docstring); differentiable.

    q: [B, T, N, D], k, v: [B, S, N, D], mask: [B, S] bool (True: attend to this key) or None
    -> [B, T, N, D] in q's dtype. Logits, softmax statistics and accumulation are float32.
    block_q / block_k: block lengths (default BLOCK_Q / BLOCK_K, read at trace time).
    """
    B, T = q.shape[:2]
    S = k.shape[1]
    bq, bk = min(block_q or BLOCK_Q, T), min(block_k or BLOCK_K, S)
    keep = None                                                  # every key counts: no masking
    if mask is not None or S % bk:
        keep = jnp.ones((B, S), bool) if mask is None else jnp.broadcast_to(mask, (B, S)).astype(bool)
        keep = _pad_to(keep, 1, bk)                              # padded keys: False
    qt = _pad_to(q.transpose(0, 2, 1, 3), 2, bq)                 # [B, N, Tp, D]
    kt = _pad_to(k.transpose(0, 2, 1, 3), 2, bk)                 # [B, N, Sp, D]
    vt = _pad_to(v.transpose(0, 2, 1, 3), 2, bk)                 # [B, N, Sp, D]
    o = _flash(qt, kt, vt, keep, bq, bk)                         # [B, N, Tp, D]
    return o[:, :, :T].transpose(0, 2, 1, 3)                     # [B, T, N, D]


def choose(implementation: str, q_shape, k_shape, dtype, *, masked: bool = False,
           backend: str | None = None) -> str:
    """The concrete kernel ("xla", "blocked", "cudnn" or "pallas") for these shapes on `backend`
    (default: JAX's default backend). Raises a one-line ValueError for an unknown name or a
    kernel this backend / these inputs cannot run."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={implementation!r} is not valid; choose one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    backend = backend or jax.default_backend()
    (B, T, N, D), S = q_shape, k_shape[1]
    half = conv_lib.low_precision(dtype)
    tpu_ok = T % 128 == 0 and S % 128 == 0 and not masked
    if implementation == "cudnn":
        if backend != "gpu":
            raise ValueError(f"attention_impl='cudnn' needs a GPU, but JAX's backend is "
                             f"{backend!r}; use 'auto', 'blocked' or 'xla'")
        if not half:
            raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 inputs, got "
                             f"{jnp.dtype(dtype).name}; set the model dtype or use 'blocked'")
    if implementation == "pallas":
        if backend != "tpu":
            raise ValueError(f"attention_impl='pallas' needs a TPU, but JAX's backend is "
                             f"{backend!r}; use 'auto', 'blocked' or 'xla'")
        if not tpu_ok:
            raise ValueError(f"attention_impl='pallas' needs T and S multiples of 128 and no "
                             f"mask, got T={T}, S={S}, mask={masked}; use 'blocked'")
    if implementation != "auto":
        return implementation
    if backend == "gpu" and half and D <= 128:
        return "cudnn"
    if backend == "tpu" and tpu_ok:
        return "pallas"
    if backend == "cpu" and min(T, S) >= CPU_BLOCKED_MIN_LENGTH:
        return "blocked"
    return "blocked" if B * N * T * S * 4 > AUTO_BLOCKED_BYTES else "xla"


def _pallas(q: Array, k: Array, v: Array) -> Array:
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    def t(a):  # [B, L, N, D] <-> [B, N, L, D]
        return a.transpose(0, 2, 1, 3)

    o = tpu_flash.flash_attention(t(q), t(k), t(v), sm_scale=1.0 / math.sqrt(q.shape[-1]))
    return t(o)


def attend(q: Array, k: Array, v: Array, mask: Array | None = None, *,
           implementation: str = "auto") -> Array:
    """softmax(q k^T / sqrt(D)) v by the chosen kernel.

    q: [B, T, N, D], k, v: [B, S, N, D], mask: [B, S] bool key mask (True: attend) or None
    -> [B, T, N, D] in q's dtype.
    """
    impl = choose(implementation, q.shape, k.shape, q.dtype, masked=mask is not None)
    if impl == "blocked":
        return blocked_attention(q, k, v, mask)
    if impl == "pallas":
        return _pallas(q, k, v)
    m = None if mask is None else mask[:, None, None, :].astype(bool)  # [B, 1, 1, S]
    return jax.nn.dot_product_attention(q, k, v, mask=m, implementation=impl)
