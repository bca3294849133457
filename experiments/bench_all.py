"""Every benchmark in one process, on whatever backend is present, into one JSON file.

    python experiments/bench_all.py --quick --out bench_all_quick.json     # small sizes: minutes on a CPU
    python experiments/bench_all.py --out bench_all.json                   # full sizes (a GPU / TPU machine)
    python experiments/bench_all.py --only sd,train --checkpoint runs/digits

Each `experiments/bench_*.py` (and `profile_ops.py`) exposes its measurement as `run(args) ->
dict` behind `parser()`; this script runs each with the arguments of `BENCHES` (`--quick`: toy
sizes that check the whole chain in minutes; otherwise the scripts' own full-size defaults, with
the Stable Diffusion 1.5 U-Net at 512x512 against diffusers eager and `torch.compile`, in
bfloat16 off the CPU), one after another in this process, and records

* the machine: backend, device kind and count, versions (python, jax, jaxlib, flax, numpy, torch,
  diffusers), CPU count, the git commit, and the load average before and after each benchmark
  (figures taken on a loaded machine say so);
* per benchmark: its arguments, wall seconds and result, or `"error"`: one line (the exception's
  type and first line) when it failed; the others still run;
* `summary`: headline figures read from the results where they exist: SD-1.5 512x512 30-step
  images/s (U-Net calls only, guided: one call at batch 2B per step for B images) of jaxdiff,
  diffusers eager and diffusers under torch.compile; compile seconds; training MFU; the U-Net's
  memory with XLA's attention and with the blocked kernel; first- and second-process start-up.

The JSON is rewritten after each benchmark, so an interrupted run keeps what it measured.
Non-finite numbers are written as null. Each benchmark's own tables go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIGITS_RUN = os.path.join(ROOT, "runs", "digits")     # `jaxdiff train` of the demo config writes it here


def _sd_full(env: dict) -> list[str]:
    return ["--model", "sd15", "--batches", "2,8", "--torch-compile"] + (
        [] if env["backend"] == "cpu" else ["--dtype", "bfloat16"])


def _memory_full(env: dict) -> list[str]:
    n = env["device_count"]
    return ["--devices", str(n)] + (["--rules", "dp,fsdp"] if n < 4 else [])


def _startup(env: dict, args, quick: bool) -> list[str]:
    argv = (["--pairs", "1", "--num", "4", "--steps", "5", "--sd-steps", "3"] if quick else ["--pairs", "3"])
    return argv + (["--checkpoint", args.checkpoint] if args.checkpoint else [])


# name -> (module, quick arguments, full arguments); an argument list may be a function of
# (environment, bench_all's own args) for the choices that depend on the machine.
BENCHES = {
    "sd": ("bench_sd", ["--model", "tiny_sd", "--latent", "8", "--batches", "2", "--repeats", "1"], _sd_full),
    "sampling": ("bench_sampling", ["--batch", "2", "--steps", "5", "--repeats", "1"], []),
    "samplers": ("bench_samplers", ["--steps", "2", "--batch", "2", "--repeats", "1", "--samplers", "ddim,euler"], []),
    "train": ("bench_train", ["--models", "tiny", "--batch", "4", "--steps", "1", "--repeats", "1"], []),
    "attention_memory": ("bench_attention_memory", ["--models", "tiny_sd", "--pixels", "64", "--batch", "1"], []),
    "attention": ("bench_attention", ["--cases", "sd15_cross", "--batch", "1", "--reps", "1"], []),
    "memory": ("bench_memory", ["--model", "tiny", "--devices", "1", "--batch", "2", "--rules", "dp"], _memory_full),
    "conv": ("bench_conv", ["--net", "cifar", "--only", "L3 res", "--repeats", "1"], []),
    "upsample": ("bench_upsample", ["--repeats", "1", "--max-pixels", "16"], []),
    "dit": ("bench_dit", ["--model", "DiT_S_2", "--batch", "1", "--size", "16", "--reps", "1"], []),
    "profile_ops": ("profile_ops", ["--targets", "demo", "--repeats", "1"], []),
    "startup": ("bench_startup", None, None),
}


def environment() -> dict:
    """The machine and the software, read once (this starts the backend)."""
    import jax

    devices = jax.devices()
    env = {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
           "device_count": len(devices), "process_count": jax.process_count(),
           "platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception:  # not installed: recorded as absent
            env[name] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _import(module: str):
    """A sibling script as a module. Some set XLA_FLAGS / JAX_PLATFORMS defaults for their own
    runs when imported; the backend is already up, and the environment is put back so that the
    processes later benchmarks start see this one's."""
    saved = dict(os.environ)
    try:
        return importlib.import_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def run_one(name: str, argv: list[str]) -> dict:
    """Run one benchmark; its entry: argv, seconds, load before / after, and result or error."""
    import jax

    entry = {"argv": argv, "load_before": _load()}
    t0 = time.perf_counter()
    try:
        module = _import(BENCHES[name][0])
        args = module.parser().parse_args(argv)
        with contextlib.redirect_stdout(sys.stderr):
            entry["result"] = module.run(args)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit from argparse or a script included: one line, go on
        entry["error"] = one_line(e)
    entry["seconds"] = time.perf_counter() - t0
    entry["load_after"] = _load()
    jax.clear_caches()
    gc.collect()
    return entry


