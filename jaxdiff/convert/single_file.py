"""Single-file Stable Diffusion checkpoints (1.x, 2.x, inpainting, XL) <-> jaxdiff networks.

A single file is the original LDM/CompVis state dict in one `.safetensors`: the U-Net under
`model.diffusion_model.`, the autoencoder under `first_stage_model.`, and the text encoder under
`cond_stage_model.transformer.` (SD 1.x: OpenAI CLIP ViT-L/14, transformers names) or
`cond_stage_model.model.` (SD 2.x: OpenCLIP ViT-H/14, with fused q/k/v `attn.in_proj_*`).
Pickled `.ckpt` files are refused (see `tensors.refuse_pickle`). SDXL files (Stability's sgm
layout) keep the U-Net and VAE there too, with SDXL's added embedding as `label_emb.0.{0,2}`, and
their text encoders under `conditioner.embedders.` (see `ldm_config.py`): CLIP ViT-L as in SD 1.x
and OpenCLIP ViT-bigG as in SD 2.x but with every resblock and its `text_projection` [D, P], which
is jaxdiff's projection kernel as it is; a refiner has the OpenCLIP tower alone.

Public API:

    load_single_file(path, *, prediction_type="epsilon", use_ema=False, dtype=jnp.float32) -> {
        "unet": (UNet, params), "vae": (AutoencoderKL, params),
        "text_encoder": (CLIPTextEncoder, params), "scheduler": dict}
        (SDXL: "text_encoder_2" too, no "text_encoder" for a refiner, and "options")
    to_diffusers_folder(path, out_dir, *, prediction_type="epsilon", use_ema=False,
                        tokenizer_dir=None)
        -> list[str]   # notes for the user (e.g. that no tokenizer was copied)
    save_single_file(out_path, unet, vae, text_encoder, *, text_layout=None,
                     dtype=np.float32, text_encoder_2=None) -> None     # text_encoder_2: SDXL

Each network's single-file table is its own name table (`unet.table`, `vae.table`,
`clip.table`: flax path <-> diffusers / transformers key <-> layout) with every torch key renamed
by the LDM rules below; `ldm_table` joins the three under "unet" / "vae" / "text_encoder", and
`names.to_flax` / `names.to_torch` run it both ways. Every key of the file must be in the table
or in the explicit ignore list; anything else, and anything the table expects that the file
lacks, is one CheckpointError naming the keys. The genuinely special cases:

  - U-Net: LDM numbers its blocks in file order (`input_blocks.{n}`, `output_blocks.{n}`, an
    upsampler after the transformer when there is one) and names ResBlock layers by position
    (`in_layers.0` = norm1, `emb_layers.1` = time_emb_proj, `skip_connection`, ...).
  - VAE: LDM counts decoder levels from the top (`up.{i}` is diffusers' `up_blocks.{L-1-i}`) and
    stores the mid attention's q/k/v/proj_out as 1x1 convolutions [C, C, 1, 1] (`CONV1X1`).
  - SD 1.x text encoder: `cond_stage_model.transformer.` + transformers' own names.
  - SD 2.x OpenCLIP text encoder (`cond_stage_model.model.`): `token_embedding`,
    `positional_embedding`, `ln_final`, `transformer.resblocks.{i}.{ln_1, ln_2, attn.out_proj,
    mlp.c_fc, mlp.c_proj}`, and q/k/v fused along axis 0 in `attn.in_proj_{weight,bias}`
    (`part=(i, 3)` entries). SD 2.x conditions on the *penultimate* layer: a file with N
    resblocks is a text encoder of N-1 layers (23 for ViT-H, as diffusers ships it); resblock N-1
    is ignored, with `text_projection` and `logit_scale` (the contrastive head).
    `save_single_file` writes that last resblock as zeros: an all-zero pre-LayerNorm residual
    block is the identity, so the written tower gives the same penultimate *and* last states.

Ignored on load (IGNORED_KEYS / IGNORED_PREFIXES): the EMA copy `model_ema.*` (the U-Net under
`model.diffusion_model.` is the one loaded, unless `use_ema=True`), the training schedule buffers
(`betas`, `alphas_cumprod`, ...), `logvar`, and the text encoder's `position_ids` buffer. The
configs and the scheduler are read from the tensors' shapes (`ldm_config.py`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import names, tensors
from jaxdiff.convert import unet as unet_convert
from jaxdiff.convert import vae as vae_convert
from jaxdiff.errors import CheckpointError

# the key prefixes and the configs read from shapes (re-exported: single_file.unet_config, ...)
from jaxdiff.convert.ldm_config import (  # noqa: F401
    CLIP_PREFIX, OPENCLIP_PREFIX, SCHEDULER_CONFIG, UNET_PREFIX, VAE_PREFIX, XL_CLIP_PREFIX, XL_PREFIX, clip_inner,
    scheduler_config, sd_betas, text_encoder_config, unet_config, vae_config, xl_clip_inner, xl_configs,
    xl_text_prefixes)

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

# ------------------------------------------------------------------------------------------
# name tables: each network's own table (convert/unet.py, vae.py, clip.py) with every torch
# key renamed to its LDM key by the rules below (module names; the leaf is kept), and the flax
# paths put under "unet" / "vae" / "text_encoder", so that one table covers the whole file.

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_names(m) -> names.Rules:
    """diffusers U-Net module name -> LDM name, for `m`'s depth and attention levels."""
    R, L = m.num_res_blocks, len(m.channel_mult)

    def inp(i, j) -> int:  # input block of level i, ResBlock j (its downsampler: j = R)
        return 1 + int(i) * (R + 1) + int(j)

    def out(k, j) -> int:  # output block of up block k, ResBlock j
        return int(k) * (R + 1) + int(j)

    def up_conv(k) -> str:  # the upsampler follows the ResBlock, and the transformer if any
        return "2" if L - 1 - int(k) in m.attention_levels else "1"

    return names.Rules([
        ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),  # SDXL
        ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda i, j, r: f"input_blocks.{inp(i, j)}.0.{_RES[r]}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, x: f"input_blocks.{inp(i, j)}.1.{x}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda i: f"input_blocks.{inp(i, R)}.0.op"),
        (r"mid_block\.resnets\.(\d)\.(\w+)", lambda j, r: f"middle_block.{2 * int(j)}.{_RES[r]}"),
        (r"mid_block\.attentions\.0\.(.+)", r"middle_block.1.\1"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda k, j, r: f"output_blocks.{out(k, j)}.0.{_RES[r]}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda k, j, x: f"output_blocks.{out(k, j)}.1.{x}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
         lambda k: f"output_blocks.{out(k, R)}.{up_conv(k)}.conv"),
    ])


