"""diffusers `StableDiffusionSafetyChecker` folders (config.json + model.safetensors) <->
`models.safety.SafetyChecker`.

A Stable Diffusion 1.x / 2.x pipeline folder holds one as `safety_checker/` (its config.json is a
`CLIPConfig`: the `vision_config` and `projection_dim` are read, the text side is unused), and
its preprocessing as `feature_extractor/preprocessor_config.json`. Public API:

    module_from_config(config, dtype=jnp.float32) -> SafetyChecker
    params_from_torch(state_dict, module) -> params
    params_to_torch(params, module) -> dict[str, np.ndarray]
    load(folder, dtype=jnp.float32) -> (module, params)
    save(folder, module, params)          # a folder diffusers' StableDiffusionSafetyChecker loads

Names: the image tower as in convert/clip_vision.py under `vision_model.vision_model.` (files
from transformers 4.x, every released checker) or `vision_model.` (transformers 5 flattens its
CLIPVisionModel); both are read, `save` writes the first, which both versions load. The head is
`visual_projection.weight`; the four concept tensors keep their names (`concept_embeds`,
`special_care_embeds`, `concept_embeds_weights`, `special_care_embeds_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import clip_vision, names, tensors
from jaxdiff.errors import CheckpointError
from jaxdiff.models.safety import SafetyChecker

PREFIX = "vision_model.vision_model."
FLAT_PREFIX = "vision_model."
CONCEPTS = ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ARCHITECTURE = "StableDiffusionSafetyChecker"


def module_from_config(config: Mapping, dtype=jnp.float32) -> SafetyChecker:
    """A `SafetyChecker` from the checker's `CLIPConfig` dict (vision_config, projection_dim)."""
    archs = list(config.get("architectures") or [])
    if archs and archs != [ARCHITECTURE]:
        raise CheckpointError(f"config.json architecture {archs[0]!r} is not a {ARCHITECTURE}")
    vision_config = dict(config.get("vision_config") or {})
    vision_config.pop("architectures", None)
    projection = int(config.get("projection_dim") or 768)
    return SafetyChecker(clip_vision.vision_from_config(vision_config, dtype, projection_dim=projection))


def config_to_diffusers(module: SafetyChecker) -> dict:
    """The `CLIPConfig` dict diffusers builds the same checker from (a default text side)."""
    vision = clip_vision.vision_config_to_transformers(module.vision.clone(projection_dim=None))
    vision.pop("architectures")
    return {"architectures": [ARCHITECTURE], "model_type": "clip",
            "projection_dim": module.vision.projection_dim, "vision_config": vision, "text_config": {}}


def _split(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict, str]:
    """(vision tensors, concept tensors, the vision prefix used)."""
    prefix = PREFIX if any(k.startswith(PREFIX) for k in state_dict) else FLAT_PREFIX
    concepts = {k: v for k, v in state_dict.items() if k in CONCEPTS}
    vision = {k: v for k, v in state_dict.items() if k not in CONCEPTS}
    return vision, concepts, prefix


def params_from_torch(state_dict: Mapping[str, np.ndarray], module: SafetyChecker) -> dict:
    """A StableDiffusionSafetyChecker state dict (numpy) -> `module`'s params (float32 numpy).
    Raises CheckpointError naming missing / unexpected keys and shape mismatches."""
    vision_sd, concept_sd, prefix = _split(state_dict)
    missing = [k for k in CONCEPTS if k not in concept_sd]
    if missing:
        raise CheckpointError(f"safety checker checkpoint: missing {len(missing)} key(s): {', '.join(missing)}")
    params = {"vision": clip_vision.vision_params_from_torch(vision_sd, module.vision, prefix)}
    want = {"concept_embeds": (module.num_concepts, module.vision.projection_dim),
            "special_care_embeds": (module.num_special, module.vision.projection_dim),
            "concept_embeds_weights": (module.num_concepts,), "special_care_embeds_weights": (module.num_special,)}
    for k, shape in want.items():
        if tuple(np.shape(concept_sd[k])) != shape:
            raise CheckpointError(f"safety checker checkpoint: {k} has {tuple(np.shape(concept_sd[k]))}, "
                                  f"expected {shape}")
        params[k] = np.asarray(concept_sd[k], np.float32)
    return params


def params_to_torch(params: Mapping, module: SafetyChecker) -> dict[str, np.ndarray]:
    """`module`'s params -> the state dict diffusers' checker loads (transformers 4.x names)."""
    params = jax.device_get(params)
    names.check_same_keys(params, ("vision",) + CONCEPTS, what="safety checker params")
    out = clip_vision.vision_params_to_torch(params["vision"], module.vision, PREFIX)
    out.update({k: np.ascontiguousarray(np.asarray(params[k], np.float32)) for k in CONCEPTS})
    return out


def load(folder: str, dtype=jnp.float32) -> tuple[SafetyChecker, dict]:
    """(module, params) from a diffusers `safety_checker/` folder."""
    folder = os.fspath(folder)
    module = tensors.read_config(folder, lambda c: module_from_config(c, dtype),
                                 what="a diffusers StableDiffusionSafetyChecker folder", subfolder="safety_checker")
    return module, params_from_torch(tensors.read_weights_folder(folder, "model"), module)


def save(folder: str, module: SafetyChecker, params: Mapping) -> None:
    """Write config.json + model.safetensors that diffusers' StableDiffusionSafetyChecker loads."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(params_to_torch(params, module), os.path.join(folder, WEIGHTS_NAME),
                              metadata={"format": "pt"})
    tensors.write_json(config_to_diffusers(module), os.path.join(folder, CONFIG_NAME))
