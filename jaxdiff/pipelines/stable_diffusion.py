"""Stable Diffusion (Rombach et al. 2022) text-to-image, image-to-image and inpainting, from a
diffusers-format folder.

    pipe = jaxdiff.StableDiffusion.from_pretrained("stable-diffusion-v1-5")   # a local folder
    images = pipe("a photo of a cat", num_steps=30, guidance_scale=7.5, seed=0, num_images=4)
    images = pipe.img2img(photo, "an oil painting of a cat", strength=0.6)
    images = pipe.inpaint(photo, mask, "a dog", strength=1.0)        # mask: white = repaint

The folder is what `diffusers.StableDiffusionPipeline.save_pretrained(..., safe_serialization=True)`
writes: `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and
`scheduler/scheduler_config.json`. Weights are read from safetensors only (pickles are refused);
a missing part is named in the error.

The flow of one call, for N = len(prompts) * num_images images of H x W pixels:

    ids [P, 77]  -> text encoder -> cond [N, 77, D]  (and the negative / empty prompt: uncond)
    noise [N, H/f, W/f, C] ~ N(0, I)    (f = the VAE's downsampling factor, C = latent channels)
    latents = sampling.sample(sampler, cfg(unet, guidance_scale, cond, uncond), noise, key)
    images = VAE.decode(latents / scaling_factor)  -> [N, H, W, 3] in [0, 1]

Scheduler: the folder's `scheduler_config.json` becomes a jaxdiff noise schedule (beta_schedule,
beta_start / beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr) and default
sampler options: every key of the config that the chosen sampler also takes (prediction_type,
timestep_spacing, steps_offset, set_alpha_to_one, clip_sample, use_karras_sigmas, ...) is passed
to it, as diffusers' `OtherScheduler.from_config(pipe.scheduler.config)` carries them over (e.g.
SD 1.5's "leading" spacing and steps_offset=1 stay with `sampler="euler"`). The
config's `_class_name` picks the default sampler (`SCHEDULER_SAMPLERS`); `sampler=` picks another.

Guidance follows the diffusers pipelines: classifier-free guidance (`sampling.cfg`, one batched
network call on [uncond; cond]) when guidance_scale > 1, plain conditional sampling otherwise;
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
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import samplers, sampling
from jaxdiff import sharding as sharding_lib
from jaxdiff.models import vae as vae_lib
from jaxdiff.samplers import masked as masked_lib
from jaxdiff.convert import scheduler as scheduler_convert

DEFAULT_MAX_STEPS = 50

# --------------------------------------------------------------------------------------------
# Network calls (module-level so that each pipeline's partials are stable jit cache keys).
# --------------------------------------------------------------------------------------------

def _unet(module, params, x, t, cond):
    """The U-Net's prediction. x: [B, h, w, C]; cond: {"context": [B, S, D]} and, for 9-channel
    inpainting U-Nets, "extra": [B, h, w, 5] (mask and masked-image latents) joined to x."""
    if "extra" in cond:
        x = jnp.concatenate([x, cond["extra"].astype(x.dtype)], axis=-1)           # [B, h, w, 9]
    return module.apply({"params": params}, x, t, context=cond["context"])


def _unet_conditional(module, params, cond, x, t):
    return _unet(module, params, x, t, cond)


def _encode_text(module, params, ids, neg_ids, skip_layers):
    """(prompt embeddings [P, S, D], negative embeddings [P, S, D] or None), float32."""
    emb = module.apply({"params": params}, ids, skip_layers=skip_layers).last_hidden_state
    neg = None if neg_ids is None else module.apply({"params": params}, neg_ids).last_hidden_state
    return emb.astype(jnp.float32), None if neg is None else neg.astype(jnp.float32)


def _encode_images(vae, params, images):
    """Posterior (mean, std) [B, h, w, C] of images [B, H, W, 3] in [-1, 1]."""
    posterior = vae.apply({"params": params}, images, method="encode")
    return posterior.mean, posterior.std


def _decode(vae, params, latents):
    """Scaled latents [B, h, w, C] -> images [B, H, W, 3] in [0, 1] (float32), diffusers' postprocess."""
    images = vae_lib.decode_latents(vae, params, latents, float32=False)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


