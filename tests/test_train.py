"""The trainer: loss goes down, resume is exact, device count does not change the result."""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_resumes_bit_exact, run_python
from jaxdiff import sharding
from jaxdiff.train import build, loop
from jaxdiff.train.step import make_loss_fn, make_train_step, min_snr_weight


def test_min_snr_weights_closed_form():
    abar = jnp.array([0.999, 0.5, 0.01])
    snr = abar / (1 - abar)
    gamma = 5.0
    np.testing.assert_allclose(min_snr_weight("epsilon", gamma)(abar), np.minimum(snr, gamma) / snr, rtol=1e-6)
    np.testing.assert_allclose(min_snr_weight("sample", gamma)(abar), np.minimum(snr, gamma), rtol=1e-6)
    np.testing.assert_allclose(min_snr_weight("v_prediction", gamma)(abar), np.minimum(snr, gamma) / (snr + 1), rtol=1e-6)
    np.testing.assert_array_equal(min_snr_weight("epsilon", 0.0)(abar), np.ones(3))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_train_steps_lower_the_loss_on_a_fixed_batch(small_config, prediction_type):
    cfg = small_config
    cfg.diffusion.prediction_type = prediction_type
    cfg.optim.learning_rate = 3e-3
    mesh = sharding.make_mesh()
    ds = build.build_task(cfg, mesh)
    batch = jax.tree.map(jnp.asarray, next(ds.iterator()))
    model = build.build_model(cfg, ds.image_shape, ds.num_classes)
    schedule = build.build_schedule(cfg)
    tx = build.build_optimizer(cfg)
    state = jax.jit(build.init_state_fn(model, tx, ds.image_shape, 0))()
    loss_fn = make_loss_fn(model.apply, schedule.alphas_cumprod, prediction_type=prediction_type,
                           null_label=model.num_classes)
    step = jax.jit(make_train_step(loss_fn, tx))
    keys = jax.random.split(jax.random.PRNGKey(123), 4)
    eval_loss = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, batch, k))(keys)))
    before = float(eval_loss(state.params))
    for _ in range(40):
        state, _ = step(state, batch)
    after = float(eval_loss(state.params))
    assert after < 0.6 * before, (before, after)


def test_resume_is_bit_exact(small_config, tmp_path):
    """train N == train k, stop, resume, train N-k: every array of the state, bit for bit."""
    assert_resumes_bit_exact(small_config, tmp_path / "full", tmp_path / "split")


def test_resume_refuses_a_different_model(small_config, tmp_path):
    cfg = small_config
    cfg.train.steps = 3
    loop.train(cfg, str(tmp_path), progress=False, write_samples=False)
    cfg.train.steps = 6
    cfg.diffusion.prediction_type = "epsilon"
    with pytest.raises(loop.TrainingError, match="diffusion.prediction_type"):
        loop.train(cfg, str(tmp_path), progress=False, write_samples=False)


def test_nan_loss_stops_with_a_message_and_keeps_checkpoints(small_config, tmp_path):
    cfg = small_config
    cfg.train.steps = 3
    loop.train(cfg, str(tmp_path), progress=False, write_samples=False)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    cfg.train.steps = 9
    cfg.optim.learning_rate = 1e30
    with pytest.raises(loop.TrainingError, match=r"loss became (nan|inf).*checkpoints .* are intact"):
        loop.train(cfg, str(tmp_path), progress=False, write_samples=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == saved
    import jaxdiff
    model = jaxdiff.load(str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model.params))


def test_one_device_and_eight_devices_agree(tmp_path):
    code = textwrap.dedent(f"""
        import json, jax, numpy as np
        from jaxdiff import config as config_lib
        from jaxdiff.train import build, loop
        assert len(jax.devices()) == 8
        c = config_lib.get_config()
        c.data.image_size = 16; c.data.batch_size = 16; c.train.steps = 4
        c.train.log_every = 1; c.train.checkpoint_every = 4; c.optim.warmup_steps = 1
        one = loop.train(c, "{tmp_path}/one", devices=jax.devices()[:1], progress=False, write_samples=False)
        eight = loop.train(c, "{tmp_path}/eight", devices=jax.devices(), progress=False, write_samples=False)
        a, b = jax.tree.leaves(one.params), jax.tree.leaves(eight.params)
        shard_counts = sorted({{len(x.sharding.device_set) for x in b}})
        model = build.build_model(c, (16, 16, 1), 10)
        init = jax.tree.leaves(jax.jit(build.init_state_fn(model, build.build_optimizer(c), (16, 16, 1), c.seed))().params)
        norm = lambda leaves: float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves)))
        # How far the two runs drift apart, relative to how far training moved the parameters.
        drift = norm([np.asarray(x) - np.asarray(y) for x, y in zip(a, b)])
        moved = norm([np.asarray(x) - np.asarray(y) for x, y in zip(a, init)])
        err = drift / moved
        max_abs = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))
        losses = [[json.loads(l)["loss"] for l in open(f"{tmp_path}/{{n}}/metrics.jsonl")] for n in ("one", "eight")]
        print(json.dumps({{"err": err, "max_abs": max_abs, "moved": moved, "devices": shard_counts, "losses": losses}}))
    """)
    out = run_python(code, devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == [8]          # the 8-device run's params live on all 8 devices
    # Same updates up to float reduction order (all-reduce vs single-device sums), which Adam's
    # normalisation magnifies for near-zero gradients: measured ~1e-4 of the distance moved.
    assert result["moved"] > 1e-2, result
    assert result["err"] < 2e-3 and result["max_abs"] < 1e-4, result
    one, eight = result["losses"]
    np.testing.assert_allclose(one, eight, rtol=1e-4)
    assert len(set(one)) == len(one)          # the runs really trained: every step's loss differs
