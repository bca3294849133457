"""From a config to the objects of a run: the task (data), the network, the noise schedule, the
optimizer, and the training step laid out on a mesh.

    task = build_task(cfg, mesh, workdir=workdir)          # chosen once: pixel or latent text
    model = build_model(cfg, task.image_shape, task.num_classes, task.context_dim)
    trainer = build_trainer(cfg, mesh, model, build_schedule(cfg), build_optimizer(cfg),
                            task.image_shape, task.condition(cfg, model))
    state = trainer.init()                                  # on the mesh
    state, metrics = trainer.step(state, batch)             # jitted, sharded, state donated

The config is unpacked here into constructors and never enters a module. `jaxdiff.load` uses the
same builders to rebuild a saved run's network for sampling.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff import compiler, schedules
from jaxdiff import data as data_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.errors import ConfigError, TrainingError
from jaxdiff.models import dit as dit_lib
from jaxdiff.models import unet as unet_lib
from jaxdiff.train import flow as flow_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import task as task_lib
from jaxdiff.train.state import Trainer
from jaxdiff.train.step import accumulation_options, make_loss_fn, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Run(NamedTuple):
    """A run as the sample writers see it: its config, work dir, task, network and schedule, and
    whether progress bars are wanted."""

    cfg: ml_collections.ConfigDict
    workdir: str
    task: Any
    model: Any
    schedule: Any
    progress: bool = True


def _model_overrides(cfg: ml_collections.ConfigDict, kind: str = "unet") -> dict:
    """`cfg.model.unet` (or `cfg.model.dit`): module fields that replace the named preset's (lists
    read back from a saved config become tuples again)."""
    overrides = cfg.model.get(kind) or {}
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()}


def model_kind(cfg: ml_collections.ConfigDict) -> str:
    """"unet" or "dit": the network family `cfg.model.name` is from."""
    return cfg.model.get("kind", "unet")


def is_flow(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the run trains (and samples) by flow matching rather than the DDPM objective."""
    return cfg.diffusion.get("objective", "ddpm") == "flow"


def build_model(cfg: ml_collections.ConfigDict, image_shape, num_classes, context_dim=None):
    """The network named by `cfg.model`: a U-Net (with the fields `cfg.model.unet` overrides),
    channels and classes taken from the data, and cross-attention on a `context_dim`-wide text
    context when that is given; or with `model.kind="dit"` a DiT (`cfg.model.dit` overrides),
    class-conditional or unconditional, never text-conditioned."""
    kind = model_kind(cfg)
    configs = dit_lib.CONFIGS if kind == "dit" else unet_lib.CONFIGS
    try:
        factory = configs[cfg.model.name]
    except KeyError:
        raise ConfigError(f"unknown {kind} model '{cfg.model.name}'; choose one of {sorted(configs)}") from None
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.model.dtype!r}")
    extra = _model_overrides(cfg, kind)
    if kind == "dit":
        if context_dim is not None:
            raise ConfigError("model.kind=dit takes class labels, not a text context; use model.kind=unet")
        try:
            return factory(in_channels=image_shape[-1],
                           num_classes=num_classes if cfg.model.class_conditional else None,
                           dtype=DTYPES[cfg.model.dtype], remat=cfg.train.remat, **extra)
        except TypeError as e:
            raise ConfigError(f"bad cfg.model.dit field: {e}") from None
    if context_dim is not None:
        extra["context_dim"] = int(context_dim)
    try:
        return factory(out_channels=image_shape[-1],
                       num_classes=num_classes if cfg.model.class_conditional else None,
                       dropout=cfg.model.dropout, dtype=DTYPES[cfg.model.dtype], remat=cfg.train.remat, **extra)
    except TypeError as e:
        raise ConfigError(f"bad cfg.model.unet field: {e}") from None


def build_schedule(cfg: ml_collections.ConfigDict):
    """The run's noise schedule: the discrete DDPM one, or for a flow-matching run the flow
    schedule (`schedules.flow`, with the shift training draws its levels with) that flow samplers
    plan on."""
    d = cfg.diffusion
    if is_flow(cfg):
        return schedules.flow(d.num_train_timesteps, shift=d.shift)
    return schedules.discrete(d.schedule, num_train_timesteps=d.num_train_timesteps,
                              beta_start=d.beta_start, beta_end=d.beta_end,
                              rescale_betas_zero_snr=d.rescale_betas_zero_snr)


def build_optimizer(cfg: ml_collections.ConfigDict):
    return state_lib.optimizer_from_config(cfg)


def init_state_fn(model, tx, image_shape, seed: int):
    """A function of no arguments returning a fresh TrainState (traced under jit or eval_shape)."""
    def init():
        key = jax.random.PRNGKey(seed)
        k_init, k_run = jax.random.split(key)
        x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
        t = jnp.zeros((1,), jnp.float32)
        cond = {}
        if model.num_classes:
            cond["labels"] = jnp.zeros((1,), jnp.int32)
        if model.context_dim:
            cond["context"] = jnp.zeros((1, 1, model.context_dim), jnp.float32)
        params = model.init({"params": k_init}, x, t, **cond)["params"]
        return state_lib.create(params, tx, k_run)
    return init


