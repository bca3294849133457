"""What reaches the user from checkpointing: jaxdiff's own one-line warnings (the same on every
process), and none of orbax's notes for read-only use or its echoes of a failed read.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
import traceback
import warnings

import jax
import numpy as np

from jaxdiff.errors import JaxdiffWarning
from jax.experimental import multihost_utils


AGREE_BYTES = 1024


class CheckpointWarning(JaxdiffWarning):
    """A checkpoint step was skipped as unreadable, or restored without checksums."""


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
def quiet_orbax():
    """Drop orbax's notes (above) while inside; every other log record passes."""
    logger, note_filter = logging.getLogger("absl"), _DropOrbaxNotes()
    logger.addFilter(note_filter)
    try:
        yield
    finally:
        logger.removeFilter(note_filter)


class ReadEchoes:
    """Drops the echoes of a failed orbax read that Python prints as "Exception ignored in: ...".

    When orbax fails to read one array it closes its event loop with the other reads pending.
    Each pending read then echoes the failure at an arbitrary later moment: its coroutine, when
    the garbage collector finalises it ("Exception ignored in: <coroutine
    _read_array_index_and_device_put>"), and tensorstore's completion callback, which finds the
    loop closed ("Event loop is closed" from `call_soon_threadsafe`). The failure itself was
    raised to, and reported by, `restore`. An echo can come before the failure reaches the caller,
    so the hook is in place around every read (`watch`); after a failed read it stays until
    `close`, which removes it once the pending reads have settled. Every other unraisable
    passes."""

    def __init__(self):
        self._previous = None
        self._failed = False

    def watch(self) -> None:
        """Before a read."""
        if self._previous is None:
            self._previous = sys.unraisablehook
            sys.unraisablehook = self._hook

    def read_done(self, failed: bool) -> None:
        """After a read: a clean read (and none failed before) takes the hook away at once."""
        self._failed = self._failed or failed
        if not self._failed:
            self._uninstall()

    def remove(self) -> None:
        if self._failed:
            gc.collect()
            time.sleep(0.1)  # local reads settle in milliseconds; only after a failed read
            gc.collect()
        self._uninstall()
        self._failed = False

    def _uninstall(self) -> None:
        if self._previous is None:
            return
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
        frames = [f.f_code.co_name for f, _ in traceback.walk_tb(tb)] if tb is not None else []
        return (isinstance(unraisable.exc_value, RuntimeError) and "call_soon_threadsafe" in frames
                and str(unraisable.exc_value) == "Event loop is closed")


def agree(text: str) -> str:
    """The first non-empty `text` over processes, in process order (the same on every process;
    every process must call this, in the same order). One process: `text`."""
    if jax.process_count() == 1:
        return text
    raw = np.frombuffer(text.encode()[:AGREE_BYTES], np.uint8)
    buf = np.zeros(AGREE_BYTES, np.int32)
    buf[:raw.size] = raw
    for row in np.asarray(multihost_utils.process_allgather(buf)):
        if row.any():
            return bytes(row.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
    return ""


def warn(message: str) -> None:
    """One line on stderr (no source line), from process 0."""
    if jax.process_index() == 0:
        warnings.warn_explicit(message, CheckpointWarning, "jaxdiff.checkpoint", 0)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
