"""Compile once per machine (jaxdiff/compile_cache.py): a second `jaxdiff sample` process loads its
programs from JAX's persistent cache instead of compiling them, counted with JAX's own monitoring
events (/jax/compilation_cache/cache_hits, and cache_misses, which JAX records when it writes an
entry) and with the files in the cache directory; the off switch writes nothing; an unwritable
directory is one warning line."""
import json
import os

import jax
import numpy as np
import pytest
from conftest import run_python
from PIL import Image

from jaxdiff import compile_cache

CHILD = """
import json, sys, time
start = time.perf_counter()
from jax import monitoring
counts = {}
def count(event, **kw):
    if event.startswith("/jax/compilation_cache/"):
        key = event.rsplit("/", 1)[1]
        counts[key] = counts.get(key, 0) + 1
monitoring.register_event_listener(count)
from jaxdiff.cli import main
rc = main(%r)
counts["seconds"] = time.perf_counter() - start
print("COUNTS " + json.dumps(counts))
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from jaxdiff import config as config_lib
    from jaxdiff.train import loop

    c = config_lib.get_config()
    c.data.image_size, c.data.batch_size = 16, 8
    c.train.steps = c.train.checkpoint_every = 1
    c.optim.warmup_steps = 1
    work = tmp_path_factory.mktemp("run")
    loop.train(c, str(work), progress=False, write_samples=None)
    return work


def _files(folder) -> int:
    return sum(len(f) for _, _, f in os.walk(folder)) if os.path.isdir(folder) else 0


def _sample(checkpoint, out, **env) -> dict:
    argv = ["sample", "--checkpoint", str(checkpoint), "--num", "2", "--steps", "2", "--seed", "3",
            "--no-progress", "--out", str(out)]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = run_python(CHILD % (argv,))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("COUNTS ")][-1]
    counts = json.loads(line[len("COUNTS "):])
    counts["stderr"] = proc.stderr
    print(out.name, {k: v for k, v in counts.items() if k != "stderr"})
    return counts


def test_second_process_loads_its_programs_from_the_cache(checkpoint, tmp_path):
    cache = tmp_path / "xla"
    first = _sample(checkpoint, tmp_path / "a.png", JAXDIFF_COMPILATION_CACHE=str(cache))
    written = _files(cache)
    second = _sample(checkpoint, tmp_path / "b.png", JAXDIFF_COMPILATION_CACHE=str(cache))
    # First run: nothing to load, programs written (one file per cached program, at least).
    assert first.get("cache_hits", 0) == 0 and first.get("cache_misses", 0) >= 1
    assert written >= first["cache_misses"]
    # Second run: every program the first wrote is loaded, and none is compiled (every program is
    # written, however fast it compiled), so nothing new is written.
    assert second.get("cache_hits", 0) == first["cache_misses"]
    assert second.get("cache_misses", 0) == 0 and _files(cache) == written
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(a, b)  # a loaded program computes the same picture


def test_off_switch_writes_nothing(checkpoint, tmp_path):
    cache = tmp_path / "jax-own"
    # Off wins over JAX's own variable too (the test suite sets it for every child process).
    got = _sample(checkpoint, tmp_path / "c.png", JAXDIFF_COMPILATION_CACHE="off",
                  JAX_COMPILATION_CACHE_DIR=str(cache))
    assert got.get("compile_requests_use_cache", 0) == 0 and got.get("cache_misses", 0) == 0
    assert _files(cache) == 0


def test_where_the_cache_lives():
    home = os.path.expanduser("~")
    assert compile_cache.cache_dir({}) == os.path.join(home, ".cache", "jaxdiff", "xla")
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": "/c"}) == os.path.join("/c", "jaxdiff", "xla")
    assert compile_cache.cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/c"}) == "/j"
    assert compile_cache.cache_dir({"JAXDIFF_COMPILATION_CACHE": "/d", "JAX_COMPILATION_CACHE_DIR": "/j"}) == "/d"
    for off in ("off", "0", "False", "none", " no "):
        assert compile_cache.cache_dir({"JAXDIFF_COMPILATION_CACHE": off, "XDG_CACHE_HOME": "/c"}) is None


def test_an_unwritable_directory_is_one_warning_and_no_cache(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    got = compile_cache.configure({"JAXDIFF_COMPILATION_CACHE": str(blocker / "xla")}, prog="jaxdiff sample")
    err = capsys.readouterr().err
    assert got is None and updates == [("jax_enable_compilation_cache", False)]
    assert err.count("\n") == 1 and err.startswith(f"jaxdiff sample: warning: compilation cache {blocker / 'xla'}")
    assert "not writable" in err
    # A writable one is created and set, with the lowered compile-time threshold.
    updates.clear()
    assert compile_cache.configure({"JAXDIFF_COMPILATION_CACHE": str(tmp_path / "ok")}) == str(tmp_path / "ok")
    assert updates == [("jax_compilation_cache_dir", str(tmp_path / "ok")),
                       ("jax_persistent_cache_min_compile_time_secs", compile_cache.MIN_COMPILE_TIME_SECS)]
