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

    manager.py     Checkpointer, checkpoint_dir, resolve
    integrity.py   nonfinite_summary (NaN / Inf never saved), checksums.json (write_manifest)
    messages.py    CheckpointWarning, one-line warnings, orbax's notes kept out of the way

"""

from jaxdiff.checkpoint.integrity import MANIFEST, nonfinite_summary, write_manifest  # noqa: F401
from jaxdiff.checkpoint.manager import Checkpointer, checkpoint_dir, resolve  # noqa: F401
from jaxdiff.checkpoint.messages import CheckpointWarning  # noqa: F401
from jaxdiff.errors import CheckpointError  # noqa: F401
