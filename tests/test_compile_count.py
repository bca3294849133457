"""Per-request knobs never recompile: the Stable Diffusion pipeline, counted from its first call
with JAX's public monitoring events (every jit trace and every backend compile, persistent-cache
hits included, reports one).

On the tiny pipeline of test_pipeline_sd.py: the first text-to-image call traces and compiles its
programs; image-to-image then adds only the VAE encoder (the sampling loop is shared); after that
new prompts, negative prompts, seeds, step counts up to max_steps, strengths, guidance scales
(staying > 1), guidance rescale factors and DDIM's eta compile nothing. A new image size does
compile, so the counter is live.

Counted as well: the small programs JAX compiles for eager operations outside the jitted
functions (host arrays staged with `jnp.asarray`, random keys, slices), which a new plan length
would otherwise compile again.
"""

import collections

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from test_pipeline_sd import N, PROMPT, SIZE, _components, _picture, _pipeline  # noqa: E402

from jaxdiff.pipelines.stable_diffusion import StableDiffusion  # noqa: E402

TRACE = "/jax/core/compile/jaxpr_trace_duration"          # jax._src.dispatch.JAXPR_TRACE_EVENT
COMPILE = "/jax/core/compile/backend_compile_duration"    # jax._src.dispatch.BACKEND_COMPILE_EVENT


class Count:
    """Within the block: the functions traced and the programs compiled, by name."""

    def __init__(self):
        self.traces, self.compiles = collections.Counter(), collections.Counter()

    def _listen(self, event, duration, **kwargs):
        if event == TRACE:
            self.traces[kwargs.get("fun_name", "?")] += 1
        elif event == COMPILE:
            self.compiles[kwargs.get("fun_name", "?")] += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def names(self, which):
        return " ".join(sorted(getattr(self, which)))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import diffusers

    tmp = tmp_path_factory.mktemp("sdcount")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    _pipeline(diffusers.StableDiffusionPipeline, _components(tmp, 4, scheduler)).save_pretrained(
        str(tmp / "model"), safe_serialization=True)
    return StableDiffusion.from_pretrained(tmp / "model", max_steps=12)   # a short scan: a faster test


def test_the_counter_sees_a_new_program():
    f = jax.jit(lambda x: x * 3.0 + 1.0)
    with Count() as c:
        f(np.ones(7, np.float32))
        f(np.zeros(7, np.float32))                     # new values: cached
    assert sum(c.traces.values()) == 1 and sum(c.compiles.values()) == 1, (c.traces, c.compiles)
    with Count() as c:
        f(np.ones(5, np.float32))                      # a new shape: traced and compiled again
    assert sum(c.compiles.values()) == 1


def test_sd_knobs_never_recompile(pipe):
    run = dict(num_images=N, output_type="np")
    with Count() as first:
        a = pipe(PROMPT, num_steps=4, guidance_scale=7.5, seed=0, **run)
    print(f"first call: traced {dict(first.traces)}, compiled {dict(first.compiles)}")
    for name in ("_run", "_encode_text", "_decode"):             # the loop, the text encoder, the decoder
        assert name in first.names("compiles"), first.compiles
    with Count() as i2i:
        b = pipe.img2img(_picture(), PROMPT, strength=0.5, num_steps=4, guidance_scale=7.5, seed=0, **run)
    print(f"first img2img: traced {dict(i2i.traces)}, compiled {dict(i2i.compiles)}")
    assert "_encode_images" in i2i.names("compiles"), i2i.compiles
    assert "_run" not in i2i.names("traces"), i2i.traces        # text and image to image share the loop

    outputs = [a, b]
    with Count() as later:
        for case in [dict(prompt="a dog"), dict(negative_prompt="ugly, blurry"), dict(seed=12345),
                     dict(num_steps=1), dict(num_steps=7), dict(num_steps=pipe.max_steps),
                     dict(guidance_scale=2.0), dict(guidance_scale=12.0), dict(guidance_rescale=0.7),
                     dict(eta=0.5), dict(prompt="a cat and a dog", negative_prompt="a bird", seed=7, num_steps=9,
                                         guidance_scale=3.5, guidance_rescale=0.3, eta=1.0)]:
            case = {"prompt": PROMPT, "num_steps": 4, "guidance_scale": 7.5, "seed": 0, **case}
            outputs.append(pipe(case.pop("prompt"), **case, **run))
        for strength, steps in [(0.3, 4), (0.8, 10), (1.0, 4), (0.55, 12)]:
            outputs.append(pipe.img2img(_picture(), "a dog", strength=strength, num_steps=steps, guidance_scale=5.0,
                                        seed=3, **run))
    assert not later.compiles, dict(later.compiles)
    # The one trace allowed: img2img's check that the plan has noise levels, `jax.eval_shape` of
    # the sampler's init, which traces (never compiles) on every call.
    assert set(later.traces) <= {"init"}, dict(later.traces)
    # every call drew another picture, so nothing was served stale
    for i in range(len(outputs)):
        for j in range(i):
            assert np.abs(outputs[i] - outputs[j]).max() > 1e-3, (i, j)

    with Count() as bigger:
        c = pipe(PROMPT, num_steps=4, guidance_scale=7.5, seed=0, height=2 * SIZE, width=2 * SIZE, **run)
    assert c.shape == (N, 2 * SIZE, 2 * SIZE, 3)
    assert "_run" in bigger.names("compiles") and "_decode" in bigger.names("compiles"), bigger.compiles
