"""One entry point for every pipeline folder: `jaxdiff.from_pretrained(path)`.

    pipe = jaxdiff.from_pretrained("stable-diffusion-v1-5")   # -> StableDiffusion
    pipe = jaxdiff.from_pretrained("stable-diffusion-3.5")    # -> StableDiffusion3
    pipe = jaxdiff.from_pretrained("FLUX.1-dev")              # -> Flux
    pipe = jaxdiff.from_pretrained("runs/digits")             # a jaxdiff training run -> DiffusionModel
    images = pipe("a photo of a cat", num_steps=28, guidance_scale=5.0, seed=0)

A diffusers folder names its pipeline class in `model_index.json` (`_class_name`); the family is
read from it (and, for folders whose class name is unusual, from the components it lists: a
`unet` means the Stable Diffusion family, a `transformer` with `text_encoder_3` SD3, a
`transformer` with a T5 `text_encoder_2` and no third encoder Flux). Every family takes the same
call: prompt, negative_prompt, num_steps, guidance_scale, seed, num_images, height, width,
sampler, latents, output_type.
"""

from __future__ import annotations

import importlib
import os

from jaxdiff import files
from jaxdiff.errors import CheckpointError

MODEL_INDEX = "model_index.json"
RUN_CONFIG = "config.json"

# family -> (module, class): imported only when a folder of that family is opened.
FAMILIES = {
    "stable_diffusion": ("jaxdiff.pipelines.stable_diffusion", "StableDiffusion"),
    "sd3": ("jaxdiff.pipelines.sd3", "StableDiffusion3"),
    "flux": ("jaxdiff.pipelines.flux", "Flux"),
}


def family(index: dict) -> str | None:
    """The pipeline family of a diffusers `model_index.json` object, or None if unknown."""
    name = str(index.get("_class_name", ""))
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion") or "unet" in index:
        return "stable_diffusion"
    if "transformer" in index:
        return "sd3" if "text_encoder_3" in index else "flux"
    return None


def pipeline_class(path: str | os.PathLike):
    """The class whose `from_pretrained` reads the diffusers folder `path`."""
    path = os.fspath(path)
    index = files.read_json(os.path.join(path, MODEL_INDEX), what="a pipeline index object")
    kind = family(index)
    if kind is None:
        raise CheckpointError(f"{os.path.join(path, MODEL_INDEX)} names pipeline "
                              f"{index.get('_class_name')!r}, which jaxdiff does not read; it reads Stable "
                              "Diffusion 1.x / 2.x / XL, Stable Diffusion 3 and Flux folders")
    module, name = FAMILIES[kind]
    return getattr(importlib.import_module(module), name)


def from_pretrained(path: str | os.PathLike, **kwargs):
    """The pipeline for `path`: a diffusers folder (dispatch on its `model_index.json`) or a
    jaxdiff training run (a folder with the run's `config.json`, read by `jaxdiff.load`).
    Keyword arguments go to that pipeline's `from_pretrained` (or `load`).
    Raises a one-line CheckpointError for a missing folder or one that is neither."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"model folder not found: {path} (jaxdiff reads local folders only: a diffusers "
                              "pipeline folder or a jaxdiff training run)")
    if os.path.isfile(os.path.join(path, MODEL_INDEX)):
        return pipeline_class(path).from_pretrained(path, **kwargs)
    if os.path.isfile(os.path.join(path, RUN_CONFIG)):
        from jaxdiff.pipelines import pixel
        return pixel.load(path, **kwargs)
    raise CheckpointError(f"{path} has neither {MODEL_INDEX} (a diffusers pipeline folder) nor {RUN_CONFIG} "
                          "(a jaxdiff training run)")
