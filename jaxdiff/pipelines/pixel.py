"""A trained pixel-space model you can sample from: `jaxdiff.load(path).sample(16)`.

    model = jaxdiff.load("runs/digits")          # a work dir, its checkpoints/ or checkpoints/<step>
    images = model.sample(64, sampler="ddim", num_steps=50, seed=0)      # uint8 [64, 28, 28, 1]
    images = model.sample(10, labels=range(10), guidance_scale=2.0)      # class-conditional + CFG

Classifier-free guidance (Ho & Salimans 2022) goes through `jaxdiff.sampling.cfg`: the
conditional and the null-class halves go through the network as one batch, and the prediction is
`uncond + s * (cond - uncond)`; `s = 1` is plain conditional sampling.

Devices: `load` lays the model out on a mesh of every device of every process (`jax.devices()`),
the parameters by the trainer's rule tables (`sharding.tree_shardings`):

    model = jaxdiff.load("runs/digits", rules="fsdp")     # parameters split over all devices
    images = model.sample(64)                             # batch split over all devices

A batch is split over the mesh's `data` x `fsdp` axes; one that does not divide evenly is padded
(with copies of its last row) to the next multiple and the extra images are dropped. The noise is
drawn on the host for the requested images only, so a seed gives the same images on 1 device, 8,
or 2 processes x 4 (up to float rounding). In a multi-process run every process calls `sample`
(it is a collective) and every process gets all the images.
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
from jaxdiff import sharding as sharding_lib


def _network(module, params, x, t, labels):
    """The network's prediction at (x [B, H, W, C], t [B]) for class ids `labels` [B] (or None)."""
    return module.apply({"params": params}, x, t, labels)


def _conditional(module, params, labels, x, t):
    return _network(module, params, x, t, labels)


class DiffusionModel:
    """A U-Net with its parameters, EMA parameters, noise schedule and the config it was trained
    with. Attributes: `config`, `module`, `schedule`, `params`, `ema_params` (laid out on `mesh`
    by `rules`), `image_shape`, `mesh`, `rules`.

    mesh: where sampling runs; None: every device of *this process* (a model built by hand, e.g.
    from weights gathered onto one host; `load` defaults to the devices of all processes).
    rules: "dp" (parameters replicated), "fsdp" or "fsdp_tp" (split as in training, see
    `jaxdiff.sharding`).
    """

    def __init__(self, *, config: ml_collections.ConfigDict, module, schedule, params, ema_params,
                 image_shape: Sequence[int], mesh=None, rules: str = "dp"):
        self.config = config
        self.module = module
        self.schedule = schedule
        self.mesh = sharding_lib.inference_mesh(rules, jax.local_devices()) if mesh is None else mesh
        self.rules = rules
        place = lambda tree: sharding_lib.place(tree, sharding_lib.tree_shardings(tree, self.mesh, rules))  # noqa: E731
        self.params = place(params)
        self.ema_params = place(ema_params)
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
               output_type: str = "uint8", **sampler_options: Any) -> np.ndarray:
        """Draw `num` images. Returns uint8 `[num, H, W, C]`, or with `output_type="float"` the
        sampler's float32 result `[num, H, W, C]` (data scale, about [-1, 1], unclipped).

        labels: `[num]` class ids for a class-conditional model (None: unconditional, or for a
        conditional model the null class). guidance_scale: classifier-free guidance scale (None or
        1.0 without guidance). Sampler options (eta, timestep_spacing, ...) pass through to
        `jaxdiff.samplers.get`. The same seed gives the same images, whatever the mesh.
        batch_size: images per compiled call (default: all); each call's batch is split over the
        mesh, padded to a multiple of its batch shards. Every process of a multi-process run must
        call this, and every process gets all `num` images.
        """
        from tqdm.auto import tqdm

        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if output_type not in ("uint8", "float"):
            raise ValueError(f"output_type must be 'uint8' or 'float', got {output_type!r}")
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
        # Drawn for the requested images alone (on this process's default device, the same on
        # every process), so padding and the device count do not change them.
        noise = np.asarray(jax.random.normal(k_noise, (num,) + self.image_shape, jnp.float32))
        out = []
        starts = range(0, num, batch_size)
        for i, s in enumerate(tqdm(starts, desc="sample", unit="batch", disable=not progress)):
            n = min(batch_size, num - s)
            rows = sharding_lib.padded_batch(n, self.mesh)
            lab = None if labels is None else sharding_lib.put_batch(labels[s:s + n], self.mesh, rows)
            if scale is None or lab is None:
                model_fn = jax.tree_util.Partial(self._conditional, params, lab)
            else:
                null = jnp.full((1,), self.num_classes, jnp.int32)
                model_fn = sampling.cfg(jax.tree_util.Partial(self._network, params), scale, lab, null)
            x = sharding_lib.put_batch(noise[s:s + n], self.mesh, rows)                 # [rows, H, W, C]
            x0 = sampling.sample(plan, model_fn, x, jax.random.fold_in(k_sample, i))
            out.append(sharding_lib.gather(x0)[:n])
        out = np.concatenate(out)
        return out if output_type == "float" else images_lib.to_uint8(out)

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


def load(path: str, step: int | None = None, *, mesh=None, rules: str = "dp") -> DiffusionModel:
    """Load a trained model from a work dir, its `checkpoints/` folder or one `checkpoints/<step>`.

    mesh: the devices to sample on (None: every device of every process, on the batch axis of
    `sharding.inference_mesh(rules)`). rules: parameter layout, "dp" (replicated), "fsdp" or
    "fsdp_tp"; the checkpoint is restored straight onto that layout. In a multi-process run
    every process calls `load`.
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
        mesh = sharding_lib.inference_mesh(rules) if mesh is None else mesh
        target = sharding_lib.with_shardings(abstract, sharding_lib.tree_shardings(abstract, mesh, rules))
        state, _ = ckpt.restore(target, step)
    finally:
        ckpt.close()
    return DiffusionModel(config=cfg, module=module, schedule=loop.build_schedule(cfg),
                          params=state.params, ema_params=state.ema_params, image_shape=image_shape,
                          mesh=mesh, rules=rules)


def _data_signature(cfg) -> tuple[tuple[int, int, int], int | None]:
    """(image shape, number of classes) of the run, as saved in its config."""
    sig = cfg.get("data_signature")
    if sig is None:
        from jaxdiff.errors import CheckpointError
        raise CheckpointError("checkpoint config lacks data_signature (image shape / classes)")
    return tuple(sig["image_shape"]), sig["num_classes"]
