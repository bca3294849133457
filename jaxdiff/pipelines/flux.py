"""Flux.1 text-to-image (Black Forest Labs 2024) from a diffusers-format folder.

    pipe = jaxdiff.pipelines.flux.Flux.from_pretrained("FLUX.1-dev")          # a local folder
    images = pipe("a photo of a cat", num_steps=28, guidance_scale=3.5, seed=0)
    images = pipe("a cat", negative_prompt="blurry", true_cfg_scale=4.0)     # real CFG

The folder is what `diffusers.FluxPipeline.save_pretrained(..., safe_serialization=True)`
writes: `model_index.json`, `transformer/` (convert/flux.py), `vae/` (a 16-channel
AutoencoderKL with a shift_factor), `text_encoder/` (CLIP ViT-L text tower: only its pooled
output is used), `tokenizer/`, `text_encoder_2/` (T5-XXL encoder: per-token states),
`tokenizer_2/` and `scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler).

A thin front end of the sampling core (`pipelines/core.py`). For N = len(prompts) * num_images
images of H x W pixels (multiples of 2f, f the VAE factor) it makes

    CLIP(prompt) -> pooled [N, P];  T5(prompt) -> context [N, S, D] (S = max_sequence_length)
    guidance [N] (guidance-distilled "dev" models: the guidance value is a network input)
    the flow plan: sigmas linspace(1, 1/n, n), bent by the schedule's shift, or with dynamic
    shifting by mu = base_shift + (max_shift - base_shift) (L - L_base) / (L_max - L_base),
    L = H/2f * W/2f image tokens (diffusers' `calculate_shift`)

and the core samples NHWC latents [N, H/f, W/f, C] from noise. The network call packs each 2x2
latent patch into one token (`models.flux.pack`), hands the transformer t / 1000 = sigma (as
FluxPipeline does), and unpacks the velocity. Decoding: VAE.decode(latents / scaling_factor +
shift_factor).

Guidance: a dev model takes `guidance_scale` as an input and runs one network call per step; a
schnell-like model (no guidance embedding) ignores it. `true_cfg_scale > 1` with a negative
prompt runs classifier-free guidance through the core (one batched call on [negative; prompt],
v = v_neg + s (v_pos - v_neg)), as FluxPipeline's `true_cfg_scale`.

Compilation: parameters, text states, pooled vectors, guidance values, noise and the CFG scale
are traced leaves; plans are padded to `max_steps`; so new prompts, seeds, guidance values and
step counts up to max_steps reuse one compiled loop. A new size, batch or max_sequence_length
compiles anew (the plan's mu depends on the size, but it is data too).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler, samplers, schedules
from jaxdiff import images as images_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import flux as flux_convert
from jaxdiff.convert import scheduler as scheduler_convert
from jaxdiff.convert import t5 as t5_convert
from jaxdiff.convert import tensors
from jaxdiff.convert import vae as vae_convert
from jaxdiff.errors import CheckpointError, JaxdiffWarning
from jaxdiff.models import flux as flux_lib
from jaxdiff.models import vae as vae_lib
from jaxdiff.models.t5_tokenizer import T5Tokenizer
from jaxdiff.models.tokenizer import CLIPTokenizer
from jaxdiff.pipelines import core
from jaxdiff.pipelines import options as options_lib
from jaxdiff.pipelines import prompts as prompts_lib

DEFAULT_MAX_STEPS = 50
DEFAULT_SAMPLE_SIZE = 128          # latent pixels per side (FluxPipeline's default_sample_size)
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"


# --------------------------------------------------------------------------------------------
# Options.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FluxOptions:
    """The keyword arguments of `Flux.__call__`, checked once (`parse`).

    num_steps: sampler steps. sampler: a jaxdiff sampler name (default: the folder's, flow_euler); other
        keyword arguments are its options (they override the plan's sigmas / mu).
    guidance_scale: the guidance value of a guidance-distilled model (ignored without one).
    true_cfg_scale: classifier-free guidance scale, used when > 1 and a negative prompt is given.
    seed, num_images, height, width (pixels, multiples of 2f), output_type, progress: as
        Stable Diffusion's. latents: standard-normal NHWC noise [N, H/f, W/f, C] (unpacked).
    max_sequence_length: T5 tokens per prompt (512 for dev, 256 is schnell's usual).
    """

    num_steps: int = 28
    sampler: str | None = None
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    latents: Any = None
    output_type: str = "pil"
    max_sequence_length: int = 512
    progress: bool = False
    sampler_options: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, kwargs: dict) -> FluxOptions:
        kwargs, renamed = options_lib.take_aliases(kwargs)
        kwargs.update(renamed)
        names = {f.name for f in dataclasses.fields(cls)} - {"sampler_options"}
        extra = {k: v for k, v in kwargs.items() if k not in names}
        opts = cls(**{k: v for k, v in kwargs.items() if k in names}, sampler_options=extra)
        options_lib.check_steps(opts.num_steps)
        core.check_scale("guidance_scale", opts.guidance_scale)
        core.check_scale("true_cfg_scale", opts.true_cfg_scale)
        options_lib.check_count("num_images", opts.num_images)
        options_lib.check_count("max_sequence_length", opts.max_sequence_length)
        if isinstance(opts.seed, bool) or not isinstance(opts.seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer, got {opts.seed!r}")
        for name in ("height", "width"):
            if getattr(opts, name) is not None:
                options_lib.check_count(name, getattr(opts, name), "a positive integer number of pixels")
        images_lib.check_output_type(opts.output_type)
        return opts


# --------------------------------------------------------------------------------------------
# Network calls (module-level so that each pipeline's partials are stable jit cache keys).
# --------------------------------------------------------------------------------------------

def _transformer(module, params, x, t, cond):
    """The velocity [B, h, w, C] at latents x [B, h, w, C] (NHWC) and timesteps t [B] on the
    training scale; cond: {"context": [B, S, D], "pooled": [B, P], "guidance": [B] (dev)}."""
    _, h, w, _ = x.shape
    tokens = flux_lib.pack(x)                                          # [B, h/2 * w/2, 4C]
    v = module.apply({"params": params}, tokens, t.astype(jnp.float32) / flux_lib.TIME_SCALE,
                     cond["context"], cond["pooled"], flux_lib.image_ids(h // 2, w // 2),
                     flux_lib.text_ids(cond["context"].shape[1]), cond.get("guidance"))
    return flux_lib.unpack(v, h, w)                                    # [B, h, w, C]


def _encode_text(clip, t5, clip_params, t5_params, clip_ids, t5_ids):
    """(T5 states [P, S, D], CLIP pooled [P, P']) float32 of token ids [P, 77] and [P, S]."""
    pooled = clip.apply({"params": clip_params}, clip_ids).pooled
    context = t5.apply({"params": t5_params}, t5_ids)
    return context.astype(jnp.float32), pooled.astype(jnp.float32)


def _decode(vae, params, latents):
    """Scaled latents [B, h, w, C] -> images [B, H, W, 3] in [-1, 1] (float32)."""
    return vae_lib.decode_latents(vae, params, latents, float32=False).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# The pipeline.
# --------------------------------------------------------------------------------------------

class Flux:
    """A Flux.1 model: transformer, VAE, CLIP and T5 text encoders, their tokenizers, and the
    flow schedule.

    Attributes: `transformer`, `vae`, `text_encoder` (CLIP), `text_encoder_2` (T5) (flax
    modules), `params` (dict "transformer", "vae", "text_encoder", "text_encoder_2", laid out on
    `mesh` by `rules`), `tokenizer`, `tokenizer_2`, `schedule` (`schedules.FlowSchedule`),
    `scheduler_config`, `default_sampler`, `max_steps`, `mesh`, `rules`.
    """

    def __init__(self, *, transformer, vae, text_encoder, text_encoder_2, params: dict, tokenizer, tokenizer_2,
                 scheduler_config: dict, max_steps: int = DEFAULT_MAX_STEPS, vae_float32: bool = True,
                 devices=None, mesh=None, rules: str = "dp"):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler_config = dict(scheduler_config)
        kind = self.scheduler_config.get("_class_name")
        if kind not in scheduler_convert.FLOW_SCHEDULERS:
            raise CheckpointError(f"scheduler {kind!r} is not a flow-matching scheduler; a Flux model samples with "
                                  f"{' or '.join(scheduler_convert.FLOW_SCHEDULERS)}")
        self.schedule = scheduler_convert.schedule_from_config(self.scheduler_config)
        self.default_sampler = scheduler_convert.default_sampler(self.scheduler_config)
        self.max_steps = int(max_steps)
        self.mesh = sharding_lib.inference_mesh(rules, devices) if mesh is None else mesh
        self.rules = rules
        self.params = sharding_lib.place(params, sharding_lib.tree_shardings(params, self.mesh, rules))
        coder = vae.clone(dtype=jnp.float32) if vae_float32 else vae
        # One function object each per pipeline, so repeated calls hit jit's caches.
        self._network = functools.partial(_transformer, transformer)
        self._text_fn = compiler.jit(functools.partial(_encode_text, text_encoder, text_encoder_2))
        self._decode_fn = compiler.jit(functools.partial(_decode, coder))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=jnp.float32, *, max_steps: int = DEFAULT_MAX_STEPS,
                        vae_float32: bool = True, progress: bool = False, devices=None, mesh=None,
                        rules: str = "dp", variant: str | None = None) -> Flux:
        """Load a diffusers Flux folder (see the module docstring).

        dtype: compute dtype of the transformer and the text encoders (parameters are float32
            whatever the files hold); the VAE decodes in float32 unless vae_float32=False.
        max_steps, mesh / devices / rules, variant: as `StableDiffusion.from_pretrained`.
        Raises `CheckpointError` naming the missing or unreadable part.
        """
        from tqdm.auto import tqdm

        path = os.fspath(path)
        check_folder(path)
        parts: dict[str, Any] = {}
        bar = tqdm(PARTS, desc="load", unit="part", disable=not progress)
        for part in bar:
            bar.set_postfix_str(part)
            folder = tensors.inside(path, part)
            if part == "transformer":
                parts[part] = flux_convert.load(folder, dtype, variant=variant)
            elif part == "vae":
                parts[part] = vae_convert.load(folder, dtype, variant=variant)
            elif part == "text_encoder":
                parts[part] = clip_convert.load(folder, dtype, variant=variant)
            elif part == "text_encoder_2":
                parts[part] = t5_convert.load(folder, dtype, variant=variant)
            elif part == "tokenizer":
                parts[part] = CLIPTokenizer.from_dir(folder)
            elif part == "tokenizer_2":
                parts[part] = T5Tokenizer.from_dir(folder)
            else:
                parts[part] = tensors.read_json(tensors.inside(folder, SCHEDULER_CONFIG))
                scheduler_convert.warn_unsupported(parts[part])
        bar.close()
        _check_widths(path, parts)
        nets = ("transformer", "vae", "text_encoder", "text_encoder_2")
        return cls(**{k: parts[k][0] for k in nets}, params={k: parts[k][1] for k in nets},
                   tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"],
                   scheduler_config=parts["scheduler"], max_steps=max_steps, vae_float32=vae_float32,
                   devices=devices, mesh=mesh, rules=rules)

    # ----------------------------------------------------------------------------------------
    # Sizes.

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def guidance_embeds(self) -> bool:
        return self.transformer.guidance_embeds

    def _size(self, height, width) -> tuple[int, int]:
        return options_lib.check_size(height, width, multiple=2 * self.vae_scale_factor,
                                      default=DEFAULT_SAMPLE_SIZE * self.vae_scale_factor,
                                      why=f"twice the VAE factor {self.vae_scale_factor}: 2x2 latent patches")

    # ----------------------------------------------------------------------------------------
    # Text.

    def encode_prompt(self, prompt: str | Sequence[str], *, num_images: int = 1,
                      max_sequence_length: int = 512) -> dict[str, np.ndarray]:
        """{"context": T5 states [N, S, D], "pooled": CLIP pooled [N, P]}, host float32, N =
        len(prompts) * num_images, each prompt's rows consecutive."""
        prompts = prompts_lib.as_list(prompt)
        clip_ids = jnp.asarray(self.tokenizer(prompts))
        t5_ids = jnp.asarray(self.tokenizer_2(prompts, max_length=int(max_sequence_length)).input_ids)
        context, pooled = sharding_lib.gather(self._text_fn(self.params["text_encoder"],
                                                            self.params["text_encoder_2"], clip_ids, t5_ids))
        rep = int(num_images)
        return {"context": np.repeat(np.asarray(context, np.float32), rep, axis=0),
                "pooled": np.repeat(np.asarray(pooled, np.float32), rep, axis=0)}

    # ----------------------------------------------------------------------------------------
    # Sampling.

    def mu(self, height: int, width: int) -> float:
        """The dynamic-shift mu of height x width images (diffusers' `calculate_shift`)."""
        f = 2 * self.vae_scale_factor
        return schedules.flow_mu(self.schedule, (height // f) * (width // f))

    def plan(self, name: str | None, num_steps: int, height: int, width: int, options: dict | None = None):
        """The sampler of a call: `name` (default: the folder's scheduler, flow_euler) with the
        scheduler config's options, on FluxPipeline's sigmas linspace(1, 1/n, n) (unless the config
        sets use_flow_sigmas) and, with dynamic shifting, its mu for this size, for the samplers
        taking them; `options` over them; padded to `max_steps`."""
        name = name or self.default_sampler
        if name not in samplers.names():
            raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(samplers.names())}")
        num_steps = options_lib.check_steps(num_steps)
        valid = samplers.options(name)
        opts = scheduler_convert.sampler_options(name, self.scheduler_config)
        if "sigmas" in valid and not self.scheduler_config.get("use_flow_sigmas", False):
            opts["sigmas"] = np.linspace(1.0, 1.0 / num_steps, num_steps)
        if "mu" in valid and self.schedule.use_dynamic_shifting:
            opts["mu"] = self.mu(height, width)
        opts.update(options or {})
        return samplers.get(name, self.schedule, num_steps, max_steps=max(self.max_steps, num_steps), **opts)

    def _peak_bytes(self, height: int, width: int, guided: bool):
        """A lower bound of one transformer call's memory per row: the token activations and,
        off GPU, one layer's [heads, L, L] float32 attention logits."""
        f = 2 * self.vae_scale_factor
        m = self.transformer
        tokens = (height // f) * (width // f)
        act = 3 * tokens * m.width * jnp.dtype(m.dtype).itemsize
        logits = 0 if jax.default_backend() == "gpu" else m.num_heads * tokens * tokens * 4
        factor = 2 if guided else 1
        return lambda rows: factor * rows * (act + logits)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 **options: Any):
        """Text to image. prompt: one string or a list; negative_prompt: the unconditional text of
        true classifier-free guidance (used when true_cfg_scale > 1). options: `FluxOptions`
        (num_steps=28, guidance_scale=3.5, true_cfg_scale=1.0, seed, num_images, height, width,
        sampler, latents, output_type="pil", max_sequence_length=512, progress) and sampler
        options. Returns what `core.run` returns for `output_type`."""
        opts = FluxOptions.parse(options)
        height, width = self._size(opts.height, opts.width)
        prompts = prompts_lib.as_list(prompt)
        n = len(prompts) * opts.num_images
        cfg = opts.true_cfg_scale > 1 and negative_prompt is not None
        if opts.true_cfg_scale > 1 and negative_prompt is None:
            warnings.warn(JaxdiffWarning("true_cfg_scale > 1 has no effect without a negative_prompt"), stacklevel=2)
        f = self.vae_scale_factor
        shape = (height // f, width // f, self.latent_channels)
        peak = self._peak_bytes(height, width, cfg)
        core.check_memory(self.mesh, n, shape, image_shape=(height, width, 3), peak_bytes=peak)
        plan = self.plan(opts.sampler, opts.num_steps, height, width, opts.sampler_options)
        cond = self.encode_prompt(prompts, num_images=opts.num_images, max_sequence_length=opts.max_sequence_length)
        uncond = None
        if cfg:
            negatives = prompts_lib.as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one string per "
                                 "prompt, or a single string")
            uncond = self.encode_prompt(negatives, num_images=opts.num_images,
                                        max_sequence_length=opts.max_sequence_length)
        if self.guidance_embeds:
            for c in (cond, uncond):
                if c is not None:
                    c["guidance"] = np.full((n,), opts.guidance_scale, np.float32)
        job = core.Job(network=self._network, params=self.params["transformer"], sampler=plan, shape=shape, num=n,
                       seed=opts.seed, cond=cond, uncond=uncond, guidance_scale=opts.true_cfg_scale if cfg else None,
                       noise=None if opts.latents is None else np.asarray(opts.latents, np.float32),
                       decode=functools.partial(self._decode_fn, self.params["vae"]),
                       image_shape=(height, width, 3), peak_bytes=peak)
        return core.run(job, self.mesh, output_type=opts.output_type, progress=opts.progress)

    generate = __call__


# --------------------------------------------------------------------------------------------
# Reading a folder.
# --------------------------------------------------------------------------------------------

def check_folder(path: str) -> None:
    """Raise CheckpointError unless `path` is a diffusers Flux folder with every part."""
    if not os.path.isdir(path):
        raise CheckpointError(f"Flux folder not found: {path} (jaxdiff reads local diffusers-format folders only)")
    if not os.path.isfile(os.path.join(path, MODEL_INDEX)):
        raise CheckpointError(f"{path} has no {MODEL_INDEX}: expected a diffusers Flux folder with "
                              f"{', '.join(p + '/' for p in PARTS)}")
    index = tensors.read_json(tensors.inside(path, MODEL_INDEX), what="a pipeline index object")
    if "transformer" not in index or "text_encoder_3" in index:
        raise CheckpointError(f"{path} is a {index.get('_class_name', 'different')} folder, not a Flux one "
                              "(transformer, CLIP text_encoder, T5 text_encoder_2)")
    for part in PARTS:
        if not os.path.isdir(tensors.inside(path, part)):
            raise CheckpointError(f"{path} has no {part}/ folder; a Flux folder needs "
                                  f"{', '.join(p + '/' for p in PARTS)}")
    if not os.path.isfile(os.path.join(path, "scheduler", SCHEDULER_CONFIG)):
        raise CheckpointError(f"{os.path.join(path, 'scheduler')} has no {SCHEDULER_CONFIG}")


def _check_widths(path: str, parts: dict) -> None:
    """The transformer must take what the encoders and the VAE give; one CheckpointError naming
    both numbers otherwise."""
    transformer = parts["transformer"][0]
    clip, t5, vae = parts["text_encoder"][0], parts["text_encoder_2"][0], parts["vae"][0]
    if clip.hidden_size != transformer.pooled_dim:
        raise CheckpointError(f"the transformer's pooled_projection_dim={transformer.pooled_dim} does not match "
                              f"text_encoder's hidden_size={clip.hidden_size} in {path}")
    if t5.hidden_size != transformer.context_dim:
        raise CheckpointError(f"the transformer's joint_attention_dim={transformer.context_dim} does not match "
                              f"text_encoder_2's hidden_size={t5.hidden_size} in {path}")
    if 4 * vae.latent_channels != transformer.in_channels:
        raise CheckpointError(f"the transformer's in_channels={transformer.in_channels} is not 4 x the VAE's "
                              f"latent_channels={vae.latent_channels} (2x2 packed patches) in {path}")
