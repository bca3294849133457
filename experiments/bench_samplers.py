"""Per-sampler cost on the demo U-Net, against diffusers' schedulers, and the no-recompile proof.

    python experiments/bench_samplers.py [--steps 20] [--batch 16] [--repeats 3] [--out FILE.json]

All in one process on the same machine, with the demo network (the `tiny` class-conditional U-Net
at 16x16x1, random weights: a network's cost does not depend on its weights):

1. for every sampler: the compile time of its whole `--steps`-step loop (trace + lower + XLA
   compile, `sampling.lower(...).compile()`), the run time (median of `--repeats`), and the cost
   per model call; and the same run in PyTorch, diffusers' scheduler of the same method driving
   diffusers' `UNet2DModel` of the same topology (EDM's Algorithm 2 has no diffusers scheduler);
2. a sampling service's request mix through one sampler built with `max_steps`: step counts 10 to
   50, img2img start steps, eta and classifier-free guidance scales all change between requests;
   the network is traced (and the loop compiled) once.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from bench_sampling import median_time as median_seconds, torch_unet
from jaxdiff import config as config_lib
from jaxdiff import data as data_lib
from jaxdiff import samplers, sampling
from jaxdiff.samplers import base
from jaxdiff.train import build

# sampler -> (diffusers scheduler class, its extra options) for the reference runs.
REFERENCES = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "edm": (None, {}),
}


def demo_network(batch: int):
    cfg = config_lib.get_config()
    size = data_lib.resolve_image_size(cfg.data.dataset, cfg.data.image_size)
    image_shape = (size, size, 1)
    module = build.build_model(cfg, image_shape, 10)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1,) + image_shape), jnp.zeros((1,)),
                         jnp.zeros((1,), jnp.int32))["params"]
    return cfg, module, params, image_shape


def _apply(module, params, labels, x, t):
    return module.apply({"params": params}, x, t, labels)


def torch_reference(module, image_shape, batch: int):
    """diffusers' UNet2DModel with the demo network's topology, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    return torch, torch_unet(module, image_shape, module.num_classes), torch.zeros(batch, dtype=torch.long)


def run_reference(ref, scheduler_name, extra, cfg, image_shape, batch, steps, repeats):
    import diffusers

    torch, unet, labels = ref
    d = cfg.diffusion
    sched = getattr(diffusers, scheduler_name)(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.schedule,
                                                beta_start=d.beta_start, beta_end=d.beta_end, **extra)
    x_init = torch.randn(batch, image_shape[-1], *image_shape[:2])
    calls = []

    def run():
        sched.set_timesteps(steps)
        x = x_init * sched.init_noise_sigma
        with torch.inference_mode():
            for t in sched.timesteps:
                out = unet(sched.scale_model_input(x, t), t, class_labels=labels).sample
                x = sched.step(out, t, x).prev_sample
        calls.append(len(sched.timesteps))
        return x

    run()                                                                   # warm-up
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), calls[-1]


