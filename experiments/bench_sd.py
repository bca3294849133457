"""Stable-Diffusion-sized U-Net: seconds per denoising step, jaxdiff vs diffusers, same machine.

    python experiments/bench_sd.py [--model sd15] [--latent 64] [--batches 1,4] [--repeats 3]
                                   [--dtype float32|bfloat16] [--torch-compile] [--out FILE.json]

One process, one machine: diffusers' `UNet2DConditionModel` is built from the config jaxdiff
exports for `--model` (real SD 1.5 shapes, 859.5M parameters, random weights: the cost of a
network does not depend on its weights), its weights are converted to jaxdiff's tree, and then
for each batch size B:

- jaxdiff: the compile time of the jitted U-Net call (trace + lower + XLA compile) and the
  median wall time of one call on latents [B, 64, 64, 4] with a [B, 77, 768] text context;
- diffusers: the median wall time of the same call in PyTorch (`torch.inference_mode`);
- the two outputs' relative difference (a check that both ran the same network).

A denoising step of a text-to-image sampler is one such call at batch 2B (classifier-free
guidance batches the conditional and unconditional halves) plus a few elementwise operations.
On a GPU machine pass `--dtype bfloat16` for jaxdiff's bf16 compute (torch then runs bf16 too).
In bf16 jaxdiff is handed its weight matrices already in bf16 (`core.cast_weights`), as a bf16
pipeline holds them during a request (torch's bf16 module holds bf16 weights too). Every row also
times the same call traced under `conv.formulation("xla")` (XLA's own convolutions and bf16
dots, the choice before `models/conv.py` picked formulations per shape), and the timed calls are
interleaved (one round calls each once), so a load that changes mid-run hits them alike.
`--torch-compile` also times the diffusers U-Net under `torch.compile` (its first call, which
compiles, apart; where it fails, the row says why in one line). `--model tiny_sd` (2 levels,
32 channels) checks the script in seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_sampling import interleaved_medians, median_time as median_seconds

from jaxdiff import compiler
from jaxdiff.convert import unet as unet_convert
from jaxdiff.models import conv as conv_lib
from jaxdiff.models import unet as unet_lib
from jaxdiff.pipelines import core

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# The Stable Diffusion U-Nets, and a tiny one of the same topology to check the script in seconds.
MODELS = {k: v for k, v in unet_lib.CONFIGS.items() if k.startswith("sd")} | {
    "tiny_sd": functools.partial(unet_lib.UNet, out_channels=4, in_channels=4, base_channels=32,
                                 channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                                 num_heads=2, num_groups=8, context_dim=32),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15", choices=sorted(MODELS))
    ap.add_argument("--latent", type=int, default=64, help="latent height = width (64 for 512x512 images)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--torch-compile", action="store_true",
                    help="also time the diffusers U-Net under torch.compile (its compile time apart)")
    return ap


def run(args) -> dict:
    """The measurement (prints a line per batch): the results dict `main` prints and writes."""
    import torch
    from diffusers import UNet2DConditionModel

    module = MODELS[args.model](dtype=DTYPES[args.dtype])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ref = UNet2DConditionModel(**unet_convert.config_to_diffusers(module)).eval()
    torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = ref.to(device) if torch_dtype == torch.float32 else ref.to(device=device, dtype=torch_dtype)
    params = jax.device_put(unet_convert.params_from_torch(                  # device arrays, as a pipeline
        {k: v.float().cpu().numpy() for k, v in ref.state_dict().items()}, module))  # holds them
    setup_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    results = {"model": args.model, "params": n_params, "latent": [args.latent, args.latent, module.out_channels],
               "dtype": args.dtype, "jax": jax.__version__, "jax_device": str(jax.devices()[0]),
               "torch": torch.__version__, "torch_device": device, "torch_threads": torch.get_num_threads(),
               "cpu": platform.processor() or platform.machine(), "setup_s": setup_s, "batches": {}}

    def call(params, x, t, context):
        return module.apply({"params": params}, x, t, context=context)

    if args.dtype == "bfloat16":
        params = core.cast_weights(params, jnp.bfloat16)                   # as a bf16 pipeline holds them

    rng = np.random.RandomState(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        x = rng.randn(batch, args.latent, args.latent, module.out_channels).astype(np.float32)
        t = np.full((batch,), 500.0, np.float32)
        ctx = rng.randn(batch, 77, module.context_dim).astype(np.float32)
        xj, tj, cj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)
        t0 = time.perf_counter()
        compiled = compiler.jit(call).lower(params, xj, tj, cj).compile()
        compile_s = time.perf_counter() - t0
        with conv_lib.formulation("xla"):   # a new function object: jit would reuse `call`'s trace
            baseline = compiler.jit(lambda *a: call(*a)).lower(params, xj, tj, cj).compile()
        out = np.asarray(compiled(params, xj, tj, cj), np.float32)            # warm-up
        base_out = np.asarray(baseline(params, xj, tj, cj), np.float32)
        fns = {"jaxdiff": lambda: compiled(params, xj, tj, cj).block_until_ready(),
               "xla": lambda: baseline(params, xj, tj, cj).block_until_ready()}
        row = {"jaxdiff_compile_s": compile_s}
        if not args.no_reference:
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).to(device, torch_dtype)
            tt = torch.from_numpy(t).to(device)
            ct = torch.from_numpy(ctx).to(device, torch_dtype)

            def torch_call():
                with torch.inference_mode():
                    y = ref(xt, tt, encoder_hidden_states=ct).sample
                if device == "cuda":
                    torch.cuda.synchronize()
                return y

            ref_out = torch_call().float().cpu().numpy().transpose(0, 2, 3, 1)  # warm-up
            fns["torch"] = torch_call
        med = interleaved_medians(fns, args.repeats)
        jax_s = med["jaxdiff"]
        row.update(jaxdiff_s_per_call=jax_s, jaxdiff_xla_formulation_s_per_call=med["xla"],
                   formulation_speedup=med["xla"] / jax_s,
                   formulation_rel_diff=float(np.linalg.norm(out - base_out) / np.linalg.norm(base_out)))
        if not args.no_reference:
            torch_s = med["torch"]
            rel = float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out))
            row.update(diffusers_s_per_call=torch_s, jaxdiff_speed_vs_diffusers=torch_s / jax_s,
                       output_rel_diff=rel)
            if args.torch_compile:
                row.update(_torch_compiled(torch, ref, xt, tt, ct, device, args.repeats, jax_s))
        results["batches"][str(batch)] = row
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in row.items()), flush=True)
    return results


def _torch_compiled(torch, ref, xt, tt, ct, device, repeats, jax_s) -> dict:
    """torch.compile of the diffusers U-Net: its first call (compilation) and the median call, or
    the one-line reason it did not work here."""
    try:
        compiled = torch.compile(ref)

        def call():
            with torch.inference_mode():
                y = compiled(xt, tt, encoder_hidden_states=ct).sample
            if device == "cuda":
                torch.cuda.synchronize()
            return y

        t0 = time.perf_counter()
        call()
        compile_s = time.perf_counter() - t0
        seconds = median_seconds(call, repeats)
    except Exception as e:  # an unsupported platform or compiler: say so, keep the eager figures
        return {"diffusers_compiled_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    return {"diffusers_compiled_first_call_s": compile_s, "diffusers_compiled_s_per_call": seconds,
            "jaxdiff_speed_vs_diffusers_compiled": seconds / jax_s}


def main():
    args = parser().parse_args()
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
