"""The Stable Diffusion safety check on a pipeline's outputs: report, never black out.

When a Stable Diffusion folder lists a `safety_checker` in its model_index.json (the released
SD 1.x / 2.x folders do), `StableDiffusion.from_pretrained` loads it (`attach`) and every call
that returns images runs it on them (`screen`):

    pipe = StableDiffusion.from_pretrained(folder)                 # loads safety_checker/
    images = pipe("a prompt", num_images=4)                        # a JaxdiffWarning names any flagged image
    pipe.nsfw_content_detected                                     # [False, True, False, False]
    pipe.safety_result                                             # models.safety.SafetyResult (scores)
    pipe = StableDiffusion.from_pretrained(folder, safety_checker=False)   # no check at all

Unlike diffusers, flagged images are returned unchanged: the flags are recorded on the pipeline
(`nsfw_content_detected`, diffusers' name, and the scores in `safety_result`) and a warning
names the flagged images, so the caller decides what to do with them. Latent outputs are not
checked (nsfw_content_detected is None, as in diffusers).

The checker sees what diffusers' pipeline gives it: the images as 8-bit RGB, preprocessed by the
folder's `feature_extractor/preprocessor_config.json` (`models.clip_vision.preprocess`; CLIP's
224 px defaults without one).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import images as images_lib
from jaxdiff.convert import clip_vision as clip_vision_convert
from jaxdiff.convert import safety as safety_convert
from jaxdiff.convert import tensors
from jaxdiff.errors import CheckpointError, JaxdiffWarning
from jaxdiff.models import safety as safety_model
from jaxdiff.models.clip_vision import preprocess

PART = "safety_checker"
FEATURE_EXTRACTOR = "feature_extractor"
MODEL_INDEX = "model_index.json"
# Images per checker call (each call is one jitted ViT-L/14 forward on this many 224 px images).
BATCH = 8


class Checker(NamedTuple):
    """A loaded safety checker: the module, its parameters and its preprocessing."""

    module: safety_model.SafetyChecker
    params: Any
    transform: clip_vision_convert.ImageTransform


def listed(path: str) -> bool:
    """Whether the pipeline folder's model_index.json names a safety checker."""
    index_path = os.path.join(path, MODEL_INDEX)
    if not os.path.isfile(index_path):
        return False
    entry = tensors.read_json(tensors.inside(path, MODEL_INDEX), what="a pipeline index object").get(PART)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def load(path: str | os.PathLike, dtype=jnp.float32) -> Checker | None:
    """The checker of a pipeline folder, or None when its model_index.json lists none. Raises a
    CheckpointError when it is listed but missing or unreadable (naming safety_checker=False)."""
    path = os.fspath(path)
    if not listed(path):
        return None
    folder = os.path.join(path, PART)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path}/{MODEL_INDEX} lists a {PART} but the folder has no {PART}/; "
                              "restore it, or load with safety_checker=False to run without the check")
    module, params = safety_convert.load(tensors.inside(path, PART), dtype)
    extractor = os.path.join(path, FEATURE_EXTRACTOR)
    transform = (clip_vision_convert.read_preprocessor(tensors.inside(path, FEATURE_EXTRACTOR))
                 if os.path.isdir(extractor) else clip_vision_convert.ImageTransform())
    if transform.crop_size != module.vision.image_size:
        raise CheckpointError(f"{extractor} crops to {transform.crop_size} px but the safety checker reads "
                              f"{module.vision.image_size} px")
    return Checker(module, jax.tree.map(jnp.asarray, params), transform)


def attach(pipe, path, dtype=jnp.float32, enabled: bool = True) -> None:
    """Give `pipe` the folder's checker (`pipe.safety_checker`; None when disabled or unlisted)."""
    pipe.safety_checker = load(path, dtype) if enabled else None
    pipe.nsfw_content_detected = pipe.safety_result = None


def _as_uint8(images, output_type: str) -> np.ndarray:
    """A pipeline output ("pil", "np", "uint8") as uint8 [N, H, W, 3]."""
    if output_type == "pil":
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    if output_type == "uint8":
        return np.asarray(images)
    return images_lib.to_uint8(images)


def run(checker: Checker, images_uint8) -> safety_model.SafetyResult:
    """The checker's result for uint8 images [N, H, W, 3], BATCH images per call."""
    t = checker.transform
    pixels = preprocess(images_uint8, t.size, t.crop_size, t.mean, t.std)          # [N, S, S, 3]
    parts = [safety_model.check(checker.module, checker.params, pixels[i:i + BATCH])
             for i in range(0, len(pixels), BATCH)]
    return safety_model.SafetyResult(*(np.concatenate(p) for p in zip(*parts)))


def screen(pipe, images, output_type: str):
    """Check a call's output with `pipe.safety_checker` (when it has one), record the flags on
    `pipe` and warn naming the flagged images; returns `images` unchanged."""
    checker = getattr(pipe, "safety_checker", None)
    pipe.nsfw_content_detected = pipe.safety_result = None
    if checker is None or output_type == "latent":
        return images
    result = run(checker, _as_uint8(images, output_type))
    pipe.safety_result = result
    pipe.nsfw_content_detected = [bool(f) for f in result.flagged]
    flagged = [i for i, f in enumerate(result.flagged) if f]
    if flagged:
        warnings.warn(JaxdiffWarning(
            f"the safety checker flagged image(s) {', '.join(map(str, flagged))} of {len(result.flagged)} "
            "as potentially NSFW; they are returned unchanged (see pipe.nsfw_content_detected); load with "
            "safety_checker=False to skip the check"), stacklevel=3)
    return images
