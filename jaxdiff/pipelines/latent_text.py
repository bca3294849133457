"""Samples of a latent text-to-image training run (experiments/digits_text.py), and their score.

A thin front end of the sampling core (`pipelines/core.py`), as Stable Diffusion's is: the
caption states of the run's frozen text encoder are the conditioning, the empty caption's the
unconditional input of classifier-free guidance (on when the scale is > 1), the frozen
autoencoder decodes. The trainer calls `write_run_samples` (handed to it by the command line) at
the end of a run:

    samples.png                  one column per digit, rows of caption templates, at
                                 cfg.sample.guidance_scale
    samples_guidance_<s>.png     the same at every other cfg.sample.eval_guidance_scales
    text_eval.json               the share of samples a digit classifier reads as the digit their
                                 caption names (`jaxdiff.metrics.digits`), per scale, beside the
                                 classifier's accuracy on real held-out digits and on autoencoder
                                 reconstructions
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from jaxdiff import compiler, files, provenance, samplers
from jaxdiff import data as data_lib
from jaxdiff import images as images_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.metrics import digits as digits_metric
from jaxdiff.models.vae import decode_latents
from jaxdiff.pipelines import core
from jaxdiff.provenance import run as provenance_run
from jaxdiff.train.latent import encode_images


def _network(module, params, x, t, context):
    return module.apply({"params": params}, x, t, context=context)


@functools.lru_cache(maxsize=8)
def _networks(module, vae):
    """One network function and one jitted decoder per (U-Net, autoencoder): jit's cache keys."""
    return functools.partial(_network, module), compiler.jit(functools.partial(decode_latents, vae))


def grid_captions(num: int) -> np.ndarray:
    """Caption indices for a grid of `num` samples with one digit per column (10 columns):
    sample i shows digit i % 10 under template (i // 10) % len(CAPTION_TEMPLATES)."""
    i = np.arange(num)
    return (i % 10) * len(data_lib.CAPTION_TEMPLATES) + (i // 10) % len(data_lib.CAPTION_TEMPLATES)


def sample_images(run, params, caption_ids, guidance_scale: float, seed: int, *, mesh=None,
                  progress: bool = False) -> np.ndarray:
    """Images [N, H, W, C] in [0, 1] for the captions `caption_ids` [N] of the run's task
    (`cfg.sample.sampler`, `cfg.sample.steps`; x0 clipping off: latents are not confined to
    [-1, 1], and clipping them there shrinks the samples and loses the caption)."""
    cfg, task = run.cfg, run.task
    options = {"prediction_type": cfg.diffusion.prediction_type}
    if "clip_sample" in samplers.options(cfg.sample.sampler):
        options["clip_sample"] = False
    plan = samplers.get(cfg.sample.sampler, run.schedule, cfg.sample.steps, **options)
    network, decode = _networks(run.model, task.parts.vae)
    mesh = sharding_lib.inference_mesh("dp", jax.local_devices()) if mesh is None else mesh
    job = core.Job(network=network, params=params, sampler=plan, shape=tuple(task.image_shape),
                   num=len(caption_ids), seed=seed, cond=task.caption_states[np.asarray(caption_ids)],
                   uncond=task.null_context[None], guidance_scale=guidance_scale,
                   decode=functools.partial(decode, task.parts.vae_params))
    return core.run(job, mesh, output_type="np", progress=progress, desc=f"sample (guidance {guidance_scale:g})")


def write_run_samples(run, params, name: str = "samples.png", final: bool = True) -> dict[str, Any]:
    """Sample the grid (one digit per column) at `cfg.sample.guidance_scale` into `name`; at the
    end of a run (`final`), also at every `cfg.sample.eval_guidance_scales`, each scored with the
    digit classifier into `text_eval.json`. Returns the figures."""
    cfg, task, workdir = run.cfg, run.task, run.workdir
    num = cfg.sample.num
    ids = grid_captions(num)
    wanted = data_lib.caption_label(ids)                                            # [N]
    scales = [float(cfg.sample.guidance_scale)]
    if final:
        scales += [float(s) for s in cfg.sample.eval_guidance_scales if s not in scales]
    result: dict[str, Any] = {"num_samples": int(num), "sampler": cfg.sample.sampler,
                              "steps": int(cfg.sample.steps),
                              "captions": [task.captions[i] for i in ids[:10]]}
    classifier = None
    if final:
        classifier = digits_metric.fit_classifier(task.images, task.labels, cfg.seed)
        decode = _networks(run.model, task.parts.vae)[1]
        recon = np.clip(np.asarray(decode(task.parts.vae_params, encode_images(task.parts, task.images[:1000]))),
                        -1.0, 1.0)
        result["classifier_accuracy_real_heldout"] = classifier.heldout_accuracy
        result["classifier_accuracy_vae_reconstructions"] = digits_metric.accuracy(classifier, recon,
                                                                                   task.labels[:1000])
        result["accuracy"] = {}
    for s in scales:
        pictures = sample_images(run, params, ids, s, cfg.seed, progress=final and run.progress)        # [N, H, W, C] in [0, 1]
        path = name if s == scales[0] else f"samples_guidance_{s:g}.png"
        recipe = provenance_run.grid_recipe(
            run, params, path, final, sampler=cfg.sample.sampler, steps=cfg.sample.steps, guidance_scale=s, num=num,
            height=pictures.shape[1], width=pictures.shape[2], captions=[task.captions[i] for i in ids])
        provenance.save_png(images_lib.to_uint8(pictures), os.path.join(workdir, path), recipe, ncols=10)
        if classifier is not None:
            result["accuracy"][f"{s:g}"] = digits_metric.accuracy(classifier, pictures * 2 - 1, wanted)
            result.setdefault("grids", {})[f"{s:g}"] = path
    if final:
        files.write_json(result, os.path.join(workdir, "text_eval.json"))
    return result
