"""diffusers U-Net folders (`UNet2DModel`, `UNet2DConditionModel`) <-> jaxdiff `UNet`.

A diffusers U-Net folder holds `config.json` and `diffusion_pytorch_model.safetensors` (a pipeline
keeps it in its `unet/` subfolder). `load` builds the matching `UNet` from the config and maps the
weights onto its parameter tree; `save` writes a folder that
`diffusers.UNet2DConditionModel.from_pretrained` (or `UNet2DModel`) reads back.

Names (jaxdiff module path -> diffusers module path; `up_{i}` is diffusers' `up_blocks.{L-1-i}`):

    conv_in, conv_out, norm_out           conv_in, conv_out, conv_norm_out
    time_embed/dense_{0,1}                time_embedding.linear_{1,2}
    add_embed/dense_{0,1}                 add_embedding.linear_{1,2}         (SDXL)
    class_embed                           class_embedding  (+ a null-class row, see below)
    down_{i}/res_{j}, down_{i}/attn_{j}   down_blocks.{i}.resnets.{j}, .attentions.{j}
    down_{i}/downsample/conv              down_blocks.{i}.downsamplers.0.conv
    up_{i}/upsample/conv                  up_blocks.{L-1-i}.upsamplers.0.conv
    mid/res_{0,1}, mid/attn               mid_block.resnets.{0,1}, mid_block.attentions.0
  inside a ResBlock
    norm_0 conv_0 time_proj                       norm1 conv1 time_emb_proj
    norm_1 conv_1 skip                            norm2 conv2 conv_shortcut
  inside a pixel AttentionBlock
    norm query key value proj_out                 group_norm to_q to_k to_v to_out.0
  inside a SpatialTransformer
    norm proj_in proj_out                         (same)
    block_{k}/norm_{0,1,2}                        transformer_blocks.{k}.norm{1,2,3}
    block_{k}/self_attn, cross_attn               transformer_blocks.{k}.attn1, attn2
      query key value proj_out                      to_q to_k to_v to_out.0
    block_{k}/ff/proj_in, ff/proj_out             transformer_blocks.{k}.ff.net.0.proj, ff.net.2

Leaves follow `names.from_tree` (kernel <-> weight, conv or linear by rank; scale <-> weight).
jaxdiff's class table has one more row than diffusers' (row `num_classes` is the null class for
classifier-free guidance): it is added as zeros on import and dropped on export (`NULL_ROW`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import names, tensors
from jaxdiff.errors import CheckpointError
from jaxdiff.models.layers import split_heads
from jaxdiff.models.unet import UNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# ------------------------------------------------------------------------------------------
# the name table (flax module path, "/"-joined -> diffusers module name)

_QKV = [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_out", "to_out.0")]
# inside a ResBlock and a pixel AttentionBlock (the VAE's too)
RESNET_NAMES = names.Rules([(r"(norm|conv)_(\d)", lambda m, i: f"{m}{int(i) + 1}"),
                            ("time_proj", "time_emb_proj"), ("skip", "conv_shortcut")])
ATTENTION_NAMES = names.Rules([("norm", "group_norm"), *_QKV])
_ATTN = names.Rules(_QKV)
_TRANSFORMER = names.Rules([
    ("(norm|proj_in|proj_out)", r"\1"),
    (r"block_(\d+)/norm_(\d)", lambda k, i: f"transformer_blocks.{k}.norm{int(i) + 1}"),
    (r"block_(\d+)/(self|cross)_attn/(\w+)",
     lambda k, a, m: f"transformer_blocks.{k}.attn{1 if a == 'self' else 2}.{_ATTN(m)}"),
    (r"block_(\d+)/ff/proj_in", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"block_(\d+)/ff/proj_out", r"transformer_blocks.\1.ff.net.2"),
])


def _names(module: UNet) -> names.Rules:
    """The table in the module docstring, for `module`'s depth and attention kind."""
    L = len(module.channel_mult)
    inner = ATTENTION_NAMES if module.context_dim is None else _TRANSFORMER

    def block(b: str) -> str:  # down_{i} / up_{i} (diffusers counts up from the bottom) / mid
        kind, _, i = b.partition("_")
        return "mid_block" if kind == "mid" else (
            f"down_blocks.{i}" if kind == "down" else f"up_blocks.{L - 1 - int(i)}")

    level = r"(down_\d+|up_\d+|mid)"
    return names.Rules([
        ("conv_in", "conv_in"), ("conv_out", "conv_out"), ("norm_out", "conv_norm_out"),
        (r"time_embed/dense_(\d)", lambda i: f"time_embedding.linear_{int(i) + 1}"),
        (r"add_embed/dense_(\d)", lambda i: f"add_embedding.linear_{int(i) + 1}"),
        ("class_embed", "class_embedding"),
        (level + r"/res_(\d+)/(\w+)", lambda b, j, m: f"{block(b)}.resnets.{j}.{RESNET_NAMES(m)}"),
        (level + r"/(down|up)sample/conv", lambda b, s: f"{block(b)}.{s}samplers.0.conv"),
        (level + r"/attn_?(\d*)/(.+)",
         lambda b, j, m: f"{block(b)}.attentions.{j or 0}.{inner(m)}"),
    ])


