"""Ahead-of-time warm-up: compile every program a call will run, and run none of them.

    pipe = jaxdiff.StableDiffusion.from_pretrained(folder)
    report = pipe.warmup("", num_images=4, height=512, width=512, num_steps=30)   # compiles, draws nothing
    images = pipe("a cat", num_images=4, height=512, width=512, num_steps=30)     # compiles nothing

    model = jaxdiff.load("runs/digits")
    model.warmup(16, num_steps=50, labels=range(16), guidance_scale=2.0)
    model.sample(16, num_steps=50, labels=range(16), guidance_scale=2.0)        # compiles nothing

A warm-up takes the arguments of the call it prepares (only the shapes and static options they
imply matter: the number of prompts and images, the size, the sampler, guidance on or off, the
plan length; not the prompt texts, seeds or scales) and returns a `Report` (programs compiled,
seconds, persistent-cache hits).

How: the call's own front-end code runs (checks, plans, shapes), with the sampling core switched
to compile-only (`compile_job`, through the context variable `core.COMPILE_ONLY` that `core.run`
reads): each network program (the text encoders, the scanned sampling loop, the VAE decoder, the
safety checker) is built with `jax.jit(f).lower(<inputs of the call's shapes and layouts>)
.compile()` and given dummy outputs (zeros) instead of being run. The small programs a call runs
outside them (random keys, the start noise) are run as they are, for their shapes.

Why a later call then compiles nothing in the same process (measured on JAX 0.10, counting
`/jax/core/compile/backend_compile_duration` events, tests/test_warmup.py): jit keys its
compiled programs by the arguments' shapes, dtypes, weak types and layouts (shardings, and
whether an array is committed to a device), and `.lower(...).compile()` fills the same cache a
call fills, so a call with matching arguments finds the executable. The match must be exact: a
`ShapeDtypeStruct` without a sharding is a different key from the uncommitted `jnp.asarray`
array a call passes, and one with a device's sharding a different key from a numpy argument;
either way the call compiles again. So the warm-up builds its dummy inputs the way the call
builds its real ones (`sharding.put_batch` onto the pipeline's mesh, `jnp.asarray`) and lowers
later programs on the output layouts of earlier ones (`Compiled.output_shardings`). With the
persistent cache on (`jaxdiff.compile_cache`, the command line's default) the compiled programs
are written there too, so the next process loads them instead of compiling.

Not warmed: img2img and inpainting's VAE encoder (`pipe.img2img` compiles it on first use).
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import images as images_lib
from jaxdiff import sampling
from jaxdiff.models import safety as safety_model
from jaxdiff.pipelines import core
from jaxdiff.pipelines import prompts as prompts_lib
from jaxdiff.pipelines import safety as safety_lib

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"



class Report(NamedTuple):
    """What a warm-up did. programs: XLA programs compiled; cache_hits: programs loaded from the
    persistent compilation cache instead; seconds: wall time of the warm-up."""

    programs: int
    cache_hits: int
    seconds: float

    def __str__(self) -> str:
        hits = f", loaded {self.cache_hits} from the compilation cache" if self.cache_hits else ""
        return f"compiled {self.programs} programs in {self.seconds:.1f} s{hits}"


class CompileCounter:
    """Counts, within the block, JAX's monitoring events: `events`, the programs XLA built (the
    backend-compile event, which JAX records for a program loaded from the persistent cache as
    well), `cache_hits`, those loaded from the persistent cache, and `programs`, those compiled
    (the difference); `names` lists the functions of every event."""

    def __init__(self):
        self.events = self.cache_hits = 0
        self.names: list[str] = []

    @property
    def programs(self) -> int:
        return self.events - self.cache_hits

    def _duration(self, event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            self.events += 1
            self.names.append(str(kwargs.get("fun_name", "?")))

    def _event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)


@contextlib.contextmanager
def compiling():
    """Within the block, `core.run` compiles its job's programs and returns zeros of the result's
    shape instead of sampling (see `compile_job`). Yields the `CompileCounter` of the block."""
    token = core.COMPILE_ONLY.set(compile_job)
    try:
        with CompileCounter() as counter:
            yield counter
    finally:
        core.COMPILE_ONLY.reset(token)


def warm(call: Callable, *args, **kwargs) -> Report:
    """Run `call(*args, **kwargs)` (a pipeline call) compile-only; the `Report` of what it compiled."""
    start = time.perf_counter()
    with compiling() as counter:
        call(*args, **kwargs)
    return Report(counter.programs, counter.cache_hits, time.perf_counter() - start)


def _abstract(tree) -> Any:
    """Shape, dtype and sharding of every leaf: the inputs a later program sees, as lowering wants them."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), tree)


