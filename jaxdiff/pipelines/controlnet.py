"""ControlNet for the Stable Diffusion front end, as diffusers' `StableDiffusionControlNetPipeline`
(and its `MultiControlNetModel`: the residuals of several ControlNets are summed) and, for SDXL,
`StableDiffusionXLControlNetPipeline`: an SDXL ControlNet reads the U-Net's micro-conditioning
(text_embeds, time_ids; with guess mode, the conditional half's only), and original_size defaults
to the control image's size, which is also the output size when height / width are not given.

    pipe = jaxdiff.StableDiffusion.from_pretrained(folder, controlnet="controlnet-canny")   # or [paths]
    images = pipe("a bird", control_image=edges, controlnet_conditioning_scale=0.8,
                  control_guidance_start=0.0, control_guidance_end=0.6, guess_mode=False)

The options (`OPTIONS`; every call of the pipeline, img2img and inpaint included, takes them):

    control_image: one per ControlNet (a list when there are several): a PIL image or a list of
        them, or an array [H, W, C] / [B, H, W, C] of floats in [0, 1] or uint8; B is 1 (shared
        by all N images) or the number of prompts (each repeated num_images times). It is
        resized to height x width (PIL: Lanczos; arrays: nearest, as diffusers), and when
        height / width are not given they are the control image's.
    controlnet_conditioning_scale: the residuals' weight, one number or one per ControlNet (1.0).
    control_guidance_start / control_guidance_end: the fractions of the run's model calls during
        which each ControlNet applies (0.0 / 1.0): call i of n is controlled when
        start <= i / n and (i + 1) / n <= end (diffusers' `controlnet_keep`).
    guess_mode: diffusers' guess mode: the residuals weighted 0.1 .. 1 from shallow to deep, and
        none on the unconditional half of guidance (on by itself for pooling ControlNets).

How it enters the one sampling core: the network becomes `controlled` (below) on the parameters
{"base": the U-Net's, "controlnets": (one tree per ControlNet)}, and every per-call input is a
traced leaf of the conditioning, so a new image, scale, window or guess mode reuses the compiled
loop:

    cond["control"]         (K arrays [N, H, W, C_k] in [0, 1], one per ControlNet)
    cond["control_scale"]   [N, K, R]: each residual's weight (R = encoder activations + 1)
    cond["control_window"]  [N, K, 2]: the timesteps (lo, hi) a ControlNet applies between

The window is the start / end fractions turned into the timesteps of the first and last
controlled call of the plan (halfway to their uncontrolled neighbours), so the network, which
sees only the timestep t, applies a ControlNet when lo <= t <= hi. For one-call-per-step samplers
(DDIM, Euler, DPM-Solver++, UniPC, ...) this is exactly diffusers' per-step rule; for samplers
that call the network twice at one level (Heun, PNDM's warm-up) it is the same rule by noise level.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import sharding as sharding_lib
from jaxdiff.convert import controlnet as controlnet_convert
from jaxdiff.errors import CheckpointError
from jaxdiff.models.controlnet import guess_mode_scales
from jaxdiff.pipelines import core

OPTIONS = ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
           "guess_mode")
KEYS = ("control", "control_scale", "control_window")   # the conditioning entries the ControlNets read
_FAR = 1e9   # a timestep bound no call reaches


# --------------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------------

def controlled(base, controlnets, params, x, t, cond):
    """`base(params["base"], x, t, cond)` with the residuals of `controlnets` added: each
    ControlNet runs on x and the conditioning's context (and SDXL's text_embeds / time_ids),
    weighted per row and residual by cond["control_scale"] where t lies in its
    cond["control_window"]; their residuals are summed and reach the U-Net as
    cond["down_residuals"] / cond["mid_residual"]. x: [B, h, w, C]."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))                  # [B]
    extra = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    down = mid = None
    for k, (net, p) in enumerate(zip(controlnets, params["controlnets"])):
        lo, hi = cond["control_window"][:, k, 0], cond["control_window"][:, k, 1]     # [B]
        scale = cond["control_scale"][:, k] * ((t >= lo) & (t <= hi))[:, None]        # [B, R]
        d, m = _residuals(net, p, x, t, cond["control"][k], cond["context"], scale, extra)
        down = d if down is None else [u + v for u, v in zip(down, d)]
        mid = m if mid is None else mid + m
    rest = {k: v for k, v in cond.items() if k not in KEYS}
    return base(params["base"], x, t, {**rest, "down_residuals": down, "mid_residual": mid})


