"""diffusers `AutoencoderKL` folders <-> jaxdiff `AutoencoderKL` (module + parameter tree).

A diffusers folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or shards
listed in `diffusion_pytorch_model.safetensors.index.json`). Names map as follows, with
`L = len(block_out_channels)`:

    diffusers                                    jaxdiff
    {encoder,decoder}.conv_in / conv_out         {encoder,decoder}/conv_in / conv_out
    {encoder,decoder}.conv_norm_out              {encoder,decoder}/norm_out
    encoder.down_blocks.{i}.resnets.{j}          encoder/down_{i}/res_{j}
    encoder.down_blocks.{i}.downsamplers.0.conv  encoder/down_{i}/downsample/conv
    decoder.up_blocks.{k}.resnets.{j}            decoder/up_{L-1-k}/res_{j}
    decoder.up_blocks.{k}.upsamplers.0.conv      decoder/up_{L-1-k}/upsample/conv
    *.mid_block.resnets.{j}                      */mid/res_{j}
    *.mid_block.attentions.0                     */mid/attn
    quant_conv, post_quant_conv                  quant_conv, post_quant_conv

    inside a ResBlock:  norm1 conv1 norm2 conv2 conv_shortcut -> norm_0 conv_0 norm_1 conv_1 skip
    inside attention:   group_norm to_q to_k to_v to_out.0    -> norm query key value proj_out

Older checkpoints name the attention projections `query/key/value/proj_attn` (sometimes stored
as 1x1 convolutions, [O, I, 1, 1]); both are read. Writing always uses the current names.

The table is derived from the module's own parameter tree (`jax.eval_shape` of its init), so
which keys exist (skip convolutions, quant convs, mid attention) never has to be restated here.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import names, tensors
from jaxdiff.convert.unet import ATTENTION_NAMES, RESNET_NAMES
from jaxdiff.errors import CheckpointError
from jaxdiff.models.vae import AutoencoderKL

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# diffusers' AutoencoderKL defaults, used for keys a config.json leaves out.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Options that do not change the network's function (tiling tile size, a dtype hint).
_IGNORED = ("sample_size", "force_upcast")

_DEPRECATED_ATTN = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_DEPRECATED_TO_CURRENT = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ------------------------------------------------------------------------------------------
# config


def module_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> AutoencoderKL:
    """Build the module a diffusers `AutoencoderKL` config.json describes.

    Raises CheckpointError naming any option jaxdiff does not implement.
    """
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise CheckpointError(
            f"VAE config: _class_name is {cls!r}; only diffusers' 'AutoencoderKL' is supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS)
    if unknown:
        raise CheckpointError(
            f"VAE config: unsupported option(s) {', '.join(unknown)}; jaxdiff's AutoencoderKL "
            f"knows {', '.join(sorted(_DEFAULTS))}")
    c = {**_DEFAULTS, **config}
    levels = len(c["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
        types = list(c[key])
        other = sorted({t for t in types if t != block})
        if other:
            raise CheckpointError(
                f"VAE config: {key} has {', '.join(other)}; only {block} is supported")
        if len(types) != levels:
            raise CheckpointError(
                f"VAE config: {key} has {len(types)} entries but block_out_channels has {levels}")
    if c["act_fn"] != "silu":
        raise CheckpointError(f"VAE config: act_fn {c['act_fn']!r} is not supported (only 'silu')")
    for key in ("latents_mean", "latents_std"):
        if c[key] is not None:
            raise CheckpointError(
                f"VAE config: {key} (per-channel latent normalisation) is not supported; only "
                "scaling_factor and shift_factor are")
    return AutoencoderKL(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
        latent_channels=int(c["latent_channels"]),
        block_out_channels=tuple(int(b) for b in c["block_out_channels"]),
        layers_per_block=int(c["layers_per_block"]), norm_num_groups=int(c["norm_num_groups"]),
        scaling_factor=float(c["scaling_factor"]),
        shift_factor=None if c["shift_factor"] is None else float(c["shift_factor"]),
        use_quant_conv=bool(c["use_quant_conv"]),
        use_post_quant_conv=bool(c["use_post_quant_conv"]),
        mid_attention=bool(c["mid_block_add_attention"]), dtype=dtype,
    )


def config_to_diffusers(module: AutoencoderKL) -> dict[str, Any]:
    """The diffusers `AutoencoderKL` config.json contents describing `module`."""
    levels = len(module.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(module.block_out_channels),
        "layers_per_block": module.layers_per_block,
        "act_fn": "silu",
        "latent_channels": module.latent_channels,
        "norm_num_groups": module.norm_num_groups,
        "scaling_factor": module.scaling_factor,
        "shift_factor": module.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": module.use_quant_conv,
        "use_post_quant_conv": module.use_post_quant_conv,
        "mid_block_add_attention": module.mid_attention,
    }


# ------------------------------------------------------------------------------------------
# the name table (flax module path, "/"-joined -> diffusers module name)


def _names(module: AutoencoderKL) -> names.Rules:
    """The table in the module docstring, for `module`'s depth."""
    L = len(module.block_out_channels)
    return names.Rules([
        ("(quant_conv|post_quant_conv)", r"\1"),
        (r"(encoder|decoder)/(conv_in|conv_out)", r"\1.\2"),
        (r"(encoder|decoder)/norm_out", r"\1.conv_norm_out"),
        (r"(encoder|decoder)/mid/res_(\d)/(\w+)",
         lambda p, j, m: f"{p}.mid_block.resnets.{j}.{RESNET_NAMES(m)}"),
        (r"(encoder|decoder)/mid/attn/(\w+)",
         lambda p, m: f"{p}.mid_block.attentions.0.{ATTENTION_NAMES(m)}"),
        (r"encoder/down_(\d+)/res_(\d+)/(\w+)",
         lambda i, j, m: f"encoder.down_blocks.{i}.resnets.{j}.{RESNET_NAMES(m)}"),
        (r"encoder/down_(\d+)/downsample/conv", r"encoder.down_blocks.\1.downsamplers.0.conv"),
        (r"decoder/up_(\d+)/res_(\d+)/(\w+)",
         lambda i, j, m: f"decoder.up_blocks.{L - 1 - int(i)}.resnets.{j}.{RESNET_NAMES(m)}"),
        (r"decoder/up_(\d+)/upsample/conv",
         lambda i: f"decoder.up_blocks.{L - 1 - int(i)}.upsamplers.0.conv"),
    ])


