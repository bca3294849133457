"""Write a whole diffusers-format Stable Diffusion pipeline folder from jaxdiff networks.

    save_pretrained(out_dir, components, *, tokenizer_dir=None) -> list[str]

`components` is what `single_file.load_single_file` returns: {"unet": (UNet, params),
"vae": (AutoencoderKL, params), "text_encoder": (CLIPTextEncoder, params), "scheduler": dict}.
The folder written is the one `diffusers.StableDiffusionPipeline.from_pretrained(out_dir)`
(`StableDiffusionInpaintPipeline` for a 9-channel U-Net) reads:

    model_index.json                       pipeline class and each component's library/class
    unet/        config.json + diffusion_pytorch_model.safetensors   (convert/unet.py)
    vae/         config.json + diffusion_pytorch_model.safetensors   (convert/vae.py)
    text_encoder/ config.json + model.safetensors                    (convert/clip.py)
    scheduler/scheduler_config.json
    tokenizer/   copied from `tokenizer_dir` (jaxdiff networks hold no tokenizer)

No safety checker or feature extractor is written (`requires_safety_checker: false`).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any, Mapping

from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import unet as unet_convert
from jaxdiff.convert import vae as vae_convert
from jaxdiff.errors import CheckpointError

INPAINT_IN_CHANNELS = 9
# The diffusers folder-format version model_index.json declares (diffusers reads it to decide
# on compatibility paths, e.g. for inpainting folders from before 0.6).
DIFFUSERS_FORMAT_VERSION = "0.30.0"


def _write_json(obj: Mapping, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def tokenizer_source(tokenizer_dir: str | os.PathLike) -> str:
    """The folder holding the tokenizer files (a pipeline root's tokenizer/ is accepted);
    raises CheckpointError when it holds no readable CLIP tokenizer."""
    from jaxdiff.models.tokenizer import CLIPTokenizer

    tokenizer_dir = os.fspath(tokenizer_dir)
    sub = os.path.join(tokenizer_dir, "tokenizer")
    if os.path.isdir(sub) and not os.path.isfile(os.path.join(tokenizer_dir, "vocab.json")):
        tokenizer_dir = sub
    CLIPTokenizer.from_dir(tokenizer_dir)  # raises a CheckpointError naming what is missing
    return tokenizer_dir


def save_pretrained(out_dir: str | os.PathLike, components: Mapping[str, Any], *,
                    tokenizer_dir: str | os.PathLike | None = None) -> list[str]:
    """Write `components` as a diffusers Stable Diffusion pipeline folder.

    tokenizer_dir: a CLIP tokenizer folder (vocab.json + merges.txt or tokenizer.json, e.g. the
      `tokenizer/` of a diffusers SD folder of the same family) copied to `out_dir/tokenizer`.
      Without it the folder has no tokenizer (model_index.json lists none) and a note says so.
    Returns notes for the user (empty when the folder is complete).
    """
    out_dir = os.fspath(out_dir)
    missing = [k for k in ("unet", "vae", "text_encoder", "scheduler") if k not in components]
    if missing:
        raise CheckpointError(f"save_pretrained: components lack {', '.join(missing)}")
    tok_src = None if tokenizer_dir is None else tokenizer_source(tokenizer_dir)
    unet_module, unet_params = components["unet"]
    os.makedirs(out_dir, exist_ok=True)

    unet_convert.save(os.path.join(out_dir, "unet"), unet_module, unet_params)
    vae_convert.save(os.path.join(out_dir, "vae"), *components["vae"])
    clip_convert.save(os.path.join(out_dir, "text_encoder"), *components["text_encoder"])
    scheduler = dict(components["scheduler"])
    scheduler.setdefault("_class_name", "PNDMScheduler")
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    _write_json(scheduler, os.path.join(out_dir, "scheduler", "scheduler_config.json"))

    notes = []
    tok_dst = os.path.join(out_dir, "tokenizer")
    if tok_src is not None:
        if os.path.abspath(tok_src) != os.path.abspath(tok_dst):
            shutil.copytree(tok_src, tok_dst, dirs_exist_ok=True)
    elif not os.path.isdir(tok_dst):
        notes.append(
            f"no tokenizer: single files and jaxdiff networks carry none, so {out_dir} has no "
            "tokenizer/ folder; copy the tokenizer/ folder of a diffusers Stable Diffusion "
            "pipeline of the same family (SD 1.x: CLIP ViT-L/14's, SD 2.x: its own) into it, "
            "or pass tokenizer_dir (--tokenizer on the command line)")
    with open(os.path.join(out_dir, "unet", "config.json")) as f:
        in_channels = json.load(f)["in_channels"]
    pipeline = ("StableDiffusionInpaintPipeline" if in_channels == INPAINT_IN_CHANNELS
                else "StableDiffusionPipeline")
    has_tokenizer = os.path.isdir(tok_dst)
    _write_json({
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if has_tokenizer else [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, os.path.join(out_dir, "model_index.json"))
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes
