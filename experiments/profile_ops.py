"""Where a U-Net call's CPU time goes, by class of XLA operation, and how far it is from the floor.

    python experiments/profile_ops.py [--targets demo,cifar_fwd,cifar_train,sd15] [--repeats 3]
                                      [--batch 16] [--dtype float32] [--reference] [--host-memory]

For each target program (the demo U-Net forward at batch 64; the DDPM CIFAR-10 U-Net of
experiments/cifar10_ddpm.py forward, and its AdamW training step, at --batch; the SD-1.5 U-Net
forward at batch 1 with random weights):

1. XLA's own count: `jax.jit(f).lower(...).compile().cost_analysis()` (FLOPs and bytes of the
   whole program), and the compiled HLO text, from which each executed instruction's class and
   FLOPs are read (convolution: 2 x output elements x window x input features; dot: 2 x output
   elements x contracted size; elementwise: one per output element).
2. XLA's own clock: `jax.profiler.trace` of `--repeats` calls, whose host trace holds one event
   per executed HLO instruction (its `hlo_op` name). The per-instruction time is the median over
   the calls (robust to other jobs on a shared machine), summed per class.
3. The floor: the program's FLOPs over the f32 2-D matmul peak measured in the same process
   ([2048, 2048] x [2048, 2048], jitted, median). The table's GFLOP column counts loop bodies
   (the blocked attention's) once per trip; `cost_analysis` counts them once, so its total can
   be lower than the column's sum.

Classes: "conv fwd" (a convolution traced from the forward `conv_general_dilated`), "conv grad"
(the convolutions autodiff made: input and kernel gradients), "matmul/attention" (fusions with a
dot; the attention softmax), "norm" (anything inside a GroupNorm/LayerNorm scope), "elementwise"
(fusions of pointwise ops), "other" (copies, transposes, pads, concatenations, reductions,
pooling, loops' bookkeeping). Instructions run concurrently on the CPU's threads, so a class's
share is of the summed instruction time; its "time" column is that share of the wall time.

--reference also times diffusers' PyTorch network of the same topology and size on the same
inputs (UNet2DModel for demo/CIFAR, UNet2DConditionModel for SD; forward, and for cifar_train a
torch AdamW step), interleaved call by call with jaxdiff's, medians.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import math
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from bench_sampling import median_time as median_wall

from jaxdiff import compiler

CLASSES = ("conv fwd", "conv grad", "matmul/attention", "norm", "elementwise", "other")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# ---------------------------------------------------------------------------------------------
# The compiled HLO text: instructions, their computations, shapes and provenance.

_POINTWISE = {
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "exponential", "exponential-minus-one",
    "log", "log-plus-one", "tanh", "logistic", "rsqrt", "sqrt", "negate", "abs", "power", "sine",
    "cosine", "select", "compare", "convert", "clamp", "floor", "ceil", "sign", "and", "or", "not",
    "erf", "cbrt", "round-nearest-even", "round-nearest-afz", "is-finite", "atan2", "remainder", "xor",
}
_FREE = {"parameter", "constant", "broadcast", "bitcast", "reshape", "iota", "tuple", "get-tuple-element",
         "bitcast-convert"}
_ARITH = _POINTWISE - {"select", "compare", "convert", "and", "or", "not", "is-finite", "xor"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_SHAPE = re.compile(r"^(\w+)\[([\d,]*)\]")
_NORM_SCOPE = re.compile(r"/(norm\w*|\w*_norm|GroupNorm\w*|LayerNorm\w*|ln_\w+)/")
_ATTN_CORE = re.compile(r"softmax|/attend|flash|dot_product_attention|BNTS|attn\w*/while", re.IGNORECASE)
_CONTAINERS = {"while", "call", "conditional"}


@dataclass
class Instr:
    name: str
    shape: tuple[int, ...] | None     # None for tuples / tokens
    opcode: str
    operands: list[str]
    attrs: str
    op_name: str
    calls: list[str] = field(default_factory=list)


def _split_rhs(rhs: str) -> tuple[str, str, str]:
    """'f32[2,3]{1,0} add(%a, %b), attrs' -> (shape, opcode, rest after the opening paren)."""
    if rhs.startswith("("):                                     # tuple shape: skip balanced parens
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rhs[: i + 1], rhs[i + 1:].lstrip()
    else:
        shape, _, rest = rhs.partition(" ")
    opcode, _, rest = rest.partition("(")
    return shape, opcode.strip(), rest


def parse_hlo(text: str) -> tuple[dict[str, Instr], dict[str, list[str]], str]:
    """Instructions by name (names are unique in a module), each computation's instructions, and
    the entry computation's name."""
    instrs: dict[str, Instr] = {}
    comps: dict[str, list[str]] = {}
    current, entry = None, ""
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rhs = m.groups()
        shape_s, opcode, rest = _split_rhs(rhs)
        sm = _SHAPE.match(shape_s)
        shape = tuple(int(d) for d in sm.group(2).split(",") if d) if sm else None
        depth, i = 1, 0
        while i < len(rest) and depth:
            depth += (rest[i] == "(") - (rest[i] == ")")
            i += 1
        operands = re.findall(r"%([\w.\-]+)", rest[: i - 1])
        attrs = rest[i:]
        on = re.search(r'op_name="([^"]*)"', attrs)
        calls = [c for grp in re.findall(r"(?:calls|body|condition|branch_computations|to_apply)="
                                         r"(\{[^}]*\}|%[\w.\-]+)", attrs)
                 for c in re.findall(r"%([\w.\-]+)", grp)]
        instrs[name] = Instr(name, shape, opcode, operands, attrs, on.group(1) if on else "", calls)
        comps[current].append(name)
    return instrs, comps, entry


