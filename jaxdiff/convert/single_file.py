"""Single-file Stable Diffusion checkpoints (1.x, 2.x, inpainting) <-> jaxdiff networks.

A single file is the original LDM/CompVis state dict in one `.safetensors`: the U-Net under
`model.diffusion_model.`, the autoencoder under `first_stage_model.`, and the text encoder under
`cond_stage_model.transformer.` (SD 1.x: OpenAI CLIP ViT-L/14, transformers names) or
`cond_stage_model.model.` (SD 2.x: OpenCLIP ViT-H/14, with fused q/k/v `attn.in_proj_*`).
Pickled `.ckpt` files are refused (see `tensors.refuse_pickle`).

Public API:

    load_single_file(path, *, prediction_type="epsilon", use_ema=False, dtype=jnp.float32) -> {
        "unet": (UNet, params), "vae": (AutoencoderKL, params),
        "text_encoder": (CLIPTextEncoder, params), "scheduler": dict}
    to_diffusers_folder(path, out_dir, *, prediction_type="epsilon", use_ema=False,
                        tokenizer_dir=None)
        -> list[str]   # notes for the user (e.g. that no tokenizer was copied)
    save_single_file(out_path, unet, vae, text_encoder, *, text_layout=None,
                     dtype=np.float32) -> None

Loading maps each LDM name to its diffusers name with the tables below and hands the renamed
state dicts to the per-network converters (`unet.py`, `vae.py`, `clip.py`), which own the
diffusers -> jaxdiff step. Saving runs the same tables backwards. Every key of the file must be
in a table or in the explicit ignore list; anything else, and anything a table expects that the
file lacks, is a CheckpointError naming the keys.

LDM -> diffusers names (U-Net; `n` counts input/output blocks in file order):

    time_embed.{0,2}                      time_embedding.linear_{1,2}
    input_blocks.0.0                      conv_in
    input_blocks.{n}.0   (ResBlock)       down_blocks.{i}.resnets.{j}
    input_blocks.{n}.1   (transformer)    down_blocks.{i}.attentions.{j}
    input_blocks.{n}.0.op                 down_blocks.{i}.downsamplers.0.conv
    middle_block.{0,1,2}                  mid_block.resnets.0, .attentions.0, .resnets.1
    output_blocks.{n}.0                   up_blocks.{k}.resnets.{j}
    output_blocks.{n}.1                   up_blocks.{k}.attentions.{j}
    output_blocks.{n}.{1|2}.conv          up_blocks.{k}.upsamplers.0.conv (2 after an attention)
    out.0, out.2                          conv_norm_out, conv_out
  inside a ResBlock
    in_layers.0 in_layers.2 emb_layers.1 out_layers.0 out_layers.3 skip_connection
    norm1       conv1       time_emb_proj norm2       conv2        conv_shortcut
  inside a transformer: the same names on both sides.

Autoencoder (`up.{i}` counts levels from the top; diffusers' `up_blocks.{k}` from the bottom,
k = L-1-i):

    {encoder,decoder}.norm_out            {encoder,decoder}.conv_norm_out
    encoder.down.{i}.block.{j}            encoder.down_blocks.{i}.resnets.{j}
    encoder.down.{i}.downsample.conv      encoder.down_blocks.{i}.downsamplers.0.conv
    decoder.up.{i}.block.{j}              decoder.up_blocks.{k}.resnets.{j}
    decoder.up.{i}.upsample.conv          decoder.up_blocks.{k}.upsamplers.0.conv
    *.mid.block_{1,2}, *.mid.attn_1       *.mid_block.resnets.{0,1}, *.mid_block.attentions.0
    nin_shortcut                          conv_shortcut
    attn_1.{norm,q,k,v,proj_out}          group_norm, to_q, to_k, to_v, to_out.0
                                          (1x1 convolutions [C, C, 1, 1] <-> linears [C, C])

SD 1.x text encoder: `cond_stage_model.transformer.X` <-> `X` (already transformers names).

SD 2.x OpenCLIP text encoder (`cond_stage_model.model.` prefix):

    token_embedding.weight                text_model.embeddings.token_embedding.weight
    positional_embedding                  text_model.embeddings.position_embedding.weight
    ln_final                              text_model.final_layer_norm
    transformer.resblocks.{i}.ln_1, ln_2  text_model.encoder.layers.{i}.layer_norm1, layer_norm2
      .attn.in_proj_{weight,bias}           .self_attn.{q,k,v}_proj.{weight,bias} (split in 3)
      .attn.out_proj                        .self_attn.out_proj
      .mlp.c_fc, .mlp.c_proj                .mlp.fc1, .mlp.fc2

SD 2.x conditions on the *penultimate* OpenCLIP layer, so a file with N resblocks becomes a text
encoder of N-1 layers (23 for ViT-H, as diffusers ships it) and resblock N-1 is ignored, with
`text_projection` and `logit_scale` (the contrastive head). `save_single_file` writes that last
resblock as zeros: an all-zero pre-LayerNorm residual block is the identity, so the written tower
gives the same penultimate *and* last hidden states.

Ignored on load (listed in IGNORED_KEYS / IGNORED_PREFIXES): the EMA copy `model_ema.*` (the
U-Net under `model.diffusion_model.` is the one loaded, unless `use_ema=True`), the training schedule buffers
(`betas`, `alphas_cumprod`, ...), `logvar`, and the text encoder's `position_ids` buffer. The
scheduler config is SD's schedule (scaled_linear betas 0.00085..0.012, 1000 steps); a file whose
`betas` buffer holds another schedule gets it as `trained_betas`, with a warning.

What a file does not say, and the rule used:
  - SD 1.x vs 2.x: 2.x uses linear `proj_in`/`proj_out` in its transformers (and a 1024-wide
    context from OpenCLIP; 1.x has conv projections and CLIP's 768).
  - attention heads: 1.x has 8 heads per transformer; 2.x 64-channel heads; CLIP and OpenCLIP
    text towers 64-channel heads. Heads change no weight, only how attention splits them.
  - the prediction type: v-prediction (SD 2.x 768-v) cannot be told from the weights; pass
    `prediction_type="v_prediction"` for those. The default is "epsilon" (SD 1.x, 2.x base,
    inpainting).
  - GroupNorm groups (32), norm eps (1e-5), the VAE scaling factor (0.18215): SD's values.
  - in_channels 9 (4 latent + 4 masked-image latent + 1 mask) is an inpainting U-Net.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import tensors
from jaxdiff.convert import unet as unet_convert
from jaxdiff.convert import vae as vae_convert
from jaxdiff.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

PREDICTION_TYPES = ("epsilon", "v_prediction")

# Keys that are not network weights, dropped when present.
IGNORED_PREFIXES = ("model_ema.",)  # the EMA copy of the U-Net (and its decay/num_updates)
IGNORED_KEYS = frozenset({
    # the DDPM training schedule, recomputed from the scheduler config
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar",
    # the position-index buffer of the transformers CLIP text model
    CLIP_PREFIX + "text_model.embeddings.position_ids", CLIP_PREFIX + "embeddings.position_ids",
    # OpenCLIP's contrastive head, unused by Stable Diffusion
    OPENCLIP_PREFIX + "text_projection", OPENCLIP_PREFIX + "logit_scale",
})

# Stable Diffusion's training schedule (every 1.x and 2.x checkpoint), as a diffusers
# scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

SD_VAE_SCALING_FACTOR = 0.18215
_HEAD_WIDTH = 64  # SD 2.x U-Net heads and CLIP / OpenCLIP text heads
_SD1_HEADS = 8


# ------------------------------------------------------------------------------------------
# name tables: {LDM key (with its prefix): diffusers key, or three diffusers keys for a fused
# q/k/v tensor}


class _Table(dict):
    def module(self, ldm: str, diffusers: str, bias: bool = True) -> None:
        self[f"{ldm}.weight"] = f"{diffusers}.weight"
        if bias:
            self[f"{ldm}.bias"] = f"{diffusers}.bias"


_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_UNET_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2"}
_TRANSFORMER_BLOCK = [("norm1", True), ("attn1.to_q", False), ("attn1.to_k", False),
                      ("attn1.to_v", False), ("attn1.to_out.0", True), ("norm2", True),
                      ("attn2.to_q", False), ("attn2.to_k", False), ("attn2.to_v", False),
                      ("attn2.to_out.0", True), ("norm3", True), ("ff.net.0.proj", True),
                      ("ff.net.2", True)]


def _unet_table(m) -> _Table:
    """LDM -> diffusers names of every U-Net parameter of `m` (a jaxdiff UNet)."""
    p, t = UNET_PREFIX, _Table()
    L, R = len(m.channel_mult), m.num_res_blocks
    widths = [m.base_channels * k for k in m.channel_mult]
    depth = m.per_level("transformer_depth")

    def res(ldm, dif, skip):
        for a, b in _UNET_RES.items():
            t.module(f"{p}{ldm}.{a}", f"{dif}.{b}")
        if skip:
            t.module(f"{p}{ldm}.skip_connection", f"{dif}.conv_shortcut")

    def transformer(ldm, dif, n_blocks):
        for name in ("norm", "proj_in", "proj_out"):
            t.module(f"{p}{ldm}.{name}", f"{dif}.{name}")
        for k in range(n_blocks):
            for name, bias in _TRANSFORMER_BLOCK:
                inner = f"transformer_blocks.{k}.{name}"
                t.module(f"{p}{ldm}.{inner}", f"{dif}.{inner}", bias)

    for a, b in _UNET_TOP.items():
        t.module(p + a, b)
    n, ch = 1, widths[0]
    for i in range(L):
        for j in range(R):
            res(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", ch != widths[i])
            ch = widths[i]
            if i in m.attention_levels:
                transformer(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", depth[i])
            n += 1
        if i < L - 1:
            t.module(f"{p}input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            n += 1
    res("middle_block.0", "mid_block.resnets.0", False)
    transformer("middle_block.1", "mid_block.attentions.0", depth[-1])
    res("middle_block.2", "mid_block.resnets.1", False)
    n = 0
    for k in range(L):  # diffusers' up block k is level L-1-k
        i = L - 1 - k
        attn = i in m.attention_levels
        for j in range(R + 1):
            # the skip concatenation always widens the input, so every up ResBlock has a shortcut
            res(f"output_blocks.{n}.0", f"up_blocks.{k}.resnets.{j}", True)
            if attn:
                transformer(f"output_blocks.{n}.1", f"up_blocks.{k}.attentions.{j}", depth[i])
            if j == R and k < L - 1:
                t.module(f"{p}output_blocks.{n}.{2 if attn else 1}.conv",
                         f"up_blocks.{k}.upsamplers.0.conv")
            n += 1
    return t


_VAE_TOP = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
_VAE_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers keys stored as linears [C, C] whose LDM twins are 1x1 convolutions [C, C, 1, 1]
_VAE_CONV1X1 = re.compile(r".*mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


def _vae_table(m) -> _Table:
    """LDM -> diffusers names of every parameter of `m` (a jaxdiff AutoencoderKL)."""
    p, t = VAE_PREFIX, _Table()
    widths, R = list(m.block_out_channels), m.layers_per_block
    L = len(widths)

    def res(ldm, dif, skip):
        for a, b in _VAE_RES.items():
            t.module(f"{p}{ldm}.{a}", f"{dif}.{b}")
        if skip:
            t.module(f"{p}{ldm}.nin_shortcut", f"{dif}.conv_shortcut")

    for part in ("encoder", "decoder"):
        for a, b in _VAE_TOP.items():
            t.module(f"{p}{part}.{a}", f"{part}.{b}")
        res(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
        res(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)
        if m.mid_attention:
            for a, b in _VAE_ATTN.items():
                t.module(f"{p}{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}")
    ch = widths[0]
    for i in range(L):
        for j in range(R):
            res(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                ch != widths[i])
            ch = widths[i]
        if i < L - 1:
            t.module(f"{p}encoder.down.{i}.downsample.conv",
                     f"encoder.down_blocks.{i}.downsamplers.0.conv")
    ch = widths[-1]
    for k in range(L):
        i = L - 1 - k
        for j in range(R + 1):
            res(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}",
                ch != widths[i])
            ch = widths[i]
        if i > 0:
            t.module(f"{p}decoder.up.{i}.upsample.conv",
                     f"decoder.up_blocks.{k}.upsamplers.0.conv")
    if m.use_quant_conv:
        t.module(f"{p}quant_conv", "quant_conv")
    if m.use_post_quant_conv:
        t.module(f"{p}post_quant_conv", "post_quant_conv")
    return t


_CLIP_LAYER = ["layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
               "self_attn.out_proj", "layer_norm2", "mlp.fc1", "mlp.fc2"]


def _clip_table(m, inner: str = "text_model.") -> _Table:
    """SD 1.x: `cond_stage_model.transformer.` + transformers names (as `clip.py` writes them)."""
    t, d = _Table(), "text_model."
    for name in ("embeddings.token_embedding", "embeddings.position_embedding"):
        t.module(f"{CLIP_PREFIX}{inner}{name}", d + name, bias=False)
    for i in range(m.num_layers):
        for name in _CLIP_LAYER:
            t.module(f"{CLIP_PREFIX}{inner}encoder.layers.{i}.{name}",
                     f"{d}encoder.layers.{i}.{name}")
    t.module(f"{CLIP_PREFIX}{inner}final_layer_norm", d + "final_layer_norm")
    return t


_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj",
                   "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _openclip_block_keys(i: int) -> list[str]:
    """The LDM keys of OpenCLIP resblock `i`."""
    names = [f"{a}.{leaf}" for a in _OPENCLIP_LAYER for leaf in ("weight", "bias")]
    names += ["attn.in_proj_weight", "attn.in_proj_bias"]
    return [f"{OPENCLIP_PREFIX}transformer.resblocks.{i}.{n}" for n in names]


def _openclip_table(m) -> _Table:
    """SD 2.x: OpenCLIP names; `attn.in_proj_*` stacks q, k, v along its first axis."""
    p, d, t = OPENCLIP_PREFIX, "text_model.", _Table()
    t[p + "token_embedding.weight"] = d + "embeddings.token_embedding.weight"
    t[p + "positional_embedding"] = d + "embeddings.position_embedding.weight"
    t.module(p + "ln_final", d + "final_layer_norm")
    for i in range(m.num_layers):
        lp, ld = f"{p}transformer.resblocks.{i}", f"{d}encoder.layers.{i}"
        for a, b in _OPENCLIP_LAYER.items():
            t.module(f"{lp}.{a}", f"{ld}.{b}")
        for leaf in ("weight", "bias"):
            t[f"{lp}.attn.in_proj_{leaf}"] = tuple(
                f"{ld}.self_attn.{q}_proj.{leaf}" for q in ("q", "k", "v"))
    return t


def _to_diffusers(sd: Mapping[str, np.ndarray], table: Mapping) -> dict[str, np.ndarray]:
    out = {}
    for ldm, dif in table.items():
        w = sd[ldm]
        if isinstance(dif, tuple):
            if w.shape[0] % 3:
                raise CheckpointError(f"{ldm} has shape {w.shape}; a fused q/k/v tensor needs a "
                                      "first axis divisible by 3")
            out.update(zip(dif, np.split(np.asarray(w), 3, axis=0)))
        else:
            out[dif] = w
    return out


def _to_ldm(sd: Mapping[str, np.ndarray], table: Mapping) -> dict[str, np.ndarray]:
    return {ldm: np.concatenate([sd[d] for d in dif]) if isinstance(dif, tuple) else sd[dif]
            for ldm, dif in table.items()}


# ------------------------------------------------------------------------------------------
# configs inferred from shapes


def _need(sd: Mapping, key: str, what: str) -> np.ndarray:
    if key not in sd:
        raise CheckpointError(f"single-file checkpoint: missing key {key} (needed to read the "
                              f"{what} layout)")
    return sd[key]


def _indices(keys, pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over `keys`."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _heads(width: int, what: str) -> int:
    if width % _HEAD_WIDTH:
        raise CheckpointError(
            f"{what}: width {width} is not a multiple of the {_HEAD_WIDTH}-channel heads Stable "
            "Diffusion uses; this is not an SD 1.x/2.x checkpoint")
    return width // _HEAD_WIDTH


def unet_config(sd: Mapping[str, np.ndarray], prediction_type: str = "epsilon") -> dict:
    """The diffusers UNet2DConditionModel config of the U-Net in `sd` (full LDM keys)."""
    p = UNET_PREFIX
    conv_in = _need(sd, p + "input_blocks.0.0.weight", "U-Net")  # [C, in, 3, 3]
    in_channels = int(conv_in.shape[1])
    out_channels = int(_need(sd, p + "out.2.weight", "U-Net").shape[0])
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (width, transformer depth) per block
    for n in _indices(sd, re.escape(p) + r"input_blocks\.(\d+)\.")[1:]:
        if f"{p}input_blocks.{n}.0.op.weight" in sd:
            levels.append([])
            continue
        width = int(_need(sd, f"{p}input_blocks.{n}.0.in_layers.2.weight", "U-Net").shape[0])
        blocks = re.escape(f"{p}input_blocks.{n}.1.transformer_blocks.") + r"(\d+)\."
        depth = len(_indices(sd, blocks))
        levels[-1].append((width, depth))
    R = len(levels[0])
    if R == 0 or any(len(lv) != R for lv in levels) or any(len(set(lv)) != 1 for lv in levels):
        raise CheckpointError(
            "single-file U-Net: the input blocks do not form levels of equal ResBlock counts with "
            f"one width and attention setting per level (found {levels}); not an SD 1.x/2.x U-Net")
    widths = [lv[0][0] for lv in levels]
    depths = [lv[0][1] for lv in levels]
    attn = [i for i, d in enumerate(depths) if d]
    ctx_key = next((k for k in sorted(sd) if k.startswith(p) and k.endswith("attn2.to_k.weight")),
                   None)
    proj_key = next((k for k in sorted(sd) if k.startswith(p) and k.endswith(".proj_in.weight")),
                    None)
    if not attn or ctx_key is None or proj_key is None:
        raise CheckpointError("single-file U-Net has no cross-attention transformers; not a "
                              "Stable Diffusion 1.x/2.x U-Net")
    linear = sd[proj_key].ndim == 2
    sd2 = linear  # SD 2.x: linear projections (and a 1024-wide OpenCLIP context)
    used = set(depths[i] for i in attn)
    depth = used.pop() if len(used) == 1 else [d or 1 for d in depths]
    down = ["CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(widths))]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 96 if sd2 and prediction_type == "v_prediction" else 64,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": down,
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "block_out_channels": widths,
        "layers_per_block": R,
        "cross_attention_dim": int(sd[ctx_key].shape[1]),
        # diffusers' name for the number of heads
        "attention_head_dim": ([_heads(w, "single-file U-Net") for w in widths] if sd2
                               else _SD1_HEADS),
        "transformer_layers_per_block": depth,
        "use_linear_projection": linear,
        # as in SD 2.1's released folder; in float32 it changes nothing
        "upcast_attention": sd2,
    }


def vae_config(sd: Mapping[str, np.ndarray]) -> dict:
    """The diffusers AutoencoderKL config of the autoencoder in `sd` (full LDM keys)."""
    p = VAE_PREFIX
    in_channels = int(_need(sd, p + "encoder.conv_in.weight", "VAE").shape[1])
    levels = _indices(sd, re.escape(p) + r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"single-file VAE: no {p}encoder.down.* keys")
    widths = [int(_need(sd, f"{p}encoder.down.{i}.block.0.conv1.weight", "VAE").shape[0])
              for i in levels]
    R = len(_indices(sd, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."))
    L = len(widths)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": in_channels,
        "out_channels": int(_need(sd, p + "decoder.conv_out.weight", "VAE").shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * L,
        "up_block_types": ["UpDecoderBlock2D"] * L,
        "block_out_channels": widths,
        "layers_per_block": R,
        "latent_channels": int(_need(sd, p + "decoder.conv_in.weight", "VAE").shape[1]),
        "scaling_factor": SD_VAE_SCALING_FACTOR,
        "use_quant_conv": p + "quant_conv.weight" in sd,
        "use_post_quant_conv": p + "post_quant_conv.weight" in sd,
        "mid_block_add_attention": p + "encoder.mid.attn_1.q.weight" in sd,
    }


def _clip_inner(sd: Mapping) -> str:
    """'text_model.' (transformers >= 4.22 names) or '' (older files)."""
    return "text_model." if any(k.startswith(CLIP_PREFIX + "text_model.") for k in sd) else ""


def text_encoder_config(sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
    """("clip" | "openclip", transformers CLIPTextConfig dict) of the text encoder in `sd`."""
    if any(k.startswith(OPENCLIP_PREFIX) for k in sd):
        p, layout = OPENCLIP_PREFIX, "openclip"
        token = _need(sd, p + "token_embedding.weight", "OpenCLIP text encoder")
        position = _need(sd, p + "positional_embedding", "OpenCLIP text encoder")
        blocks = _indices(sd, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
        if len(blocks) < 2:
            raise CheckpointError(
                f"single-file OpenCLIP text encoder has {len(blocks)} resblocks; Stable "
                "Diffusion 2.x uses all but the last, so at least 2 are needed")
        fc1 = _need(sd, f"{p}transformer.resblocks.0.mlp.c_fc.weight", "OpenCLIP text encoder")
        layers, act = len(blocks) - 1, "gelu"
    elif any(k.startswith(CLIP_PREFIX) for k in sd):
        p, layout = CLIP_PREFIX + _clip_inner(sd), "clip"
        token = _need(sd, p + "embeddings.token_embedding.weight", "CLIP text encoder")
        position = _need(sd, p + "embeddings.position_embedding.weight", "CLIP text encoder")
        layers = len(_indices(sd, re.escape(p) + r"encoder\.layers\.(\d+)\."))
        fc1 = _need(sd, f"{p}encoder.layers.0.mlp.fc1.weight", "CLIP text encoder")
        act = "quick_gelu"
    else:
        raise CheckpointError(
            f"single-file checkpoint has no text encoder ({CLIP_PREFIX}* for SD 1.x or "
            f"{OPENCLIP_PREFIX}* for SD 2.x)")
    hidden = int(token.shape[1])
    return layout, {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": int(token.shape[0]), "hidden_size": hidden,
        "intermediate_size": int(fc1.shape[0]), "num_hidden_layers": layers,
        "num_attention_heads": _heads(hidden, "single-file text encoder"),
        "max_position_embeddings": int(position.shape[0]), "hidden_act": act,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
    }


def sd_betas(num_steps: int = 1000) -> np.ndarray:
    """Stable Diffusion's `scaled_linear` betas: linear in sqrt(beta) from 0.00085 to 0.012."""
    return np.linspace(SCHEDULER_CONFIG["beta_start"] ** 0.5, SCHEDULER_CONFIG["beta_end"] ** 0.5,
                       num_steps, dtype=np.float64) ** 2


