"""What a run trains on. A task is chosen once from the config (`build.build_task`) and is the
only thing the trainer asks about the data:

    kind          "pixel" (images and class labels) | "latent_text" (autoencoder latents and
                  caption states; see `train/latent.py`) | "latent_class" (the same latents
                  with class labels, for a class-conditional DiT) | "lora" (the same over a frozen
                  Stable Diffusion base, training adapters only; see `train/lora.py`) |
                  "controlnet" (the same, training a ControlNet; see `train/controlnet.py`)
    image_shape   (H, W, C) of what the network denoises (pixels, or latents)
    num_classes   the number of classes (None: no labels)
    context_dim   width D of the text context (None: no text)
    iterator(state=None)     the resumable batch iterator (grain; its state is checkpointed)
    condition(cfg, model)    -> condition(batch, key) -> the network's conditioning kwargs, with
                             the dropout classifier-free guidance learns from

Sample writing is not the trainer's: `loop.train(..., write_samples=...)` takes a callback (the
command line passes `jaxdiff.pipelines.write_run_samples`, which picks a writer by `kind`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import ml_collections

from jaxdiff.train.step import label_condition

PIXEL = "pixel"
LATENT_TEXT = "latent_text"
LATENT_CLASS = "latent_class"
LORA = "lora"
CONTROLNET = "controlnet"


class Task(Protocol):
    kind: str
    image_shape: tuple[int, int, int]
    num_classes: int | None
    context_dim: int | None

    def iterator(self, state: dict | None = None) -> Any: ...

    def condition(self, cfg: ml_collections.ConfigDict, model) -> Callable: ...


def class_condition(cfg: ml_collections.ConfigDict, model) -> Callable:
    """`condition(batch, key)` for a pixel network: its class labels, each replaced by the null
    class with probability `cfg.diffusion.label_dropout` (no labels for an unconditional one)."""
    return label_condition(cfg.diffusion.label_dropout, model.num_classes or None)


class PixelTask:
    """Images with (optional) class labels: a `jaxdiff.data.ImageDataset` as the trainer sees it.
    `summary` says what was loaded (name, count, native size and any resize)."""

    kind = PIXEL
    context_dim = None

    def __init__(self, dataset):
        self.dataset = dataset
        self.image_shape = tuple(dataset.image_shape)
        self.num_classes = dataset.num_classes
        self.summary = dataset.summary

    def iterator(self, state: dict | None = None):
        return self.dataset.iterator(state)

    def condition(self, cfg: ml_collections.ConfigDict, model) -> Callable:
        return class_condition(cfg, model)