def table(module: AutoencoderKL) -> names.Table:
    """flax path <-> diffusers key <-> layout for every parameter of `module`."""
    f = module.downsample_factor
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, f, f, module.in_channels))))
    return names.from_tree(shapes["params"], _names(module))


def _current_name(key: str) -> str:
    """Rename the pre-2023 attention parameter names to the current ones."""
    m = _DEPRECATED_ATTN.fullmatch(key)
    if m is None:
        return key
    return f"{m.group(1)}.{_DEPRECATED_TO_CURRENT[m.group(2)]}.{m.group(3)}"


# ------------------------------------------------------------------------------------------
# state dicts


def params_from_torch(state_dict: Mapping[str, np.ndarray], module: AutoencoderKL) -> dict:
    """diffusers `AutoencoderKL` state dict (numpy arrays) -> the `params` tree of `module`,
    float32, for `module.apply({"params": params}, ...)`.

    Raises CheckpointError naming missing or unexpected keys and mismatched shapes.
    """
    renamed = {}
    for key, value in state_dict.items():
        new = _current_name(key)
        if new in renamed:
            raise CheckpointError(f"VAE checkpoint: both {key} and {new} are present")
        renamed[new] = value
    return names.to_flax(renamed, table(module), what="VAE checkpoint")


def params_to_torch(params: Mapping, module: AutoencoderKL) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: a diffusers state dict with current names, float32."""
    return names.to_torch(params, table(module), what="VAE params")


# ------------------------------------------------------------------------------------------
# folders


def load(folder: str, dtype=jnp.float32, *, variant: str | None = None) -> tuple[AutoencoderKL, dict]:
    """Read a diffusers AutoencoderKL folder -> (module with compute `dtype`, float32 params).
    variant: e.g. "fp16" reads `diffusion_pytorch_model.fp16.safetensors`."""
    folder = os.fspath(folder)
    module = tensors.read_config(
        folder, lambda c: module_from_config(c, dtype), subfolder="vae",
        what="a diffusers AutoencoderKL folder (a Stable Diffusion pipeline's `vae` subfolder)")
    weights = tensors.read_weights_folder(folder, "diffusion_pytorch_model", variant=variant)
    return module, params_from_torch(weights, module)


def save(folder: str, module: AutoencoderKL, params: Mapping) -> None:
    """Write `module` and `params` as a diffusers AutoencoderKL folder (config.json +
    safetensors) that `diffusers.AutoencoderKL.from_pretrained(folder)` loads."""
    folder = os.fspath(folder)
    state = params_to_torch(params, module)
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    tensors.write_json(config_to_diffusers(module), os.path.join(folder, CONFIG_NAME))