class StableDiffusion:
    """A Stable Diffusion 1.x / 2.x model: U-Net, VAE, CLIP text encoder, tokenizer and schedule.

    Attributes: `unet`, `vae`, `text_encoder` (flax modules), `params` (dict with "unet", "vae",
    "text_encoder" parameter trees, laid out on `mesh` by `rules`), `tokenizer`, `schedule`,
    `scheduler_config` (dict), `default_sampler` (str), `max_steps`, `mesh`, `rules`.

    mesh: a `jax.sharding.Mesh` (see `sharding.make_mesh`); None: `sharding.inference_mesh(rules,
    devices)`, i.e. `devices` (default: all devices of all processes) on one batch axis.
    """

    def __init__(self, *, unet, vae, text_encoder, params: dict, tokenizer, schedule, scheduler_config: dict,
                 max_steps: int = DEFAULT_MAX_STEPS, vae_float32: bool = True, devices=None, mesh=None,
                 rules: str = "dp"):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.scheduler_config = dict(scheduler_config)
        self.default_sampler = scheduler_convert.default_sampler(self.scheduler_config)
        self.max_steps = int(max_steps)
        self.mesh = sharding_lib.inference_mesh(rules, devices) if mesh is None else mesh
        self.rules = rules
        self.params = sharding_lib.place(params, sharding_lib.tree_shardings(params, self.mesh, rules))
        coder = vae.clone(dtype=jnp.float32) if vae_float32 else vae
        # One function object each per pipeline, so repeated calls hit jit's caches.
        self._unet_fn = functools.partial(_unet, unet)
        self._unet_cond_fn = functools.partial(_unet_conditional, unet)
        self._text_fn = jax.jit(functools.partial(_encode_text, text_encoder), static_argnames="skip_layers")
        self._encode_fn = jax.jit(functools.partial(_encode_images, coder))
        self._decode_fn = jax.jit(functools.partial(_decode, coder))

    # ----------------------------------------------------------------------------------------
    # Loading.

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=jnp.float32, *, max_steps: int = DEFAULT_MAX_STEPS,
                        vae_float32: bool = True, progress: bool = False, devices=None, mesh=None,
                        rules: str = "dp") -> "StableDiffusion":
        """Load a diffusers Stable Diffusion folder (see the module docstring for its layout).

        dtype: compute dtype of the networks (parameters are float32 whatever the files hold).
        max_steps: plans are padded to this many steps, so any num_steps up to it shares one
            compiled sampling loop. progress: show a progress bar while loading.
        mesh / devices / rules: where the pipeline runs and how its parameters are laid out (see
            the class); in a multi-process run every process loads the folder.
        Raises `CheckpointError` naming the missing or unreadable part.
        """
        from jaxdiff.convert import folder as folder_convert

        parts = folder_convert.load_pretrained(path, dtype, progress=progress)
        (unet, unet_params), (vae, vae_params), (text, text_params) = parts["unet"], parts["vae"], parts["text_encoder"]
        config = parts["scheduler"]
        scheduler_convert.warn_unsupported(config)
        return cls(unet=unet, vae=vae, text_encoder=text, tokenizer=parts["tokenizer"],
                   params={"unet": unet_params, "vae": vae_params, "text_encoder": text_params},
                   schedule=scheduler_convert.schedule_from_config(config), scheduler_config=config, max_steps=max_steps,
                   vae_float32=vae_float32, devices=devices, mesh=mesh, rules=rules)

    # ----------------------------------------------------------------------------------------
    # Sizes and sharding.

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
        height, width = height or default, width or default
        if height is None or width is None:
            raise ValueError("this U-Net's config has no sample_size; pass height and width")
        m = self.size_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {m} (VAE factor "
                             f"{self.vae_scale_factor} x U-Net downsampling {self.unet.downsample_factor}), "
                             f"got {height}x{width}; try {max(m, round(height / m) * m)}x{max(m, round(width / m) * m)}")
        return int(height), int(width)

    def _rows(self, n: int) -> int:
        """The batch N images are computed at (N padded to a multiple of the batch shards)."""
        return sharding_lib.padded_batch(n, self.mesh)

    def _batch(self, x, rows: int) -> jax.Array:
        """Host rows [N, ...] -> a global array [rows, ...] split over the mesh's batch axes."""
        return sharding_lib.put_batch(np.asarray(x), self.mesh, rows)

    # ----------------------------------------------------------------------------------------
    # Text.

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                      num_images: int = 1, clip_skip: int | None = None, guidance: bool = True):
        """Text embeddings (cond [N, S, D], uncond [N, S, D] or None without guidance), float32
        numpy, N = len(prompts) * num_images, each prompt's rows consecutive. One text-encoder call."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if num_images < 1 or int(num_images) != num_images:
            raise ValueError(f"num_images must be a positive integer, got {num_images}")
        skip = int(clip_skip or 0)
        if not 0 <= skip < self.text_encoder.num_layers:
            raise ValueError(f"clip_skip must be in [0, {self.text_encoder.num_layers}) for this text encoder "
                             f"({self.text_encoder.num_layers} layers), got {clip_skip}")
        neg_ids = None
        if guidance:
            if negative_prompt is None:
                negatives = [""] * len(prompts)
            elif isinstance(negative_prompt, str):
                negatives = [negative_prompt] * len(prompts)
            else:
                negatives = list(negative_prompt)
                if len(negatives) != len(prompts):
                    raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one "
                                     "per prompt, or a single string")
            neg_ids = jnp.asarray(self.tokenizer(negatives))
        ids = jnp.asarray(self.tokenizer(prompts))
        cond, uncond = sharding_lib.gather(self._text_fn(self.params["text_encoder"], ids, neg_ids, skip_layers=skip))
        cond = np.repeat(cond, int(num_images), axis=0)                                # [N, S, D]
        uncond = None if uncond is None else np.repeat(uncond, int(num_images), axis=0)
        return cond, uncond

    # ----------------------------------------------------------------------------------------
    # Sampling.

    def _sampler(self, name, num_steps, start_step, eta, options):
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
        opts.update(options)
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
        return samplers.get(name, self.schedule, int(num_steps), max_steps=max(self.max_steps, int(num_steps)), **opts)

    def _model_fn(self, cond, uncond, guidance_scale, guidance_rescale):
        params = self.params["unet"]
        if uncond is None:
            return jax.tree_util.Partial(self._unet_cond_fn, params, cond)
        return sampling.cfg(jax.tree_util.Partial(self._unet_fn, params), guidance_scale, cond, uncond,
                            guidance_rescale)

    def _noise(self, key, latents, shape) -> np.ndarray:
        """The start noise [N, h, w, C] on the host: `latents`, or drawn from `key` for exactly N rows."""
        if latents is None:
            return np.asarray(jax.random.normal(key, shape, jnp.float32))
        latents = np.asarray(latents, np.float32)
        if latents.shape != shape:
            raise ValueError(f"latents must be standard-normal noise of shape {list(shape)} ([N, H/{self.vae_scale_factor}, "
                             f"W/{self.vae_scale_factor}, {self.latent_channels}], NHWC), got {list(latents.shape)}")
        return latents

    def _run(self, *, plan, prompt, negative_prompt, guidance_scale, guidance_rescale, seed, num_images, height,
             width, latents, output_type, clip_skip, x0=None, extra=None, blend=None):
        guided = guidance_scale is not None and guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images=num_images, clip_skip=clip_skip,
                                          guidance=guided)
        # x0, extra and blend's image latents come from `_encode`: global arrays of `rows` rows.
        n = cond.shape[0]
        rows = self._rows(n)
        shape = (n, height // self.vae_scale_factor, width // self.vae_scale_factor, self.latent_channels)
        key = jax.random.PRNGKey(seed)
        k_noise, k_sample = jax.random.split(key)
        noise = self._batch(self._noise(k_noise, latents, shape), rows)              # [rows, h, w, C]
        cond = {"context": self._batch(cond, rows)}
        if uncond is not None:
            uncond = {"context": self._batch(uncond, rows)}
        if extra is not None:
            cond["extra"] = extra
            if uncond is not None:
                uncond["extra"] = cond["extra"]
        if blend is not None:
            mask, known = blend
            plan = masked_lib.masked(plan, self._batch(mask, rows), known, noise)
        model_fn = self._model_fn(cond, uncond, guidance_scale, guidance_rescale)
        out = sampling.sample(plan, model_fn, noise, k_sample, x0=x0)
        if output_type == "latent":
            return sharding_lib.gather(out)[:n]
        images = sharding_lib.gather(self._decode_fn(self.params["vae"], out))[:n].astype(np.float32)  # [N, H, W, 3]
        return images if output_type == "np" else _to_pil(images)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 num_steps: int = 30, sampler: str | None = None, guidance_scale: float = 7.5, seed: int = 0,
                 num_images: int = 1, height: int | None = None, width: int | None = None, latents=None,
                 output_type: str = "pil", guidance_rescale: float = 0.0, clip_skip: int | None = None,
                 eta: float | None = None, **sampler_options: Any):
        """Text to image.

        prompt: one string or a list; N = len(prompts) * num_images images, each prompt's images
            consecutive. negative_prompt: the unconditional text of guidance (default: empty).
        sampler: a `jaxdiff.samplers` name (default: the folder's scheduler, `default_sampler`);
            its options default to the scheduler config's and `**sampler_options` override them.
        guidance_scale: classifier-free guidance scale; <= 1 runs the conditional model alone.
        guidance_rescale: Lin et al. 2023's rescale phi. clip_skip: diffusers' clip_skip.
        eta: DDIM's eta (only for samplers with that option).
        height, width: pixels (default: the U-Net's sample_size x the VAE factor); multiples of
            `size_multiple`.
        latents: optional standard-normal noise [N, H/f, W/f, C] (NHWC) to start from instead of
            noise drawn from `seed`; the pipeline scales it by the sampler's initial sigma.
        output_type: "pil" (list of PIL images), "np" (float32 [N, H, W, 3] in [0, 1]) or "latent"
            (the final latents [N, H/f, W/f, C]).
        """
        _check_output_type(output_type)
        height, width = self._size(height, width)
        plan = self._sampler(sampler, num_steps, 0, eta, sampler_options)
        return self._run(plan=plan, prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, seed=seed, num_images=num_images, height=height,
                         width=width, latents=latents, output_type=output_type, clip_skip=clip_skip)

    generate = __call__

    # ----------------------------------------------------------------------------------------
    # Image to image, inpainting.

    def encode_images(self, images, *, key=None) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] -> scaled latents [B, H/f, W/f, C] float32: a posterior
        sample with `key` (what diffusers' pipelines use), its mean with key=None."""
        b = np.shape(images)[0]
        return jnp.asarray(sharding_lib.gather(self._encode(images, self._rows(b), key))[:b])

    def _encode(self, images, rows: int, key=None) -> jax.Array:
        """`encode_images` on the mesh: host images [B, H, W, 3] -> global latents [rows, h, w, C]
        (rows >= B, padded; the posterior noise is drawn for the B real rows only)."""
        mean, std = self._encode_fn(self.params["vae"], self._batch(images, rows))
        if key is None:
            z = mean
        else:
            eps = np.asarray(jax.random.normal(key, (np.shape(images)[0],) + mean.shape[1:], jnp.float32))
            z = mean + std * self._batch(eps, rows)
        return self._as_batch(vae_lib.scale_latents(self.vae, z))

    def _as_batch(self, x: jax.Array) -> jax.Array:
        """A global array [rows, ...] in the batch layout, whatever layout the op that made it
        chose: the sampling loop then sees the same input layouts every call."""
        return sharding_lib.place(x, sharding_lib.batch_sharding(self.mesh))

    def _start_step(self, num_steps, strength):
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1], got {strength}")
        run = min(int(num_steps * strength), num_steps)        # diffusers' get_timesteps
        if run < 1:
            raise ValueError(f"strength={strength} with num_steps={num_steps} leaves no step to run "
                             f"(int(num_steps * strength) = 0); raise strength or num_steps")
        return num_steps - run

    def img2img(self, image, prompt: str | Sequence[str], strength: float = 0.8,
                negative_prompt: str | Sequence[str] | None = None, *, num_steps: int = 30,
                sampler: str | None = None, guidance_scale: float = 7.5, seed: int = 0, num_images: int = 1,
                latents=None, output_type: str = "pil", guidance_rescale: float = 0.0,
                clip_skip: int | None = None, eta: float | None = None, sample_posterior: bool = True,
                height: int | None = None, width: int | None = None, **sampler_options: Any):
        """Image to image (SDEdit, Meng et al. 2022), as diffusers' `StableDiffusionImg2ImgPipeline`.

        image: a PIL image, a list of them, or floats [B, H, W, 3] / [H, W, 3] in [0, 1] (uint8
            arrays are read as 0..255); B is 1 (shared by all N outputs) or N. PIL images are
            resized to height x width when those are given.
        strength in [0, 1]: how much noise is added; the run skips the first
            num_steps - int(num_steps * strength) steps of the plan and starts there from the
            image latents noised to that level (the forward process, with `latents` or seeded
            noise [N, h, w, C]).
        sample_posterior: encode with a VAE posterior sample, as diffusers does (True), or with
            the posterior mean (False). Other arguments as `__call__`.
        """
        _check_output_type(output_type)
        start = self._start_step(num_steps, strength)
        plan = self._sampler(sampler, num_steps, start, eta, sampler_options)
        n = _num_outputs(prompt, num_images)
        pixels = _images_in(image, n, height, width, self.size_multiple)
        k_post = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
        x0 = self._encode(pixels, self._rows(n), key=k_post if sample_posterior else None)
        h, w = pixels.shape[1:3]
        return self._run(plan=plan, prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, seed=seed, num_images=num_images, height=h, width=w,
                         latents=latents, output_type=output_type, clip_skip=clip_skip, x0=x0)

    def inpaint(self, image, mask, prompt: str | Sequence[str], strength: float = 1.0,
                negative_prompt: str | Sequence[str] | None = None, *, num_steps: int = 30,
                sampler: str | None = None, guidance_scale: float = 7.5, seed: int = 0, num_images: int = 1,
                latents=None, output_type: str = "pil", guidance_rescale: float = 0.0,
                clip_skip: int | None = None, eta: float | None = None, sample_posterior: bool = True,
                height: int | None = None, width: int | None = None, **sampler_options: Any):
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
        _check_output_type(output_type)
        start = self._start_step(num_steps, strength) if strength < 1.0 else 0
        plan = self._sampler(sampler, num_steps, start, eta, sampler_options)
        n = _num_outputs(prompt, num_images)
        pixels = _images_in(image, n, height, width, self.size_multiple)
        h, w = pixels.shape[1:3]
        full_mask = _masks_in(mask, n, h, w)                                      # [N, H, W, 1] in {0, 1}
        f = self.vae_scale_factor
        small_mask = full_mask[:, ::f, ::f]                                      # [N, h, w, 1], nearest
        rows = self._rows(n)
        key = jax.random.PRNGKey(seed)
        k_image, k_masked = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
        nine = in_channels != self.latent_channels
        image_latents = None
        if start or not nine:
            image_latents = self._encode(pixels, rows, key=k_image if sample_posterior else None)
        extra = blend = None
        if nine:
            masked_pixels = pixels * (full_mask < 0.5)
            masked_latents = self._encode(masked_pixels, rows, key=k_masked if sample_posterior else None)
            extra = self._as_batch(jnp.concatenate([self._batch(small_mask, rows), masked_latents], axis=-1))  # [rows, h, w, 1 + C]
        else:
            blend = (small_mask, image_latents)
        return self._run(plan=plan, prompt=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                         guidance_rescale=guidance_rescale, seed=seed, num_images=num_images, height=h, width=w,
                         latents=latents, output_type=output_type, clip_skip=clip_skip,
                         x0=image_latents if start else None, extra=extra, blend=blend)


# --------------------------------------------------------------------------------------------
# Folders, images in and out.
# --------------------------------------------------------------------------------------------

def _check_output_type(output_type) -> None:
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")


def _num_outputs(prompt, num_images) -> int:
    return (1 if isinstance(prompt, str) else len(prompt)) * int(num_images)


def _batch(arrays: np.ndarray, n: int, what: str) -> np.ndarray:
    if arrays.shape[0] == n:
        return arrays
    if arrays.shape[0] == 1:
        return np.repeat(arrays, n, axis=0)
    raise ValueError(f"{arrays.shape[0]} {what}s for {n} outputs (len(prompts) * num_images); give 1 or {n}")


def _pil_list(x):
    try:
        from PIL import Image
    except ImportError:          # pragma: no cover
        return None
    if isinstance(x, Image.Image):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(i, Image.Image) for i in x):
        return list(x)
    return None


