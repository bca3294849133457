"""The recipe of an image: what made it, written into the PNG and read back.

    recipe = make_recipe(kind="generate", model="sd-tiny", weights=weights_fingerprint(folder),
                         prompt="a cat", seed=0, num_images=1, sampler="ddim", steps=30, ...)
    save_png(pixels, "cat.png", recipe)        # uint8 [N, H, W, C]; N > 1 becomes a grid
    read_recipe("cat.png")                     # the checked recipe dict (one-line ValueError if none)
    print(format_recipe(read_recipe("cat.png")))

A PNG written by jaxdiff carries two text chunks (PIL `PngInfo`, iTXt so any Unicode prompt
survives):

    jaxdiff.recipe   JSON: the fields of `make_recipe` (format `FORMAT`), machine-readable; what
                     `jaxdiff info` prints and `jaxdiff generate --recipe` / `sample --recipe` replay
    parameters       the same as a few lines of text, in the layout other image tools show
                     ("prompt\\nNegative prompt: ...\\nSteps: 30, Sampler: ..., Seed: 0, ...")

Weights fingerprints (`weights_fingerprint`) are cheap and stable, never a hash of whole files:
a diffusers folder's `*.safetensors` are hashed by their relative names, sizes, JSON headers (every
tensor's name, dtype, shape and offsets) and 16 evenly spaced 64 KiB windows of the tensor data,
so a multi-GB model is fingerprinted by reading ~1 MiB per file; the windows tell apart two
fine-tunes of one architecture, whose headers and sizes are identical. A training checkpoint step
is fingerprinted by the sha256 of its `checksums.json`, which already lists every file's size and
full sha256 (`checkpoint_fingerprint`); weights still in memory by the sha256 of their bytes
(`params_fingerprint`).

Reading is defensive: a recipe is data, never code. The chunk is capped at `MAX_RECIPE_BYTES`,
parsed with `json.loads` only, and every key and value is checked against the schema below;
anything else (garbage, a huge chunk, an unknown key or option, a wrong type) is one ValueError
line naming it.

`JAXDIFF_RECIPE=off` in the environment turns recipes off for every writer (the command line's
`--no-recipe` does it for one command).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from jaxdiff.errors import JaxdiffError

RECIPE_KEY = "jaxdiff.recipe"
PARAMETERS_KEY = "parameters"
FORMAT = 1
MAX_RECIPE_BYTES = 64 * 1024
MAX_TEXT = 4096                     # characters of any one string field (prompts included)
_WINDOWS, _WINDOW = 16, 64 * 1024   # fingerprint windows per safetensors file, and their size
KINDS = ("generate", "sample", "train_samples")

# Top-level fields and their types (None allowed for every field but format / jaxdiff / kind).
_FIELDS: dict[str, tuple] = {
    "format": (int,), "jaxdiff": (str,), "kind": (str,), "model": (str,), "weights": (str,),
    "prompt": (str,), "negative_prompt": (str,), "seed": (int,), "num_images": (int,), "index": (int,),
    "sampler": (str,), "sampler_options": (dict,), "steps": (int,), "guidance_scale": (float, int),
    "height": (int,), "width": (int,), "loras": (list,), "controlnets": (list,), "options": (dict,),
}
_REQUIRED = ("format", "jaxdiff", "kind")
# Per kind: the `options` a recipe may hold, and their types.
OPTIONS: dict[str, dict[str, tuple]] = {
    "generate": {"dtype": (str,), "clip_skip": (int,), "watermark": (bool,), "deep_cache": (int,)},
    "sample": {"labels": (str,), "use_ema": (bool,), "step": (int,), "deep_cache": (int,)},
    "train_samples": {"step": (int,), "labels": (str,), "captions": (list,), "grid": (str,)},
}
_SAMPLER_OPTIONS = {"eta": (float, int)}
_ADAPTER_FIELDS = {"name": (str,), "scale": (float, int), "hash": (str,)}


class RecipeError(JaxdiffError, ValueError):
    """A PNG without a readable jaxdiff recipe, or a recipe that does not fit the schema."""


def enabled(flag_off: bool = False) -> bool:
    """Whether to write recipes: not when `flag_off` (a --no-recipe flag) or JAXDIFF_RECIPE=off."""
    return not flag_off and os.environ.get("JAXDIFF_RECIPE", "").strip().lower() not in ("off", "0", "false", "no")


# --------------------------------------------------------------------------------------------
# Fingerprints.
# --------------------------------------------------------------------------------------------

def _safetensors_digest(path: str, h) -> None:
    """Feed `h` a file's size, its safetensors header and `_WINDOWS` windows of its data."""
    size = os.path.getsize(path)
    h.update(f"{size}\n".encode())
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        n = min(n, size - 8, 100 * 1024 * 1024)
        h.update(head + f.read(max(n, 0)))
        start = 8 + max(n, 0)
        span = max(size - start - _WINDOW, 0)
        for k in range(_WINDOWS):
            f.seek(start + span * k // max(_WINDOWS - 1, 1))
            h.update(f.read(_WINDOW))


def weights_fingerprint(path: str | os.PathLike) -> str:
    """"st-sample-sha256:<hex>" of a `.safetensors` file, or of every one under a folder (sorted by
    relative path; see the module docstring for what is read). A folder without any is
    "none"; a missing path is a FileNotFoundError."""
    path = os.fspath(path)
    if os.path.isfile(path):
        found = [("", path)]
    elif os.path.isdir(path):
        found = sorted((os.path.relpath(os.path.join(d, n), path).replace(os.sep, "/"), os.path.join(d, n))
                       for d, _, names in os.walk(path) for n in names if n.endswith(".safetensors"))
    else:
        raise FileNotFoundError(f"no weights at {path}")
    if not found:
        return "none"
    h = hashlib.sha256()
    for rel, full in found:
        h.update(f"{rel}\n".encode())
        _safetensors_digest(full, h)
    return f"st-sample-sha256:{h.hexdigest()[:32]}"


def checkpoint_fingerprint(step_folder: str | os.PathLike) -> str:
    """"ckpt-sha256:<hex>" of a checkpoint step's checksums.json (every file's size and sha256),
    or "unverified" for a step written without one."""
    manifest = os.path.join(os.fspath(step_folder), "checksums.json")
    if not os.path.isfile(manifest):
        return "unverified"
    with open(manifest, "rb") as f:
        return f"ckpt-sha256:{hashlib.sha256(f.read()).hexdigest()[:32]}"


def params_fingerprint(params) -> str:
    """"params-sha256:<hex>" of a parameter tree held in memory: every leaf's path, dtype, shape
    and bytes, in sorted path order. params: a nested dict of arrays (numpy or JAX)."""
    h = hashlib.sha256()

    def walk(prefix: str, node) -> None:
        if isinstance(node, Mapping):
            for k in sorted(node, key=str):
                walk(f"{prefix}/{k}", node[k])
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}/{i}", v)
        else:
            a = np.ascontiguousarray(np.asarray(node))
            h.update(f"{prefix}:{a.dtype}:{a.shape}\n".encode())
            h.update(a.tobytes())

    walk("", params)
    return f"params-sha256:{h.hexdigest()[:32]}"


