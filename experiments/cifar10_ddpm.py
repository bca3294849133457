"""DDPM on CIFAR-10 (Ho et al. 2020): the 35.7M-parameter U-Net, linear betas 1e-4..0.02, eps loss.

    jaxdiff train --config experiments/cifar10_ddpm.py --workdir runs/cifar10

Needs TFDS's `cifar10` prepared locally (`--config.data.data_dir=...`); the paper trains 800k steps
at batch 128 with lr 2e-4 and EMA 0.9999. Meant for an accelerator.
"""

from jaxdiff.config import get_config as base_config


def get_config():
    c = base_config()
    c.data.dataset = "tfds:cifar10"
    c.data.random_flip = True
    c.data.image_size = 0
    c.data.batch_size = 128
    c.diffusion.prediction_type = "epsilon"
    c.diffusion.min_snr_gamma = 0.0
    c.model.name = "ddpm_cifar10"
    c.model.dropout = 0.1
    c.model.class_conditional = False
    c.model.dtype = "bfloat16"
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.b2 = 0.999
    c.optim.ema_decay = 0.9999
    c.train.steps = 800_000
    c.train.log_every = 100
    c.train.checkpoint_every = 10_000
    c.train.sample_every = 50_000
    return c
