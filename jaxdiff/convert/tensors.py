"""Checkpoint files: reading safetensors, writing them and their configs atomically.

    read_safetensors(path) -> {name: array}           one .safetensors file
    read_weights_folder(folder, stem, variant=None)  a model folder's weights (maybe sharded)
    write_safetensors(tensors, path, metadata)       atomic: temp file, fsync, rename
    write_json(obj, path)                            atomic, the one way configs are written

Only safetensors files are read: a pickle (`.bin`, `.ckpt`, `.pt`, `.pth`) can run arbitrary code
when loaded, so it is refused with a message saying how to convert it. The layouts and key
checks every mapping shares live in `names.py`.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Callable, Mapping

import numpy as np

from jaxdiff.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


# ------------------------------------------------------------------------------------------
# reading


def refuse_pickle(path: str) -> None:
    """Raise a CheckpointError for a pickled checkpoint, saying how to convert it."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{path} is a pickle; jaxdiff never unpickles files, since loading one can run "
            "arbitrary code. Convert it to safetensors once, in an environment you trust, e.g. "
            "`python -c \"import torch, safetensors.torch as st; "
            "sd = torch.load('IN', weights_only=True); "
            "st.save_file({k: v.contiguous() for k, v in sd.get('state_dict', sd).items()}, "
            "'OUT.safetensors')\"`, or save the diffusers pipeline with "
            "`save_pretrained(..., safe_serialization=True)`.")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file as numpy arrays (bf16 as ml_dtypes.bfloat16)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    refuse_pickle(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def read_weights_folder(folder: str, stem: str, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """The weights of a diffusers / transformers model folder: `<stem>[.<variant>].safetensors`,
    or the shards its `.safetensors.index.json` lists (e.g. stem "diffusion_pytorch_model" for a
    U-Net or VAE, "model" for a text encoder). A pickled weights file there (`<stem>.bin`,
    `pytorch_model.bin`, ...) is refused with the conversion instructions; otherwise a missing
    file is a CheckpointError naming what the folder holds.
    """
    name = stem + (f".{variant}" if variant else "") + ".safetensors"
    path, index = os.path.join(folder, name), os.path.join(folder, name + ".index.json")
    if os.path.isfile(path):
        return read_safetensors(path)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        weights: dict[str, np.ndarray] = {}
        for shard in shards:
            weights.update(read_safetensors(os.path.join(folder, shard)))
        return weights
    held = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for held_name in held:
        if held_name.lower().endswith(PICKLE_SUFFIXES):
            refuse_pickle(os.path.join(folder, held_name))
    others = [n for n in held if n.endswith(".safetensors")]
    hint = f" (it holds {', '.join(others)}: another variant?)" if others else ""
    raise CheckpointError(f"{folder} has no {name}{hint}")


# ------------------------------------------------------------------------------------------
# writing


def _atomic(path: str, write: Callable[[str], None]) -> None:
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


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (contiguous numpy copies) to `path` atomically."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    _atomic(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                        tmp, metadata=dict(metadata) if metadata else None))


def write_json(obj: Any, path: str) -> None:
    """Write `obj` as indented, key-sorted JSON (plus a newline) to `path` atomically: the one
    way every config / index file in jaxdiff's folders is written."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()

    _atomic(os.fspath(path), write)
