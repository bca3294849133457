"""The demo network on the full 60,000-digit MNIST from TFDS (prepared locally), at 28x28.

    jaxdiff train --config experiments/mnist_tfds.py --config.data.data_dir=/path/to/tfds
"""

from jaxdiff.config import get_config as base_config


def get_config():
    c = base_config()
    c.data.dataset = "tfds:mnist"
    c.data.image_size = 0
    c.data.batch_size = 128
    c.train.steps = 20_000
    c.train.checkpoint_every = 2_000
    return c
