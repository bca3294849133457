"""A trained pixel-space model you can sample from: `jaxdiff.load(path).sample(16)`.

    model = jaxdiff.load("runs/digits")          # a work dir, its checkpoints/ or checkpoints/<step>
    images = model.sample(64, num_steps=50, seed=0)                      # uint8 [64, H, W, C]
    images = model.sample(10, labels=range(10), guidance_scale=2.0)      # class-conditional + CFG
    pictures = model.sample(4, labels=[7] * 4, output_type="pil")        # PIL images

A thin front end of the sampling core (`pipelines/core.py`): it turns labels into the network's
conditioning (the null class as the unconditional input of classifier-free guidance, Ho &
Salimans 2022, which runs when guidance_scale > 1) and hands the core the network, the sampler
plan and the image shape; the core draws the noise, pads the batch over the mesh, samples and
converts the result.

Devices: `load` lays the model out on a mesh of every device of every process (`jax.devices()`),
the parameters by the trainer's rule tables (`sharding.tree_shardings`):

    model = jaxdiff.load("runs/digits", rules="fsdp")     # parameters split over all devices
    images = model.sample(64)                             # batch split over all devices

The noise is drawn on the host for the requested images only, so a seed gives the same images on
1 device, 8, or 2 processes x 4 (up to float rounding). In a multi-process run every process
calls `sample` (it is a collective) and every process gets all the images.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import compiler, provenance, samplers
from jaxdiff import sharding as sharding_lib
from jaxdiff.errors import CheckpointError
from jaxdiff.models.dit import DiT
from jaxdiff.models.vae import decode_latents
from jaxdiff.pipelines import core
from jaxdiff.pipelines import options as options_lib
from jaxdiff.provenance import run as provenance_run

# The sampler of `sample()` when none is named.
DEFAULT_SAMPLER = "ddim"

# Sampler options pixel models get unless the call sets them. DDIM clips its x0 estimate to the
# data range [-1, 1] (diffusers' default, right for pixels) but, by diffusers' default, keeps
# stepping along the *unclipped* noise estimate; with guidance the two disagree and samples drift
# to blobs (measured on the demo model, 80 samples, 50 steps, digits read by
# `metrics.digits`: 34% right at guidance 2 and 0% at 4, against 100% and 100% with the noise
# re-derived from the clipped x0, which is what `use_clipped_model_output` does; 92-95% without
# guidance either way).
PIXEL_SAMPLER_OPTIONS = {"use_clipped_model_output": True}


# The sampler of a flow-matching run's `sample()` when none is named (`samplers.samples_flow` says
# which others can: the flow-only ones and those with a flow mode).
DEFAULT_FLOW_SAMPLER = "flow_euler"


def _network(module, params, x, t, labels):
    """The network's prediction at (x [B, H, W, C], t [B]) for class ids `labels` [B] (or None):
    the first C channels (a learned-sigma network's variance half is not a prediction)."""
    return module.apply({"params": params}, x, t, labels)[..., :x.shape[-1]]


def _reusing_network(module, params, x, t, labels, feature):
    """`_network` under the deep-feature-reuse convention (`core.Job.reusing_network`): feature
    None runs the whole U-Net and returns its deep feature, a feature the shallow branch."""
    out, feature = module.apply({"params": params}, x, t, labels, deep_feature=feature, return_deep_feature=True)
    return out[..., :x.shape[-1]], feature


def peak_bytes(module, height: int, width: int, guided_call: bool):
    """`rows -> bytes`, a lower bound of one network call's peak memory: the U-Net's
    (`core.unet_peak_bytes`), or for a DiT three token activations [T, D] and, off GPU, the
    [heads, T, T] float32 attention logits per image."""
    if not isinstance(module, DiT):
        return core.unet_peak_bytes(module, height, width, guided_call)
    tokens = (height // module.patch_size) * (width // module.patch_size)
    act = 3 * tokens * module.hidden_size * jnp.dtype(module.dtype).itemsize
    logits = module.num_heads * tokens * tokens * 4 if jax.default_backend() != "gpu" else 0
    factor = 2 if guided_call else 1
    return lambda rows: factor * rows * (act + logits)


class DiffusionModel:
    """A U-Net or DiT with its parameters, EMA parameters, noise schedule (a flow schedule for a
    flow-matching run) and the config it was trained with. Attributes: `config`, `module`, `schedule`, `params`, `ema_params` (laid out on `mesh`
    by `rules`), `image_shape`, `mesh`, `rules`.

    decode: for a latent model (a DiT trained on autoencoder latents), a jitted function of
    latents [rows, h, w, c] -> images [rows, H, W, C] in [-1, 1]; decoded_shape: (H, W, C).
    mesh: where sampling runs; None: every device of *this process* (a model built by hand, e.g.
    from weights gathered onto one host; `load` defaults to the devices of all processes).
    rules: "dp" (parameters replicated), "fsdp" or "fsdp_tp" (split as in training, see
    `jaxdiff.sharding`).
    """

    def __init__(self, *, config: ml_collections.ConfigDict, module, schedule, params, ema_params,
                 image_shape: Sequence[int], mesh=None, rules: str = "dp", decode: Callable | None = None,
                 decoded_shape: Sequence[int] | None = None):
        self.config = config
        self.decode = decode                               # latents -> images in [-1, 1], or None
        self.decoded_shape = None if decoded_shape is None else tuple(decoded_shape)
        self.module = module
        self.schedule = schedule
        self.mesh = sharding_lib.inference_mesh(rules, jax.local_devices()) if mesh is None else mesh
        self.rules = rules
        place = lambda tree: sharding_lib.place(tree, sharding_lib.tree_shardings(tree, self.mesh, rules))
        self.params = place(params)
        self.ema_params = place(ema_params)
        self.image_shape = tuple(image_shape)              # (H, W, C)
        self._network = functools.partial(_network, module)   # one object per model: jit's cache key
        self._weights_dtype = core.weights_dtype(module.dtype)          # weights cast once per request
        self._reusing_network = None if isinstance(module, DiT) else functools.partial(_reusing_network, module)

    @property
    def num_classes(self) -> int | None:
        return self.module.num_classes

    @property
    def is_flow(self) -> bool:
        """A flow-matching run (`diffusion.objective="flow"`): sampled with a flow sampler."""
        return self.config.diffusion.get("objective", "ddpm") == "flow"

    @property
    def prediction_type(self) -> str:
        return "flow_prediction" if self.is_flow else self.config.diffusion.prediction_type

    @property
    def default_sampler(self) -> str:
        """The sampler `sample()` uses when none is named: DDIM, or flow Euler for a flow run."""
        return DEFAULT_FLOW_SAMPLER if self.is_flow else DEFAULT_SAMPLER

    def grid_labels(self, num: int) -> np.ndarray | None:
        """Labels 0, 1, ..., K-1, 0, 1, ... so a grid with K columns shows one class per column."""
        if not self.num_classes:
            return None
        return np.arange(num, dtype=np.int32) % self.num_classes

    def sample(self, num: int, sampler: str | None = None, num_steps: int = 50, seed: int = 0,
               labels: Sequence[int] | None = None, guidance_scale: float | None = None, *,
               use_ema: bool = True, batch_size: int | None = None, progress: bool = False,
               output_type: str = "uint8", deep_cache: int | None = None, guidance_end: float | None = None,
               **sampler_options: Any):
        """Draw `num` images. Returns uint8 `[num, H, W, C]` (output_type "uint8"), float32 in
        [0, 1] ("np"), a list of PIL images ("pil") or the sampler's result in data scale, about
        [-1, 1] and unclipped ("latent").

        sampler: a `jaxdiff.samplers` name (default `DEFAULT_SAMPLER`); sampler options (eta,
        timestep_spacing, ...) pass through to `jaxdiff.samplers.get`, and the model's
        prediction type is filled in. labels: `[num]` class ids for a class-conditional model
        (None: unconditional, or for a conditional model the null class). guidance_scale:
        classifier-free guidance, on when > 1. The same seed gives the same images, whatever the
        mesh. batch_size: images per compiled call (default: all); each call's batch is split
        over the mesh, padded to a multiple of its batch shards. progress: a per-step bar.
        Every process of a multi-process run must call this, and every process gets all `num`
        images. diffusers' names are understood: num_inference_steps is num_steps; generator is
        answered with seed. deep_cache: k > 1 runs the whole U-Net every k-th model call and only
        its full-resolution level in between, from the cached deep feature (DeepCache, Ma et al.
        2023; `core.Job.deep_cache`); None, 0 or 1: off. guidance_end: guide only the first
        fraction in [0, 1] of the model calls (`core.Job.guidance_end`).
        """
        sampler_options, renamed = options_lib.take_aliases(sampler_options)
        num_steps = renamed.pop("num_steps", num_steps)
        if renamed:
            raise ValueError(f"DiffusionModel.sample has no option {', '.join(renamed)} (num is the number of images)")
        scale = core.check_scale("guidance_scale", guidance_scale, optional=True)
        num = options_lib.check_count("the number of images", num)
        h, w = self.image_shape[:2]
        peak = peak_bytes(self.module, h, w, core.guided(scale))
        core.check_memory(self.mesh, num, self.image_shape, rows=min(batch_size or num, num), peak_bytes=peak)
        labels = self._check_labels(labels, num)
        plan = self.plan(sampler, num_steps, **sampler_options)
        params = self.ema_params if use_ema else self.params
        job = core.Job(
            network=self._network, params=params, sampler=plan, shape=self.image_shape, num=num, seed=seed,
            cond=labels, uncond=None if labels is None else np.full((1,), self.num_classes, np.int32),
            guidance_scale=scale, batch_size=batch_size, peak_bytes=peak, decode=self.decode,
            image_shape=self.decoded_shape, deep_cache=deep_cache, reusing_network=self._reusing_network,
            guidance_end=guidance_end, weights_dtype=self._weights_dtype)
        return core.run(job, self.mesh, output_type=output_type, progress=progress)

    def warmup(self, num: int, *args: Any, **kwargs: Any):
        """Compile every program `self.sample(num, *args, **kwargs)` would run, running none; only
        the shapes matter (num, batch_size, sampler, steps, guidance on or off, output_type).
        Returns `warmup.Report` (programs compiled, cache hits, seconds); see `pipelines/warmup.py`."""
        from jaxdiff.pipelines import warmup as warmup_lib
        return warmup_lib.warm(self.sample, num, *args, **kwargs)

    def plan(self, sampler: str | None = None, num_steps: int = 50, **options: Any):
        """The sampler `sample` would use: `samplers.get(sampler or self.default_sampler, ...)`
        with this model's prediction type and `PIXEL_SAMPLER_OPTIONS` under `options`. A
        flow-matching run takes the flow samplers and those with a flow mode (`samplers.FLOW_MODE`: its
        schedule is `schedules.flow`); a DDPM run refuses the flow-only ones."""
        name = sampler or self.default_sampler
        valid = samplers.options(name)                      # an unknown name: one line naming the valid ones
        if (self.is_flow and not samplers.samples_flow(name)) or (name in samplers.FLOW_ONLY and not self.is_flow):
            flows = list(samplers.FLOW_ONLY + samplers.FLOW_MODE)
            raise ValueError(f"sampler {name!r} cannot sample this model: it was trained "
                             + (f"by flow matching; use one of {', '.join(flows)}" if self.is_flow else
                                f"with the DDPM objective; flow samplers ({', '.join(flows)}) need a flow-matching run"))
        opts = {k: v for k, v in PIXEL_SAMPLER_OPTIONS.items() if k in valid}
        if self.decode is not None and "clip_sample" in valid:
            opts["clip_sample"] = False                 # latents are not confined to [-1, 1]
        opts.update(options)
        if "prediction_type" in valid:
            opts.setdefault("prediction_type", self.prediction_type)
        return samplers.get(name, self.schedule, options_lib.check_steps(num_steps), **opts)

    def _check_labels(self, labels, num):
        if labels is None:
            if self.num_classes:
                return np.full((num,), self.num_classes, np.int32)    # the null class
            return None
        if not self.num_classes:
            raise ValueError("labels given, but this model is unconditional")
        try:
            labels = np.asarray(list(labels))
        except TypeError:
            raise ValueError(f"labels must be a sequence of {num} class ids, got {labels!r}") from None
        if labels.shape != (num,):
            raise ValueError(f"expected {num} labels, got {labels.shape[0] if labels.ndim else labels}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids, got {labels.dtype} values")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got {labels.min()}..{labels.max()}")
        return labels.astype(np.int32)


def load(path: str, step: int | None = None, *, mesh=None, rules: str = "dp") -> DiffusionModel:
    """Load a trained model from a work dir, its `checkpoints/` folder or one `checkpoints/<step>`.

    mesh: the devices to sample on (None: every device of every process, on the batch axis of
    `sharding.inference_mesh(rules)`). rules: parameter layout, "dp" (replicated), "fsdp" or
    "fsdp_tp"; the checkpoint is restored straight onto that layout. In a multi-process run
    every process calls `load`.
    Raises `jaxdiff.errors.CheckpointError` with the path when nothing loadable is there.
    """
    from jaxdiff import config as config_lib
    from jaxdiff.checkpoint import Checkpointer, resolve
    from jaxdiff.train import build

    directory, found_step = resolve(path)
    step = step if step is not None else found_step
    ckpt = Checkpointer(directory, read_only=True)
    try:
        cfg = config_lib.from_json(json.dumps(ckpt.read_config(step)))
        if build.is_latent_text(cfg) and build.model_kind(cfg) == "dit":
            raise CheckpointError(f"{path} is a DiT trained on autoencoder latents (its config has a vae section); "
                                  "jaxdiff.load reads pixel runs only: its samples are the run's samples.png")
        if build.is_latent_text(cfg):
            raise CheckpointError(f"{path} is a latent text-to-image run (its config has a vae section); "
                                  f"write it as a Stable Diffusion folder with `jaxdiff export {path} --out DIR` "
                                  "and load that with jaxdiff.StableDiffusion.from_pretrained(DIR)")
        image_shape, num_classes = _data_signature(cfg)
        module = build.build_model(cfg, image_shape, num_classes)
        tx = build.build_optimizer(cfg)
        abstract = jax.eval_shape(build.init_state_fn(module, tx, image_shape, cfg.seed))
        mesh = sharding_lib.inference_mesh(rules) if mesh is None else mesh
        target = sharding_lib.with_shardings(abstract, sharding_lib.tree_shardings(abstract, mesh, rules))
        state, _ = ckpt.restore(target, step)
    finally:
        ckpt.close()
    return DiffusionModel(config=cfg, module=module, schedule=build.build_schedule(cfg),
                          params=state.params, ema_params=state.ema_params, image_shape=image_shape,
                          mesh=mesh, rules=rules)


def _data_signature(cfg) -> tuple[tuple[int, int, int], int | None]:
    """(image shape, number of classes) of the run, as saved in its config."""
    sig = cfg.get("data_signature")
    if sig is None:
        raise CheckpointError("checkpoint config lacks data_signature (image shape / classes)")
    return tuple(sig["image_shape"]), sig["num_classes"]


@functools.lru_cache(maxsize=4)
def _decoder(vae):
    """One jitted `decode(vae_params, latents)` per autoencoder module: jit's cache key."""
    return compiler.jit(functools.partial(decode_latents, vae))


def write_run_samples(run, params, name: str, final: bool = True) -> str:
    """The trainer's sample grid of a pixel run (or of a class-conditional DiT on autoencoder
    latents, decoded): `cfg.sample.num` samples with `params` (the EMA weights), one class per
    column for a class-conditional model, written to `run.workdir/name`."""
    cfg, parts = run.cfg, getattr(run.task, "parts", None)
    latent = {}
    if parts is not None:                              # a class-conditional DiT on autoencoder latents
        latent = {"decode": functools.partial(_decoder(parts.vae), parts.vae_params),
                  "decoded_shape": run.task.pixel_shape}
    model = DiffusionModel(config=cfg, module=run.model, schedule=run.schedule, params=params,
                           ema_params=params, image_shape=run.task.image_shape, **latent)
    labels = model.grid_labels(cfg.sample.num)
    pictures = model.sample(cfg.sample.num, sampler=cfg.sample.sampler, num_steps=cfg.sample.steps,
                            seed=cfg.seed, labels=labels,
                            guidance_scale=cfg.sample.guidance_scale if labels is not None else None,
                            progress=final and run.progress)
    shown = model.decoded_shape or model.image_shape                      # (H, W, C) of the pictures
    recipe = provenance_run.grid_recipe(
        run, params, name, final, sampler=cfg.sample.sampler, steps=cfg.sample.steps, num=cfg.sample.num,
        guidance_scale=cfg.sample.guidance_scale if labels is not None else None, height=shown[0],
        width=shown[1], labels=None if labels is None else "grid")
    return provenance.save_png(pictures, os.path.join(run.workdir, name), recipe,
                               ncols=model.num_classes if labels is not None else None)