def executed(instrs, comps, entry: str) -> list[tuple[Instr, float]]:
    """Each instruction the runtime executes as one unit (entry, loop bodies and conditions,
    called computations; not the insides of fusions or reducers), with how many times it runs
    per call (a loop's `known_trip_count`, else 1)."""
    out, stack = [], [(entry, 1.0)]
    while stack:
        comp, times = stack.pop()
        for n in comps.get(comp, []):
            i = instrs[n]
            out.append((i, times))
            if i.opcode == "while":
                trip = re.search(r'known_trip_count":\{"n":"(\d+)"', i.attrs)
                k = times * (int(trip.group(1)) if trip else 1)
                stack.extend((c, k) for c in i.calls)
            elif i.opcode in ("call", "conditional"):
                stack.extend((c, times) for c in i.calls)
    return out


def _inner(instr: Instr, instrs, comps) -> list[Instr]:
    """The instruction and everything in the fusions it calls (not loop bodies: those run as
    their own traced instructions)."""
    out = [instr]
    if instr.opcode == "fusion":
        for c in instr.calls:
            for n in comps.get(c, []):
                out.extend(_inner(instrs[n], instrs, comps))
    return out


def _size(shape) -> int:
    return int(np.prod(shape)) if shape else (1 if shape == () else 0)


def instr_flops(i: Instr, instrs) -> float:
    """FLOPs of one (non-fusion) instruction, counted as XLA's cost analysis does for the big ones."""
    if i.opcode == "convolution":
        win = re.search(r"size=([\dx]+)", i.attrs)
        window = math.prod(int(k) for k in win.group(1).split("x")) if win else 1
        labels = re.search(r"dim_labels=(\w+)_", i.attrs)
        lhs = instrs.get(i.operands[0]) if i.operands else None
        feat = lhs.shape[labels.group(1).index("f")] if labels and lhs and lhs.shape else 1
        groups = re.search(r"feature_group_count=(\d+)", i.attrs)
        return 2.0 * _size(i.shape) * window * feat / (int(groups.group(1)) if groups else 1)
    if i.opcode == "dot":
        lhs = instrs.get(i.operands[0])
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
        k = math.prod(lhs.shape[int(d)] for d in dims.group(1).split(",") if d) if lhs and dims else 1
        return 2.0 * _size(i.shape) * k
    if i.opcode in _ARITH:
        return float(_size(i.shape))
    if i.opcode == "reduce" and i.operands:
        src = instrs.get(i.operands[0])
        return float(_size(src.shape)) if src else 0.0
    return 0.0


def classify(instr: Instr, instrs, comps) -> tuple[str, float]:
    """(class, FLOPs) of one executed top-level instruction."""
    inner = _inner(instr, instrs, comps)
    ops = {i.opcode for i in inner}
    flops = sum(instr_flops(i, instrs) for i in inner if i.opcode != "fusion")
    names = " ".join(i.op_name for i in inner)
    if "convolution" in ops:
        convs = [i for i in inner if i.opcode == "convolution"]
        forward = all("conv_general_dilated" in c.op_name and "transpose(" not in c.op_name
                      and "lhs_dilate" not in c.attrs for c in convs)
        return ("conv fwd" if forward else "conv grad"), flops
    if "dot" in ops or _ATTN_CORE.search(names):
        return "matmul/attention", flops
    if _NORM_SCOPE.search(names):
        return "norm", flops
    if ops <= (_POINTWISE | _FREE | {"fusion"}):
        return "elementwise", flops
    return "other", flops


