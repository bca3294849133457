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


# ---------------------------------------------------------------------------------------------
# Helpers shared by the test files (import them: `from conftest import tree_equal`).

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tree_equal(a, b) -> bool:
    """Every leaf of two pytrees equal, shape and value, bit for bit."""
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (OpenAI's CLIP uses the same)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(extra))]
    return {b: chr(c) for b, c in zip(printable + extra, chars)}


def write_clip_tokenizer(folder, *, merges=(), max_length: int = 77) -> int:
    """A CLIP tokenizer folder (vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json) with the byte vocabulary, `merges` (pairs), BOS and EOS (EOS pads).
    Returns the vocabulary size."""
    import json
    import pathlib

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True)
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    token = lambda s: {"content": s, "lstrip": False, "normalized": True,  # noqa: E731
                       "rstrip": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": token(BOS), "eos_token": token(EOS), "pad_token": token(EOS), "unk_token": token(EOS)}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": max_length, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
         "pad_token": EOS, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS}))
    return len(vocab)


def randomise_unit_gain(model, seed: int = 0):
    """A torch module's weights at unit gain (std 1/sqrt(fan_in)), norms and biases far from 1 and
    0, embeddings N(0, 1) and a peaked softmax (larger query/key weights): any wrong mapping of a
    converted copy changes the outputs by O(1). Returns the model."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * r)
            elif name.endswith("bias"):
                p.copy_(0.3 * r)
            elif "embedding" in name and "time" not in name:
                p.copy_(r)
            else:
                gain = 2.0 if any(k in name for k in (".to_q.", ".to_k.", "q_proj", "k_proj")) else 1.0
                p.copy_(gain / math.sqrt(p[0].numel()) * r)
    return model


def train_tiny_run(workdir, *, batch_size: int, steps: int, devices=None) -> str:
    """Train the default (digits, tiny U-Net) config for `steps` steps of `batch_size` into
    `workdir`, one checkpoint at the end; returns the work dir."""
    from jaxdiff import config as config_lib
    from jaxdiff.train import loop

    c = config_lib.get_config()
    c.data.batch_size = batch_size
    c.train.steps = steps
    c.train.checkpoint_every = steps
    c.optim.warmup_steps = 1
    loop.train(c, str(workdir), devices=devices, progress=False, write_samples=None)
    return str(workdir)


def assert_resumes_bit_exact(cfg, full_dir, split_dir, *, stop_at: int = 3) -> None:
    """Training `cfg.train.steps` steps in one go equals training `stop_at`, stopping and resuming
    in the same work dir: every array of the state bit for bit, and the resumed run's
    metrics.jsonl reads as one run (each step once, the same losses)."""
    import json
    import pathlib

    from jaxdiff.train import loop

    total = cfg.train.steps
    full = loop.train(cfg, str(full_dir), progress=False, write_samples=None)
    cfg.train.steps = stop_at
    loop.train(cfg, str(split_dir), progress=False, write_samples=None)
    cfg.train.steps = total
    resumed = loop.train(cfg, str(split_dir), progress=False, write_samples=None)
    assert int(resumed.step) == int(full.step) == total
    for name in ("params", "ema_params", "opt_state", "rng"):
        assert tree_equal(getattr(full, name), getattr(resumed, name)), name
    rows = [json.loads(line) for line in (pathlib.Path(split_dir) / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(line) for line in (pathlib.Path(full_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in full_rows]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]


class _WritesMarker:
    """An object whose unpickling runs code: `__reduce__` tells pickle to call `exec` on a line
    that writes `marker`. Loading a file holding one with `pickle.load` / `torch.load(...,
    weights_only=False)` leaves the marker file behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


HOSTILE_PICKLE_FORMATS = ("torch", "torch_legacy", "pickle")


def make_hostile_pickle(path, marker, fmt: str = "torch"):
    """Write a real pickled checkpoint at `path` whose loading writes the file `marker` (which must
    not exist yet): a state dict {"state_dict": {"w": tensor}, "payload": <hostile object>}.

    fmt: "torch" (`torch.save`'s zip format, as `.bin` / `.pt` files are today), "torch_legacy"
    (`torch.save` with the pre-1.6 plain-pickle format, as old `.ckpt` files), or "pickle" (plain
    `pickle.dump` of the dict with a numpy array, as `.pkl` files). Returns `path`."""
    import pathlib
    import pickle

    import numpy as np

    path, marker = pathlib.Path(path), pathlib.Path(marker)
    assert not marker.exists(), marker
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {"w": np.ones(3, np.float32)}, "payload": _WritesMarker(marker)}, f)
        return path
    if fmt not in HOSTILE_PICKLE_FORMATS:
        raise ValueError(f"fmt={fmt!r}; use one of {HOSTILE_PICKLE_FORMATS}")
    import torch

    obj = {"state_dict": {"w": torch.ones(3)}, "payload": _WritesMarker(marker)}
    torch.save(obj, str(path), _use_new_zipfile_serialization=(fmt == "torch"))
    return path
