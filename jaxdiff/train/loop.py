"""The outer training loop: data -> sharded train_step -> metrics, checkpoints, samples.

`train(cfg, workdir)` is what `jaxdiff train` runs. It resumes from the newest checkpoint in
`workdir` when there is one (state *and* data-iterator position, so the resumed run is the same
run), writes metrics to `metrics.jsonl` and TensorBoard event files, and at the end a loss curve;
sample grids are written by the `write_samples` callback the caller hands in (the command line
passes `jaxdiff.pipelines.write_run_samples`: training imports no pipeline). Only process 0
writes logs and pictures; every process takes part in checkpointing, as orbax requires.

Stopping: SIGTERM (preemption) and SIGINT (Ctrl-C) set a flag the loop reads after each step;
the step that is running finishes, is checkpointed, and `train` returns early (its state's
`step` below `cfg.train.steps`); running the same command again resumes. In a multi-process
run JAX's preemption service turns SIGTERM into a step all processes agree on.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from jaxdiff import files
from jaxdiff import sharding as sharding_lib
from jaxdiff.checkpoint import Checkpointer, checkpoint_dir
from jaxdiff.errors import CheckpointError, TrainingError
from jaxdiff.provenance import run as provenance_run
from jaxdiff.train import build

# Config sections that must agree between a run and the checkpoint it resumes from.
_RESUME_SECTIONS = ("model", "diffusion", "data", "vae", "text", "lora", "controlnet")


def _check_resumable(saved: dict, cfg) -> None:
    current = json.loads(json.dumps(cfg.to_dict()))  # as saved: tuples read back as lists
    if "seed" in saved and saved["seed"] != current.get("seed"):
        # The seed picks the initial weights and the data order: resuming with another would
        # silently splice two different runs.
        raise TrainingError(
            f"the run in the work dir used seed {saved['seed']}, this config has seed {current.get('seed')}; "
            f"pass --config.seed={saved['seed']} to resume it, or use a new --workdir")
    from jaxdiff import config as config_lib

    defaults = config_lib.get_config().to_dict()
    for section in _RESUME_SECTIONS:
        # a key the saved run predates reads as its default (as `config.from_json` rebuilds it)
        old = {**defaults.get(section, {}), **saved.get(section, {})} if section in saved else {}
        new = current.get(section, {})
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
        """Keep only the rows of steps <= `step`, the step the run (re)starts from: rows a killed
        run logged past its last checkpoint would otherwise appear twice. A row cut short by a
        kill is dropped; the file is replaced whole."""
        if not self.enabled or not os.path.exists(self.path):
            return
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        rows.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        files.write_text(self.path, "".join(rows))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _compile_step(trainer: build.Trainer, batch: dict):
    """The train step compiled for `batch`'s shapes, before the first step runs; then wait for
    every process: on CPU (gloo) the first collective gives up after 30 s, less than the
    compile-time skew between busy hosts."""
    def abstract(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
    compiled = trainer.step.lower(trainer.abstract, abstract(batch), *abstract(trainer.frozen)).compile()
    sharding_lib.barrier("jaxdiff_train_step_compiled")
    return compiled


class _StopFlag:
    """Turns SIGTERM and SIGINT into a flag the step loop reads, so a preempted or interrupted run
    saves the step it is on and exits cleanly (a KeyboardInterrupt raised at an arbitrary point,
    e.g. inside a garbage-collection callback of XLA, can be swallowed; a flag cannot).

    Installed only in single-process runs: with `jax.distributed`, JAX's preemption service
    catches SIGTERM and all processes agree on the step to save (`reached_preemption`); a second
    SIGINT while the flag is set interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self._previous = {}
        if jax.process_count() == 1:
            for sig in self.SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: leave signals alone
                    pass

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    @property
    def name(self) -> str:
        return "interrupted (Ctrl-C)" if self.received == signal.SIGINT else "preempted"

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"jaxdiff train: {message}", file=sys.stderr, flush=True)