# ---------------------------------------------------------------------------------------------
# Timing: the profiler's per-instruction events.

def trace_op_times(call, repeats: int, module_prefix: str) -> dict[str, float]:
    """Median (over `repeats` traced calls) seconds per HLO instruction name, summed within a call."""
    from jax.profiler import ProfileData

    logdir = tempfile.mkdtemp(prefix="jaxdiff_prof_")
    with jax.profiler.trace(logdir):
        for _ in range(repeats):
            jax.block_until_ready(call())
    path = max(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))
    per_run: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    # An instruction XLA runs asynchronously (its own convolutions and dots, on the Eigen thread
    # pool) has an event that only spans its launch; the pool marks its completion with an event
    # named "end: <instruction>". Each such instruction is split over all the pool's threads, so
    # they are taken to run one after another in the order they complete, each on every thread:
    # one's time runs from its launch, or from the completion of the one before it if that came
    # later, to its own end marker, times the pool's threads (one per core). Other instructions
    # run on one thread each and count their own span, so the sum over instructions stays thread
    # time.
    starts, ends = [], collections.defaultdict(list)
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name.startswith("end: "):
                    ends[ev.name[5:]].append(ev.start_ns)
                    continue
                stats = dict(ev.stats)
                if "hlo_op" not in stats or not str(stats.get("hlo_module", "")).startswith(module_prefix):
                    continue
                starts.append((stats.get("run_id", 0), stats["hlo_op"], ev.start_ns, ev.duration_ns))
    for done in ends.values():
        done.sort()
    pooled = collections.defaultdict(list)
    for run, op, start, duration in starts:
        done = ends.get(op, ())
        k = bisect.bisect_left(done, start)
        if k < len(done) and done[k] - start > duration:
            pooled[run].append((done[k], start, op))
        else:
            per_run[run][op] += duration * 1e-9
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for run, ops in pooled.items():
        previous = 0
        for end, start, op in sorted(ops):
            per_run[run][op] += threads * (end - max(start, previous)) * 1e-9
            previous = end
    runs = list(per_run.values())
    names = set().union(*runs) if runs else set()
    return {n: statistics.median([r.get(n, 0.0) for r in runs]) for n in names}


def matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """GFLOP/s of a jitted [n, n] x [n, n] product (float32 accumulation for 16-bit inputs)."""
    a = jnp.asarray(np.random.RandomState(0).randn(n, n), dtype)
    pref = jnp.float32 if dtype != jnp.float32 else None
    f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=pref))
    jax.block_until_ready(f(a, a))
    return 2.0 * n ** 3 / median_wall(lambda: f(a, a), repeats) / 1e9


