"""LoRA files <-> jaxdiff adapters (`jaxdiff.models.lora`): the formats people download.

    adapters = read(path, tables)          # {part: {flax kernel path: Lora}}, numpy
    write(path, adapters, tables)          # the diffusers / PEFT file, which diffusers loads back

`tables` is {part: name table} for the networks of the pipeline, e.g. {"unet": unet.table(m),
"text_encoder": clip.table(m, prefix="")} (`unet_names` adds the LDM names kohya uses for SDXL):
the key mapping reuses the converters' own tables, so a LoRA target is any kernel they name.

Formats read (one safetensors file, or a folder holding `pytorch_lora_weights.safetensors` or a
single `.safetensors`; pickles are refused unopened):

  diffusers / PEFT (what `save_lora_weights` writes)
      unet.<module>.lora_A.weight [r, in(, kh, kw)]   unet.<module>.lora_B.weight [out, r(, 1, 1)]
      text_encoder[_2].[text_model.]<module>.lora_A.weight / .lora_B.weight
      alpha: the header's "lora_adapter_metadata" (`<part>.lora_alpha`, `<part>.alpha_pattern`,
      `<part>.use_rslora`), or `<module>.alpha` tensors; none: alpha = r (scale 1)
  older diffusers      <part>.<module>.lora.down.weight / .lora.up.weight (also `processor.to_q_lora`)
  kohya / A1111        lora_unet_<module with "_" for ".">.lora_down.weight / .lora_up.weight / .alpha
                       lora_te_ (SD 1.x/2.x), lora_te1_ / lora_te2_ (SDXL) for the text encoders;
                       U-Net modules in diffusers names (SD 1.x) or LDM names (SDXL: input_blocks_4_1_...)

Layouts: torch lora_A [r, in] -> down [in, r]; conv lora_A [r, in, kh, kw] -> down [kh, kw, in, r];
lora_B [out, r] or [out, r, 1, 1] -> up [r, out] (see `models/lora.py`).

Every failure is one CheckpointError line: an unknown or unsupported key, a down without its up,
ranks that disagree, an update whose shape does not fit the layer (with the hint that the LoRA
may be for another model family), or weights for a network the pipeline does not have (an SDXL
LoRA, with its second text encoder, into SD 1.x).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np

from jaxdiff.convert import names, single_file, tensors
from jaxdiff.errors import CheckpointError
from jaxdiff.models.lora import Lora

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

# kohya prefixes -> pipeline parts
KOHYA_PARTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
               "lora_te2": "text_encoder_2"}
PARTS = ("unet", "text_encoder", "text_encoder_2")

_PEFT = re.compile(r"(unet|text_encoder_2|text_encoder)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|alpha)"
                   r"(?:\.weight)?")
_OLD = re.compile(r"(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_KOHYA = re.compile(r"(lora_unet|lora_te1|lora_te2|lora_te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)")
_KIND = {"lora_A": "down", "lora.down": "down", "lora_down.weight": "down",
         "lora_B": "up", "lora.up": "up", "lora_up.weight": "up", "alpha": "alpha"}
_UNSUPPORTED = ("hada_", "lokr_", "dora_scale", "lora_magnitude_vector", ".diff", "lora_mid", ".bias")


# ------------------------------------------------------------------------------------------
# names


def unet_names(table: names.Table, module=None) -> dict[str, names.Entry]:
    """{module name: entry} for the kernels of a U-Net table, under its diffusers names and, when
    `module` (the `UNet`) is given, its LDM names too (kohya's SDXL LoRAs use those)."""
    out = kernel_names(table)
    if module is not None:
        ldm = single_file._unet_names(module)
        for name, e in list(out.items()):
            try:
                out.setdefault(ldm(name), e)
            except KeyError:       # diffusers-only modules (e.g. SDXL's add_embedding)
                pass
    return out


def kernel_names(table: names.Table, prefix: str = "") -> dict[str, names.Entry]:
    """{torch module name: entry} for every Dense / Conv kernel of `table` (torch key minus
    `prefix` and ".weight"); fused tensors (parts of one torch key) are not LoRA targets."""
    return {e.torch[len(prefix):-len(".weight")]: e for e in table
            if e.flax[-1] == "kernel" and e.part[1] == 1 and e.torch.startswith(prefix)}


def _lookup(part: str, module: str, targets: Mapping[str, names.Entry], kohya: bool) -> names.Entry | None:
    """The entry a LoRA module name targets: diffusers/transformers names, or kohya's with "_"
    for "." (`targets` then keyed that way); text encoders with or without `text_model`."""
    candidates = [module]
    if part.startswith("text_encoder"):
        candidates.append(module.removeprefix("text_model_" if kohya else "text_model."))
    return next((targets[n] for n in candidates if n in targets), None)


# ------------------------------------------------------------------------------------------
# reading


def lora_file(path: str | os.PathLike) -> str:
    """The safetensors file of a LoRA `path` (a file, or a folder holding `WEIGHTS_NAME` or one
    `.safetensors`); a pickle is refused without being opened."""
    path = os.fspath(path)
    tensors.refuse_pickle(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            return tensors.inside(path, WEIGHTS_NAME)
        held = sorted(os.listdir(path))
        safe = [n for n in held if n.endswith(".safetensors")]
        if len(safe) == 1:
            return tensors.inside(path, safe[0])
        for n in held:
            tensors.refuse_pickle(os.path.join(path, n))
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}" + (
            f" and several .safetensors files ({', '.join(safe)}): pass the file itself (or weight_name=)" if safe else
            " (nor any .safetensors file)"))
    if not os.path.isfile(path):
        raise CheckpointError(f"LoRA file not found: {path} (jaxdiff reads local safetensors files only)")
    return path


