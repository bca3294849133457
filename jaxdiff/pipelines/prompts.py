"""Prompts -> the U-Net's conditioning, for the Stable Diffusion family (1.x, 2.x and XL).

    encoder = prompts.PromptEncoder([(text_encoder, tokenizer)], xl=False)           # SD 1.x / 2.x
    encoder = prompts.PromptEncoder([(te1, tok1), (te2, tok2)], xl=True)            # SDXL base
    cond, uncond = encoder(params_tuple, prompts.Text.take("a cat", None, kwargs), num_images=2,
                           clip_skip=None, guidance=True, height=1024, width=1024, mode="text")

`cond` is the dict the U-Net call reads (`stable_diffusion._unet`), host float32 arrays with one
row per image, N = len(prompts) * num_images, each prompt's rows consecutive:

    SD 1.x / 2.x   {"context": [N, 77, D]}          last hidden state (clip_skip: k layers earlier,
                                                    through the final LayerNorm)
    SDXL           {"context": [N, 77, D1 + D2],    penultimate hidden states of both encoders
                                                    (no final LayerNorm), joined on features
                    "text_embeds": [N, P],          encoder 2's projected pooled output
                    "time_ids": [N, 6 or 5]}        micro-conditioning (below)

`uncond` is the same for the negative prompt (None without guidance). SDXL with
`force_zeros_for_empty_prompt` (model_index.json; SDXL's default) and no negative prompt uses
zeros for "context" and "text_embeds" instead of encoding "", as diffusers' SDXL pipelines do.
A refiner has encoder 2 alone: its hidden states are the context.

Micro-conditioning (Podell et al. 2023, section 2.2; diffusers' `_get_add_time_ids`):
time_ids = original_size + crops_coords_top_left + target_size, each (height, width) /
(top, left), defaulting to the output size and (0, 0); a refiner (`requires_aesthetics_score`)
takes original_size + crops_coords_top_left + (aesthetic_score,) instead (6.0 / 2.5 for the
negative). The negative row follows diffusers' pipelines exactly: text-to-image uses the positive
row unless both negative_original_size and negative_target_size are given; image-to-image and
inpainting default each negative size to the positive one and (without aesthetics) use the
positive crop corner.

Every array here is a traced leaf of the sampling loop, so new prompts, sizes or scores reuse the
compiled program; the encoders compile once per clip_skip value and kind of negative (encoded,
zeros, none).

Requests repeat prompts (a server, a seed sweep, a guidance study), so the encoder's outputs are
kept in a small LRU cache (`EmbeddingCache`) keyed by the texts each encoder reads, the negatives,
clip_skip and the identity of the encoder parameters (new weights, a loaded LoRA or another LoRA
scale miss the cache): a repeated request runs no text encoder.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler
from jaxdiff import sharding as sharding_lib
from jaxdiff.models import lora as lora_lib
from jaxdiff.pipelines import options as options_lib

SIZE_OPTIONS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                "negative_crops_coords_top_left", "negative_target_size")
XL_OPTIONS = ("prompt_2", "negative_prompt_2", *SIZE_OPTIONS, "aesthetic_score", "negative_aesthetic_score")


def as_list(prompt, what: str = "prompt") -> list[str]:
    """One string or a non-empty list of strings -> a list (one-line ValueError otherwise)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def _per_prompt(texts, n: int, what: str) -> list[str]:
    """A negative / second prompt: one string for all n prompts, or a list of n."""
    if isinstance(texts, str):
        return [texts] * n
    texts = as_list(texts, what)
    if len(texts) != n:
        raise ValueError(f"{len(texts)} {what}s for {n} prompts; give one string per prompt, or a single string")
    return texts


