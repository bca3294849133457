"""Layout rules and file I/O shared by every checkpoint mapping.

PyTorch and Flax store the same layers with different layouts:

    torch Conv2d.weight  [O, I, kh, kw]   <->  flax Conv.kernel   [kh, kw, I, O]
    torch Linear.weight  [O, I]           <->  flax Dense.kernel  [I, O]
    torch *Norm.weight   [C]              <->  flax *Norm.scale   [C]
    torch Embedding.weight [N, D]         <->  flax Embed.embedding [N, D]

A mapping in this package turns a flat `{"a.b.weight": array}` state dict into a flat
`{("a", "b", "kernel"): array}` dict; `unflatten` nests it for `module.apply`.

Only safetensors files are read: a pickle (`.bin`, `.ckpt`, `.pt`, `.pth`) can run arbitrary code
when loaded, so it is refused with a message saying how to convert it.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
from flax import traverse_util

from jaxdiff.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


# ------------------------------------------------------------------------------------------
# layouts


def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """[O, I, kh, kw] -> [kh, kw, I, O]."""
    return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(k: np.ndarray) -> np.ndarray:
    """[kh, kw, I, O] -> [O, I, kh, kw]."""
    return np.transpose(k, (3, 2, 0, 1))


def linear_to_flax(w: np.ndarray) -> np.ndarray:
    """[O, I] -> [I, O]; a 1x1 conv weight [O, I, 1, 1] is accepted as a linear one."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.transpose(w)


def linear_to_torch(k: np.ndarray) -> np.ndarray:
    """[I, O] -> [O, I]."""
    return np.transpose(k)


def weight_to_flax(torch_name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
    """Map a torch leaf (`weight`/`bias`) to its flax leaf name and layout, judged by rank.

    rank 4 -> conv `kernel`; rank 2 -> dense `kernel`; rank 1 `weight` -> norm `scale`;
    `bias` unchanged. Embedding tables are not rank-judged: map them explicitly.
    """
    if torch_name == "bias":
        return "bias", w
    if torch_name != "weight":
        raise CheckpointError(f"unexpected parameter leaf {torch_name!r}")
    if w.ndim == 4:
        return "kernel", conv_to_flax(w)
    if w.ndim == 2:
        return "kernel", linear_to_flax(w)
    if w.ndim == 1:
        return "scale", w
    raise CheckpointError(f"cannot map a rank-{w.ndim} weight")


# ------------------------------------------------------------------------------------------
# trees


def unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
    """{("a", "b"): x} -> {"a": {"b": x}}."""
    return traverse_util.unflatten_dict(dict(flat))


def flatten(tree: Mapping) -> dict[tuple[str, ...], np.ndarray]:
    """{"a": {"b": x}} -> {("a", "b"): x}."""
    return traverse_util.flatten_dict(tree)


def check_same_keys(got, expected, *, what: str) -> None:
    """Raise a CheckpointError naming missing and unexpected keys (at most 10 of each)."""
    got, expected = set(got), set(expected)
    missing, unexpected = sorted(expected - got, key=str), sorted(got - expected, key=str)
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
    raise CheckpointError(f"{what}: " + "; ".join(parts))


def check_same_shapes(got: Mapping, expected: Mapping, *, what: str) -> None:
    """Raise a CheckpointError naming the first keys whose shapes differ."""
    bad = [(k, np.shape(got[k]), np.shape(expected[k])) for k in expected
           if k in got and np.shape(got[k]) != np.shape(expected[k])]
    if bad:
        lines = ", ".join(f"{_key(k)} has {g}, expected {e}" for k, g, e in bad[:5])
        raise CheckpointError(f"{what}: {len(bad)} shape mismatch(es): {lines}")


def _key(k) -> str:
    return "/".join(k) if isinstance(k, tuple) else str(k)


def _names(keys) -> str:
    shown = ", ".join(_key(k) for k in keys[:10])
    return shown + (", ..." if len(keys) > 10 else "")


# ------------------------------------------------------------------------------------------
# files


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


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (contiguous numpy copies) to `path` atomically."""
    from safetensors.numpy import save_file

    tmp = f"{path}.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
              metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
