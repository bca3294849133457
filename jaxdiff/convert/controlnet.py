"""diffusers ControlNet folders (`ControlNetModel`) <-> jaxdiff `ControlNet`, both ways.

A folder holds `config.json` and `diffusion_pytorch_model.safetensors` (what
`ControlNetModel.save_pretrained(folder, safe_serialization=True)` writes). The encoder part of
the config and of the names is the U-Net's (`convert/unet.py`: a ControlNet config is read as the
U-Net config with the mirrored decoder, and the shared parameters use its name table); the
ControlNet's own parameters add these rows:

    cond_embed/conv_in, cond_embed/conv_out     controlnet_cond_embedding.conv_in, .conv_out
    cond_embed/conv_{k}                         controlnet_cond_embedding.blocks.{k}
    zero_down/conv_{k}                          controlnet_down_blocks.{k}
    zero_mid/conv_0                             controlnet_mid_block

    module, params = load(folder)         # -> (ControlNet, float32 numpy tree)
    save(folder, module, params)          # -> a folder ControlNetModel.from_pretrained reads
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import names, tensors
from jaxdiff.convert import unet as unet_convert
from jaxdiff.errors import CheckpointError
from jaxdiff.models.controlnet import ControlNet

CONFIG_NAME = unet_convert.CONFIG_NAME
WEIGHTS_NAME = unet_convert.WEIGHTS_NAME
CLASS_NAME = "ControlNetModel"

_OWN = names.Rules([
    (r"cond_embed/conv_(in|out)", r"controlnet_cond_embedding.conv_\1"),
    (r"cond_embed/conv_(\d+)", r"controlnet_cond_embedding.blocks.\1"),
    (r"zero_down/conv_(\d+)", r"controlnet_down_blocks.\1"),
    ("zero_mid/conv_0", "controlnet_mid_block"),
])

# ControlNet-only config keys (read here) and U-Net keys a ControlNetModel config does not have.
_CONTROL_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
                 "controlnet_conditioning_channel_order")
_DECODER_KEYS = ("up_block_types", "out_channels", "sample_size", "center_input_sample", "time_embedding_dim",
                 "conv_in_kernel", "conv_out_kernel", "time_embedding_type", "class_embeddings_concat",
                 "mid_block_only_cross_attention", "cross_attention_norm", "timestep_post_act",
                 "time_cond_proj_dim", "time_embedding_act_fn", "resnet_skip_time_act",
                 "resnet_out_scale_factor", "attention_type", "reverse_transformer_layers_per_block",
                 "dual_cross_attention", "dropout")


def _names(module: ControlNet):
    shared = unet_convert._names(module)

    def name(path: str) -> str:
        try:
            return _OWN(path)
        except KeyError:
            return shared(path)
    return name


def table(module: ControlNet) -> names.Table:
    """flax path <-> diffusers key <-> layout for every parameter of `module`."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **module.example_inputs()))["params"]
    return names.from_tree(shapes, _names(module))


def params_from_torch(state_dict: Mapping[str, np.ndarray], module: ControlNet) -> dict:
    """diffusers ControlNetModel state dict -> the parameter tree of `module` (float32 numpy).
    Raises CheckpointError naming missing / unexpected keys or mismatched shapes."""
    return names.to_flax(state_dict, table(module), what="diffusers ControlNet weights")


def params_to_torch(params: Mapping, module: ControlNet) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: {diffusers name: float32 numpy array}."""
    return names.to_torch(params, table(module), what="jaxdiff ControlNet parameters")


def module_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> ControlNet:
    """A `ControlNet` from a diffusers ControlNetModel `config.json` (as a dict).
    Raises CheckpointError naming an option jaxdiff does not implement."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise CheckpointError(f"config.json describes a {name}, not a diffusers {CLASS_NAME}")
    order = config.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise CheckpointError(f"this ControlNet config uses controlnet_conditioning_channel_order={order!r}; "
                              "jaxdiff reads 'rgb' ControlNets (flip the control image's channels and save it as rgb)")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise CheckpointError("this ControlNet config has a class embedding, which jaxdiff's ControlNet does not support")
    down = list(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    as_unet = {k: v for k, v in config.items() if k not in _CONTROL_KEYS}
    as_unet.update(_class_name="UNet2DConditionModel", out_channels=int(config.get("in_channels", 4)),
                   up_block_types=[b.replace("Down", "Up") for b in reversed(down)],
                   cross_attention_dim=config.get("cross_attention_dim", 1280))
    unet = unet_convert.module_from_config(as_unet, dtype)
    return ControlNet.from_unet(
        unet, conditioning_channels=int(config.get("conditioning_channels", 3)),
        embedding_channels=tuple(int(c) for c in config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
        global_pool_conditions=bool(config.get("global_pool_conditions", False)))


def config_to_diffusers(module: ControlNet) -> dict[str, Any]:
    """The diffusers ControlNetModel `config.json` (as a dict) of `module`."""
    config = unet_convert.config_to_diffusers(module, in_channels=module.in_channels or 4)
    for key in _DECODER_KEYS:
        config.pop(key, None)
    config.update(_class_name=CLASS_NAME, conditioning_channels=module.conditioning_channels,
                  conditioning_embedding_out_channels=list(module.embedding_channels),
                  global_pool_conditions=module.global_pool_conditions,
                  controlnet_conditioning_channel_order="rgb")
    return config


def load(folder: str | os.PathLike, dtype=jnp.float32, *, variant: str | None = None) -> tuple[ControlNet, dict]:
    """Read a diffusers ControlNet folder -> (module, params); params are float32 whatever the
    file holds. Missing files, pickles and malformed files are one-line CheckpointErrors."""
    folder = os.fspath(folder)
    module = tensors.read_config(folder, lambda c: module_from_config(c, dtype),
                                 what=f"a diffusers ControlNet folder ({CONFIG_NAME} and {WEIGHTS_NAME})",
                                 subfolder="controlnet")
    weights = tensors.read_weights_folder(folder, "diffusion_pytorch_model", variant=variant)
    return module, params_from_torch(weights, module)


def save(folder: str | os.PathLike, module: ControlNet, params: Mapping) -> None:
    """Write `module` and `params` as a diffusers ControlNet folder (config.json + safetensors)."""
    folder = os.fspath(folder)
    state = params_to_torch(params, module)
    config = config_to_diffusers(module)
    config["in_channels"] = int(state["conv_in.weight"].shape[1])
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(state, os.path.join(folder, WEIGHTS_NAME), {"format": "pt"})
    tensors.write_json(config, os.path.join(folder, CONFIG_NAME))
