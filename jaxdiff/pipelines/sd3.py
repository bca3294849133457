"""Stable Diffusion 3 / 3.5 text-to-image (Esser et al. 2024) from a diffusers-format folder.

    pipe = StableDiffusion3.from_pretrained("stable-diffusion-3-medium-diffusers")  # a local folder
    pipe = jaxdiff.from_pretrained("stable-diffusion-3-medium-diffusers")           # the same, dispatched
    images = pipe("a photo of a cat", num_steps=28, guidance_scale=7.0, seed=0, num_images=2)

The folder is what `diffusers.StableDiffusion3Pipeline.save_pretrained(..., safe_serialization=True)`
writes: `model_index.json`, `transformer/` (an MMDiT, `convert/sd3.py`), `vae/` (a 16-channel
AutoencoderKL with shift_factor), `text_encoder/` and `text_encoder_2/` (CLIPTextModelWithProjection,
CLIP ViT-L and OpenCLIP bigG) with `tokenizer/` and `tokenizer_2/`, optionally `text_encoder_3/`
(T5 v1.1 XXL encoder) with `tokenizer_3/`, and `scheduler/scheduler_config.json`
(FlowMatchEulerDiscreteScheduler: shift). Weights are read from safetensors only.

Prompt embedding (diffusers' `StableDiffusion3Pipeline.encode_prompt`), for P prompts:

    c_i = CLIP_i hidden states before the last layer (clip_skip k: k layers earlier)  [P, 77, D_i]
    p_i = CLIP_i projected pooled output                                              [P, P_i]
    t5  = T5 last hidden state [P, L, D_t5] (L = max_sequence_length), zeros without a T5
    context = concat_seq(pad_features(concat_feat(c_1, c_2), D_t5), t5)               [P, 77 + L, D_t5]
    pooled  = concat_feat(p_1, p_2)                                                   [P, P_1 + P_2]

The negative prompt (default "") is embedded the same way at full depth; N = P * num_images rows,
each prompt's consecutive. A thin front end of the sampling core (`pipelines/core.py`): the
transformer predicts the flow velocity at t = sigma * 1000; classifier-free guidance (one batched
call on [uncond; cond]) runs when guidance_scale > 1; the sampler is the folder's scheduler
(flow_euler or flow_heun with its shift and options, `convert/scheduler.py`) unless `sampler=`
names another; images = VAE.decode(latents / scaling_factor + shift_factor).

Compilation: the parameters, the text embeddings, noise and guidance scale are traced leaves of
one jitted sampling loop (plans padded to `max_steps`), so new prompts, seeds, scales or step
counts up to max_steps reuse the compiled program. Devices and sharding as `StableDiffusion`
(`mesh`, `devices`, `rules`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler, samplers, schedules
from jaxdiff import images as images_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import scheduler as scheduler_convert
from jaxdiff.convert import sd3 as sd3_convert
from jaxdiff.convert import tensors
from jaxdiff.convert import vae as vae_convert
from jaxdiff.errors import CheckpointError
from jaxdiff.models import vae as vae_lib
from jaxdiff.pipelines import core
from jaxdiff.pipelines import options as options_lib
from jaxdiff.pipelines import prompts as prompts_lib

DEFAULT_MAX_STEPS = 50
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_CLASS = "StableDiffusion3Pipeline"
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")


# --------------------------------------------------------------------------------------------
# Network calls (module-level, so each pipeline's partials are stable jit cache keys).
# --------------------------------------------------------------------------------------------

def _transformer(module, params, x, t, cond):
    """The flow velocity. x: [B, h, w, C], t: [B] (sigma * 1000), cond: {"context": [B, S, D],
    "pooled": [B, P]}."""
    return module.apply({"params": params}, x, t, cond["context"], cond["pooled"])


def _encode_clip(modules, params, ids, skip: int):
    """(context [P, T, D_1 + D_2], pooled [P, P_1 + P_2]) float32 of both CLIP encoders: the
    hidden states `skip + 2` from the end (before the final LayerNorm) and the projected pooled
    outputs. ids: one [P, T] int array per encoder."""
    contexts, pooled = [], []
    for module, p, x in zip(modules, params, ids):
        out = module.apply({"params": p}, x, output_hidden_states=True)
        contexts.append(out.hidden_states[-(skip + 2)].astype(jnp.float32))       # [P, T, D_i]
        pooled.append(out.text_embeds.astype(jnp.float32))                         # [P, P_i]
    return jnp.concatenate(contexts, -1), jnp.concatenate(pooled, -1)


def _encode_t5(module, params, ids):
    """T5 last hidden state [P, L, D] float32 (no attention mask, as SD3 encodes)."""
    return jnp.asarray(module.apply({"params": params}, ids), jnp.float32)


def _decode(vae, params, latents):
    """Scaled latents [B, h, w, C] -> images [B, H, W, 3] in [-1, 1] (float32, unclipped)."""
    return vae_lib.decode_latents(vae, params, latents, float32=False).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Folders.
# --------------------------------------------------------------------------------------------

def _listed(index, part: str) -> bool:
    entry = index.get(part)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def check_folder(path: str) -> tuple[str, ...]:
    """Raise a one-line CheckpointError unless `path` is a diffusers SD3 pipeline folder with
    every part; returns the parts to read (PARTS, plus T5_PARTS when model_index.json lists a
    third text encoder)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"SD3 folder not found: {path} (jaxdiff reads local diffusers-format folders only)")
    if not os.path.isfile(os.path.join(path, MODEL_INDEX)):
        raise CheckpointError(f"{path} has no {MODEL_INDEX}: expected a diffusers {PIPELINE_CLASS} folder with "
                              f"{', '.join(p + '/' for p in PARTS)}")
    index = tensors.read_json(tensors.inside(path, MODEL_INDEX), what="a pipeline index object")
    name = index.get("_class_name")
    if "transformer" not in index or "text_encoder_2" not in index:
        missing = [p for p in ("transformer", "text_encoder_2") if p not in index]
        raise CheckpointError(f"{os.path.join(path, MODEL_INDEX)} ({name or 'no _class_name'}) lists no "
                              f"{' and no '.join(missing)}; a Stable Diffusion 3 folder has a transformer, two CLIP "
                              "text encoders and an optional T5")
    parts = PARTS + (T5_PARTS if _listed(index, "text_encoder_3") else ())
    for part in parts:
        if not os.path.isdir(os.path.join(path, part)):
            raise CheckpointError(f"{path} has no {part}/ folder; an SD3 folder needs "
                                  f"{', '.join(p + '/' for p in parts)}")
    if not os.path.isfile(os.path.join(path, "scheduler", SCHEDULER_CONFIG)):
        raise CheckpointError(f"{os.path.join(path, 'scheduler')} has no {SCHEDULER_CONFIG}")
    return parts


