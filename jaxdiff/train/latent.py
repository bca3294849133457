"""Latent text-to-image training data (Rombach et al. 2022): cached VAE latents plus the frozen
text encoder's states of each example's caption, and the run's closing samples and score.

`jaxdiff train` takes this path when the config has a `vae` section (see
experiments/digits_text.py). Before the first step it

1. builds or loads the frozen parts in the work dir (`frozen.build_or_load`: fits the
   autoencoder if `WORKDIR/vae` is missing, learns the tokenizer, creates the text encoder);
2. encodes every image once to the *posterior mean* latent, scaled by the autoencoder's
   `scaling_factor` (`vae_latents` with no key; no sample is drawn, so the cache is a function
   of the weights alone), and embeds every distinct caption once, plus the empty caption "" as
   the null condition for classifier-free guidance; both go to `WORKDIR/cache/` and are read back
   on resume instead of recomputed;
3. serves batches through `data.from_arrays` (the same shuffled, resumable grain pipeline as
   pixel data): `{"image": latents [B, h, w, c], "label": [B], "caption": [B],
   "context": [B, S, D]}`.

The U-Net is then trained by the ordinary trainer with `step.context_condition` (caption states
replaced by the empty caption's with probability `text.dropout`). At the end `write_outputs`
samples one column per digit with classifier-free guidance, decodes with the autoencoder, writes
the PNG grids, and scores how well samples follow their captions with a logistic-regression
digit classifier fitted on the real images (`text_eval.json`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import data as data_lib
from jaxdiff import images as images_lib
from jaxdiff import samplers, sampling
from jaxdiff.errors import DataError
from jaxdiff.models.vae import decode_latents, vae_latents
from jaxdiff.train import frozen
from jaxdiff.train.step import context_condition

CACHE_DIR = "cache"
LATENTS_FILE = "latents.npz"
TEXT_FILE = "text.npz"


def is_latent_run(cfg: ml_collections.ConfigDict) -> bool:
    """A config with a `vae` section trains on autoencoder latents with text conditioning."""
    return "vae" in cfg


def encode_images(parts: frozen.FrozenParts, images: np.ndarray, chunk: int = 500) -> np.ndarray:
    """Scaled posterior-mean latents of `images` [N, H, W, C]: float32 [N, h, w, c]."""
    encode = jax.jit(lambda p, x: vae_latents(parts.vae, p, x))
    return np.concatenate([np.asarray(encode(parts.vae_params, images[i:i + chunk]))
                           for i in range(0, len(images), chunk)])


def _cached(path: str, compute, is_writer: bool) -> dict[str, np.ndarray]:
    """The arrays saved at `path`, or `compute()` saved there first (by the writer)."""
    if os.path.isfile(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = compute()
    if is_writer:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: a half-written cache is never read
    return arrays


class LatentData:
    """What the trainer reads from a dataset, over cached latents.

    Attributes:
      dataset: the `data.ImageDataset` of batches (see the module docstring).
      image_shape: (h, w, c) of the latents; num_classes: None (the conditioning is the text).
      context_dim: text-encoder width D; null_context: float32 [S, D], the empty caption's states.
      captions: the distinct caption strings; caption_states: float32 [K, S, D].
      parts: the frozen `frozen.FrozenParts`.
      pixel_shape: (H, W, C) of the images; images / labels: the real images and labels (for
        scoring).
    """

    def __init__(self, dataset, *, null_context, captions, caption_states, parts, images, labels):
        self.dataset = dataset
        self.image_shape = dataset.image_shape
        self.num_classes = None
        self.context_dim = int(null_context.shape[-1])
        self.null_context = null_context
        self.captions = captions
        self.caption_states = caption_states
        self.parts = parts
        self.images = images
        self.labels = labels
        self.pixel_shape = tuple(images.shape[1:])

    def iterator(self, state: dict | None = None):
        return self.dataset.iterator(state)

    def condition(self, cfg: ml_collections.ConfigDict):
        """The training step's conditioning: caption states, dropped to the empty caption's."""
        return context_condition(cfg.text.dropout, self.null_context)


def build(cfg: ml_collections.ConfigDict, workdir: str, *, batch_size: int, process_index: int,
          process_count: int) -> LatentData:
    """Frozen parts, caches and the pipeline for a latent run (see the module docstring);
    `batch_size` is the per-process batch."""
    examples, captions = data_lib.load_examples(
        cfg.data.dataset, image_size=cfg.data.image_size or None,
        channels=cfg.data.channels or None, data_dir=cfg.data.data_dir or None)
    if captions is None or "caption" not in examples:
        raise DataError(
            f"dataset {cfg.data.dataset!r} has no captions; text-to-image training needs a "
            "captioned set (e.g. --config.data.dataset=captioned_digits)")
    images, labels = examples["image"], examples["label"]
    parts = frozen.build_or_load(cfg, workdir, images, captions)
    writer = jax.process_index() == 0
    cache = os.path.join(workdir, CACHE_DIR)
    lat = _cached(os.path.join(cache, LATENTS_FILE),
                  lambda: {"latents": encode_images(parts, images)}, writer)["latents"]
    text = _cached(os.path.join(cache, TEXT_FILE), lambda: {
        "states": frozen.embed_texts(parts, captions),
        "null": frozen.embed_texts(parts, [""])[0]}, writer)
    states, null = text["states"], text["null"]                      # [K, S, D], [S, D]
    context = states[examples["caption"]]                             # [N, S, D]
    ds = data_lib.from_arrays(
        lat, labels, batch_size=batch_size, seed=cfg.seed,
        extras={"caption": examples["caption"], "context": context}, captions=captions,
        description=f"latents of {cfg.data.dataset}", process_index=process_index,
        process_count=process_count)
    return LatentData(ds, null_context=null, captions=captions, caption_states=states,
                      parts=parts, images=images, labels=labels)


# ------------------------------------------------------------------------------------------
# Samples and their score.


def _network(module, params, x, t, context):
    return module.apply({"params": params}, x, t, context=context)


def grid_captions(num: int) -> np.ndarray:
    """Caption indices for a grid of `num` samples with one digit per column (10 columns):
    sample i shows digit i % 10 under template (i // 10) % len(CAPTION_TEMPLATES)."""
    i = np.arange(num)
    return (i % 10) * len(data_lib.CAPTION_TEMPLATES) + (i // 10) % len(data_lib.CAPTION_TEMPLATES)


def sample_latents(cfg, module, schedule, params, data: LatentData, caption_ids, guidance_scale,
                   seed: int) -> np.ndarray:
    """Latents [N, h, w, c] for captions `caption_ids` [N] with classifier-free guidance
    (`cfg.sample.sampler`, `cfg.sample.steps`, x0 clipping off)."""
    # Latents are not confined to [-1, 1]: DDIM / DDPM must not clip their x0 estimates there
    # (their pixel-space default, as in diffusers; with it, samples shrink and lose the caption).
    no_clip = {"clip_sample": False} if "clip_sample" in samplers.options(cfg.sample.sampler) else {}
    plan = samplers.get(cfg.sample.sampler, schedule, cfg.sample.steps,
                        prediction_type=cfg.diffusion.prediction_type, **no_clip)
    k_noise, k_run = jax.random.split(jax.random.PRNGKey(seed))
    noise = jax.random.normal(k_noise, (len(caption_ids),) + tuple(data.image_shape))
    cond = jnp.asarray(data.caption_states[np.asarray(caption_ids)])              # [N, S, D]
    network = jax.tree_util.Partial(functools.partial(_network, module), params)  # module static
    guided = sampling.cfg(network, guidance_scale,
                          cond, jnp.asarray(data.null_context)[None])
    return np.asarray(sampling.sample(plan, guided, noise, k_run))


def decode(data: LatentData, latents: np.ndarray) -> np.ndarray:
    """Scaled latents -> images [N, H, W, C] in [-1, 1] (clipped)."""
    parts = data.parts
    out = jax.jit(lambda p, z: decode_latents(parts.vae, p, z))(parts.vae_params, latents)
    return np.clip(np.asarray(out), -1.0, 1.0)


def fit_digit_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0):
    """Logistic regression on flattened pixels, fitted on 4/5 of the real images.

    Returns (classifier, accuracy on the held-out fifth)."""
    from sklearn.linear_model import LogisticRegression

    x = images.reshape(len(images), -1)                                            # [N, H*W*C]
    order = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) * 4 // 5
    train, test = order[:cut], order[cut:]
    clf = LogisticRegression(max_iter=300, C=0.5)
    clf.fit(x[train], labels[train])
    return clf, float(clf.score(x[test], labels[test]))


