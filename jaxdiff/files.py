"""Files jaxdiff reads from folders it is handed, and files it writes: the two rules every
module follows (layer 0: anything may use it).

    inside(folder, name)          folder/name, refused when it resolves outside `folder`
                                  (`..`, an absolute name, a symlink out), so a model folder
                                  or a weight index cannot make jaxdiff read other files
    read_json(path)               a JSON object, or one CheckpointError line naming the file
    atomic_write(path, write)     write a temporary file beside `path`, fsync, rename onto it:
    write_json(obj, path)         readers see the old file or the whole new one, never a part
    write_text(path, text)
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Callable

from jaxdiff.errors import CheckpointError


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _hub_blob(real: str, root: str) -> bool:
    """Whether `real` is a blob of the hub-cache repository whose snapshot holds `root`
    (`.../models--org--name/snapshots/<rev>/...` links files to `.../models--org--name/blobs/`)."""
    parts = root.split(os.sep)
    if "snapshots" not in parts:
        return False
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    repo = os.sep.join(parts[:i])
    return (i + 1 < len(parts) and os.path.basename(repo).startswith("models--")
            and os.path.dirname(real) == os.path.join(repo, "blobs"))


def inside(folder: str, name: str, *, listed_in: str | None = None, kind: str = "model folder") -> str:
    """`folder/name`, after checking that it resolves (symlinks followed) inside `folder`.

    listed_in: the file that named `name` (an index), for the message.
    Raises CheckpointError naming the entry and the folder for an absolute name, a `..` that
    climbs out, or a symlink pointing out of the folder.
    """
    folder = os.fspath(folder)
    root = os.path.realpath(folder)
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if _within(real, root) or _hub_blob(real, root):
        return path
    what = f"{listed_in} lists {name!r}, which" if listed_in else path
    raise CheckpointError(f"{what} resolves to {real}, outside the {kind} {folder}; "
                          "refusing to read it")


def read_json(path: str, *, what: str = "a JSON object") -> dict:
    """The JSON object in `path`. Raises a one-line CheckpointError naming the file when it is
    missing, unreadable, not JSON (e.g. truncated), or JSON of another type (a list, a string)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not {what}")
    return data


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Run `write(tmp)` on a fresh temporary file next to `path`, fsync it, and rename it onto
    `path`: readers see the old file or the whole new one, never a part."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj: Any, path: str) -> None:
    """Write `obj` as indented, key-sorted JSON (plus a newline) to `path` atomically: the one
    way every config / index file in jaxdiff's folders is written."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()

    atomic_write(os.fspath(path), write)


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()

    atomic_write(os.fspath(path), write)
