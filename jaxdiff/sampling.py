"""The sampling loop: one `jax.lax.scan` over a sampler's model calls, under `jax.jit` (`compiler.jit`).

    sampler = samplers.get("ddim", schedule, num_steps=50)
    model_fn = jax.tree_util.Partial(apply_fn, params)       # model_fn(x, t) -> prediction
    x0 = sampling.sample(sampler, model_fn, noise, key)

`model_fn(x [B, ...], t [B] float32) -> [B, ...]` returns the network's native prediction (eps, x0
or v, as the sampler's `prediction_type` says) at the training-scale timestep t. Conditioning,
guidance and parameters enter as leading arguments of a `jax.tree_util.Partial`: they are then
traced arguments of the compiled loop, so new parameter values, labels or guidance scales reuse
the compiled program. (A plain function also works, but whatever it closes over is baked into the
program as a constant, and a new function object compiles anew.)

Classifier-free guidance wraps a conditional network into such a model_fn, with the conditioning
and the scales as traced leaves:

    guided = sampling.cfg(cond_apply_fn, guidance_scale=7.5, cond=emb, uncond=null_emb)
    x0 = sampling.sample(sampler, guided, noise, key)

The network is traced once per compile, whatever the number of steps; the loop recompiles only
when the shapes (batch, image size, length of the plan) or a sampler's static options
(prediction type, dynamic thresholding) change. A sampler built with `max_steps` pads its plan to
a fixed length, so every step count up to it, every img2img start (`start_step`, with `x0`), every
eta and guidance scale runs through one compiled program:

    sampler = samplers.get("dpmpp_2m", schedule, num_steps=30, max_steps=100, start_step=12)
    x0 = sampling.sample(sampler, guided, noise, key, x0=image_latents)    # img2img, strength 0.6

Deep feature reuse (DeepCache, Ma et al. 2023): adjacent calls of a U-Net compute nearly the same
deep features, so a run can compute them every k-th call only and run the cheap shallow branch
from the cached ones in between. The model function then takes and returns the cache,
`model_fn(x, t, feature) -> (prediction, feature)` (feature None: the whole network, returning a
fresh feature; a cached one: the shallow branch, returning it unchanged), and the loop carries it:

    x0 = sampling.sample(sampler, reusing_fn, noise, key, reuse_every=3)   # full, shallow, shallow, full...

k is traced, so every k (1 included: every call full, the plain result) runs one program.

The sampler math runs in float32 whatever dtype the network returns. Pipelines do not call this
directly: they hand a job to the one sampling core, `jaxdiff.pipelines.core`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler
from jaxdiff.samplers import base

# The largest reuse interval `check_reuse_every` accepts: far beyond any plan's length, so a
# larger number is a mistake (and would overflow the traced int32 counter sooner or later).
MAX_REUSE_EVERY = 1000


def check_reuse_every(every, name: str = "reuse_every") -> int:
    """`every` as an int in [1, MAX_REUSE_EVERY], or a one-line ValueError naming `name` (a bool
    or a non-integral number never is one)."""
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or not 1 <= every <= MAX_REUSE_EVERY:
        raise ValueError(f"{name} must be an integer from 1 to {MAX_REUSE_EVERY} (a full network call every "
                         f"that many calls), got {every!r}")
    return int(every)


def sample(sampler: base.Sampler, model_fn: Callable, noise: jax.Array, key: jax.Array, *,
           x0: jax.Array | None = None, return_trajectory: bool = False,
           progress: Callable[[int, int], None] | None = None, reuse_every: int | None = None):
    """Integrate from noise to data.

    noise: [B, ...] ~ N(0, I); the sampler's `init_sigma` scales it to the initial latent.
    key: PRNG key of the run (each stochastic step folds in its index).
    x0: optional clean data [B, ...] to start from instead of pure noise (img2img): the initial
        latent is then x0 noised to the level of the sampler's first call, `signal * x0 + noise_scale
        * noise` (the forward process, as diffusers' `scheduler.add_noise`), and a sampler built with
        `start_step=k` denoises from there through its remaining steps.
    Returns x0 [B, ...] float32, and with `return_trajectory=True` also the sample after each
    iteration, [num_model_calls, B, ...] float32: one entry per planned call (entries past the
    last real call of a padded plan repeat the result), the last entry the result.
    progress: `progress(done, total)` called on the host after each model call as the compiled
        loop runs (done = calls made, total = calls this run makes); the call returns once the
        result is ready. A loop with progress is compiled once more than one without (a static
        option), and reports cost a host callback per call, negligible beside a network.
    reuse_every: deep feature reuse. None: model_fn(x, t) -> prediction, as above. An integer k
        >= 1: model_fn follows the reuse convention, model_fn(x, t, feature) -> (prediction,
        feature) (see the module docstring; feature leaves have the batch as leading axis), and
        the call numbered n from the run's first call (its `start_step` counted out) runs the
        whole network when n % k == 0, the shallow branch from the feature cached then
        otherwise (`lax.cond`, so a shallow call does not run the deep blocks). k is traced:
        every k shares one program (one other than None's), and k = 1 gives the result of the
        plain run.
    """
    args, reuse = _arguments(sampler, model_fn, noise, key, x0, reuse_every)
    if progress is None:
        return _run(*args, return_trajectory=return_trajectory, **reuse)
    with _listening(progress):
        return jax.block_until_ready(_run(*args, return_trajectory=return_trajectory, progress=True, **reuse))


def lower(sampler: base.Sampler, model_fn: Callable, noise: jax.Array, key: jax.Array, *,
          x0: jax.Array | None = None, return_trajectory: bool = False,
          reuse_every: int | None = None, progress: bool = False) -> jax.stages.Lowered:
    """The compiled program `sample` would run for these arguments, lowered but not run:
    `.compile()` it to time compilation or read `.memory_analysis()` / `.cost_analysis()`.
    progress: lower the program `sample(..., progress=...)` runs (it reports each call)."""
    args, reuse = _arguments(sampler, model_fn, noise, key, x0, reuse_every)
    if progress:   # passed only when set, as `sample` does: jit keys a given keyword apart from its default
        reuse = {**reuse, "progress": True}
    return _run.lower(*args, return_trajectory=return_trajectory, **reuse)


def _arguments(sampler, model_fn, noise, key, x0, reuse_every=None):
    """The arguments of `_run`, checked: x0 (zeros when absent) and a traced `from_image` flag;
    and its keyword arguments: {"every": the traced reuse interval}, or none without reuse."""
    if key is None:
        key = jax.random.PRNGKey(0)
    noise = jnp.asarray(noise)
    from_image = x0 is not None
    x0 = jnp.zeros_like(noise) if x0 is None else jnp.asarray(x0)
    if x0.shape != noise.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but noise has shape {tuple(noise.shape)}; they must match")
    if from_image and jax.eval_shape(sampler.init, noise).signal_scales is None:
        raise ValueError("this sampler's plan has no noise levels (signal_scales / noise_scales), so it cannot "
                         "start from an image x0")
    reuse = {} if reuse_every is None else {"every": jnp.asarray(check_reuse_every(reuse_every), jnp.int32)}
    return (sampler, _as_partial(model_fn), noise, key, x0, jnp.asarray(from_image)), reuse


def invert(sampler: base.Sampler, model_fn: Callable, x0: jax.Array, *, return_trajectory: bool = False):
    """Run a deterministic inverse sampler from data x0 [B, ...] towards noise.

    sampler: e.g. `samplers.get("ddim_inverse", schedule, num_steps, **same_options_as_ddim)`.
    Returns the latent [B, ...] float32 that the forward sampler with the same options maps back
    to (approximately) x0, and optionally the trajectory [num_model_calls, B, ...].
    """
    x0 = jnp.asarray(x0)
    return _run(sampler, _as_partial(model_fn), x0, jax.random.PRNGKey(0), jnp.zeros_like(x0), jnp.asarray(False),
                return_trajectory=return_trajectory)


def _as_partial(model_fn: Callable) -> jax.tree_util.Partial:
    if isinstance(model_fn, jax.tree_util.Partial):
        return model_fn
    if not callable(model_fn):
        raise ValueError(f"model_fn must be callable (x, t) -> prediction, got {type(model_fn).__name__}")
    return jax.tree_util.Partial(model_fn)


# Progress: the compiled loop calls `_report` on the host after each model call; it hands the
# count to the innermost active listener (a stack, so nested runs report to their own bar).
_LISTENERS: list[Callable[[int, int], None]] = []


@contextlib.contextmanager
def _listening(listener: Callable[[int, int], None]):
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def _report(done, total) -> None:
    # Called once per device holding the (replicated) counters, in any order: listeners take
    # the largest count they have seen.
    if _LISTENERS:
        _LISTENERS[-1](int(done), int(total))


@functools.partial(compiler.jit, static_argnames=("return_trajectory", "progress"))
def _run(sampler: base.Sampler, model_fn: jax.tree_util.Partial, noise: jax.Array, key: jax.Array,
         x0: jax.Array, from_image: jax.Array, return_trajectory: bool = False, progress: bool = False,
         every: jax.Array | None = None):
    # from_image is traced, so text-to-image and image-to-image requests share one program;
    # so is `every`, the reuse interval (None: the plain model_fn, a static choice).
    noise = noise.astype(jnp.float32)
    state = sampler.init(noise)
    x = state.init_sigma * noise                                               # [B, ...]
    if state.signal_scales is not None:
        noised = state.signal_scales[state.index] * x0.astype(jnp.float32) + state.noise_scales[state.index] * noise
        x = jnp.where(from_image, noised, x)
    batch = noise.shape[0]
    first = state.index                                                        # a late start skips calls

    t_shape = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cache = None
    if every is not None:
        # the cache's first value is never read: the run's first call is always a full one
        shapes = jax.eval_shape(lambda x, t: model_fn(x, t, None)[1], jax.ShapeDtypeStruct(x.shape, x.dtype), t_shape)
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def network(x, t, state, cache):
        if every is None:
            return model_fn(x, t), cache
        refresh = (state.index - first) % every == 0
        return jax.lax.cond(refresh, lambda: model_fn(x, t, None), lambda: model_fn(x, t, cache))

    def call(x, state, cache):
        t, scale = base.next_call(state)                                      # [], []
        out, cache = network(scale * x, jnp.full((batch,), t, jnp.float32), state, cache)   # [B, ...]
        x, state = sampler.step(state, x, out.astype(jnp.float32), key)
        if progress:
            jax.debug.callback(_report, state.index - first, state.num_calls - first)
        return x, state, cache

    def body(carry, _):
        # Once `index` reaches `num_calls` (after a late start, or over padding) iterations do nothing.
        x, state, cache = carry
        x, state, cache = jax.lax.cond(state.index < state.num_calls, call, lambda *c: c, x, state, cache)
        return (x, state, cache), (x if return_trajectory else None)

    (x, _, _), trajectory = jax.lax.scan(body, (x, state, cache), None, length=base.num_model_calls(state))
    return (x, trajectory) if return_trajectory else x


# --------------------------------------------------------------------------------------------
# Classifier-free guidance.
# --------------------------------------------------------------------------------------------

def cfg(model_fn: Callable, guidance_scale, cond, uncond, guidance_rescale=0.0, *,
        guidance_cutoff=None, reuse: bool = False) -> jax.tree_util.Partial:
    """Classifier-free guidance (Ho & Salimans 2022) as a model_fn wrapper, for every sampler.

    model_fn(x [2B, ...], t [2B], cond) -> [2B, ...]: the conditional network; `cond` is any pytree
    whose leaves have a leading batch axis.
    cond, uncond: the conditioning and the "null" conditioning, pytrees of the same structure
    (leading axis B; uncond leaves may have leading axis 1, e.g. one null embedding, and are
    broadcast). guidance_scale w, guidance_rescale phi: floats or scalar arrays.

    Returns guided(x [B, ...], t [B]) -> [B, ...], a `jax.tree_util.Partial` holding cond,
    uncond, w and phi as traced leaves: `sample(sampler, cfg(...), noise, key)` compiles once and
    new conditioning, scales or rescale factors reuse the compiled loop. Each call makes one
    network call on the batch [uncond; cond] and combines the two halves of its native output
    (eps or v, as the reference pipelines do):

        guided = out_u + w (out_c - out_u)       (Ho & Salimans 2022, eq. 6, whose w is our w - 1)
        rescaled = guided * std(out_c) / std(guided)                (Lin et al. 2023, sec. 3.4)
        result = phi rescaled + (1 - phi) guided

    with std over each example's elements. w = 1 gives the conditional model; phi = 0 plain CFG.

    guidance_cutoff: truncated guidance (`guidance_cutoff(sampler, guidance_end)`), a traced
    training-scale timestep: calls at t > cutoff are guided, later ones (t <= cutoff) return the
    conditional prediction alone, from a call on the B conditional rows only (`lax.cond`), so the
    unguided steps cost half the network work. The loop then holds the network twice (batch 2B
    and B), which roughly doubles its compile time, once for every cutoff; None (the default)
    keeps the one-branch program.

    reuse: deep feature reuse (`sample(..., reuse_every=k)`). model_fn then follows the reuse
    convention, model_fn(x [2B, ...], t [2B], cond, feature) -> ([2B, ...], feature), and so does
    the result, guided(x [B, ...], t [B], feature) -> ([B, ...], feature): the cache holds the
    features of the batch [uncond; cond], 2B rows. With a guidance_cutoff, the unguided calls
    (batch B) read the conditional half of the cache, rows B..2B, and a full unguided call
    stores its fresh feature in both halves (the unconditional half is not read again: t only
    falls, so no guided call follows).
    """
    args = (_as_partial(model_fn), cond, uncond, jnp.asarray(guidance_scale, jnp.float32),
            jnp.asarray(guidance_rescale, jnp.float32))
    if reuse:
        if guidance_cutoff is None:
            return jax.tree_util.Partial(_guided_reusing, *args)
        return jax.tree_util.Partial(_guided_until_reusing, *args, jnp.asarray(guidance_cutoff, jnp.float32))
    if guidance_cutoff is None:
        return jax.tree_util.Partial(_guided, *args)
    return jax.tree_util.Partial(_guided_until, *args, jnp.asarray(guidance_cutoff, jnp.float32))


def guidance_cutoff(sampler: base.Sampler, guidance_end) -> float:
    """The `cfg(..., guidance_cutoff=)` that guides the first `guidance_end` fraction (in [0, 1])
    of a run's model calls: with n calls from the plan's start (`start_step` and padding
    counted), the first round(guidance_end * n) are guided. Returns the timestep of the first
    unguided call (-inf when every call is guided), computed on the host from the plan, so a new
    fraction is a new traced value, not a new program. Calls sharing that timestep (a two-call
    solver such as Heun evaluates each level twice) are unguided as well."""
    fraction = float(guidance_end)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"guidance_end must lie in [0, 1], got {fraction:g}")
    plan = sampler.plan
    start, stop = int(plan.index), int(plan.num_calls)
    guided_calls = round(fraction * (stop - start))
    if guided_calls >= stop - start:
        return -float("inf")
    return float(np.asarray(plan.timesteps)[start + guided_calls])


def _guided(model_fn, cond, uncond, guidance_scale, guidance_rescale, x, t):
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), _both(cond, uncond))   # [2B, ...]
    return _combine(out, x.shape[0], guidance_scale, guidance_rescale)


def _both(cond, uncond):
    """The conditioning of the batch [uncond; cond]: leaves [2B, ...]."""
    uncond = jax.tree.map(lambda u, c: jnp.broadcast_to(u, c.shape).astype(c.dtype), uncond, cond)
    return jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)


def _combine(out, batch, guidance_scale, guidance_rescale):
    """The guided prediction [B, ...] from the network's output on [uncond; cond], [2B, ...]."""
    out_u, out_c = out[:batch].astype(jnp.float32), out[batch:].astype(jnp.float32)
    guided = out_u + guidance_scale * (out_c - out_u)
    return rescale_guidance(guided, out_c, guidance_rescale)


def _guided_reusing(model_fn, cond, uncond, guidance_scale, guidance_rescale, x, t, feature):
    """`_guided` under the reuse convention: the feature cache holds 2B rows."""
    out, feature = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), _both(cond, uncond), feature)
    return _combine(out, x.shape[0], guidance_scale, guidance_rescale), feature


def _guided_until_reusing(model_fn, cond, uncond, guidance_scale, guidance_rescale, cutoff, x, t, feature):
    """`_guided_until` under the reuse convention (see `cfg`): unguided calls read and write the
    conditional half of the 2B-row cache."""
    batch = x.shape[0]

    def conditional(x, t):
        half = None if feature is None else jax.tree.map(lambda f: f[batch:], feature)      # [B, ...]
        out, fresh = model_fn(x, t, cond, half)
        return out.astype(jnp.float32), jax.tree.map(lambda f: jnp.concatenate([f, f]), fresh)  # [2B, ...]

    def guided(x, t):
        return _guided_reusing(model_fn, cond, uncond, guidance_scale, guidance_rescale, x, t, feature)

    return jax.lax.cond(t[0] > cutoff, guided, conditional, x, t)


def _guided_until(model_fn, cond, uncond, guidance_scale, guidance_rescale, cutoff, x, t):
    """`_guided` while t > cutoff, then the conditional network alone (t is one level for the batch)."""
    def conditional(x, t):
        return model_fn(x, t, cond).astype(jnp.float32)                                # [B, ...]

    def guided(x, t):
        return _guided(model_fn, cond, uncond, guidance_scale, guidance_rescale, x, t)  # [B, ...]

    return jax.lax.cond(t[0] > cutoff, guided, conditional, x, t)


def rescale_guidance(guided, cond_out, guidance_rescale):
    """Guidance rescale (Lin et al. 2023, sec. 3.4): match each example's std of the
    guided prediction to that of the conditional one, and mix by phi = guidance_rescale:
    phi * guided * std(cond_out) / std(guided) + (1 - phi) * guided. [B, ...] float32.
    (Where std(guided) = 0 the ratio is taken as 1.)"""
    axes = tuple(range(1, guided.ndim))
    std_c = jnp.std(cond_out, axis=axes, keepdims=True)                              # [B, 1, ...]
    std_g = jnp.std(guided, axis=axes, keepdims=True)
    ratio = jnp.where(std_g > 0, std_c / jnp.where(std_g > 0, std_g, 1.0), 1.0)
    return guidance_rescale * (guided * ratio) + (1.0 - guidance_rescale) * guided