# --------------------------------------------------------------------------------------------
# Making and writing.
# --------------------------------------------------------------------------------------------

def adapter(name: str, scale: float, path: str | os.PathLike | None) -> dict:
    """One LoRA or ControlNet entry of a recipe: its name, scale and weights fingerprint."""
    return {"name": str(name), "scale": float(scale),
            "hash": weights_fingerprint(path) if path is not None and os.path.exists(path) else "unknown"}


def make_recipe(kind: str, *, model: str | None = None, weights: str | None = None, prompt: str | None = None,
                negative_prompt: str | None = None, seed: int | None = None, num_images: int | None = None,
                index: int | None = None, sampler: str | None = None, sampler_options: Mapping | None = None,
                steps: int | None = None, guidance_scale: float | None = None, height: int | None = None,
                width: int | None = None, loras: Sequence[dict] = (), controlnets: Sequence[dict] = (),
                options: Mapping | None = None) -> dict:
    """A recipe dict (checked as `check_recipe` does). kind: one of `KINDS`. index: which image of
    the batch of `num_images` this PNG holds, None for a grid of all of them. options: the kind's
    own fields (`OPTIONS[kind]`)."""
    from jaxdiff import __version__

    recipe = {"format": FORMAT, "jaxdiff": __version__, "kind": kind, "model": model, "weights": weights,
              "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "num_images": num_images,
              "index": index, "sampler": sampler,
              "sampler_options": {k: v for k, v in (sampler_options or {}).items() if v is not None},
              "steps": steps, "guidance_scale": None if guidance_scale is None else float(guidance_scale),
              "height": height, "width": width, "loras": list(loras), "controlnets": list(controlnets),
              "options": {k: v for k, v in (options or {}).items() if v is not None}}
    return check_recipe(recipe)


