"""DiT throughput: jaxdiff's DiT against diffusers' DiTTransformer2DModel on the same machine, in
one run, with the same (converted) weights.

    python experiments/bench_dit.py                       # DiT-B/2 on 32x32x4 latents, batch 2
    python experiments/bench_dit.py --batch 8 --reps 10 --size 32 --model DiT_S_2

Both forward (inference) and a training step (MSE loss on the first C output channels,
backward, AdamW update) are timed; each figure is the median of `--reps` timed calls after one
warm-up call (jaxdiff: jit-compiled; PyTorch: eager, its default). The first forward of both is
compared (relative max difference) so that the two really compute the same network. Prints a
table of milliseconds per call and images per second.

Figures depend on the machine (CPU kind, cores, load); compare the two columns of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import compiler
from jaxdiff.convert import dit as dit_convert
from jaxdiff.models import dit


def _median_ms(fn, reps: int) -> float:
    fn()                                               # warm-up (compiles the jitted call)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _jax_side(module, params, x, t, y, reps):
    fwd = compiler.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))
    tx = optax.adamw(1e-4)
    C = x.shape[-1]

    def step(p, opt, x, t, y):
        def loss(p):
            return jnp.mean(jnp.square(module.apply({"params": p}, x, t, y)[..., :C] - x))
        value, grads = jax.value_and_grad(loss)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, value

    step = compiler.jit(step, donate_argnums=(0, 1))
    state = {"p": jax.tree.map(jnp.array, params), "opt": tx.init(params)}   # copies: the step donates them

    def one_step():
        state["p"], state["opt"], v = step(state["p"], state["opt"], x, t, y)
        v.block_until_ready()

    out = np.asarray(fwd(params, x, t, y))
    return out, _median_ms(lambda: fwd(params, x, t, y).block_until_ready(), reps), _median_ms(one_step, reps)


def _torch_side(model, x, t, y, reps):
    import torch

    xt = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())   # NCHW
    tt, yt = torch.from_numpy(np.array(t)), torch.from_numpy(np.array(y).astype(np.int64))
    C = xt.shape[1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        with torch.no_grad():
            return model(xt, tt, yt).sample

    def one_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean(torch.square(model(xt, tt, yt).sample[:, :C] - xt))
        loss.backward()
        opt.step()

    out = forward().numpy().transpose(0, 2, 3, 1)
    return out, _median_ms(forward, reps), _median_ms(one_step, reps)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DiT forward / train-step throughput, jaxdiff vs diffusers")
    parser.add_argument("--model", default="DiT_B_2", choices=sorted(k for k in dit.CONFIGS if k != "tiny"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser


def run(args) -> dict:
    """The measurement (prints the table): milliseconds per call and images/s of both, and their
    agreement."""
    import torch
    from diffusers import DiTTransformer2DModel

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = dit.CONFIGS[args.model]()
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=preset.num_heads, attention_head_dim=preset.hidden_size // preset.num_heads,
        in_channels=args.channels, out_channels=2 * args.channels, num_layers=preset.depth,
        sample_size=args.size, patch_size=preset.patch_size, num_embeds_ada_norm=1000)
    model.eval()                  # train mode would drop labels at random (diffusers' CFG label dropout)
    with torch.no_grad():                              # non-zero adaLN / output layers, tied embedders
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    # Copies: converted leaves may share memory with their source, and the donated jitted train
    # step would then write its updates into the PyTorch model's own tensors.
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    module = dit_convert.module_from_config(dict(model.config))
    params = jax.device_put(jax.tree.map(np.array, dit_convert.params_from_torch(state, module)))
    n_params = sum(v.size for v in jax.tree.leaves(params))

    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(args.batch, args.size, args.size, args.channels).astype(np.float32))
    t = jnp.asarray(rs.uniform(0, 999, args.batch).astype(np.float32))
    y = jnp.asarray(rs.randint(0, 1000, args.batch).astype(np.int32))

    out_j, fwd_j, step_j = _jax_side(module, params, x, t, y, args.reps)
    out_t, fwd_t, step_t = _torch_side(model, x, t, y, args.reps)
    rel = float(np.max(np.abs(out_j - out_t)) / np.max(np.abs(out_t)))

    print(f"{args.model}: {n_params / 1e6:.1f} M parameters, batch {args.batch} of {args.size}x{args.size}x"
          f"{args.channels}, {(args.size // preset.patch_size) ** 2} tokens; backend {jax.default_backend()}, "
          f"torch threads {torch.get_num_threads()}; median of {args.reps}; outputs agree to {rel:.1e} (relative)")
    print(f"{'':14s}{'jaxdiff ms':>12s}{'diffusers ms':>14s}{'jaxdiff img/s':>15s}{'diffusers img/s':>17s}{'ratio':>8s}")
    for name, j, d in (("forward", fwd_j, fwd_t), ("train step", step_j, step_t)):
        print(f"{name:14s}{j:12.1f}{d:14.1f}{1000 * args.batch / j:15.2f}{1000 * args.batch / d:17.2f}"
              f"{d / j:8.2f}")
    return {"model": args.model, "params": int(n_params), "batch": args.batch, "size": args.size,
            "channels": args.channels, "backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
            "outputs_rel_diff": rel, "reps": args.reps,
            **{f"{k}_{side}_ms": v for k, (j, d) in (("forward", (fwd_j, fwd_t)), ("train_step", (step_j, step_t)))
               for side, v in (("jaxdiff", j), ("diffusers", d))}}


def main():
    run(parser().parse_args())


if __name__ == "__main__":
    main()
