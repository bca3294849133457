"""The one sampling core. Every pipeline (pixel models, Stable Diffusion, the latent text demo;
next SDXL, ControlNet, DiT, SD3, Flux) is a thin front end that turns its inputs into a `Job`
and calls `run`:

    job = core.Job(network=self._network, params=params, sampler=plan, shape=(h, w, c), num=n,
                   cond={"context": emb}, uncond={"context": null}, guidance_scale=7.5, seed=0,
                   decode=self._decode)
    pictures = core.run(job, mesh, output_type="pil", progress=True)

What `run` does, the same way for every family:

    1. noise [N, *shape] ~ N(0, I), drawn on the host from the seed for the N requested images
       only (or the caller's `noise`), so a seed gives the same images on 1 device, 8, or 2
       hosts x 4 (`noise_key`, `sample_key` below derive every key from the seed);
    2. for each batch of `batch_size` images: the rows padded to a multiple of the mesh's batch
       shards (copies of the last row, dropped at the end) and every per-image input split over
       the devices (`sharding.put_batch`);
    3. the network call: classifier-free guidance (`sampling.cfg`: the conditional and the
       unconditional halves in one batched call) when `guided(guidance_scale)`, i.e. the scale
       is > 1 (the one rule), the conditional network alone otherwise; a `keep` region pinned by
       mask blending (`samplers.masked`);
    4. the one compiled scan, `sampling.sample`, from pure noise or from the image latents `x0`
       noised to the plan's first level (img2img), with a per-step progress bar if asked;
    5. decode (if the job has a decoder), gather to every process, drop the padding, and convert
       with `jaxdiff.images.to_output` (one uint8 / PIL convention for every pipeline).

Deep feature reuse (DeepCache, Ma et al. 2023; `Job.deep_cache=k`): the front end also hands
the core `reusing_network(params, x, t, cond, feature) -> (prediction, feature)`, the network
under `sampling`'s reuse convention (feature None: the whole network, returning its deep feature;
a cached feature: the shallow branch from it), and the scan runs the whole network every k-th call
only (`sampling.sample(..., reuse_every=k)`), k traced.

The network convention: `network(params, x [B, ...], t [B], cond) -> prediction [B, ...]`, the
network's native prediction at the training-scale timestep t, with `cond` the pytree of per-row
conditioning (None for an unconditional network). `network` must be one function object per
pipeline (a module-level function or a `functools.partial` made once): it is part of the jit
cache key, while `params`, `cond`, `uncond`, the scales and the noise are traced, so new
prompts, labels, seeds and scales reuse the compiled program.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler, sampling
from jaxdiff import images as images_lib
from jaxdiff import sharding as sharding_lib
from jaxdiff.models import conv as conv_lib
from jaxdiff.models import lora as lora_lib
from jaxdiff.pipelines import options as options_lib
from jaxdiff.samplers import masked as masked_lib

# Set during a warm-up (pipelines/warmup.py): `run` hands its job to this compile-only function.
COMPILE_ONLY: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("jaxdiff_compile_only", default=None)


def guided(guidance_scale) -> bool:
    """The one guidance rule of every pipeline: classifier-free guidance runs when the scale is
    greater than 1; None or a scale <= 1 runs the conditional network alone (at scale 1 the two
    are the same prediction, at one network call instead of two)."""
    return guidance_scale is not None and float(guidance_scale) > 1.0


def check_scale(name: str, value, *, lo: float = -math.inf, hi: float = math.inf, optional: bool = False):
    """`value` as a float, or a one-line ValueError naming `name` for NaN, infinity, a
    non-number or a value outside [lo, hi]."""
    if value is None and optional:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}], got {v:g}")
    return v


def noise_key(seed: int) -> jax.Array:
    """The key of the start noise of a run with `seed`."""
    return jax.random.split(jax.random.PRNGKey(seed))[0]


def sample_key(seed: int, batch: int) -> jax.Array:
    """The key of the sampler's own draws (stochastic samplers) in batch `batch` of a run."""
    return jax.random.fold_in(jax.random.split(jax.random.PRNGKey(seed))[1], batch)


