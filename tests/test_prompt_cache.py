"""The text-embedding cache of the Stable Diffusion pipeline: a repeated request runs no text
encoder and gives the same images; another negative prompt, clip_skip or new encoder weights do
run it; the cache is bounded (least recently used out) and never trusts a recycled `id`."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# (test_pipeline_sd skips this module where torch, diffusers or transformers are missing)
from test_pipeline_sd import PROMPT, _components, _pipeline

from jaxdiff.pipelines import prompts as prompts_lib
from jaxdiff.pipelines.stable_diffusion import StableDiffusion

RUN = {"num_steps": 2, "guidance_scale": 5.0, "seed": 1, "output_type": "np"}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import diffusers

    tmp = tmp_path_factory.mktemp("sdcache")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    _pipeline(diffusers.StableDiffusionPipeline, _components(tmp, 4, scheduler)).save_pretrained(
        str(tmp / "model"), safe_serialization=True)
    return StableDiffusion.from_pretrained(tmp / "model", max_steps=4)


@pytest.fixture
def calls(pipe, monkeypatch):
    """The number of text-encoder calls made, as a list that grows by one per call."""
    made = []
    fn = pipe.prompts._fn

    def counted(*args, **kwargs):
        made.append(1)
        return fn(*args, **kwargs)

    monkeypatch.setattr(pipe.prompts, "_fn", counted)
    pipe.prompts.cache.clear()
    return made


def test_a_repeated_request_skips_the_text_encoder(pipe, calls):
    first = pipe(PROMPT, **RUN)
    assert len(calls) == 1
    again = pipe(PROMPT, **RUN)
    assert len(calls) == 1                                       # served from the cache
    np.testing.assert_array_equal(again, first)
    other_seed = pipe(PROMPT, **{**RUN, "seed": 2})              # the text is what is keyed, not the seed
    assert len(calls) == 1 and np.abs(other_seed - first).max() > 1e-3
    pipe(PROMPT, negative_prompt="blurry", **RUN)                # another negative: encoded
    assert len(calls) == 2
    pipe(PROMPT, clip_skip=1, **RUN)                             # another clip_skip: encoded
    assert len(calls) == 3
    pipe.encode_prompt([PROMPT, "a dog"])                        # another prompt list: encoded
    assert len(calls) == 4
    _, uncond = pipe.encode_prompt(PROMPT, guidance=False)       # no negative: its own entry
    assert len(calls) == 5 and uncond is None
    np.testing.assert_array_equal(pipe(PROMPT, **RUN), first)
    assert len(calls) == 5


def test_new_encoder_weights_miss_the_cache(pipe, calls):
    first = pipe.encode_prompt(PROMPT)
    old = pipe.params["text_encoder"]
    try:
        pipe.params["text_encoder"] = jax.tree.map(lambda a: a * 1.01, old)
        changed = pipe.encode_prompt(PROMPT)
        assert len(calls) == 2
        assert np.abs(changed[0] - first[0]).max() > 1e-4
    finally:
        pipe.params["text_encoder"] = old
    np.testing.assert_array_equal(pipe.encode_prompt(PROMPT)[0], first[0])
    assert len(calls) == 2                                       # the original weights' entry is still there


def test_the_cache_is_a_bounded_lru_that_checks_identity():
    cache = prompts_lib.EmbeddingCache(2)
    a, b, c = jnp.ones(3), jnp.zeros(3), jnp.full(3, 2.0)
    keys = {name: cache.params_key({"w": leaf, "scale": np.float32(0.5)}) for name, leaf in
            (("a", a), ("b", b), ("c", c))}
    for name in "abc":
        cache.put(keys[name][0], keys[name][1], name)
        if name == "b":
            assert cache.get(*keys["a"]) == "a"                  # a is now the most recent
    assert len(cache) == 2
    assert cache.get(*keys["b"]) is None and cache.get(*keys["a"]) == "a" and cache.get(*keys["c"]) == "c"
    # small host leaves (LoRA scales) are keyed by value
    assert cache.params_key({"w": a, "scale": np.float32(0.5)})[0] == keys["a"][0]
    assert cache.params_key({"w": a, "scale": np.float32(0.7)})[0] != keys["a"][0]
    # an entry whose weights were freed is never served, even if a new array takes their id
    key, refs = keys["c"]
    del keys, c, refs
    gc.collect()
    dead = {"w": jnp.ones(3)}
    assert cache.get(key, cache.params_key(dead)[1]) is None
    assert len(cache) == 1
    off = prompts_lib.EmbeddingCache(0)
    off.put(*cache.params_key({"w": a}), "x")
    assert len(off) == 0
