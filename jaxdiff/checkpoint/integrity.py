"""What makes a step trustworthy: no NaN/Inf is ever saved (`nonfinite_summary`), and every
file of a step has its size and sha256 in the step's `checksums.json` (`write_manifest`), checked
before its arrays are read. See the package docstring for what holds and what it costs.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxdiff import compiler

MANIFEST = "checksums.json"
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's name for a step folder being written
ASIDE = ".unreadable"               # unreadable steps a resuming run moves out of the way
HASH_THREADS = min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# Finiteness: one on-device reduction per group of co-located leaves.


@compiler.jit
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
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:  # hashlib drops the GIL
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


def read_manifest(folder: str) -> tuple[list | None, str]:
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


def check_files(folder: str, entries: list) -> str:
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


def structure_problem(folder: str) -> str:
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
