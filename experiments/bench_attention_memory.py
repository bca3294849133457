"""Whole-network memory of the Stable Diffusion U-Nets with XLA's attention against the blocked
kernel (jaxdiff/models/flash.py), from XLA's `compiled.memory_analysis()`.

    python experiments/bench_attention_memory.py [--models sd15,sdxl] [--pixels 512,768]
        [--batch 8] [--modes inference,training] [--kernels xla,blocked]
        [--dtypes float32,bfloat16] [--remat none,full] [--json rows.json]
    python experiments/bench_attention_memory.py --from-json a.json b.json [--json merged.json]
    python experiments/bench_attention_memory.py --models tiny_sd,tiny_sdxl --pixels 64  # seconds

Compile only, nothing is executed: parameters are ShapeDtypeStructs (jax.eval_shape of init), so
the 2.6B-parameter SDXL U-Net at batch 8 compiles on a laptop. Per configuration:

* inference: one U-Net call, model(x, t, context=[B, 77, context_dim]) (SDXL also text_embeds
  [B, 1280] and time_ids [B, 6]);
* training: loss and gradient wrt the parameters of the eps-prediction MSE of
  `bench_memory.make_loss` (no optimizer: the AdamW state would add the same 2x params to both
  kernels).

Pixels are image sizes; the U-Net sees latents of pixels / 8 (SD-1.5 at 512: 64x64x4). Each
model's default pixel sizes (`DEFAULT_PIXELS`) apply unless --pixels is given. The table gives
XLA's temporaries, arguments (parameters + inputs), outputs (the gradients in training) and
their total (arguments + outputs + temporaries - aliased), in GiB, and the ratio blocked / xla
of the temporaries and of the total for the same row otherwise. The memory is that of the
backend the program is compiled for (the CPU unless JAX_PLATFORMS says otherwise); a GPU
compile fuses differently, so take the CPU figures as the size of what each kernel keeps alive,
not as a GPU's peak. Compile seconds are wall time on whatever machine ran it.

docs/attention_memory.json holds the rows of sd15 at 512 and 768 and sdxl at 1024, batch 8, both
modes, float32 and bfloat16, remat none (and full for float32 training), CPU backend, jax 0.10.2.

`tiny_sd` (2 levels, 32 channels, context 32) and `tiny_sdxl` (the same with SDXL's added
conditioning) are small stand-ins to check the script in seconds.
"""

from __future__ import annotations

import os
import sys

# One host device (bench_memory, imported below, asks for 8 fake ones unless XLA_FLAGS is set).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_memory import abstract_params, example_batch, make_loss, model_kwargs  # noqa: E402
from jaxdiff.models import unet  # noqa: E402

LATENT_FACTOR = 8      # the SD VAEs downsample by 8: 512 pixels -> 64x64 latents
LATENT_CHANNELS = 4
GIB = 2**30

MODELS = dict(unet.CONFIGS) | {
    "tiny_sd": functools.partial(unet.UNet, out_channels=4, in_channels=4, base_channels=32,
                                 channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                                 num_heads=2, num_groups=8, context_dim=32),
}
MODELS["tiny_sdxl"] = functools.partial(MODELS["tiny_sd"], use_linear_projection=True,
                                        addition_embed_dim=16 + 6 * 8, addition_time_embed_dim=8)
DEFAULT_PIXELS = {"sd15": (512, 768), "sd21": (768,), "sdxl": (1024,), "tiny_sd": (64,),
                  "tiny_sdxl": (64,)}


