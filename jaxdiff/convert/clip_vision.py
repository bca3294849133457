"""transformers CLIP image towers and whole CLIP models (config.json + model.safetensors) <->
`CLIPVisionEncoder` (and, for a `CLIPModel`, its text half as a `CLIPTextEncoder`).

Folders read:

    CLIPVisionModelWithProjection / CLIPVisionModel   model_type "clip_vision_model"
    CLIPModel (e.g. openai/clip-vit-large-patch14)     model_type "clip": text_config,
        vision_config and projection_dim; both towers and both heads in one file

Public API:

    vision_from_config(config, dtype=jnp.float32, projection_dim=None) -> CLIPVisionEncoder
    vision_config_to_transformers(module) -> dict          # a CLIPVisionConfig config.json
    vision_params_from_torch(state_dict, module, prefix="vision_model.", head="visual_projection")
    vision_params_to_torch(params, module, prefix="vision_model.", head="visual_projection")
    load_vision(folder, dtype=jnp.float32) -> (module, params)   # either folder kind
    save_vision(folder, module, params)                    # a CLIPVisionModel(WithProjection) folder
    load_clip(folder, dtype=jnp.float32) -> CLIPModelParts  # both towers of a CLIPModel folder
    read_preprocessor(folder) -> ImageTransform            # preprocessor_config.json (or defaults)

Names (see models/clip_vision.py for the table): the encoder layers use the text tower's rules
(`convert.clip.LAYER`); `embeddings.class_embedding` is a bare tensor (no `.weight`), read as
the flax leaf `class_embedding`. `prefix` is `vision_model.` in every transformers file (the
safety checker nests one more, `vision_model.vision_model.`), the head never carries it. The
`position_ids` buffer some files hold is ignored, as is a CLIPModel's `logit_scale`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import names, tensors
from jaxdiff.errors import CheckpointError
from jaxdiff.models.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionEncoder
from jaxdiff.models.text import ACTIVATIONS, CLIPTextEncoder

PREFIX = "vision_model."
HEAD = "visual_projection"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
VISION_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
_IGNORED = ("embeddings.position_ids",)

# CLIPVisionConfig's defaults (transformers), used for keys a config.json leaves out.
_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                 "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 512}


class ImageTransform(NamedTuple):
    """A CLIP preprocessor config: shortest-side resize `size`, center crop `crop_size`, and the
    normalization `mean` / `std` (the arguments of `models.clip_vision.preprocess`)."""

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD


class CLIPModelParts(NamedTuple):
    """Both towers of a transformers `CLIPModel` folder (each with its projection head)."""

    text: CLIPTextEncoder
    text_params: dict
    vision: CLIPVisionEncoder
    vision_params: dict
    logit_scale: float


# ------------------------------------------------------------------------------------------
# configs


def vision_from_config(config: Mapping, dtype=jnp.float32, projection_dim: int | None = None) -> CLIPVisionEncoder:
    """A `CLIPVisionEncoder` from a `CLIPVisionConfig` dict (a vision folder's config.json, or a
    CLIPModel's `vision_config`). projection_dim: the head's width (None: the config's when its
    architecture is CLIPVisionModelWithProjection, else no head)."""
    archs = list(config.get("architectures") or [])
    other = [a for a in archs if a not in VISION_ARCHITECTURES]
    if other:
        raise CheckpointError(f"config.json architecture {other[0]!r} is not a CLIP image tower; jaxdiff reads "
                              f"{' and '.join(VISION_ARCHITECTURES)} (or a CLIPModel folder with load_clip)")
    c = {k: (config.get(k) if config.get(k) is not None else v) for k, v in _DEFAULTS.items()}
    if c["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(f"config.json hidden_act={c['hidden_act']!r} is not supported; "
                              f"jaxdiff implements {ACTIVATIONS}")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise CheckpointError(f"config.json hidden_size={c['hidden_size']} is not divisible by "
                              f"num_attention_heads={c['num_attention_heads']}")
    if c["image_size"] % c["patch_size"]:
        raise CheckpointError(f"config.json patch_size={c['patch_size']} does not divide image_size={c['image_size']}")
    if projection_dim is None and "CLIPVisionModelWithProjection" in archs:
        projection_dim = int(c["projection_dim"])
    return CLIPVisionEncoder(
        image_size=int(c["image_size"]), patch_size=int(c["patch_size"]),
        hidden_size=int(c["hidden_size"]), intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
        hidden_act=str(c["hidden_act"]), layer_norm_eps=float(c["layer_norm_eps"]),
        projection_dim=projection_dim, num_channels=int(c["num_channels"]), dtype=dtype)


def vision_config_to_transformers(module: CLIPVisionEncoder) -> dict:
    """The `CLIPVisionConfig` dict (config.json) transformers builds the same tower from."""
    config = {
        "architectures": [VISION_ARCHITECTURES[module.projection_dim is not None]],
        "model_type": "clip_vision_model",
        "image_size": module.image_size, "patch_size": module.patch_size,
        "hidden_size": module.hidden_size, "intermediate_size": module.intermediate_size,
        "num_hidden_layers": module.num_layers, "num_attention_heads": module.num_heads,
        "num_channels": module.num_channels, "hidden_act": module.hidden_act,
        "layer_norm_eps": module.layer_norm_eps, "attention_dropout": 0.0,
    }
    if module.projection_dim is not None:
        config["projection_dim"] = module.projection_dim
    return config


# ------------------------------------------------------------------------------------------
# the name table

NAMES = names.Rules([
    ("patch_embedding", "embeddings.patch_embedding"),
    ("position_embedding", "embeddings.position_embedding"),
    ("pre_norm", "pre_layrnorm"),
    (r"layer_(\d+)/(.+)", lambda i, m: f"encoder.layers.{i}.{clip_convert.LAYER(m)}"),
    ("post_norm", "post_layernorm"),
])


def table(module: CLIPVisionEncoder, prefix: str = PREFIX, head: str = HEAD) -> names.Table:
    """flax path <-> transformers key <-> layout for every parameter of `module`."""
    s = module.image_size
    shapes = jax.eval_shape(lambda: module.init(
        jax.random.key(0), jnp.zeros((1, s, s, module.num_channels))))["params"]
    flat = names.flatten(shapes)
    cls = flat.pop(("class_embedding",))
    rows = names.from_tree(flat, lambda path: head if path == HEAD else prefix + NAMES(path))
    return rows + (names.Entry(("class_embedding",), prefix + "embeddings.class_embedding", tuple(cls.shape)),)


def vision_params_from_torch(state_dict: Mapping[str, np.ndarray], module: CLIPVisionEncoder,
                             prefix: str = PREFIX, head: str = HEAD) -> dict:
    """A transformers state dict (numpy) holding the tower under `prefix` (and the head at
    `head`) -> `module`'s params (float32 numpy tree). Keys outside the tower (a CLIPModel's text
    half, a safety checker's concept embeddings) must be filtered out by the caller; the
    `position_ids` buffer is ignored. Raises CheckpointError naming missing / unexpected keys."""
    sd = {k: v for k, v in state_dict.items() if k[len(prefix):] not in _IGNORED or not k.startswith(prefix)}
    return names.to_flax(sd, table(module, prefix, head), what="CLIP vision checkpoint")


def vision_params_to_torch(params: Mapping, module: CLIPVisionEncoder, prefix: str = PREFIX,
                           head: str = HEAD) -> dict[str, np.ndarray]:
    """`module`'s params -> transformers state dict (float32 numpy)."""
    return names.to_torch(jax.device_get(params), table(module, prefix, head), what="CLIP vision params")


# ------------------------------------------------------------------------------------------
# folders


def _model_type(config: Mapping) -> str:
    return str(config.get("model_type", "clip_vision_model"))


def load_vision(folder: str, dtype=jnp.float32) -> tuple[CLIPVisionEncoder, dict]:
    """(module, params) of the image tower of a CLIPVisionModel(WithProjection) or CLIPModel
    folder (a CLIPModel's tower comes with its projection head)."""
    folder = os.fspath(folder)
    config = tensors.read_config(folder, dict, what="a transformers CLIP folder")
    if _model_type(config) == "clip":
        parts = load_clip(folder, dtype)
        return parts.vision, parts.vision_params
    module = tensors.read_config(folder, lambda c: _vision_module(c, dtype), what="a transformers CLIP folder")
    weights = tensors.read_weights_folder(folder, "model")
    return module, vision_params_from_torch(weights, module)


def _vision_module(config: Mapping, dtype) -> CLIPVisionEncoder:
    if _model_type(config) != "clip_vision_model":
        raise CheckpointError(f"config.json has model_type={_model_type(config)!r}; expected 'clip_vision_model' "
                              "(a CLIPVisionModel) or 'clip' (a CLIPModel)")
    return vision_from_config(config, dtype)


def save_vision(folder: str, module: CLIPVisionEncoder, params: Mapping) -> None:
    """Write config.json + model.safetensors that transformers' CLIPVisionModel(WithProjection) loads."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(vision_params_to_torch(params, module), os.path.join(folder, WEIGHTS_NAME),
                              metadata={"format": "pt"})
    tensors.write_json(vision_config_to_transformers(module), os.path.join(folder, CONFIG_NAME))


def _clip_modules(config: Mapping, dtype) -> tuple[CLIPTextEncoder, CLIPVisionEncoder]:
    if _model_type(config) != "clip":
        raise CheckpointError(f"config.json has model_type={_model_type(config)!r}; expected 'clip' (a CLIPModel "
                              "with text_config and vision_config)")
    projection = int(config.get("projection_dim") or 512)
    text_config = dict(config.get("text_config") or {}, model_type="clip_text_model",
                       architectures=["CLIPTextModelWithProjection"], projection_dim=projection)
    vision_config = dict(config.get("vision_config") or {})
    vision_config.pop("architectures", None)
    return (clip_convert.module_from_config(text_config, dtype),
            vision_from_config(vision_config, dtype, projection_dim=projection))


def load_clip(folder: str, dtype=jnp.float32) -> CLIPModelParts:
    """Both towers of a transformers CLIPModel folder, each with its projection head."""
    folder = os.fspath(folder)
    text, vision = tensors.read_config(folder, lambda c: _clip_modules(c, dtype), what="a transformers CLIPModel folder")
    weights = tensors.read_weights_folder(folder, "model")
    text_sd = {k: v for k, v in weights.items()
               if k.startswith(clip_convert.PREFIX) or k == clip_convert.PROJECTION + ".weight"}
    vision_sd = {k: v for k, v in weights.items() if k.startswith(PREFIX) or k == HEAD + ".weight"}
    other = sorted(set(weights) - set(text_sd) - set(vision_sd) - {"logit_scale"})
    if other:
        raise CheckpointError(f"{folder}: CLIPModel weights hold unexpected key(s): {', '.join(other[:10])}")
    logit_scale = float(np.exp(np.asarray(weights["logit_scale"], np.float64))) if "logit_scale" in weights else 100.0
    return CLIPModelParts(text, clip_convert.params_from_torch(text_sd, text), vision,
                          vision_params_from_torch(vision_sd, vision), logit_scale)


def read_preprocessor(folder: str) -> ImageTransform:
    """The `ImageTransform` of a folder's preprocessor_config.json (a CLIPImageProcessor's, or
    a pipeline's feature_extractor/), or CLIP's defaults when it has none."""
    path = os.path.join(os.fspath(folder), PREPROCESSOR_NAME)
    if not os.path.isfile(path):
        return ImageTransform()
    c = tensors.read_json(tensors.inside(os.fspath(folder), PREPROCESSOR_NAME), what="a preprocessor config")
    size, crop = c.get("size", 224), c.get("crop_size", 224)
    if isinstance(size, Mapping):
        if "shortest_edge" not in size:
            raise CheckpointError(f"{path}: size={size!r} is not supported; jaxdiff resizes the shortest edge")
        size = size["shortest_edge"]
    if isinstance(crop, Mapping):
        if crop.get("height") != crop.get("width"):
            raise CheckpointError(f"{path}: crop_size={crop!r} is not square")
        crop = crop["height"]
    mean = tuple(float(v) for v in (c.get("image_mean") or CLIP_MEAN))
    std = tuple(float(v) for v in (c.get("image_std") or CLIP_STD))
    if c.get("do_center_crop", True) is False or c.get("do_resize", True) is False:
        raise CheckpointError(f"{path}: do_resize / do_center_crop false is not supported")
    return ImageTransform(int(size), int(crop), mean, std)