def _pair(value, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (height, width) or (top, left), got {value!r}") from None
    if not (np.isfinite(a) and np.isfinite(b)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return a, b


@dataclasses.dataclass(frozen=True)
class Text:
    """The text side of one call: prompts, negative prompts and (SDXL) the second prompts and
    the micro-conditioning (see the module docstring; None = diffusers' default)."""

    prompt: Any
    negative_prompt: Any = None
    prompt_2: Any = None
    negative_prompt_2: Any = None
    original_size: tuple | None = None
    crops_coords_top_left: tuple | None = None
    target_size: tuple | None = None
    negative_original_size: tuple | None = None
    negative_crops_coords_top_left: tuple | None = None
    negative_target_size: tuple | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    @classmethod
    def take(cls, prompt, negative_prompt, kwargs: dict) -> Text:
        """The Text of a call; pops the SDXL options (XL_OPTIONS) out of `kwargs`."""
        given = {k: kwargs.pop(k) for k in XL_OPTIONS if k in kwargs}
        for k in SIZE_OPTIONS:
            given[k] = _pair(given.get(k), k)
        for k in ("aesthetic_score", "negative_aesthetic_score"):
            if k in given:
                v = given[k]
                if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v):
                    raise ValueError(f"{k} must be a finite number, got {v!r}")
        return cls(prompt=prompt, negative_prompt=negative_prompt, **given)

    def xl_given(self) -> list[str]:
        """The SDXL-only options this call set."""
        return [k for k in XL_OPTIONS if getattr(self, k) is not None and k not in (
            "aesthetic_score", "negative_aesthetic_score")] + [
            k for k, d in (("aesthetic_score", 6.0), ("negative_aesthetic_score", 2.5)) if getattr(self, k) != d]


def time_ids(text: Text, height: int, width: int, *, aesthetics: bool, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) micro-conditioning rows [1, 6] (or [1, 5] with aesthetics), float32,
    as diffusers' SDXL pipelines build them; mode: "text" (text-to-image) or "image"
    (image-to-image, inpainting). See the module docstring."""
    size = (float(height), float(width))
    original = text.original_size or size
    target = text.target_size or size
    crops = text.crops_coords_top_left or (0.0, 0.0)
    neg_crops = text.negative_crops_coords_top_left or (0.0, 0.0)
    if mode == "text" and not aesthetics:
        pos = original + crops + target
        both = text.negative_original_size is not None and text.negative_target_size is not None
        neg = text.negative_original_size + neg_crops + text.negative_target_size if both else pos
    else:
        neg_original = text.negative_original_size or original
        neg_target = text.negative_target_size or target
        if aesthetics:
            pos = original + crops + (float(text.aesthetic_score),)
            neg = neg_original + neg_crops + (float(text.negative_aesthetic_score),)
        else:
            pos = original + crops + target
            neg = neg_original + crops + neg_target
    return np.asarray([pos], np.float32), np.asarray([neg], np.float32)


def _encode_text(modules, xl: bool, params, ids, neg_ids, skip: int):
    """(context [P, S, D], pooled [P, P'] or None) of the prompts and of the negatives (or None),
    float32. params: one tree per encoder (or a `models.lora.Adapted`); ids / neg_ids: one [P, S]
    int array per encoder."""

    def one(all_ids, skip_layers):
        contexts, pooled = [], None
        for module, p, x in zip(modules, params, all_ids):
            p = lora_lib.resolve(p)                   # a LoRA-adapted tree is merged here, inside the call
            if not xl:
                out = module.apply({"params": p}, x, skip_layers=skip_layers)
                contexts.append(out.last_hidden_state)
                continue
            out = module.apply({"params": p}, x, output_hidden_states=True)
            contexts.append(out.hidden_states[-(skip_layers + 2)])                   # [P, S, D_i]
            pooled = out.text_embeds
        context = jnp.concatenate([c.astype(jnp.float32) for c in contexts], axis=-1)  # [P, S, sum D_i]
        return context, None if pooled is None else pooled.astype(jnp.float32)

    return one(ids, skip), None if neg_ids is None else one(neg_ids, 0)


class EmbeddingCache:
    """A bounded LRU map from a request's text key to the text encoders' host outputs.

    The key holds the identity of the encoder parameters: each array leaf by `id`, checked on a
    hit against a weak reference (a freed tree's id may be reused by a new one, which must miss),
    and small host leaves (LoRA scales) by value. Entries hold no strong reference to the weights.
    size: the most entries kept (0 disables the cache).
    """

    def __init__(self, size: int = 32):
        self.size = int(size)
        self._entries: collections.OrderedDict = collections.OrderedDict()

    @staticmethod
    def params_key(params) -> tuple[tuple, tuple]:
        """(hashable identity of a parameter pytree, weak references that keep it honest)."""
        key, refs = [], []
        for leaf in jax.tree.leaves(params):
            if np.size(leaf) <= 16 and not isinstance(leaf, jax.Array):
                a = np.asarray(leaf)
                key.append((a.dtype.str, a.shape, a.tobytes()))
            else:
                key.append(id(leaf))
                refs.append(weakref.ref(leaf))
        return tuple(key), tuple(refs)

    def get(self, key, refs):
        entry = self._entries.get(key)
        if entry is None:
            return None
        held, value = entry
        if any(r() is None for r in held) or any(a() is not b() for a, b in zip(held, refs)):
            del self._entries[key]                       # the weights it was made from are gone
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key, refs, value) -> None:
        if self.size <= 0:
            return
        self._entries[key] = (refs, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _texts_key(lists):
    """Per-encoder lists of texts (or None) as a hashable key."""
    return None if lists is None else tuple(tuple(t) for t in lists)


def _frozen(tree):
    """Host copies of a tree of arrays, read-only (a cached value is shared between requests)."""
    def one(a):
        a = np.array(a)
        a.setflags(write=False)
        return a
    return jax.tree.map(one, tree)


class PromptEncoder:
    """One CLIP text encoder (SD 1.x / 2.x) or two (SDXL; a refiner has one) with their
    tokenizers: text -> (cond, uncond) dicts, see the module docstring.

    encoders: [(CLIPTextEncoder, CLIPTokenizer), ...] in the order of their parameter trees.
    xl: SDXL conditioning (penultimate states, pooled text_embeds, time_ids).
    force_zeros: SDXL's force_zeros_for_empty_prompt. aesthetics: requires_aesthetics_score.
    cache_size: encoder outputs kept for repeated requests (`EmbeddingCache`; 0: none).
    """

    def __init__(self, encoders: Sequence[tuple[Any, Any]], *, xl: bool = False, force_zeros: bool = False,
                 aesthetics: bool = False, cache_size: int = 32):
        self.modules = tuple(m for m, _ in encoders)
        self.tokenizers = tuple(t for _, t in encoders)
        self.xl, self.force_zeros, self.aesthetics = bool(xl), bool(force_zeros), bool(aesthetics)
        self._fn = compiler.jit(functools.partial(_encode_text, self.modules, self.xl), static_argnames="skip")
        self.cache = EmbeddingCache(cache_size)

    @property
    def max_skip(self) -> int:
        """clip_skip must be below this (every encoder has that many layers to go back)."""
        return min(m.num_layers for m in self.modules)

    def __call__(self, params: Sequence, text: Text, *, num_images: int = 1, clip_skip: int | None = None,
                 guidance: bool = True, height: int | None = None, width: int | None = None, mode: str = "text"):
        """(cond, uncond or None): dicts of host float32 arrays with N rows (module docstring).
        params: the encoders' parameter trees, in order. height, width: the output size (SDXL's
        default original and target size)."""
        prompts = as_list(text.prompt)
        options_lib.check_count("num_images", num_images)
        if not self.xl and text.xl_given():
            raise ValueError(f"{', '.join(text.xl_given())}: SDXL options, and this is a Stable Diffusion 1.x/2.x "
                             "model with one text encoder; leave them unset")
        skip = int(clip_skip or 0)
        if not 0 <= skip < self.max_skip:
            raise ValueError(f"clip_skip must be in [0, {self.max_skip}) for this text encoder "
                             f"({self.max_skip} layers), got {clip_skip}")
        n = len(prompts)
        # diffusers: an empty or missing second prompt is the first; with one encoder (a refiner) the
        # first prompt goes to it
        second = _per_prompt(text.prompt_2, n, "prompt_2") if text.prompt_2 else prompts
        texts = [prompts, second][:len(self.modules)]
        zeros = self.xl and self.force_zeros and text.negative_prompt is None
        neg_texts = None
        if guidance and not zeros:
            negatives = _per_prompt("" if text.negative_prompt is None else text.negative_prompt, n,
                                    "negative prompt")
            negatives_2 = _per_prompt(text.negative_prompt_2, n, "negative_prompt_2") if text.negative_prompt_2 \
                else negatives
            neg_texts = [negatives, negatives_2][:len(self.modules)]
        (context, pooled), neg = self._encode(tuple(params), texts, neg_texts, skip)
        cond = {"context": context}
        if self.xl:
            cond["text_embeds"] = pooled
        uncond = None
        if guidance:
            uncond = {k: np.zeros_like(v) for k, v in cond.items()} if zeros else {"context": neg[0]}
            if self.xl and not zeros:
                uncond["text_embeds"] = neg[1]
        if self.xl:
            if height is None or width is None:
                raise ValueError("SDXL conditioning needs the output height and width")
            pos, negative = time_ids(text, height, width, aesthetics=self.aesthetics, mode=mode)
            cond["time_ids"] = np.repeat(pos, n, axis=0)
            if uncond is not None:
                uncond["time_ids"] = np.repeat(negative, n, axis=0)
        rep = int(num_images)
        cond = {k: np.repeat(np.asarray(v, np.float32), rep, axis=0) for k, v in cond.items()}
        if uncond is not None:
            uncond = {k: np.repeat(np.asarray(v, np.float32), rep, axis=0) for k, v in uncond.items()}
        return cond, uncond

    def _encode(self, params: tuple, texts, neg_texts, skip: int):
        """((context, pooled), negatives or None) of the encoders, host float32, from the cache
        when the same texts, clip_skip and parameters were encoded before."""
        held_key, refs = EmbeddingCache.params_key(params)
        key = (_texts_key(texts), _texts_key(neg_texts), skip, held_key)
        hit = self.cache.get(key, refs)
        if hit is not None:
            return hit
        neg_ids = None if neg_texts is None else [jnp.asarray(tok(t)) for tok, t in zip(self.tokenizers, neg_texts)]
        ids = [jnp.asarray(tok(t)) for tok, t in zip(self.tokenizers, texts)]
        out = _frozen(sharding_lib.gather(self._fn(params, ids, neg_ids, skip=skip)))
        self.cache.put(key, refs, out)
        return out