def _as_unit_floats(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"{what} values must lie in [0, 1] (float) or 0..255 (uint8), got {x.min():.3g}..{x.max():.3g}")
    return np.clip(x, 0.0, 1.0)


def _images_in(image, n, height, width, multiple) -> np.ndarray:
    """PIL image(s) or floats in [0, 1] -> float32 [n, H, W, 3] in [-1, 1]."""
    pil = _pil_list(image)
    if pil is not None:
        from PIL import Image
        size = None if height is None or width is None else (int(width), int(height))
        pil = [p.convert("RGB") for p in pil]
        pil = [p if size is None or p.size == size else p.resize(size, Image.LANCZOS) for p in pil]
        if len({p.size for p in pil}) > 1:
            raise ValueError("all images must have the same size")
        x = np.stack([np.asarray(p, np.float32) / 255.0 for p in pil])
    else:
        x = np.asarray(image)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"image must be a PIL image or an array [B, H, W, 3] / [H, W, 3] (NHWC, RGB), "
                             f"got shape {list(np.shape(image))}")
        x = _as_unit_floats(x, "image")
        if (height and x.shape[1] != height) or (width and x.shape[2] != width):
            raise ValueError(f"image arrays are not resized: got {x.shape[1]}x{x.shape[2]}, asked for "
                             f"{height}x{width}; resize it or pass a PIL image")
    h, w = x.shape[1:3]
    if h % multiple or w % multiple:
        raise ValueError(f"image height and width must be multiples of {multiple}, got {h}x{w}; resize or crop it "
                         f"(e.g. to {max(multiple, h // multiple * multiple)}x{max(multiple, w // multiple * multiple)}, "
                         "or pass height= and width= with a PIL image)")
    return _batch(x * 2.0 - 1.0, n, "image")


