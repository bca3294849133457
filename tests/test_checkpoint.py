"""Checkpoints that protect themselves: no non-finite state is saved, a bad newest step does not
block the good ones, silent corruption is caught by checksums, read-only use is quiet."""

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import run_python
from jaxdiff import data
from jaxdiff.checkpoint import MANIFEST, Checkpointer, CheckpointWarning, nonfinite_summary
from jaxdiff.checkpoint.messages import ReadEchoes
from jaxdiff.errors import CheckpointError, TrainingError
from jaxdiff.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (1, 2, 3)


def _state(step: int) -> dict:
    """A small state whose values tell the step apart."""
    return {"params": {"w": jnp.arange(2000.0).reshape(20, 100) * step, "b": jnp.full((7,), float(step))},
            "opt_state": {"mu": jnp.ones((20, 100)) / step}, "step": jnp.int32(step)}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _iterator():
    return data.build("digits", batch_size=4, seed=0).iterator()


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Steps 1, 2, 3 saved asynchronously; step s saved after s batches were drawn."""
    directory = str(tmp_path_factory.mktemp("template") / "checkpoints")
    it = _iterator()
    ck = Checkpointer(directory, max_to_keep=5)
    for s in STEPS:
        next(it)
        ck.save(s, _state(s), it, json.dumps({"step": s}))
    ck.close()
    return directory


@pytest.fixture
def ckdir(template, tmp_path):
    """A fresh copy of the template to break."""
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(template, directory)
    return directory


def _array_file(step_dir: str) -> str:
    """The largest file under state/: the chunk holding the parameters' values."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    return max(files, key=os.path.getsize)


def _flip(path: str, n: int = 64) -> None:
    raw = bytearray(open(path, "rb").read())
    mid = len(raw) // 2
    raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
    open(path, "wb").write(bytes(raw))


def _break(kind: str, directory: str) -> tuple[int, str]:
    """Break the newest step in one of the ways a run, a disk or a copy can; returns (the broken
    step, a word its warning must contain)."""
    step_dir = os.path.join(directory, "3")
    if kind == "truncated":
        f = _array_file(step_dir)
        os.truncate(f, os.path.getsize(f) // 2)
        return 3, os.path.basename(f)
    if kind == "deleted":
        f = _array_file(step_dir)
        os.remove(f)
        return 3, os.path.basename(f)
    if kind == "zero-length":
        f = _array_file(step_dir)
        os.truncate(f, 0)
        return 3, os.path.basename(f)
    if kind == "no-config":
        os.remove(os.path.join(step_dir, "config", "metadata"))
        return 3, "config/metadata"
    if kind == "emptied":
        shutil.rmtree(step_dir)
        os.mkdir(step_dir)
        return 3, "empty"
    if kind == "new-empty":
        os.mkdir(os.path.join(directory, "4"))
        return 4, "empty"
    if kind == "bit-flip":
        f = _array_file(step_dir)
        _flip(f)
        return 3, os.path.basename(f)
    raise ValueError(kind)


KINDS = ["truncated", "deleted", "zero-length", "no-config", "emptied", "new-empty", "bit-flip"]


def _one_line_warnings(record) -> list[str]:
    msgs = [str(w.message) for w in record if issubclass(w.category, CheckpointWarning)]
    assert all(len(m.splitlines()) == 1 for m in msgs), msgs
    return msgs


# ---------------------------------------------------------------------------------------------
# 1. Never save what is not finite


def test_nonfinite_summary_names_each_part_and_its_share():
    params = {"dense": {"kernel": jnp.ones((10, 10)), "bias": jnp.zeros(10)}}
    st = state_lib.create(params, optax.adam(1e-3), jax.random.key(0))
    assert nonfinite_summary(st) is None  # an int step and a typed PRNG key are left alone
    kernel = np.ones((10, 10), np.float32)
    kernel.flat[:37] = np.nan
    mu = jax.tree.map(np.asarray, st.opt_state[0].mu)
    mu["dense"]["bias"] = np.array([np.inf] + [0.0] * 9, np.float32)
    bad = st.replace(params={"dense": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(10)}},
                     opt_state=(st.opt_state[0]._replace(mu=mu),) + tuple(st.opt_state[1:]))
    assert nonfinite_summary(bad) == (
        "params: 34% of values are NaN (first in params/dense/kernel); "
        "opt_state: 1 of 220 values is Inf (first in opt_state/0/mu/dense/bias)")