def profile(name: str, fn, args, repeats: int, peak: float, reference=None, top: int = 0) -> dict:
    """Compile fn(*args), time it (interleaved with `reference()` when given), trace it, and
    print the per-class table."""
    jitted = compiler.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    instrs, comps, entry = parse_hlo(compiled.as_text())
    call = lambda: compiled(*args)  # noqa: E731
    jax.block_until_ready(call())                                           # warm-up
    walls, refs = [], []
    if reference is not None:
        reference()                                                         # warm-up
    for _ in range(repeats):
        walls.append(median_wall(call, 1))
        if reference is not None:
            t0 = time.perf_counter()
            reference()
            refs.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    op_s = trace_op_times(call, repeats, "jit_")
    by_class = {c: [0.0, 0.0] for c in CLASSES}                              # seconds, FLOPs
    unknown = 0.0
    for op, s in op_s.items():
        instr = instrs.get(op)
        if instr is None:
            unknown += s
            continue
        if instr.opcode in _CONTAINERS:          # its event spans its body's, traced on their own
            continue
        cls, fl = classify(instr, instrs, comps)
        by_class[cls][0] += s
    for i, times in executed(instrs, comps, entry):
        if i.opcode not in _FREE:
            cls, fl = classify(i, instrs, comps)
            by_class[cls][1] += fl * times
    total_s = sum(v[0] for v in by_class.values()) + unknown
    total_s = total_s or 1e-9
    heaviest = sorted(((s, op) for op, s in op_s.items()
                       if op in instrs and instrs[op].opcode not in _CONTAINERS), reverse=True)[:top]
    total_flops = float(cost.get("flops", 0.0))
    print(f"\n### {name}\n")
    print(f"wall {wall * 1e3:.1f} ms per call (median of {repeats}); compile {compile_s:.1f} s; "
          f"XLA cost_analysis {total_flops / 1e9:.2f} GFLOP, {float(cost.get('bytes accessed', 0)) / 2**20:.0f} MiB "
          f"accessed; summed instruction time {total_s * 1e3:.1f} ms "
          f"({total_s / wall:.2f} threads busy on average)"
          + (f"; untraced {unknown / total_s:.1%}" if unknown else ""))
    if refs:
        ref = statistics.median(refs)
        print(f"diffusers/PyTorch {ref * 1e3:.1f} ms per call (median of {repeats}, interleaved); "
              f"jaxdiff speed vs diffusers {ref / wall:.2f}x")
    floor = total_flops / (peak * 1e9)
    print(f"floor (cost_analysis FLOPs / f32 matmul peak {peak:.0f} GFLOP/s): {floor * 1e3:.1f} ms "
          f"= {floor / wall:.0%} of the wall time\n")
    print("| op class | share of time | time (ms) | GFLOP | achieved GFLOP/s | floor time (ms) |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for c in CLASSES:
        s, fl = by_class[c]
        share = s / total_s if total_s else 0.0
        t = share * wall
        rows[c] = {"share": share, "ms": t * 1e3, "gflop": fl / 1e9}
        rate = f"{fl / 1e9 / t:.0f}" if t > 0 and fl > 0 else "-"
        print(f"| {c} | {share:.1%} | {t * 1e3:.1f} | {fl / 1e9:.2f} | {rate} | {fl / (peak * 1e9) * 1e3:.1f} |")
    print(f"| total | 100% | {wall * 1e3:.1f} | {sum(v[1] for v in by_class.values()) / 1e9:.2f} | "
          f"{total_flops / 1e9 / wall:.0f} | {floor * 1e3:.1f} |", flush=True)
    for s, op in heaviest:
        i = instrs[op]
        print(f"  {s / total_s:6.2%} {s * 1e3:7.2f} ms  {classify(i, instrs, comps)[0]:16s} {op} {i.opcode} "
              f"{'x'.join(map(str, i.shape or ()))} {i.op_name[-90:]}")
    return {"wall_s": wall, "reference_s": statistics.median(refs) if refs else None, "classes": rows}


# ---------------------------------------------------------------------------------------------
# The targets.

def _torch_pixel(module, image_shape, num_classes):
    import torch
    from bench_sampling import torch_unet
    torch.manual_seed(0)
    return torch_unet(module, image_shape, num_classes)


def target_demo(args, dtype):
    from jaxdiff import config as config_lib
    from jaxdiff import data as data_lib
    from jaxdiff.train import build

    cfg = config_lib.get_config()
    size = data_lib.resolve_image_size(cfg.data.dataset, cfg.data.image_size)
    shape = (size, size, 1)
    module = build.build_model(cfg, shape, 10).clone(dtype=dtype)
    B = 64
    x = jnp.asarray(np.random.RandomState(0).randn(B, *shape), jnp.float32)
    t = jnp.full((B,), 500.0)
    y = jnp.zeros((B,), jnp.int32)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), x[:1], t[:1], y[:1])["params"]
    ref = None
    if args.reference:
        import torch
        net = _torch_pixel(module, shape, 10)
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        tt, yt = torch.from_numpy(np.asarray(t)), torch.zeros(B, dtype=torch.long)

        def ref():
            with torch.inference_mode():
                return net(xt, tt, class_labels=yt).sample
    return (f"demo U-Net forward (digits config, {shape[0]}x{shape[1]}x1, batch {B})",
            lambda p, x, t, y: module.apply({"params": p}, x, t, y), (params, x, t, y), ref)


def _cifar(args, dtype):
    from jaxdiff.models import unet as unet_lib
    module = unet_lib.ddpm_cifar10(dtype=dtype)
    B = args.batch
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(B, 32, 32, 3), jnp.float32)
    t = jnp.asarray(rng.randint(0, 1000, B), jnp.float32)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), x[:1], t[:1])["params"]
    return module, params, x, t


def target_cifar_fwd(args, dtype):
    module, params, x, t = _cifar(args, dtype)
    ref = None
    if args.reference:
        import torch
        net = _torch_pixel(module, (32, 32, 3), None)
        xt, tt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.asarray(t))

        def ref():
            with torch.inference_mode():
                return net(xt, tt).sample
    return (f"DDPM CIFAR-10 U-Net forward (35.7M params, 32x32x3, batch {args.batch})",
            lambda p, x, t: module.apply({"params": p}, x, t), (params, x, t), ref)


