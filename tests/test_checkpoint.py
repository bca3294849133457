"""Checkpoints that protect themselves: no non-finite state is saved."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import run_python
from jaxdiff import data
from jaxdiff.checkpoint import Checkpointer, nonfinite_summary
from jaxdiff.errors import TrainingError
from jaxdiff.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step: int) -> dict:
    """A small state whose values tell the step apart."""
    return {"params": {"w": jnp.arange(2000.0).reshape(20, 100) * step, "b": jnp.full((7,), float(step))},
            "opt_state": {"mu": jnp.ones((20, 100)) / step}, "step": jnp.int32(step)}


def _iterator():
    return data.build("digits", batch_size=4, seed=0).iterator()


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
