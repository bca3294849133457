"""Compile once per machine: JAX's persistent compilation cache for jaxdiff's command-line runs.

XLA compiles a U-Net's sampling loop or training step in tens of seconds on a CPU and seconds on
an accelerator, every time a process starts. `configure()` points JAX's persistent cache at a
directory so the second `jaxdiff sample` / `generate` / `train` with the same shapes loads the
compiled programs instead. Where (first match wins):

    JAXDIFF_COMPILATION_CACHE=off|0|false|no|none   no cache (and JAX's own setting is turned off)
    JAXDIFF_COMPILATION_CACHE=DIR                  DIR
    JAX_COMPILATION_CACHE_DIR=DIR                  JAX's own variable, left as set (the test
                                                   suite shares one cache this way)
    otherwise                                      $XDG_CACHE_HOME/jaxdiff/xla, or
                                                   ~/.cache/jaxdiff/xla

Every program is written, however fast it compiled (MIN_COMPILE_TIME_SECS = 0; JAX's default of
1 s, and the 0.2 s used before, left out the small eager programs: 14 of the 16 a digits `sample`
compiles, each still a compile at start-up; with 0 the second process compiled none and started
0.3 s sooner, experiments/bench_startup.py), unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
is set. A directory
that cannot be created or written is one warning line, never a failed run. It must run before
the process compiles anything: JAX opens the cache at its first compile.
"""

from __future__ import annotations

import os
import sys
import tempfile

ENV = "JAXDIFF_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")
MIN_COMPILE_TIME_SECS = 0.0


def cache_dir(environ=None) -> str | None:
    """The directory jaxdiff would use under `environ` (default os.environ); None when off."""
    env = os.environ if environ is None else environ
    value = env.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return os.path.expanduser(value)
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return env["JAX_COMPILATION_CACHE_DIR"]
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxdiff", "xla")


def _writable(path: str) -> str | None:
    """None when `path` is (made) a writable directory, else the reason it is not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def configure(environ=None, *, prog: str = "jaxdiff") -> str | None:
    """Set JAX's persistent compilation cache as the module docstring says; returns the
    directory in use, or None (off, or not writable: one warning line on stderr)."""
    import jax

    path = cache_dir(environ)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    problem = _writable(path)
    if problem is not None:
        print(f"{prog}: warning: compilation cache {path} is not writable ({problem}); compiling "
              f"without it (set {ENV}=DIR or {ENV}=off)", file=sys.stderr, flush=True)
        jax.config.update("jax_enable_compilation_cache", False)  # no second complaint from JAX
        return None
    env = os.environ if environ is None else environ
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in env:  # the user's own choice wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    return path
