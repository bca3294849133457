"""The digits demo with a Diffusion Transformer trained by flow matching: a class-conditional DiT
(Peebles & Xie 2023) on the 5,000 embedded 16x16 digits, straight-path flow matching with
logit-normal timesteps (Esser et al. 2024), sampled with flow Euler and classifier-free guidance.

    jaxdiff train --config experiments/digits_dit.py --workdir runs/digits_dit
    python experiments/digits_dit.py runs/digits_dit        # digits right, by guidance scale

Everything not set here is the U-Net demo's (experiments/digits.py): data, batch, optimizer,
label dropout for guidance. The network is `models.dit.tiny`: 2x2 patches (an 8x8 grid of 64
tokens), width 96, 4 blocks of 4 heads, 0.72 M parameters (the U-Net demo's has 0.69 M).

The second command samples 200 digits (20 per class) from the run's EMA weights at each guidance
scale and reads them with the digit classifier the other demos use (`metrics.digits`, an SVM
fitted on the real digits, 95% right on held-out real ones). Measured on a 2,000-step run of this
config (25 flow Euler steps, seed 1): 90.5% right without guidance, 99.0% at guidance 2, 100% at 4
(the U-Net demo: about 92% and 100%). A training step costs 1.7x the U-Net demo's (0.25 against
0.15 CPU-seconds, measured in one process on a shared 2-core machine): about 8 CPU-minutes for
the 2,000 steps.
"""

import argparse
import json
import os
import sys

from jaxdiff import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = config_lib.load(os.path.join(HERE, "digits.py"))
    c.model.kind = "dit"
    c.model.name = "tiny"

    c.diffusion.objective = "flow"
    c.diffusion.flow_timesteps = "logit_normal"
    c.diffusion.logit_mean = 0.0
    c.diffusion.logit_std = 1.0
    c.diffusion.shift = 1.0
    c.diffusion.flow_weighting = "none"

    # Transformers like a gentler step than the U-Net's 2e-3.
    c.optim.learning_rate = 1e-3
    c.train.steps = 2000

    c.sample.sampler = "flow_euler"
    c.sample.steps = 25
    c.sample.guidance_scale = 2.0
    return c


def score(workdir: str, scales=(1.0, 2.0, 4.0), per_class: int = 20, steps: int = 25) -> dict:
    """Fraction of samples the digit classifier reads as the class asked for, per guidance scale."""
    import numpy as np

    import jaxdiff
    from jaxdiff.metrics import digits

    model = jaxdiff.load(workdir)
    clf = digits.reference_classifier(image_size=model.image_shape[0])
    wanted = np.repeat(np.arange(10), per_class)
    out = {"heldout_real": clf.heldout_accuracy}
    for s in scales:
        images = model.sample(len(wanted), num_steps=steps, labels=wanted, guidance_scale=s, seed=1,
                              output_type="np")
        out[f"guidance_{s:g}"] = digits.accuracy(clf, images * 2 - 1, wanted)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a run trained with this config")
    parser.add_argument("--steps", type=int, default=25, help="flow Euler steps")
    args = parser.parse_args()
    print(json.dumps(score(args.workdir, steps=args.steps), indent=1))
    sys.exit(0)
