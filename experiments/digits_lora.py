"""A LoRA that teaches the digits_text model a new style word: "a bold seven" -> a thick 7.

    jaxdiff train --config experiments/digits_text.py --workdir runs/digits_text
    jaxdiff export runs/digits_text --out runs/digits_sd                   # the frozen base
    jaxdiff train --config experiments/digits_lora.py --workdir runs/digits_lora
    jaxdiff export-lora runs/digits_lora --out runs/digits_bold.safetensors
    python experiments/digits_lora.py runs/digits_sd runs/digits_bold.safetensors --out docs/

The base is a digits_text run exported as a Stable Diffusion folder (`lora.base`). The adapter
(rank 4 on the attention projections of the U-Net; the base, its autoencoder and text encoder
stay frozen) learns from every digit thickened by a 3x3 cross dilation under the caption
"a bold <digit>", next to a quarter of the originals under their own captions, so the old
captions stay as they were. Run as a script, this file draws the before / after grids (base and
base + LoRA, on the new and the old captions) and scores them: the digit classifier of
`jaxdiff.metrics.digits` says whether the digits stay right, and the ink fraction (pixels above
mid-grey) measures the strokes' thickness against the real digits and their bold versions.

Measured (docs/digits_lora_eval.json; base: a full digits_text run, 2,000 steps; LoRA: 600
steps of batch 32; the five commands above took 6 min 17 s from a fresh clone on a 2-core CPU;
40 images per set at guidance 4, 25 DDIM steps): "a bold <digit>" went from 15% right digits and
ink 0.187 (the base has never seen "bold") to 57.5% right and ink 0.278 (real digits 0.133, their
bold versions 0.289, on which the classifier is 88.5% right); the old captions went from 100%
right, ink 0.148, to 97.5%, ink 0.171. Grids: docs/digits_lora_new.png and docs/digits_lora_old.png.
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
    c.lora = {
        "base": "runs/digits_sd",      # a Stable Diffusion folder (`jaxdiff export` of digits_text)
        "rank": 4,
        "alpha": 4.0,
        "targets": ("to_q", "to_k", "to_v", "to_out"),   # jaxdiff.config.LORA_TARGETS lists the names
        "style": "bold",               # every digit thickened, captioned "a bold <digit>"
        "keep": 0.25,                  # and this fraction of the originals under their own captions
        "text_encoder": False,
    }
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.train.steps = 600
    c.train.log_every = 25
    c.train.checkpoint_every = 200
    c.train.sample_every = 0
    return c


def ink(images) -> float:
    """Stroke thickness as the mean fraction of pixels above mid-grey: images [N, H, W, C] in [0, 1]."""
    import numpy as np

    return float(np.mean(np.asarray(images) > 0.5))


def draw(pipe, captions, rows: int, guidance: float, steps: int):
    """[rows * len(captions), H, W, C] in [0, 1]: row r is seed r, one column per caption."""
    import numpy as np

    return np.concatenate([pipe(list(captions), num_steps=steps, guidance_scale=guidance, seed=r,
                                sampler="ddim", output_type="np") for r in range(rows)])


def main(argv=None) -> int:
    import numpy as np

    from jaxdiff import data
    from jaxdiff.data.digits import DIGIT_WORDS
    from jaxdiff.images import save_grid, to_uint8
    from jaxdiff.metrics import digits as digits_metric
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion
    from jaxdiff.train.lora import thicken

    parser = argparse.ArgumentParser(description="before / after grids and scores of the digits LoRA")
    parser.add_argument("base", help="the base Stable Diffusion folder (lora.base)")
    parser.add_argument("lora", help="the exported LoRA (jaxdiff export-lora)")
    parser.add_argument("--out", default="docs", help="folder for the PNGs and lora_eval.json")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    captions = {"new": [f"a bold {w}" for w in DIGIT_WORDS], "old": [f"a handwritten {w}" for w in DIGIT_WORDS]}
    pipe = StableDiffusion.from_pretrained(args.base)
    pictures = {}
    for when in ("before", "after"):
        if when == "after":
            pipe.load_lora(args.lora)
        for kind, texts in captions.items():
            pictures[when, kind] = draw(pipe, texts, args.rows, args.guidance, args.steps)
    wanted = np.tile(np.arange(10), args.rows)
    classifier = digits_metric.reference_classifier(16)
    real = data.load_examples("digits", image_size=16, channels=1)[0]["image"]            # [-1, 1]
    result = {"guidance_scale": args.guidance, "steps": args.steps, "images_per_set": len(wanted),
              "ink_real": ink(real * 0.5 + 0.5), "ink_real_bold": ink(thicken(real) * 0.5 + 0.5),
              "accuracy_real_bold": digits_metric.accuracy(classifier, thicken(real[:1000]),
                                                           data.load_examples("digits", image_size=16)[0]["label"][:1000])}
    for (when, kind), x in pictures.items():
        result[f"{when}_{kind}"] = {"accuracy": digits_metric.accuracy(classifier, x * 2 - 1, wanted), "ink": ink(x)}
    os.makedirs(args.out, exist_ok=True)
    for kind in captions:
        # Left: the base; right: base + LoRA; the same seeds, one column per digit.
        both = np.concatenate([np.concatenate([pictures["before", kind][i * 10:(i + 1) * 10],
                                               pictures["after", kind][i * 10:(i + 1) * 10]]) for i in range(args.rows)])
        save_grid(to_uint8(both), os.path.join(args.out, f"digits_lora_{kind}.png"), ncols=20)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(args.out, "lora_eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