def _with_shardings(info, shardings) -> Any:
    """A compiled program's `out_info` with its `output_shardings`, as abstract inputs."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), info, shardings)


def _lower_partial(fn, latents):
    """Lower `fn(latents)` where fn is a jitted function or a functools.partial of one (the
    pipelines' decoders); None when it is neither (then it cannot be compiled ahead)."""
    if isinstance(fn, functools.partial) and hasattr(fn.func, "lower"):
        return fn.func.lower(*fn.args, latents, **fn.keywords)
    if hasattr(fn, "lower"):
        return fn.lower(latents)
    return None


def compile_job(job, mesh, output_type: str, progress: bool):
    """`core.run`'s compile-only twin: the same steps on the same shapes and layouts (noise drawn
    and placed, guidance wrapper, masked sampler, the scan, decode, [0, 1] conversion), with each
    network program lowered and compiled instead of run. Returns zeros shaped as `core.run`'s
    result for `output_type`."""
    job, noise = core.prepare(job, mesh, output_type)      # the call's own draw and weights cast (run)
    n = int(job.num)
    size = int(job.batch_size or n)
    pixel_shape = tuple(job.image_shape or job.shape)
    for b, s in enumerate(range(0, n, size)):
        e = min(s + size, n)
        args, kwargs = core.batch_arguments(job, mesh, noise, b, s, e)    # the call's own inputs
        lowered = sampling.lower(*args, **kwargs, progress=progress)   # with a bar, the loop that reports each call
        loop = lowered.compile()
        if output_type == "latent":
            continue
        latents = _with_shardings(loop.out_info, loop.output_shardings)             # [rows, *shape]
        if job.decode is not None:
            lowered = _lower_partial(job.decode, latents)
            if lowered is None:
                raise ValueError("this job's decoder is not a jitted function; it cannot be compiled ahead")
            decoder = lowered.compile()
            latents = _with_shardings(decoder.out_info, decoder.output_shardings)   # [rows, H, W, C]
            pixel_shape = tuple(decoder.out_info.shape[1:])
        core._to_unit.lower(latents).compile()
    if output_type == "latent":
        return np.zeros((n,) + tuple(job.shape), np.float32)
    return images_lib.to_output(np.zeros((n,) + pixel_shape, np.float32), output_type)


# --------------------------------------------------------------------------------------------
# Stable Diffusion: the text encoders and the safety checker run outside the core.
# --------------------------------------------------------------------------------------------

def _compile_encoder(encoder):
    """A stand-in for `PromptEncoder._encode` that compiles the encoders' program for the
    tokenised texts and returns zeros of its outputs (host float32, as `_encode` does)."""
    def encode(params, texts, neg_texts, skip):
        neg_ids = None if neg_texts is None else [jnp.asarray(tok(t)) for tok, t in zip(encoder.tokenizers, neg_texts)]
        ids = [jnp.asarray(tok(t)) for tok, t in zip(encoder.tokenizers, texts)]
        compiled = encoder._fn.lower(params, ids, neg_ids, skip=skip).compile()
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), compiled.out_info)
    return encode


def _compile_checker(checker, num: int) -> None:
    """Compile the safety checker's calls on `num` images (`safety.run`: BATCH images per call)."""
    size = checker.transform.crop_size
    for rows in sorted({min(safety_lib.BATCH, num - i) for i in range(0, num, safety_lib.BATCH)}):
        pixels = jnp.asarray(np.zeros((rows, size, size, 3), np.float32))   # placed as `safety_model.check` places its input
        safety_model.cosines.lower(checker.module, checker.params, pixels).compile()


def warm_stable_diffusion(pipe, prompt, negative_prompt, options: dict) -> Report:
    """`pipe(prompt, negative_prompt, **options)` compile-only (see the module docstring). For the
    duration, the pipeline's prompt encoder and safety checker are swapped for compile-only
    stand-ins on this object: do not call the same pipeline from another thread meanwhile."""
    checker = getattr(pipe, "safety_checker", None)
    start = time.perf_counter()
    pipe.prompts._encode = _compile_encoder(pipe.prompts)              # this object only, undone below
    pipe.safety_checker = None
    try:
        with compiling() as counter:
            pipe(prompt, negative_prompt, **options)
            if checker is not None and options.get("output_type", "pil") != "latent":   # options checked by now
                n = len(prompts_lib.as_list(prompt)) * options.get("num_images", options.get("num_images_per_prompt", 1))
                _compile_checker(checker, int(n))
    finally:
        del pipe.prompts._encode
        pipe.safety_checker = checker
    return Report(counter.programs, counter.cache_hits, time.perf_counter() - start)
