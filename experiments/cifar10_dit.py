"""A class-conditional DiT-S/2 on CIFAR-10 trained by flow matching (Peebles & Xie 2023's
architecture on pixels; Esser et al. 2024's logit-normal timesteps), from the DDPM CIFAR-10 recipe.

    jaxdiff train --config experiments/cifar10_dit.py --workdir runs/cifar10_dit

Everything not set here is experiments/cifar10_ddpm.py's (data, flips, batch 128, EMA 0.9999,
warmup). 32x32x3 images in 2x2 patches are 256 tokens. Meant for an accelerator; the FID protocol
is the one in README: Evaluation (`jaxdiff eval --checkpoint runs/cifar10_dit --inception ...`).
"""

import os

from jaxdiff import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    c = config_lib.load(os.path.join(HERE, "cifar10_ddpm.py"))
    c.model.kind = "dit"
    c.model.name = "DiT_S_2"
    c.model.class_conditional = True
    c.model.dtype = "bfloat16"
    c.diffusion.objective = "flow"
    c.diffusion.flow_timesteps = "logit_normal"
    c.optim.learning_rate = 1e-4
    c.sample.sampler = "flow_euler"
    c.sample.steps = 50
    c.sample.guidance_scale = 1.5
    return c
