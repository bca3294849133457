"""CLIP score (Hessel et al. 2021): how well images match their captions, by a CLIP model.

For each (image, caption) pair the score is 100 times the cosine between CLIP's projected image
and text embeddings, clipped at 0; the metric is its mean over the pairs (torchmetrics'
`CLIPScore` definition, without the "CLIP-S" weight w = 2.5 of the paper):

    s_i = 100 * max(cos(E_I(image_i), E_T(caption_i)), 0),        CLIPScore = (1/N) sum_i s_i

    scorer = ClipScore.from_pretrained("clip-vit-large-patch14")   # a local CLIPModel folder
    for images, prompts in batches:                                # images [B, H, W, 3]
        scorer.update(images, prompts)
    scorer.compute()                                               # float, e.g. 31.2
    clip_score(images, prompts, "clip-vit-large-patch14")          # the same in one call

Images are RGB [N, H, W, 3], uint8 0..255 or floats in [0, 1] (what the pipelines return with
output_type "uint8" / "np"; model-space [-1, 1] images map there by `jaxdiff.images.to_unit`). They
are preprocessed as CLIP's processor does (`models.clip_vision.preprocess`, the folder's
preprocessor_config.json). Captions are tokenized to the text tower's context length (77 for
every released CLIP), truncated as transformers' processor does.

The state is two numbers (sum of s_i, count), so batches stream and states merge (`merge`), e.g.
across hosts. The lower-level pieces take embeddings or token ids directly:

    pair_scores(image_embeds [N, E], text_embeds [N, E]) -> [N]      100 * max(cos, 0)
    ClipScoreState(total, count); update_state(state, scores); merge(a, b); result(state)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler
from jaxdiff.convert import clip_vision as clip_vision_convert
from jaxdiff.models.clip_vision import CLIPVisionEncoder, preprocess
from jaxdiff.models.text import CLIPTextEncoder


class ClipScoreState(NamedTuple):
    """Streaming CLIP score: the sum of the pair scores and how many pairs."""

    total: float = 0.0
    count: int = 0


def pair_scores(image_embeds, text_embeds) -> np.ndarray:
    """[N, E], [N, E] -> float32 [N]: 100 * max(cos(image_i, text_i), 0) (float64 on the host)."""
    a, b = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"image and text embeddings must both be [N, E], got {a.shape} and {b.shape}")
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (100.0 * np.maximum(cos, 0.0)).astype(np.float32)


def update_state(state: ClipScoreState, scores) -> ClipScoreState:
    scores = np.asarray(scores, np.float64)
    return ClipScoreState(state.total + float(scores.sum()), state.count + int(scores.size))


def merge(a: ClipScoreState, b: ClipScoreState) -> ClipScoreState:
    return ClipScoreState(a.total + b.total, a.count + b.count)


def result(state: ClipScoreState) -> float:
    if state.count == 0:
        raise ValueError("no image-caption pairs were scored (the CLIP score of nothing is undefined)")
    return state.total / state.count


@functools.partial(compiler.jit, static_argnums=0)
def _image_embeds(module: CLIPVisionEncoder, params, pixels):
    return module.apply({"params": params}, pixels).image_embeds


@functools.partial(compiler.jit, static_argnums=0)
def _text_embeds(module: CLIPTextEncoder, params, ids):
    return module.apply({"params": params}, ids).text_embeds


class ClipScore:
    """A CLIP model and a running `ClipScoreState` (see the module docstring).

    text, text_params: a `CLIPTextEncoder` with `projection_dim` and its parameters.
    vision, vision_params: a `CLIPVisionEncoder` with the same `projection_dim`.
    tokenizer: a `jaxdiff.models.tokenizer.CLIPTokenizer` (needed for `update` with strings).
    transform: a `convert.clip_vision.ImageTransform` (default: CLIP's 224 px preprocessing).
    batch_size: images per network call (the last batch is padded, so each tower compiles once).
    """

    def __init__(self, text: CLIPTextEncoder, text_params, vision: CLIPVisionEncoder, vision_params, *,
                 tokenizer=None, transform: clip_vision_convert.ImageTransform | None = None, batch_size: int = 32):
        if text.projection_dim is None or vision.projection_dim != text.projection_dim:
            raise ValueError(f"CLIP score needs both towers projected to one space; text projection_dim="
                             f"{text.projection_dim}, vision projection_dim={vision.projection_dim}")
        self.text, self.vision = text, vision
        self.text_params = jax.tree.map(jnp.asarray, text_params)
        self.vision_params = jax.tree.map(jnp.asarray, vision_params)
        self.tokenizer = tokenizer
        self.transform = transform or clip_vision_convert.ImageTransform()
        self.batch_size = int(batch_size)
        self.state = ClipScoreState()

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, batch_size: int = 32) -> ClipScore:
        """From a local transformers CLIPModel folder (config.json, model.safetensors, the
        tokenizer files and preprocessor_config.json, as openai/clip-vit-large-patch14 ships)."""
        from jaxdiff.models.tokenizer import CLIPTokenizer

        parts = clip_vision_convert.load_clip(os.fspath(folder))
        return cls(parts.text, parts.text_params, parts.vision, parts.vision_params,
                   tokenizer=CLIPTokenizer.from_dir(os.fspath(folder)),
                   transform=clip_vision_convert.read_preprocessor(os.fspath(folder)), batch_size=batch_size)

    def image_embeds(self, images) -> np.ndarray:
        """images [N, H, W, 3] (uint8, or floats in [0, 1]) -> float32 [N, E]."""
        t = self.transform
        pixels = preprocess(images, t.size, t.crop_size, t.mean, t.std)  # [N, S, S, 3]
        if pixels.shape[1] != self.vision.image_size:
            raise ValueError(f"the preprocessor crops to {pixels.shape[1]} px, the vision tower reads "
                             f"{self.vision.image_size} px")
        return _batched(lambda x: _image_embeds(self.vision, self.vision_params, x), pixels, self.batch_size)

    def text_embeds(self, prompts: str | Sequence[str] | np.ndarray) -> np.ndarray:
        """Captions (strings, or token ids int [N, T]) -> float32 [N, E]."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, np.ndarray) and np.issubdtype(prompts.dtype, np.integer):
            ids = prompts
        else:
            if self.tokenizer is None:
                raise ValueError("this ClipScore has no tokenizer: pass token ids, or build it with tokenizer=")
            ids = self.tokenizer(list(prompts), max_length=self.text.max_position_embeddings)
        return _batched(lambda x: _text_embeds(self.text, self.text_params, x), np.asarray(ids, np.int32),
                        self.batch_size)

    def scores(self, images, prompts) -> np.ndarray:
        """The per-pair scores [N] of images [N, H, W, 3] and their N captions (state unchanged)."""
        img = self.image_embeds(images)
        txt = self.text_embeds(prompts)
        if len(img) != len(txt):
            raise ValueError(f"{len(img)} images but {len(txt)} captions; CLIP score pairs them one to one")
        return pair_scores(img, txt)

    def update(self, images, prompts) -> np.ndarray:
        """Score a batch of pairs and add them to the running state; returns the batch's scores."""
        s = self.scores(images, prompts)
        self.state = update_state(self.state, s)
        return s

    def compute(self) -> float:
        """The mean clipped score over every pair seen since construction or `reset`."""
        return result(self.state)

    def reset(self) -> None:
        self.state = ClipScoreState()


def clip_score(images, prompts, folder: str | os.PathLike, *, batch_size: int = 32) -> float:
    """The CLIP score of images [N, H, W, 3] against their N captions, by the CLIPModel folder."""
    scorer = ClipScore.from_pretrained(folder, batch_size=batch_size)
    scorer.update(images, prompts)
    return scorer.compute()


def _batched(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over x in batches of batch_size (the last padded by repeating its last row, then cut)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(x)
    if n == 0:
        raise ValueError("nothing to embed (got an empty batch)")
    b = min(batch_size, n)
    out = []
    for s in range(0, n, b):
        chunk = x[s:s + b]                                                   # [<=b, ...]
        pad = b - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(fn(chunk), np.float32)[:b - pad])
    return np.concatenate(out)
