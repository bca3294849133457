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
"""

import argparse
import json
import os
import sys
import time

from jaxdiff.config import LORA_TARGETS  # noqa: F401  (the valid lora.targets names)

sys.path.insert(0, os.path.dirname(__file__))
from digits_text import get_config as text_config  # noqa: E402


def get_config():
    c = text_config()
    del c.vae                          # the autoencoder is the base's
    c.lora = dict(
        base="runs/digits_sd",         # a Stable Diffusion folder (`jaxdiff export` of digits_text)
        rank=4,
        alpha=4.0,
        targets=("to_q", "to_k", "to_v", "to_out"),
        style="bold",                  # every digit thickened, captioned "a bold <digit>"
        keep=0.25,                     # and this fraction of the originals under their own captions
        text_encoder=False,
    )
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20
    c.train.steps = 600
    c.train.log_every = 25
    c.train.checkpoint_every = 200
    c.train.sample_every = 0
    return c
