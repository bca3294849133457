"""Whole diffusers-format Stable Diffusion pipeline folders <-> jaxdiff networks, both ways.

    load_pretrained(folder, dtype) -> components       (read, checking every part is there)
    save_pretrained(out_dir, components, *, tokenizer_dir=None) -> list[str]     (write)

`components` is what `single_file.load_single_file` returns: {"unet": (UNet, params),
"vae": (AutoencoderKL, params), "text_encoder": (CLIPTextEncoder, params), "scheduler": dict};
`load_pretrained` returns the same, plus "tokenizer": a `CLIPTokenizer` and "options" (below).

SDXL folders (`model_index.json` lists `text_encoder_2`) are read by the same `load_pretrained`:
they add `text_encoder_2/` (a CLIPTextModelWithProjection) and `tokenizer_2/`; a refiner folder
(`StableDiffusionXLImg2ImgPipeline` layout) lists `text_encoder` and `tokenizer` as
`[null, null]` and has only the second pair. "options" carries what the pipeline needs from the
folder's configs: {"xl": bool, "force_zeros_for_empty_prompt": bool (model_index.json, default
True for SDXL, False otherwise), "requires_aesthetics_score": bool (default False),
"force_upcast": bool (vae/config.json)}. `variant="fp16"` reads every network's
`*.fp16.safetensors` (parameters are float32 whatever the files hold).
The folder written is the one `diffusers.StableDiffusionPipeline.from_pretrained(out_dir)`
(`StableDiffusionInpaintPipeline` for a 9-channel U-Net) reads:

    model_index.json                       pipeline class and each component's library/class
    unet/        config.json + diffusion_pytorch_model.safetensors   (convert/unet.py)
    vae/         config.json + diffusion_pytorch_model.safetensors   (convert/vae.py)
    text_encoder/ config.json + model.safetensors                    (convert/clip.py)
    scheduler/scheduler_config.json
    tokenizer/   the tokenizer files of `tokenizer_dir` (jaxdiff networks hold no tokenizer)

No safety checker or feature extractor is written (`requires_safety_checker: false`).
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Mapping

from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import tensors
from jaxdiff.convert import unet as unet_convert
from jaxdiff.convert import vae as vae_convert
from jaxdiff.errors import CheckpointError, JaxdiffWarning

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
# SDXL's micro-conditioning numbers per row: original size (2), crop corner (2) and target size
# (2), or for a refiner (requires_aesthetics_score) original size, crop corner and the score.
XL_TIME_IDS, XL_AESTHETIC_TIME_IDS = 6, 5
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
INPAINT_IN_CHANNELS = 9
# The diffusers folder-format version model_index.json declares (diffusers reads it to decide
# on compatibility paths, e.g. for inpainting folders from before 0.6).
DIFFUSERS_FORMAT_VERSION = "0.30.0"


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


def _copy_tokenizer(src: str, dst: str) -> None:
    """Copy the tokenizer files of `src` (each checked to lie inside it) into `dst`."""
    from jaxdiff.models import tokenizer as tok_lib

    os.makedirs(dst, exist_ok=True)
    for name in (tok_lib.TOKENIZER_FILE, tok_lib.VOCAB_FILE, tok_lib.MERGES_FILE,
                 tok_lib.SPECIAL_TOKENS_FILE, tok_lib.CONFIG_FILE, "added_tokens.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(tensors.inside(src, name), os.path.join(dst, name))


def save_pretrained(out_dir: str | os.PathLike, components: Mapping[str, Any], *,
                    tokenizer_dir: str | os.PathLike | None = None) -> list[str]:
    """Write `components` as a diffusers Stable Diffusion pipeline folder.

    tokenizer_dir: a CLIP tokenizer folder (vocab.json + merges.txt or tokenizer.json, e.g. the
      `tokenizer/` of a diffusers SD folder of the same family) copied to `out_dir/tokenizer`.
      Without it the folder has no tokenizer (model_index.json lists none) and a note says so.
    Returns notes for the user (empty when the folder is complete).
    """
    out_dir = os.fspath(out_dir)
    xl = "text_encoder_2" in components
    if xl:
        return _save_xl(out_dir, components, tokenizer_dir)
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
    tensors.write_json(scheduler, os.path.join(out_dir, "scheduler", SCHEDULER_CONFIG))

    notes = []
    tok_dst = os.path.join(out_dir, "tokenizer")
    if tok_src is not None:
        if os.path.abspath(tok_src) != os.path.abspath(tok_dst):
            _copy_tokenizer(tok_src, tok_dst)
    elif not os.path.isdir(tok_dst):
        notes.append(
            f"no tokenizer: single files and jaxdiff networks carry none, so {out_dir} has no "
            "tokenizer/ folder; copy the tokenizer/ folder of a diffusers Stable Diffusion "
            "pipeline of the same family (SD 1.x: CLIP ViT-L/14's, SD 2.x: its own) into it, "
            "or pass tokenizer_dir (--tokenizer on the command line)")
    unet_config = tensors.read_json(os.path.join(out_dir, "unet", unet_convert.CONFIG_NAME))
    in_channels = unet_config["in_channels"]
    pipeline = ("StableDiffusionInpaintPipeline" if in_channels == INPAINT_IN_CHANNELS
                else "StableDiffusionPipeline")
    has_tokenizer = os.path.isdir(tok_dst)
    tensors.write_json({
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
    }, os.path.join(out_dir, MODEL_INDEX))
    for note in notes:
        warnings.warn(JaxdiffWarning(note), stacklevel=2)
    return notes


def _save_xl(out_dir: str, components: Mapping[str, Any], tokenizer_dir) -> list[str]:
    """`save_pretrained` of SDXL components (a refiner: no "text_encoder"): a folder that
    diffusers' StableDiffusionXL(Img2Img / Inpaint)Pipeline reads. tokenizer_dir: a diffusers
    SDXL folder whose tokenizer/ and tokenizer_2/ are copied."""
    missing = [k for k in ("unet", "vae", "scheduler") if k not in components]
    if missing:
        raise CheckpointError(f"save_pretrained: components lack {', '.join(missing)}")
    options = dict(components.get("options") or {})
    refiner = "text_encoder" not in components
    os.makedirs(out_dir, exist_ok=True)
    unet_convert.save(os.path.join(out_dir, "unet"), *components["unet"])
    vae_convert.save(os.path.join(out_dir, "vae"), *components["vae"])
    index: dict[str, Any] = {"text_encoder": [None, None], "tokenizer": [None, None]}
    notes = []
    for part in ("text_encoder", "text_encoder_2"):
        if part not in components:
            continue
        clip_convert.save(os.path.join(out_dir, part), *components[part])
        index[part] = ["transformers", clip_convert.config_to_transformers(components[part][0])["architectures"][0]]
        tok = part.replace("text_encoder", "tokenizer")
        src = None if tokenizer_dir is None else os.path.join(os.fspath(tokenizer_dir), tok)
        if src is not None and os.path.isdir(src):
            _copy_tokenizer(tokenizer_source(src), os.path.join(out_dir, tok))
        index[tok] = ["transformers", "CLIPTokenizer"] if os.path.isdir(os.path.join(out_dir, tok)) else [None, None]
        if index[tok][0] is None:
            notes.append(f"no {tok}: single files carry none, so {out_dir} has no {tok}/ folder; copy the {tok}/ "
                         "folder of a diffusers SDXL pipeline into it, or pass tokenizer_dir (--tokenizer on the "
                         f"command line) as an SDXL folder holding {tok}/")
    scheduler = dict(components["scheduler"])
    scheduler.setdefault("_class_name", "EulerDiscreteScheduler")
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    tensors.write_json(scheduler, os.path.join(out_dir, "scheduler", SCHEDULER_CONFIG))
    nine = components["unet"][0].in_channels == INPAINT_IN_CHANNELS
    pipeline = "StableDiffusionXLInpaintPipeline" if nine else (
        "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline")
    index.update({"_class_name": pipeline, "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                  "feature_extractor": [None, None], "image_encoder": [None, None],
                  "scheduler": ["diffusers", scheduler["_class_name"]],
                  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "force_zeros_for_empty_prompt": bool(options.get("force_zeros_for_empty_prompt", not refiner))})
    if pipeline != "StableDiffusionXLPipeline":
        index["requires_aesthetics_score"] = bool(options.get("requires_aesthetics_score", refiner))
    tensors.write_json(index, os.path.join(out_dir, MODEL_INDEX))
    for note in notes:
        warnings.warn(JaxdiffWarning(note), stacklevel=3)
    return notes


# --------------------------------------------------------------------------------------------
# Reading.


def load_pretrained(path: str | os.PathLike, dtype=None, *, progress: bool = False,
                    variant: str | None = None) -> dict[str, Any]:
    """Read a diffusers Stable Diffusion 1.x / 2.x / XL folder: {"unet": (UNet, params), "vae":
    (AutoencoderKL, params), "text_encoder": (CLIPTextEncoder, params), "tokenizer":
    CLIPTokenizer, "scheduler": dict, "options": dict}, and for SDXL "text_encoder_2" and
    "tokenizer_2" too (a refiner has no "text_encoder" / "tokenizer"). dtype: compute dtype of
    the networks (None: float32; parameters are float32 whatever the files hold). progress: a bar
    over the parts. variant: e.g. "fp16" to read `*.fp16.safetensors`.
    Raises CheckpointError naming the missing or unreadable part."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from jaxdiff.models.tokenizer import CLIPTokenizer

    dtype = jnp.float32 if dtype is None else dtype
    path = os.fspath(path)
    wanted = check_pipeline_folder(path)
    index = tensors.read_json(tensors.inside(path, MODEL_INDEX), what="a pipeline index object")
    parts: dict[str, Any] = {}
    bar = tqdm(wanted, desc="load", unit="part", disable=not progress)
    for part in bar:
        bar.set_postfix_str(part)
        folder = tensors.inside(path, part)
        if part == "unet":
            parts[part] = unet_convert.load(folder, dtype, variant=variant)
        elif part == "vae":
            parts[part] = vae_convert.load(folder, dtype, variant=variant)
        elif part.startswith("text_encoder"):
            parts[part] = clip_convert.load(folder, dtype, variant=variant)
        elif part.startswith("tokenizer"):
            parts[part] = CLIPTokenizer.from_dir(folder)
        else:
            parts[part] = tensors.read_json(tensors.inside(folder, SCHEDULER_CONFIG))
    bar.close()
    xl = "text_encoder_2" in wanted
    vae_config = tensors.read_json(tensors.inside(path, os.path.join("vae", vae_convert.CONFIG_NAME)))
    parts["options"] = {
        "xl": xl,
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)) and xl,
        "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)) and xl,
        "force_upcast": bool(vae_config.get("force_upcast", False)),
    }
    _check_widths(path, parts)
    return parts


