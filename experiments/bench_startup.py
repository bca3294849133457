"""Start-up cost of a command-line run, first process (cold compilation cache) against second (warm).

    python experiments/bench_startup.py [--checkpoint runs/digits] [--sd-folder DIR] [--pairs 3]
                                        [--json startup.json] [--md startup.md] [--quick]

Two commands, each run as a subprocess the way a user runs it, with a fresh compilation cache
directory per pair (`JAXDIFF_COMPILATION_CACHE`, see jaxdiff/compile_cache.py):

* `jaxdiff sample` of a trained pixel run (`--checkpoint`, e.g. the digits demo run; 16 images,
  50 DDIM steps);
* `jaxdiff generate` of a tiny Stable Diffusion folder (`--sd-folder`, or one written here from
  random weights at toy widths, as the tests build theirs; 64x64 pixels, 20 steps, guidance 7.5).

For each pair the first process starts with an empty cache and the second with what the first
wrote. Per process: the start-to-image seconds (wall time of the subprocess, interpreter start
and imports included, measured by this script) and, from JAX's monitoring events inside the
child, the programs compiled, loaded from the cache (`/jax/compilation_cache/cache_hits`) and
written to it (`cache_misses`): JAX records `/jax/core/compile/backend_compile_duration` for
every program it builds, loaded ones included, so compiled = those events - cache hits. With
`compile_cache.MIN_COMPILE_TIME_SECS` = 0 every program is written, so the second process
should compile none. Medians over
`--pairs` pairs. Writes JSON (`--json`) and a markdown table (`--md`); prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The child: count JAX's compile and cache events around the command line's main().
CHILD = """
import json, sys
from jax import monitoring
counts = {"events": 0, "cache_hits": 0, "cache_misses": 0}
def duration(event, seconds, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        counts["events"] += 1
def event(name, **kw):
    if name == "/jax/compilation_cache/cache_hits":
        counts["cache_hits"] += 1
    elif name == "/jax/compilation_cache/cache_misses":
        counts["cache_misses"] += 1
monitoring.register_event_duration_secs_listener(duration)
monitoring.register_event_listener(event)
from jaxdiff.cli import main
rc = main(%r)
print("COUNTS " + json.dumps(counts), flush=True)
sys.exit(rc)
"""


def write_tiny_sd(folder: str) -> str:
    """A tiny Stable Diffusion folder (U-Net 32/64 channels, VAE 16/32, a 2-layer CLIP text encoder
    and a byte-level tokenizer, DDIM) at initial weights, written by jaxdiff alone. Returns it."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.convert import clip, unet, vae
    from jaxdiff.convert.folder import save_pretrained

    saved = dict(os.environ)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        from conftest import write_clip_tokenizer        # the tests' tokenizer helper
    finally:
        sys.path.remove(os.path.join(ROOT, "tests"))
        os.environ.clear()
        os.environ.update(saved)                          # conftest sets test-only defaults
    vocab = write_clip_tokenizer(os.path.join(folder, "tokenizer"), max_length=77)
    um = unet.module_from_config(dict(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4))
    vm = vae.module_from_config(dict(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8))
    tm = clip.module_from_config(dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=vocab - 1))

    def init(module, *args, **kwargs):
        return jax.jit(lambda: module.init(jax.random.key(0), *args, **kwargs))()["params"]

    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}
    components = {"unet": (um, init(um, **um.example_inputs())), "vae": (vm, init(vm, jnp.zeros((1, 16, 16, 3)))),
                  "text_encoder": (tm, init(tm, jnp.zeros((1, 77), jnp.int32))), "scheduler": scheduler}
    out = os.path.join(folder, "model")
    missing = save_pretrained(out, components, tokenizer_dir=os.path.join(folder, "tokenizer"))
    if missing:
        raise RuntimeError(f"the tiny folder misses {missing}")
    return out


def one_process(argv: list[str], cache: str, timeout: int) -> dict:
    """Run `jaxdiff <argv>` in a fresh interpreter with the compilation cache at `cache`."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAXDIFF_COMPILATION_CACHE"] = cache
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD % (argv,)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"jaxdiff {argv[0]} exited {proc.returncode}: {tail}")
    line = [s for s in proc.stdout.splitlines() if s.startswith("COUNTS ")][-1]
    counts = json.loads(line[len("COUNTS "):])
    # JAX records the backend-compile event for a program loaded from the cache too
    return {"seconds": seconds, "compiled": counts["events"] - counts["cache_hits"], **counts}


def commands(args, work: str) -> dict[str, list[str]]:
    out = {}
    if args.checkpoint:
        out["sample"] = ["sample", "--checkpoint", args.checkpoint, "--num", str(args.num), "--steps",
                         str(args.steps), "--no-progress", "--out", os.path.join(work, "sample.png")]
    folder = args.sd_folder or write_tiny_sd(os.path.join(work, "sd"))
    out["generate"] = ["generate", "--model", folder, "--prompt", "a red cube", "--steps", str(args.sd_steps),
                       "--height", "64", "--width", "64", "--no-progress", "--out", os.path.join(work, "gen.png")]
    return out


def run(args) -> dict:
    """The measurement: {"pairs", "commands": {name: {"argv", "cold": medians, "warm": medians,
    "runs": [...]}}}."""
    work = tempfile.mkdtemp(prefix="jaxdiff-startup-")
    try:
        result = {"pairs": args.pairs, "commands": {}}
        for name, argv in commands(args, work).items():
            runs = []
            for i in range(args.pairs):
                cache = os.path.join(work, f"cache-{name}-{i}")
                cold = one_process(argv, cache, args.timeout)
                warm = one_process(argv, cache, args.timeout)
                runs.append({"cold": cold, "warm": warm})
                print(f"{name} pair {i + 1}: cold {cold}, warm {warm}", file=sys.stderr, flush=True)
            med = {side: {k: statistics.median(r[side][k] for r in runs) for k in runs[0][side]}
                   for side in ("cold", "warm")}
            shown = [a if not os.path.isabs(a) else os.path.basename(a) for a in argv]
            result["commands"][name] = {"argv": shown, **med, "runs": runs}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(result: dict) -> str:
    lines = [f"Medians of {result['pairs']} pair(s); a fresh compilation cache per pair.", "",
             "| command | process | start-to-image s | programs compiled | loaded from cache | written to cache |",
             "|---|---|---|---|---|---|"]
    for name, r in result["commands"].items():
        for side in ("cold", "warm"):
            m = r[side]
            lines.append(f"| jaxdiff {name} | {'1st (cold cache)' if side == 'cold' else '2nd (warm cache)'} | "
                         f"{m['seconds']:.1f} | {m['compiled']:g} | {m['cache_hits']:g} | {m['cache_misses']:g} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a trained pixel run (work dir); none: skip jaxdiff sample")
    ap.add_argument("--sd-folder", default=None, help="a Stable Diffusion folder (default: a tiny one written here)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--num", type=int, default=16, help="jaxdiff sample --num")
    ap.add_argument("--steps", type=int, default=50, help="jaxdiff sample --steps")
    ap.add_argument("--sd-steps", type=int, default=20, help="jaxdiff generate --steps")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per process")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    return ap


def main():
    args = parser().parse_args()
    result = run(args)
    text = table(result)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
