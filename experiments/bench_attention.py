"""Attention kernels at Stable Diffusion sizes: XLA's plain attention against the blocked
(online-softmax) kernel of jaxdiff/models/flash.py.

    python experiments/bench_attention.py [--impls xla,blocked] [--batch 1,2] [--reps 3]
                                          [--cases sd15_self,sd15_cross,sd15_96_self,sd15_96_cross]
                                          [--dtype float32] [--json out.json]

For each case (SD 1.5's first level: 8 heads of 40 channels; 64x64 latents give T = 4096 tokens,
96x96 latents T = 9216, and the second level of 64x64 latents T = 1024; self-attention has S = T, cross-attention S = 77 text tokens), batch and
kernel it prints the median wall time of the jitted forward and forward + backward (gradients
wrt q, k, v) over --reps runs after one warm-up, and the temporary bytes XLA's
`memory_analysis()` reports for each compiled program (programs whose temporaries exceed
--max-run-mib are compiled but not run: their time shows as nan). Times are only comparable within one run
on one machine; the memory figures are properties of the compiled programs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jaxdiff.models import flash

HEADS, HEAD_DIM = 8, 40
CASES = {  # name: (T, S)
    "sd15_self": (4096, 4096),
    "sd15_32_self": (1024, 1024),
    "sd15_cross": (4096, 77),
    "sd15_96_self": (9216, 9216),
    "sd15_96_cross": (9216, 77),
}


def _programs(impl: str):
    attn = lambda q, k, v: flash.attend(q, k, v, implementation=impl)

    def fwd_bwd(q, k, v):
        out, pull = jax.vjp(attn, q, k, v)
        return pull(jnp.ones_like(out))

    return jax.jit(attn), jax.jit(fwd_bwd)


def _measure(fn, args, reps: int, max_run_mib: float) -> tuple[float, float]:
    """(median seconds, temp MiB) of a jitted function on `args`; the time is NaN (not run) when
    the program's temporaries exceed max_run_mib."""
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = float("nan") if mem is None else mem.temp_size_in_bytes / 2**20
    if temp > max_run_mib:
        return float("nan"), temp
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), temp


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", default="xla,blocked")
    p.add_argument("--batch", default="1,2")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None)
    p.add_argument("--max-run-mib", type=float, default=4096.0,
                   help="compile but do not run programs whose temporaries exceed this")
    return p


def run(args) -> dict:
    """The measurement (prints the table as it goes): {"backend", "dtype", "rows": [...]}."""
    dtype = jnp.dtype(args.dtype)
    rows = []
    print(f"backend {jax.default_backend()}, {HEADS} heads x {HEAD_DIM}, {dtype.name}, "
          f"median of {args.reps}")
    print(f"{'case':<14} {'B':>2} {'T':>5} {'S':>5} {'impl':<8} {'fwd s':>8} {'fwd+bwd s':>10} "
          f"{'fwd temp MiB':>13} {'f+b temp MiB':>13}")
    for case in args.cases.split(","):
        T, S = CASES[case]
        for B in (int(b) for b in args.batch.split(",")):
            keys = jax.random.split(jax.random.key(0), 3)
            q = jax.random.normal(keys[0], (B, T, HEADS, HEAD_DIM), dtype)
            k = jax.random.normal(keys[1], (B, S, HEADS, HEAD_DIM), dtype)
            v = jax.random.normal(keys[2], (B, S, HEADS, HEAD_DIM), dtype)
            for impl in args.impls.split(","):
                fwd, fb = _programs(impl)
                t_f, m_f = _measure(fwd, (q, k, v), args.reps, args.max_run_mib)
                t_b, m_b = _measure(fb, (q, k, v), args.reps, args.max_run_mib)
                rows.append({"case": case, "B": B, "T": T, "S": S, "impl": impl, "fwd_s": t_f,
                             "fwd_bwd_s": t_b, "fwd_temp_mib": m_f, "fwd_bwd_temp_mib": m_b})
                print(f"{case:<14} {B:>2} {T:>5} {S:>5} {impl:<8} {t_f:>8.3f} {t_b:>10.3f} "
                      f"{m_f:>13.1f} {m_b:>13.1f}", flush=True)
    return {"backend": jax.default_backend(), "dtype": dtype.name, "heads": HEADS, "head_dim": HEAD_DIM,
            "rows": rows}


def main() -> None:
    args = parser().parse_args()
    rows = run(args)["rows"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