def write_outputs(cfg, module, schedule, state, data: LatentData, workdir: str,
                  name: str = "samples.png", evaluate: bool = True) -> dict[str, Any]:
    """Sample the grid (one digit per column) at `cfg.sample.guidance_scale` into `name`; with
    `evaluate`, also at every `cfg.sample.eval_guidance_scales`, and score each with the digit
    classifier. Returns (and writes to WORKDIR/text_eval.json) the figures."""
    num = cfg.sample.num
    ids = grid_captions(num)
    wanted = data_lib.caption_label(ids)                                            # [N]
    scales = [float(cfg.sample.guidance_scale)]
    if evaluate:
        scales += [float(s) for s in cfg.sample.eval_guidance_scales if s not in scales]
    params = state.ema_params
    result: dict[str, Any] = {"num_samples": int(num), "sampler": cfg.sample.sampler,
                              "steps": int(cfg.sample.steps),
                              "captions": [data.captions[i] for i in ids[:10]]}
    clf = None
    if evaluate:
        clf, real_acc = fit_digit_classifier(data.images, data.labels, cfg.seed)
        recon = decode(data, encode_images(data.parts, data.images[:1000]))
        result["classifier_accuracy_real_heldout"] = real_acc
        result["classifier_accuracy_vae_reconstructions"] = float(
            clf.score(recon.reshape(len(recon), -1), data.labels[:1000]))
        result["accuracy"] = {}
    for s in scales:
        imgs = decode(data, sample_latents(cfg, module, schedule, params, data, ids, s, cfg.seed))
        path = name if s == scales[0] else f"samples_guidance_{s:g}.png"
        images_lib.save_grid(images_lib.to_uint8(imgs), os.path.join(workdir, path), ncols=10)
        if clf is not None:
            pred = clf.predict(imgs.reshape(len(imgs), -1))
            result["accuracy"][f"{s:g}"] = float(np.mean(pred == wanted))
            if s != scales[0]:
                result.setdefault("grids", {})[f"{s:g}"] = path
    if evaluate:
        result.setdefault("grids", {})[f"{scales[0]:g}"] = name
        with open(os.path.join(workdir, "text_eval.json"), "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    return result