def read_metadata(path: str) -> dict:
    """The LoRA config a diffusers file carries in its header ({"unet.lora_alpha": 8, ...}), or {}."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):  # unreadable files are reported by read_safetensors
        return {}
    try:
        return json.loads(meta.get(METADATA_KEY, "{}"))
    except ValueError:
        raise CheckpointError(f"{path}: the header's {METADATA_KEY} is not JSON") from None


def read(path: str | os.PathLike, tables: Mapping[str, Mapping[str, names.Entry]]) -> dict[str, dict[str, Lora]]:
    """{part: {flax kernel path ("/"-joined): Lora}} from a LoRA file or folder (see the module
    docstring). tables: {part: `kernel_names`-style {module name: entry}} of the pipeline's networks."""
    path = lora_file(path)
    return from_state_dict(tensors.read_safetensors(path), tables, metadata=read_metadata(path), what=path)


def _parse(key: str, what: str):
    """(part, module, kind, kohya) of a LoRA key, or a CheckpointError naming it."""
    for bad in _UNSUPPORTED:
        if bad in key:
            raise CheckpointError(f"{what}: {key} is not a plain LoRA weight (LyCORIS LoHa/LoKr, DoRA, biases or "
                                  "full diffs are not supported); jaxdiff reads LoRA down/up pairs and alphas")
    m = _KOHYA.fullmatch(key)
    if m:
        return KOHYA_PARTS[m.group(1)], m.group(2), _KIND[m.group(3)], True
    m = _PEFT.fullmatch(_OLD.sub(lambda g: f"{g.group(1)}{'.0' if g.group(1) == 'to_out' else ''}"
                                          f".lora.{g.group(2)}.weight",
                                 key.replace(".lora_linear_layer.", ".lora.")))
    if m:
        return m.group(1), m.group(2), _KIND[m.group(3)], False
    raise CheckpointError(f"{what}: unknown LoRA key {key}; expected diffusers/PEFT keys "
                          "(unet.<layer>.lora_A.weight, text_encoder.<layer>.lora_B.weight) or kohya keys "
                          "(lora_unet_<layer>.lora_down.weight, lora_te_<layer>.alpha)")