_VAE_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
            "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_names(m) -> names.Rules:
    """diffusers AutoencoderKL module name -> LDM name (LDM counts up levels from the top)."""
    L = len(m.block_out_channels)
    return names.Rules([
        ("(quant_conv|post_quant_conv)", r"\1"),
        (r"(encoder|decoder)\.(conv_in|conv_out)", r"\1.\2"),
        (r"(encoder|decoder)\.conv_norm_out", r"\1.norm_out"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)",
         lambda p, j, r: f"{p}.mid.block_{int(j) + 1}.{_VAE_RES[r]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
         lambda p, a: f"{p}.mid.attn_1.{_VAE_ATTN[a]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda i, j, r: f"encoder.down.{i}.block.{j}.{_VAE_RES[r]}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder.down.\1.downsample.conv"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda k, j, r: f"decoder.up.{L - 1 - int(k)}.block.{j}.{_VAE_RES[r]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv",
         lambda k: f"decoder.up.{L - 1 - int(k)}.upsample.conv"),
    ])


# transformers CLIP key (unprefixed) -> OpenCLIP key; q/k/v are fused, see _openclip_entry
_OPENCLIP = names.Rules([
    (r"embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)",
     r"transformer.resblocks.\1.ln_\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
])
_FUSED_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def _openclip_entry(e: names.Entry, prefix: str = OPENCLIP_PREFIX) -> names.Entry:
    """OpenCLIP names under `prefix`; `attn.in_proj_{weight,bias}` stacks q, k, v along axis 0;
    the projection [D, P] is stored as jaxdiff's kernel is (x @ text_projection)."""
    m = _FUSED_QKV.fullmatch(e.torch)
    if m:
        fused = f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"
        return e._replace(torch=fused, part=("qkv".index(m[2]), 3))
    if e.torch == clip_convert.PROJECTION + ".weight":
        return e._replace(torch=prefix + clip_convert.PROJECTION, layout=names.SAME)
    return e._replace(torch=prefix + _OPENCLIP(e.torch))


def _renamed(table: names.Table, rules: names.Rules, prefix: str, what: str) -> names.Table:
    """`table` with each torch key `module.leaf` renamed to `prefix + rules(module) + .leaf`."""
    out = []
    for e in table:
        module, leaf = e.torch.rsplit(".", 1)
        try:
            out.append(e._replace(torch=f"{prefix}{rules(module)}.{leaf}"))
        except KeyError:
            raise CheckpointError(f"the {what} parameter {e.torch} has no name in an SD 1.x/2.x "
                                  "single file") from None
    return tuple(out)


def ldm_table(unet, vae, text_encoder, *, text_layout: str = "clip",
              clip_inner: str = "text_model.", unet_in_channels: int | None = None
              ) -> names.Table:
    """The name table of a whole single file: flax paths ("unet" | "vae" | "text_encoder", ...)
    <-> LDM keys <-> layouts, for the three modules.

    text_layout: "clip" (SD 1.x, `cond_stage_model.transformer.` + `clip_inner` + transformers
      names) or "openclip" (SD 2.x, fused q/k/v).
    unet_in_channels: the U-Net's input channels when `unet.in_channels` is None.
    """
    if text_layout == "openclip":
        text_t = tuple(_openclip_entry(e) for e in clip_convert.table(text_encoder, prefix=""))
    else:
        text_t = clip_convert.table(text_encoder, prefix=CLIP_PREFIX + clip_inner)
    return _joined(unet, vae, {"text_encoder": text_t}, unet_in_channels)


def _joined(unet, vae, texts: dict, unet_in_channels: int | None) -> names.Table:
    unet_t = _renamed(unet_convert.table(unet, unet_in_channels), _unet_names(unet),
                      UNET_PREFIX, "U-Net")
    # LDM keeps the VAE attention projections as 1x1 convolutions [C, C, 1, 1]
    vae_t = tuple(e._replace(layout=names.CONV1X1) if e.layout is names.LINEAR else e
                  for e in _renamed(vae_convert.table(vae), _vae_names(vae), VAE_PREFIX, "VAE"))
    return tuple(e._replace(flax=(part, *e.flax))
                 for part, t in (("unet", unet_t), ("vae", vae_t), *texts.items()) for e in t)


def xl_table(unet, vae, text_encoder, text_encoder_2, *, clip_inner: str = "text_model.",
             unet_in_channels: int | None = None) -> names.Table:
    """The name table of an SDXL single file (text_encoder None: a refiner), as `ldm_table`."""
    texts = {}
    if text_encoder is not None:
        texts["text_encoder"] = clip_convert.table(text_encoder, prefix=XL_CLIP_PREFIX + clip_inner)
    prefix = XL_PREFIX + ("1" if text_encoder is not None else "0") + ".model."
    texts["text_encoder_2"] = tuple(_openclip_entry(e, prefix) for e in clip_convert.table(text_encoder_2, prefix=""))
    return _joined(unet, vae, texts, unet_in_channels)


def openclip_last_block(table: names.Table, num_layers: int) -> dict[str, tuple[int, ...]]:
    """{LDM key: shape} of OpenCLIP resblock `num_layers`, the one SD 2.x does not use (shaped
    like resblock 0 of `table`)."""
    first = f"{OPENCLIP_PREFIX}transformer.resblocks.0."
    return {k.replace(".resblocks.0.", f".resblocks.{num_layers}.", 1): s
            for k, s in names.torch_shapes(table).items() if k.startswith(first)}


# ------------------------------------------------------------------------------------------
# loading


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _check_kind(keys) -> None:
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
    if any(k.startswith(XL_PREFIX) for k in sd):
        return _load_xl(sd, path, prediction_type, dtype)
    try:  # the configs are read from tensor shapes, which a damaged file may not have
        unet = unet_convert.module_from_config(unet_config(sd, prediction_type), dtype)
        vae = vae_convert.module_from_config(vae_config(sd), dtype)
        layout, text_cfg = text_encoder_config(sd)
        text = clip_convert.module_from_config(text_cfg, dtype)
    except CheckpointError:
        raise
    except (IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: a tensor does not have the shape of an SD 1.x/2.x "
                              f"checkpoint's ({e})") from None
    table = ldm_table(unet, vae, text, text_layout=layout, clip_inner=clip_inner(sd))
    if layout == "openclip":  # SD 2.x uses the penultimate block: the last one is dropped
        last = openclip_last_block(table, text.num_layers)
        sd = {k: v for k, v in sd.items() if k not in last}
    params = names.to_flax(sd, table, what=f"single-file checkpoint {path}")
    return {"unet": (unet, params["unet"]), "vae": (vae, params["vae"]),
            "text_encoder": (text, params["text_encoder"]), "scheduler": scheduler}


def _load_xl(sd: dict, path: str, prediction_type: str, dtype) -> dict[str, Any]:
    """`load_single_file` of an SDXL (base or refiner) file."""
    try:
        configs = xl_configs(sd, prediction_type)
        unet = unet_convert.module_from_config(configs["unet"], dtype)
        vae = vae_convert.module_from_config({k: v for k, v in configs["vae"].items() if k != "force_upcast"}, dtype)
        texts = {k: clip_convert.module_from_config(configs[k], dtype)
                 for k in ("text_encoder", "text_encoder_2") if k in configs}
    except CheckpointError as e:
        raise CheckpointError(f"{path} (an SDXL file, {XL_PREFIX}*): {e}") from None
    except (IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: a tensor does not have the shape of an SDXL checkpoint's ({e})") from None
    table = xl_table(unet, vae, texts.get("text_encoder"), texts["text_encoder_2"], clip_inner=xl_clip_inner(sd))
    sd = {k: v for k, v in sd.items() if not k.endswith((".position_ids", ".logit_scale"))}
    params = names.to_flax(sd, table, what=f"SDXL single-file checkpoint {path}")
    out = {"unet": (unet, params["unet"]), "vae": (vae, params["vae"])}
    out.update({k: (m, params[k]) for k, m in texts.items()})
    return {**out, "scheduler": configs["scheduler"], "options": configs["options"]}


def to_diffusers_folder(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                        prediction_type: str = "epsilon", use_ema: bool = False,
                        tokenizer_dir: str | os.PathLike | None = None) -> list[str]:
    """Convert a single file into a diffusers pipeline folder (model_index.json, unet/, vae/,
    text_encoder/, scheduler/, and tokenizer/ when `tokenizer_dir` is given).

    A single file holds no tokenizer: without `tokenizer_dir` the folder has none, which the
    returned notes (also issued as a warning) say, with how to add one. For an SDXL file,
    `tokenizer_dir` is a diffusers SDXL folder: its tokenizer/ and tokenizer_2/ are copied.
    """
    from jaxdiff.convert.folder import save_pretrained, tokenizer_source

    if tokenizer_dir is not None:  # fail before the (long) conversion
        tokenizer_source(tokenizer_dir)
    components = load_single_file(path, prediction_type=prediction_type, use_ema=use_ema)
    return save_pretrained(out_dir, components, tokenizer_dir=tokenizer_dir)


# ------------------------------------------------------------------------------------------
# saving


def save_single_file(out_path: str | os.PathLike, unet: tuple, vae: tuple, text_encoder: tuple | None,
                     *, text_layout: str | None = None, dtype=np.float32, text_encoder_2: tuple | None = None) -> None:
    """Write jaxdiff networks as an LDM single-file `.safetensors` checkpoint.

    unet, vae, text_encoder: (module, params) pairs (as `load_single_file` returns them).
    text_layout: "clip" (SD 1.x, `cond_stage_model.transformer.*`) or "openclip" (SD 2.x,
      `cond_stage_model.model.*` with fused q/k/v and one extra all-zero, identity resblock);
      default: "openclip" for a gelu text encoder, else "clip".
    dtype: the dtype tensors are stored in (e.g. np.float16 halves the file).
    text_encoder_2: SDXL's (CLIPTextEncoder with projection, params): the file is written in the
      SDXL layout (`xl_table`); text_encoder is then CLIP ViT-L's pair, or None for a refiner.
    """
    out_path = os.fspath(out_path)
    tensors.refuse_pickle(out_path)
    if not out_path.endswith(".safetensors"):
        raise CheckpointError(f"{out_path}: single files are written as .safetensors")
    if text_encoder_2 is not None:
        parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        params = {k: _unwrap(p[1]) for k, p in parts.items() if p is not None}
        table = xl_table(unet[0], vae[0], None if text_encoder is None else text_encoder[0], text_encoder_2[0],
                         unet_in_channels=np.shape(params["unet"]["conv_in"]["kernel"])[2])
        out = names.to_torch(params, table, what="jaxdiff networks for the SDXL single file")
        tensors.write_safetensors({k: np.asarray(v, dtype) for k, v in out.items()}, out_path,
                                  metadata={"format": "pt"})
        return
    (um, up), (vm, vp), (tm, tp) = unet, vae, text_encoder
    if text_layout is None:
        text_layout = "openclip" if tm.hidden_act == "gelu" else "clip"
    if text_layout not in ("clip", "openclip"):
        raise CheckpointError(f"text_layout={text_layout!r}; use 'clip' or 'openclip'")
    params = {"unet": _unwrap(up), "vae": _unwrap(vp), "text_encoder": _unwrap(tp)}
    in_channels = np.shape(params["unet"]["conv_in"]["kernel"])[2]  # [3, 3, C, O]
    table = ldm_table(um, vm, tm, text_layout=text_layout, unet_in_channels=in_channels)
    out = names.to_torch(params, table, what="jaxdiff networks for the single file")
    if text_layout == "openclip":  # the identity block (see the module docstring)
        out.update({k: np.zeros(s, np.float32)
                    for k, s in openclip_last_block(table, tm.num_layers).items()})
    out = {k: np.asarray(v, dtype) for k, v in out.items()}
    tensors.write_safetensors(out, out_path, metadata={"format": "pt"})


def _unwrap(params: Mapping) -> Mapping:
    return params["params"] if set(params) == {"params"} else params
