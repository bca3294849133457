"""Training-step benchmark: images/s and MFU of jaxdiff's train step against a plain PyTorch loop.

    python experiments/bench_train.py [--models tiny,ddpm_cifar10] [--batch 16] [--steps 5] [--repeats 5]

For each network (the demo U-Net on 16x16x1 digits with 10 classes, and the DDPM CIFAR-10 U-Net on
32x32x3), in one process on the same machine:

1. jaxdiff: the trainer `jaxdiff train` builds (`train.build.build_trainer`: AdamW, grad clipping,
   EMA, epsilon loss, one jitted and donated step on a one-device mesh);
2. the reference: diffusers' `UNet2DModel` of the same topology (`bench_sampling.torch_unet`) in a
   plain PyTorch loop doing the same work per step (draw t and eps, noise, forward, MSE, backward,
   clip to norm 1, `torch.optim.AdamW` step, an EMA of the weights).

The two run interleaved (`--steps` steps of one, then of the other, `--repeats` times) and the
median per-step time is reported, so a load that comes and goes on a shared machine hits both.
FLOPs per step are XLA's cost analysis of the compiled jaxdiff step (the reference does the same
arithmetic on the same topology); MFU = FLOPs per second / the measured float32 matmul peak of the
machine (the better of jax and torch on a 2048^3 product), so both are measured on one scale.
Dropout is off in both (it is free in FLOPs but draws differently).

On a CPU shared with other jobs, PyTorch's OpenMP threads spin while they wait for a core and a
step can take 30x longer than single-threaded; compare like with like there, one thread each:

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        python experiments/bench_train.py --torch-threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import config as config_lib
from jaxdiff import sharding
from jaxdiff.train import build

SHAPES = {"tiny": ((16, 16, 1), 10), "ddpm_cifar10": ((32, 32, 3), None)}


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
    """Measured float32 matmul GFLOP/s of jax and of torch ([n, n] x [n, n], median)."""
    import torch

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ta = torch.randn(n, n)
    out = {}
    for name, run in (("jax", lambda: f(a).block_until_ready()), ("torch", lambda: ta @ ta)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        out[name] = 2 * n ** 3 / statistics.median(times) / 1e9
    return out


def config_for(name: str, batch: int):
    cfg = config_lib.get_config()
    cfg.model.name = name
    cfg.model.dropout = 0.0
    cfg.model.class_conditional = SHAPES[name][1] is not None
    cfg.data.batch_size = batch
    cfg.diffusion.prediction_type = "epsilon"
    cfg.diffusion.min_snr_gamma = 0.0
    cfg.diffusion.label_dropout = 0.0
    cfg.optim.warmup_steps = 0
    return cfg


def jax_trainer(name: str, batch: int):
    """(run k steps, FLOPs per step, parameter count) of jaxdiff's step on one device."""
    cfg = config_for(name, batch)
    image_shape, num_classes = SHAPES[name]
    mesh = sharding.make_mesh(jax.devices()[:1])
    model = build.build_model(cfg, image_shape, num_classes)
    trainer = build.build_trainer(cfg, mesh, model, build.build_schedule(cfg), build.build_optimizer(cfg),
                                  image_shape)
    r = np.random.default_rng(0)
    batch_ = {"image": r.uniform(-1, 1, (batch,) + image_shape).astype(np.float32)}
    if num_classes:
        batch_["label"] = r.integers(0, num_classes, batch).astype(np.int32)
    batch_ = sharding.shard_batch(batch_, mesh)
    state = trainer.init()
    compiled = trainer.step.lower(state, batch_).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"state": state}

    def run(k: int):
        s = holder["state"]
        for _ in range(k):
            s, metrics = trainer.step(s, batch_)
        jax.block_until_ready(metrics["loss"])
        holder["state"] = s

    run(1)
    return run, float(cost["flops"]), int(sum(x.size for x in jax.tree.leaves(holder["state"].params)))


def torch_trainer(name: str, batch: int):
    """(run k steps, parameter count) of the reference loop."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_sampling import torch_unet  # a sibling script, not a package

    cfg = config_for(name, batch)
    image_shape, num_classes = SHAPES[name]
    model = build.build_model(cfg, image_shape, num_classes)
    unet = torch_unet(model, image_shape, num_classes).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.learning_rate, betas=(cfg.optim.b1, cfg.optim.b2),
                            weight_decay=cfg.optim.weight_decay)
    ema = [p.detach().clone() for p in unet.parameters()]
    abar = torch.from_numpy(np.array(build.build_schedule(cfg).alphas_cumprod))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, image_shape[-1], *image_shape[:2], generator=g) * 2 - 1
    labels = torch.randint(0, num_classes, (batch,), generator=g) if num_classes else None

    def step():
        t = torch.randint(0, abar.shape[0], (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.mean((unet(x_t, t, class_labels=labels).sample - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.optim.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - cfg.optim.ema_decay)
        return loss

    def run(k: int):
        for _ in range(k):
            loss = step()
        float(loss.detach())

    run(1)
    return run, sum(p.numel() for p in unet.parameters())


def bench(name: str, batch: int, steps: int, repeats: int, peak: float) -> dict:
    t0 = time.perf_counter()
    jax_run, flops, jax_params = jax_trainer(name, batch)
    compile_s = time.perf_counter() - t0
    torch_run, torch_params = torch_trainer(name, batch)
    times = {"jaxdiff": [], "torch": []}
    for _ in range(repeats):                              # interleaved
        for label, run in (("jaxdiff", jax_run), ("torch", torch_run)):
            t = time.perf_counter()
            run(steps)
            times[label].append((time.perf_counter() - t) / steps)
    out = {"batch": batch, "image_shape": list(SHAPES[name][0]), "params_jaxdiff": jax_params,
           "params_torch": torch_params, "gflops_per_step": flops / 1e9, "jaxdiff_build_compile_s": compile_s}
    for label, ts in times.items():
        s = statistics.median(ts)
        out[label] = {"step_s_median": s, "step_s_all": ts, "images_per_s": batch / s,
                      "mfu": flops / s / (peak * 1e9)}
    out["jaxdiff_speedup_vs_torch"] = out["torch"]["step_s_median"] / out["jaxdiff"]["step_s_median"]
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,ddpm_cifar10")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    return ap


def run(args) -> dict:
    """The measurement (each model's figures to stderr as they come): the results dict `main` prints."""
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    peak = matmul_peak()
    results = {"device": str(jax.devices()[0]), "cpu": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "load_average_start": os.getloadavg(), "matmul_gflops": peak,
               "peak_gflops_used": max(peak.values())}
    for name in args.models.split(","):
        results[name] = bench(name, args.batch, args.steps, args.repeats, results["peak_gflops_used"])
        print(json.dumps({name: results[name]}, indent=2), file=sys.stderr)
    results["load_average_end"] = os.getloadavg()
    return results


def main():
    print(json.dumps(run(parser().parse_args()), indent=2))


if __name__ == "__main__":
    main()