def is_latent_text(cfg: ml_collections.ConfigDict) -> bool:
    """A config with a `vae` section trains on autoencoder latents with text conditioning. The
    one place the config decides the task."""
    return "vae" in cfg


def is_lora(cfg: ml_collections.ConfigDict) -> bool:
    """A config with a `lora` section trains adapters on a frozen base (`train/lora.py`)."""
    return "lora" in cfg


def is_controlnet(cfg: ml_collections.ConfigDict) -> bool:
    """A config with a `controlnet` section trains a ControlNet on a frozen base (`train/controlnet.py`)."""
    return "controlnet" in cfg


def frozen_base_module(cfg: ml_collections.ConfigDict):
    """The module that trains one part on a frozen base for this config (`train/lora.py`,
    `train/controlnet.py`; both have `build_task` and `build_trainer`), or None for full training."""
    if is_controlnet(cfg):
        from jaxdiff.train import controlnet
        return controlnet
    if is_lora(cfg):
        from jaxdiff.train import lora
        return lora
    return None


def build_task(cfg: ml_collections.ConfigDict, mesh, *, workdir: str | None = None, process_index=None,
               process_count=None):
    """This process's task (see `train/task.py`): pixels (`jaxdiff.data.build`), for a config with
    a `lora` or `controlnet` section the task over a frozen base (`lora.build_task`,
    `controlnet.build_task`), or for a config
    with a `vae` section cached latents and caption states (`latent.build`, which keeps its
    frozen parts and caches in `workdir`)."""
    local_batch = sharding_lib.check_batch_size(cfg.data.batch_size, mesh)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    part = frozen_base_module(cfg)
    if part is not None:
        if workdir is None:
            raise TrainingError("a LoRA or ControlNet config keeps its caches in the work dir: pass workdir to build_task")
        return part.build_task(cfg, workdir, batch_size=local_batch, process_index=process_index,
                               process_count=process_count)
    if is_latent_text(cfg):
        from jaxdiff.train import latent

        if workdir is None:
            raise TrainingError("a latent (vae) config keeps its autoencoder and caches in the "
                                "work dir: pass workdir to build_task")
        return latent.build(cfg, workdir, batch_size=local_batch, process_index=process_index,
                            process_count=process_count)
    return task_lib.PixelTask(data_lib.build(
        cfg.data.dataset, batch_size=local_batch, seed=cfg.seed,
        image_size=data_lib.resolve_image_size(cfg.data.dataset, cfg.data.image_size),
        channels=cfg.data.channels or None,
        random_flip=cfg.data.random_flip, process_index=process_index, process_count=process_count,
        data_dir=cfg.data.data_dir or None))


def run_config_json(cfg, image_shape, num_classes, context_dim=None) -> str:
    """The config as saved with a run, plus what the network's shape depends on from the data, so
    a checkpoint can be loaded for sampling without the dataset."""
    saved = cfg.to_dict()
    saved["data_signature"] = {"image_shape": list(image_shape), "num_classes": num_classes}
    if context_dim is not None:
        saved["data_signature"]["context_dim"] = context_dim
    return json.dumps(saved, indent=2, sort_keys=True)


def build_trainer(cfg: ml_collections.ConfigDict, mesh, model, schedule, tx, image_shape,
                  condition=None) -> Trainer:
    """Lay the TrainState out on `mesh` with the rule table `cfg.mesh.rules` and jit the step.
    condition: `condition(batch, key) -> model kwargs` (default: a pixel task's, class labels
    with null-class dropout; pass `task.condition(cfg, model)`)."""
    rules = sharding_lib.get_rules(cfg.mesh.rules)
    init = init_state_fn(model, tx, image_shape, cfg.seed)
    abstract = jax.eval_shape(init)
    state_sharding = sharding_lib.tree_shardings(abstract, mesh, rules)
    condition = condition or task_lib.class_condition(cfg, model)
    if is_flow(cfg):
        loss_fn = flow_lib.loss_from_config(cfg, model.apply, condition)
    else:
        loss_fn = make_loss_fn(
            model.apply, schedule.alphas_cumprod,
            prediction_type=cfg.diffusion.prediction_type, min_snr_gamma=cfg.diffusion.min_snr_gamma,
            condition=condition)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    step = compiler.jit(make_train_step(loss_fn, tx, ema_decay=cfg.optim.ema_decay, **accumulation_options(cfg, mesh)),
                        donate_argnums=(0,),
                        in_shardings=(state_sharding, batch_sharding),
                        out_shardings=(state_sharding, sharding_lib.replicated(mesh)))
    return Trainer(init=compiler.jit(init, out_shardings=state_sharding), step=step,
                   abstract=sharding_lib.with_shardings(abstract, state_sharding),
                   state_sharding=state_sharding, batch_sharding=batch_sharding)