def parameters_text(recipe: Mapping) -> str:
    """The recipe as the `parameters` text chunk: the prompt, the negative prompt, then one line
    of `Key: value` pairs."""
    lines = [recipe.get("prompt") or ""]
    if recipe.get("negative_prompt"):
        lines.append(f"Negative prompt: {recipe['negative_prompt']}")
    pairs = [("Steps", recipe.get("steps")), ("Sampler", recipe.get("sampler")),
             ("CFG scale", recipe.get("guidance_scale")), ("Seed", recipe.get("seed")),
             ("Size", f"{recipe['width']}x{recipe['height']}" if recipe.get("width") else None),
             ("Model", recipe.get("model")), ("Model hash", recipe.get("weights")),
             ("Images", recipe.get("num_images")), ("Index", recipe.get("index"))]
    pairs += [(f"Sampler {k}", v) for k, v in recipe.get("sampler_options", {}).items()]
    pairs += [(f"Lora {a['name']}", f"{a['scale']:g} ({a['hash']})") for a in recipe.get("loras", [])]
    pairs += [(f"ControlNet {a['name']}", f"{a['scale']:g} ({a['hash']})") for a in recipe.get("controlnets", [])]
    pairs += list(recipe.get("options", {}).items())
    pairs.append(("Version", f"jaxdiff {recipe.get('jaxdiff')}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def png_info(recipe: Mapping | None):
    """A PIL `PngInfo` holding the recipe's two text chunks (None for no recipe)."""
    if recipe is None:
        return None
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(RECIPE_KEY, json.dumps(recipe, sort_keys=True, ensure_ascii=False))
    info.add_itxt(PARAMETERS_KEY, parameters_text(recipe))
    return info


def save_png(images: np.ndarray, path: str | os.PathLike, recipe: Mapping | None, *, ncols: int | None = None,
             upscale: int | None = None) -> str:
    """`jaxdiff.images.save_grid` with the recipe's text chunks (None or JAXDIFF_RECIPE=off: none).
    images: uint8 [N, H, W, C]. Returns the absolute path written."""
    from jaxdiff import images as images_lib

    info = png_info(recipe) if enabled() else None
    return images_lib.save_grid(images, os.fspath(path), ncols=ncols, upscale=upscale, pnginfo=info)


# --------------------------------------------------------------------------------------------
# Reading and checking.
# --------------------------------------------------------------------------------------------

def _check_value(where: str, value, types: tuple) -> None:
    if value is None:
        return
    if isinstance(value, bool) and bool not in types:
        raise RecipeError(f"recipe field {where} must be {types[0].__name__}, got a boolean")
    if not isinstance(value, types):
        raise RecipeError(f"recipe field {where} must be {types[0].__name__}, got {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise RecipeError(f"recipe field {where} is {len(value)} characters long (at most {MAX_TEXT})")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"recipe field {where} must be a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2 ** 63:
        raise RecipeError(f"recipe field {where} is out of range ({value})")
    if isinstance(value, list) and where.startswith("options.") and (
            len(value) > 256 or not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in value)):
        raise RecipeError(f"recipe field {where} must be a list of at most 256 strings")


def _check_keys(where: str, given: Mapping, allowed: Mapping) -> None:
    unknown = sorted(str(k) for k in given if k not in allowed)
    if unknown:
        raise RecipeError(f"recipe {where} names {unknown[0][:40]!r}, which jaxdiff does not know "
                         f"(known: {', '.join(allowed)})")


def check_recipe(recipe) -> dict:
    """The recipe if every key and value fits the schema, else a one-line ValueError."""
    if not isinstance(recipe, dict):
        raise RecipeError(f"a recipe is a JSON object, got a JSON {type(recipe).__name__}")
    _check_keys("", recipe, _FIELDS)
    for key in _REQUIRED:
        if recipe.get(key) is None:
            raise RecipeError(f"the recipe lacks its {key!r} field")
    for key, types in _FIELDS.items():
        _check_value(key, recipe.get(key), types)
    if recipe["format"] != FORMAT:
        raise RecipeError(f"recipe format {recipe['format']} is not one this jaxdiff reads (format {FORMAT})")
    if recipe["kind"] not in KINDS:
        raise RecipeError(f"recipe kind {recipe['kind'][:40]!r} is not one of {', '.join(KINDS)}")
    for key in ("num_images", "steps", "height", "width"):
        if recipe.get(key) is not None and recipe[key] < 1:
            raise RecipeError(f"recipe field {key} must be positive, got {recipe[key]}")
    if recipe.get("index") is not None and not 0 <= recipe["index"] < (recipe.get("num_images") or 1):
        raise RecipeError(f"recipe index {recipe['index']} is outside its {recipe.get('num_images')} images")
    sampler_options = recipe.get("sampler_options") or {}
    _check_keys("sampler_options", sampler_options, _SAMPLER_OPTIONS)
    for k, v in sampler_options.items():
        _check_value(f"sampler_options.{k}", v, _SAMPLER_OPTIONS[k])
    options = recipe.get("options") or {}
    allowed = OPTIONS[recipe["kind"]]
    _check_keys(f"options (kind {recipe['kind']})", options, allowed)
    for k, v in options.items():
        _check_value(f"options.{k}", v, allowed[k])
    for part in ("loras", "controlnets"):
        entries = recipe.get(part) or []
        if len(entries) > 64:
            raise RecipeError(f"recipe lists {len(entries)} {part} (at most 64)")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise RecipeError(f"recipe {part}[{i}] must be an object with {', '.join(_ADAPTER_FIELDS)}")
            _check_keys(f"{part}[{i}]", entry, _ADAPTER_FIELDS)
            for k, types in _ADAPTER_FIELDS.items():
                if entry.get(k) is None:
                    raise RecipeError(f"recipe {part}[{i}] lacks {k!r}")
                _check_value(f"{part}[{i}].{k}", entry[k], types)
    return recipe


def parse_recipe(text) -> dict:
    """A recipe from its JSON text (or bytes), size-capped and checked; one-line ValueError else."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise RecipeError("the recipe is not UTF-8 text") from None
    if not isinstance(text, str):
        raise RecipeError(f"the recipe is not text (got {type(text).__name__})")
    if len(text.encode("utf-8", "replace")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the recipe is {len(text):,} characters long, more than the {MAX_RECIPE_BYTES:,} "
                         "bytes jaxdiff writes; refusing it")
    try:
        recipe = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RecipeError(f"the recipe is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    return check_recipe(recipe)


def read_recipe(path: str | os.PathLike) -> dict:
    """The checked recipe of the PNG at `path`. One-line ValueError for a file that is not an
    image, an image without a jaxdiff recipe, or a recipe that does not fit the schema;
    FileNotFoundError for a missing file."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}")
    try:
        with Image.open(path) as img:
            img.load()                                   # reads the text chunks after the pixels too
            chunks = dict(getattr(img, "text", {}) or {})
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RecipeError(f"{path} is not an image jaxdiff can read ({str(e).splitlines()[0][:100]})") from None
    if RECIPE_KEY not in chunks:
        raise RecipeError(f"{path} holds no jaxdiff recipe (written by another tool, or with --no-recipe)")
    try:
        return parse_recipe(chunks[RECIPE_KEY])
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def format_recipe(recipe: Mapping) -> str:
    """The recipe as one readable block (what `jaxdiff info` prints)."""
    rows = [("made by", f"jaxdiff {recipe['jaxdiff']} ({recipe['kind']})")]
    for key in ("model", "weights", "prompt", "negative_prompt", "seed", "num_images", "index", "sampler",
                "steps", "guidance_scale"):
        if recipe.get(key) is not None:
            rows.append((key.replace("_", " "), recipe[key]))
    if recipe.get("width"):
        rows.append(("size", f"{recipe['width']}x{recipe['height']} (width x height)"))
    for k, v in (recipe.get("sampler_options") or {}).items():
        rows.append((f"sampler {k}", v))
    for part in ("loras", "controlnets"):
        for a in recipe.get(part) or []:
            rows.append((part[:-1], f"{a['name']} at scale {a['scale']:g} ({a['hash']})"))
    for k, v in (recipe.get("options") or {}).items():
        rows.append(("watermark embedded" if k == "watermark" else k.replace("_", " "), v))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{(k + ':').ljust(width)}{v}" for k, v in rows)


# --------------------------------------------------------------------------------------------
# Replaying.
# --------------------------------------------------------------------------------------------

def command_args(recipe: Mapping, command: str) -> list[str]:
    """The `jaxdiff <command>` flags that make the recipe's picture again ("generate" or "sample"),
    as `--flag=value` strings (so a prompt starting with "-" stays a value); the command parses
    and checks them like typed flags, and flags typed after them win (a --lora typed after them
    adds a LoRA). LoRAs are named as the recipe names them (the path as typed when relative).
    One-line RecipeError for a recipe of another kind, or one the command cannot replay
    (ControlNet; LoRA for `sample`)."""
    kind = recipe["kind"]
    if kind != command:
        hint = {"generate": "jaxdiff generate", "sample": "jaxdiff sample"}.get(kind)
        raise RecipeError(f"the recipe was made by {kind!r}, not {command!r}"
                          + (f"; replay it with {hint} --recipe" if hint else
                             "; a training sample grid is replayed by sampling the run's checkpoint (jaxdiff sample)"))
    if recipe.get("controlnets") or (recipe.get("loras") and command != "generate"):
        raise RecipeError("the recipe used ControlNet / LoRA adapters, which this command does not load; "
                          "replay it from Python (StableDiffusion.load_lora, controlnet=)")
    opts = recipe.get("options") or {}
    flags = {"seed": recipe.get("seed"), "num": recipe.get("num_images"), "sampler": recipe.get("sampler"),
             "steps": recipe.get("steps"), "guidance_scale": recipe.get("guidance_scale"),
             "eta": (recipe.get("sampler_options") or {}).get("eta")}
    if command == "generate":
        flags.update({"model": recipe.get("model"), "prompt": recipe.get("prompt"),
                      "negative_prompt": recipe.get("negative_prompt"), "height": recipe.get("height"),
                      "width": recipe.get("width"), "clip_skip": opts.get("clip_skip"), "dtype": opts.get("dtype")})
    else:
        flags.update({"checkpoint": recipe.get("model"), "labels": opts.get("labels")})
    flags["deep_cache"] = opts.get("deep_cache")
    args = [f"--{k}={v!r}" if isinstance(v, float) else f"--{k}={v}" for k, v in flags.items() if v is not None]
    if command == "generate":
        args += [f"--lora={a['name']}:{a['scale']!r}" for a in recipe.get("loras") or []]
    if command == "generate" and opts.get("watermark") is False:
        args.append("--no-watermark")
    if command == "sample" and opts.get("use_ema") is False:
        args.append("--no-ema")
    return args