def _load_t5(folder: str, tokenizer_folder: str, dtype, variant: str | None):
    from jaxdiff.convert import t5 as t5_convert
    from jaxdiff.models import t5_tokenizer

    return t5_convert.load(folder, dtype, variant=variant), t5_tokenizer.T5Tokenizer.from_dir(tokenizer_folder)


def _flow_scheduler(config: dict) -> dict:
    """`config` (a scheduler_config.json) if it is a flow-matching scheduler's; one-line
    CheckpointError otherwise."""
    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name not in scheduler_convert.FLOW_SCHEDULERS:
        raise CheckpointError(f"the scheduler is a {name}; SD3 samples with a flow-matching scheduler "
                              f"({', '.join(scheduler_convert.FLOW_SCHEDULERS)})")
    return {**config, "_class_name": name}


# --------------------------------------------------------------------------------------------
# The pipeline.
# --------------------------------------------------------------------------------------------

class StableDiffusion3:
    """An SD3 / SD3.5 model: MMDiT transformer, VAE, two CLIP text encoders and an optional T5.

    Attributes: `transformer`, `vae`, `text_encoders` (the two CLIP modules), `tokenizers`, `t5`
    and `t5_tokenizer` (None without a third encoder), `params` (dict: "transformer", "vae",
    "text_encoder", "text_encoder_2" and "text_encoder_3" when there is a T5; laid out on `mesh`
    by `rules`), `schedule`, `scheduler_config`, `default_sampler`, `max_steps`, `mesh`, `rules`.
    """

    def __init__(self, *, transformer, vae, text_encoders: Sequence, tokenizers: Sequence, params: dict,
                 scheduler_config: dict, t5=None, t5_tokenizer=None, max_steps: int = DEFAULT_MAX_STEPS,
                 vae_float32: bool = True, devices=None, mesh=None, rules: str = "dp"):
        self.transformer, self.vae = transformer, vae
        self.text_encoders, self.tokenizers = tuple(text_encoders), tuple(tokenizers)
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        self.scheduler_config = _flow_scheduler(dict(scheduler_config))
        self.schedule = scheduler_convert.schedule_from_config(self.scheduler_config)
        self.default_sampler = scheduler_convert.default_sampler(self.scheduler_config)
        self.max_steps = int(max_steps)
        self.mesh = sharding_lib.inference_mesh(rules, devices) if mesh is None else mesh
        self.rules = rules
        self._check_widths()
        self.params = sharding_lib.place(params, sharding_lib.tree_shardings(params, self.mesh, rules))
        coder = vae.clone(dtype=jnp.float32) if vae_float32 else vae
        # One function object each per pipeline, so repeated calls hit jit's caches.
        self._network = functools.partial(_transformer, transformer)
        self._clip_fn = compiler.jit(functools.partial(_encode_clip, self.text_encoders), static_argnames="skip")
        self._t5_fn = None if t5 is None else compiler.jit(functools.partial(_encode_t5, t5))
        self._decode_fn = compiler.jit(functools.partial(_decode, coder))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=jnp.float32, *, max_steps: int = DEFAULT_MAX_STEPS,
                        vae_float32: bool = True, progress: bool = False, devices=None, mesh=None,
                        rules: str = "dp", variant: str | None = None,
                        attention_impl: str = "auto") -> StableDiffusion3:
        """Load a diffusers SD3 / SD3.5 folder (see the module docstring).

        dtype: compute dtype of the networks (parameters are float32 whatever the files hold).
        max_steps: plans are padded to this many steps (one compiled loop for any num_steps up to
            it). variant: e.g. "fp16" for `*.fp16.safetensors`. attention_impl: the transformer's
            attention kernel (`models/flash.py`). progress: a bar over the parts while loading.
            Raises CheckpointError naming a missing part.
        """
        from tqdm.auto import tqdm

        from jaxdiff.models.tokenizer import CLIPTokenizer

        path = os.fspath(path)
        parts = check_folder(path)
        sub = functools.partial(tensors.inside, path)
        with tqdm(total=4 + ("text_encoder_3" in parts), desc="load", unit="part", disable=not progress) as bar:
            transformer, transformer_params = sd3_convert.load(sub("transformer"), dtype, variant=variant,
                                                               attention_impl=attention_impl)
            bar.update()
            vae, vae_params = vae_convert.load(sub("vae"), dtype, variant=variant)
            bar.update()
            clips = []
            for p in ("text_encoder", "text_encoder_2"):
                clips.append(clip_convert.load(sub(p), dtype, variant=variant))
                bar.update()
            tokenizers = [CLIPTokenizer.from_dir(sub(p)) for p in ("tokenizer", "tokenizer_2")]
            params = {"transformer": transformer_params, "vae": vae_params,
                      "text_encoder": clips[0][1], "text_encoder_2": clips[1][1]}
            t5 = t5_tokenizer = None
            if "text_encoder_3" in parts:
                (t5, params["text_encoder_3"]), t5_tokenizer = _load_t5(sub("text_encoder_3"), sub("tokenizer_3"),
                                                                        dtype, variant)
                bar.update()

        config = tensors.read_json(tensors.inside(sub("scheduler"), SCHEDULER_CONFIG))
        scheduler_convert.warn_unsupported(config)
        return cls(transformer=transformer, vae=vae, text_encoders=[m for m, _ in clips], tokenizers=tokenizers,
                   params=params, scheduler_config=config, t5=t5, t5_tokenizer=t5_tokenizer, max_steps=max_steps,
                   vae_float32=vae_float32, devices=devices, mesh=mesh, rules=rules)

    def _check_widths(self) -> None:
        """The transformer must take what the text encoders give; one CheckpointError otherwise."""
        mm = self.transformer
        if any(m.projection_dim is None for m in self.text_encoders):
            raise CheckpointError("SD3's CLIP text encoders must be CLIPTextModelWithProjection (a projection head)")
        pooled = sum(m.projection_dim for m in self.text_encoders)
        if pooled != mm.pooled_dim:
            raise CheckpointError(f"the transformer's pooled_projection_dim={mm.pooled_dim} does not match the CLIP "
                                  f"projections ({' + '.join(str(m.projection_dim) for m in self.text_encoders)})")
        clip = sum(m.hidden_size for m in self.text_encoders)
        width = self.t5_width
        if clip > width or width != mm.context_dim:
            raise CheckpointError(f"the transformer's joint_attention_dim={mm.context_dim} does not fit the text "
                                  f"encoders (CLIP {clip} wide, {'T5 ' + str(width) if self.t5 else 'no T5'})")

    @property
    def t5_width(self) -> int:
        """Feature width of the T5 states (the transformer's context width without a T5)."""
        return self.transformer.context_dim if self.t5 is None else int(self.t5.hidden_size)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE factor x patch size)."""
        return self.vae_scale_factor * self.transformer.patch_size

    def _size(self, height, width) -> tuple[int, int]:
        return options_lib.check_size(height, width, multiple=self.size_multiple,
                                      default=self.transformer.sample_size * self.vae_scale_factor,
                                      why=f"VAE factor {self.vae_scale_factor} x patch size "
                                          f"{self.transformer.patch_size}")

    # ----------------------------------------------------------------------------------------
    # Text.

    def _embed(self, texts: list[str], skip: int, max_sequence_length: int):
        ids = [jnp.asarray(tok(texts)) for tok in self.tokenizers]                 # 2 x [P, 77]
        params = (self.params["text_encoder"], self.params["text_encoder_2"])
        context, pooled = sharding_lib.gather(self._clip_fn(params, ids, skip=skip))
        width = self.t5_width
        if self.t5 is None:
            t5 = np.zeros((len(texts), max_sequence_length, width), np.float32)
        else:
            t5_ids = jnp.asarray(self.t5_tokenizer(texts, max_length=max_sequence_length).input_ids)
            t5 = sharding_lib.gather(self._t5_fn(self.params["text_encoder_3"], t5_ids))
        context = np.pad(np.asarray(context), ((0, 0), (0, 0), (0, width - context.shape[-1])))
        return {"context": np.concatenate([context, np.asarray(t5)], axis=1).astype(np.float32),  # [P, 77 + L, D]
                "pooled": np.asarray(pooled, np.float32)}                                        # [P, P_1 + P_2]

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                      num_images: int = 1, guidance: bool = True, max_sequence_length: int = 256,
                      clip_skip: int | None = None):
        """(cond, uncond or None): {"context": [N, 77 + max_sequence_length, D], "pooled": [N, P]}
        host float32, N = len(prompts) * num_images, each prompt's rows consecutive (see the module
        docstring). The negative prompt (default "") is embedded only with guidance."""
        prompts = prompts_lib.as_list(prompt)
        options_lib.check_count("num_images", num_images)
        options_lib.check_count("max_sequence_length", max_sequence_length)
        skip = int(clip_skip or 0)
        layers = min(m.num_layers for m in self.text_encoders)
        if not 0 <= skip < layers:
            raise ValueError(f"clip_skip must be in [0, {layers}) for these text encoders, got {clip_skip}")
        cond = self._embed(prompts, skip, max_sequence_length)
        uncond = None
        if guidance:
            negatives = [negative_prompt or ""] * len(prompts) if isinstance(negative_prompt, (str, type(None))) \
                else prompts_lib.as_list(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one string "
                                 "per prompt, or a single string")
            uncond = self._embed(negatives, 0, max_sequence_length)
        rep = functools.partial(np.repeat, repeats=int(num_images), axis=0)
        return ({k: rep(v) for k, v in cond.items()},
                None if uncond is None else {k: rep(v) for k, v in uncond.items()})

    # ----------------------------------------------------------------------------------------
    # Sampling.

    def plan(self, name: str | None, num_steps: int, options: dict | None = None, image_tokens: int | None = None):
        """The sampler of a call: `name` (default: the folder's, `default_sampler`) with the
        scheduler config's options it knows (`convert/scheduler.py`), `options` over them; padded to `max_steps`. With dynamic shifting, mu follows
        the image's `image_tokens` (diffusers' calculate_shift) unless `options` give it."""
        name = name or self.default_sampler
        if name not in samplers.names():
            raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(samplers.names())}")
        valid = samplers.options(name)
        opts = scheduler_convert.sampler_options(name, self.scheduler_config)
        if self.schedule.use_dynamic_shifting and "mu" in valid and image_tokens is not None:
            opts["mu"] = schedules.flow_mu(self.schedule, image_tokens)
        opts.update(options or {})
        num_steps = options_lib.check_steps(num_steps)
        return samplers.get(name, self.schedule, num_steps, max_steps=max(self.max_steps, num_steps), **opts)

    def _peak_bytes(self, height: int, width: int, guided: bool, seq: int):
        """A lower bound of one transformer call's memory on `rows` images: three [tokens, D]
        activations per row (doubled with guidance)."""
        mm = self.transformer
        p, f = mm.patch_size, self.vae_scale_factor
        tokens = (height // f // p) * (width // f // p) + seq
        per_row = 3 * tokens * mm.width * jnp.dtype(mm.dtype).itemsize
        return lambda rows: (2 if guided else 1) * rows * per_row

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_steps: int = 28, guidance_scale: float = 7.0, seed: int = 0, num_images: int = 1,
                 height: int | None = None, width: int | None = None, sampler: str | None = None, latents=None,
                 output_type: str = "pil", max_sequence_length: int = 256, clip_skip: int | None = None,
                 progress: bool = False, **sampler_options: Any):
        """Text to image. prompt: one string or a list; negative_prompt: the unconditional text of
        guidance (default ""). num_steps: sampler steps; guidance_scale: classifier-free guidance
        (> 1 guides, otherwise the conditional model alone); seed: the start noise (and stochastic
        samplers); num_images: images per prompt; height, width: pixels (default the transformer's
        sample_size x the VAE factor); sampler: a `jaxdiff.samplers` name (default flow_euler with
        the folder's shift); latents: standard-normal noise [N, H/f, W/f, C] (NHWC) instead of
        the seed's; output_type: "pil", "np", "uint8" or "latent"; max_sequence_length: T5
        tokens; clip_skip: diffusers' clip_skip; other keywords are sampler options."""
        rest, renamed = options_lib.take_aliases(sampler_options)
        num_steps = renamed.get("num_steps", num_steps)
        num_images = renamed.get("num_images", num_images)
        core.check_scale("guidance_scale", guidance_scale, optional=True)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):  # a bad option: ValueError, as every pipeline
            raise ValueError(f"seed must be an integer, got {seed!r}")  # noqa: TRY004
        images_lib.check_output_type(output_type)
        options_lib.check_count("num_images", num_images)
        height, width = self._size(height, width)
        n = len(prompts_lib.as_list(prompt)) * int(num_images)
        f, C = self.vae_scale_factor, self.transformer.in_channels
        shape = (height // f, width // f, C)
        guided = core.guided(guidance_scale)
        seq = self.tokenizers[0].model_max_length + int(max_sequence_length)
        peak = self._peak_bytes(height, width, guided, seq)
        core.check_memory(self.mesh, n, shape, image_shape=(height, width, 3), peak_bytes=peak)
        p = self.transformer.patch_size
        plan = self.plan(sampler, num_steps, rest, image_tokens=(shape[0] // p) * (shape[1] // p))
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images=num_images, guidance=guided,
                                          max_sequence_length=max_sequence_length, clip_skip=clip_skip)
        job = core.Job(network=self._network, params=self.params["transformer"], sampler=plan, shape=shape,
                       num=n, seed=int(seed), cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                       noise=None if latents is None else np.asarray(latents, np.float32),
                       decode=functools.partial(self._decode_fn, self.params["vae"]),
                       image_shape=(height, width, 3), peak_bytes=peak)
        return core.run(job, self.mesh, output_type=output_type, progress=progress)

    generate = __call__
