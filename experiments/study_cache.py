"""Less work per image: speed against fidelity of deep feature reuse (DeepCache, `deep_cache=k`)
and truncated guidance (`guidance_end`), on the two trained digits demos.

    jaxdiff train --workdir runs/digits                                   # the pixel demo
    jaxdiff export runs/digits_text --out runs/digits_sd                  # the latent text-to-image demo
    python experiments/study_cache.py --pixel runs/digits --latent runs/digits_sd --out docs/study_cache

For each setting (no reuse; DeepCache k = 2, 3, 5; guidance_end 0.5 and 0.25; DeepCache k = 3 with
guidance_end 0.5), on the same noise as the plain run (20 DDIM steps, guidance as the demos sample):

* time: wall time of one batch (`--time_batch` images; the latent demo: one call), the median of
  5 (latent: 3) rounds after compilation, each round timing every setting in turn, and the
  speed-up over the plain run; and the FLOPs of a shallow U-Net call relative to a full one;
* distance to the plain run's images from the same noise: mean absolute pixel difference (pixels
  in [0, 1]) and PSNR (peak 1);
* quality: for the pixel demo, FID-digits of `--num` class-balanced images against the 1,000
  held-out digits (`jaxdiff.pipelines.evaluate`, one seed) and the fraction the digit classifier
  (`jaxdiff.metrics.digits`) reads as the class asked for; for the latent demo, the classifier's
  accuracy on "a handwritten <digit>" images.

The latent demo also times the prompt-embedding cache: a call with prompts already encoded against
the same call with new texts (the same captions with trailing spaces: same tokens, so the same
images, but cache misses).

Writes OUT.md (the tables) and OUT.json. Times are wall-clock on whatever machine runs it; compare
rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np
from bench_sampling import interleaved_medians

SETTINGS = (("plain", None, None), ("DeepCache k=2", 2, None), ("DeepCache k=3", 3, None),
            ("DeepCache k=5", 5, None), ("guidance_end 0.5", None, 0.5), ("guidance_end 0.25", None, 0.25),
            ("DeepCache k=3 + guidance_end 0.5", 3, 0.5))


def shallow_flops_ratio(unet, x, t, **inputs) -> float:
    """FLOPs of a shallow U-Net call over those of a full one (XLA's cost analysis, one image)."""
    import jax

    params = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), x, t, **inputs))["params"]
    feature = jax.ShapeDtypeStruct(unet.deep_feature_shape(x.shape), unet.dtype)

    def flops(fn, *args):
        return jax.jit(fn).lower(params, *args).compile().cost_analysis()["flops"]

    full = flops(lambda p: unet.apply({"params": p}, x, t, **inputs, return_deep_feature=True))
    shallow = flops(lambda p, f: unet.apply({"params": p}, x, t, **inputs, deep_feature=f), feature)
    return float(shallow / full)


def distance(images, plain) -> tuple[float, float]:
    """(mean |a - b|, PSNR in dB with peak 1) of images in [0, 1]."""
    diff = np.asarray(images, np.float64) - np.asarray(plain, np.float64)
    mse = float(np.mean(diff ** 2))
    return float(np.mean(np.abs(diff))), (float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse)))


def study_pixel(path: str, num: int, time_batch: int, steps: int) -> dict:
    import jaxdiff
    from jaxdiff.metrics import digits as digits_metric
    from jaxdiff.metrics import distribution, features, stats
    from jaxdiff.pipelines import evaluate

    model = jaxdiff.load(path)
    guidance = float(model.config.sample.guidance_scale)
    labels = model.grid_labels(num)
    ref = stats.from_features(evaluate.digits_heldout_features())
    classifier = digits_metric.reference_classifier(16)
    rows, plain, calls = [], None, {}
    for name, k, end in SETTINGS:
        opts = dict(sampler="ddim", num_steps=steps, guidance_scale=guidance, deep_cache=k, guidance_end=end,
                    output_type="np")
        calls[name] = lambda opts=opts: model.sample(time_batch, seed=1, labels=labels[:time_batch], **opts)
        calls[name]()                                                                   # compile
        images = model.sample(num, seed=0, labels=labels, batch_size=500, **opts)         # [N, 16, 16, 1] in [0, 1]
        plain = images if plain is None else plain
        mad, psnr = distance(images, plain)
        fid = distribution.fid(ref, stats.from_features(features.digit_features(images * 2.0 - 1.0)))
        rows.append({"setting": name, "deep_cache": k, "guidance_end": end, "mean_abs_diff": mad, "psnr": psnr,
                     "fid_digits": fid, "accuracy": digits_metric.accuracy(classifier, images * 2.0 - 1.0, labels)})
        print(rows[-1], flush=True)
    _add_times(rows, interleaved_medians(calls, 5))
    x = jnp.zeros((1,) + tuple(model.image_shape))
    ratio = shallow_flops_ratio(model.module, x, jnp.zeros((1,)), labels=jnp.zeros((1,), jnp.int32))
    return {"model": os.path.basename(os.path.normpath(path)), "num": num, "time_batch": time_batch,
            "steps": steps, "guidance_scale": guidance, "repeats": 5, "shallow_flops_ratio": ratio, "rows": rows}


def _add_times(rows: list[dict], seconds: dict) -> None:
    base = seconds[rows[0]["setting"]]
    for r in rows:
        r["seconds"], r["speedup"] = seconds[r["setting"]], base / seconds[r["setting"]]


