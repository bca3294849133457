"""The training objective against closed forms, through the trainer `train/build.py` builds.

An oracle network knows the batch it is trained on: from x_t and t it recovers the noise exactly,
eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), and answers the target of its own
`prediction_type` (plus a trainable constant `offset`, 0 unless a test sets it). So under its own
prediction type it must get zero loss, and under any other type a loss this file computes by hand
in float64 from the x_t and t the network was handed (recorded by a host callback):

    epsilon       target eps
    sample        target x0
    v_prediction  target v = sqrt(abar) eps - sqrt(1 - abar) x0          (Salimans & Ho 2022)

    min-SNR-gamma weight (Hang et al. 2023), SNR = abar / (1 - abar): min(SNR, gamma) / SNR for
    eps, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v; 1 when gamma = 0.

    loss            = mean_b [ w_b * mean_pixels (pred_b - target_b)^2 ]
    d loss/d offset = mean_b [ w_b * 2 mean_pixels (pred_b - target_b) ]

The oracle reads abar_t from the trainer's own schedule, so any slip in how the step draws t,
looks up abar_t, noises x0, picks the target or weights the error shows up here.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import config as config_lib
from jaxdiff import parameterization, sharding
from jaxdiff.train import build
from jaxdiff.train.step import min_snr_weight

TYPES = ("epsilon", "sample", "v_prediction")
BATCH, SIZE = 64, 8


class Oracle(nn.Module):
    """Knows `data` [B, H, W, C] (the batch it will see) and the schedule `alphas_cumprod` [T];
    returns the exact `prediction_type` target plus a scalar parameter `offset`."""

    data: np.ndarray
    alphas_cumprod: np.ndarray
    prediction_type: str
    offset: float = 0.0
    record: Callable | None = None       # record({"x_t", "t", ("labels")}) on each training call
    num_classes: int | None = None
    context_dim: int | None = None

    @nn.compact
    def __call__(self, x, t, labels=None, train: bool = False):
        offset = self.param("offset", nn.initializers.constant(self.offset), ())
        abar = jnp.asarray(self.alphas_cumprod, jnp.float32)[t.astype(jnp.int32)]  # [B]
        a = jnp.sqrt(abar)[:, None, None, None]                                     # [B, 1, 1, 1]
        s = jnp.sqrt(1.0 - abar)[:, None, None, None]
        x0 = jnp.asarray(self.data, jnp.float32)                                    # [B, H, W, C]
        eps = (x - a * x0) / s
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[self.prediction_type]
        if train and self.record is not None:
            seen = {"x_t": x, "t": t} if labels is None else {"x_t": x, "t": t, "labels": labels}
            jax.debug.callback(lambda seen: self.record(jax.tree.map(np.asarray, seen)), seen)
        return out + offset


def _data(seed=0):
    """A batch of distinct images in [-1, 1]: [B, H, W, 1] float32."""
    return np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (BATCH, SIZE, SIZE, 1), minval=-1, maxval=1))


def _config(loss_type: str, gamma: float, label_dropout: float = 0.0):
    cfg = config_lib.get_config()
    cfg.diffusion.prediction_type = loss_type
    cfg.diffusion.min_snr_gamma = gamma
    cfg.diffusion.label_dropout = label_dropout
    cfg.data.batch_size = BATCH
    return cfg


def _train(cfg, oracle_type: str, *, offset: float = 0.0, steps: int = 1, num_classes=None, labels=None):
    """`steps` steps of the trainer `build.build_trainer` makes from `cfg`, on the oracle.

    Returns (metrics of each step as floats, what the network was handed at each step
    [{"x_t", "t", ("labels")}], the data as float64, the schedule's alphas_cumprod as float64)."""
    data = _data()
    schedule = build.build_schedule(cfg)
    record = []
    model = Oracle(data=data, alphas_cumprod=np.asarray(schedule.alphas_cumprod), prediction_type=oracle_type,
                   offset=offset, record=record.append, num_classes=num_classes)
    trainer = build.build_trainer(cfg, sharding.make_mesh(), model, schedule, build.build_optimizer(cfg),
                                  data.shape[1:])
    state = trainer.init()
    batch = {"image": jnp.asarray(data)}
    if labels is not None:
        batch["label"] = jnp.asarray(labels, jnp.int32)
    metrics = []
    for _ in range(steps):
        state, m = trainer.step(state, batch)
        metrics.append(jax.tree.map(float, m))
    assert len(record) == steps, "the network should be called once per training step"
    return metrics, record, data.astype(np.float64), np.asarray(schedule.alphas_cumprod, np.float64)


def _hang_weight(loss_type: str, gamma: float, abar):
    """Min-SNR-gamma (Hang et al. 2023) in the loss type's own space, float64 `[B]`."""
    if gamma == 0:
        return np.ones_like(abar)
    snr = abar / (1.0 - abar)
    clipped = np.minimum(snr, gamma)
    return {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1.0)}[loss_type]