def _alpha(part: str, module: str, rank: int, meta: Mapping, given) -> float:
    if given is not None:
        return float(np.asarray(given, np.float32).reshape(()))
    alpha = meta.get(f"{part}.lora_alpha")
    for pattern, value in (meta.get(f"{part}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if alpha is None:
        return float(rank)
    if meta.get(f"{part}.use_rslora"):       # scale alpha / sqrt(r), stored as an alpha over r
        return float(alpha) * float(np.sqrt(rank))
    return float(alpha)


def from_state_dict(state: Mapping[str, np.ndarray], tables: Mapping[str, Mapping[str, names.Entry]], *,
                    metadata: Mapping | None = None, what: str = "LoRA") -> dict[str, dict[str, Lora]]:
    """The adapters of a LoRA state dict (numpy, torch layouts); see `read`."""
    groups: dict[tuple[str, str, bool], dict[str, np.ndarray]] = {}
    for key, value in state.items():
        part, module, kind, kohya = _parse(key, what)
        groups.setdefault((part, module, kohya), {})[kind] = (key, value)
    if not groups:
        raise CheckpointError(f"{what} holds no tensors")
    missing = sorted({p for p, _, _ in groups} - set(tables))
    if missing:
        family = " (an SDXL LoRA? this pipeline has no second text encoder)" if "text_encoder_2" in missing else ""
        raise CheckpointError(f"{what} has weights for {', '.join(missing)}, which this pipeline does not have"
                              f"{family}; it has {', '.join(tables)}")
    kohya_names = {p: {k.replace(".", "_"): e for k, e in t.items()} for p, t in tables.items()}
    out: dict[str, dict[str, Lora]] = {}
    for (part, module, kohya), got in groups.items():
        if "down" not in got or "up" not in got:
            lacking = "down (lora_A)" if "down" not in got else "up (lora_B)"
            raise CheckpointError(f"{what}: {next(iter(got.values()))[0]} has no {lacking} weight beside it")
        e = _lookup(part, module, (kohya_names if kohya else tables)[part], kohya)
        (down_key, down), (up_key, up) = got["down"], got["up"]
        if e is None:
            raise CheckpointError(f"{what}: {down_key} names no Dense or Conv layer of this pipeline's {part} "
                                  "(a LoRA for another model family?)")
        lora = _to_flax(np.asarray(down, np.float32), np.asarray(up, np.float32), e, down_key, up_key, what)
        alpha = _alpha(part, module, lora.rank, metadata or {}, got.get("alpha", (None, None))[1])
        out.setdefault(part, {})["/".join(e.flax)] = lora._replace(alpha=np.float32(alpha))
    return out


def _to_flax(down, up, e: names.Entry, down_key, up_key, what) -> Lora:
    r = down.shape[0]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if up.ndim != 2 or up.shape[1] != r or down.ndim not in (2, 4):
        raise CheckpointError(f"{what}: {down_key} {list(down.shape)} and {up_key} {list(up.shape)} do not "
                              "form a LoRA pair (rank = lora_A's rows = lora_B's columns; lora_B must be [out, r] "
                              "or [out, r, 1, 1])")
    if len(e.shape) == 4:                                   # conv kernel [kh, kw, in, out]
        d = down if down.ndim == 4 else down[:, :, None, None]
        d = np.transpose(d, (2, 3, 1, 0))                   # [kh, kw, in, r]
    else:                                                   # dense kernel [in, out]
        d = down[:, :, 0, 0] if down.ndim == 4 and down.shape[2:] == (1, 1) else down
        d = np.transpose(d) if d.ndim == 2 else d
    lora = Lora(np.ascontiguousarray(d), np.ascontiguousarray(np.transpose(up)), np.float32(r))
    want = e.layout.to_torch(np.broadcast_to(np.float32(0), e.shape)).shape
    full = tuple(lora.down.shape[:-1]) + (lora.up.shape[1],)
    if full != tuple(e.shape):
        raise CheckpointError(f"{what}: {down_key} {list(down.shape)} with {up_key} {list(up.shape)} does not fit "
                              f"{e.torch} {list(want)} (a LoRA for another model family, e.g. SDXL into SD 1.x?)")
    return lora


# ------------------------------------------------------------------------------------------
# writing


def to_state_dict(adapters: Mapping[str, Mapping[str, Lora]], tables: Mapping[str, Mapping[str, names.Entry]],
                  ) -> tuple[dict[str, np.ndarray], dict]:
    """(diffusers/PEFT state dict, its LoRA metadata) of `adapters` {part: {path: Lora}}: keys
    `<part>.<module>.lora_A.weight` / `.lora_B.weight` in torch layouts, and per part the rank and
    alpha diffusers rebuilds its LoraConfig from (`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`,
    `target_modules`)."""
    state, meta = {}, {}
    for part, adapter in adapters.items():
        by_path = {}
        for name, e in tables[part].items():        # the first name: diffusers', not an LDM alias
            by_path.setdefault("/".join(e.flax), name)
        ranks, alphas = {}, {}
        for path, w in adapter.items():
            if path not in by_path:
                raise CheckpointError(f"LoRA target {path} has no {part} module name to be saved under")
            module = by_path[path]
            down, up = np.asarray(w.down, np.float32), np.asarray(w.up, np.float32)
            if down.ndim == 4:
                a = np.transpose(down, (3, 2, 0, 1))                     # [r, in, kh, kw]
                b = np.transpose(up)[:, :, None, None]                   # [out, r, 1, 1]
            else:
                a, b = np.transpose(down), np.transpose(up)              # [r, in], [out, r]
            state[f"{part}.{module}.lora_A.weight"] = np.ascontiguousarray(a)
            state[f"{part}.{module}.lora_B.weight"] = np.ascontiguousarray(b)
            ranks[module], alphas[module] = w.rank, float(np.asarray(w.alpha))
        if not ranks:
            continue
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        meta.update({
            f"{part}.r": r, f"{part}.lora_alpha": _number(alpha),
            f"{part}.rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
            f"{part}.alpha_pattern": {re.escape(m): _number(v) for m, v in alphas.items() if v != alpha},
            f"{part}.target_modules": sorted(ranks),
        })
    return state, meta


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def write(path: str | os.PathLike, adapters: Mapping[str, Mapping[str, Lora]],
          tables: Mapping[str, Mapping[str, names.Entry]]) -> str:
    """Write `adapters` as a diffusers LoRA: `path` is a folder (gets `WEIGHTS_NAME`) or a
    `.safetensors` file name. Returns the file written."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, WEIGHTS_NAME)
    state, meta = to_state_dict(adapters, tables)
    if not state:
        raise CheckpointError("no LoRA weights to save (load or train an adapter first)")
    tensors.write_safetensors(state, path, {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path