def study_latent(path: str, per_digit: int, steps: int, guidance: float) -> dict:
    from jaxdiff.data.digits import DIGIT_WORDS
    from jaxdiff.metrics import digits as digits_metric
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    pipe = StableDiffusion.from_pretrained(path)
    captions = [f"a handwritten {w}" for w in DIGIT_WORDS]
    wanted = np.repeat(np.arange(10), per_digit)                 # each prompt's images are consecutive
    classifier = digits_metric.reference_classifier(16)
    rows, plain, calls = [], None, {}
    for name, k, end in SETTINGS:
        def call(texts=captions, k=k, end=end):
            return pipe(texts, num_images=per_digit, num_steps=steps, guidance_scale=guidance, seed=0,
                        sampler="ddim", deep_cache=k, guidance_end=end, output_type="np")
        calls[name] = call
        images = call()                                          # [N, 16, 16, 1] in [0, 1]; compiles
        plain = images if plain is None else plain
        mad, psnr = distance(images, plain)
        rows.append({"setting": name, "deep_cache": k, "guidance_end": end, "mean_abs_diff": mad, "psnr": psnr,
                     "accuracy": digits_metric.accuracy(classifier, images * 2.0 - 1.0, wanted)})
        print(rows[-1], flush=True)
    _add_times(rows, interleaved_medians(calls, 3))
    h, w = pipe.unet.sample_size, pipe.unet.sample_size
    x = jnp.zeros((1, h, w, pipe.latent_channels))
    ratio = shallow_flops_ratio(pipe.unet, x, jnp.zeros((1,)), context=jnp.zeros((1, 77, pipe.unet.context_dim)))

    def timed(texts):
        t0 = time.perf_counter()
        out = pipe(texts, num_images=per_digit, num_steps=steps, guidance_scale=guidance, seed=0, sampler="ddim",
                   output_type="np")
        return time.perf_counter() - t0, out

    repeated = float(np.median([timed(captions)[0] for _ in range(3)]))
    fresh = [timed([c + " " * (i + 1) for c in captions]) for i in range(3)]
    same_images = all(np.array_equal(out, plain) for _, out in fresh)
    prompt_cache = {"repeated_prompts_seconds": repeated, "new_prompts_seconds": float(np.median([t for t, _ in fresh])),
                    "new_prompts_same_images": bool(same_images)}
    print(prompt_cache, flush=True)
    return {"model": os.path.basename(os.path.normpath(path)), "num": len(wanted), "steps": steps,
            "guidance_scale": guidance, "repeats": 3, "shallow_flops_ratio": ratio, "rows": rows,
            "prompt_cache": prompt_cache}


def markdown(report: dict) -> str:
    out = []
    if "pixel" in report:
        p = report["pixel"]
        out += [f"Pixel digits demo (`{p['model']}`): {p['steps']} DDIM steps, guidance {p['guidance_scale']:g}; "
                f"time per batch of {p['time_batch']} (median of {p['repeats']}); distance and quality over "
                f"{p['num']} images. A shallow U-Net call costs {100 * p['shallow_flops_ratio']:.0f}% of a full "
                "one's FLOPs.", "",
                "| setting | s / batch | speed-up | mean abs diff | PSNR (dB) | FID-digits | right digit |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['setting']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {r['mean_abs_diff']:.4f} | "
                f"{r['psnr']:.1f} | {r['fid_digits']:.2f} | {100 * r['accuracy']:.1f}% |" for r in p["rows"]]
        out.append("")
    if "latent" in report:
        p = report["latent"]
        out += [f"Latent text-to-image digits demo (`{p['model']}`): {p['steps']} DDIM steps, guidance "
                f"{p['guidance_scale']:g}, {p['num']} images per call (\"a handwritten <digit>\"), decode included "
                f"(median of {p['repeats']}). A shallow U-Net call costs {100 * p['shallow_flops_ratio']:.0f}% of a "
                "full one's FLOPs.", "",
                "| setting | s / call | speed-up | mean abs diff | PSNR (dB) | right digit |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['setting']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | {r['mean_abs_diff']:.4f} | "
                f"{r['psnr']:.1f} | {100 * r['accuracy']:.1f}% |" for r in p["rows"]]
        c = p["prompt_cache"]
        out += ["", f"Prompt-embedding cache: a call with prompts already encoded {c['repeated_prompts_seconds']:.3f} s, "
                    f"with new texts {c['new_prompts_seconds']:.3f} s (images identical: {c['new_prompts_same_images']})."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixel", default=None, metavar="RUN", help="a trained pixel digits run (jaxdiff train)")
    parser.add_argument("--latent", default=None, metavar="FOLDER", help="the exported digits_sd folder")
    parser.add_argument("--num", type=int, default=500, help="pixel images scored per setting (default: 500)")
    parser.add_argument("--time_batch", type=int, default=64, help="pixel images per timed batch (default: 64)")
    parser.add_argument("--per_digit", type=int, default=10, help="latent images per digit caption (default: 10)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--latent_guidance", type=float, default=4.0)
    parser.add_argument("--out", default="docs/study_cache", help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if not (args.pixel or args.latent):
        parser.error("give --pixel RUN and/or --latent FOLDER")
    t0 = time.perf_counter()
    report = {}
    if args.pixel:
        report["pixel"] = study_pixel(args.pixel, args.num, args.time_batch, args.steps)
    if args.latent:
        report["latent"] = study_latent(args.latent, args.per_digit, args.steps, args.latent_guidance)
    report["total_seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out}.md and {args.out}.json in {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
