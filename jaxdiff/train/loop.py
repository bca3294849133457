"""The outer training loop: data -> sharded train_step -> metrics, checkpoints, samples.

`train(config, workdir)` is what `jaxdiff train` runs. It resumes from the newest checkpoint in
`workdir` when there is one (state *and* data-iterator position, so the resumed run is the same
run), writes metrics to `metrics.jsonl` and TensorBoard event files, and at the end a grid of
samples and a loss curve. Only process 0 writes logs and pictures; every process takes part in
checkpointing, as orbax requires.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import config as config_lib
from jaxdiff import data as data_lib
from jaxdiff import schedules
from jaxdiff import sharding as sharding_lib
from jaxdiff.checkpoint import Checkpointer, checkpoint_dir
from jaxdiff.errors import TrainingError
from jaxdiff.models import unet as unet_lib
from jaxdiff.train import state as state_lib
from jaxdiff.train import latent as latent_lib
from jaxdiff.train.step import label_condition, make_loss_fn, make_train_step


# Config sections that must agree between a run and the checkpoint it resumes from.
_RESUME_SECTIONS = ("model", "diffusion", "data", "vae", "text")


def _model_overrides(cfg: ml_collections.ConfigDict) -> dict:
    """`cfg.model.unet`: UNet fields that replace the named preset's (lists read back from a
    saved config become tuples again)."""
    overrides = cfg.model.get("unet") or {}
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()}


def build_model(cfg: ml_collections.ConfigDict, image_shape, num_classes, context_dim=None):
    """The U-Net named by `cfg.model` (with the fields `cfg.model.unet` overrides), channels and
    classes taken from the data, and cross-attention on a `context_dim`-wide text context when
    that is given."""
    try:
        factory = unet_lib.CONFIGS[cfg.model.name]
    except KeyError:
        raise config_lib.ConfigError(
            f"unknown model '{cfg.model.name}'; choose one of {sorted(unet_lib.CONFIGS)}") from None
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if cfg.model.dtype not in dtypes:
        raise config_lib.ConfigError(f"model.dtype must be one of {sorted(dtypes)}, got {cfg.model.dtype!r}")
    extra = _model_overrides(cfg)
    if context_dim is not None:
        extra["context_dim"] = int(context_dim)
    try:
        return factory(out_channels=image_shape[-1],
                       num_classes=num_classes if cfg.model.class_conditional else None,
                       dropout=cfg.model.dropout, dtype=dtypes[cfg.model.dtype], remat=cfg.train.remat, **extra)
    except TypeError as e:
        raise config_lib.ConfigError(f"bad cfg.model.unet field: {e}") from None


def build_schedule(cfg: ml_collections.ConfigDict):
    d = cfg.diffusion
    return schedules.discrete(d.schedule, num_train_timesteps=d.num_train_timesteps,
                              beta_start=d.beta_start, beta_end=d.beta_end,
                              rescale_betas_zero_snr=d.rescale_betas_zero_snr)


def build_optimizer(cfg: ml_collections.ConfigDict):
    o = cfg.optim
    return state_lib.make_optimizer(o.learning_rate, warmup_steps=o.warmup_steps,
                                    decay_steps=o.decay_steps, weight_decay=o.weight_decay,
                                    b1=o.b1, b2=o.b2, grad_clip=o.grad_clip)


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


def build_data(cfg, mesh, *, process_index=None, process_count=None, workdir=None):
    """This process's pipeline: pixels (`data.build`), or for a latent text-to-image config
    cached latents and caption states (`latent.build`, which needs the `workdir`)."""
    local_batch = sharding_lib.check_batch_size(cfg.data.batch_size, mesh)
    if latent_lib.is_latent_run(cfg):
        if workdir is None:
            raise TrainingError("a latent (vae) config keeps its autoencoder and caches in the "
                                "work dir: pass workdir to build_data")
        return latent_lib.build(
            cfg, workdir, batch_size=local_batch,
            process_index=jax.process_index() if process_index is None else process_index,
            process_count=jax.process_count() if process_count is None else process_count)
    return data_lib.build(
        cfg.data.dataset, batch_size=local_batch, seed=cfg.seed,
        image_size=cfg.data.image_size or None, channels=cfg.data.channels or None,
        random_flip=cfg.data.random_flip,
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
        data_dir=cfg.data.data_dir or None)


def build_condition(cfg, model, ds):
    """`condition(batch, key) -> model kwargs` for the loss: the dataset's own (text context)
    when it has one, else class labels with the null-class dropout."""
    if hasattr(ds, "condition"):
        return ds.condition(cfg)
    return label_condition(cfg.diffusion.label_dropout, model.num_classes or None)


def run_config_json(cfg, image_shape, num_classes, context_dim=None) -> str:
    """The config as saved with a run, plus what the network's shape depends on from the data, so
    a checkpoint can be loaded for sampling without the dataset."""
    saved = cfg.to_dict()
    saved["data_signature"] = {"image_shape": list(image_shape), "num_classes": num_classes}
    if context_dim is not None:
        saved["data_signature"]["context_dim"] = context_dim
    return json.dumps(saved, indent=2, sort_keys=True)


def _check_resumable(saved: dict, cfg) -> None:
    current = json.loads(json.dumps(cfg.to_dict()))  # as saved: tuples read back as lists
    for section in _RESUME_SECTIONS:
        old, new = saved.get(section, {}), current.get(section, {})
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            k = diff[0]
            raise TrainingError(
                f"the work dir holds a run with a different config ({section}.{k}: "
                f"{old.get(k)!r} there, {new.get(k)!r} now); use a new --workdir or the same config")


class _Logger:
    """metrics.jsonl + TensorBoard, process 0 only."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self._tb.add_scalar(f"train/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        """Drop lines past `step` (written after the checkpoint a resumed run restarts from)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Trainer(NamedTuple):
    """The compiled pieces of a run on one mesh.

    init: `() -> TrainState`, the fresh state, already laid out on the mesh.
    step: `(state, batch) -> (state, metrics)`, jitted with the state's shardings; the input
      state is donated.
    abstract: the TrainState as `jax.ShapeDtypeStruct`s carrying their shardings (the target
      for restoring a checkpoint onto this mesh, or for lowering without data).
    state_sharding / batch_sharding: NamedSharding pytree of the state; the batch's sharding.
    """

    init: Callable
    step: Callable
    abstract: Any
    state_sharding: Any
    batch_sharding: Any


def build_trainer(cfg: ml_collections.ConfigDict, mesh, model, schedule, tx, image_shape,
                  condition=None) -> Trainer:
    """Lay the TrainState out on `mesh` with the rule table `cfg.mesh.rules` and jit the step.
    condition: `condition(batch, key) -> model kwargs` (default: `build_condition` without a
    dataset of its own, i.e. class labels with null-class dropout)."""
    rules = sharding_lib.get_rules(cfg.mesh.rules)
    init = init_state_fn(model, tx, image_shape, cfg.seed)
    abstract = jax.eval_shape(init)
    state_sharding = sharding_lib.tree_shardings(abstract, mesh, rules)
    loss_fn = make_loss_fn(
        model.apply, schedule.alphas_cumprod,
        prediction_type=cfg.diffusion.prediction_type, min_snr_gamma=cfg.diffusion.min_snr_gamma,
        condition=condition or build_condition(cfg, model, ds=None))
    batch_sharding = sharding_lib.batch_sharding(mesh)
    step = jax.jit(make_train_step(loss_fn, tx, ema_decay=cfg.optim.ema_decay), donate_argnums=(0,),
                   in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, sharding_lib.replicated(mesh)))
    return Trainer(init=jax.jit(init, out_shardings=state_sharding), step=step,
                   abstract=sharding_lib.with_shardings(abstract, state_sharding),
                   state_sharding=state_sharding, batch_sharding=batch_sharding)


def _compile_step(trainer: Trainer, batch: dict):
    """The train step compiled for `batch`'s shapes, before the first step runs; then wait for
    every process: on CPU (gloo) the first collective gives up after 30 s, less than the
    compile-time skew between busy hosts."""
    batch_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), batch)
    compiled = trainer.step.lower(trainer.abstract, batch_abs).compile()
    sharding_lib.barrier("jaxdiff_train_step_compiled")
    return compiled


class _SigtermFlag:
    """Turns SIGTERM into a flag the step loop polls, so a preempted run saves and exits cleanly.

    Installed only in single-process runs: with `jax.distributed`, JAX's preemption service
    catches the signal and all processes agree on the step to save (`reached_preemption`).
    """

    def __init__(self):
        self.received = False
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self._previous = None

    def _handle(self, signum, frame):
        self.received = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def train(cfg: ml_collections.ConfigDict, workdir: str, *, devices=None, progress: bool = True,
          write_samples: bool = True):
    """Train (or resume) the run described by `cfg` in `workdir`; returns the final TrainState.

    The mesh is `cfg.mesh` over `devices` (default: every device of every process). On SIGTERM
    (or a multi-host preemption notice) the current step is checkpointed and the state returned
    early, its `step` below `cfg.train.steps`; running the same command again resumes.
    """
    from tqdm.auto import tqdm

    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding_lib.mesh_from_config(cfg.mesh, devices)
    ds = build_data(cfg, mesh, workdir=workdir)
    context_dim = getattr(ds, "context_dim", None)
    model = build_model(cfg, ds.image_shape, ds.num_classes, context_dim)
    schedule = build_schedule(cfg)
    tx = build_optimizer(cfg)
    config_json = run_config_json(cfg, ds.image_shape, model.num_classes, context_dim)
    trainer = build_trainer(cfg, mesh, model, schedule, tx, ds.image_shape, build_condition(cfg, model, ds))

    ckpt = Checkpointer(checkpoint_dir(workdir), max_to_keep=cfg.train.keep_checkpoints,
                        save_every=cfg.train.checkpoint_every)
    iterator = ds.iterator()
    logger = _Logger(workdir, is_main)
    start = ckpt.latest_step()
    if start is None:
        state = trainer.init()
        start = 0
    else:
        _check_resumable(ckpt.read_config(start), cfg)
        with_data = ckpt.has_data_state(start)
        state, start = ckpt.restore(trainer.abstract, start, data_iterator=iterator)
        if not with_data:
            # Written by a different number of processes: this process's data shard differs, so
            # continue at the same batch position of the new shard (same epoch progress).
            iterator.set_state({"next_index": start})
        logger.truncate_after(start)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_json)

    step_fn = None  # compiled on the first batch, see _compile_step

    total = cfg.train.steps
    last_saved = start
    sigterm = _SigtermFlag()
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not (progress and is_main),
               dynamic_ncols=True)
    t_last, step, step_last = time.perf_counter(), start, start
    preempted = False
    try:
        while step < total:
            batch = sharding_lib.shard_batch(next(iterator), mesh)
            if step_fn is None:
                step_fn = _compile_step(trainer, batch)
            state, metrics = step_fn(state, batch)
            step += 1
            bar.update(1)
            if step == start + 1:  # time steps, not the first step's compilation
                jax.block_until_ready(metrics)
                t_last, step_last = time.perf_counter(), step
            # The preemption sync point is asked once per step on every process (multi-host: all
            # agree on the step to save); SIGTERM in a single process is seen through the flag.
            preempted = ckpt.reached_preemption(step) or sigterm.received
            should_save = step % cfg.train.checkpoint_every == 0 or step == total or preempted
            if step % cfg.train.log_every == 0 or should_save:
                host = {k: float(v) for k, v in metrics.items()}
                if not all(math.isfinite(v) for v in host.values()):
                    raise TrainingError(
                        f"loss became {host['loss']} at step {step}; nothing was saved past step "
                        f"{last_saved} (checkpoints in {ckpt.directory} are intact). Lower "
                        f"--config.optim.learning_rate or enable --config.optim.grad_clip")
                now = time.perf_counter()
                host["steps_per_sec"] = (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                logger.write(step, host)
                bar.set_postfix(loss=f"{host['loss']:.4f}")
            if should_save:
                ckpt.save(step, state, iterator, config_json)
                last_saved = step
            if preempted:
                break
            if cfg.train.sample_every and step % cfg.train.sample_every == 0 and write_samples:
                _write_samples(cfg, model, schedule, state, ds, workdir, f"samples_{step:07d}.png", final=False)
    except KeyboardInterrupt:
        # Keep what was learned: save the current step (it is finite unless the very last steps
        # diverged, which the next run's first log would reveal) before leaving.
        if step > last_saved:
            ckpt.save(step, state, iterator, config_json)
        ckpt.wait()
        raise
    finally:
        sigterm.restore()
        bar.close()
        ckpt.wait()
        logger.close()
    ckpt.close()

    if preempted:
        if is_main:
            print(f"jaxdiff train: preempted at step {step} of {total}; checkpoint saved in "
                  f"{ckpt.directory}. Run the same command again to resume.", file=sys.stderr)
        return state
    if write_samples:
        _write_samples(cfg, model, schedule, state, ds, workdir, "samples.png")
        if is_main:
            plot_loss_curve(logger.path, os.path.join(workdir, "loss.png"))
    return state


def _write_samples(cfg, model, schedule, state, ds, workdir, name, final=True):
    """Sample a grid with the current weights on process 0 (every process must call this: in a
    multi-host run the sharded weights are first gathered to every host). A latent run decodes
    its samples and, at the end, scores them against their captions."""
    from jaxdiff.pipelines.pixel import DiffusionModel
    from jaxdiff import images

    params, ema_params = state.params, state.ema_params
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params, ema_params = multihost_utils.process_allgather((params, ema_params), tiled=True)
    if jax.process_index() != 0:
        return
    if isinstance(ds, latent_lib.LatentData):
        state = state.replace(params=params, ema_params=ema_params)
        latent_lib.write_outputs(cfg, model, schedule, state, ds, workdir, name, evaluate=final)
        return
    dm = DiffusionModel(config=cfg, module=model, schedule=schedule, params=params,
                        ema_params=ema_params, image_shape=ds.image_shape)
    labels = dm.grid_labels(cfg.sample.num)
    imgs = dm.sample(cfg.sample.num, sampler=cfg.sample.sampler, num_steps=cfg.sample.steps,
                     seed=cfg.seed, labels=labels,
                     guidance_scale=cfg.sample.guidance_scale if labels is not None else None)
    images.save_grid(imgs, os.path.join(workdir, name),
                     ncols=model.num_classes if labels is not None else None)


def plot_loss_curve(metrics_path: str, out_path: str) -> None:
    """Loss (raw and smoothed) against step, from metrics.jsonl, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, alpha=0.35, lw=1, label="loss (logged steps)")
    if len(loss) >= 5:
        k = max(len(loss) // 20, 2)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"moving average ({k})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
