"""The offline demo: a tiny class-conditional U-Net on the 5,000 embedded MNIST digits.

    jaxdiff train --config experiments/digits.py --workdir runs/digits

This is the default config (`jaxdiff train` with no --config runs it); the file exists so the
demo is visible next to the other experiments.
"""

from jaxdiff.config import get_config as base_config


def get_config():
    return base_config()