def _noise(seen, x0, alphas_cumprod):
    """(eps, abar) in float64: the noise that made x_t from x0 at the t the network was handed."""
    abar = alphas_cumprod[seen["t"].astype(np.int64)]                               # [B]
    a = np.sqrt(abar)[:, None, None, None]                                          # [B, 1, 1, 1]
    s = np.sqrt(1.0 - abar)[:, None, None, None]
    return (seen["x_t"].astype(np.float64) - a * x0) / s, abar


def _by_hand(seen, x0, alphas_cumprod, oracle_type, loss_type, gamma, offset):
    """(loss, |d loss / d offset|) in float64 from what the network was handed."""
    eps, abar = _noise(seen, x0, alphas_cumprod)
    a = np.sqrt(abar)[:, None, None, None]
    s = np.sqrt(1.0 - abar)[:, None, None, None]
    target = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}
    err = target[oracle_type] + offset - target[loss_type]                          # [B, H, W, C]
    w = _hang_weight(loss_type, gamma, abar)
    loss = np.mean(w * np.mean(err ** 2, axis=(1, 2, 3)))
    grad = np.mean(w * 2.0 * np.mean(err, axis=(1, 2, 3)))
    return loss, abs(grad)


def test_diffuse_is_the_forward_process():
    x0 = np.array([[0.5, -1.0], [1.0, 0.25]])
    eps = np.array([[2.0, 0.5], [-1.0, -0.5]])
    abar = np.array([0.64, 0.36])
    expect = np.array([[0.8 * 0.5 + 0.6 * 2.0, 0.8 * -1.0 + 0.6 * 0.5],
                       [0.6 * 1.0 + 0.8 * -1.0, 0.6 * 0.25 + 0.8 * -0.5]])
    np.testing.assert_allclose(parameterization.diffuse(x0, eps, abar), expect, rtol=1e-6)


@pytest.mark.parametrize("loss_type", TYPES)
def test_min_snr_weight_is_hang_et_al_at_float64(loss_type):
    abar = np.array([1 - 1e-6, 0.999, 0.9, 5 / 6, 0.5, 0.1, 1e-3, 1e-6])   # SNR from 1e6 to 1e-6, 5 exactly
    with jax.enable_x64(True):
        for gamma in (1.0, 5.0, 20.0):
            w = min_snr_weight(loss_type, gamma)(jnp.asarray(abar, jnp.float64))
            assert w.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(w), _hang_weight(loss_type, gamma, abar), rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(min_snr_weight(loss_type, 0.0)(jnp.asarray(abar))), 1.0)