def image_key(seed: int, which: int) -> jax.Array:
    """Keys for a front end's other draws (e.g. VAE posterior samples of input images)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), which)


@dataclasses.dataclass(frozen=True)
class Job:
    """What a front end hands the core. N = `num` images; per-image inputs are host arrays (numpy)
    with leading axis N.

    network: `network(params, x, t, cond) -> prediction` (see the module docstring); one object
        per pipeline.
    params: the network's parameters, laid out on the mesh.
    sampler: the `samplers.get(...)` plan (its `start_step` and `max_steps` included).
    shape: one image's latent shape, e.g. (h, w, c).
    seed: the run's seed (noise, the sampler's draws).
    cond: pytree of [N, ...] arrays, the conditioning (None: unconditional network).
    uncond: pytree like `cond` with leading axis N or 1: the unconditional input of guidance.
    guidance_scale, guidance_rescale: classifier-free guidance (`guided`) and Lin et al.'s rescale.
    guidance_end: guide only the first fraction in [0, 1] of the model calls, the conditional
        network alone after (`sampling.guidance_cutoff`; traced: fractions share one program,
        one other than None's); None guides every call.
    noise: [N, *shape] standard-normal start noise instead of the seed's.
    x0: [N, *shape] clean latents to start from (img2img: the sampler's `start_step` sets the level).
    keep: (mask [N, ..., 1] with 1 = generate, known latents [N, *shape]): inpainting by blending.
    decode: latents [rows, *shape] (global array) -> images [rows, H, W, C] in [-1, 1]; None when
        the latents are the pixels. Make it one jitted function per pipeline.
    image_shape: (H, W, C) of one decoded image (default: `shape`), for the memory check.
    batch_size: images per compiled call (None: all N at once).
    peak_bytes: `peak_bytes(rows)` -> a lower bound of the memory one network call on `rows` rows
        needs; with it, a request that cannot fit is refused before anything is compiled.
    weights_dtype: the network's compute dtype when it is a low-precision one (bfloat16): its
        weight matrices are then cast once per request, before the loop (`cast_weights`), instead
        of on every call inside it. Only for networks whose every `kernel` is used in that dtype
        (flax `Dense` / `Conv` with `dtype=weights_dtype`), so the products are unchanged.
    deep_cache: deep feature reuse, the whole network every `deep_cache`-th model call and its
        shallow branch from the cached deep feature in between (`deep_cache_every`); None, 0 or
        1: off. Every k > 1 shares one program (one other than off's).
    reusing_network: `reusing_network(params, x, t, cond, feature) -> (prediction, feature)`, the
        network under the reuse convention (module docstring); None: the network cannot reuse
        features, and deep_cache > 1 is refused. One object per pipeline, like `network`.
    """

    network: Callable
    params: Any
    sampler: Any
    shape: tuple[int, ...]
    num: int
    seed: int = 0
    cond: Any = None
    uncond: Any = None
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    guidance_end: float | None = None
    noise: np.ndarray | None = None
    x0: np.ndarray | None = None
    keep: tuple | None = None
    decode: Callable | None = None
    image_shape: tuple[int, ...] | None = None
    batch_size: int | None = None
    peak_bytes: Callable[[int], int] | None = None
    weights_dtype: Any = None
    deep_cache: int | None = None
    reusing_network: Callable | None = None


def deep_cache_every(value) -> int | None:
    """The reuse interval of `deep_cache=value`: None for off (None, 0 or 1), else an integer in
    [2, sampling.MAX_REUSE_EVERY]; anything else (negative, a bool, a fraction, too large) is a
    one-line ValueError."""
    if value is None or (not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value in (0, 1)):
        return None
    return sampling.check_reuse_every(value, "deep_cache")


def _conditional(network_with_params, cond, x, t):
    return network_with_params(x, t, cond)


def _conditional_reusing(network_with_params, cond, x, t, feature):
    return network_with_params(x, t, cond, feature)


def model_fn(job: Job, cond, uncond) -> jax.tree_util.Partial:
    """The `model_fn(x, t)` the scan calls: guided or conditional (the one rule), with `cond` /
    `uncond` (mesh arrays) and the scales as traced leaves; with `job.deep_cache` on, the same
    under the reuse convention, `model_fn(x, t, feature) -> (prediction, feature)`."""
    reuse = deep_cache_every(job.deep_cache) is not None
    network = jax.tree_util.Partial(job.reusing_network if reuse else job.network, job.params)
    if not guided(job.guidance_scale):
        return jax.tree_util.Partial(_conditional_reusing if reuse else _conditional, network, cond)
    cutoff = None if job.guidance_end is None else sampling.guidance_cutoff(job.sampler, job.guidance_end)
    return sampling.cfg(network, job.guidance_scale, cond, uncond, job.guidance_rescale, guidance_cutoff=cutoff,
                        reuse=reuse)


def weights_dtype(compute_dtype):
    """`Job.weights_dtype` for a network computing in `compute_dtype`: that dtype when it is a
    16-bit float (its weight matrices are then cast once per request), else None."""
    return jnp.dtype(compute_dtype) if conv_lib.low_precision(compute_dtype) else None


@functools.partial(compiler.jit, static_argnums=1)
def cast_weights(params, dtype):
    """`params` with each float32 weight matrix (a leaf named `kernel`, 2 or more dims) in `dtype`;
    biases, norm scales and everything else as they are. A network computing in bfloat16 casts
    these on every call; in a sampling loop that is 20-50 casts of the same weights (on the CPU,
    31% of an SD-1.5 bf16 step), here it is one, and the bf16 copy is half the size. Adapted
    (LoRA) params are merged in float32 first, as the network would merge them in each call."""
    params = jax.tree.map(lora_lib.resolve, params, is_leaf=lambda x: isinstance(x, lora_lib.Adapted))

    def one(path, leaf):
        name = getattr(path[-1], "key", None) if path else None
        if name == "kernel" and leaf.ndim >= 2 and leaf.dtype == jnp.float32:
            return leaf.astype(dtype)
        return leaf
    return jax.tree_util.tree_map_with_path(one, params)


def check(job: Job) -> None:
    """One-line ValueErrors for a job that cannot run, before anything is compiled."""
    options_lib.check_count("the number of images", job.num)
    if job.batch_size is not None:
        options_lib.check_count("batch_size", job.batch_size)
    check_scale("guidance_scale", job.guidance_scale, optional=True)
    check_scale("guidance_rescale", job.guidance_rescale, lo=0.0, hi=1.0)
    check_scale("guidance_end", job.guidance_end, lo=0.0, hi=1.0, optional=True)
    if deep_cache_every(job.deep_cache) is not None and job.reusing_network is None:
        raise ValueError("deep_cache needs a U-Net (it reuses the U-Net's deep features); this model cannot, "
                         "leave deep_cache unset")
    if guided(job.guidance_scale) and job.uncond is None:
        raise ValueError("classifier-free guidance (guidance_scale > 1) needs a conditional model and its "
                         "unconditional input; leave guidance_scale unset for this model")
    n, shape = int(job.num), tuple(job.shape)
    if job.noise is not None and tuple(np.shape(job.noise)) != (n,) + shape:
        raise ValueError(f"latents must be standard-normal noise of shape {[n, *shape]} ([N, latent shape...], "
                         f"NHWC), got {list(np.shape(job.noise))}")
    if job.noise is not None and not np.all(np.isfinite(job.noise)):
        raise ValueError("latents (the start noise) hold NaN or infinite values")
    if job.x0 is not None and tuple(np.shape(job.x0)) != (n,) + shape:
        raise ValueError(f"the start latents x0 must have shape {[n, *shape]}, got {list(np.shape(job.x0))}")


def _rows_of(tree, start: int, stop: int, n: int):
    """Rows [start, stop) of every leaf with leading axis n (leaves with leading axis 1 are
    broadcast first)."""
    def one(a):
        a = np.asarray(a)
        if a.shape[0] == 1 and n != 1:
            a = np.broadcast_to(a, (n,) + a.shape[1:])
        if a.shape[0] != n:
            raise ValueError(f"a per-image input has {a.shape[0]} rows for {n} images")
        return a[start:stop]
    return jax.tree.map(one, tree)


def prepare(job: Job, mesh, output_type: str):
    """What `run` (and the warm-up's compile-only twin) does before its batches: the checks, the
    memory check, the start noise of the N images (host float32 [N, *shape]), and the weights cast
    once (`weights_dtype`). Returns (the job to run, noise)."""
    images_lib.check_output_type(output_type)
    check(job)
    n = int(job.num)
    size = int(job.batch_size or n)
    check_memory(mesh, n, job.shape, rows=min(size, n), image_shape=job.image_shape, peak_bytes=job.peak_bytes,
                 inputs=(job.x0 is not None) + (job.keep is not None))
    noise = job.noise if job.noise is not None else np.asarray(jax.random.normal(noise_key(job.seed), (n,) + tuple(job.shape)))
    noise = np.asarray(noise, np.float32)
    if job.weights_dtype is not None:                    # once per request, not once per call
        job = dataclasses.replace(job, params=cast_weights(job.params, job.weights_dtype), weights_dtype=None)
    return job, noise


def batch_arguments(job: Job, mesh, noise, b: int, s: int, e: int):
    """The `sampling.sample` / `sampling.lower` arguments of batch `b`, images s..e of the job
    (`noise` from `prepare`), laid out on the mesh and padded to its batch shards: ((sampler,
    model_fn, x, key), {x0, reuse_every})."""
    n = int(job.num)
    rows = sharding_lib.padded_batch(e - s, mesh)

    def put(tree):
        return None if tree is None else jax.tree.map(
            lambda a: sharding_lib.put_batch(a, mesh, rows), _rows_of(tree, s, e, n))

    x = put(noise)                                                               # [rows, *shape]
    sampler = job.sampler
    if job.keep is not None:
        sampler = masked_lib.masked(sampler, put(job.keep[0]), put(job.keep[1]), x)
    fn = model_fn(job, put(job.cond), put(job.uncond))
    return (sampler, fn, x, sample_key(job.seed, b)), {"x0": put(job.x0),
                                                       "reuse_every": deep_cache_every(job.deep_cache)}


def run(job: Job, mesh, *, output_type: str = "np", progress: bool = False, desc: str = "sample"):
    """Run `job` on `mesh` (see the module docstring). Returns, for the N images:
    "latent": the sampler's result [N, *shape] float32 (for pixel models, data scale ~[-1, 1]);
    "np": float32 [N, H, W, C] in [0, 1]; "uint8": uint8 [N, H, W, C]; "pil": a list of PIL
    images. Every process of a multi-process run must call it and gets all N images.
    progress: a bar over the model calls of every batch (and one over decoding), shown on
    process 0 only; the time to the first step (compilation) is shown as its own phase."""
    if COMPILE_ONLY.get() is not None:   # a warm-up: compile the job's programs, run none
        return COMPILE_ONLY.get()(job, mesh, output_type, progress)
    job, noise = prepare(job, mesh, output_type)
    n = int(job.num)
    size = int(job.batch_size or n)
    starts = list(range(0, n, size))
    bar = _Progress(desc, len(starts), enabled=progress and jax.process_index() == 0)
    out = []
    try:
        for b, s in enumerate(starts):
            bar.begin(b)
            e = min(s + size, n)
            args, kwargs = batch_arguments(job, mesh, noise, b, s, e)
            latents = sampling.sample(*args, **kwargs, progress=bar.step if bar.enabled else None)
            if output_type == "latent":
                out.append(sharding_lib.gather(latents)[:e - s])
                continue
            pixels = latents if job.decode is None else bar.decoding(job.decode, latents)
            out.append(sharding_lib.gather(_to_unit(pixels))[:e - s])
    finally:
        bar.close()
    result = np.concatenate(out).astype(np.float32)
    return result if output_type == "latent" else images_lib.to_output(result, output_type)


@compiler.jit
def _to_unit(images):
    """[-1, 1] -> [0, 1], clipped (diffusers' postprocess), on the devices."""
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


class _Progress:
    """A tqdm bar over the model calls of every batch: "(compiling)" until the first call
    reports, then the calls made (counted as they finish, not as they are dispatched); decoding
    shows as its own phase."""

    def __init__(self, desc: str, batches: int, enabled: bool):
        self.enabled, self.desc, self.batches, self._batch = enabled, desc, batches, 0
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=None, desc=f"{desc} (compiling)", unit="step", dynamic_ncols=True)

    def begin(self, batch: int) -> None:
        self._batch = batch

    def step(self, done: int, total: int) -> None:
        bar = self._bar
        if bar.total is None:
            bar.total = total * self.batches
            bar.set_description(self.desc)
        position = self._batch * total + done
        if position > bar.n:
            bar.update(position - bar.n)

    def decoding(self, decode, latents):
        if self._bar is not None:
            self._bar.set_description(f"{self.desc} (decoding)")
        out = jax.block_until_ready(decode(latents))
        if self._bar is not None:
            self._bar.set_description(self.desc)
        return out

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------------------------
# Will it fit? A lower bound of the memory a request needs, checked before anything compiles.
# --------------------------------------------------------------------------------------------

def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _device_available_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory statistics
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_memory(mesh, num: int, shape, *, rows: int | None = None, image_shape=None, inputs: int = 0,
                 peak_bytes: Callable[[int], int] | None = None) -> None:
    """Refuse (one ValueError line) a request whose lower-bound memory exceeds what is free.

    num images with latents of `shape` and results of `image_shape` (default: `shape`): the host
    holds their noise, their results and `inputs` more latent arrays (start images, masks); and
    one network call on `rows` images (default: num) needs `peak_bytes(rows)`, spread over the
    mesh's batch shards (on CPU every device shares the host's memory). Front ends call this
    before they build per-image inputs, so an impossible request costs nothing."""
    num = int(num)
    latent = math.prod(shape) * 4
    image = math.prod(image_shape or shape) * 4
    host = num * (latent * (2 + inputs) + image)
    host_free = _host_available_bytes()
    size = "x".join(str(d) for d in (image_shape or shape)[:2])
    if host_free is not None and host > host_free:
        raise ValueError(f"{num} images of {size} need at least {_gib(host)} of host memory for their latents and "
                         f"results alone and {_gib(host_free)} is free; ask for fewer or smaller images")
    if peak_bytes is None:
        return
    padded = sharding_lib.padded_batch(num if rows is None else int(rows), mesh)
    devices = list(mesh.devices.flat)
    if devices[0].platform == "cpu":
        need, free, where = peak_bytes(padded), host_free, "host memory"
    else:
        per_device = padded // sharding_lib.batch_shards(mesh)
        need = peak_bytes(per_device)
        frees = [f for f in (_device_available_bytes(d) for d in devices if d.process_index == jax.process_index())
                 if f is not None]
        free, where = (min(frees) if frees else None), f"memory per {devices[0].platform} device"
    if free is not None and need > free:
        raise ValueError(f"one network call on {padded} images of {size} needs at least {_gib(need)} and "
                         f"{_gib(free)} of {where} is free; lower the images per call (batch_size, --num) or "
                         "their size (height, width)")


def unet_peak_bytes(unet, height: int, width: int, guided_call: bool) -> Callable[[int], int]:
    """A lower bound of one U-Net call's peak memory on `rows` images of height x width latents:
    three level-0 activations (input, output and the skip), and, where the first attention level
    runs plain attention, its [heads, tokens, tokens] float32 logits (XLA materialises them except
    where a fused kernel is chosen, on GPU). Guidance doubles the rows."""
    itemsize = jnp.dtype(unet.dtype).itemsize
    p = unet.patch_size
    pixels = (height // p) * (width // p)
    act = 3 * pixels * unet.base_channels * unet.channel_mult[0] * itemsize
    logits = 0
    levels = sorted(unet.attention_levels)
    if levels and jax.default_backend() != "gpu":
        level = levels[0]
        tokens = pixels // 4 ** level
        channels = unet.base_channels * unet.channel_mult[level]
        heads = channels // unet.head_dim if unet.head_dim else unet.per_level("num_heads")[level]
        logits = heads * tokens * tokens * 4
    factor = 2 if guided_call else 1
    return lambda rows: factor * rows * (act + logits)