def table(module: UNet, in_channels: int | None = None) -> names.Table:
    """flax path <-> diffusers key <-> layout for every parameter of `module`.

    in_channels: used when module.in_channels is None (read from the weights).
    """
    inputs = module.example_inputs(in_channels=in_channels)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))["params"]
    return tuple(e._replace(layout=names.NULL_ROW) if e.flax == ("class_embed", "embedding")
                 else e for e in names.from_tree(shapes, _names(module)))


def params_from_torch(state_dict: Mapping[str, np.ndarray], module: UNet) -> dict:
    """diffusers U-Net state dict -> the parameter tree of `module`.

    Args:
      state_dict: {diffusers name: array} (numpy, any float dtype; torch layouts).
      module: the UNet the weights belong to (e.g. from `module_from_config`).
    Returns:
      the tree for `module.apply({"params": params}, ...)`, float32 numpy arrays.
    Raises:
      CheckpointError naming missing / unexpected diffusers keys or mismatched shapes.
    """
    conv_in = state_dict.get("conv_in.weight")  # [O, C * p * p, 3, 3]
    in_channels = module.in_channels or (
        np.shape(conv_in)[1] // module.patch_size ** 2 if conv_in is not None else None)
    return names.to_flax(state_dict, table(module, in_channels), what="diffusers U-Net weights")


def params_to_torch(params: Mapping, module: UNet) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch`: {diffusers name: float32 numpy array}."""
    if set(params) == {"params"}:
        params = params["params"]
    kernel = params.get("conv_in", {}).get("kernel")  # [3, 3, C * p * p, O]
    in_channels = module.in_channels or (
        np.shape(kernel)[2] // module.patch_size ** 2 if kernel is not None else None)
    return names.to_torch(params, table(module, in_channels), what="jaxdiff U-Net parameters")


# ------------------------------------------------------------------------------------------
# configs

# Options that do not change the function (or that jaxdiff takes from elsewhere).
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
            "num_train_timesteps", "addition_embed_type_num_heads"}

# (option, values jaxdiff supports, diffusers' default when the key is absent)
_FIXED_COND = [
    ("center_input_sample", (False,), False),
    ("mid_block_type", ("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn"),
    ("mid_block_scale_factor", (1, 1.0), 1),
    ("act_fn", ("silu", "swish"), "silu"),
    ("reverse_transformer_layers_per_block", (None,), None),
    ("encoder_hid_dim", (None,), None),
    ("encoder_hid_dim_type", (None,), None),
    ("num_attention_heads", (None,), None),
    ("dual_cross_attention", (False,), False),
    ("class_embed_type", (None,), None),
    ("resnet_time_scale_shift", ("default", "scale_shift"), "default"),
    ("resnet_skip_time_act", (False,), False),
    ("resnet_out_scale_factor", (1, 1.0), 1.0),
    ("time_embedding_type", ("positional",), "positional"),
    ("time_embedding_act_fn", (None,), None),
    ("timestep_post_act", (None,), None),
    ("time_cond_proj_dim", (None,), None),
    ("conv_in_kernel", (3,), 3),
    ("conv_out_kernel", (3,), 3),
    ("attention_type", ("default",), "default"),
    ("class_embeddings_concat", (False,), False),
    ("mid_block_only_cross_attention", (None, False), None),
    ("cross_attention_norm", (None,), None),
    ("addition_embed_type", (None, "text_time"), None),
]
_FIXED_PIXEL = [
    ("center_input_sample", (False,), False),
    ("time_embedding_type", ("positional",), "positional"),
    ("mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D"),
    ("mid_block_scale_factor", (1, 1.0), 1),
    ("downsample_type", ("conv",), "conv"),
    ("upsample_type", ("conv",), "conv"),
    ("act_fn", ("silu", "swish"), "silu"),
    ("resnet_time_scale_shift", ("default", "scale_shift"), "default"),
    ("add_attention", (True,), True),
    ("class_embed_type", (None,), None),
]
_COND_USED = {
    "sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "up_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "dropout", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
    "use_linear_projection", "num_class_embeds", "upcast_attention", "time_embedding_dim",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim",
}
_PIXEL_USED = {
    "sample_size", "in_channels", "out_channels", "time_embedding_dim", "freq_shift",
    "flip_sin_to_cos", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "downsample_padding", "dropout", "attention_head_dim", "norm_num_groups",
    "attn_norm_num_groups", "norm_eps", "num_class_embeds",
}


def _unsupported(what: str) -> CheckpointError:
    return CheckpointError(f"this U-Net config uses {what}, which jaxdiff's UNet does not support")


def _check_options(config: Mapping, fixed, used) -> None:
    for key, allowed, default in fixed:
        value = config.get(key, default)
        if value not in allowed:
            raise _unsupported(f"{key}={value!r} (supported: {', '.join(map(repr, allowed))})")
    known = used | _IGNORED | {k for k, _, _ in fixed}
    for key, value in config.items():
        if key not in known and value not in (None, False):
            raise _unsupported(f"the option {key}={value!r}")


def _uniform(config: Mapping, key: str, default, n: int):
    """An option given as one value or as n equal values -> the value."""
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(value) != n or len(set(value)) != 1:
            raise _unsupported(f"{key}={list(value)} (jaxdiff needs the same value at every level)")
        value = value[0]
    return value


def _levels(config: Mapping, default_down, default_up, attn_down: str, plain_down: str,
            attn_up: str, plain_up: str) -> tuple[int, ...]:
    """attention_levels from the block types; the decoder must mirror the encoder."""
    down = list(config.get("down_block_types", default_down))
    up = list(config.get("up_block_types", default_up))
    if len(up) != len(down):
        raise CheckpointError(f"U-Net config: {len(down)} down blocks but {len(up)} up blocks")
    levels = []
    for i, name in enumerate(down):
        if name not in (attn_down, plain_down):
            raise _unsupported(f"the down block type {name!r} (supported: {attn_down!r}, "
                               f"{plain_down!r})")
        if name == attn_down:
            levels.append(i)
    for i, name in enumerate(up):
        want = attn_up if len(up) - 1 - i in levels else plain_up
        if name != want:
            raise _unsupported(
                f"up_block_types={up} (up block {i} must be {want!r}: jaxdiff's decoder has "
                f"attention exactly at the encoder's levels {tuple(levels)})")
    return tuple(levels)


def _widths(config: Mapping, default) -> tuple[int, tuple[int, ...]]:
    channels = [int(c) for c in config.get("block_out_channels", default)]
    base = channels[0]
    if any(c % base for c in channels):
        raise _unsupported(f"block_out_channels={channels} (each must be a multiple of the first)")
    return base, tuple(c // base for c in channels)


def _time_dim(config: Mapping, base: int) -> None:
    dim = config.get("time_embedding_dim")
    if dim not in (None, 4 * base):
        raise _unsupported(f"time_embedding_dim={dim} (jaxdiff uses 4 * block_out_channels[0])")


def module_from_config(config: Mapping[str, Any], dtype=jnp.float32) -> UNet:
    """A `UNet` from a diffusers U-Net `config.json` (as a dict).

    `_class_name` chooses between `UNet2DConditionModel` (Stable Diffusion; the default when a
    `cross_attention_dim` is present) and `UNet2DModel` (pixel DDPM).
    Raises CheckpointError naming any option or block type jaxdiff does not implement.
    """
    name = config.get("_class_name")
    if name is None:
        name = "UNet2DConditionModel" if "cross_attention_dim" in config else "UNet2DModel"
    if name == "UNet2DConditionModel":
        return _conditional_from_config(config, dtype)
    if name == "UNet2DModel":
        return _pixel_from_config(config, dtype)
    raise CheckpointError(f"config.json describes a {name}, not a diffusers U-Net "
                          f"(UNet2DModel or UNet2DConditionModel)")


def _conditional_from_config(c: Mapping, dtype) -> UNet:
    _check_options(c, _FIXED_COND, _COND_USED)
    levels = _levels(
        c, ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    base, mult = _widths(c, (320, 640, 1280, 1280))
    L = len(mult)
    _time_dim(c, base)
    only_cross = c.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise _unsupported(f"only_cross_attention={only_cross}")
    heads = c.get("attention_head_dim", 8)  # diffusers' name for the number of heads
    heads = tuple(int(h) for h in heads) if isinstance(heads, (list, tuple)) else int(heads)
    depth = c.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if any(isinstance(d, (list, tuple)) for d in depth):
            raise _unsupported(f"transformer_layers_per_block={depth} (one depth per level)")
        depth = tuple(int(d) for d in depth)
    added = {}
    if c.get("addition_embed_type") == "text_time":
        if c.get("projection_class_embeddings_input_dim") is None:
            raise CheckpointError("U-Net config: addition_embed_type='text_time' needs "
                                  "projection_class_embeddings_input_dim")
        added = dict(addition_embed_dim=int(c["projection_class_embeddings_input_dim"]),
                     addition_time_embed_dim=int(c.get("addition_time_embed_dim") or 256))
    groups = c.get("norm_num_groups", 32)
    if groups is None:
        raise _unsupported("norm_num_groups=None (no output norm)")
    model = UNet(
        out_channels=int(c.get("out_channels", 4)),
        in_channels=int(c.get("in_channels", 4)),
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=int(_uniform(c, "layers_per_block", 2, L)),
        attention_levels=levels,
        num_heads=heads,
        dropout=float(c.get("dropout", 0.0)),
        use_scale_shift_norm=c.get("resnet_time_scale_shift", "default") == "scale_shift",
        downsample_padding=int(c.get("downsample_padding", 1)),
        num_groups=int(groups),
        norm_eps=float(c.get("norm_eps", 1e-5)),
        num_classes=c.get("num_class_embeds"),
        flip_sin_to_cos=bool(c.get("flip_sin_to_cos", True)),
        freq_shift=float(c.get("freq_shift", 0)),
        context_dim=int(_uniform(c, "cross_attention_dim", 1280, L)),
        transformer_depth=depth,
        use_linear_projection=bool(c.get("use_linear_projection", False)),
        upcast_attention=bool(c.get("upcast_attention", False)),
        sample_size=_sample_size(c),
        dtype=dtype,
        **added,
    )
    try:
        model.per_level("num_heads"), model.per_level("transformer_depth")
    except ValueError as e:
        raise CheckpointError(f"U-Net config: {e}") from None
    return model


def _pixel_from_config(c: Mapping, dtype) -> UNet:
    _check_options(c, _FIXED_PIXEL, _PIXEL_USED)
    levels = _levels(
        c, ("DownBlock2D",) + ("AttnDownBlock2D",) * 3, ("AttnUpBlock2D",) * 3 + ("UpBlock2D",),
        "AttnDownBlock2D", "DownBlock2D", "AttnUpBlock2D", "UpBlock2D")
    base, mult = _widths(c, (224, 448, 672, 896))
    _time_dim(c, base)
    groups = int(c.get("norm_num_groups", 32))
    scale_shift = c.get("resnet_time_scale_shift", "default") == "scale_shift"
    attn_groups = c.get("attn_norm_num_groups")
    # diffusers' mid-block attention has no GroupNorm when scale-shift is on and
    # attn_norm_num_groups is unset; jaxdiff's always has one, with the ResBlocks' groups.
    if attn_groups not in ((groups,) if scale_shift else (None, groups)):
        raise _unsupported(
            f"attn_norm_num_groups={attn_groups} with norm_num_groups={groups} and "
            f"resnet_time_scale_shift={c.get('resnet_time_scale_shift', 'default')!r}")
    head_dim = c.get("attention_head_dim", 8)  # a real head width in UNet2DModel
    return UNet(
        out_channels=int(c.get("out_channels", 3)),
        in_channels=int(c.get("in_channels", 3)),
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=int(c.get("layers_per_block", 2)),
        attention_levels=levels,
        num_heads=1,
        head_dim=None if head_dim is None else int(head_dim),
        dropout=float(c.get("dropout", 0.0)),
        use_scale_shift_norm=scale_shift,
        downsample_padding=int(c.get("downsample_padding", 1)),
        num_groups=groups,
        norm_eps=float(c.get("norm_eps", 1e-5)),
        num_classes=c.get("num_class_embeds"),
        flip_sin_to_cos=bool(c.get("flip_sin_to_cos", True)),
        freq_shift=float(c.get("freq_shift", 0)),
        sample_size=_sample_size(c),
        dtype=dtype,
    )


def _sample_size(c: Mapping) -> int | None:
    size = c.get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    return None if size is None else int(size)


def _one_or_list(values) -> int | list[int]:
    values = [int(v) for v in values]
    return values[0] if len(set(values)) == 1 else values


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def config_to_diffusers(module: UNet, *, in_channels: int | None = None) -> dict[str, Any]:
    """The diffusers `config.json` (as a dict) of `module`: a `UNet2DConditionModel` when
    context_dim is set, else a `UNet2DModel`.

    in_channels: used when module.in_channels is None (`save` reads it from the parameters).
    Raises CheckpointError for networks diffusers cannot express (patch_size > 1, ResBlock
    resampling, per-level head widths a UNet2DModel cannot state).
    """
    m = module
    if m.patch_size != 1:
        raise CheckpointError(f"patch_size={m.patch_size} has no diffusers equivalent")
    if m.resblock_updown:
        raise CheckpointError("resblock_updown=True is not exported to diffusers by jaxdiff")
    in_channels = m.in_channels or in_channels
    if in_channels is None:
        raise CheckpointError("config_to_diffusers needs in_channels (module.in_channels is None)")
    L = len(m.channel_mult)
    widths = [m.base_channels * k for k in m.channel_mult]
    heads = m.per_level("num_heads")
    cross = m.context_dim is not None
    down = [("CrossAttnDownBlock2D" if cross else "AttnDownBlock2D") if i in m.attention_levels
            else "DownBlock2D" for i in range(L)]
    up = [b.replace("Down", "Up") for b in reversed(down)]
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel" if cross else "UNet2DModel",
        "sample_size": m.sample_size,
        "in_channels": int(in_channels),
        "out_channels": m.out_channels,
        "flip_sin_to_cos": m.flip_sin_to_cos,
        "freq_shift": _number(m.freq_shift),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": widths,
        "layers_per_block": m.num_res_blocks,
        "downsample_padding": m.downsample_padding,
        "dropout": m.dropout,
        "act_fn": "silu",
        "norm_num_groups": m.num_groups,
        "norm_eps": m.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if m.use_scale_shift_norm else "default",
        "num_class_embeds": m.num_classes,
    }
    if not cross:
        # one head width for every attention block (attention levels and the mid block)
        blocks = [(widths[i], heads[i]) for i in m.attention_levels] + [(widths[-1], heads[-1])]
        split = [split_heads(c, n, m.head_dim, "UNet") for c, n in blocks]
        if all(n == 1 for n, _ in split):
            head_dim = None
        elif len({d for _, d in split}) == 1:
            head_dim = split[0][1]
        else:
            raise CheckpointError(
                f"UNet2DModel has one attention head width for all blocks; this network's are "
                f"{sorted({d for _, d in split})}")
        config.update(mid_block_type="UNetMidBlock2D", attention_head_dim=head_dim,
                      attn_norm_num_groups=m.num_groups if m.use_scale_shift_norm else None)
        return config
    if m.head_dim is not None:
        heads = [c // m.head_dim if c % m.head_dim == 0 else 1 for c in widths]
        for i in [*m.attention_levels, L - 1]:
            split_heads(widths[i], 1, m.head_dim, "UNet")
    config.update(
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=m.context_dim,
        attention_head_dim=_one_or_list(heads),  # diffusers' name for the number of heads
        transformer_layers_per_block=_one_or_list(m.per_level("transformer_depth")),
        use_linear_projection=m.use_linear_projection,
        upcast_attention=m.upcast_attention,
        center_input_sample=False,
    )
    if m.addition_embed_dim is not None:
        config.update(addition_embed_type="text_time",
                      addition_time_embed_dim=m.addition_time_embed_dim,
                      projection_class_embeddings_input_dim=m.addition_embed_dim)
    return config


# ------------------------------------------------------------------------------------------
# folders


def load(folder: str | os.PathLike, dtype=jnp.float32, *, variant: str | None = None
         ) -> tuple[UNet, dict]:
    """Read a diffusers U-Net folder (`config.json` + `diffusion_pytorch_model.safetensors`,
    possibly sharded with an `.index.json`) -> (module, params).

    dtype: compute dtype of the returned module; params are float32 whatever the file holds.
    variant: e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
    Pickled weights (`.bin`) are refused with instructions to convert them; files reaching
    outside the folder and malformed files are one-line CheckpointErrors (see `tensors`).
    """
    folder = os.fspath(folder)
    module = tensors.read_config(folder, lambda c: module_from_config(c, dtype),
                                 what=f"a diffusers U-Net folder ({CONFIG_NAME} and "
                                      f"{WEIGHTS_NAME})", subfolder="unet")
    weights = tensors.read_weights_folder(folder, "diffusion_pytorch_model", variant=variant)
    return module, params_from_torch(weights, module)


def save(folder: str | os.PathLike, module: UNet, params: Mapping) -> None:
    """Write `module` and `params` as a diffusers U-Net folder (config.json + safetensors)."""
    folder = os.fspath(folder)
    state = params_to_torch(params, module)
    config = config_to_diffusers(module, in_channels=state["conv_in.weight"].shape[1])
    os.makedirs(folder, exist_ok=True)
    tensors.write_safetensors(state, os.path.join(folder, WEIGHTS_NAME), {"format": "pt"})
    tensors.write_json(config, os.path.join(folder, CONFIG_NAME))
