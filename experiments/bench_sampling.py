"""Sampling benchmark: compile time vs number of steps, scan loop vs Python loop, and diffusers.

    python experiments/bench_sampling.py [--checkpoint runs/digits] [--batch 64] [--repeats 5]

All in one process on the same machine:
1. compile time of the whole DDIM sampling loop with 10 and with 200 steps (trace + XLA compile,
   from `jit(...).lower(...).compile()`): the network is traced once inside one `lax.scan`, so the
   two should cost the same;
2. throughput of the demo model (DDIM, 50 steps): the compiled scan vs a Python loop that calls a
   jitted single step 50 times;
3. the reference: diffusers' `UNet2DModel` of the same topology driven by `DDIMScheduler` for 50
   steps in PyTorch on the CPU (skipped when torch/diffusers are not installed).

Medians over `--repeats` rounds; each round runs 2 and 3 once each (interleaved), so a load that
changes during the run hits jaxdiff and the reference alike. Weights are random unless
`--checkpoint` is given: the cost of a network does not depend on its weights.
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
import numpy as np

from jaxdiff import compiler
from jaxdiff import config as config_lib
from jaxdiff import samplers, sampling
from jaxdiff.samplers import base
from jaxdiff.train import build


def demo_model(checkpoint: str | None):
    """(DiffusionModel-like parts): module, params, schedule, image shape, num_classes."""
    if checkpoint:
        import jaxdiff
        m = jaxdiff.load(checkpoint)
        return m.module, m.ema_params, m.schedule, m.image_shape
    cfg = config_lib.get_config()
    image_shape, num_classes = (28, 28, 1), 10
    module = build.build_model(cfg, image_shape, num_classes)
    x = jnp.zeros((1,) + image_shape)
    params = module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    return module, params, build.build_schedule(cfg), image_shape


def _apply(module, params, labels, x, t):
    return module.apply({"params": params}, x, t, labels)


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn (one call of `interleaved_medians`)."""
    return interleaved_medians({"call": fn}, repeats)["call"]


def compile_seconds(sampler, model_fn, noise, key) -> tuple[float, float]:
    """(trace+lower, XLA compile) seconds of the whole sampling loop."""
    t0 = time.perf_counter()
    lowered = sampling.lower(sampler, model_fn, noise, key)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def python_loop_sampler(sampler, model_fn, noise, key):
    """The same DDIM run as `sampling.sample`, but a Python loop over one jitted step."""
    @compiler.jit
    def one_step(state, x, model_fn, key):
        t, scale = base.next_call(state)
        out = model_fn(scale * x, jnp.full((x.shape[0],), t, jnp.float32))
        return sampler.step(state, x, out.astype(jnp.float32), key)

    def run():
        state = sampler.init(noise)
        x = state.init_sigma * noise
        for _ in range(base.num_model_calls(state)):
            x, state = one_step(state, x, model_fn, key)
        return x

    return run


def torch_unet(module, image_shape, num_classes):
    """diffusers' `UNet2DModel` with the topology of jaxdiff's pixel `module` (random weights; the
    same ResBlock dropout rate, which acts only in train mode)."""
    from diffusers import UNet2DModel

    levels = len(module.channel_mult)
    down = tuple("AttnDownBlock2D" if i in module.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i in module.attention_levels else "UpBlock2D" for i in reversed(range(levels)))
    unet = UNet2DModel(
        sample_size=image_shape[0], in_channels=image_shape[-1], out_channels=image_shape[-1],
        block_out_channels=tuple(module.base_channels * m for m in module.channel_mult),
        layers_per_block=module.num_res_blocks, down_block_types=down, up_block_types=up,
        norm_num_groups=module.num_groups, attention_head_dim=None, dropout=module.dropout,
        num_class_embeds=(num_classes + 1) if num_classes else None).eval()
    return unet


def diffusers_reference(module, image_shape, num_classes, batch, steps):
    """(a call that runs diffusers' DDIM loop on the same-topology network, its details), or None
    without torch/diffusers."""
    try:
        import torch
        from diffusers import DDIMScheduler
    except ImportError:
        return None
    unet = torch_unet(module, image_shape, num_classes)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                          beta_end=0.02, clip_sample=False, set_alpha_to_one=False)
    labels = torch.zeros(batch, dtype=torch.long) if num_classes else None
    x0 = torch.randn(batch, image_shape[-1], *image_shape[:2])

    def run():
        sched.set_timesteps(steps)
        x = x0
        with torch.inference_mode():
            for t in sched.timesteps:
                eps = unet(x, t, class_labels=labels).sample
                x = sched.step(eps, t, x).prev_sample
        return x

    run()  # warm-up
    return run, {"params": sum(p.numel() for p in unet.parameters()),
                 "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """{name: median seconds} of `repeats` rounds, each round running every call once, so a load
    that changes during the run hits all of them alike."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())           # a torch tensor is ready when returned
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true")
    return ap


def run(args) -> dict:
    """The measurement: the results dict `main` prints."""
    module, params, schedule, image_shape = demo_model(args.checkpoint)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    labels = jnp.zeros((args.batch,), jnp.int32) if module.num_classes else None
    model_fn = jax.tree_util.Partial(functools.partial(_apply, module), params, labels)
    key = jax.random.PRNGKey(0)
    noise = jax.random.normal(key, (args.batch,) + tuple(image_shape))
    results = {"device": str(jax.devices()[0]), "cpu": platform.processor() or platform.machine(),
               "jax": jax.__version__, "batch": args.batch, "image_shape": list(image_shape),
               "params": int(n_params)}

    # 1. Compile time vs number of steps.
    for steps in (10, 200):
        sampler = samplers.get("ddim", schedule, steps)
        lower_s, compile_s = compile_seconds(sampler, model_fn, noise, key)
        results[f"compile_{steps}_steps_s"] = {"trace_lower": lower_s, "xla_compile": compile_s,
                                               "total": lower_s + compile_s}
    results["compile_ratio_200_vs_10"] = (results["compile_200_steps_s"]["total"]
                                          / results["compile_10_steps_s"]["total"])

    # 2. Throughput, DDIM `steps` steps: one compiled scan vs a Python loop of jitted steps.
    sampler = samplers.get("ddim", schedule, args.steps)
    scan_run = lambda: sampling.sample(sampler, model_fn, noise, key)
    loop_run = python_loop_sampler(sampler, model_fn, noise, key)
    np.testing.assert_allclose(np.asarray(scan_run()), np.asarray(loop_run()), rtol=1e-4, atol=1e-4)
    calls = {"scan": scan_run, "loop": loop_run}
    ref = None
    if not args.no_reference:           # 3. the reference in PyTorch, timed in the same rounds
        ref = diffusers_reference(module, image_shape, module.num_classes, args.batch, args.steps)
        if ref is not None:
            calls["diffusers"] = ref[0]
    medians = interleaved_medians(calls, args.repeats)
    scan_s, loop_s = medians["scan"], medians["loop"]
    results["ddim_steps"] = args.steps
    results["scan_s"] = scan_s
    results["python_loop_s"] = loop_s
    results["scan_images_per_s"] = args.batch / scan_s
    results["python_loop_images_per_s"] = args.batch / loop_s
    if ref is not None:
        results["diffusers"] = {"seconds": medians["diffusers"], **ref[1]}
        results["diffusers_images_per_s"] = args.batch / medians["diffusers"]
        results["jaxdiff_scan_speedup_vs_diffusers"] = medians["diffusers"] / scan_s
    return results


def main():
    print(json.dumps(run(parser().parse_args()), indent=2))


if __name__ == "__main__":
    main()