def target_cifar_train(args, dtype):
    import optax

    module, params, x, t = _cifar(args, dtype)
    tx = optax.adamw(2e-4, b2=0.999, weight_decay=0.0)
    opt_state = tx.init(params)
    eps = jnp.asarray(np.random.RandomState(1).randn(*x.shape), jnp.float32)
    key = jax.random.PRNGKey(0)

    def step(params, opt_state, x, t, eps, key):
        def loss(p):
            pred = module.apply({"params": p}, x, t, train=True, rngs={"dropout": key})
            return jnp.mean((pred - eps) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    ref = None
    if args.reference:
        import torch
        net = _torch_pixel(module, (32, 32, 3), None).train()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)
        xt, tt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.asarray(t))
        et = torch.from_numpy(np.asarray(eps).transpose(0, 3, 1, 2).copy())

        def ref():
            opt.zero_grad(set_to_none=True)
            loss = torch.mean((net(xt, tt).sample - et) ** 2)
            loss.backward()
            opt.step()
            return loss
    return (f"DDPM CIFAR-10 U-Net AdamW train step (eps loss, dropout 0.1, batch {args.batch})",
            step, (params, opt_state, x, t, eps, key), ref)


def target_sd15(args, dtype):
    from jaxdiff.models import unet as unet_lib
    module = unet_lib.sd15(dtype=dtype)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(1, 64, 64, 4), jnp.float32)
    t = jnp.full((1,), 500.0)
    ctx = jnp.asarray(rng.randn(1, 77, 768), jnp.float32)
    ref = None
    if args.reference:
        import torch
        from diffusers import UNet2DConditionModel

        from jaxdiff.convert import unet as unet_convert
        torch.manual_seed(0)
        net = UNet2DConditionModel(**unet_convert.config_to_diffusers(module)).eval()
        params = jax.device_put(unet_convert.params_from_torch(
            {k: v.float().numpy() for k, v in net.state_dict().items()}, module))
        torch_dtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
        net = net.to(torch_dtype)
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).to(torch_dtype)
        tt, ct = torch.from_numpy(np.asarray(t)), torch.from_numpy(np.asarray(ctx)).to(torch_dtype)

        def ref():
            with torch.inference_mode():
                return net(xt, tt, encoder_hidden_states=ct).sample
    else:
        params = jax.jit(module.init)(jax.random.PRNGKey(0), x, t, context=ctx)["params"]
    if dtype == jnp.bfloat16:   # the weight matrices in bf16, as a bf16 pipeline holds them in its loop
        from jaxdiff.pipelines import core
        params = core.cast_weights(params, jnp.bfloat16)
    return ("SD-1.5 U-Net forward (859.5M params, 64x64x4 latents, batch 1, random weights)",
            lambda p, x, t, c: module.apply({"params": p}, x, t, context=c), (params, x, t, ctx), ref)


TARGETS = {"demo": target_demo, "cifar_fwd": target_cifar_fwd, "cifar_train": target_cifar_train,
           "sd15": target_sd15}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="demo,cifar_fwd,cifar_train")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="batch of the CIFAR-10 targets")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--reference", action="store_true", help="also time diffusers (PyTorch), interleaved")
    ap.add_argument("--top", type=int, default=0, help="also list the N instructions that took longest")
    ap.add_argument("--host-memory", action="store_true",
                    help="first keep freed host memory in this process (jaxdiff.host_memory, what the "
                         "command line does); PyTorch, in the same process, gets it too")
    return ap


def run(args) -> dict:
    """Profile every target (printing each table): {"peak_gflops", "targets": {name: profile()}}."""
    if getattr(args, "host_memory", False):
        from jaxdiff import host_memory
        print(f"freed host memory kept in the process: {host_memory.configure(prog='profile_ops')}")
    dtype, peak = DTYPES[args.dtype], matmul_peak()
    out = {"dtype": args.dtype, "peak_gflops": peak, "targets": {}}
    print(f"jax {jax.__version__} on {jax.devices()[0]}, compute dtype {args.dtype}; "
          f"f32 [2048x2048]^2 matmul peak {peak:.0f} GFLOP/s"
          + (f", bf16 (f32 accumulation) {matmul_peak(dtype=jnp.bfloat16):.0f} GFLOP/s" if args.dtype != "float32" else ""))
    if args.reference:
        import torch
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.targets.split(","):
        title, fn, fargs, ref = TARGETS[name](args, dtype)
        out["targets"][name] = profile(title, fn, fargs, args.repeats, peak, ref, args.top)
    return out


def main():
    run(parser().parse_args())


if __name__ == "__main__":
    main()
