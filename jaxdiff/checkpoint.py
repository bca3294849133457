"""Checkpoints: orbax `CheckpointManager` holding the train state, the data-iterator state and the
config, so that a resumed run continues exactly where the saved one stood.

Layout of a work dir:
    WORKDIR/config.json            the run's config (also stored inside every checkpoint)
    WORKDIR/checkpoints/<step>/    state/ (arrays), data/ (iterator state), config/ (JSON),
                                   checksums.json (size and sha256 of every file above)

What holds:
  - Saving is asynchronous: `save` returns once the arrays are copied off the devices; files are
    written, hashed and committed in a background thread. A state with NaN/Inf is never saved.
  - A step folder appears only once complete. orbax writes `<step>.orbax-checkpoint-tmp/` and
    renames it to `<step>/`; `checksums.json` is written into the temporary folder by process 0
    after every process has finished writing and before the rename, so it is committed with the
    step. A run killed at any moment (kill -9, preemption without grace, also while hashing)
    leaves every earlier step intact and at most one `<step>.orbax-checkpoint-tmp/`, which is
    never listed or restored and is removed when a writable Checkpointer next saves there.
  - Restore verifies the step first (structure, then sizes and sha256 from `checksums.json`) and,
    when no step is named, falls back past unreadable steps (a truncated, emptied or bit-flipped
    file, a missing config, an empty folder) to the newest readable one, with one warning line;
    a resuming (writable) Checkpointer renames them `<step>.unreadable`. A step without
    `checksums.json` (saved with `checksums=False`, or by an older jaxdiff) is restored
    unverified, with one note. A named step never falls back. What checksums cannot catch: bytes
    that were already wrong when written (they hash what orbax wrote).
  - Arrays are restored onto whatever shardings the caller asks for, so a checkpoint written on
    one mesh (8 devices, `dp`) loads onto another (4 devices, `fsdp`), and one written by N
    processes loads in M. Every multi-process decision (refuse a save, skip a step) is the same
    on every process.
  - `max_to_keep` old steps are kept.

What it costs: the finiteness check reads every float leaf once on its devices (one jitted
reduction, a few bytes back to the host); its first call per state layout compiles (seconds on
a CPU for a ~750-leaf train state, then cached like any jit). Checksums read every file of a step once more, at
sha256's ~2 GB/s per core on up to 8 threads: well under a second for the small models here,
seconds for a 10 GB state (paid in the background on save, delaying the commit, and before
arrays are read on restore; process 0 hashes at save, the processes share the work at restore).
On remote storage that is one extra full read per save and per restore; `checksums=False` (save)
and `verify=False` (restore) skip it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from jaxdiff.errors import CheckpointError, TrainingError

MANIFEST = "checksums.json"
_TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's name for a step folder being written
_ASIDE = ".unreadable"               # unreadable steps a resuming run moves out of the way
_HASH_THREADS = min(8, os.cpu_count() or 1)
_AGREE_BYTES = 1024


class CheckpointWarning(UserWarning):
    """A checkpoint step was skipped as unreadable, or restored without checksums."""


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


# ---------------------------------------------------------------------------------------------
# Checksums: a manifest of every file under a step's item folders.


def _content_files(folder: str) -> list[str]:
    """Relative paths ('/'-separated, sorted) of the files under `folder`'s item subfolders. The
    step's own top-level files (`_CHECKPOINT_METADATA`, `commit_success.txt`, the manifest) are
    left out: orbax rewrites them when it commits the step."""
    out = []
    for entry in os.listdir(folder):
        sub = os.path.join(folder, entry)
        if os.path.isdir(sub):
            for root, _, files in os.walk(sub):
                out += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/") for f in files]
    return sorted(out)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_all(folder: str, rels: list[str]) -> list[str]:
    paths = [os.path.join(folder, r) for r in rels]
    if len(paths) < 2 or sum(os.path.getsize(p) for p in paths) < (64 << 20):
        return [_sha256(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(_HASH_THREADS) as pool:  # hashlib drops the GIL
        return list(pool.map(_sha256, paths))


def write_manifest(folder: str) -> dict:
    """Write `folder/checksums.json`: {"algorithm": "sha256", "files": {path: {"bytes", "sha256"}}}
    for every file under the step's item folders; returns it. Check by hand with `sha256sum`."""
    rels = _content_files(folder)
    digests = _hash_all(folder, rels)
    manifest = {"algorithm": "sha256", "files": {
        r: {"bytes": os.path.getsize(os.path.join(folder, r)), "sha256": d} for r, d in zip(rels, digests)}}
    tmp = os.path.join(folder, MANIFEST + ".partial")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0)
    os.replace(tmp, os.path.join(folder, MANIFEST))
    return manifest


def _read_manifest(folder: str) -> tuple[list | None, str]:
    """(entries [(path, bytes, sha256)] or None when there is no manifest, problem or "")."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None, ""
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        return sorted((k, int(v["bytes"]), str(v["sha256"])) for k, v in files.items()), ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, f"{MANIFEST} is unreadable"


def _check_files(folder: str, entries: list) -> str:
    """The first problem among `entries` (missing, wrong size, wrong sha256), or ""."""
    for rel, size, _ in entries:
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{rel} has {actual:,} bytes, {size:,} expected"
    for (rel, _, digest), actual in zip(entries, _hash_all(folder, [e[0] for e in entries])):
        if actual != digest:
            return f"{rel} does not match its checksum"
    return ""


def _structure_problem(folder: str) -> str:
    """Cheap checks that need no manifest: the folder, the config and the state's metadata."""
    if not os.path.isdir(folder):
        return "its folder is missing"
    if not os.listdir(folder):
        return "its folder is empty"
    config = os.path.join(folder, "config", "metadata")
    if not os.path.isfile(config):
        return "config/metadata is missing"
    try:
        with open(config) as f:
            json.load(f)
    except (OSError, ValueError):
        return "config/metadata is not valid JSON"
    if not os.path.isfile(os.path.join(folder, "state", "_METADATA")):
        return "state/_METADATA is missing"
    return ""