def _check_widths(path: str, parts: Mapping[str, Any]) -> None:
    """The U-Net's cross-attention (and for SDXL its added embedding) must take what the text
    encoders give; one CheckpointError naming both numbers otherwise."""
    unet = parts["unet"][0]
    texts = [parts[k][0] for k in ("text_encoder", "text_encoder_2") if k in parts]
    if unet.context_dim is None:
        raise CheckpointError(f"{os.path.join(path, 'unet')} is not text-conditioned (no cross_attention_dim); "
                              "a Stable Diffusion U-Net needs cross-attention")
    xl = parts["options"]["xl"]
    if xl and texts[-1].projection_dim is None:
        raise CheckpointError(f"{os.path.join(path, 'text_encoder_2')} has no projection head: SDXL's second "
                              "text encoder must be a CLIPTextModelWithProjection")
    width = sum(t.hidden_size for t in texts)
    if unet.context_dim != width:
        what = " + ".join(str(t.hidden_size) for t in texts)
        raise CheckpointError(f"the U-Net's cross_attention_dim={unet.context_dim} does not match the text "
                              f"encoder{'s' if len(texts) > 1 else ''}' hidden_size={what} in {path}")
    if not xl:
        return
    pooled = texts[-1].projection_dim
    if unet.addition_embed_dim is None:
        raise CheckpointError(f"{os.path.join(path, 'unet')} has no added text/time embedding "
                              "(addition_embed_type='text_time'), which an SDXL U-Net needs")
    ids = XL_AESTHETIC_TIME_IDS if parts["options"]["requires_aesthetics_score"] else XL_TIME_IDS
    want = pooled + ids * unet.addition_time_embed_dim
    if unet.addition_embed_dim != want:
        raise CheckpointError(
            f"the U-Net's projection_class_embeddings_input_dim={unet.addition_embed_dim} does not match "
            f"text_encoder_2's projection_dim={pooled} + {ids} time ids x {unet.addition_time_embed_dim} = {want} "
            f"in {path} (requires_aesthetics_score={parts['options']['requires_aesthetics_score']} in "
            f"{MODEL_INDEX})")


