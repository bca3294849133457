"""What the tensors of a single-file Stable Diffusion checkpoint say about its networks.

A single file (see `single_file.py`) holds weights only: the diffusers config of each network is
read from the shapes (and presence) of its tensors, under these key prefixes:

    model.diffusion_model.            the U-Net                    -> unet_config(sd)
    first_stage_model.                the autoencoder              -> vae_config(sd)
    cond_stage_model.transformer.     SD 1.x CLIP text encoder     -> text_encoder_config(sd)
    cond_stage_model.model.           SD 2.x OpenCLIP text encoder
    betas (when present)              the training schedule        -> scheduler_config(sd)
  SDXL (Stability's sgm layout, `xl_configs(sd)`): the same U-Net and VAE prefixes, and
    conditioner.embedders.0.transformer.   CLIP ViT-L (transformers names)    text_encoder
    conditioner.embedders.1.model.         OpenCLIP ViT-bigG, every resblock  text_encoder_2
                                           and its text_projection [D, P]
    (a refiner has OpenCLIP bigG alone, as conditioner.embedders.0.model.)

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
  - SD 2.x conditions on the penultimate OpenCLIP layer: N resblocks give N-1 text layers.
  - the schedule: SD's (scaled_linear betas 0.00085..0.012, 1000 steps); a file whose `betas`
    buffer holds another one gets it as `trained_betas`, with a warning.
  - SDXL: the micro-conditioning has 6 numbers (base) or 5 (a refiner's aesthetic score), so the
    sinusoid width per number is (label_emb input - projection_dim) / 6 or / 5 (256 in released
    files); Euler as the default sampler, VAE scaling 0.13025 with force_upcast, as diffusers ships.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping

import numpy as np

from jaxdiff.errors import CheckpointError, JaxdiffWarning

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
XL_PREFIX = "conditioner.embedders."
XL_CLIP_PREFIX = XL_PREFIX + "0.transformer."
XL_VAE_SCALING_FACTOR = 0.13025

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


def clip_inner(sd: Mapping) -> str:
    """'text_model.' (transformers >= 4.22 names) or '' (older files)."""
    return "text_model." if any(k.startswith(CLIP_PREFIX + "text_model.") for k in sd) else ""


def _openclip_config(sd: Mapping, p: str, *, drop_last: bool) -> dict:
    """The CLIPTextConfig of the OpenCLIP text tower under `p` (SD 2.x: without its last
    resblock; SDXL: every resblock and the projection head)."""
    token = _need(sd, p + "token_embedding.weight", "OpenCLIP text encoder")
    blocks = _indices(sd, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
    if len(blocks) < 1 + drop_last:
        raise CheckpointError(
            f"single-file OpenCLIP text encoder has {len(blocks)} resblocks; Stable "
            "Diffusion 2.x uses all but the last, so at least 2 are needed")
    fc1 = _need(sd, f"{p}transformer.resblocks.0.mlp.c_fc.weight", "OpenCLIP text encoder")
    config = _text_config(token, _need(sd, p + "positional_embedding", "OpenCLIP text encoder"), fc1,
                          len(blocks) - drop_last, "gelu")
    if not drop_last:
        projection = _need(sd, p + "text_projection", "OpenCLIP text encoder")        # [D, P]
        config.update(architectures=["CLIPTextModelWithProjection"], projection_dim=int(projection.shape[1]))
    return config


def _clip_config(sd: Mapping, p: str) -> dict:
    """The CLIPTextConfig of the transformers-named CLIP text tower under `p`."""
    token = _need(sd, p + "embeddings.token_embedding.weight", "CLIP text encoder")
    position = _need(sd, p + "embeddings.position_embedding.weight", "CLIP text encoder")
    layers = len(_indices(sd, re.escape(p) + r"encoder\.layers\.(\d+)\."))
    fc1 = _need(sd, f"{p}encoder.layers.0.mlp.fc1.weight", "CLIP text encoder")
    return _text_config(token, position, fc1, layers, "quick_gelu")


def _text_config(token, position, fc1, layers: int, act: str) -> dict:
    hidden = int(token.shape[1])
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": int(token.shape[0]), "hidden_size": hidden,
        "intermediate_size": int(fc1.shape[0]), "num_hidden_layers": layers,
        "num_attention_heads": _heads(hidden, "single-file text encoder"),
        "max_position_embeddings": int(position.shape[0]), "hidden_act": act,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
    }


def text_encoder_config(sd: Mapping[str, np.ndarray]) -> tuple[str, dict]:
    """("clip" | "openclip", transformers CLIPTextConfig dict) of the text encoder in `sd`."""
    if any(k.startswith(OPENCLIP_PREFIX) for k in sd):
        return "openclip", _openclip_config(sd, OPENCLIP_PREFIX, drop_last=True)
    if any(k.startswith(CLIP_PREFIX) for k in sd):
        return "clip", _clip_config(sd, CLIP_PREFIX + clip_inner(sd))
    raise CheckpointError(
        f"single-file checkpoint has no text encoder ({CLIP_PREFIX}* for SD 1.x or "
        f"{OPENCLIP_PREFIX}* for SD 2.x)")


def xl_text_prefixes(sd: Mapping) -> dict[str, str]:
    """{"text_encoder": CLIP prefix (base only), "text_encoder_2": OpenCLIP prefix} of an SDXL file."""
    clip = XL_CLIP_PREFIX + xl_clip_inner(sd)
    has_clip = any(k.startswith(XL_CLIP_PREFIX) for k in sd)
    if has_clip:
        return {"text_encoder": clip, "text_encoder_2": XL_PREFIX + "1.model."}
    return {"text_encoder_2": XL_PREFIX + "0.model."}


def xl_clip_inner(sd: Mapping) -> str:
    return "text_model." if any(k.startswith(XL_CLIP_PREFIX + "text_model.") for k in sd) else ""


def xl_configs(sd: Mapping[str, np.ndarray], prediction_type: str = "epsilon") -> dict[str, dict]:
    """The configs of an SDXL single file: {"unet", "vae", "text_encoder" (base only),
    "text_encoder_2", "scheduler", "options"} (options as `convert/folder.py`'s)."""
    prefixes = xl_text_prefixes(sd)
    texts = {part: (_clip_config(sd, p) if part == "text_encoder" else _openclip_config(sd, p, drop_last=False))
             for part, p in prefixes.items()}
    refiner = "text_encoder" not in texts
    unet = unet_config(sd, prediction_type)
    label = _need(sd, UNET_PREFIX + "label_emb.0.0.weight", "SDXL U-Net")            # [4C, n * T + P]
    pooled, ids = texts["text_encoder_2"]["projection_dim"], 5 if refiner else 6
    per_id, rest = divmod(int(label.shape[1]) - pooled, ids)
    if rest or per_id <= 0:
        raise CheckpointError(f"single-file SDXL U-Net: label_emb takes {label.shape[1]} features, not the "
                              f"projection's {pooled} + {ids} time ids x a sinusoid width")
    unet.update(sample_size=128, upcast_attention=False, addition_embed_type="text_time",
                addition_time_embed_dim=per_id, projection_class_embeddings_input_dim=int(label.shape[1]))
    vae = dict(vae_config(sd), scaling_factor=XL_VAE_SCALING_FACTOR, force_upcast=True)
    scheduler = dict(scheduler_config(sd, prediction_type), _class_name="EulerDiscreteScheduler",
                     interpolation_type="linear", use_karras_sigmas=False)
    options = {"xl": True, "force_zeros_for_empty_prompt": not refiner, "requires_aesthetics_score": refiner,
               "force_upcast": True}
    return {"unet": unet, "vae": vae, **texts, "scheduler": scheduler, "options": options}


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
    warnings.warn(JaxdiffWarning(
        f"this checkpoint was trained with {betas.size} betas from {betas[0]:.6g} to "
        f"{betas[-1]:.6g}, not Stable Diffusion's scaled_linear 0.00085..0.012; its scheduler "
        "config uses them as trained_betas"), stacklevel=3)
    config.update(num_train_timesteps=int(betas.size), trained_betas=betas.tolist())
    return config