def train(cfg: ml_collections.ConfigDict, workdir: str, *, devices=None, progress: bool = True,
          write_samples: Callable | None = None, evaluate: Callable | None = None):
    """Train (or resume) the run described by `cfg` in `workdir`; returns the final TrainState.

    The mesh is `cfg.mesh` over `devices` (default: every device of every process).
    write_samples: `write_samples(run: build.Run, params, name: str, final: bool)`, called on
    process 0 with the EMA parameters (gathered from every process) every `cfg.train.sample_every`
    steps and at the end (None: no samples).
    evaluate: `evaluate(run, params) -> {name: value}` (e.g. FID-digits), called like
    write_samples every `cfg.train.eval_every` steps (0: at the end only) and at the end; its
    values go to metrics.jsonl and TensorBoard as `eval_<name>` at that step. On SIGTERM / SIGINT (or a multi-host preemption
    notice) the current step is checkpointed and the state returned early, its `step` below
    `cfg.train.steps`; running the same command again resumes.
    """
    from tqdm.auto import tqdm

    from jaxdiff import config as config_lib

    config_lib.validate(cfg, workdir)             # one-line ConfigError before anything is built
    workdir = os.path.abspath(workdir)
    # A run to resume: refuse another config before loading data, from the config.json it last
    # started with (plain files: an orbax manager here would add a barrier to multi-process runs).
    saved_json, steps_dir = os.path.join(workdir, "config.json"), checkpoint_dir(workdir)
    if os.path.isfile(saved_json) and os.path.isdir(steps_dir) and any(d.isdigit() for d in os.listdir(steps_dir)):
        try:
            saved = files.read_json(saved_json)
        except CheckpointError:
            saved = None                          # unreadable: the restored step's own config is checked below
        if saved is not None:
            _check_resumable(saved, cfg)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding_lib.mesh_from_config(cfg.mesh, devices)
    task = build.build_task(cfg, mesh, workdir=workdir)
    schedule = build.build_schedule(cfg)
    tx = build.build_optimizer(cfg)
    part = build.frozen_base_module(cfg)
    if part is not None:
        model = task.model                        # the base's U-Net: only the adapters / ControlNet train
        trainer = part.build_trainer(cfg, mesh, task, schedule, tx)
        write_samples = evaluate = None           # samples come from the exported part (export-lora, ...)
    else:
        model = build.build_model(cfg, task.image_shape, task.num_classes, task.context_dim)
        trainer = build.build_trainer(cfg, mesh, model, schedule, tx, task.image_shape, task.condition(cfg, model))
    config_json = build.run_config_json(cfg, task.image_shape, model.num_classes, task.context_dim)
    run = build.Run(cfg=cfg, workdir=workdir, task=task, model=model, schedule=schedule, progress=progress)
    _say(f"data: {task.summary}")

    ckpt = Checkpointer(checkpoint_dir(workdir), max_to_keep=cfg.train.keep_checkpoints,
                        save_every=cfg.train.checkpoint_every)
    iterator = task.iterator()
    logger = _Logger(workdir, is_main)
    if not ckpt.all_steps():
        state, start = trainer.init(), 0
    else:
        # The newest readable step (an unreadable or corrupt newer one is skipped with a warning
        # naming it), checked against this config before its arrays are read.
        state, start = ckpt.restore(trainer.abstract, data_iterator=iterator,
                                    check_config=lambda saved: _check_resumable(saved, cfg))
        if not ckpt.has_data_state(start):
            # Written by a different number of processes: this process's data shard differs, so
            # continue at the same batch position of the new shard (same epoch progress).
            iterator.set_state({"next_index": start})
        _say(f"resuming from step {start} of {cfg.train.steps} ({ckpt.directory})")
    logger.truncate_after(start)
    if is_main:
        files.write_text(os.path.join(workdir, "config.json"), config_json)
        provenance_run.record_run(workdir, cfg, task, start)      # provenance.json: appended, never rewritten

    total = cfg.train.steps
    last_saved = start
    show = progress and is_main
    step = start
    preempted = False
    batch = step_fn = None
    if step < total:
        # Compilation is a phase of its own, before the bar starts timing steps.
        batch = sharding_lib.shard_batch(next(iterator), mesh)
        _say("compiling the training step")
        t0 = time.perf_counter()
        step_fn = _compile_step(trainer, batch)
        _say(f"compiled in {time.perf_counter() - t0:.1f} s")
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not show, dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), step
    stop = _StopFlag()
    try:
        pending = None                           # the metrics of the step still running
        while step < total:
            if batch is None:
                batch = sharding_lib.shard_batch(next(iterator), mesh)
            state, metrics = step_fn(state, batch, *trainer.frozen)
            batch = None
            step += 1
            # Count a step when it has finished, keeping one step in flight: the bar moves with
            # the computation, not with dispatch.
            if pending is not None:
                jax.block_until_ready(pending)
                bar.update(1)
            pending = metrics
            # The preemption sync point is asked once per step on every process (multi-host: all
            # agree on the step to save); a signal in a single process is seen through the flag.
            preempted = ckpt.reached_preemption(step) or stop.received is not None
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
                _write_samples(write_samples, run, state, f"samples_{step:07d}.png", final=False)
            if evaluate and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                _evaluate(evaluate, run, state, step, logger)
        if pending is not None:
            jax.block_until_ready(pending)
            bar.update(1)
    except KeyboardInterrupt:
        # A second Ctrl-C (or one outside the loop's reach): keep what was learned if it is
        # finite, then leave.
        if step > last_saved:
            ckpt.save(step, state, iterator, config_json)
        ckpt.wait()
        raise
    finally:
        stop.restore()
        bar.close()
        ckpt.wait()
        logger.close()
    ckpt.close()

    if preempted:
        _say(f"{stop.name} at step {step} of {total}; checkpoint saved in "
             f"{ckpt.directory}. Run the same command again to resume.")
        return state
    if write_samples:
        _say("writing samples")
        _write_samples(write_samples, run, state, "samples.png", final=True)
    if evaluate and step > start:
        final_logger = _Logger(workdir, is_main)
        try:
            _evaluate(evaluate, run, state, step, final_logger)
        finally:
            final_logger.close()
    if is_main:
        plot_loss_curve(logger.path, os.path.join(workdir, "loss.png"))
        provenance_run.write_model_card(workdir, cfg, task, int(state.step))
    return state


def _on_main(fn: Callable, run: build.Run, state, *args):
    """`fn(run, ema_params, *args)` on process 0, its result there (None elsewhere). Every process
    must call this: in a multi-host run the sharded weights are first gathered to every host."""
    params = state.ema_params
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        return fn(run, params, *args)
    return None


def _write_samples(write_samples: Callable, run: build.Run, state, name: str, final: bool) -> None:
    """Hand the EMA weights to the sample writer on process 0."""
    _on_main(write_samples, run, state, name, final)


def _evaluate(evaluate: Callable, run: build.Run, state, step: int, logger: _Logger) -> None:
    """Score the EMA weights at `step`; log `eval_<name>` rows and one line per evaluation."""
    scores = _on_main(evaluate, run, state) or {}
    if scores:
        logger.write(step, {f"eval_{k}": float(v) for k, v in scores.items()})
        _say("step {}: {}".format(step, ", ".join(f"{k} {v:.3f}" for k, v in scores.items())))


def plot_loss_curve(metrics_path: str, out_path: str) -> None:
    """Loss (raw and smoothed) against step, from metrics.jsonl, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r]              # evaluation rows carry eval_* only
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
    tmp = f"{out_path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
