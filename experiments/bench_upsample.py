"""Upsampling layers on this machine: nearest x2 + 3x3 convolution folded onto the low-resolution
map (`conv.upsample_conv`, four 2x2 convolutions) against upsampling first and convolving.

    python experiments/bench_upsample.py [--repeats 7] [--grad]

For the `Upsample` layers of the SD-1.5 U-Net (batch 1), its VAE decoder at 512 pixels (batch 1)
and the DDPM CIFAR-10 U-Net (batch 16 as two halves of 8), times `layers.Upsample` under "auto"
(folded where `conv.upsample_phases` says so) and under `conv.formulation("xla")` (upsample, then
XLA's convolution: the layer before the fold), interleaved rounds, medians. --grad times the
forward plus the gradients of input and parameters. Prints one markdown row per shape.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench_sampling import interleaved_medians  # a sibling script, not a package
from jaxdiff import compiler
from jaxdiff.models import conv, layers

# (network, batch, H, channels) of the low-resolution map each Upsample receives.
SHAPES = [("sd15", 1, 8, 1280), ("sd15", 1, 16, 1280), ("sd15", 1, 32, 640),
          ("sd_vae", 1, 64, 512), ("sd_vae", 1, 128, 512), ("sd_vae", 1, 256, 256),
          ("cifar", 8, 4, 256), ("cifar", 8, 8, 256), ("cifar", 8, 16, 256)]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--grad", action="store_true", help="forward plus gradients")
    ap.add_argument("--max-pixels", type=int, default=256, help="skip maps larger than this (H)")
    return ap


def run(args) -> dict:
    rows = []
    print("| network | input [B, H, H, C] | folded (ms) | upsample + conv (ms) | speed-up | folded |\n"
          "|---|---|---|---|---|---|")
    for net, B, H, C in SHAPES:
        if H > args.max_pixels:
            continue
        rng = np.random.RandomState(0)
        x = jnp.asarray(rng.randn(B, H, H, C), jnp.float32)
        m = layers.Upsample(C)
        params = m.init(jax.random.PRNGKey(0), x[:1, :2, :2])
        if args.grad:
            def f(p, x):
                return jax.grad(lambda p, x: jnp.sum(m.apply(p, x) ** 2), argnums=(0, 1))(p, x)
        else:
            def f(p, x):
                return m.apply(p, x)
        folded = compiler.jit(lambda p, x: f(p, x))
        with conv.formulation("xla"):
            plain = compiler.jit(lambda p, x: f(p, x))
            jax.block_until_ready(plain(params, x))              # traced under "xla"
        jax.block_until_ready(folded(params, x))
        t = interleaved_medians({"folded": lambda: folded(params, x), "plain": lambda: plain(params, x)},
                                args.repeats)
        on = conv.upsample_phases(x.shape, (3, 3, C, C), jnp.float32)
        rows.append({"net": net, "shape": [B, H, H, C], "folded_ms": t["folded"] * 1e3,
                     "plain_ms": t["plain"] * 1e3, "folded_here": on})
        print(f"| {net} | {B}x{H}x{H}x{C} | {t['folded'] * 1e3:.1f} | {t['plain'] * 1e3:.1f} | "
              f"{t['plain'] / t['folded']:.2f}x | {'yes' if on else 'no'} |", flush=True)
    return {"grad": args.grad, "rows": rows}


def main():
    run(parser().parse_args())


if __name__ == "__main__":
    main()
