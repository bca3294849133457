"""Checkpoints: orbax `CheckpointManager` holding the train state, the data-iterator state and the
config, so that a resumed run continues exactly where the saved one stood.

Layout of a work dir:
    WORKDIR/config.json            the run's config (also stored inside every checkpoint)
    WORKDIR/checkpoints/<step>/    state/ (arrays), data/ (iterator state), config/ (JSON)

Saving is asynchronous (the step loop goes on while arrays are written) and atomic (a step
directory appears only once complete); `max_to_keep` old steps are kept. Arrays are restored onto
whatever shardings the caller asks for, so a checkpoint written on one mesh (8 devices, `dp`)
loads onto another (4 devices, `fsdp`), and one written by N processes loads in M.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
from etils import epath
import orbax.checkpoint as ocp

from jaxdiff.errors import CheckpointError


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


class Checkpointer:
    """Save and restore (train state, data-iterator state, config) by step."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False, save_every: int = 1):
        self.directory = os.path.abspath(directory)
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

    def save(self, step: int, state: Any, data_iterator: Any, config_json: str) -> None:
        """Start writing checkpoint `step`; returns before the arrays are on disk (see `wait`).

        The data iterator's position is captured now (one small JSON file per process), so the
        loop may advance it while the arrays are still being written.
        """
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