def test_nonfinite_state_is_refused_and_nothing_is_written(tmp_path):
    directory = str(tmp_path / "checkpoints")
    it = _iterator()
    ck = Checkpointer(directory)
    ck.save(5, _state(1), it, "{}")
    ck.wait()
    before = sorted(os.listdir(directory))
    w = np.asarray(_state(1)["params"]["w"]).copy()
    w.flat[: int(0.37 * w.size)] = np.nan
    bad = {**_state(2), "params": {"w": jnp.asarray(w), "b": jnp.ones(7)}}
    with pytest.raises(TrainingError) as e:
        ck.save(10, bad, it, "{}")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "params: 37% of values are NaN" in msg and "nothing was saved" in msg
    assert f"step 5 in {directory}, is intact" in msg
    ck.wait()
    assert sorted(os.listdir(directory)) == before == ["5"]  # no step 10, no temporary folder
    ema_inf = {**_state(2), "ema": jnp.full((3,), jnp.inf)}
    with pytest.raises(TrainingError, match=r"ema: 100% of values are Inf"):
        ck.save(10, ema_inf, it, "{}")
    ck.close()
    assert Checkpointer(directory, read_only=True).all_steps() == [5]


_SHARDED = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxdiff.checkpoint import nonfinite_summary
mesh = Mesh(np.array(jax.devices()), ("x",))
w = np.ones((8, 1000), np.float32); w[5, :250] = np.nan   # only device 5's shard holds NaN
x = jax.device_put(w, NamedSharding(mesh, P("x")))
e = jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P(None, None)))
print(json.dumps({"bad": nonfinite_summary({"params": x, "ema": e}), "ok": nonfinite_summary({"ema": e}),
                  "shards": len(x.addressable_shards)}))