# ---------------------------------------------------------------------------------------------
# Quiet orbax, one decision for all processes.

# orbax log lines that say nothing to a jaxdiff user: read-only option notes, and a missing
# metadata file of a step that jaxdiff reports itself when it skips it.
_ORBAX_NOTES = ("CheckpointManagerOptions.read_only=True, setting", "Given directory is read only",
                "Metadata file does not exist")


class _DropOrbaxNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.WARNING and str(record.msg).startswith(_ORBAX_NOTES))


@contextlib.contextmanager
def _quiet_orbax():
    """Drop orbax's notes (above) while inside; every other log record passes."""
    logger, note_filter = logging.getLogger("absl"), _DropOrbaxNotes()
    logger.addFilter(note_filter)
    try:
        yield
    finally:
        logger.removeFilter(note_filter)


class _ReadEchoes:
    """Drops the echoes of a failed orbax read that Python prints as "Exception ignored in: ...".

    When orbax fails to read one array it closes its event loop with the other reads pending.
    Each pending read then echoes the failure at an arbitrary later moment: its coroutine, when
    the garbage collector finalises it ("Exception ignored in: <coroutine
    _read_array_index_and_device_put>"), and tensorstore's completion callback, which finds the
    loop closed ("Event loop is closed" from `call_soon_threadsafe`). The failure itself was
    raised to, and reported by, `restore`. Installed at the first failed read, removed by `close`
    after the pending reads have settled; every other unraisable passes."""

    def __init__(self):
        self._previous = None

    def install(self) -> None:
        if self._previous is None:
            self._previous = sys.unraisablehook
            sys.unraisablehook = self._hook

    def remove(self) -> None:
        if self._previous is None:
            return
        gc.collect()
        time.sleep(0.1)  # local reads settle in milliseconds; only after a failed read
        gc.collect()
        if sys.unraisablehook == self._hook:
            sys.unraisablehook = self._previous
        self._previous = None

    def _hook(self, unraisable) -> None:
        if not self._is_echo(unraisable):
            (self._previous or sys.__unraisablehook__)(unraisable)

    @staticmethod
    def _is_echo(unraisable) -> bool:
        if "_read_array_index_and_device_put" in repr(unraisable.object):
            return True
        tb = unraisable.exc_traceback
        frames = [f.name for f, _ in traceback.walk_tb(tb)] if tb is not None else []
        return (isinstance(unraisable.exc_value, RuntimeError) and "call_soon_threadsafe" in frames
                and str(unraisable.exc_value) == "Event loop is closed")


def _agree(text: str) -> str:
    """The first non-empty `text` over processes, in process order (the same on every process;
    every process must call this, in the same order). One process: `text`."""
    if jax.process_count() == 1:
        return text
    raw = np.frombuffer(text.encode()[:_AGREE_BYTES], np.uint8)
    buf = np.zeros(_AGREE_BYTES, np.int32)
    buf[:raw.size] = raw
    for row in np.asarray(multihost_utils.process_allgather(buf)):
        if row.any():
            return bytes(row.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
    return ""


def _warn(message: str) -> None:
    """One line on stderr (no source line), from process 0."""
    if jax.process_index() == 0:
        warnings.warn_explicit(message, CheckpointWarning, "jaxdiff.checkpoint", 0)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


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
        self._echoes = _ReadEchoes()
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
        with _quiet_orbax():
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
            _warn(f"no {MANIFEST} for checkpoint step {step} in {self.directory} ({_first_line(e)}); "
                  f"it will restore unverified")

    def _folder_being_written(self, step: int) -> str:
        names = [n for n in os.listdir(self.directory) if n.startswith(f"{step}{_TMP_MARK}")]
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
            problem = self._problem(s) if verify else _agree(_structure_problem(self._folder(s)))
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
        problem, entries = _structure_problem(folder), None
        if not problem:
            entries, problem = _read_manifest(folder)
        if not problem and entries is not None:
            problem = _check_files(folder, entries[jax.process_index()::jax.process_count()])
        problem = _agree(problem)
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
            _warn(f"checkpoint step {step} in {self.directory} has no {MANIFEST} (saved without "
                  f"checksums, or by an older jaxdiff); restoring it unverified")

    def _restore_step(self, abstract_state: Any, step: int, data_iterator: Any) -> tuple[Any, str]:
        """(state, "") or (None, the first line of the error), agreed over processes."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and self.has_data_state(step):
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        state, error = None, ""
        with _quiet_orbax():
            try:
                state = self._manager.restore(step, args=ocp.args.Composite(**items)).state
            except Exception as e:  # orbax raises many types; the caller gets one line
                error = _first_line(e)
                self._echoes.install()
        error = _agree(error)
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
            _warn(f"skipped unreadable checkpoint step(s) in {self.directory}: {listed}; using step "
                  f"{used}{tail}")
        self._note_unverified(used)

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Rename step folders to `<step>.unreadable` (process 0), so that orbax neither lists nor
        keeps them and the run can save those steps again. Returns the new names."""
        names = []
        for s in steps:
            src, n = self._folder(s), 1
            dst = src + _ASIDE
            while os.path.exists(dst):
                n += 1
                dst = f"{src}{_ASIDE}-{n}"
            if jax.process_index() == 0:
                os.rename(src, dst)
            names.append(os.path.basename(dst))
            self._problems.pop(s, None)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxdiff_checkpoint_set_aside")
        with _quiet_orbax():
            self._manager.reload()
        return names
