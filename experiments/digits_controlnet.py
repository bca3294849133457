"""A ControlNet that draws the digit of an edge map: the digits_text model, frozen, steered by the
edges of a held-out digit, even when the caption names another digit.

    jaxdiff train --config experiments/digits_text.py --workdir runs/digits_text
    jaxdiff export runs/digits_text --out runs/digits_sd                   # the frozen base
    python experiments/digits_controlnet.py runs/digits_sd runs/digits_controlnet --out docs/

or, for the training alone, `jaxdiff train --config experiments/digits_controlnet.py
--workdir runs/digits_controlnet --config.controlnet.base=runs/digits_sd`.

The base is a digits_text run exported as a Stable Diffusion folder (`controlnet.base`). The
ControlNet (the base U-Net's encoder, copied, with zero convolutions; the base, its autoencoder
and text encoder stay frozen) learns from each digit's Sobel edge map (`controlnet.control`,
"edges"; or its one-pixel skeleton) under the digit's own caption, 10% of captions dropped to ""
for guidance. `controlnet.holdout` digits (every 25th) are never trained on.

Run as a script, this file trains the ControlNet (resuming the work dir when it holds a run),
writes it as a diffusers folder (WORKDIR/controlnet), and draws `digits_controlnet.png`: one
column per held-out digit, rows

    1  the control (the held-out digit's edge map)
    2  with the ControlNet, caption naming the control's digit
    3  without it (the base alone), the same caption and noise
    4  with the ControlNet, caption naming another digit (d + 5 mod 10)
    5  without it, that caption

and scores, over every held-out digit: the correlation between each sample's edge map and its
control, and the share of samples the digit classifier of `jaxdiff.metrics.digits` reads as the
control's digit (and, for the mismatched captions, as the caption's digit), with and without
the ControlNet (`controlnet_eval.json`).
"""

import argparse
import json
import os
import sys
import time

from jaxdiff import config as config_lib


def get_config():
    c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_text.py"))
    del c.vae                          # the autoencoder is the base's
    c.controlnet = {
        "base": "runs/digits_sd",      # a Stable Diffusion folder (`jaxdiff export` of digits_text)
        "control": "edges",            # jaxdiff.config.CONTROLNET_CONTROLS lists the kinds
        "init": "unet",                # the base U-Net's encoder (diffusers' ControlNetModel.from_unet)
        "embedding_channels": (16, 32),  # two widths: one halving, 16x16 control -> 8x8 latents
        "holdout": 200,                # every 25th digit is never trained on
    }
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.train.steps = 600
    c.train.log_every = 25
    c.train.checkpoint_every = 200
    c.train.sample_every = 0
    return c


def edge_correlation(samples, controls) -> list[float]:
    """Pearson correlation of each sample's Sobel edge map with its control's first channel:
    samples [N, H, W, C] in [0, 1] (the first channel is read), controls [N, H, W, 3] in [0, 1]."""
    import numpy as np

    from jaxdiff.train.controlnet import sobel_edges

    e = sobel_edges(np.asarray(samples)[..., :1] * 2.0 - 1.0).reshape(len(samples), -1)
    c = np.asarray(controls)[..., 0].reshape(len(controls), -1)
    e, c = e - e.mean(1, keepdims=True), c - c.mean(1, keepdims=True)
    return list(map(float, (e * c).sum(1) / np.maximum(np.sqrt((e * e).sum(1) * (c * c).sum(1)), 1e-12)))


def main(argv=None) -> int:
    import numpy as np

    from jaxdiff.data.digits import DIGIT_WORDS
    from jaxdiff.images import save_grid, to_uint8
    from jaxdiff.metrics import digits as digits_metric
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion
    from jaxdiff.train import controlnet as cn_train
    from jaxdiff.train import loop

    parser = argparse.ArgumentParser(description="train the digits ControlNet, draw its grid and score it")
    parser.add_argument("base", help="the base Stable Diffusion folder (controlnet.base)")
    parser.add_argument("workdir", help="the ControlNet run's work dir (resumed when it holds one)")
    parser.add_argument("--out", default="docs", help="folder for the PNG and controlnet_eval.json")
    parser.add_argument("--train-steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--control", default="edges", help="edges or skeleton")
    parser.add_argument("--per-digit", type=int, default=5, help="held-out digits scored per class")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)

    cfg = get_config()
    cfg.controlnet.base = args.base
    cfg.controlnet.control = args.control
    if args.train_steps is not None:
        cfg.train.steps = args.train_steps
    t0 = time.perf_counter()
    loop.train(cfg, args.workdir, progress=False, write_samples=None)
    train_s = time.perf_counter() - t0
    folder = cn_train.export_controlnet(args.workdir, os.path.join(args.workdir, "controlnet"))

    # Held-out digits: `per_digit` of each class, in class order.
    _, (images, labels) = cn_train.split(cfg, cn_train.load_examples(cfg)[:2])
    pick = np.concatenate([np.flatnonzero(labels == d)[:args.per_digit] for d in range(10)])
    images, labels = images[pick], labels[pick]
    controls = cn_train.control_images(cfg.controlnet.control, images)                 # [N, H, W, 3]
    other = (labels + 5) % 10
    pipe = StableDiffusion.from_pretrained(args.base, controlnet=folder)

    def draw(words, scale):
        return pipe([f"a handwritten {DIGIT_WORDS[d]}" for d in words], control_image=controls,
                    controlnet_conditioning_scale=scale, num_steps=args.steps, guidance_scale=args.guidance,
                    seed=0, sampler="ddim", output_type="np")

    t1 = time.perf_counter()
    pictures = {(cap, on): draw(labels if cap == "own" else other, 1.0 if on else 0.0)
                for cap in ("own", "other") for on in (True, False)}
    sample_s = time.perf_counter() - t1
    classifier = digits_metric.reference_classifier(16)
    result = {"control": cfg.controlnet.control, "train_steps": int(cfg.train.steps), "train_seconds": round(train_s, 1),
              "guidance_scale": args.guidance, "sample_steps": args.steps, "held_out_images": len(labels)}
    for (cap, on), x in pictures.items():
        name = f"{cap}_caption_{'with' if on else 'without'}_controlnet"
        gray = x[..., :1] * 2.0 - 1.0
        result[name] = {"edge_correlation": float(np.mean(edge_correlation(x, controls))),
                        "reads_control_digit": digits_metric.accuracy(classifier, gray, labels)}
        if cap == "other":
            result[name]["reads_caption_digit"] = digits_metric.accuracy(classifier, gray, other)
    result["control_edge_correlation_with_its_own_image"] = float(np.mean(edge_correlation(images * 0.5 + 0.5, controls)))
    first = [int(np.flatnonzero(labels == d)[0]) for d in range(10)]                    # one column per digit
    rows = [controls[first][..., :1], pictures["own", True][first][..., :1], pictures["own", False][first][..., :1],
            pictures["other", True][first][..., :1], pictures["other", False][first][..., :1]]
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"digits_controlnet_{cfg.controlnet.control}.png")
    save_grid(to_uint8(np.concatenate(rows)), png, ncols=10)
    result["sample_seconds"] = round(sample_s, 1)
    result["grid"] = os.path.basename(png)
    with open(os.path.join(args.out, f"controlnet_eval_{cfg.controlnet.control}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
