"""Checkpoint files: reading them safely, writing them atomically.

    read_safetensors(path) -> {name: array}           one .safetensors file
    read_weights_folder(folder, stem, variant=None)  a model folder's weights (maybe sharded)
    read_config(folder, build) -> (config, module)   a model folder's config.json, built
    read_json(path) -> dict                          any JSON object file (config, index)
    write_safetensors(tensors, path, metadata)       atomic: temp file, fsync, rename
    write_json(obj, path)                            atomic, the one way configs are written
    inside(folder, name) -> path                     `folder/name`, refused if it leads outside

Only safetensors files are read: a pickle (`.bin`, `.ckpt`, `.pt`, `.pth`) can run arbitrary code
when loaded, so it is refused with a message saying how to convert it. A model folder cannot
reach outside itself: every file read from it (config, weights, the shards an index lists) must
resolve, symlinks followed, to a path inside the folder. The one exception is the Hugging Face
hub cache, whose `<repo>/snapshots/<revision>/` folders hold symlinks into `<repo>/blobs/`.
Every malformed file is a one-line CheckpointError naming it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from jaxdiff import files
from jaxdiff.errors import CheckpointError
from jaxdiff.files import inside, read_json, write_json  # noqa: F401  (the converters' file API)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
CONFIG_NAME = "config.json"


# ------------------------------------------------------------------------------------------
# a folder's own files


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
    """All tensors of a `.safetensors` file as numpy arrays (bf16 as ml_dtypes.bfloat16).

    Raises a one-line CheckpointError for a pickle, a missing file, and a file that is not
    safetensors, is truncated, or whose header lies about its offsets, shapes or dtypes.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    refuse_pickle(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason})") from None
    except AttributeError as e:  # a dtype numpy has no name for (e.g. float8)
        raise CheckpointError(f"{path} holds a tensor dtype jaxdiff cannot read ({e})") from None


def _index_shards(folder: str, index_name: str) -> list[str]:
    """The shard paths a `*.safetensors.index.json` maps weights to, each checked to lie inside
    `folder`."""
    index = os.path.join(folder, index_name)
    weight_map = read_json(inside(folder, index_name), what="a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index} is not a safetensors index: it needs a \"weight_map\" "
                              "object mapping tensor names to shard file names")
    shards = []
    for shard in sorted(set(weight_map.values())):
        if not shard or os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise CheckpointError(f"{index} lists the shard {shard!r}, which is not a file name "
                                  f"inside the model folder {folder}; refusing to read it")
        shards.append(inside(folder, shard, listed_in=index))
    return shards


def read_weights_folder(folder: str, stem: str, *, variant: str | None = None) -> dict[str, np.ndarray]:
    """The weights of a diffusers / transformers model folder: `<stem>[.<variant>].safetensors`,
    or the shards its `.safetensors.index.json` lists (e.g. stem "diffusion_pytorch_model" for a
    U-Net or VAE, "model" for a text encoder). A pickled weights file there (`<stem>.bin`,
    `pytorch_model.bin`, ...) is refused with the conversion instructions; otherwise a missing
    file is a CheckpointError naming what the folder holds. Files (and shards) must lie inside
    the folder (see `inside`).
    """
    folder = os.fspath(folder)
    name = stem + (f".{variant}" if variant else "") + ".safetensors"
    if os.path.isfile(os.path.join(folder, name)):
        return read_safetensors(inside(folder, name))
    if os.path.isfile(os.path.join(folder, name + ".index.json")):
        weights: dict[str, np.ndarray] = {}
        for shard in _index_shards(folder, name + ".index.json"):
            weights.update(read_safetensors(shard))
        return weights
    held = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for held_name in held:
        if held_name.lower().endswith(PICKLE_SUFFIXES):
            refuse_pickle(os.path.join(folder, held_name))
    others = [n for n in held if n.endswith(".safetensors")]
    hint = f" (it holds {', '.join(others)}: another variant?)" if others else ""
    raise CheckpointError(f"{folder} has no {name}{hint}")


def read_config(folder: str, build: Callable[[dict], Any], *, what: str,
                subfolder: str | None = None) -> Any:
    """`build(config)` for the `config.json` of a model folder.

    what: the kind of folder, for the message (e.g. "a diffusers U-Net folder").
    subfolder: the pipeline part holding such a folder (e.g. "unet"), named in the message when
      `folder` has it instead of a config.
    Raises a one-line CheckpointError naming the file when the folder or its config is missing or
    malformed, including values of the wrong type (`build`'s TypeError / ValueError / KeyError).
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder} not found: expected {what} holding {CONFIG_NAME} "
                                  "(jaxdiff reads local folders only)")
        hint = ""
        if subfolder and os.path.isdir(os.path.join(folder, subfolder)):
            hint = (f"; it has a {subfolder}/ subfolder (a pipeline folder?), pass "
                    f"{os.path.join(folder, subfolder)}")
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}: expected {what}{hint}")
    config = read_json(inside(folder, CONFIG_NAME), what="a config object")
    try:
        return build(config)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path} has a value of the wrong type or form ({type(e).__name__}: "
                              f"{e})") from None


# ------------------------------------------------------------------------------------------
# writing


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (contiguous numpy copies) to `path` atomically."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    files.atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                        tmp, metadata=dict(metadata) if metadata else None))
