"""A latent text-to-image training run written out as a diffusers Stable Diffusion folder.

    jaxdiff export runs/digits_text --out digits_sd          # the command line
    export_run("runs/digits_text", "digits_sd")               # the same from Python
    pipe = jaxdiff.StableDiffusion.from_pretrained("digits_sd")
    pipe("a handwritten seven", guidance_scale=4.0, sampler="ddim")

A run of `experiments/digits_text.py` keeps everything a Stable Diffusion pipeline has, in
jaxdiff's own places: the U-Net in its checkpoints (the EMA weights are exported, as the trainer
samples with them), the frozen autoencoder, text encoder and tokenizer as folders in the work
dir (`train/frozen.py`), and the noise schedule and prediction type in its config. The export
puts them in the layout `StableDiffusionPipeline.save_pretrained` writes (`convert/folder.py`),
with a `DDIMScheduler` config that reproduces the run's schedule, so the folder loads in
`jaxdiff.StableDiffusion`, in diffusers, and as the frozen base of LoRA / ControlNet training.
"""

from __future__ import annotations

import json
import os

import jax

from jaxdiff.errors import CheckpointError


def scheduler_config(cfg) -> dict:
    """The diffusers `DDIMScheduler` config of a run's noise schedule and prediction type (x0
    clipping off: latents are not confined to [-1, 1]). steps_offset is 1 because diffusers'
    Stable Diffusion pipelines rewrite any other value to 1 when they load a folder; the run's
    own sample writer uses 0, a shift of one training step in each timestep."""
    d = cfg.diffusion
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": int(d.num_train_timesteps),
            "beta_schedule": str(d.schedule), "beta_start": float(d.beta_start), "beta_end": float(d.beta_end),
            "prediction_type": str(d.prediction_type), "rescale_betas_zero_snr": bool(d.rescale_betas_zero_snr),
            "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 1, "timestep_spacing": "leading"}


def export_run(path: str | os.PathLike, out: str | os.PathLike, step: int | None = None, *,
               ema: bool = True) -> list[str]:
    """Write the latent text run at `path` (a work dir, its checkpoints/ or one step folder) as a
    diffusers Stable Diffusion folder `out`. step: None = the latest readable step. ema: export
    the EMA weights (what the run samples with) rather than the raw ones. Returns the notes of
    `convert.folder.save_pretrained` (empty when the folder is complete).
    Raises CheckpointError naming what is missing (a pixel run, a work dir without its frozen
    parts, no readable checkpoint)."""
    from jaxdiff import config as config_lib
    from jaxdiff import sharding as sharding_lib
    from jaxdiff.checkpoint import Checkpointer, resolve
    from jaxdiff.convert import clip as clip_convert
    from jaxdiff.convert import folder as folder_convert
    from jaxdiff.convert import vae as vae_convert
    from jaxdiff.train import build, frozen

    directory, found = resolve(os.fspath(path))
    step = found if step is None else step
    workdir = os.path.dirname(directory)
    ckpt = Checkpointer(directory, read_only=True)
    try:
        cfg = config_lib.from_json(json.dumps(ckpt.read_config(step)))
        if not build.is_latent_text(cfg):
            raise CheckpointError(f"{path} is a pixel-space run; export writes latent text-to-image runs "
                                  "(experiments/digits_text.py) as Stable Diffusion folders. Load a pixel "
                                  "run with jaxdiff.load")
        sig = cfg.get("data_signature") or {}
        if "context_dim" not in sig:
            raise CheckpointError(f"{path}: the run's config lacks data_signature.context_dim")
        parts = {}
        for name, where, reader in (("vae", cfg.vae.path or os.path.join(workdir, frozen.VAE_DIR), vae_convert.load),
                                    ("text_encoder", os.path.join(workdir, frozen.TEXT_ENCODER_DIR), clip_convert.load)):
            if not os.path.isdir(where):
                raise CheckpointError(f"{path}: the run's {name} folder {where} is missing (export needs the "
                                      "work dir the run trained in, with its frozen parts)")
            parts[name] = reader(where)
        tokenizer = os.path.join(workdir, frozen.TOKENIZER_DIR)
        if not os.path.isdir(tokenizer):
            raise CheckpointError(f"{path}: the run's tokenizer folder {tokenizer} is missing")
        image_shape = tuple(sig["image_shape"])
        model = build.build_model(cfg, image_shape, None, sig["context_dim"])
        if image_shape[0] == image_shape[1]:
            model = model.clone(sample_size=image_shape[0])       # the pipeline's default size
        abstract = jax.eval_shape(build.init_state_fn(model, build.build_optimizer(cfg), image_shape, cfg.seed))
        mesh = sharding_lib.inference_mesh("dp", jax.local_devices())
        target = sharding_lib.with_shardings(abstract, sharding_lib.tree_shardings(abstract, mesh, "dp"))
        state, _ = ckpt.restore(target, step)
    finally:
        ckpt.close()
    params = sharding_lib.gather(state.ema_params if ema else state.params)
    components = {"unet": (model, params), "vae": parts["vae"], "text_encoder": parts["text_encoder"],
                  "scheduler": scheduler_config(cfg)}
    return folder_convert.save_pretrained(out, components, tokenizer_dir=tokenizer)