def _masks_in(mask, n, height, width) -> np.ndarray:
    """PIL mask(s) or floats in [0, 1] -> float32 [n, H, W, 1] in {0, 1} (binarised at 0.5)."""
    pil = _pil_list(mask)
    if pil is not None:
        from PIL import Image
        pil = [p.convert("L") for p in pil]
        pil = [p if p.size == (width, height) else p.resize((width, height), Image.LANCZOS) for p in pil]
        m = np.stack([np.asarray(p, np.float32) / 255.0 for p in pil])[..., None]
    else:
        m = np.asarray(mask)
        if m.ndim == 2:
            m = m[None, ..., None]
        elif m.ndim == 3:
            m = m[..., None]
        if m.ndim != 4 or m.shape[-1] != 1:
            raise ValueError(f"mask must be a PIL image or an array [B, H, W] / [B, H, W, 1] / [H, W], got shape "
                             f"{list(np.shape(mask))}")
        m = _as_unit_floats(m, "mask")
    if m.shape[1:3] != (height, width):
        raise ValueError(f"mask is {m.shape[1]}x{m.shape[2]} but the image is {height}x{width}; they must match")
    return _batch((m >= 0.5).astype(np.float32), n, "mask")


def _to_pil(images: np.ndarray):
    """float [N, H, W, 3] in [0, 1] -> list of PIL images (rounded as diffusers' numpy_to_pil)."""
    from PIL import Image

    return [Image.fromarray(im) for im in np.round(images * 255).astype(np.uint8)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [N, H, W, 3] in [0, 1] -> uint8, rounded as the "pil" output is."""
    return np.round(np.asarray(images) * 255).astype(np.uint8)
