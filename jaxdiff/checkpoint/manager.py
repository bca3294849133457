"""The `Checkpointer`: orbax `CheckpointManager` steps of (train state, data-iterator state,
config), saved asynchronously and checked, restored verified with fallback past unreadable
steps. See the package docstring for what holds.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import grain
import jax
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from jaxdiff.checkpoint.integrity import (ASIDE, MANIFEST, TMP_MARK, check_files, nonfinite_summary, read_manifest,
                                          structure_problem, write_manifest)
from jaxdiff.checkpoint.messages import ReadEchoes, agree, first_line, quiet_orbax, warn
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


class Checkpointer:
    """Save and restore (train state, data-iterator state, config) by step.

    directory: the checkpoints folder. max_to_keep: steps kept (older ones are deleted).
    async_save: False makes `save` return only once the step is committed. read_only: never
    writes (what `jaxdiff.load` and `jaxdiff sample` use); orbax's notes are kept quiet.
    save_every: the interval `should_save` answers for. checksums: write `checksums.json` into
    every saved step (see the module docstring for what it costs)."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False, save_every: int = 1, checksums: bool = True):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self._async = async_save
        self._checksums = checksums
        self._manifest_step: int | None = None   # the step the background hook hashes
        self._problems: dict[int, str] = {}      # step -> "" (readable) or why not
        self._unverified: set[int] = set()       # readable steps without a manifest
        self._reported: set[int] = set()         # skipped steps already warned about
        self._noted: set[int] = set()            # unverified steps already noted
        self._echoes = ReadEchoes()
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, max_to_keep=None, save_interval_steps=0)
        else:
            # `should_save(step)`: every `save_every` steps, and at the step where all processes
            # agree to stop after a preemption notice (JAX's preemption sync point, multi-host).
            # Saving is always orbax-async, so the manifest hook below runs before the commit;
            # async_save=False waits at the end of `save`. Temporary folders left by a killed
            # save are removed in the background from here on (awaited by the first save).
            policy = ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(max(int(save_every), 1)),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=True, create=True,
                cleanup_tmp_directories=True, save_decision_policy=policy,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._after_write))
        with quiet_orbax():
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- steps ------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether `step` is a regular save step or the agreed preemption step. Call it at every
        step on every process (the preemption sync point requires that)."""
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the step chosen to save and stop after a preemption notice
        (multi-host runs; always False in a single process without `jax.distributed`)."""
        return self._manager.reached_preemption(step)

    def latest_step(self) -> int | None:
        """The newest step folder, readable or not (see `readable_step`)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def readable_step(self, step: int | None = None) -> int:
        """`step` once verified, or (None) the newest step that passes verification; skipped
        steps are named in one warning line. Verification reads the structure and, where the
        step has `checksums.json`, every file's size and sha256 (results are cached per step).
        Raises CheckpointError naming the step when `step` is unreadable, or listing each step
        and why when none is readable. A step whose arrays cannot be read although its files
        pass (no checksums and a cut file) is found only by `restore`."""
        if step is not None:
            self._require_readable(step)
            return step
        steps, skipped = self._newest_first(), []
        for s in steps:
            problem = self._problem(s)
            if not problem:
                self._report(skipped, s)
                return s
            skipped.append((s, problem))
        raise self._none_readable(skipped)

    # -- save -------------------------------------------------------------------------------

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
        still being written. Waits for the previous save to be committed (as orbax does)."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; it cannot save step {step}")
        if check_finite:
            self.check_finite(state, step)
        self._manager.wait_until_finished()  # the hook of the previous save has run
        self._manifest_step = step
        self._problems.pop(step, None)
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config_json))))
        if not self._async:
            self.wait()

    def _after_write(self) -> None:
        """orbax's post-finalization hook: background thread, process 0, after every process has
        written its files and before the step folder is committed. Never fails the save: a step
        left without a manifest restores unverified."""
        step = self._manifest_step
        if not self._checksums or step is None:
            return
        try:
            write_manifest(self._folder_being_written(step))
        except Exception as e:  # noqa: BLE001 -- the save itself succeeded
            warn(f"no {MANIFEST} for checkpoint step {step} in {self.directory} ({first_line(e)}); "
                  f"it will restore unverified")

    def _folder_being_written(self, step: int) -> str:
        names = [n for n in os.listdir(self.directory) if n.startswith(f"{step}{TMP_MARK}")]
        if names:  # a rename-on-commit filesystem: the newest temporary folder of this step
            return max((os.path.join(self.directory, n) for n in names), key=os.path.getmtime)
        final = os.path.join(self.directory, str(step))
        if os.path.isdir(final):  # a commit-file filesystem: written in place
            return final
        raise FileNotFoundError(f"no folder being written for step {step}")

    # -- restore ----------------------------------------------------------------------------

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (None: with the newest readable step, as `readable_step`).
        Raises CheckpointError when that step is unreadable."""
        step = self.readable_step(step)
        with open(os.path.join(self._folder(step), "config", "metadata")) as f:
            return json.load(f)

    def restore(self, abstract_state: Any, step: int | None = None, data_iterator: Any = None, *,
                verify: bool = True, check_config: Callable[[dict], None] | None = None
                ) -> tuple[Any, int]:
        """Restore onto the structure, dtypes and shardings of `abstract_state` (a pytree of
        `jax.ShapeDtypeStruct`s with `.sharding`), so a checkpoint loads onto whatever mesh the
        caller has; when `data_iterator` is given, it is moved to the saved position.
        Returns (state, step).

        abstract_state may also be a function of a step's saved config returning that pytree
        (what a loader that builds the network from the config passes): it is called for each
        step tried, so the target always matches the step restored.

        step=None: the newest readable step. Steps that fail verification, and steps without
        checksums whose arrays fail to load, are skipped and named in one warning line; a
        writable Checkpointer (a resuming run) moves the skipped steps, all newer than the one
        restored, to `<step>.unreadable` so that it can save those steps again. A step named by
        `step` never falls back: CheckpointError naming it. A step whose files match their
        checksums but do not load was written for another model: CheckpointError, no fallback.

        check_config(saved_config_dict) is called for the chosen step before its arrays are read;
        what it raises propagates (the trainer checks that the run is the same). verify=False
        skips the checksums (structure is still checked); cost: see the module docstring."""
        if step is not None:
            self._require_readable(step, verify=verify)
            if check_config is not None:
                check_config(self._config(step))
            state, error = self._restore_step(self._target(abstract_state, step), step, data_iterator)
            if error:
                raise self._load_failure(step, error, verified=verify and step not in self._unverified)
            return state, step
        skipped = []
        for s in self._newest_first():
            problem = self._problem(s) if verify else agree(structure_problem(self._folder(s)))
            if problem:
                skipped.append((s, problem))
                continue
            if check_config is not None:
                check_config(self._config(s))
            state, error = self._restore_step(self._target(abstract_state, s), s, data_iterator)
            if not error:
                self._report(skipped, s, set_aside=not self.read_only)
                return state, s
            if verify and s not in self._unverified:
                raise self._load_failure(s, error, verified=True)
            self._problems[s] = error
            skipped.append((s, error))
        raise self._none_readable(skipped)

    def has_data_state(self, step: int) -> bool:
        """Whether checkpoint `step` holds a data-iterator position for this process layout.

        The iterator state is per process (`data/process_<i>-of-<n>.json`); a checkpoint written
        by a different number of processes restores the train state only (elastic restore)."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (epath.Path(self.directory) / str(step) / "data" / name).exists()

    def wait(self) -> None:
        """Block until every pending asynchronous save is committed (with its checksums)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
        self._echoes.remove()

    # -- internals --------------------------------------------------------------------------

    def _folder(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _config(self, step: int) -> dict:
        with open(os.path.join(self._folder(step), "config", "metadata")) as f:
            return json.load(f)

    def _target(self, abstract_state: Any, step: int) -> Any:
        return abstract_state(self._config(step)) if callable(abstract_state) else abstract_state

    def _newest_first(self) -> list[int]:
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        return steps

    def _problem(self, step: int) -> str:
        """"" when `step` passes verification, else why not (the same on every process: the
        processes share the hashing, then agree). Cached."""
        if step in self._problems:
            return self._problems[step]
        folder = self._folder(step)
        problem, entries = structure_problem(folder), None
        if not problem:
            entries, problem = read_manifest(folder)
        if not problem and entries is not None:
            problem = check_files(folder, entries[jax.process_index()::jax.process_count()])
        problem = agree(problem)
        self._problems[step] = problem
        if not problem and entries is None:
            self._unverified.add(step)
        return problem

    def _require_readable(self, step: int, *, verify: bool = True) -> None:
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(
                f"checkpoint step {step} not found in {self.directory}; available: {sorted(steps)}")
        if not verify:
            return
        problem = self._problem(step)
        if problem:
            others = sorted(s for s in steps if s != step)
            raise CheckpointError(
                f"could not restore checkpoint {self._folder(step)}: {problem} -- the checkpoint "
                f"is corrupt or incomplete; restore another step {others} or name none for the "
                f"newest readable one")
        self._note_unverified(step)

    def _note_unverified(self, step: int) -> None:
        if step in self._unverified and step not in self._noted:
            self._noted.add(step)
            warn(f"checkpoint step {step} in {self.directory} has no {MANIFEST} (saved without "
                  f"checksums, or by an older jaxdiff); restoring it unverified")

    def _restore_step(self, abstract_state: Any, step: int, data_iterator: Any) -> tuple[Any, str]:
        """(state, "") or (None, the first line of the error), agreed over processes."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and self.has_data_state(step):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        state, error = None, ""
        self._echoes.watch()
        with quiet_orbax():
            try:
                state = self._manager.restore(step, args=ocp.args.Composite(**items)).state
            except Exception as e:  # orbax raises many types; the caller gets one line
                error = first_line(e)
        self._echoes.read_done(failed=bool(error))
        error = agree(error)
        return (None, error) if error else (state, "")

    def _load_failure(self, step: int, error: str, *, verified: bool) -> CheckpointError:
        why = ("its files match their checksums, so it was written for a different model or "
               "optimizer config" if verified else
               "the checkpoint is corrupt, incomplete, or was written for a different model or "
               "optimizer config")
        return CheckpointError(f"could not restore checkpoint {self._folder(step)}: {error} -- {why}")

    def _none_readable(self, skipped: list) -> CheckpointError:
        listed = "; ".join(f"step {s}: {why}" for s, why in skipped)
        return CheckpointError(
            f"no readable checkpoint in {self.directory} ({listed}); restore the folder from a "
            f"copy or start the run again in a new work dir")

    def _report(self, skipped: list, used: int, *, set_aside: bool = False) -> None:
        """One warning line for the newly skipped steps (or for all of them, when they are moved
        aside), then the no-manifest note for `used`."""
        moved = self._set_aside([s for s, _ in skipped]) if set_aside and skipped else []
        fresh = [(s, why) for s, why in skipped if s not in self._reported or moved]
        if fresh:
            self._reported.update(s for s, _ in fresh)
            listed = ", ".join(f"{s} ({why})" for s, why in fresh)
            tail = (f"; moved aside as {', '.join(moved)} (inspect or delete them)" if moved else "")
            warn(f"skipped unreadable checkpoint step(s) in {self.directory}: {listed}; using step "
                  f"{used}{tail}")
        self._note_unverified(used)

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Rename step folders to `<step>.unreadable` (process 0), so that orbax neither lists nor
        keeps them and the run can save those steps again. Returns the new names."""
        names = []
        for s in steps:
            src, n = self._folder(s), 1
            dst = src + ASIDE
            while os.path.exists(dst):
                n += 1
                dst = f"{src}{ASIDE}-{n}"
            if jax.process_index() == 0:
                os.rename(src, dst)
            names.append(os.path.basename(dst))
            self._problems.pop(s, None)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxdiff_checkpoint_set_aside")
        with quiet_orbax():
            self._manager.reload()
        return names