"""


def test_nonfinite_check_on_a_sharded_array():
    out = run_python(_SHARDED, devices=8, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r == {"bad": "params: 3% of values are NaN (first in params)", "ok": None, "shards": 8}


# ---------------------------------------------------------------------------------------------
# 2. A bad newest step does not block the good ones


@pytest.mark.parametrize("kind", KINDS)
def test_restore_falls_back_past_a_bad_newest_step(ckdir, kind):
    bad, word = _break(kind, ckdir)
    good = 3 if bad == 4 else 2
    ck = Checkpointer(ckdir, read_only=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        state, step = ck.restore(_abstract(_state(1)))
    assert step == good and _equal(state, _state(good))
    (msg,) = _one_line_warnings(record)
    assert f"step(s) in {ckdir}: {bad} (" in msg and word in msg and f"using step {good}" in msg
    assert bad in ck.all_steps()  # read-only: the bad step stays where it is
    ck.close()


@pytest.mark.parametrize("kind", ["truncated", "no-config", "bit-flip"])
def test_the_read_only_load_path_falls_back_with_one_warning(ckdir, kind):
    """What `jaxdiff.load` does: read the config, build the target from it, restore."""
    _break(kind, ckdir)
    ck = Checkpointer(ckdir, read_only=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        config = ck.read_config()
        step = ck.readable_step()
        state, restored = ck.restore(_abstract(_state(1)))
    assert config == {"step": 2} and step == restored == 2 and _equal(state, _state(2))
    assert len(_one_line_warnings(record)) == 1  # one event, one line
    ck.close()


@pytest.mark.parametrize("kind", ["truncated", "deleted", "zero-length"])
def test_fallback_without_checksums_finds_the_bad_step_by_reading_it(ckdir, kind):
    """Steps saved before checksums existed: a cut array file shows only when read."""
    for s in STEPS:
        os.remove(os.path.join(ckdir, str(s), MANIFEST))
    _break(kind, ckdir)
    ck = Checkpointer(ckdir, read_only=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        state, step = ck.restore(_abstract(_state(1)))
    assert step == 2 and _equal(state, _state(2))
    skipped, note = _one_line_warnings(record)
    assert "step(s)" in skipped and ": 3 (" in skipped and "using step 2" in skipped
    assert f"step 2 in {ckdir} has no {MANIFEST}" in note and "unverified" in note
    ck.close()


def test_a_target_built_from_the_config_follows_the_step_restored(ckdir):
    """`jaxdiff.load` builds the network from the saved config: on a fallback the target is
    built again from the config of the step actually restored."""
    for s in STEPS:
        os.remove(os.path.join(ckdir, str(s), MANIFEST))
    _break("truncated", ckdir)
    seen = []

    def target(config):
        seen.append(config["step"])
        return _abstract(_state(1))

    ck = Checkpointer(ckdir, read_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        state, step = ck.restore(target)
    assert step == 2 and seen == [3, 2] and _equal(state, _state(2))
    ck.close()


def test_a_resuming_run_moves_bad_steps_aside_and_saves_them_again(ckdir):
    _break("bit-flip", ckdir)
    it = _iterator()
    ck = Checkpointer(ckdir, max_to_keep=5)
    seen = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        state, step = ck.restore(_abstract(_state(1)), data_iterator=it, check_config=seen.append)
    assert step == 2 and _equal(state, _state(2)) and seen == [{"step": 2}]
    (msg,) = _one_line_warnings(record)
    assert "moved aside as 3.unreadable" in msg
    assert ck.all_steps() == [1, 2] and os.path.isdir(os.path.join(ckdir, "3.unreadable"))
    # The iterator stands where it stood at step 2: two batches drawn.
    ref = _iterator()
    next(ref), next(ref)
    assert np.array_equal(next(it)["image"], next(ref)["image"])
    ck.save(3, _state(3), it, json.dumps({"step": 3}))  # would be "step 3 already exists" otherwise
    ck.wait()
    state, step = ck.restore(_abstract(_state(1)))
    assert step == 3 and _equal(state, _state(3))
    ck.close()


def test_check_config_refusal_propagates_and_moves_nothing(ckdir):
    _break("bit-flip", ckdir)
    ck = Checkpointer(ckdir, max_to_keep=5)

    def refuse(config):
        raise TrainingError(f"different run (saved {config})")

    with pytest.raises(TrainingError, match=r"saved \{'step': 2\}"):
        ck.restore(_abstract(_state(1)), check_config=refuse)
    assert ck.all_steps() == [1, 2, 3]
    ck.close()


@pytest.mark.parametrize("kind", ["truncated", "no-config", "emptied", "bit-flip"])
def test_an_explicitly_requested_bad_step_is_an_error(ckdir, kind):
    _, word = _break(kind, ckdir)
    ck = Checkpointer(ckdir, read_only=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for call in (lambda: ck.restore(_abstract(_state(1)), 3), lambda: ck.read_config(3),
                     lambda: ck.readable_step(3)):
            with pytest.raises(CheckpointError) as e:
                call()
            msg = str(e.value)
            assert len(msg.splitlines()) == 1
            assert msg.startswith(f"could not restore checkpoint {ckdir}/3: ") and word in msg
            assert "is corrupt or incomplete; restore another step [1, 2] or name none" in msg
    assert not _one_line_warnings(record)  # no silent (or noisy) fallback
    ck.close()


def test_no_readable_step_is_one_error_listing_each(ckdir):
    for s in STEPS:
        _flip(_array_file(os.path.join(ckdir, str(s))))
    ck = Checkpointer(ckdir, read_only=True)
    with pytest.raises(CheckpointError) as e:
        ck.restore(_abstract(_state(1)))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"no readable checkpoint in {ckdir} (step 3: ")
    assert "step 2: " in msg and "step 1: " in msg and msg.count("does not match its checksum") == 3
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ck.read_config()
    ck.close()


def test_a_verified_step_that_does_not_fit_is_an_error_not_a_fallback(ckdir):
    ck = Checkpointer(ckdir, read_only=True)
    other = {**_abstract(_state(1)), "params": {"w": jax.ShapeDtypeStruct((5, 5), jnp.float32),
                                                "b": jax.ShapeDtypeStruct((7,), jnp.float32)}}
    with pytest.raises(CheckpointError) as e:
        ck.restore(other)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert f"{ckdir}/3" in msg and "match their checksums, so it was written for a different model" in msg
    ck.close()


# ---------------------------------------------------------------------------------------------
# 3. Checksums


def test_every_saved_step_holds_a_manifest_of_its_files(template):
    for s in STEPS:
        folder = os.path.join(template, str(s))
        files = json.load(open(os.path.join(folder, MANIFEST)))["files"]
        on_disk = sorted(os.path.relpath(os.path.join(r, f), folder)
                         for r, _, fs in os.walk(folder) for f in fs if r != folder)
        assert sorted(files) == on_disk and any(k.startswith("state/") for k in files)
        for rel, entry in files.items():
            raw = open(os.path.join(folder, rel), "rb").read()
            assert entry == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def test_synchronous_save_returns_with_the_manifest_written(tmp_path):
    ck = Checkpointer(str(tmp_path), async_save=False)
    ck.save(1, _state(1), _iterator(), "{}")
    assert os.path.isfile(tmp_path / "1" / MANIFEST)
    ck.close()


def test_a_bit_flip_is_detected_and_named(ckdir):
    f = _array_file(os.path.join(ckdir, "3"))
    _flip(f)
    rel = os.path.relpath(f, os.path.join(ckdir, "3"))
    ck = Checkpointer(ckdir, read_only=True)
    assert ck.restore(_abstract(_state(1)), 3, verify=False)[1] == 3  # unverified, orbax reads it
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        state, step = ck.restore(_abstract(_state(1)))
    assert step == 2 and _equal(state, _state(2))
    (msg,) = _one_line_warnings(record)
    assert f"3 ({rel} does not match its checksum)" in msg
    ck.close()


def test_a_step_without_manifest_restores_with_a_note(ckdir):
    os.remove(os.path.join(ckdir, "3", MANIFEST))
    ck = Checkpointer(ckdir, read_only=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        state, step = ck.restore(_abstract(_state(1)))
        again, _ = ck.restore(_abstract(_state(1)))
    assert step == 3 and _equal(state, _state(3)) and _equal(again, _state(3))
    (note,) = _one_line_warnings(record)  # noted once per Checkpointer
    assert f"step 3 in {ckdir} has no {MANIFEST}" in note
    ck.close()


_KILLED = """
import os, signal, sys, numpy as np, jax
from jaxdiff import data
from jaxdiff.checkpoint import Checkpointer
it = data.build("digits", batch_size=4, seed=0).iterator()
ck = Checkpointer(sys.argv[1])
big = {"w": jax.random.normal(jax.random.key(0), (2000, 2000))}
ck.save(1, big, it, "{}"); ck.wait()
ck.save(2, big, it, "{}")   # asynchronous: killed while it writes
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_save_killed_midway_leaves_the_earlier_steps_readable(tmp_path):
    directory = str(tmp_path / "checkpoints")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _KILLED, directory], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    names = sorted(os.listdir(directory))
    assert names[0] == "1" and "2" not in names  # at most a temporary folder for step 2
    abstract = {"w": jax.ShapeDtypeStruct((2000, 2000), jnp.float32)}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ck = Checkpointer(directory, read_only=True)
        assert ck.all_steps() == [1] and ck.restore(abstract)[1] == 1
        ck.close()
        assert any(n.startswith("2.") for n in os.listdir(directory))  # read-only leaves it
        ck = Checkpointer(directory)
        ck.save(3, {"w": jnp.zeros((2000, 2000))}, _iterator(), "{}")
        ck.wait()
        assert ck.restore(abstract)[1] == 3
        ck.close()
    assert not _one_line_warnings(record)
    assert sorted(os.listdir(directory)) == ["1", "3"]  # a writable Checkpointer removed it


