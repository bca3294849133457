"""jaxdiff.host_memory: with it, a CPU program's per-call buffers stop being page-faulted anew on
every call (faults counted by the kernel, not timed); the switch to leave glibc alone works."""

import os
import platform
import subprocess
import sys

import pytest

from jaxdiff import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program whose [4096, 4096] float32 product (64 MiB) is a temporary of every call; prints the
# fewest minor page faults of one call among calls 3 to 10 (the first compile and settle the heap).
# Each call starts after a short pause: XLA may free a call's temporaries on another thread just
# after its output is ready, and on a loaded machine (the suite's other worker) the next call
# could otherwise allocate before the last one's block is back in the heap.
PROBE = """
import resource, sys, time
from jaxdiff import host_memory
applied = host_memory.configure()
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b, c: (a @ b) @ c)
a, b, c = jnp.ones((4096, 512)), jnp.ones((512, 4096)), jnp.ones((4096, 8))
faults = []
for _ in range(10):
    time.sleep(0.05)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b, c).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[2:]))
"""


def _faults(setting: str) -> tuple[bool, int]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAXDIFF_HOST_MEMORY=setting)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_kept_memory_is_not_faulted_again():
    applied, kept = _faults("keep")
    not_applied, default = _faults("default")
    assert applied and not not_applied
    # glibc's default maps the 64 MiB block afresh each call: ~16,000 faults of 4 KiB.
    assert default > 8000, default
    assert kept < default / 20, (kept, default)


def test_off_values_and_other_platforms_leave_malloc_alone(monkeypatch, capsys):
    for value in ("default", "OFF", " 0 ", "no"):
        assert host_memory.configure({"JAXDIFF_HOST_MEMORY": value}) is False
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: None)  # nothing applied here
    host_memory.configure({"JAXDIFF_HOST_MEMORY": "banana"}, prog="jaxdiff sample")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "JAXDIFF_HOST_MEMORY='banana' is neither" in err, err
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.configure({}) is False


def test_the_command_line_applies_it_only_to_a_process_of_its_own(monkeypatch):
    from jaxdiff import cli, compile_cache

    calls = []
    monkeypatch.setattr(host_memory, "configure", lambda *a, **k: calls.append("host") or True)
    monkeypatch.setattr(compile_cache, "configure", lambda *a, **k: None)
    monkeypatch.setitem(cli.COMMANDS, "sample", lambda argv: 0)
    assert cli.main(["sample", "run"]) == 0  # a program calling main(argv): its process, its malloc
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["jaxdiff", "sample", "run"])
    assert cli.main() == 0                    # the console script
    assert calls == ["host"]
    monkeypatch.setattr(sys, "argv", ["jaxdiff", "convert", "--help"])
    monkeypatch.setitem(cli.COMMANDS, "convert", lambda argv: 0)
    assert cli.main() == 0 and calls == ["host"]  # commands that run no network: left alone
