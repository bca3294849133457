"""Checkpoints: orbax `CheckpointManager` holding the train state, the data-iterator state and the
config, so that a resumed run continues exactly where the saved one stood.

Layout of a work dir:
    WORKDIR/config.json            the run's config (also stored inside every checkpoint)
    WORKDIR/checkpoints/<step>/    state/ (arrays), data/ (iterator state), config/ (JSON)

Saving is asynchronous (the step loop goes on while arrays are written) and atomic (a step
directory appears only once complete); `max_to_keep` old steps are kept. A state with NaN/Inf is
never saved: `save` first checks every float leaf on its devices (one jitted reduction, a few
bytes back to the host; its first call per state layout compiles, then is cached like any jit). Arrays are restored onto
whatever shardings the caller asks for, so a checkpoint written on one mesh (8 devices, `dp`)
loads onto another (4 devices, `fsdp`), and one written by N processes loads in M.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from jaxdiff.errors import CheckpointError, TrainingError


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def resolve(path: str) -> tuple[str, int | None]:
    """Map a work dir, its `checkpoints/` folder, or one step folder to (checkpoints dir, step).

    step is None for "the latest". Raises CheckpointError naming the path when nothing is there.
    """
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), int(base)
    if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
        return path, None
    raise CheckpointError(
        f"no checkpoint at {path}: expected a work dir (with checkpoints/), a checkpoints/ folder "
        f"or a checkpoints/<step> folder")


# ---------------------------------------------------------------------------------------------
# Finiteness: one on-device reduction per group of co-located leaves.


@jax.jit
def _nonfinite_counts(leaves: list) -> jax.Array:
    """[n, 2] float32: NaN and Inf counts of each leaf (float32 counts: exact below 2**24, never 0
    when a value is non-finite)."""
    return jnp.stack([jnp.stack([jnp.sum(jnp.isnan(x), dtype=jnp.float32),
                                 jnp.sum(jnp.isinf(x), dtype=jnp.float32)]) for x in leaves])


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _share(n: float, total: int) -> str:
    if n >= total:
        return "100% of values are"
    if n / total >= 0.01:
        return f"{100 * n / total:.0f}% of values are"
    return f"{int(n):,} of {total:,} values are" if n != 1 else f"1 of {total:,} values is"


def nonfinite_summary(tree: Any) -> str | None:
    """None when every float leaf of `tree` is finite; else one line per top-level part, e.g.
    "params: 37% of values are NaN (first in params/dense/kernel); opt_state: 2 of 9,000 values
    are Inf (first in opt_state/1/0/nu/dense/kernel)".

    Works on sharded global arrays in multi-process runs: the counts are reduced on the devices
    (jit, one call per set of devices, [leaves, 2] floats back), so every process gets the same
    answer and no parameter is copied to the host. Integer leaves (step, counters) and PRNG keys
    are not checked."""
    flat = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not flat:
        return None
    groups: dict[Any, list[int]] = {}
    for i, (_, x) in enumerate(flat):
        key = frozenset(d.id for d in x.sharding.device_set) if isinstance(x, jax.Array) else None
        groups.setdefault(key, []).append(i)
    counts = np.zeros((len(flat), 2), np.float64)
    for idx in groups.values():
        counts[idx] = _to_host(_nonfinite_counts([flat[i][1] for i in idx]))
    if not counts.any():
        return None
    parts: dict[str, list] = {}  # part -> [nan, inf, total, first bad leaf]
    for (path, x), (nan, inf) in zip(flat, counts):
        part = jax.tree_util.keystr(path[:1], simple=True, separator="/") or "state"
        p = parts.setdefault(part, [0.0, 0.0, 0, None])
        p[0] += nan
        p[1] += inf
        p[2] += int(np.prod(x.shape))
        if (nan or inf) and p[3] is None:
            p[3] = jax.tree_util.keystr(path, simple=True, separator="/")
    out = []
    for part, (nan, inf, total, first) in parts.items():
        kinds = [f"{_share(n, total)} {name}" for n, name in ((nan, "NaN"), (inf, "Inf")) if n]
        if kinds:
            out.append(f"{part}: {' and '.join(kinds)} (first in {first})")
    return "; ".join(out)


class Checkpointer:
    """Save and restore (train state, data-iterator state, config) by step."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False, save_every: int = 1):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        # `should_save(step)`: every `save_every` steps, and at the step where all processes
        # agree to stop after a preemption notice (JAX's preemption sync point, multi-host).
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(max(int(save_every), 1)),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only, save_decision_policy=policy)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        """Whether `step` is a regular save step or the agreed preemption step. Call it at every
        step on every process (the preemption sync point requires that)."""
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the step chosen to save and stop after a preemption notice
        (multi-host runs; always False in a single process without `jax.distributed`)."""
        return self._manager.reached_preemption(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def check_finite(self, state: Any, step: int) -> None:
        """Raise TrainingError (one line: which parts hold NaN/Inf, that nothing was saved, and the
        newest intact step) unless every float leaf of `state` is finite. Every process reaches
        the same decision (see `nonfinite_summary`); call it on every process."""
        summary = nonfinite_summary(state)
        if summary is None:
            return
        self._manager.wait_until_finished()  # a save in flight completes before it is named
        latest = self._manager.latest_step()
        kept = (f"the newest checkpoint, step {latest} in {self.directory}, is intact"
                if latest is not None else f"{self.directory} holds no checkpoint yet")
        raise TrainingError(
            f"refusing to save step {step}, the state is not finite: {summary}; nothing was "
            f"saved and {kept}. Lower --config.optim.learning_rate or enable "
            f"--config.optim.grad_clip, then resume")

    def save(self, step: int, state: Any, data_iterator: Any, config_json: str, *,
             check_finite: bool = True) -> None:
        """Start writing checkpoint `step`; returns before the arrays are on disk (see `wait`).

        First `check_finite(state, step)` (unless check_finite=False): a state with NaN/Inf
        raises TrainingError and nothing is written. The data iterator's position is captured
        now (one small JSON file per process), so the loop may advance it while the arrays are
        still being written.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; it cannot save step {step}")
        if check_finite:
            self.check_finite(state, step)
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config_json))))

    def read_config(self, step: int | None = None) -> dict:
        step = self._step_or_latest(step)
        path = os.path.join(self.directory, str(step), "config", "metadata")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} has no readable config ({e}); "
                f"it is incomplete or corrupt") from e

    def restore(self, abstract_state: Any, step: int | None = None, data_iterator: Any = None) -> tuple[Any, int]:
        """Restore onto the structure, dtypes and shardings of `abstract_state` (a pytree of
        `jax.ShapeDtypeStruct`s with `.sharding`), so a checkpoint loads onto whatever mesh the
        caller has; when `data_iterator` is given, it is moved to the saved position.
        Returns (state, step)."""
        step = self._step_or_latest(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and self.has_data_state(step):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types; the user needs one message
            raise CheckpointError(
                f"could not restore checkpoint {self.directory}/{step}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''} -- the checkpoint is corrupt, "
                f"incomplete, or was written for a different model or optimizer config") from e
        return out.state, step

    def has_data_state(self, step: int) -> bool:
        """Whether checkpoint `step` holds a data-iterator position for this process layout.

        The iterator state is per process (`data/process_<i>-of-<n>.json`); a checkpoint written
        by a different number of processes restores the train state only (elastic restore)."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (epath.Path(self.directory) / str(step) / "data" / name).exists()

    def _step_or_latest(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint found in {self.directory}")
            return max(steps)
        if step not in steps:
            raise CheckpointError(
                f"checkpoint step {step} not found in {self.directory}; available: {sorted(steps)}")
        return step

    def wait(self) -> None:
        """Block until every pending asynchronous save is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
