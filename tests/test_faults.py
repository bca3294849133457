"""Faults end to end, through `jaxdiff train` / `jaxdiff sample` as a user meets them: Ctrl-C at
the default settings, a learning rate that blows the weights up, a corrupt newest checkpoint,
and the metrics log of a run killed before its first checkpoint.

(The checkpoint layer's own cases - truncated, emptied and bit-flipped files, checksums, steps
without a manifest - are in test_checkpoint.py; SIGTERM with exact resume in test_sharding.py.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from conftest import run_cli
from jaxdiff.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.batch_size=16", "--config.optim.warmup_steps=2", "--config.sample.num=4",
         "--config.sample.steps=2", "--no-progress"]


def _steps(workdir) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _saved_state_step(workdir, step: int) -> int:
    """The `step` counter inside the TrainState saved as checkpoint `step` (read through
    jaxdiff.checkpoint onto the structure the run's saved config builds)."""
    from jaxdiff import config as config_lib
    from jaxdiff.checkpoint import Checkpointer
    from jaxdiff.train import build

    ckpt = Checkpointer(str(workdir / "checkpoints"), read_only=True)
    try:
        cfg = config_lib.from_json(json.dumps(ckpt.read_config(step)))
        sig = cfg.data_signature
        shape = tuple(sig.image_shape)
        module = build.build_model(cfg, shape, sig.num_classes)
        abstract = jax.eval_shape(build.init_state_fn(module, build.build_optimizer(cfg), shape, cfg.seed))
        state, restored = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    assert restored == step
    return int(state.step)


def _logged_steps(workdir) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_at_the_default_settings_saves_the_current_step(tmp_path):
    """log_every=50 and checkpoint_every=500 as in the demo: the first SIGINT stops the run at the
    step it is on, checkpoints that step (its state, not an earlier one), and the same command
    resumes from there. (The exact step a signal lands on is pinned in the next test.)"""
    workdir = tmp_path / "run"
    args = ["train", "--workdir", str(workdir), "--config.train.steps=2000", *SMALL]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "jaxdiff.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)                                   # the first log row: step 50, the loop is running
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    reached = _logged_steps(workdir)[-1]                   # the loop has finished this step
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = _steps(workdir)
    assert len(saved) == 1 and reached <= saved[0] < 500, (reached, saved, err[-2000:])
    stopped = [line for line in err.splitlines() if "interrupted (Ctrl-C) at step" in line]
    assert len(stopped) == 1 and f"interrupted (Ctrl-C) at step {saved[0]} of 2000;" in stopped[0], err[-2000:]
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    # What was saved is that step's state, and the stop logged it as the run's last row.
    assert _saved_state_step(workdir, saved[0]) == saved[0]
    assert _logged_steps(workdir)[-1] == saved[0]
    resumed = run_cli("train", "--workdir", str(workdir), f"--config.train.steps={saved[0] + 2}", *SMALL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {saved[0]}" in resumed.stderr


def test_ctrl_c_saves_exactly_the_step_it_arrives_in(small_config, tmp_path, capfd):
    """SIGINT sent while step k's samples are written (so while step k + 1 is the next to run):
    step k + 1 finishes and is the one checkpoint, holding step k + 1's state; nothing after it
    runs. Checkpoints are otherwise due every 100 steps only, so any other save is a bug."""
    assert threading.current_thread() is threading.main_thread()  # where the loop's handler lives
    k = 3
    small_config.train.steps = 100
    small_config.train.checkpoint_every = 100
    small_config.train.sample_every = k
    signalled = []

    def interrupt(run, params, name, final):
        signalled.append(name)
        if len(signalled) == 1:                   # once: a second Ctrl-C means "stop now"
            os.kill(os.getpid(), signal.SIGINT)

    try:
        state = loop.train(small_config, str(tmp_path), progress=False, write_samples=interrupt)
    except KeyboardInterrupt:                     # not up to pytest, which would end the session
        pytest.fail("the SIGINT escaped the training loop as a KeyboardInterrupt")
    err = capfd.readouterr().err
    assert signalled == [f"samples_{k:07d}.png"]
    assert int(state.step) == k + 1 and _steps(tmp_path) == [k + 1], (_steps(tmp_path), err[-2000:])
    assert _saved_state_step(tmp_path, k + 1) == k + 1
    assert _logged_steps(tmp_path)[-1] == k + 1
    assert f"interrupted (Ctrl-C) at step {k + 1} of 100;" in err


def test_a_learning_rate_that_blows_up_saves_nothing(tmp_path):
    """lr=1e39: the first update makes the weights infinite while the loss logged for that step
    (computed before the update) is still finite. The save is refused, in one line that says so."""
    workdir = tmp_path / "run"
    proc = run_cli("train", "--workdir", str(workdir), "--config.optim.learning_rate=1e39",
                   "--config.optim.warmup_steps=0", "--config.train.steps=1", "--config.train.checkpoint_every=1", *SMALL[:1],
                   *SMALL[2:])
    line = _error_line(proc)
    assert "params" in line and ("NaN" in line or "inf" in line.lower()) and "nothing was saved" in line, line
    assert _steps(workdir) == []
    assert not (workdir / "samples.png").exists()
    sample = run_cli("sample", "--checkpoint", str(workdir), "--num", "2", "--steps", "2", "--no-progress")
    assert "no checkpoint" in _error_line(sample)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("faults") / "run"
    proc = run_cli("train", "--workdir", str(workdir), "--config.train.steps=4", "--config.train.checkpoint_every=2",
                   "--config.train.keep_checkpoints=5", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(workdir) == [2, 4]
    return workdir


def _truncate_an_array_file(step_dir) -> str:
    files = sorted((f for f in (step_dir / "state").rglob("*") if f.is_file() and f.stat().st_size > 1000),
                   key=lambda f: -f.stat().st_size)
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])
    return files[0].name


def test_sample_and_resume_fall_back_past_a_corrupt_newest_step(two_steps, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(two_steps, workdir)
    _truncate_an_array_file(workdir / "checkpoints" / "4")
    out = tmp_path / "g.png"
    sample = run_cli("sample", "--checkpoint", str(workdir), "--num", "2", "--steps", "2", "--out", str(out),
                     "--no-progress")
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert out.exists()
    skipped = [line for line in sample.stderr.splitlines() if "4" in line and ("skip" in line or "unreadable" in line)]
    assert len(skipped) == 1, sample.stderr[-3000:]
    train = run_cli("train", "--workdir", str(workdir), "--config.train.steps=6", "--config.train.checkpoint_every=2",
                    "--config.train.keep_checkpoints=5", *SMALL)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "resuming from step 2" in train.stderr
    assert 6 in _steps(workdir)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r["step"] for r in logged if "loss" in r]
    assert rows == sorted(set(rows)) and rows[-1] == 6          # steps 3-4 logged once, by the rerun
    # The first run's closing evaluation (step 4, past the step resumed from) was dropped with its rows.
    assert [r["step"] for r in logged if "eval_fid_digits" in r] == [6]


def test_a_run_killed_before_its_first_checkpoint_leaves_no_duplicate_log_rows(small_config, tmp_path):
    """A killed run's rows (and a row cut short by the kill) are dropped when the next run starts
    from scratch."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
                                            + '{"step": 4, "lo')
    small_config.train.steps = 2
    loop.train(small_config, str(tmp_path), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] != 1.0 for r in rows)