# ---------------------------------------------------------------------------------------------
# keep-N


def test_the_trainer_keeps_the_newest_keep_checkpoints_steps(small_config, tmp_path):
    """`train.keep_checkpoints=2` with a save at every one of 5 steps: exactly steps 4 and 5 stay
    on disk (the default keeps 3, so a trainer that ignored the key would leave 3, 4, 5), and
    the newest holds the last state."""
    from jaxdiff.train import loop

    small_config.train.steps = 5
    small_config.train.checkpoint_every = 1
    small_config.train.keep_checkpoints = 2
    state = loop.train(small_config, str(tmp_path), progress=False)
    directory = tmp_path / "checkpoints"
    assert sorted(os.listdir(directory)) == ["4", "5"]  # and no leftover temporary folder
    ck = Checkpointer(str(directory), read_only=True)
    restored, step = ck.restore(_abstract(state))
    ck.close()
    assert step == 5 and int(restored.step) == 5 and _equal(restored.params, state.params)


# ---------------------------------------------------------------------------------------------
# 4. Quiet read-only use


_QUIET = """
import sys, jax, jax.numpy as jnp, orbax.checkpoint as ocp
from jaxdiff.checkpoint import Checkpointer
f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
abstract = {"params": {"w": f32(20, 100), "b": f32(7)}, "opt_state": {"mu": f32(20, 100)},
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
for d in sys.argv[1:]:
    # What `jaxdiff.load` does: the target is built from the config of the step being restored.
    ck = Checkpointer(d, read_only=True)
    ck.all_steps(); ck.latest_step()
    state, step = ck.restore(lambda config: abstract)
    assert ck.read_config(step) == {"step": step} and ck.has_data_state(step)
    print(d, step)
    ck.close()
print("MARK", file=sys.stderr, flush=True)
ocp.CheckpointManager(sys.argv[1], options=ocp.CheckpointManagerOptions(read_only=True)).close()
"""


