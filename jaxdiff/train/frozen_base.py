"""Training one part on a frozen Stable Diffusion base: what LoRA training (`train/lora.py`) and
ControlNet training (`train/controlnet.py`) share.

The base is a diffusers Stable Diffusion folder (what `jaxdiff export` writes from a digits_text
run). Its autoencoder and text encoder make the cached latents and caption states exactly as a
latent text run does (`train/latent.py`); its U-Net is frozen. What the trainer holds:

    TrainState.params / ema_params / opt_state   the trained part only (adapters, a ControlNet),
                                                 its EMA and Adam moments; so the checkpoint
                                                 holds only these
    base (Trainer.frozen)                        the U-Net's parameters, laid out on the mesh by
                                                 the same rule table as full training, handed to
                                                 the jitted step as an argument: traced, sharded,
                                                 never donated, never a constant of the program

A trainer supplies `make_init(base) -> () -> TrainState` and `loss(params, batch, key, base)`;
the step is the ordinary `step.make_train_step`, and resume, checkpoints, preemption and logging
are the outer loop's (`train/loop.py`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import compiler
from jaxdiff import sharding as sharding_lib
from jaxdiff.errors import ConfigError
from jaxdiff.train import frozen, latent
from jaxdiff.train.state import Trainer
from jaxdiff.train.step import accumulation_options, make_train_step


def check_schedule(cfg, scheduler: dict, base: str) -> None:
    """A ConfigError unless the run's diffusion settings are the base's scheduler's."""
    pairs = {"schedule": "beta_schedule", "num_train_timesteps": "num_train_timesteps", "beta_start": "beta_start",
             "beta_end": "beta_end", "prediction_type": "prediction_type"}
    for ours, theirs in pairs.items():
        if theirs in scheduler and scheduler[theirs] != cfg.diffusion[ours]:
            raise ConfigError(f"diffusion.{ours}={cfg.diffusion[ours]!r} but the base {base} was trained with "
                              f"{scheduler[theirs]!r}; set --config.diffusion.{ours}={scheduler[theirs]!r}")


def read_base(cfg: ml_collections.ConfigDict, folder: str):
    """(U-Net module, its params (numpy), the frozen `frozen.FrozenParts`) of the base `folder`,
    after checking that the run's diffusion settings are the base's."""
    from jaxdiff.convert import folder as folder_convert

    parts = folder_convert.load_pretrained(folder)
    check_schedule(cfg, parts["scheduler"], folder)
    (unet, unet_params), (vae, vae_params), (text, text_params) = parts["unet"], parts["vae"], parts["text_encoder"]
    return unet, unet_params, frozen.FrozenParts(vae, vae_params, text, text_params, parts["tokenizer"])


def cache_latents_and_texts(workdir: str, fparts: frozen.FrozenParts, images: np.ndarray, captions):
    """(latents [N, h, w, c], caption states [K, S, D], the empty caption's states [S, D]) of
    `images` and `captions`, computed once and kept in WORKDIR/cache (read back on resume)."""
    writer = jax.process_index() == 0
    cache = os.path.join(workdir, latent.CACHE_DIR)
    lat = latent._cached(os.path.join(cache, latent.LATENTS_FILE),
                         lambda: {"latents": latent.encode_images(fparts, images)}, writer)["latents"]
    text = latent._cached(os.path.join(cache, latent.TEXT_FILE), lambda: {
        "states": frozen.embed_texts(fparts, captions), "null": frozen.embed_texts(fparts, [""])[0]}, writer)
    return lat, text["states"], text["null"]


class FrozenBaseTask(latent.LatentTextTask):
    """A latent text task over the base's own parts, plus the frozen U-Net: `model` (the `UNet`
    module) and `base_params` (its tree, numpy). Subclasses set `kind`."""

    def __init__(self, dataset, *, model, base_params, **kwargs):
        super().__init__(dataset, **kwargs)
        self.model = model
        self.base_params = base_params


def abstract_base(base_params):
    """The base tree as float32 `jax.ShapeDtypeStruct`s."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.float32), base_params)


def build_trainer(cfg: ml_collections.ConfigDict, mesh, base_params, make_init, loss, tx, *,
                  init_reads_base: bool = False):
    """The `Trainer` of a frozen-base run: the state is what `make_init(base)` creates,
    `frozen` = (the base on the mesh,), the step `make_train_step(loss)` with the base a sharded,
    non-donated argument. init_reads_base: `make_init(base)()` reads the base's values (a
    ControlNet copies the U-Net's encoder), so `Trainer.init` passes the placed base in;
    otherwise only its shapes."""
    rules = sharding_lib.get_rules(cfg.mesh.rules)
    base_abstract = abstract_base(base_params)
    base_sharding = sharding_lib.tree_shardings(base_abstract, mesh, rules)
    base = sharding_lib.place(jax.tree.map(lambda a: np.asarray(a, np.float32), base_params), base_sharding)
    if init_reads_base:
        def init_of(b):
            return make_init(b)()
        abstract = jax.eval_shape(init_of, base_abstract)
    else:
        abstract = jax.eval_shape(make_init(base_abstract))
    state_sharding = sharding_lib.tree_shardings(abstract, mesh, rules)
    if init_reads_base:
        init = functools.partial(compiler.jit(init_of, out_shardings=state_sharding), base)
    else:
        init = compiler.jit(make_init(base_abstract), out_shardings=state_sharding)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    step = compiler.jit(make_train_step(loss, tx, ema_decay=cfg.optim.ema_decay, **accumulation_options(cfg, mesh)),
                        donate_argnums=(0,), in_shardings=(state_sharding, batch_sharding, base_sharding),
                        out_shardings=(state_sharding, sharding_lib.replicated(mesh)))
    return Trainer(init=init, step=step, abstract=sharding_lib.with_shardings(abstract, state_sharding),
                   state_sharding=state_sharding, batch_sharding=batch_sharding, frozen=(base,))
