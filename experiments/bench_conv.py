"""3x3 convolutions on this machine: XLA's convolution against the same sum as 2-D matmuls.

    python experiments/bench_conv.py [--net sd15,cifar,demo] [--dtype float32] [--repeats 5]
                                     [--impls xla,im2col,shifted,winograd] [--no-torch] [--grad]

For every distinct 3x3 convolution shape of the SD-1.5 U-Net (batch 1, 64x64 latents), of the demo
U-Net (batch 64, 16x16) and of the
DDPM CIFAR-10 U-Net (batch 16, 32x32), times the forward (and with --grad the forward plus the
gradients with respect to input and kernel) of each formulation of `jaxdiff.models.conv.conv2d`
and of `torch.nn.functional.conv2d` on the same data. The calls are interleaved (one round runs
every formulation once) and the medians over rounds reported, so a load that changes during the
run hits all of them alike. Prints one markdown row per shape: ms per call and speed vs XLA.
"winograd" runs one product per tap ("shifted") on the layers it does not cover (stride 2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler
from jaxdiff.models.conv import conv2d

# (name, batch, H, C_in, C_out, stride): the 3x3 convolutions of each network, one per shape.
SHAPES = {
    "sd15": [
        ("conv_in", 1, 64, 4, 320, 1),
        ("L0 res", 1, 64, 320, 320, 1),
        ("L0 down", 1, 64, 320, 320, 2),
        ("L1 res", 1, 32, 640, 640, 1),
        ("L1 in", 1, 32, 320, 640, 1),
        ("L2 res", 1, 16, 1280, 1280, 1),
        ("L3 res", 1, 8, 1280, 1280, 1),
        ("up L0 in", 1, 64, 640, 320, 1),
    ],
    "demo": [
        ("conv_in", 64, 16, 1, 16, 1),
        ("L0 res", 64, 16, 16, 16, 1),
        ("L0 down", 64, 16, 16, 16, 2),
        ("L1 res", 64, 8, 32, 32, 1),
        ("L1 in", 64, 8, 16, 32, 1),
        ("L2 res", 64, 4, 64, 64, 1),
        ("up L0 in", 64, 16, 48, 16, 1),
        ("up L1 in", 64, 8, 96, 32, 1),
    ],
    "cifar": [
        ("L0 res", 16, 32, 128, 128, 1),
        ("L0 down", 16, 32, 128, 128, 2),
        ("L1 res", 16, 16, 256, 256, 1),
        ("L2 res", 16, 8, 256, 256, 1),
        ("L3 res", 16, 4, 256, 256, 1),
        ("up L0 in", 16, 32, 256, 128, 1),
    ],
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build(impl: str, stride: int, grad: bool):
    pad = ((1, 1), (1, 1))

    def fwd(x, w):
        return conv2d(x, w, strides=(stride, stride), padding=pad, impl=impl)

    if not grad:
        return compiler.jit(fwd)

    def loss(x, w, g):
        return jnp.sum(fwd(x, w).astype(jnp.float32) * g)

    return compiler.jit(jax.grad(loss, argnums=(0, 1)))


def torch_fn(x, w, b, stride, grad, torch_dtype):
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(torch_dtype)
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).to(torch_dtype)
    if not grad:
        def run():
            with torch.inference_mode():
                return F.conv2d(xt, wt, stride=stride, padding=1)
        return run
    xt.requires_grad_(True)
    wt.requires_grad_(True)
    gt = None

    def run():
        nonlocal gt
        y = F.conv2d(xt, wt, stride=stride, padding=1)
        if gt is None:
            gt = torch.ones_like(y)
        xt.grad = wt.grad = None
        y.backward(gt)
        return xt.grad
    return run


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="sd15,cifar")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--impls", default="xla,im2col,shifted,winograd")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grad", action="store_true", help="time forward + input and kernel gradients")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated shape names to keep")
    return ap


def run(args) -> dict:
    """The measurement (prints the markdown rows as it goes): {"dtype", "grad", "rows": [one per
    shape: net, layer, shape, gflop, ms per formulation]}."""
    rows = []
    dtype = DTYPES[args.dtype]
    impls = args.impls.split(",")
    torch_dtype = None
    if not args.no_torch:
        import torch
        torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"jax {jax.__version__} on {jax.devices()[0]}; {args.dtype}; "
          f"{'fwd+grad' if args.grad else 'forward'}; medians of {args.repeats} interleaved rounds")
    cols = impls + ([] if args.no_torch else ["torch"])
    print("| net | layer | shape (B, H, Cin->Cout, s) | GFLOP | " + " | ".join(f"{c} ms" for c in cols)
          + " | " + " | ".join(f"{c} vs xla" for c in cols if c != "xla") + " |")
    print("|---" * (4 + 2 * len(cols) - ("xla" in cols)) + "|")
    rng = np.random.RandomState(0)
    for net in args.net.split(","):
        for name, B, H, C, O, s in SHAPES[net]:
            if args.only and name not in args.only.split(","):
                continue
            x = rng.randn(B, H, H, C).astype(np.float32)
            w = (rng.randn(3, 3, C, O) / np.sqrt(9 * C)).astype(np.float32)
            ho = (H + 2 - 3) // s + 1
            flops = 2.0 * B * ho * ho * O * 9 * C * (3 if args.grad else 1)
            xj, wj = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
            g = jnp.ones((B, ho, ho, O), jnp.float32)
            fns = {}
            for impl in impls:
                f = build(impl, s, args.grad)
                operands = (xj, wj, g) if args.grad else (xj, wj)
                call = lambda f=f, operands=operands: f(*operands)
                jax.block_until_ready(call())  # compile + warm-up
                fns[impl] = lambda call=call: jax.block_until_ready(call())
            if not args.no_torch:
                fns["torch"] = torch_fn(x, w, None, s, args.grad, torch_dtype)
                fns["torch"]()
            times = {c: [] for c in cols}
            for _ in range(args.repeats):
                for c in cols:
                    t0 = time.perf_counter()
                    fns[c]()
                    times[c].append(time.perf_counter() - t0)
            med = {c: statistics.median(t) * 1e3 for c, t in times.items()}
            ref = med.get("xla", float("nan"))
            print(f"| {net} | {name} | ({B}, {H}, {C}->{O}, {s}) | {flops / 1e9:.2f} | "
                  + " | ".join(f"{med[c]:.1f}" for c in cols) + " | "
                  + " | ".join(f"{ref / med[c]:.2f}x" for c in cols if c != "xla") + " |", flush=True)
            rows.append({"net": net, "layer": name, "shape": [B, H, C, O, s], "gflop": flops / 1e9, "ms": med})
    return {"dtype": args.dtype, "grad": bool(args.grad), "repeats": args.repeats, "rows": rows}


def main():
    run(parser().parse_args())


if __name__ == "__main__":
    main()
