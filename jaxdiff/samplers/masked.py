"""Inpainting by mask blending: any sampler, with a known region pinned to a noised image.

    sampler = samplers.get("ddim", schedule, num_steps=30)
    sampler = masked.masked(sampler, mask, known=image_latents, noise=noise)
    x0 = sampling.sample(sampler, model_fn, noise, key)

After every model call, the region where `mask` is 0 is replaced by the known latents noised to
the level of the *next* call, through the same noise the run started from (the forward process in
the sampler's own coordinates, `signal_scales[i] known + noise_scales[i] noise`); after the last
call it is the clean `known` itself:

    x <- mask * step(x) + (1 - mask) * (signal_{i+1} known + noise_{i+1} eps)

This is how diffusers' `StableDiffusionInpaintPipeline` inpaints with an ordinary (4-channel)
Stable Diffusion U-Net (a 9-channel inpainting U-Net sees the mask instead and needs no blending). It is a wrapper of the
sampler's `step`, so the driver in `sampling.py` runs it unchanged, with the mask and the known
latents as traced leaves (new masks or images reuse the compiled loop).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers import base


def masked(sampler: base.Sampler, mask, known, noise) -> base.Sampler:
    """`sampler` with the region `mask == 0` pinned to `known` noised to each next level.

    mask: [B, h, w, 1] (or broadcastable to x) in [0, 1]; 1 = generate, 0 = keep `known`.
    known: [B, h, w, C] clean latents (in the data coordinates, the x0 of `sampling.sample`).
    noise: [B, h, w, C], the standard-normal noise the run starts from (`sampling.sample`'s noise).
    The sampler's plan must carry its noise levels (`signal_scales` / `noise_scales`).
    """
    mask, known, noise = (jnp.asarray(a, jnp.float32) for a in (mask, known, noise))
    if known.shape != noise.shape:
        raise ValueError(f"known latents {tuple(known.shape)} and noise {tuple(noise.shape)} must have the "
                         "same shape")
    try:
        jnp.broadcast_shapes(mask.shape, known.shape)
    except ValueError:
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to the latents {tuple(known.shape)}") from None
    if sampler.plan.signal_scales is None:
        raise ValueError("this sampler's plan has no noise levels (signal_scales / noise_scales), so it cannot "
                         "blend a known region")
    return sampler._replace(step=jax.tree_util.Partial(_masked_step, sampler.step, mask, known, noise))


def _masked_step(step, mask, known, noise, state: base.SamplerState, x, model_output, key):
    x, state = step(state, x, model_output, key)
    # `state.index` now names the next call; past the last real call the level is the clean end.
    last = base.num_model_calls(state) - 1
    i = jnp.minimum(state.index, last)
    finished = state.index >= state.num_calls
    signal = jnp.where(finished, 1.0, state.signal_scales[i])
    noise_scale = jnp.where(finished, 0.0, state.noise_scales[i])
    pinned = signal * known + noise_scale * noise                                   # [B, h, w, C]
    return mask * x + (1.0 - mask) * pinned, state
