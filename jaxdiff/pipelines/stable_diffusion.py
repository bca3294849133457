"""Stable Diffusion (Rombach et al. 2022) and SDXL (Podell et al. 2023) text-to-image,
image-to-image and inpainting, from a diffusers-format folder.

    pipe = jaxdiff.StableDiffusion.from_pretrained("stable-diffusion-v1-5")   # a local folder
    images = pipe("a photo of a cat", num_steps=30, guidance_scale=7.5, seed=0, num_images=4)
    images = pipe.img2img(photo, "an oil painting of a cat", strength=0.6)
    images = pipe.inpaint(photo, mask, "a dog", strength=1.0)        # mask: white = repaint
    pipe.load_lora("style.safetensors", scale=0.7)   # diffusers/PEFT or kohya LoRA (pipelines/lora.py)

The folder is what `diffusers.StableDiffusionPipeline.save_pretrained(..., safe_serialization=True)`
writes: `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and
`scheduler/scheduler_config.json`; an SDXL folder (`StableDiffusionXLPipeline`) adds
`text_encoder_2/` and `tokenizer_2/`, and an SDXL refiner (`StableDiffusionXLImg2ImgPipeline`)
has those two instead of the first pair (`convert/folder.py`). Weights are read from safetensors
only (pickles are refused); a missing part is named in the error. The text side (one or two
encoders, SDXL's pooled embedding and micro-conditioning `time_ids`, `prompt_2`, ...) is
`pipelines/prompts.py`.

A thin front end of the sampling core (`pipelines/core.py`). For N = len(prompts) * num_images
images of H x W pixels it makes

    ids [P, 77]  -> text encoder -> cond [N, 77, D]  (and the negative / empty prompt: uncond)
    the sampler plan (the folder's scheduler, or `sampler=`), the latent shape [H/f, W/f, C]
    (f = the VAE's downsampling factor, C = latent channels), for img2img the image latents, for
    inpainting the mask (9-channel U-Nets) or the region to keep (mask blending)

and the core draws noise [N, H/f, W/f, C], pads the batch over the mesh, samples (guided when
guidance_scale > 1) and decodes: images = VAE.decode(latents / scaling_factor) in [0, 1].

Every call takes the same keyword arguments, `GenerateOptions` (num_steps, sampler,
guidance_scale, seed, num_images, height, width, latents, output_type, ...); diffusers' names
(num_inference_steps, num_images_per_prompt) are understood.

Scheduler: the folder's `scheduler_config.json` becomes a jaxdiff noise schedule (beta_schedule,
beta_start / beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr) and default
sampler options: every key of the config that the chosen sampler also takes (prediction_type,
timestep_spacing, steps_offset, set_alpha_to_one, clip_sample, use_karras_sigmas, ...) is passed
to it, as diffusers' `OtherScheduler.from_config(pipe.scheduler.config)` carries them over (e.g.
SD 1.5's "leading" spacing and steps_offset=1 stay with `sampler="euler"`). The
config's `_class_name` picks the default sampler (`SCHEDULER_SAMPLERS`); `sampler=` picks another.

Guidance follows the diffusers pipelines and the core's one rule: classifier-free guidance
(`sampling.cfg`, one batched network call on [uncond; cond]) when guidance_scale > 1, plain
conditional sampling otherwise;
the unconditional text is the negative prompt, or the empty prompt. `clip_skip=k` takes the
prompt's hidden states k layers before the last (the negative prompt's are taken at full depth,
as diffusers does).

Compilation: the networks' parameters and all conditioning (text embeddings, noise, masks, image
latents, guidance scale, eta) are traced leaves of one jitted sampling loop, so new prompts, seeds
or scales reuse the compiled program. Sampler plans are padded to `max_steps` (50 by default, see
`samplers.get(..., max_steps=)`), so every `num_steps <= max_steps` and every img2img / inpaint
`strength` (a start step inside that plan) runs through the same program too; only a new image
size, batch size, sampler kind, guidance on/off or `num_steps > max_steps` compiles anew.

Precision: with `dtype=jnp.bfloat16` the U-Net, text encoder and VAE compute in bf16 while their
parameters stay float32; latents and sampler state are float32 throughout, and the VAE encodes
and decodes in float32 unless `vae_float32=False`.

Devices: the pipeline runs on a mesh of every device of every process (`jax.devices()`, or the
`mesh` given); the batch of N images is split over its `data` x `fsdp` axes and the parameters
are laid out by the trainer's rule tables (`rules="dp"` replicates them, `"fsdp"` / `"fsdp_tp"`
split them, see `jaxdiff.sharding`). A batch that does not divide evenly is padded with copies of
its last row to the next multiple, and the extra images are dropped. Noise (the start latents and
the VAE posterior samples) is drawn on the host for the N requested images only, and the
stochastic samplers' in-loop draws do not depend on the layout, so a seed gives the same images
on 1 device, 8, or 2 processes x 4 (up to float rounding). In a multi-process run every process
calls the pipeline (it is a collective) and every process gets all N images.

Outputs: the folder's safety checker screens them (`pipelines/safety.py`); SDXL folders embed
the invisible watermark diffusers' SDXL pipelines embed (`add_watermarker`, `jaxdiff.provenance`).

Why this file is long: it is the one front end of the whole Stable Diffusion family (text to
image, img2img, inpainting, SD 1/2/XL folders) and the place where each output hook (LoRA,
ControlNet, safety checker, watermark) joins the sampling core; the hooks themselves live in
their own modules.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler, samplers
from jaxdiff import images as images_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.convert import scheduler as scheduler_convert
from jaxdiff.models import vae as vae_lib
from jaxdiff.pipelines import controlnet as controlnet_lib
from jaxdiff.pipelines import core
from jaxdiff.pipelines import lora as lora_pipe
from jaxdiff.pipelines import options as options_lib
from jaxdiff.pipelines import prompts as prompts_lib
from jaxdiff.pipelines import safety as safety_lib
from jaxdiff.provenance import watermark as watermark_lib

DEFAULT_MAX_STEPS = 50


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """The keyword arguments of `__call__`, `img2img` and `inpaint`, checked once (`parse`).

    num_steps: sampler steps (a positive integer). sampler: a `jaxdiff.samplers` name (default:
        the folder's scheduler, `default_sampler`); its options default to the scheduler
        config's, and `sampler_options` (any other keyword argument) override them.
    guidance_scale: classifier-free guidance scale; <= 1 runs the conditional model alone.
    guidance_rescale: Lin et al. 2023's rescale phi in [0, 1]. clip_skip: diffusers' clip_skip.
    guidance_end: guide only the first fraction in [0, 1] of the steps (`core.Job.guidance_end`).
    seed: the run's seed (noise, VAE posterior samples, stochastic samplers).
    num_images: images per prompt; N = len(prompts) * num_images, each prompt's consecutive.
    height, width: pixels (default: the U-Net's sample_size x the VAE factor; for img2img and
        inpainting the image's size), multiples of `size_multiple`.
    latents: standard-normal noise [N, H/f, W/f, C] (NHWC) instead of noise drawn from `seed`;
        the pipeline scales it by the sampler's initial sigma.
    output_type: "pil" (list of PIL images), "np" (float32 [N, H, W, 3] in [0, 1]), "uint8", or
        "latent" (the final latents [N, H/f, W/f, C]).
    eta: DDIM's eta (only for samplers with that option). progress: a per-step progress bar.
    lora_scale: multiplies every loaded LoRA's scale for this call (traced; diffusers'
        cross_attention_kwargs={"scale": s} is read as this), see `pipelines/lora.py`.
    control: the ControlNet options (control_image, controlnet_conditioning_scale, ...; see
        `pipelines/controlnet.py`).
    deep_cache: k > 1 runs the whole U-Net every k-th step, its outer level alone in between
        (DeepCache; `core.Job.deep_cache`); None, 0 or 1: off. Not with a ControlNet.
    """

    num_steps: int = 30
    sampler: str | None = None
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    guidance_end: float | None = None
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    latents: Any = None
    output_type: str = "pil"
    clip_skip: int | None = None
    eta: float | None = None
    progress: bool = False
    lora_scale: float | None = None
    deep_cache: int | None = None
    sampler_options: dict = dataclasses.field(default_factory=dict)
    control: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, kwargs: dict) -> "GenerateOptions":
        """Options from keyword arguments: diffusers' names renamed, unknown names kept as sampler
        options (checked against the sampler later), every value checked (one-line ValueErrors)."""
        kwargs, renamed = options_lib.take_aliases(lora_pipe.take_lora_scale(kwargs))
        kwargs.update(renamed)
        kwargs, control = controlnet_lib.split_options(kwargs)
        names = {f.name for f in dataclasses.fields(cls)} - {"sampler_options", "control"}
        extra = {k: v for k, v in kwargs.items() if k not in names}
        opts = cls(**{k: v for k, v in kwargs.items() if k in names}, sampler_options=extra, control=control)
        opts.check()
        return opts

    def check(self) -> None:
        options_lib.check_steps(self.num_steps)
        core.check_scale("guidance_scale", self.guidance_scale, optional=True)
        core.check_scale("guidance_rescale", self.guidance_rescale, lo=0.0, hi=1.0)
        core.check_scale("guidance_end", self.guidance_end, lo=0.0, hi=1.0, optional=True)
        core.check_scale("eta", self.eta, lo=0.0, hi=1.0, optional=True)
        core.check_scale("lora_scale", self.lora_scale, optional=True)
        core.deep_cache_every(self.deep_cache)
        options_lib.check_count("num_images", self.num_images)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None:
                options_lib.check_count(name, v, "a positive integer number of pixels")
        images_lib.check_output_type(self.output_type)


# --------------------------------------------------------------------------------------------
# Network calls (module-level so that each pipeline's partials are stable jit cache keys).
# --------------------------------------------------------------------------------------------

def _unet(module, params, x, t, cond, *feature):
    """The U-Net's prediction. x: [B, h, w, C]; cond: {"context": [B, S, D]}, for SDXL
    "text_embeds" [B, P] and "time_ids" [B, n], for 9-channel inpainting U-Nets "extra":
    [B, h, w, 5] (mask and masked-image latents) joined to x, and ControlNet residuals. Given a
    `feature` argument (None or a cached deep feature), the deep-feature-reuse convention
    (`core.Job.reusing_network`): returns (prediction, feature)."""
    if "extra" in cond:
        x = jnp.concatenate([x, cond["extra"].astype(x.dtype)], axis=-1)           # [B, h, w, 9]
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    reuse = {"deep_feature": feature[0], "return_deep_feature": True} if feature else {}
    return module.apply({"params": params}, x, t, context=cond["context"], **added, **reuse,
                        down_residuals=cond.get("down_residuals"), mid_residual=cond.get("mid_residual"))


def _encode_images(vae, params, images):
    """Posterior (mean, std) [B, h, w, C] of images [B, H, W, 3] in [-1, 1]."""
    posterior = vae.apply({"params": params}, images, method="encode")
    return posterior.mean, posterior.std


def _decode(vae, params, latents):
    """Scaled latents [B, h, w, C] -> images [B, H, W, 3] in [-1, 1] (float32, unclipped)."""
    return vae_lib.decode_latents(vae, params, latents, float32=False).astype(jnp.float32)


class StableDiffusion(lora_pipe.LoraMixin):
    """A Stable Diffusion 1.x / 2.x / XL model: U-Net, VAE, CLIP text encoder(s), tokenizer(s)
    and schedule.

    Attributes: `unet`, `vae`, `text_encoder`, `text_encoder_2` (flax modules; SD 1.x/2.x have no
    second, an SDXL refiner no first: None), `params` (dict with "unet", "vae", "text_encoder"
    and/or "text_encoder_2" parameter trees, laid out on `mesh` by `rules`), `tokenizer`,
    `tokenizer_2`, `prompts` (`prompts.PromptEncoder`), `xl` (bool), `schedule`,
    `scheduler_config` (dict), `default_sampler` (str), `max_steps`, `mesh`, `rules`, and
    `controlnets` (the ControlNet modules, see `pipelines/controlnet.py`; params["controlnets"]).
    xl_options: the folder's {"force_zeros_for_empty_prompt", "requires_aesthetics_score",
    "force_upcast"} (see `convert/folder.py`); force_upcast keeps the VAE in float32.

    mesh: a `jax.sharding.Mesh` (see `sharding.make_mesh`); None: `sharding.inference_mesh(rules,
    devices)`, i.e. `devices` (default: all devices of all processes) on one batch axis.
    """

    controlnets: tuple = ()

    def __init__(self, *, unet, vae, text_encoder, params: dict, tokenizer, schedule, scheduler_config: dict,
                 max_steps: int = DEFAULT_MAX_STEPS, vae_float32: bool = True, devices=None, mesh=None,
                 rules: str = "dp", text_encoder_2=None, tokenizer_2=None, xl_options: dict | None = None,
                 add_watermarker: bool | None = None):
        self.unet = unet
        self.vae = vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        xl = dict(xl_options or {})
        self.xl = text_encoder_2 is not None
        self.watermark = self.xl if add_watermarker is None else bool(add_watermarker)   # SDXL's, as diffusers
        pairs = [(k, m, t) for k, m, t in (("text_encoder", text_encoder, tokenizer),
                                           ("text_encoder_2", text_encoder_2, tokenizer_2)) if m is not None]
        self._text_keys = tuple(k for k, _, _ in pairs)
        self.prompts = prompts_lib.PromptEncoder(
            [(m, t) for _, m, t in pairs], xl=self.xl, aesthetics=xl.get("requires_aesthetics_score", False),
            force_zeros=xl.get("force_zeros_for_empty_prompt", self.xl))
        self.vae_float32 = vae_float32 = bool(vae_float32 or xl.get("force_upcast", False))
        self.schedule = schedule
        self.scheduler_config = dict(scheduler_config)
        self.default_sampler = scheduler_convert.default_sampler(self.scheduler_config)
        self.max_steps = int(max_steps)
        self.mesh = sharding_lib.inference_mesh(rules, devices) if mesh is None else mesh
        self.rules = rules
        self.params = sharding_lib.place(params, sharding_lib.tree_shardings(params, self.mesh, rules))
        coder = vae.clone(dtype=jnp.float32) if vae_float32 else vae
        self._weights_dtype = core.weights_dtype(unet.dtype)            # weights cast once per request
        # One function object each per pipeline, so repeated calls hit jit's caches.
        self._unet_fn = lora_pipe.with_lora(functools.partial(_unet, unet))
        self._encode_fn = compiler.jit(functools.partial(_encode_images, coder))
        self._decode_fn = compiler.jit(functools.partial(_decode, coder))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=jnp.float32, *, max_steps: int = DEFAULT_MAX_STEPS,
                        vae_float32: bool = True, progress: bool = False, devices=None, mesh=None,
                        rules: str = "dp", variant: str | None = None, controlnet=None,
                        safety_checker: bool = True, add_watermarker: bool | None = None) -> "StableDiffusion":
        """Load a diffusers Stable Diffusion 1.x / 2.x / XL folder (see the module docstring).

        dtype: compute dtype of the networks (parameters are float32 whatever the files hold).
        max_steps: plans are padded to this many steps, so any num_steps up to it shares one
            compiled sampling loop. progress: show a progress bar while loading.
        mesh / devices / rules: where the pipeline runs and how its parameters are laid out (see
            the class); in a multi-process run every process loads the folder.
        variant: e.g. "fp16" to read every network's `*.fp16.safetensors`.
        controlnet: a diffusers ControlNet folder, or a list of them (their residuals are summed).
        safety_checker: run the folder's safety checker (if listed) on outputs (`pipelines/safety.py`).
        add_watermarker: SDXL's invisible watermark (`provenance.watermark`); None: on for SDXL folders.
        Raises `CheckpointError` naming the missing or unreadable part.
        """
        from jaxdiff.convert import folder as folder_convert

        parts = folder_convert.load_pretrained(path, dtype, progress=progress, variant=variant)
        nets = {k: parts[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2") if k in parts}
        config = parts["scheduler"]
        scheduler_convert.warn_unsupported(config)
        pipe = cls(unet=nets["unet"][0], vae=nets["vae"][0], text_encoder=nets.get("text_encoder", (None,))[0],
                   text_encoder_2=nets.get("text_encoder_2", (None,))[0], tokenizer=parts.get("tokenizer"),
                   tokenizer_2=parts.get("tokenizer_2"), xl_options=parts["options"],
                   params={k: p for k, (_, p) in nets.items()},
                   schedule=scheduler_convert.schedule_from_config(config), scheduler_config=config,
                   max_steps=max_steps, vae_float32=vae_float32, devices=devices, mesh=mesh, rules=rules,
                   add_watermarker=add_watermarker)
        safety_lib.attach(pipe, path, dtype, safety_checker)
        if controlnet is not None:
            controlnet_lib.attach(pipe, controlnet, dtype)
        return pipe

    # ----------------------------------------------------------------------------------------
    # Sizes.

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE factor x U-Net downsampling)."""
        return self.vae_scale_factor * self.unet.downsample_factor

    def _size(self, height, width) -> tuple[int, int]:
        default = None if self.unet.sample_size is None else self.unet.sample_size * self.vae_scale_factor
        return options_lib.check_size(height, width, multiple=self.size_multiple, default=default,
                                      why=f"VAE factor {self.vae_scale_factor} x U-Net downsampling "
                                          f"{self.unet.downsample_factor}")

    # ----------------------------------------------------------------------------------------
    # Text and images in.

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                      num_images: int = 1, clip_skip: int | None = None, guidance: bool = True, lora_scale=None,
                      **xl: Any):
        """Text embeddings (cond [N, S, D], uncond [N, S, D] or None without guidance), float32
        numpy, N = len(prompts) * num_images, each prompt's rows consecutive (the "context" of
        `encode_text`; xl: its SDXL options, e.g. prompt_2)."""
        cond, uncond = self.encode_text(prompts_lib.Text.take(prompt, negative_prompt, xl), num_images=num_images,
                                        clip_skip=clip_skip, guidance=guidance, lora_scale=lora_scale)
        return cond["context"], None if uncond is None else uncond["context"]

    def encode_text(self, text: prompts_lib.Text, *, num_images: int = 1, clip_skip: int | None = None,
                    guidance: bool = True, height: int | None = None, width: int | None = None, mode: str = "text",
                    lora_scale=None):
        """(cond, uncond) dicts of the U-Net call for `text` (see `pipelines/prompts.py`); one
        call of the text encoders (with their LoRAs). height, width: the output size (default:
        the model's)."""
        if self.xl and (height is None or width is None):
            height, width = self._size(height, width)
        params = tuple(self._lora_params(k, lora_scale) for k in self._text_keys)
        return self.prompts(params, text, num_images=num_images,
                            clip_skip=clip_skip, guidance=guidance, height=height, width=width, mode=mode)

    def encode_images(self, images, *, key=None) -> np.ndarray:
        """Images [B, H, W, 3] in [-1, 1] -> scaled latents [B, H/f, W/f, C] float32 (host): a
        posterior sample with `key` (what diffusers' pipelines use), its mean with key=None. The
        encoder runs over the mesh; the posterior noise is drawn for the B images only."""
        images = np.asarray(images, np.float32)
        b = images.shape[0]
        rows = sharding_lib.padded_batch(b, self.mesh)
        mean, std = sharding_lib.gather(self._encode_fn(self.params["vae"],
                                                        sharding_lib.put_batch(images, self.mesh, rows)))
        z = mean[:b]
        if key is not None:
            z = z + std[:b] * np.asarray(jax.random.normal(key, z.shape, jnp.float32))
        return np.asarray(vae_lib.scale_latents(self.vae, z), np.float32)

    # ----------------------------------------------------------------------------------------
    # Sampling.

    def plan(self, name: str | None, num_steps: int, start_step: int = 0, eta: float | None = None,
             options: dict | None = None):
        """The sampler of a call: `name` (default: the folder's) with the scheduler config's
        options, `eta`, the img2img `start_step` and `options` over them; padded to `max_steps`."""
        name = name or self.default_sampler
        if name not in samplers.names():
            raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(samplers.names())}")
        opts = scheduler_convert.sampler_options(name, self.scheduler_config)
        valid = samplers.options(name)
        if eta is not None:
            if "eta" in valid:
                opts["eta"] = eta
            elif eta != 0:
                raise ValueError(f"sampler {name!r} has no eta option (ddim has); leave eta unset")
        if start_step:
            if "start_step" not in valid:
                raise ValueError(f"sampler {name!r} cannot start part-way (img2img / inpaint strength < 1); "
                                 f"use one of {', '.join(n for n in samplers.names() if 'start_step' in samplers.options(n))}")
            opts["start_step"] = start_step
        opts.update(options or {})
        num_steps = options_lib.check_steps(num_steps)
        return samplers.get(name, self.schedule, num_steps, max_steps=max(self.max_steps, num_steps), **opts)

    def _latents(self, height: int, width: int, guidance_scale):
        """(the latent shape [H/f, W/f, C] of height x width images, the U-Net call's peak-memory
        bound `core.Job.peak_bytes` at that size with or without guidance)."""
        f = self.vae_scale_factor
        shape = (height // f, width // f, self.latent_channels)
        return shape, core.unet_peak_bytes(self.unet, shape[0], shape[1], core.guided(guidance_scale))

    def _check_fits(self, opts: GenerateOptions, text, height: int, width: int, inputs: int = 0) -> int:
        """N = len(prompts) * num_images, after checking that N images of height x width can fit
        (`core.check_memory`) before any of them is encoded."""
        n = len(prompts_lib.as_list(text.prompt)) * opts.num_images
        shape, peak = self._latents(height, width, opts.guidance_scale)
        core.check_memory(self.mesh, n, shape, image_shape=(height, width, 3), inputs=inputs, peak_bytes=peak)
        return n

    def _run(self, opts: GenerateOptions, text, height: int, width: int, *, start_step: int = 0,
             x0=None, extra=None, keep=None, mode: str = "image"):
        """Encode the prompts and hand the core the job (see the module docstring)."""
        plan = self.plan(opts.sampler, opts.num_steps, start_step, opts.eta, opts.sampler_options)
        guided = core.guided(opts.guidance_scale)
        cond, uncond = self.encode_text(text, num_images=opts.num_images, clip_skip=opts.clip_skip, guidance=guided,
                                        height=height, width=width, mode=mode, lora_scale=opts.lora_scale)
        if extra is not None:
            cond["extra"] = extra
            if uncond is not None:
                uncond["extra"] = extra
        shape, peak = self._latents(height, width, opts.guidance_scale)
        network, params = self._unet_fn, self._lora_params("unet", opts.lora_scale)
        network, params, cond, uncond = controlnet_lib.wire(self, opts, plan, network, params, cond, uncond, height, width)
        reusing = None if self.controlnets else self._unet_fn            # `_unet` with a feature argument
        job = core.Job(network=network, params=params, sampler=plan, shape=shape, guidance_end=opts.guidance_end,
                       deep_cache=opts.deep_cache, reusing_network=reusing,
                       num=cond["context"].shape[0], seed=opts.seed, cond=cond, uncond=uncond,
                       guidance_scale=opts.guidance_scale, guidance_rescale=opts.guidance_rescale,
                       noise=None if opts.latents is None else np.asarray(opts.latents, np.float32),
                       x0=x0, keep=keep, decode=functools.partial(self._decode_fn, self.params["vae"]),
                       image_shape=(height, width, 3), peak_bytes=peak, weights_dtype=self._weights_dtype)
        marked = self.watermark and opts.output_type != "latent"    # then [N, H, W, 3] in [0, 1], marked
        out = core.run(job, self.mesh, output_type="np" if marked else opts.output_type, progress=opts.progress)
        out = images_lib.to_output(watermark_lib.embed_watermark(out), opts.output_type) if marked else out
        return safety_lib.screen(self, out, opts.output_type)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 **options: Any):
        """Text to image. prompt: one string or a list; negative_prompt: the unconditional text of
        guidance (default: empty). options: `GenerateOptions` (num_steps=30, sampler, guidance_scale=7.5,
        seed, num_images, height, width, latents, output_type="pil", ...), sampler options and, for
        SDXL, `prompts.XL_OPTIONS` (prompt_2, negative_prompt_2, original_size, target_size, ...)."""
        text = prompts_lib.Text.take(prompt, negative_prompt, options)
        opts = GenerateOptions.parse(options)
        height, width = self._size(opts.height, opts.width)
        self._check_fits(opts, text, height, width)
        return self._run(opts, text, height, width, mode="text")

    generate = __call__

    def warmup(self, prompt: str | Sequence[str] = "", negative_prompt=None, **options: Any):
        """Compile every program `self(prompt, negative_prompt, **options)` would run, running none;
        only the shapes matter (number of prompts and images, size, sampler, steps, guidance on or off).
        Returns `warmup.Report` (programs compiled, cache hits, seconds); see `pipelines/warmup.py`."""
        from jaxdiff.pipelines import warmup as warmup_lib
        return warmup_lib.warm_stable_diffusion(self, prompt, negative_prompt, options)

    # ----------------------------------------------------------------------------------------
    # Image to image, inpainting.

    def _start_step(self, num_steps, strength) -> int:
        strength = core.check_scale("strength", strength, lo=0.0, hi=1.0)
        run = min(int(num_steps * strength), num_steps)        # diffusers' get_timesteps
        if run < 1:
            raise ValueError(f"strength={strength} with num_steps={num_steps} leaves no step to run "
                             f"(int(num_steps * strength) = 0); raise strength or num_steps")
        return num_steps - run

    def img2img(self, image, prompt: str | Sequence[str], strength: float = 0.8,
                negative_prompt: str | Sequence[str] | None = None, *, sample_posterior: bool = True,
                **options: Any):
        """Image to image (SDEdit, Meng et al. 2022), as diffusers' `StableDiffusionImg2ImgPipeline`.

        image: a PIL image, a list of them, or floats [B, H, W, 3] / [H, W, 3] in [0, 1] (uint8
            arrays are read as 0..255); B is 1 (shared by all N outputs) or N. PIL images are
            resized to height x width when those are given.
        strength in [0, 1]: how much noise is added; the run skips the first
            num_steps - int(num_steps * strength) steps of the plan and starts there from the
            image latents noised to that level (the forward process, with `latents` or seeded
            noise [N, h, w, C]).
        sample_posterior: encode with a VAE posterior sample, as diffusers does (True), or with
            the posterior mean (False). options: as `__call__`.
        """
        text = prompts_lib.Text.take(prompt, negative_prompt, options)
        opts = GenerateOptions.parse(options)
        start = self._start_step(opts.num_steps, strength)
        pixels = images_lib.read_images(image, None, opts.height, opts.width, self.size_multiple)
        n = self._check_fits(opts, text, *pixels.shape[1:3], inputs=1)
        pixels = images_lib.repeat_to(pixels, n, "image")
        x0 = self.encode_images(pixels, key=core.image_key(opts.seed, 1) if sample_posterior else None)
        h, w = pixels.shape[1:3]
        return self._run(opts, text, h, w, start_step=start, x0=x0)

    def inpaint(self, image, mask, prompt: str | Sequence[str], strength: float = 1.0,
                negative_prompt: str | Sequence[str] | None = None, *, sample_posterior: bool = True,
                **options: Any):
        """Inpainting, as diffusers' `StableDiffusionInpaintPipeline`.

        image: as `img2img`. mask: PIL image(s) or floats [B, H, W] / [B, H, W, 1] / [H, W] in
            [0, 1], binarised at 0.5; 1 (white) = generate, 0 = keep the image.
        strength: 1 starts from pure noise; below 1 from the image latents noised to the start
            step's level, as `img2img`.
        A 9-channel inpainting U-Net gets concat([latents, mask at latent size (nearest),
        masked-image latents]) as input (the masked image is the image with the mask region set
        to 0 in [-1, 1]). A 4-channel U-Net inpaints by mask blending: after each step the known
        region is replaced by the image latents noised to the next step's level, through a sampler
        wrapper (`jaxdiff.samplers.masked`). `latents` is the noise of the run at any strength
        (diffusers, given latents, starts from them as pure noise even below strength 1). Other
        arguments as `img2img`.
        """
        in_channels = self.unet.in_channels or self.latent_channels
        if in_channels not in (self.latent_channels, 2 * self.latent_channels + 1):
            raise ValueError(f"inpainting needs a U-Net with {self.latent_channels} or "
                             f"{2 * self.latent_channels + 1} input channels, this one has {in_channels}")
        text = prompts_lib.Text.take(prompt, negative_prompt, options)
        opts = GenerateOptions.parse(options)
        strength = core.check_scale("strength", strength, lo=0.0, hi=1.0)
        start = self._start_step(opts.num_steps, strength) if strength < 1.0 else 0
        pixels = images_lib.read_images(image, None, opts.height, opts.width, self.size_multiple)
        h, w = pixels.shape[1:3]
        n = self._check_fits(opts, text, h, w, inputs=2)
        pixels = images_lib.repeat_to(pixels, n, "image")
        full_mask = images_lib.read_masks(mask, n, h, w)                                 # [N, H, W, 1] in {0, 1}
        f = self.vae_scale_factor
        small_mask = full_mask[:, ::f, ::f]                                              # [N, h, w, 1], nearest
        nine = in_channels != self.latent_channels
        image_latents = None
        if start or not nine:
            image_latents = self.encode_images(pixels, key=core.image_key(opts.seed, 1) if sample_posterior else None)
        extra = keep = None
        if nine:
            masked_latents = self.encode_images(pixels * (full_mask < 0.5),
                                                key=core.image_key(opts.seed, 2) if sample_posterior else None)
            extra = np.concatenate([small_mask, masked_latents], axis=-1)                # [N, h, w, 1 + C]
        else:
            keep = (small_mask, image_latents)
        return self._run(opts, text, h, w, start_step=start,
                         x0=image_latents if start else None, extra=extra, keep=keep)

