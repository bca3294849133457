"""Fitting a small `AutoencoderKL`: the first stage of a latent diffusion model.

A random autoencoder decodes every latent to noise, so a latent diffusion run on a new image set
first fits one (Rombach et al. 2022, sec. 3 and appendix G): reconstruction plus a small KL
penalty that keeps the posterior near N(0, I) without turning it into a prior. Per example,

    loss = mean_pixels (decode(z) - x)^2 + kl_weight * KL(q(z | x) || N(0, I)) / num_pixels,
    z = mean + std * eps  (the reparameterised posterior sample)

(the perceptual and adversarial terms of the reference are left out: for small gray digits the
squared error alone gives usable reconstructions). Afterwards `scaling_factor` is set to
1 / std of the posterior means over the data, as Stable Diffusion's 0.18215 was chosen, so the
diffusion model sees latents of unit variance.

    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4,
                        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    params, history = fit(vae, images, steps=400)              # images: [N, H, W, 1] in [-1, 1]
    vae = with_unit_scaling(vae, params, images)
    jaxdiff.convert.vae.save(folder, vae, params)               # a diffusers AutoencoderKL folder
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import compiler
from jaxdiff.models.vae import AutoencoderKL


def vae_loss_fn(vae: AutoencoderKL, kl_weight: float) -> Callable:
    """`loss(params, images [B, H, W, C], key) -> (scalar, {"recon", "kl"})`, see the module
    docstring."""

    def loss(params, images, key):
        recon, posterior = vae.apply({"params": params}, images, key)     # [B, H, W, C]
        mse = jnp.mean(jnp.square(recon - images))
        num_pixels = np.prod(images.shape[1:])
        kl = jnp.mean(posterior.kl()) / num_pixels
        return mse + kl_weight * kl, {"recon": mse, "kl": kl}

    return loss


def fit(vae: AutoencoderKL, images: np.ndarray, *, steps: int = 400, batch_size: int = 64,
        learning_rate: float = 1e-3, kl_weight: float = 1e-4, seed: int = 0,
        log_every: int = 50, log: Callable[[int, dict], None] | None = None):
    """Fit `vae` to `images` [N, H, W, C] in [-1, 1] with Adam.

    Batches are drawn from a numpy generator seeded by `seed` (the fit is deterministic).
    Returns (params, history), history a list of {"step", "loss", "recon", "kl"} every
    `log_every` steps (also passed to `log(step, metrics)` when given).
    """
    images = np.asarray(images, np.float32)
    key = jax.random.PRNGKey(seed)
    k_init, k_run = jax.random.split(key)
    params = vae.init({"params": k_init}, jnp.zeros((1,) + images.shape[1:]))["params"]
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1),
                                                       max(steps, 2)))
    opt_state = tx.init(params)
    loss = vae_loss_fn(vae, kl_weight)

    @compiler.jit
    def step(params, opt_state, batch, key):
        (value, parts), grads = jax.value_and_grad(loss, has_aux=True)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": value, **parts}

    rng = np.random.default_rng(seed)
    history = []
    for i in range(steps):
        batch = images[rng.integers(0, len(images), batch_size)]           # [B, H, W, C]
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(k_run, i))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            row = {"step": i + 1, **{k: float(v) for k, v in metrics.items()}}
            history.append(row)
            if log is not None:
                log(i + 1, row)
    return params, history


def encode_mean(vae: AutoencoderKL, params, images: np.ndarray, chunk: int = 500) -> np.ndarray:
    """Posterior means of `images` [N, H, W, C], unscaled: float32 [N, H/f, W/f, latent]."""
    encode = compiler.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mean)
    return np.concatenate([np.asarray(encode(params, images[i:i + chunk]))
                           for i in range(0, len(images), chunk)])


def with_unit_scaling(vae: AutoencoderKL, params, images: np.ndarray) -> AutoencoderKL:
    """`vae` with scaling_factor = 1 / std of the posterior means of `images` (shift_factor
    unset), so `vae_latents` gives latents of unit standard deviation."""
    std = float(np.std(encode_mean(vae, params, images).astype(np.float64)))
    return vae.clone(scaling_factor=1.0 / std, shift_factor=None)


def reconstruction_error(vae: AutoencoderKL, params, images: np.ndarray) -> float:
    """Mean squared error of decode(posterior mean) against `images` (pixels in [-1, 1])."""
    decode = compiler.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
    z = encode_mean(vae, params, images)
    recon = np.concatenate([np.asarray(decode(params, z[i:i + 500]))
                            for i in range(0, len(z), 500)])
    return float(np.mean(np.square(recon - images)))
