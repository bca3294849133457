"""jaxdiff: diffusion models in JAX.

    import jaxdiff
    model = jaxdiff.load("runs/digits")            # a trained run
    images = model.sample(16, sampler="ddim", num_steps=50, seed=0)   # uint8 [16, H, W, C]

    from jaxdiff import schedules, samplers, sampling
    sched = schedules.discrete("linear")
    x0 = sampling.sample(samplers.get("ddim", sched, num_steps=50), model_fn, noise, key)

    pipe = jaxdiff.from_pretrained("path/to/stable-diffusion-v1-5")   # any diffusers folder: SD 1/2/XL, SD3, Flux
    pictures = pipe("a photo of a cat", num_steps=30, guidance_scale=7.5, seed=0)     # list of PIL images
    pipe.load_lora("path/to/lora.safetensors", scale=0.7)     # diffusers/PEFT or kohya LoRA files

Submodules are imported on first use, so `import jaxdiff` (and the CLI's help) stays fast.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"schedules", "parameterization", "samplers", "sampling", "models", "data",
               "sharding", "checkpoint", "config", "images", "pipelines", "train", "errors",
               "convert", "metrics", "provenance"}
_EXPORTS = {"from_pretrained": "jaxdiff.pipelines.auto", "load": "jaxdiff.pipelines.pixel",
            "DiffusionModel": "jaxdiff.pipelines.pixel", "StableDiffusion": "jaxdiff.pipelines.stable_diffusion",
            "StableDiffusion3": "jaxdiff.pipelines.sd3", "Flux": "jaxdiff.pipelines.flux", "save_lora": "jaxdiff.pipelines.lora"}

__all__ = sorted(_SUBMODULES | set(_EXPORTS))


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxdiff.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")