def scheduler_config(sd: Mapping[str, np.ndarray], prediction_type: str = "epsilon") -> dict:
    """The diffusers scheduler config for a single file: SD's schedule, or the file's own
    `betas` buffer as `trained_betas` (with a warning) when it holds a different one."""
    config = {**SCHEDULER_CONFIG, "prediction_type": prediction_type}
    betas = sd.get("betas")
    if betas is None:
        return config
    betas = np.asarray(betas, np.float64).reshape(-1)
    # stored in half precision in many files: compare at its resolution
    if betas.size == 1000 and np.allclose(betas, sd_betas(), rtol=2e-3, atol=0):
        return config
    warnings.warn(
        f"this checkpoint was trained with {betas.size} betas from {betas[0]:.6g} to "
        f"{betas[-1]:.6g}, not Stable Diffusion's scaled_linear 0.00085..0.012; its scheduler "
        "config uses them as trained_betas", stacklevel=3)
    config.update(num_train_timesteps=int(betas.size), trained_betas=betas.tolist())
    return config


# ------------------------------------------------------------------------------------------
# loading


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _check_kind(keys) -> None:
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(
            "this is an SDXL single file (conditioner.embedders.*); jaxdiff reads SD 1.x/2.x "
            "single files only: use the diffusers folder of the model")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(
            f"not a Stable Diffusion single-file checkpoint: no {UNET_PREFIX}* keys (a diffusers "
            "folder or a lone U-Net/VAE file is loaded with jaxdiff.convert.unet/vae instead)")