def test_noising_draws_uniform_timesteps_and_standard_normal_noise():
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with t ~ U{0..T-1} and eps ~ N(0, I), fresh at
    every step: the eps recovered from what the network was handed is standard normal and
    uncorrelated with x0 (a wrong noising coefficient leaves a multiple of x0 in it)."""
    cfg = _config("epsilon", 0.0)
    steps = 3
    _, seen, x0, alphas_cumprod = _train(cfg, "epsilon", steps=steps)
    num_t = cfg.diffusion.num_train_timesteps
    t = np.concatenate([r["t"] for r in seen])                                      # [steps * B]
    assert all(r["t"].dtype == np.float32 for r in seen)
    np.testing.assert_array_equal(t, np.round(t))
    assert t.min() >= 0 and t.max() <= num_t - 1
    se_t = np.sqrt((num_t ** 2 - 1) / 12 / t.size)                                  # std of U{0..T-1} / sqrt(n)
    assert abs(t.mean() - (num_t - 1) / 2) < 4 * se_t, t.mean()
    assert len(np.unique(t)) > 0.8 * t.size                                         # not one t per batch
    eps = np.stack([_noise(r, x0, alphas_cumprod)[0] for r in seen])               # [steps, B, H, W, C]
    n = eps.size
    assert abs(eps.mean()) < 4 / np.sqrt(n), eps.mean()
    assert abs(eps.var() - 1.0) < 4 * np.sqrt(2 / n), eps.var()
    assert abs(np.mean(eps * x0) / np.sqrt(np.mean(x0 ** 2))) < 4 / np.sqrt(n)
    for i in range(1, steps):
        assert not np.allclose(seen[i]["t"], seen[0]["t"]) and abs(np.mean(eps[i] * eps[0])) < 4 / np.sqrt(eps[0].size)


@pytest.mark.parametrize("loss_type", TYPES)
@pytest.mark.parametrize("oracle_type", TYPES)
def test_oracle_loss_through_the_trainer(oracle_type, loss_type):
    """Zero loss and gradient under the oracle's own target; the hand-computed min-SNR-5 weighted
    loss and gradient under every other one."""
    gamma = 5.0
    (metrics,), (seen,), x0, alphas_cumprod = _train(_config(loss_type, gamma), oracle_type)
    if oracle_type == loss_type:
        assert metrics["loss"] < 1e-12 and metrics["grad_norm"] < 1e-8, metrics
        return
    snr = alphas_cumprod[seen["t"].astype(np.int64)] / (1 - alphas_cumprod[seen["t"].astype(np.int64)])
    assert (snr > gamma).any() and (snr < gamma).any(), "both sides of min(SNR, gamma) should be drawn"
    loss, grad = _by_hand(seen, x0, alphas_cumprod, oracle_type, loss_type, gamma, 0.0)
    assert loss > 0.01
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], grad, rtol=1e-4)


@pytest.mark.parametrize("loss_type, gamma", [("epsilon", 5.0), ("sample", 5.0), ("v_prediction", 5.0),
                                              ("v_prediction", 0.0)])
def test_constant_error_is_weighted_by_min_snr(loss_type, gamma):
    """The oracle off by a constant c under its own target: loss = c^2 mean_b w_b and
    d loss / d c = 2 c mean_b w_b, with w the min-SNR-gamma weight of the t each example drew
    (1 for gamma = 0)."""
    c = 0.25
    (metrics,), (seen,), _, alphas_cumprod = _train(_config(loss_type, gamma), loss_type, offset=c)
    w = _hang_weight(loss_type, gamma, alphas_cumprod[seen["t"].astype(np.int64)])
    if gamma:
        assert w.std() > 0.1 * w.mean(), "the weights should vary over the drawn t"
    np.testing.assert_allclose(metrics["loss"], c ** 2 * w.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], 2 * c * w.mean(), rtol=1e-5)


def test_label_dropout_through_the_trainer():
    """A class-conditional network sees the batch's labels, each replaced by the null class
    (num_classes) with probability diffusion.label_dropout: none at 0, all at 1."""
    labels = np.arange(BATCH) % 10
    seen_at = {}
    for p in (0.0, 0.5, 1.0):
        _, (seen,), _, _ = _train(_config("epsilon", 0.0, label_dropout=p), "epsilon", num_classes=10,
                                  labels=labels)
        seen_at[p] = seen["labels"]
    np.testing.assert_array_equal(seen_at[0.0], labels)
    np.testing.assert_array_equal(seen_at[1.0], np.full(BATCH, 10))
    kept = seen_at[0.5] == labels
    np.testing.assert_array_equal(seen_at[0.5][~kept], 10)
    assert 0.25 < kept.mean() < 0.75, kept.mean()
