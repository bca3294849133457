import os
import tempfile
import subprocess
import sys

import pytest

# Tests never touch the network; make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Many tests train or sample the same small networks; XLA's CPU compile of a U-Net step takes tens
# of seconds, so share compiled programs through JAX's persistent cache (across tests, xdist
# workers and the subprocesses the CLI tests start). Set before jax is imported anywhere.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jaxdiff-test-compile-cache"))


@pytest.fixture
def small_config():
    """The default config shrunk so a run takes seconds: 16x16 digits, batch 16, a few steps."""
    from jaxdiff import config as config_lib

    c = config_lib.get_config()
    c.data.image_size = 16
    c.data.batch_size = 16
    c.train.steps = 6
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.optim.warmup_steps = 2
    c.sample.num = 4
    c.sample.steps = 3
    return c


def run_python(code: str, *, devices: int = 1, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with `devices` fake CPU devices (XLA reads the flag at
    start-up, so multi-device checks need their own process)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def run_cli(*args: str, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAXDIFF_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "jaxdiff.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)