# --------------------------------------------------------------------------------------------
# The summary: headline figures, where their benchmark ran.

def _get(results: dict, *path):
    x = results
    for p in path:
        x = x[p]
    return x


def summary(benches: dict, steps: int = 30) -> dict:
    out = {}
    res = {k: v["result"] for k, v in benches.items() if "result" in v}
    with contextlib.suppress(Exception):
        sd = res["sd"]
        rows = {}
        for batch, r in sd["batches"].items():
            images = int(batch) // 2                      # guided: 2B rows per call for B images
            if images < 1:
                continue
            per = {"jaxdiff": r.get("jaxdiff_s_per_call"), "diffusers_eager": r.get("diffusers_s_per_call"),
                   "diffusers_torch_compile": r.get("diffusers_compiled_s_per_call")}
            rows[f"{images}_images"] = {k: images / (steps * s) for k, s in per.items() if s}
            if r.get("diffusers_compiled_error"):
                rows[f"{images}_images"]["torch_compile_error"] = r["diffusers_compiled_error"]
        out[f"{sd['model']}_{sd['latent'][0] * 8}px_{steps}_steps_images_per_s_unet_only"] = rows
        out["sd_compile_s"] = {b: r["jaxdiff_compile_s"] for b, r in sd["batches"].items()}
    with contextlib.suppress(Exception):
        s = res["sampling"]
        out["sampling_loop_compile_s"] = {"10_steps": s["compile_10_steps_s"]["total"],
                                          "200_steps": s["compile_200_steps_s"]["total"]}
    with contextlib.suppress(Exception):
        t = res["train"]
        out["train_mfu"] = {m: {"jaxdiff": t[m]["jaxdiff"]["mfu"], "torch": t[m]["torch"]["mfu"]}
                            for m in t if isinstance(t[m], dict) and "jaxdiff" in t[m]}
    with contextlib.suppress(Exception):
        rows = res["attention_memory"]["rows"]
        out["unet_memory_gib"] = [
            {k: r[k] for k in ("model", "pixels", "batch", "mode", "dtype", "kernel")} | {
                "total_gib": r["total_bytes"] / 2**30, "temp_gib": r["temp_bytes"] / 2**30} for r in rows]
    with contextlib.suppress(Exception):
        st = res["startup"]["commands"]
        out["startup_s"] = {name: {"first_process": c["cold"]["seconds"], "second_process": c["warm"]["seconds"],
                                   "compiled": [c["cold"]["compiled"], c["warm"]["compiled"]],
                                   "loaded_from_cache": [c["cold"]["cache_hits"], c["warm"]["cache_hits"]]}
                            for name, c in st.items()}
    return out


def _clean(x):
    """JSON-safe: non-finite floats -> None, numpy scalars and arrays -> Python values."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _clean(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--quick", action="store_true", help="toy sizes: check every benchmark end to end quickly")
    ap.add_argument("--out", default="bench_all.json", metavar="JSON", help="the file to write (default: %(default)s)")
    ap.add_argument("--only", default=None, help=f"comma-separated, of {', '.join(BENCHES)}")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument("--checkpoint", default=DIGITS_RUN if os.path.isdir(DIGITS_RUN) else None, metavar="RUN",
                    help="a trained pixel run for the start-up benchmark's jaxdiff sample (default: runs/digits "
                         "when present; without one only jaxdiff generate is timed)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in BENCHES]
    if unknown:
        parser().error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    names = [n for n in names if n not in args.skip.split(",")]
    sys.path[:0] = [HERE, ROOT]          # the sibling scripts, and this checkout's jaxdiff
    env = environment()
    report = {"quick": args.quick, "environment": env, "load_start": _load(), "benchmarks": {}}
    print(f"bench_all: {env['backend']} ({env['device_kind']} x {env['device_count']}), "
          f"{'quick' if args.quick else 'full'} sizes, {len(names)} benchmarks -> {args.out}", file=sys.stderr)
    for name in names:
        _, quick, full = BENCHES[name]
        if name == "startup":
            argv = _startup(env, args, args.quick)
        else:
            argv = quick if args.quick else full
            argv = list(argv(env) if callable(argv) else argv)
        print(f"bench_all: {name} {' '.join(argv)}", file=sys.stderr, flush=True)
        entry = run_one(name, argv)
        report["benchmarks"][name] = entry
        state = f"error: {entry['error']}" if "error" in entry else "ok"
        print(f"bench_all: {name} {state} ({entry['seconds']:.0f} s)", file=sys.stderr, flush=True)
        report["load_end"] = _load()
        report["summary"] = summary(report["benchmarks"])
        with open(args.out, "w") as f:
            json.dump(_clean(report), f, indent=1)
    failed = [n for n, e in report["benchmarks"].items() if "error" in e]
    print(f"bench_all: wrote {args.out}; {len(names) - len(failed)} ok"
          + (f", failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
