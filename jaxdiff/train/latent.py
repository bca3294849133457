"""Latent text-to-image training data (Rombach et al. 2022): cached VAE latents plus the frozen
text encoder's states of each example's caption, and the run's closing samples and score.

`jaxdiff train` takes this path when the config has a `vae` section (see
experiments/digits_text.py; `build.is_latent_text` is the one place that decides). Before the first step it

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

With `model.kind="dit"` the task is `LatentClassTask`: the same latents, conditioned on the
digit labels (a class-conditional DiT takes no text).

The U-Net is then trained by the ordinary trainer with `step.context_condition` (caption states
replaced by the empty caption's with probability `text.dropout`). Its samples (one column per
digit, with classifier-free guidance, decoded by the autoencoder and scored by a digit
classifier) are written by `jaxdiff.pipelines.latent_text`, which the command line hands the
trainer as its sample writer.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from jaxdiff import compiler
from jaxdiff import data as data_lib
from jaxdiff.errors import DataError
from jaxdiff.models.vae import vae_latents
from jaxdiff.train import frozen
from jaxdiff.train import task as task_lib
from jaxdiff.train.step import context_condition

CACHE_DIR = "cache"
LATENTS_FILE = "latents.npz"
TEXT_FILE = "text.npz"


def encode_images(parts: frozen.FrozenParts, images: np.ndarray, chunk: int = 500) -> np.ndarray:
    """Scaled posterior-mean latents of `images` [N, H, W, C]: float32 [N, h, w, c]."""
    encode = compiler.jit(lambda p, x: vae_latents(parts.vae, p, x))
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


class LatentTextTask:
    """The latent text-to-image task (see `train/task.py`), over cached latents.

    Attributes:
      dataset: the `data.ImageDataset` of batches (see the module docstring).
      image_shape: (h, w, c) of the latents; num_classes: None (the conditioning is the text).
      context_dim: text-encoder width D; null_context: float32 [S, D], the empty caption's states.
      captions: the distinct caption strings; caption_states: float32 [K, S, D].
      parts: the frozen `frozen.FrozenParts`.
      pixel_shape: (H, W, C) of the images; images / labels: the real images and labels (for
        scoring).
    """

    kind = task_lib.LATENT_TEXT

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
        self.summary = ("{:,} images {}x{}x{} with {} distinct captions, trained on as autoencoder latents "
                        "{}x{}x{}".format(len(images), *self.pixel_shape, len(captions), *self.image_shape))

    def iterator(self, state: dict | None = None):
        return self.dataset.iterator(state)

    def condition(self, cfg: ml_collections.ConfigDict, model=None):
        """The training step's conditioning: caption states, dropped to the empty caption's."""
        return context_condition(cfg.text.dropout, self.null_context)


class LatentClassTask(LatentTextTask):
    """The same cached latents, conditioned on the digit labels instead of the captions: the
    task of a class-conditional DiT (`model.kind="dit"`) with a `vae` section. num_classes: the
    labels' count; no text context (the caption states stay cached but are not read)."""

    kind = task_lib.LATENT_CLASS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_classes = int(np.max(self.labels)) + 1
        self.context_dim = None
        self.summary = self.summary.replace(f"with {len(self.captions)} distinct captions", "with class labels")

    def condition(self, cfg: ml_collections.ConfigDict, model=None):
        """The training step's conditioning: class labels, dropped to the null class."""
        return task_lib.class_condition(cfg, model)


def captioned_examples(cfg: ml_collections.ConfigDict, what: str):
    """(examples, captions) of the whole captioned set `cfg.data` names, as `data.load_examples`
    returns them; a set without captions is one DataError saying `what` needs them."""
    examples, captions = data_lib.load_examples(
        cfg.data.dataset, image_size=data_lib.resolve_image_size(cfg.data.dataset, cfg.data.image_size),
        channels=cfg.data.channels or None, data_dir=cfg.data.data_dir or None)
    if captions is None or "caption" not in examples:
        raise DataError(f"dataset {cfg.data.dataset!r} has no captions; {what} needs a captioned set "
                        "(e.g. --config.data.dataset=captioned_digits)")
    return examples, captions


def build(cfg: ml_collections.ConfigDict, workdir: str, *, batch_size: int, process_index: int,
          process_count: int) -> LatentTextTask:
    """Frozen parts, caches and the pipeline for a latent run (see the module docstring);
    `batch_size` is the per-process batch."""
    examples, captions = captioned_examples(cfg, "text-to-image training")
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
    kind = LatentClassTask if cfg.model.get("kind", "unet") == "dit" else LatentTextTask
    return kind(ds, null_context=null, captions=captions, caption_states=states,
                parts=parts, images=images, labels=labels)
