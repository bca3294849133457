"""FID-digits against the number of sampling steps, for each sampler, on a trained digits run.

    jaxdiff train --workdir runs/digits                      # the README's demo (4 min on 2 CPU cores)
    python experiments/study_fid_steps.py --checkpoint runs/digits [--num 1000] [--steps 5,10,20,50]

For each sampler and step count: `--num` class-balanced images (guidance as the demo samples,
`sample.guidance_scale`), their digit-network features, and the Frechet distance to the 1,000
held-out digits (`jaxdiff.pipelines.evaluate`, one seed). The floor to read the curves against is
the FID-digits of 1,000 *real* training digits against the same held-out set (printed, and drawn
as a line). Writes docs/fid_digits_vs_steps.png and .json.

What to expect from the literature (DPM-Solver, Lu et al. 2022, fig. 3; UniPC, Zhao et al. 2023,
table 1): the multistep solvers reach their plateau in 10-20 steps where DDIM needs 50 or more,
and ancestral / DDPM sampling is worst at few steps. The plateau itself is the model's, not the
sampler's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import jaxdiff
from jaxdiff.data import digits
from jaxdiff.metrics import distribution, features, stats
from jaxdiff.pipelines import evaluate

SAMPLERS = ("ddim", "ddpm", "euler", "heun", "dpmpp_2m", "unipc", "dpmpp_2m_sde")


def real_floor(num: int) -> float:
    """FID-digits of `num` real training digits (never held out) against the held-out 1,000."""
    source = digits.digits_source(16, 1, None)
    train, _ = features.digit_split(source.num_examples)
    images, _ = source.load(np.sort(train[:num]))
    return distribution.fid(stats.from_features(evaluate.digits_heldout_features()),
                            stats.from_features(features.digit_features(images)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--steps", default="5,10,20,50")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--out", default="docs/fid_digits_vs_steps")
    parser.add_argument("--title", default=None, help="the figure's first line (default: the run's folder name)")
    parser.add_argument("--replot", action="store_true", help="redraw OUT.png from OUT.json, sampling nothing")
    args = parser.parse_args()
    args.title = args.title or os.path.basename(os.path.normpath(args.checkpoint))
    if args.replot:
        with open(args.out + ".json") as f:
            saved = json.load(f)
        args.num = saved["num"]
        plot(saved["rows"], saved["real_floor"], args, saved["guidance_scale"], args.out + ".png")
        return
    model = jaxdiff.load(args.checkpoint)
    guidance = model.config.sample.guidance_scale if model.num_classes else None
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for name in args.samplers.split(","):
        for n in steps:
            t0 = time.perf_counter()
            report = evaluate.evaluate(model, num=args.num, seeds=[0], sampler=name, num_steps=n,
                                       guidance_scale=guidance)
            calls = jaxdiff.samplers.model_calls(name, n)
            rows.append({"sampler": name, "steps": n, "model_calls": calls, "fid_digits": report["fid"]["min"],
                         "seconds": time.perf_counter() - t0})
            print(f"{name:>14} {n:>4} steps ({calls:>3} calls): FID-digits {report['fid']['min']:8.3f}", flush=True)
    floor = real_floor(args.num)
    print(f"real training digits vs held-out: {floor:.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "real_floor": floor, "num": args.num, "guidance_scale": guidance,
                   "checkpoint_step": int(model.config.train.steps)}, f, indent=1)
    plot(rows, floor, args, guidance, args.out + ".png")


def plot(rows, floor, args, guidance, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == name]
        ax.plot([r["model_calls"] for r in mine], [r["fid_digits"] for r in mine], marker="o", label=name)
    ax.axhline(floor, color="grey", ls="--", lw=1, label=f"real digits ({floor:.1f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model calls per image")
    ax.set_ylabel("FID-digits (lower is better)")
    ax.set_title(f"{args.title}: FID-digits vs sampling cost\n{args.num} images, guidance {guidance}, seed 0")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
