"""Per-device memory and communication of one training step under each sharding rule table.

    python experiments/bench_memory.py [--model sd15] [--devices 8] [--batch 8] [--rules dp,fsdp,fsdp_tp]
                                       [--remat none|dots|full]

Compile-only (nothing is executed, so a large U-Net fits on a laptop): the full training step
(loss, gradients, AdamW, EMA) of `jaxdiff.models.unet.CONFIGS[--model]` is lowered with the
trainer's shardings on `--devices` fake CPU devices and compiled, then

* memory per device, from XLA's `memory_analysis()` of the partitioned program: arguments
  (params + EMA + optimizer state + batch), outputs, and temporaries (activations kept for the
  backward pass, gradients, gathered FSDP weights); plus the exact bytes of params / EMA /
  optimizer state per device from their shard shapes;
* bytes communicated per device per step: the operand sizes of every all-reduce, all-gather,
  reduce-scatter, all-to-all and collective-permute in the compiled HLO.

Meshes: dp = (data=N), fsdp = (fsdp=N), fsdp_tp = (fsdp=N/2, tensor=2). The default model is
"sd15". A U-Net with a `context_dim` (the Stable Diffusion ones) is called as
`model(x, t, context=c)` with a [B, 77, context_dim] text context.
"""

from __future__ import annotations

import argparse
import os
import sys

# Fake devices must be requested before jax starts.
if "--devices" in sys.argv:
    _n = sys.argv[sys.argv.index("--devices") + 1]
else:
    _n = "8"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_n}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdiff import compiler  # noqa: E402
from jaxdiff import config as config_lib  # noqa: E402
from jaxdiff import sharding  # noqa: E402
from jaxdiff.models import unet  # noqa: E402
from jaxdiff.train import build  # noqa: E402
from jaxdiff.train import state as state_lib  # noqa: E402
from jaxdiff.train.step import make_train_step  # noqa: E402

# Input [H, W, C] of the known configs; others take --image_size / --channels.
INPUT_SHAPES = {"sd15": (64, 64, 4), "ddpm_cifar10": (32, 32, 3), "tiny": (16, 16, 1)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
                "s8": 1, "u8": 1, "pred": 1, "s16": 2, "u16": 2}


def param_count(name: str, image_shape) -> int:
    model = unet.CONFIGS[name]()
    return sum(x.size for x in jax.tree.leaves(abstract_params(model, image_shape)))


def abstract_params(model, image_shape):
    """The parameter tree as ShapeDtypeStructs (jax.eval_shape of init: nothing is allocated)."""
    b = example_batch(model, 1, image_shape)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), b["image"], b["t"],
                                             **model_kwargs(b)))["params"]


def default_model() -> str:
    if "sd15" in unet.CONFIGS:
        return "sd15"
    sizes = {n: param_count(n, INPUT_SHAPES.get(n, (32, 32, 3))) for n in unet.CONFIGS}
    return max(sizes, key=sizes.get)


def _example_args(model, batch: int, image_shape, as_struct=False):
    """Positional inputs of the network: (x, t, cond), cond a text context or None."""
    mk = (lambda s, d: jax.ShapeDtypeStruct(s, d)) if as_struct else (lambda s, d: jnp.zeros(s, d))
    x = mk((batch,) + tuple(image_shape), jnp.float32)
    t = mk((batch,), jnp.float32)
    ctx_dim = model.context_dim
    cond = mk((batch, 77, ctx_dim), jnp.float32) if ctx_dim else None
    return x, t, cond


def example_batch(model, batch: int, image_shape, as_struct=False) -> dict:
    """The bench's batch: image [B, H, W, C], t [B], and what the network's conditioning needs:
    cond [B, 77, context_dim] (text context) and, for SDXL's added conditioning, text_embeds
    [B, D] and time_ids [B, 6]. Zeros, or ShapeDtypeStructs with as_struct."""
    mk = (lambda s, d: jax.ShapeDtypeStruct(s, d)) if as_struct else (lambda s, d: jnp.zeros(s, d))
    x, t, cond = _example_args(model, batch, image_shape, as_struct)
    out = {"image": x, "t": t} | ({"cond": cond} if cond is not None else {})
    if getattr(model, "addition_embed_dim", None) is not None:
        n_ids = 6
        out["text_embeds"] = mk((batch, model.addition_embed_dim - n_ids * model.addition_time_embed_dim),
                                jnp.float32)
        out["time_ids"] = mk((batch, n_ids), jnp.float32)
    return out


def model_kwargs(batch: dict) -> dict:
    """Keyword conditioning of `model.apply` from an `example_batch`."""
    names = {"cond": "context", "text_embeds": "text_embeds", "time_ids": "time_ids"}
    return {names[k]: v for k, v in batch.items() if k in names}


def make_loss(model):
    """eps-prediction MSE (Ho et al. 2020 eq. 14, fixed schedule value): the cost of a step does
    not depend on the schedule, so keep the bench independent of the trainer's conditioning."""

    def loss_fn(params, batch, key):
        k_eps, k_drop = jax.random.split(key)
        x0 = batch["image"]                                            # [B, H, W, C]
        eps = jax.random.normal(k_eps, x0.shape)
        x_t = 0.7 * x0 + 0.71 * eps
        pred = model.apply({"params": params}, x_t, batch["t"], **model_kwargs(batch), train=True,
                           rngs={"dropout": k_drop})
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - eps))

    return loss_fn


def tree_bytes_per_device(abstract, shardings) -> int:
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


_INSTR = re.compile(r"\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")


def _type_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text))