def ema_key(key: str) -> str:
    """The name LDM gives the EMA copy of U-Net weight `key`: `model_ema.` + the name after
    `model.` with its dots removed (`model.diffusion_model.out.2.weight` ->
    `model_ema.diffusion_modelout2weight`)."""
    return "model_ema." + key[len("model."):].replace(".", "")


def _swap_in_ema(raw: dict[str, np.ndarray], path: str) -> None:
    unet_keys = [k for k in raw if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in raw]
    if missing:
        n = sum(k.startswith("model_ema.") for k in raw)
        raise CheckpointError(
            f"{path}: use_ema=True, but {len(missing)} U-Net weight(s) have no EMA copy, e.g. "
            f"{ema_key(missing[0])} for {missing[0]} (the file has {n} model_ema.* keys); "
            "load without use_ema")
    for k in unet_keys:
        raw[k] = raw[ema_key(k)]


def load_single_file(path: str | os.PathLike, *, prediction_type: str = "epsilon",
                     use_ema: bool = False, dtype=jnp.float32) -> dict[str, Any]:
    """Read an SD 1.x / 2.x / inpainting single-file `.safetensors` checkpoint.

    prediction_type: "epsilon" (default: SD 1.x, 2.x base, inpainting) or "v_prediction"
      (SD 2.x 768-v); the weights cannot tell them apart.
    use_ema: load the U-Net from the file's EMA copy (`model_ema.*`, in "full-ema" files)
      instead of `model.diffusion_model.*`; an error if the file has none.
    dtype: compute dtype of the returned modules; params are float32 whatever the file holds.
    Returns {"unet": (UNet, params), "vae": (AutoencoderKL, params),
             "text_encoder": (CLIPTextEncoder, params), "scheduler": scheduler config dict}.
    Raises CheckpointError for pickles, unknown layouts, and missing or unexpected keys (named).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction_type={prediction_type!r}; use one of {PREDICTION_TYPES}")
    path = os.fspath(path)
    raw = tensors.read_safetensors(path)
    if use_ema:
        _swap_in_ema(raw, path)
    scheduler = scheduler_config(raw, prediction_type)
    sd = {k: v for k, v in raw.items() if not _ignored(k)}
    del raw
    _check_kind(sd)
    unet_module = unet_convert.module_from_config(unet_config(sd, prediction_type), dtype)
    vae_module = vae_convert.module_from_config(vae_config(sd), dtype)
    layout, text_cfg = text_encoder_config(sd)
    text_module = clip_convert.module_from_config(text_cfg, dtype)

    unet_t, vae_t = _unet_table(unet_module), _vae_table(vae_module)
    if layout == "openclip":
        text_t = _openclip_table(text_module)
        last = set(_openclip_block_keys(text_module.num_layers))  # SD 2.x uses the one before
        sd = {k: v for k, v in sd.items() if k not in last}
    else:
        text_t = _clip_table(text_module, _clip_inner(sd))
    tensors.check_same_keys(sd, [*unet_t, *vae_t, *text_t], what=f"single-file checkpoint {path}")

    vae_sd = _to_diffusers(sd, vae_t)
    for k, w in vae_sd.items():
        if _VAE_CONV1X1.fullmatch(k) and w.ndim == 4:
            vae_sd[k] = w[:, :, 0, 0]
    return {
        "unet": (unet_module, unet_convert.params_from_torch(_to_diffusers(sd, unet_t),
                                                             unet_module)),
        "vae": (vae_module, vae_convert.params_from_torch(vae_sd, vae_module)),
        "text_encoder": (text_module, clip_convert.params_from_torch(_to_diffusers(sd, text_t),
                                                                     text_module)),
        "scheduler": scheduler,
    }


def to_diffusers_folder(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                        prediction_type: str = "epsilon", use_ema: bool = False,
                        tokenizer_dir: str | os.PathLike | None = None) -> list[str]:
    """Convert a single file into a diffusers pipeline folder (model_index.json, unet/, vae/,
    text_encoder/, scheduler/, and tokenizer/ when `tokenizer_dir` is given).

    A single file holds no tokenizer: without `tokenizer_dir` the folder has none, which the
    returned notes (also issued as a warning) say, with how to add one.
    """
    from jaxdiff.convert.folder import save_pretrained, tokenizer_source

    if tokenizer_dir is not None:  # fail before the (long) conversion
        tokenizer_dir = tokenizer_source(tokenizer_dir)
    components = load_single_file(path, prediction_type=prediction_type, use_ema=use_ema)
    return save_pretrained(out_dir, components, tokenizer_dir=tokenizer_dir)


# ------------------------------------------------------------------------------------------
# saving


def save_single_file(out_path: str | os.PathLike, unet: tuple, vae: tuple, text_encoder: tuple,
                     *, text_layout: str | None = None, dtype=np.float32) -> None:
    """Write jaxdiff networks as an LDM single-file `.safetensors` checkpoint.

    unet, vae, text_encoder: (module, params) pairs (as `load_single_file` returns them).
    text_layout: "clip" (SD 1.x, `cond_stage_model.transformer.*`) or "openclip" (SD 2.x,
      `cond_stage_model.model.*` with fused q/k/v and one extra all-zero, identity resblock);
      default: "openclip" for a gelu text encoder, else "clip".
    dtype: the dtype tensors are stored in (e.g. np.float16 halves the file).
    """
    out_path = os.fspath(out_path)
    tensors.refuse_pickle(out_path)
    if not out_path.endswith(".safetensors"):
        raise CheckpointError(f"{out_path}: single files are written as .safetensors")
    (um, up), (vm, vp), (tm, tp) = unet, vae, text_encoder
    if text_layout is None:
        text_layout = "openclip" if tm.hidden_act == "gelu" else "clip"
    if text_layout not in ("clip", "openclip"):
        raise CheckpointError(f"text_layout={text_layout!r}; use 'clip' or 'openclip'")

    out: dict[str, np.ndarray] = {}
    for table, state, what in (
            (_unet_table(um), unet_convert.params_to_torch(up, um), "U-Net"),
            (_vae_table(vm), vae_convert.params_to_torch(vp, vm), "VAE")):
        if what == "VAE":
            state = {k: (w[:, :, None, None] if _VAE_CONV1X1.fullmatch(k) else w)
                     for k, w in state.items()}
        used = {d for v in table.values() for d in (v if isinstance(v, tuple) else (v,))}
        tensors.check_same_keys(state, used, what=f"{what} names for the single file")
        out.update(_to_ldm(state, table))
    text_state = clip_convert.params_to_torch(tp, tm)
    text_t = _openclip_table(tm) if text_layout == "openclip" else _clip_table(tm)
    out.update(_to_ldm(text_state, text_t))
    if text_layout == "openclip":
        for k in _openclip_block_keys(tm.num_layers):  # the identity block (see module doc)
            like = out[k.replace(f"resblocks.{tm.num_layers}.", "resblocks.0.")]
            out[k] = np.zeros_like(like)
    out = {k: np.asarray(v, dtype) for k, v in out.items()}
    tensors.write_safetensors(out, out_path, metadata={"format": "pt"})