def _residuals(net, params, x, t, image, context, scale, extra):
    """One ControlNet's (down residuals, mid residual); zeros without running it when every
    weight is 0 (outside its guidance window, or at scale 0)."""
    def run(scale):
        return net.apply({"params": params}, x, t, image, context=context, scale=scale, **extra)

    def skip(scale):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, scale))

    return jax.lax.cond(jnp.any(scale != 0), run, skip, scale)


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------

def attach(pipe, paths: str | os.PathLike | Sequence[str | os.PathLike], dtype=jnp.float32) -> None:
    """Load the ControlNet folder(s) `paths` for `pipe` (a `StableDiffusion`): sets
    `pipe.controlnets` (the modules) and `pipe.params["controlnets"]` (laid out like the rest).
    Raises CheckpointError for a folder that is missing, unreadable, or made for another U-Net."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("controlnet= must be a ControlNet folder or a non-empty list of them")
    modules, trees = [], []
    for path in paths:
        module, params = controlnet_convert.load(path, dtype)
        unet = pipe.unet
        for field in ("base_channels", "channel_mult", "num_res_blocks", "context_dim", "addition_embed_dim"):
            if getattr(module, field) != getattr(unet, field):
                raise CheckpointError(f"the ControlNet in {os.fspath(path)} has {field}={getattr(module, field)} but "
                                      f"the U-Net has {getattr(unet, field)}; use a ControlNet made for this model")
        if module.control_factor != pipe.vae_scale_factor:
            raise CheckpointError(f"the ControlNet in {os.fspath(path)} reads control images {module.control_factor}x "
                                  f"the latent size, but this VAE's factor is {pipe.vae_scale_factor}")
        modules.append(module)
        trees.append(params)
    trees = tuple(trees)
    pipe.params["controlnets"] = sharding_lib.place(trees, sharding_lib.tree_shardings(trees, pipe.mesh, pipe.rules))
    pipe.controlnets = tuple(modules)


@functools.cache
def controlled_network(base, controlnets: tuple):
    """`controlled` for the base network `base` and `controlnets`: one function object per pair,
    so that it is a stable jit cache key (see `core`)."""
    return functools.partial(controlled, base, controlnets)


# --------------------------------------------------------------------------------------------
# Options.
# --------------------------------------------------------------------------------------------

def split_options(kwargs: dict) -> tuple[dict, dict]:
    """(the other keyword arguments, the ControlNet ones); height / width default to the size of
    the (first) control image, as diffusers'."""
    control = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in OPTIONS}
    image = control.get("control_image")
    if image is not None and (rest.get("height") is None or rest.get("width") is None):
        first = image[0] if isinstance(image, (list, tuple)) and image else image
        first = first[0] if isinstance(first, (list, tuple)) and first else first
        size = getattr(first, "size", None)
        if size is not None and not isinstance(first, np.ndarray):   # PIL: (width, height)
            h, w = size[1], size[0]
        elif np.ndim(first) in (3, 4):
            h, w = np.shape(first)[-3:-1]
        else:
            h = w = None
        if h is not None:
            rest.setdefault("height", None)
            rest.setdefault("width", None)
            rest["height"] = rest["height"] or int(h)
            rest["width"] = rest["width"] or int(w)
    return rest, control


def _per_net(name: str, value, k: int, default) -> list:
    value = default if value is None else value
    values = list(value) if isinstance(value, (list, tuple)) else [value] * k
    if len(values) != k:
        raise ValueError(f"{name} has {len(values)} values for {k} ControlNet(s); give one number or one per ControlNet")
    return [core.check_scale(name, v) for v in values]