def collective_bytes(hlo_text: str) -> dict:
    """Operand bytes of every collective in a compiled (per-device) HLO module, by kind.

    The compiled text names operands without their shapes, so every instruction's result size
    is recorded first and operands are looked up by name; async pairs count once (`-start`).
    """
    sizes, out = {}, {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, type_text, op, rest = m.groups()
        sizes[name] = _type_bytes(type_text)
        kind = op[:-len("-start")] if op.endswith("-start") else op
        if kind in COLLECTIVES:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            entry = out.setdefault(kind, {"bytes": 0, "ops": 0})
            entry["bytes"] += sum(sizes.get(o, 0) for o in operands)
            entry["ops"] += 1
    return out


def bench(name: str, rules: str, n_devices: int, batch: int, image_shape, remat: str = "none") -> dict:
    mesh_shapes = {"dp": dict(data=n_devices), "fsdp": dict(data=1, fsdp=n_devices),
                   "fsdp_tp": dict(data=1, fsdp=n_devices // 2, tensor=2)}
    mesh = sharding.make_mesh(jax.devices()[:n_devices], **mesh_shapes[rules])
    cfg = config_lib.get_config()
    model = unet.CONFIGS[name](dropout=0.0, remat=remat)
    tx = build.build_optimizer(cfg)

    def init():
        b = example_batch(model, 1, image_shape)
        params = model.init(jax.random.PRNGKey(0), b["image"], b["t"], **model_kwargs(b))["params"]
        return state_lib.create(params, tx, jax.random.PRNGKey(1))

    abstract = jax.eval_shape(init)
    state_sh = sharding.tree_shardings(abstract, mesh, rules)
    batch_abs = example_batch(model, batch, image_shape, as_struct=True)
    batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch_abs)
    step = compiler.jit(make_train_step(make_loss(model), tx, ema_decay=0.999), donate_argnums=(0,),
                        in_shardings=(state_sh, batch_sh),
                        out_shardings=(state_sh, sharding.replicated(mesh)))
    t0 = time.perf_counter()
    compiled = step.lower(sharding.with_shardings(abstract, state_sh),
                          sharding.with_shardings(batch_abs, batch_sh)).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    comm = collective_bytes(compiled.as_text())
    return {
        "model": name, "rules": rules, "remat": remat, "mesh": dict(mesh.shape), "global_batch": batch,
        "image_shape": list(image_shape),
        "params_total": sum(a.size for a in jax.tree.leaves(abstract.params)),
        "per_device_bytes": {
            "params": tree_bytes_per_device(abstract.params, state_sh.params),
            "ema_params": tree_bytes_per_device(abstract.ema_params, state_sh.ema_params),
            "opt_state": tree_bytes_per_device(abstract.opt_state, state_sh.opt_state),
            "arguments": ma.argument_size_in_bytes,
            "outputs": ma.output_size_in_bytes,
            "aliased": ma.alias_size_in_bytes,
            "temporaries": ma.temp_size_in_bytes,
        },
        "communication_bytes_per_device": comm,
        "communication_total": sum(v["bytes"] for v in comm.values()),
        "compile_s": round(compile_s, 1),
    }


def _mib(b: int) -> str:
    return f"{b / 2**20:9.1f}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"a key of unet.CONFIGS: {sorted(unet.CONFIGS)}")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="global batch (compile-only; keep it small)")
    p.add_argument("--rules", default="dp,fsdp,fsdp_tp")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--remat", default="none", help=f"U-Net level rematerialisation: {', '.join(unet.REMAT_POLICIES)}")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def run(args) -> dict:
    """Compile the step under each rule table of `args` (printing each row): {"model",
    "image_shape", "rows": [...]}. Raises ValueError for an unknown model or too few devices."""
    name = args.model or default_model()
    if name not in unet.CONFIGS:
        raise ValueError(f"unknown --model {name!r}; choose one of {sorted(unet.CONFIGS)}")
    if args.devices > len(jax.devices()):
        raise ValueError(f"--devices {args.devices} but this process has {len(jax.devices())} "
                         f"({jax.default_backend()}); set XLA_FLAGS before jax starts for fake CPU devices")
    h, w, c = INPUT_SHAPES.get(name, (32, 32, 3))
    image_shape = (args.image_size or h, args.image_size or w, args.channels or c)
    rows = []
    for rules in args.rules.split(","):
        if rules == "fsdp_tp" and args.devices < 4:
            print(f"skipping fsdp_tp: it needs fsdp >= 2 and tensor = 2, i.e. --devices >= 4 (got {args.devices})")
            continue
        r = bench(name, rules, args.devices, args.batch, image_shape, args.remat)
        rows.append(r)
        print(json.dumps(r), flush=True)
    return {"model": name, "image_shape": list(image_shape), "rows": rows}


def main() -> None:
    args = parser().parse_args()
    try:
        result = run(args)
    except ValueError as e:
        sys.exit(str(e))
    name, image_shape, rows = result["model"], result["image_shape"], result["rows"]
    print(f"\n{name}: {rows[0]['params_total'] / 1e6:.1f}M params, global batch {args.batch}, "
          f"{args.devices} devices, input {list(image_shape)}; MiB per device")
    print(f"{'rules':8} {'params':>9} {'ema':>9} {'opt':>9} {'args':>9} {'temps':>9} {'comm/step':>10}")
    for r in rows:
        m = r["per_device_bytes"]
        print(f"{r['rules']:8} {_mib(m['params'])} {_mib(m['ema_params'])} {_mib(m['opt_state'])} "
              f"{_mib(m['arguments'])} {_mib(m['temporaries'])} {_mib(r['communication_total'])} ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