def test_read_only_use_prints_only_jaxdiff_lines(template, tmp_path):
    broken, old = str(tmp_path / "broken"), str(tmp_path / "old")
    shutil.copytree(template, broken)
    _break("bit-flip", broken)
    shutil.copytree(template, old)  # no checksums and a cut newest step: orbax itself fails
    for s in STEPS:
        os.remove(os.path.join(old, str(s), MANIFEST))
    _break("truncated", old)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", _QUIET, template, broken, old], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [l.split()[-1] for l in out.stdout.splitlines()] == ["3", "2", "2"]
    ours, orbax_raw = out.stderr.split("MARK\n")
    # broken: the skipped step; old: the skipped step and the unverified one restored.
    assert len(ours.splitlines()) == 3, ours
    skip_broken, skip_old, note_old = ours.splitlines()
    prefix = "jaxdiff.checkpoint:0: CheckpointWarning: "
    assert skip_broken.startswith(prefix + f"skipped unreadable checkpoint step(s) in {broken}: 3 ("), ours
    assert skip_old.startswith(prefix + f"skipped unreadable checkpoint step(s) in {old}: 3 ("), ours
    assert note_old == prefix + (f"checkpoint step 2 in {old} has no {MANIFEST} (saved without "
                                 f"checksums, or by an older jaxdiff); restoring it unverified"), ours
    assert "read only" in orbax_raw  # the capture works: orbax alone is not quiet


def _unraisable(exc: BaseException, obj=None):
    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                                 err_msg=None, object=obj)