def _listed(index: Mapping, part: str) -> bool:
    """Whether model_index.json names a component for `part` (a refiner lists text_encoder as [null, null])."""
    entry = index.get(part)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def check_pipeline_folder(path: str) -> tuple[str, ...]:
    """Raise CheckpointError unless `path` is a diffusers SD 1.x / 2.x / XL pipeline folder with
    every part; returns the parts to read (SD: PIPELINE_PARTS; SDXL: those of XL_PARTS it lists)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"Stable Diffusion folder not found: {path} (jaxdiff reads local diffusers-format "
                              "folders only; download or save_pretrained the pipeline first)")
    index_path = os.path.join(path, MODEL_INDEX)
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{path} has no {MODEL_INDEX}: expected a diffusers pipeline folder with "
                              f"{', '.join(p + '/' for p in PIPELINE_PARTS)} (save one with "
                              "StableDiffusionPipeline.save_pretrained(folder, safe_serialization=True))")
    index = tensors.read_json(tensors.inside(path, MODEL_INDEX), what="a pipeline index object")
    if "unet" not in index and "transformer" in index:
        raise CheckpointError(f"{path} is a {index.get('_class_name', 'different')} folder; jaxdiff's "
                              "StableDiffusion reads Stable Diffusion 1.x / 2.x / XL pipelines (CLIP text "
                              "encoders and a U-Net)")
    parts = PIPELINE_PARTS
    if "text_encoder_2" in index:
        parts = tuple(p for p in XL_PARTS if _listed(index, p) or p not in ("text_encoder", "tokenizer"))
        if ("text_encoder" in parts) != ("tokenizer" in parts):
            raise CheckpointError(f"{MODEL_INDEX} in {path} lists text_encoder and tokenizer unpaired; an SDXL "
                                  "folder has both (base) or neither (refiner)")
    for part in parts:
        folder = tensors.inside(path, part)
        if not os.path.isdir(folder):
            listed = index.get(part)
            what = f" (model_index.json lists {part}: {listed[1]})" if isinstance(listed, list) and listed[1:] else ""
            raise CheckpointError(f"{path} has no {part}/ folder{what}; a "
                                  f"{'Stable Diffusion XL' if parts is not PIPELINE_PARTS else 'Stable Diffusion'} "
                                  f"folder needs {', '.join(p + '/' for p in parts)}")
    if not os.path.isfile(os.path.join(path, "scheduler", SCHEDULER_CONFIG)):
        raise CheckpointError(f"{os.path.join(path, 'scheduler')} has no {SCHEDULER_CONFIG}")
    return parts