def _nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[B, h, w, C] -> [B, height, width, C], nearest neighbour (torch's `interpolate` default)."""
    rows = np.minimum(np.floor(np.arange(height) * np.float32(x.shape[1] / height)).astype(int), x.shape[1] - 1)
    cols = np.minimum(np.floor(np.arange(width) * np.float32(x.shape[2] / width)).astype(int), x.shape[2] - 1)
    return x[:, rows][:, :, cols]


def read_control(image, channels: int, height: int, width: int, prompts: int, num_images: int,
                 which: str = "control_image") -> np.ndarray:
    """One ControlNet's control image(s) -> float32 [prompts * num_images, height, width, channels]
    in [0, 1] (see the module docstring for the forms accepted)."""
    from PIL import Image

    pil = [image] if isinstance(image, Image.Image) else image if (
        isinstance(image, (list, tuple)) and image and all(isinstance(p, Image.Image) for p in image)) else None
    if pil is not None:
        pil = [p.convert("RGB" if channels == 3 else "L") for p in pil]
        pil = [p if p.size == (width, height) else p.resize((width, height), Image.LANCZOS) for p in pil]
        x = np.stack([np.asarray(p, np.float32).reshape(height, width, -1) / 255.0 for p in pil])
    else:
        try:
            x = np.asarray(image)
        except (TypeError, ValueError):
            x = np.asarray(None)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != channels or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise ValueError(f"{which} must be a PIL image, a list of them, or an array [H, W, {channels}] / "
                             f"[B, H, W, {channels}] (NHWC) of floats in [0, 1] or uint8, got "
                             f"{type(image).__name__} of shape {list(np.shape(x))}")
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        x = x.astype(np.float32)
        if x.size and (not np.all(np.isfinite(x)) or x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ValueError(f"{which} values must lie in [0, 1] (floats) or 0..255 (uint8), got "
                             f"{x.min():.3g}..{x.max():.3g}")
        x = _nearest(np.clip(x, 0.0, 1.0), height, width)
    b = x.shape[0]
    if b not in (1, prompts):
        raise ValueError(f"{which} has {b} images for {prompts} prompt(s); give one image, or one per prompt")
    return np.repeat(x, prompts * num_images // b, axis=0)                            # [N, H, W, C]


def _plan_window(plan, start: float, end: float) -> tuple[float, float]:
    """(lo, hi): the timesteps between which the calls i of the run with start <= i / n and
    (i + 1) / n <= end lie (halfway to the neighbouring calls' timesteps)."""
    state = plan.plan
    ts = np.asarray(state.timesteps, np.float64)[int(state.index):int(state.num_calls)]   # the run's calls
    n = len(ts)
    kept = [i for i in range(n) if not (i / n < start or (i + 1) / n > end)]
    if not kept:
        return _FAR, -_FAR
    a, b = kept[0], kept[-1]
    hi = _FAR if a == 0 else (ts[a - 1] + ts[a]) / 2
    lo = -_FAR if b == n - 1 else (ts[b] + ts[b + 1]) / 2
    return lo, hi


def wire(pipe, opts, plan, network, params, cond: dict, uncond: dict | None, height: int, width: int):
    """(network, params, cond, uncond) of a call of `pipe` with options `opts` (`GenerateOptions`:
    its `control` dict and num_images): the base network and params as they are when the pipeline
    has no ControlNet, else the controlled network with the ControlNet inputs added to cond /
    uncond."""
    control, num_images = opts.control, opts.num_images
    nets = getattr(pipe, "controlnets", ())
    if not nets:
        if control:
            raise ValueError(f"{', '.join(control)} need(s) a ControlNet: load one with "
                             "StableDiffusion.from_pretrained(folder, controlnet=PATH)")
        return network, params, cond, uncond
    k = len(nets)
    images = control.get("control_image")
    if images is None:
        raise ValueError(f"this pipeline has {k} ControlNet(s); pass control_image= (one per ControlNet)")
    if k > 1 and not (isinstance(images, (list, tuple)) and len(images) == k):
        n_given = len(images) if isinstance(images, (list, tuple)) else 1
        raise ValueError(f"control_image must be a list of {k} images (one per ControlNet), got {n_given}")
    images = list(images) if k > 1 else [images]
    scales = _per_net("controlnet_conditioning_scale", control.get("controlnet_conditioning_scale"), k, 1.0)
    starts = _per_net("control_guidance_start", control.get("control_guidance_start"), k, 0.0)
    ends = _per_net("control_guidance_end", control.get("control_guidance_end"), k, 1.0)
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"control_guidance_start={s:g} and control_guidance_end={e:g} must satisfy "
                             "0 <= start < end <= 1")
    guess = bool(control.get("guess_mode", False)) or nets[0].global_pool_conditions
    n = cond["context"].shape[0]
    prompts = n // num_images
    pictures = tuple(read_control(img, net.conditioning_channels, height, width, prompts, num_images,
                                  "control_image" if k == 1 else f"control_image[{i}]")
                     for i, (img, net) in enumerate(zip(images, nets)))
    r = nets[0].num_residuals
    profile = guess_mode_scales(r) if guess and not nets[0].global_pool_conditions else np.ones(r, np.float32)
    scale = np.broadcast_to(np.asarray(scales, np.float32)[:, None] * profile, (n, k, r)).copy()   # [N, K, R]
    window = np.broadcast_to(np.asarray([_plan_window(plan, s, e) for s, e in zip(starts, ends)], np.float32),
                             (n, k, 2)).copy()                                                      # [N, K, 2]
    cond = {**cond, "control": pictures, "control_scale": scale, "control_window": window}
    if uncond is not None:
        uncond = {**uncond, "control": pictures, "control_scale": scale * (not guess), "control_window": window}
    return controlled_network(network, nets), {"base": params, "controlnets": pipe.params["controlnets"]}, cond, uncond