def test_read_echoes_drop_only_the_echoes_of_a_failed_read(monkeypatch):
    """The echo of a failed read (tensorstore's callback finding orbax's loop closed) is dropped
    from the moment a read starts; any other unraisable reaches the hook that was there before."""
    printed = []
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        echo = e
    try:
        raise RuntimeError("Event loop is closed")  # the same words, not from the loop
    except RuntimeError as e:
        other = e

    echoes = ReadEchoes()
    echoes.watch()  # before the read: an echo can come before the failure reaches `restore`
    sys.unraisablehook(_unraisable(echo))
    sys.unraisablehook(_unraisable(other))
    sys.unraisablehook(_unraisable(ValueError("x")))
    assert [type(u.exc_value) for u in printed] == [RuntimeError, ValueError]
    assert printed[0].exc_value is other
    echoes.read_done(failed=False)  # a clean read: the hook goes at once
    assert sys.unraisablehook == printed.append

    echoes.watch()
    echoes.read_done(failed=True)  # a failed read: it stays for the late echoes ...
    echoes.watch()
    echoes.read_done(failed=False)  # ... even past a clean read after it ...
    sys.unraisablehook(_unraisable(echo))
    assert len(printed) == 2
    echoes.remove()  # ... until `close`
    assert sys.unraisablehook == printed.append


# ---------------------------------------------------------------------------------------------
# Two processes: one decision


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TWO = """
import json, sys, warnings, jax, jax.numpy as jnp, numpy as np
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxdiff import data
from jaxdiff.checkpoint import Checkpointer
from jaxdiff.errors import TrainingError
mesh = Mesh(np.array(jax.devices()), ("x",))
sh = NamedSharding(mesh, P("x"))
def state(value, nan_on=None):
    local = np.full((4, 100), value, np.float32)
    if jax.process_index() == nan_on:
        local[:, :50] = np.nan
    return {{"params": jax.make_array_from_process_local_data(sh, local)}}
it = data.build("digits", batch_size=4, seed=0, process_index=jax.process_index(), process_count=2).iterator()
ck = Checkpointer("{directory}")
out = {{}}
ck.save(1, state(1.0), it, "{{}}"); ck.save(2, state(2.0), it, "{{}}"); ck.wait()
try:
    ck.save(3, state(3.0, nan_on=1), it, "{{}}")      # only process 1 holds the NaN
except TrainingError as e:
    out["refused"] = str(e)
ck.wait()
multihost_utils.sync_global_devices("saved")
if jax.process_index() == 0:                          # corrupt step 2 for both
    import os
    d = "{directory}/2/state"
    f = max((os.path.join(r, n) for r, _, ns in os.walk(d) for n in ns), key=os.path.getsize)
    raw = bytearray(open(f, "rb").read()); raw[len(raw) // 2] ^= 0xFF; open(f, "wb").write(bytes(raw))
multihost_utils.sync_global_devices("broken")
ro = Checkpointer("{directory}", read_only=True)
abstract = {{"params": jax.ShapeDtypeStruct((8, 100), jnp.float32, sharding=sh)}}
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    st, step = ro.restore(abstract)
out["step"] = step
out["value"] = float(np.asarray(multihost_utils.process_allgather(st["params"], tiled=True)).mean())
out["warnings"] = [str(x.message) for x in w]
out["steps"] = ck.all_steps()
ro.close(); ck.close()
print(json.dumps(out))
"""


def test_two_processes_reach_the_same_decisions(tmp_path):
    directory = tmp_path / "checkpoints"
    code = _TWO.format(port=_free_port(), directory=directory)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    # Both refuse step 3 with the same line, although only process 1 saw NaN locally.
    assert r0["refused"] == r1["refused"] and "params: 25% of values are NaN" in r0["refused"]
    assert "step 2 in" in r0["refused"] and r0["steps"] == r1["steps"] == [1, 2]
    # Both skip step 2 (process 0 corrupted it) and restore step 1; process 0 alone warns.
    assert r0["step"] == r1["step"] == 1 and r0["value"] == r1["value"] == 1.0
    assert len(r0["warnings"]) == 1 and "does not match its checksum" in r0["warnings"][0]
    assert r1["warnings"] == []
