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

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import tensors as T
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

_RES_NAMES = {"norm_0": "norm1", "conv_0": "conv1", "norm_1": "norm2", "conv_1": "conv2",
              "skip": "conv_shortcut"}
_ATTN_NAMES = {"norm": "group_norm", "query": "to_q", "key": "to_k", "value": "to_v",
               "proj_out": "to_out.0"}
_TOP_NAMES = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
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
# parameter names


def _torch_module_name(path: tuple[str, ...], levels: int) -> str:
    """A flax module path (without the leaf) -> its diffusers module name."""
    part, rest = path[0], path[1:]
    if part in ("quant_conv", "post_quant_conv"):
        return part
    if len(rest) == 1:
        return f"{part}.{_TOP_NAMES[rest[0]]}"
    block, sub, *inner = rest
    if block == "mid":
        if sub == "attn":
            return f"{part}.mid_block.attentions.0.{_ATTN_NAMES[inner[0]]}"
        return f"{part}.mid_block.resnets.{sub[4:]}.{_RES_NAMES[inner[0]]}"
    kind, level = block.split("_")
    index = int(level) if kind == "down" else levels - 1 - int(level)
    prefix = f"{part}.{kind}_blocks.{index}"
    if sub in ("downsample", "upsample"):
        return f"{prefix}.{sub}rs.0.conv"
    return f"{prefix}.resnets.{sub[4:]}.{_RES_NAMES[inner[0]]}"


def _expected_shapes(module: AutoencoderKL) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat parameter paths of `module` -> abstract arrays (shape and dtype, nothing computed)."""
    f = module.downsample_factor
    tree = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, f, f, module.in_channels))))
    return T.flatten(tree["params"])


def _name_table(expected: Mapping[tuple[str, ...], Any], levels: int) -> dict[str, tuple]:
    """diffusers state-dict key -> flax parameter path, for every path in `expected`."""
    table = {}
    for path in expected:
        leaf = "bias" if path[-1] == "bias" else "weight"  # kernel / scale -> weight
        table[f"{_torch_module_name(path[:-1], levels)}.{leaf}"] = path
    return table


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
    expected = _expected_shapes(module)
    table = _name_table(expected, len(module.block_out_channels))
    T.check_same_keys(renamed, table, what="VAE checkpoint")
    flat = {}
    for key, path in table.items():
        w = np.asarray(renamed[key], dtype=np.float32)
        shape = expected[path].shape
        if path[-1] == "kernel" and len(shape) == 4 and w.ndim == 4:
            w = T.conv_to_flax(w)
        elif path[-1] == "kernel" and len(shape) == 2 and w.ndim in (2, 4):
            w = T.linear_to_flax(w)  # also takes a 1x1 conv weight [O, I, 1, 1]
        flat[path] = w
    T.check_same_keys(flat, expected, what="VAE params")
    T.check_same_shapes(flat, expected, what="VAE checkpoint")
    return T.unflatten(flat)


def params_to_torch(params: Mapping, module: AutoencoderKL) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: a diffusers state dict with current names, float32."""
    flat = {k: np.asarray(v, np.float32) for k, v in T.flatten(params).items()}
    expected = _expected_shapes(module)
    T.check_same_keys(flat, expected, what="VAE params")
    T.check_same_shapes(flat, expected, what="VAE params")
    out = {}
    for key, path in _name_table(expected, len(module.block_out_channels)).items():
        w = flat[path]
        if path[-1] == "kernel":
            w = T.conv_to_torch(w) if w.ndim == 4 else T.linear_to_torch(w)
        out[key] = np.ascontiguousarray(w)
    return out


# ------------------------------------------------------------------------------------------
# folders


def load(folder: str, dtype=jnp.float32) -> tuple[AutoencoderKL, dict]:
    """Read a diffusers AutoencoderKL folder -> (module with compute `dtype`, float32 params)."""
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{config_path} not found; expected a diffusers AutoencoderKL folder (the `vae` "
            "subfolder of a Stable Diffusion pipeline)")
    with open(config_path) as f:
        config = json.load(f)
    module = module_from_config(config, dtype)
    return module, params_from_torch(T.read_weights_folder(folder, "diffusion_pytorch_model"), module)


def save(folder: str, module: AutoencoderKL, params: Mapping) -> None:
    """Write `module` and `params` as a diffusers AutoencoderKL folder (config.json +
    safetensors) that `diffusers.AutoencoderKL.from_pretrained(folder)` loads."""
    os.makedirs(folder, exist_ok=True)
    T.write_safetensors(params_to_torch(params, module), os.path.join(folder, WEIGHTS_NAME),
                        metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config_to_diffusers(module), f, indent=2)
        f.write("\n")
