"""The Stable Diffusion safety checker: CLIP image embeddings compared with fixed concept embeddings.

What the Stable Diffusion folders ship as `safety_checker/` (diffusers'
`StableDiffusionSafetyChecker`): a CLIP ViT-L/14 image tower and projection
(`models.clip_vision`), 17 "concept" embeddings with a threshold each, and 3 "special care"
embeddings with theirs. For an image with projected embedding e (notation ours):

    c_k = cos(e, concept_k) (k < 17),  s_j = cos(e, special_j) (j < 3)
    special score_j = round(s_j - t_j + a_j, 3),  a_j = 0.01 once an earlier special score was > 0
    adjustment a = 0.01 if any special score > 0, else 0
    concept score_k = round(c_k - T_k + a, 3)
    flagged = any concept score_k > 0

The special-care concepts make the check stricter (the 0.01 adjustment) for images near them.
Rounding to 3 decimals and the running adjustment inside the special loop are the reference's;
they are kept so the flags agree with diffusers' bit for bit on the same cosines (the rounding is
done on the host, in float32, as the reference does it).

Public API
----------
    SafetyChecker(vision: CLIPVisionEncoder, num_concepts=17, num_special=3)
    module.apply({"params": params}, pixel_values [B, S, S, 3])
        -> (special_cos [B, 3], concept_cos [B, 17])            float32 cosines
    decide(special_cos, concept_cos, special_thresholds [3], concept_thresholds [17]) -> SafetyResult
    SafetyResult(flagged [B] bool, special_care [B] bool, concept_scores [B, 17], special_scores [B, 3])
    SDSafetyChecker = the ViT-L/14 checker of the Stable Diffusion folders

Parameters (transformers/diffusers names in convert/safety.py):

    vision/...                       the image tower (models/clip_vision.py), with its projection
    concept_embeds [17, E]           concept_embeds_weights [17]       (the thresholds T)
    special_care_embeds [3, E]       special_care_embeds_weights [3]   (the thresholds t)

The pixel values are CLIP-preprocessed images (`models.clip_vision.preprocess` with the
folder's feature_extractor/preprocessor_config.json).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler
from jaxdiff.models.clip_vision import CLIPVisionEncoder, CLIPViTL14

Array = jax.Array

# The reference's stricter threshold for images near a special-care concept.
SPECIAL_ADJUSTMENT = 0.01
# Scores are rounded to this many decimals before the > 0 test (as the reference does).
DECIMALS = 3


class SafetyResult(NamedTuple):
    """Per image: flagged (any concept score > 0), special_care (any special score > 0), and the
    scores themselves (cosine minus threshold plus adjustment, rounded to 3 decimals), numpy."""

    flagged: np.ndarray
    special_care: np.ndarray
    concept_scores: np.ndarray
    special_scores: np.ndarray


def _cosine(a: Array, b: Array) -> Array:
    """[B, E], [K, E] -> [B, K] cosines (rows normalized with the reference's eps 1e-12)."""
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


class SafetyChecker(nn.Module):
    """pixel_values [B, S, S, 3] -> (special_cos [B, num_special], concept_cos [B, num_concepts]).

    Attributes:
      vision: the CLIP image tower; must have a projection_dim E (the embeddings' width).
      num_concepts: concept embeddings (17 in every released checker).
      num_special: special-care embeddings (3).
    """

    vision: CLIPVisionEncoder
    num_concepts: int = 17
    num_special: int = 3

    @nn.compact
    def __call__(self, pixel_values: Array) -> tuple[Array, Array]:
        e = self.vision.projection_dim
        if e is None:
            raise ValueError("the safety checker's vision tower needs a projection_dim")
        embeds = self.vision(pixel_values).image_embeds.astype(jnp.float32)  # [B, E]
        ones = nn.initializers.ones
        concepts = self.param("concept_embeds", ones, (self.num_concepts, e), jnp.float32)
        special = self.param("special_care_embeds", ones, (self.num_special, e), jnp.float32)
        # The thresholds are parameters too (the checkpoint holds them), read by `decide`.
        self.param("concept_embeds_weights", ones, (self.num_concepts,), jnp.float32)
        self.param("special_care_embeds_weights", ones, (self.num_special,), jnp.float32)
        return _cosine(embeds, special), _cosine(embeds, concepts)


def decide(special_cos, concept_cos, special_thresholds, concept_thresholds) -> SafetyResult:
    """The flags from the cosines [B, 3], [B, 17] and thresholds [3], [17] (see the module
    docstring); float32 arithmetic on the host, in the reference's order."""
    special_cos = np.asarray(special_cos, np.float32)
    concept_cos = np.asarray(concept_cos, np.float32)
    t = np.asarray(special_thresholds, np.float32)
    big_t = np.asarray(concept_thresholds, np.float32)
    b = special_cos.shape[0]
    adjustment = np.zeros((b,), np.float32)
    special_scores = np.zeros_like(special_cos)
    for j in range(special_cos.shape[1]):       # the reference raises the adjustment mid-loop
        special_scores[:, j] = np.round(special_cos[:, j] - t[j] + adjustment, DECIMALS)
        adjustment = np.where(special_scores[:, j] > 0, np.float32(SPECIAL_ADJUSTMENT), adjustment)
    concept_scores = np.round(concept_cos - big_t[None] + adjustment[:, None], DECIMALS)
    return SafetyResult(np.any(concept_scores > 0, axis=1), np.any(special_scores > 0, axis=1),
                        concept_scores, special_scores)


@functools.partial(compiler.jit, static_argnums=0)
def cosines(module: SafetyChecker, params, pixel_values: Array) -> tuple[Array, Array]:
    """The jitted module call: (special_cos [B, 3], concept_cos [B, 17])."""
    return module.apply({"params": params}, pixel_values)


def check(module: SafetyChecker, params, pixel_values) -> SafetyResult:
    """Run the checker on preprocessed pixel values [B, S, S, 3] (one network call)."""
    special, concept = cosines(module, params, jnp.asarray(pixel_values, jnp.float32))
    return decide(special, concept, params["special_care_embeds_weights"], params["concept_embeds_weights"])


# The checker every Stable Diffusion 1.x / 2.x folder ships (CompVis/stable-diffusion-safety-checker).
SDSafetyChecker = functools.partial(SafetyChecker, vision=CLIPViTL14(), num_concepts=17, num_special=3)