def bench_samplers(cfg, module, params, image_shape, args, ref):
    schedule = build.build_schedule(cfg)
    labels = jnp.arange(args.batch, dtype=jnp.int32) % 10
    model_fn = jax.tree_util.Partial(functools.partial(_apply, module), params, labels)
    key = jax.random.PRNGKey(0)
    noise = jax.random.normal(key, (args.batch,) + image_shape)
    rows = {}
    chosen = samplers.names() if not getattr(args, "samplers", None) else args.samplers.split(",")
    for name in chosen:
        if name == "ddim_inverse":
            continue
        sampler = samplers.get(name, schedule, args.steps)
        calls = base.num_model_calls(sampler.plan)
        t0 = time.perf_counter()
        sampling.lower(sampler, model_fn, noise, key).compile()
        compile_s = time.perf_counter() - t0
        sampling.sample(sampler, model_fn, noise, key).block_until_ready()      # warm the jit cache
        run_s = median_seconds(lambda: sampling.sample(sampler, model_fn, noise, key), args.repeats)
        row = {"model_calls": calls, "compile_s": compile_s, "run_s": run_s, "ms_per_call": 1e3 * run_s / calls}
        scheduler_name, extra = REFERENCES.get(name, (None, {}))
        if ref is not None and scheduler_name:
            ref_s, ref_calls = run_reference(ref, scheduler_name, extra, cfg, image_shape, args.batch, args.steps,
                                             args.repeats)
            row.update(diffusers_scheduler=scheduler_name, diffusers_run_s=ref_s, diffusers_model_calls=ref_calls,
                       diffusers_ms_per_call=1e3 * ref_s / ref_calls, speed_vs_diffusers=ref_s / run_s)
        rows[name] = row
        print(f"{name:16s} calls {calls:3d}  compile {compile_s:6.2f} s  run {run_s:6.3f} s  "
              f"{row['ms_per_call']:6.2f} ms/call" + (f"  diffusers {row['diffusers_ms_per_call']:6.2f} ms/call"
                                                       if "diffusers_run_s" in row else ""), flush=True)
    return rows


def bench_request_mix(cfg, module, params, image_shape, args):
    """Many requests, one program: count the network's traces and the loop's compilations."""
    schedule = build.build_schedule(cfg)
    traces = []

    def conditional(module, params, x, t, labels):
        traces.append(1)                                   # runs only while tracing
        return module.apply({"params": params}, x, t, labels)

    network = jax.tree_util.Partial(functools.partial(conditional, module), params)
    key = jax.random.PRNGKey(1)
    noise = jax.random.normal(key, (args.batch,) + image_shape)
    image = jnp.tanh(jax.random.normal(jax.random.PRNGKey(2), noise.shape))
    labels = jnp.arange(args.batch, dtype=jnp.int32) % 10
    null = jnp.full((1,), 10, jnp.int32)
    requests = [dict(num_steps=n, start_step=s, eta=e, guidance_scale=g)
                for n, s, e, g in [(10, 0, 0.0, 1.0), (20, 0, 0.0, 3.0), (50, 0, 0.0, 7.5), (30, 0, 0.5, 2.0),
                                   (30, 12, 0.0, 2.0), (40, 30, 1.0, 5.0), (25, 5, 0.0, 1.5), (50, 49, 0.0, 4.0)]]
    seconds = []
    for r in requests:
        sampler = samplers.get("ddim", schedule, r["num_steps"], max_steps=args.max_steps, eta=r["eta"],
                               start_step=r["start_step"])
        guided = sampling.cfg(network, r["guidance_scale"], labels, null)
        t0 = time.perf_counter()
        sampling.sample(sampler, guided, noise, key, x0=image if r["start_step"] else None).block_until_ready()
        seconds.append(time.perf_counter() - t0)
    return {"requests": requests, "max_steps": args.max_steps, "network_traces": len(traces),
            "first_request_s": seconds[0], "later_requests_s": seconds[1:],
            "note": "every request after the first reuses the compiled loop"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max_steps", type=int, default=50)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--out", default=None, help="also write the results to this JSON file")
    ap.add_argument("--samplers", default=None, help="comma-separated sampler names (default: every sampler)")
    return ap


def run(args) -> dict:
    """The measurement (prints a line per sampler): the results dict `main` prints and writes."""
    cfg, module, params, image_shape = demo_network(args.batch)
    ref = None if args.no_reference else torch_reference(module, image_shape, args.batch)
    results = {"device": str(jax.devices()[0]), "cpu": platform.processor() or platform.machine(),
               "jax": jax.__version__, "batch": args.batch, "steps": args.steps, "image_shape": list(image_shape),
               "params": int(sum(x.size for x in jax.tree.leaves(params)))}
    if ref is not None:
        results.update(torch=ref[0].__version__, torch_threads=ref[0].get_num_threads())
    results["samplers"] = bench_samplers(cfg, module, params, image_shape, args, ref)
    results["request_mix"] = bench_request_mix(cfg, module, params, image_shape, args)
    return results


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
