"""A trained pixel-space model you can sample from: `jaxdiff.load(path).sample(16)`.

    model = jaxdiff.load("runs/digits")          # a work dir, its checkpoints/ or checkpoints/<step>
    images = model.sample(64, sampler="ddim", num_steps=50, seed=0)      # uint8 [64, 28, 28, 1]
    images = model.sample(10, labels=range(10), guidance_scale=2.0)      # class-conditional + CFG

Classifier-free guidance (Ho & Salimans 2022) goes through `jaxdiff.sampling.cfg`: the
conditional and the null-class halves go through the network as one batch, and the prediction is
`uncond + s * (cond - uncond)`; `s = 1` is plain conditional sampling.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import images as images_lib
from jaxdiff import samplers, sampling


def _network(module, params, x, t, labels):
    """The network's prediction at (x [B, H, W, C], t [B]) for class ids `labels` [B] (or None)."""
    return module.apply({"params": params}, x, t, labels)


def _conditional(module, params, labels, x, t):
    return _network(module, params, x, t, labels)


class DiffusionModel:
    """A U-Net with its parameters, EMA parameters, noise schedule and the config it was trained
    with. Attributes: `config`, `module`, `schedule`, `params`, `ema_params`, `image_shape`."""

    def __init__(self, *, config: ml_collections.ConfigDict, module, schedule, params, ema_params,
                 image_shape: Sequence[int]):
        self.config = config
        self.module = module
        self.schedule = schedule
        self.params = params
        self.ema_params = ema_params
        self.image_shape = tuple(image_shape)              # (H, W, C)
        # One function object each per model, so repeated calls hit jit's cache.
        self._network = functools.partial(_network, module)
        self._conditional = functools.partial(_conditional, module)

    @property
    def num_classes(self) -> int | None:
        return self.module.num_classes

    def grid_labels(self, num: int) -> np.ndarray | None:
        """Labels 0, 1, ..., K-1, 0, 1, ... so a grid with K columns shows one class per column."""
        if not self.num_classes:
            return None
        return np.arange(num, dtype=np.int32) % self.num_classes

    def sample(self, num: int, sampler: str = "ddim", num_steps: int = 50, seed: int = 0,
               labels: Sequence[int] | None = None, guidance_scale: float | None = None, *,
               use_ema: bool = True, batch_size: int | None = None, progress: bool = False,
               **sampler_options: Any) -> np.ndarray:
        """Draw `num` images. Returns uint8 `[num, H, W, C]`.

        labels: `[num]` class ids for a class-conditional model (None: unconditional, or for a
        conditional model the null class). guidance_scale: classifier-free guidance scale (None or
        1.0 without guidance). Sampler options (eta, timestep_spacing, ...) pass through to
        `jaxdiff.samplers.get`. The same seed gives the same images.
        """
        from tqdm.auto import tqdm

        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        labels = self._check_labels(labels, num)
        if guidance_scale is not None and labels is None:
            raise ValueError("guidance_scale needs a class-conditional model and labels")
        sampler_options.setdefault("prediction_type", self.config.diffusion.prediction_type)
        plan = samplers.get(sampler, self.schedule, num_steps, **sampler_options)
        params = self.ema_params if use_ema else self.params
        scale = None if guidance_scale is None or guidance_scale == 1.0 else guidance_scale

        batch_size = batch_size or num
        key = jax.random.PRNGKey(seed)
        k_noise, k_sample = jax.random.split(key)
        noise = jax.random.normal(k_noise, (num,) + self.image_shape, jnp.float32)
        out = []
        starts = range(0, num, batch_size)
        for i, s in enumerate(tqdm(starts, desc="sample", unit="batch", disable=not progress)):
            lab = None if labels is None else jnp.asarray(labels[s:s + batch_size])
            if scale is None or lab is None:
                model_fn = jax.tree_util.Partial(self._conditional, params, lab)
            else:
                null = jnp.full((1,), self.num_classes, jnp.int32)
                model_fn = sampling.cfg(jax.tree_util.Partial(self._network, params), scale, lab, null)
            x0 = sampling.sample(plan, model_fn, noise[s:s + batch_size], jax.random.fold_in(k_sample, i))
            out.append(images_lib.to_uint8(x0))
        return np.concatenate(out)

    def _check_labels(self, labels, num):
        if labels is None:
            if self.num_classes:
                return np.full((num,), self.num_classes, np.int32)    # the null class
            return None
        if not self.num_classes:
            raise ValueError("labels given, but this model is unconditional")
        labels = np.asarray(list(labels), dtype=np.int32)
        if labels.shape != (num,):
            raise ValueError(f"expected {num} labels, got {labels.shape[0]}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got {labels.min()}..{labels.max()}")
        return labels


def load(path: str, step: int | None = None) -> DiffusionModel:
    """Load a trained model from a work dir, its `checkpoints/` folder or one `checkpoints/<step>`.

    Raises `jaxdiff.checkpoint.CheckpointError` with the path when nothing loadable is there.
    """
    from jaxdiff import config as config_lib
    from jaxdiff.checkpoint import Checkpointer, resolve
    from jaxdiff.train import loop

    directory, found_step = resolve(path)
    step = step if step is not None else found_step
    ckpt = Checkpointer(directory, read_only=True)
    try:
        cfg = config_lib.from_json(json.dumps(ckpt.read_config(step)))
        image_shape, num_classes = _data_signature(cfg)
        module = loop.build_model(cfg, image_shape, num_classes)
        tx = loop.build_optimizer(cfg)
        abstract = jax.eval_shape(loop.init_state_fn(module, tx, image_shape, cfg.seed))
        state, _ = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    return DiffusionModel(config=cfg, module=module, schedule=loop.build_schedule(cfg),
                          params=state.params, ema_params=state.ema_params, image_shape=image_shape)


def _data_signature(cfg) -> tuple[tuple[int, int, int], int | None]:
    """(image shape, number of classes) of the run, as saved in its config."""
    sig = cfg.get("data_signature")
    if sig is None:
        from jaxdiff.checkpoint import CheckpointError
        raise CheckpointError("checkpoint config lacks data_signature (image shape / classes)")
    return tuple(sig["image_shape"]), sig["num_classes"]
