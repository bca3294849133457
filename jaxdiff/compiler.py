"""How jaxdiff compiles: `jit` is `jax.jit` with the XLA options that run jaxdiff's networks
fastest on the backend in use. Every program jaxdiff compiles goes through it.

On the CPU, XLA (jax 0.10) hands each convolution, dot and reduction to the YNNPACK library
(`xla_cpu_experimental_ynn_fusion_type`). For convolutions XLA's own kernels (Eigen) are as fast
or faster on every layer of jaxdiff's networks that was measured, and much faster for the kernel
gradient: on an idle 2-core CPU, float32, freed host memory kept (`host_memory`), a 3x3
convolution [8, 32, 32, 128] -> 128 takes 5.7 against 10.7 ms for its kernel gradient, 4.9
against 5.4 forward and 4.9 against 5.6 for its input gradient; [8, 16, 16, 512] -> 256 10.2
against 15.5 ms (kernel gradient). Whole programs: the DDPM CIFAR-10 AdamW train step at batch 16
1.90 -> 1.72 s, the SD-1.5 U-Net call (float32, batch 1) 2.24 -> 2.09 s, the CIFAR-10 U-Net
forward 504 -> 492 ms; the demo's `jaxdiff train` 12.3 -> 17.3-17.8 steps/s, though its bare
train step (batch 64) was level (61.6 against 63.5 ms). Dots and reductions stay with YNNPACK
(the step without its reductions takes 2.58 s). So on the CPU `options()` names the fusion types
without convolutions, once a probe has shown that this XLA gives convolutions to YNNPACK by
default and accepts the option; anywhere else, or when XLA_FLAGS sets the fusion types itself
(your choice wins), it is None and XLA compiles as it would.

The options are chosen when a function is first called or lowered, not when it is decorated:
importing jaxdiff starts no backend. A program of your own that jits jaxdiff's modules gets the
same with `jaxdiff.compiler.jit` in place of `jax.jit`, or
`jax.jit(f, compiler_options=jaxdiff.compiler.options())`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"
# XLA's default YNNPACK fusion types on the CPU (jax 0.10) without INDIVIDUAL_CONVOLUTION.
CPU_OPTIONS = {FUSION_TYPES: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}

_CHOSEN: dict[str, dict[str, str] | None] = {}


def _ynn_convolution(compiler_options) -> bool:
    """Whether XLA, compiling one 3x3 convolution with `compiler_options`, gives it to YNNPACK."""
    cpu = jax.local_devices(backend="cpu")[0]
    x = jax.device_put(jnp.zeros((1, 8, 8, 32), jnp.float32), cpu)
    w = jax.device_put(jnp.zeros((3, 3, 32, 32), jnp.float32), cpu)
    conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")),
                   compiler_options=compiler_options)
    return "ynn_fusion" in conv.lower(x, w).compile().as_text()


def _probe(backend: str) -> dict[str, str] | None:
    if backend != "cpu" or FUSION_TYPES in os.environ.get("XLA_FLAGS", ""):
        return None
    try:
        if not _ynn_convolution(None) or _ynn_convolution(CPU_OPTIONS):
            return None
    except Exception as e:  # noqa: BLE001 - an XLA that rejects the option compiles with its defaults
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"jaxdiff: warning: XLA does not take {FUSION_TYPES} ({first}); compiling with its "
              f"defaults", file=sys.stderr, flush=True)
        return None
    return dict(CPU_OPTIONS)


def options(backend: str | None = None) -> dict[str, str] | None:
    """The compiler options jaxdiff compiles with on `backend` (default: JAX's default backend):
    a dict for `jax.jit(..., compiler_options=...)`, or None for XLA's defaults. Probed once per
    backend and process (two small compiles on the CPU)."""
    backend = backend or jax.default_backend()
    if backend not in _CHOSEN:
        _CHOSEN[backend] = _probe(backend)
    chosen = _CHOSEN[backend]
    return None if chosen is None else dict(chosen)


_NESTED = "can only be passed to top-level"   # what jax says of compiler_options on a nested jit


class _Jit:
    """`jax.jit(fun, **kwargs)`, built at its first use with `options()`; calls, `.lower`,
    `.trace`, `.eval_shape` and the rest go to it. Called inside another traced function (your
    own `jax.jit`, `jax.grad`, `jax.eval_shape`, ...) it is a plain `jax.jit`: only the outermost
    program takes compiler options, and it is the one that is compiled."""

    def __init__(self, fun: Callable, kwargs: dict[str, Any]):
        self._fun, self._kwargs, self._jitted, self._nested = fun, kwargs, None, None
        functools.update_wrapper(self, fun)

    def _built(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, compiler_options=options(self._kwargs.get("backend")),
                                   **self._kwargs)
        return self._jitted

    def _plain(self):
        if self._nested is None:
            self._nested = jax.jit(self._fun, **self._kwargs)
        return self._nested

    def __call__(self, *args, **kwargs):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
            return self._plain()(*args, **kwargs)
        try:
            return self._built()(*args, **kwargs)
        except ValueError as e:                  # traced inside another function, no tracer passed
            if _NESTED not in str(e):
                raise
            return self._plain()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_fun", "_kwargs", "_jitted", "_nested"):
            raise AttributeError(name)
        return getattr(self._built(), name)

    def __repr__(self) -> str:
        return f"jaxdiff.compiler.jit({getattr(self._fun, '__qualname__', self._fun)!r})"


def jit(fun: Callable | None = None, /, **kwargs):
    """`jax.jit` with `options()`: the same arguments (static_argnums, donate_argnums, shardings,
    ...), as a call, a decorator, or through `functools.partial(jit, static_argnames=...)`."""
    if "compiler_options" in kwargs:
        raise TypeError("jaxdiff.compiler.jit chooses compiler_options itself; use jax.jit to set them")
    if fun is None:
        return functools.partial(jit, **kwargs)
    return _Jit(fun, kwargs)