def compile_memory(name: str, pixels: int, batch: int, mode: str, kernel: str, dtype: str,
                   remat: str = "none") -> dict:
    """Compile one configuration (never run it) and return its row of the table."""
    model = MODELS[name](attention_impl=kernel, dtype=jnp.dtype(dtype), remat=remat, dropout=0.0)
    side = pixels // LATENT_FACTOR
    image_shape = (side, side, LATENT_CHANNELS)
    params = abstract_params(model, image_shape)
    batch_abs = example_batch(model, batch, image_shape, as_struct=True)
    if mode == "inference":
        def fn(p, b):
            return model.apply({"params": p}, b["image"], b["t"], **model_kwargs(b))
        args = (params, batch_abs)
    elif mode == "training":
        fn = jax.value_and_grad(make_loss(model))
        args = (params, batch_abs, jax.ShapeDtypeStruct((2,), jnp.uint32))  # a raw PRNG key
    else:
        raise ValueError(f"--modes: unknown mode {mode!r}; choose inference or training")
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)
    return {
        "model": name, "pixels": pixels, "latent": side, "batch": batch, "mode": mode,
        "kernel": kernel, "dtype": jnp.dtype(dtype).name, "remat": remat,
        "params": sum(a.size for a in jax.tree.leaves(params)),
        "temp_bytes": ma.temp_size_in_bytes, "argument_bytes": ma.argument_size_in_bytes,
        "output_bytes": ma.output_size_in_bytes, "alias_bytes": ma.alias_size_in_bytes,
        "total_bytes": total, "compile_s": round(compile_s, 1),
        "backend": jax.default_backend(),
    }


def _key(r: dict) -> tuple:
    return r["model"], r["pixels"], r["batch"], r["mode"], r["dtype"], r["remat"]


def table(rows: list[dict]) -> str:
    """Markdown table of the rows, ratios blocked / xla between rows that differ only in kernel."""
    xla = {_key(r): r for r in rows if r["kernel"] == "xla"}
    lines = [("| model | pixels (latent) | batch | mode | dtype | remat | kernel | temp GiB | "
              "args GiB | out GiB | total GiB | temp blocked/xla | total blocked/xla | compile s |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = xla.get(_key(r)) if r["kernel"] != "xla" else None
        ratio_t = f"{r['temp_bytes'] / ref['temp_bytes']:.3f}" if ref else ""
        ratio_a = f"{r['total_bytes'] / ref['total_bytes']:.3f}" if ref else ""
        lines.append(
            f"| {r['model']} | {r['pixels']} ({r['latent']}x{r['latent']}) | {r['batch']} | "
            f"{r['mode']} | {r['dtype']} | {r['remat']} | {r['kernel']} | "
            f"{r['temp_bytes'] / GIB:.3f} | {r['argument_bytes'] / GIB:.3f} | "
            f"{r['output_bytes'] / GIB:.3f} | {r['total_bytes'] / GIB:.3f} | {ratio_t} | {ratio_a} | "
            f"{r['compile_s']:.0f} |")
    return "\n".join(lines)


def _write(path: str | None, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--models", default="sd15,sdxl", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--pixels", default=None,
                   help="comma-separated image sizes (default per model: "
                        + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in DEFAULT_PIXELS.items()) + ")")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", default="inference,training")
    p.add_argument("--kernels", default="xla,blocked")
    p.add_argument("--dtypes", default="float32", help="compute dtypes, e.g. float32,bfloat16")
    p.add_argument("--remat", default="none", help=f"comma-separated, of {', '.join(unet.REMAT_POLICIES)}; "
                   "applied to training only (inference keeps nothing for a backward pass)")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after each row)")
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="compile nothing: print the table of rows saved by earlier runs")
    return p


def run(args) -> dict:
    """Compile every configuration of `args` (printing each row, rewriting --json after each):
    {"backend", "rows": [...]}. Raises ValueError for an unknown model."""
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        pixel_list = ([int(v) for v in args.pixels.split(",")] if args.pixels
                      else DEFAULT_PIXELS.get(name, (64,)))
        for pixels in pixel_list:
            for mode in args.modes.split(","):
                remats = args.remat.split(",") if mode == "training" else ["none"]
                for dtype in args.dtypes.split(","):
                    for remat in remats:
                        for kernel in args.kernels.split(","):
                            r = compile_memory(name, pixels, args.batch, mode, kernel, dtype, remat)
                            rows.append(r)
                            print(json.dumps(r), flush=True)
                            _write(args.json, rows)
    return {"backend": jax.default_backend(), "rows": rows}


def main() -> None:
    args = parser().parse_args()
    if args.from_json:
        rows = []
        for path in args.from_json:
            with open(path) as f:
                rows.extend(json.load(f))
        print(table(rows))
        _write(args.json, rows)
        return
    try:
        rows = run(args)["rows"]
    except ValueError as e:
        sys.exit(str(e))
    print(f"\nbackend {jax.default_backend()}, jax {jax.__version__}; compile only")
    print(table(rows))


if __name__ == "__main__":
    main()
