"""The flow-matching objective (train/flow.py) against closed forms, through the trainer
`train/build.py` builds, and a flow-matching DiT run end to end (exact resume, sampling).

A velocity oracle knows the batch it is trained on: from x_s and t = sigma T it recovers the noise,
eps = (x_s - (1 - sigma) x0) / sigma, and answers the exact velocity v = eps - x0 = (x_s - x0) /
sigma plus a trainable constant `offset`. With offset 0 the loss is 0 whatever the timestep
density or weighting; with offset c it is c^2 mean_b w(sigma_b), with sigma_b read back from the
t the network was handed (recorded by a host callback).

Densities (u ~ U(0, 1)): uniform u; logit-normal sigmoid(m + s n), so logit(sigma) ~ N(m, s^2);
mode f(u) = 1 - u - a (cos^2(pi u / 2) - 1 + u), decreasing for the allowed a, so
P(sigma <= f(u0)) = 1 - u0; the shift sigma -> k sigma / (1 + (k - 1) sigma) adds log k to
logit(sigma).
"""

import json
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import assert_resumes_bit_exact

from jaxdiff import config as config_lib
from jaxdiff import sharding
from jaxdiff.errors import ConfigError
from jaxdiff.train import build, flow

BATCH, SIZE, T = 64, 8, 1000


class VelocityOracle(nn.Module):
    """Knows `data` [B, H, W, C]; returns the exact flow velocity (x_s - x0) / sigma + offset."""

    data: np.ndarray
    offset: float = 0.0
    record: Callable | None = None
    num_classes: int | None = None
    context_dim: int | None = None

    @nn.compact
    def __call__(self, x, t, labels=None, train: bool = False):
        offset = self.param("offset", nn.initializers.constant(self.offset), ())
        sigma = (t / T)[:, None, None, None]                                      # [B, 1, 1, 1]
        out = (x - jnp.asarray(self.data)) / sigma
        if train and self.record is not None:
            jax.debug.callback(lambda seen: self.record(jax.tree.map(np.asarray, seen)), {"x_s": x, "t": t})
        return out + offset


def _config(**diffusion):
    cfg = config_lib.get_config()
    cfg.diffusion.objective = "flow"
    cfg.data.batch_size = BATCH
    for k, v in diffusion.items():
        cfg.diffusion[k] = v
    return cfg


def _train(cfg, *, offset=0.0, steps=1):
    data = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (BATCH, SIZE, SIZE, 1), minval=-1, maxval=1))
    record = []
    model = VelocityOracle(data=data, offset=offset, record=record.append)
    trainer = build.build_trainer(cfg, sharding.make_mesh(), model, None,  # flow reads no schedule
                                  build.build_optimizer(cfg), data.shape[1:])
    state = trainer.init()
    metrics = []
    for _ in range(steps):
        state, m = trainer.step(state, {"image": jnp.asarray(data)})
        metrics.append(jax.tree.map(float, m))
    assert len(record) == steps
    return metrics, record, data.astype(np.float64)


def _weight(name, sigma):
    return {"none": np.ones_like(sigma), "sigma_sqrt": np.maximum(sigma, flow.SIGMA_FLOOR) ** -2.0,
            "cosmap": 2.0 / (np.pi * (1.0 - 2.0 * sigma + 2.0 * sigma ** 2))}[name]


@pytest.mark.parametrize("density, weighting", [("logit_normal", "none"), ("uniform", "cosmap"),
                                                ("mode", "sigma_sqrt")])
def test_velocity_oracle_has_zero_loss_and_an_offset_costs_its_weighted_square(density, weighting):
    cfg = _config(flow_timesteps=density, flow_weighting=weighting, shift=2.0)
    (m,), (seen,), x0 = _train(cfg, offset=0.0)
    assert m["loss"] < 1e-8 and m["grad_norm"] < 1e-6, m
    # The network saw x_s = (1 - sigma) x0 + sigma eps with eps standard normal, at t = sigma T.
    sigma = seen["t"].astype(np.float64) / T                                     # [B]
    assert 0 < sigma.min() and sigma.max() <= 1 and len(np.unique(sigma)) == BATCH
    eps = (seen["x_s"] - (1 - sigma)[:, None, None, None] * x0) / sigma[:, None, None, None]
    assert abs(eps.mean()) < 4 / np.sqrt(eps.size) and abs(eps.var() - 1) < 4 * np.sqrt(2 / eps.size)
    assert abs(np.mean(eps * x0)) < 4 / np.sqrt(eps.size)
    c = 0.3
    (m,), (seen,), _ = _train(cfg, offset=c)
    w = _weight(weighting, seen["t"].astype(np.float64) / T)
    np.testing.assert_allclose(m["loss"], c ** 2 * w.mean(), rtol=1e-4)
    np.testing.assert_allclose(m["grad_norm"], 2 * c * w.mean(), rtol=1e-4)


def _draw(density, n=200_000, **kw):
    return np.asarray(jax.jit(lambda k: flow.flow_sigma_sampler(density, **kw)(k, n))(jax.random.key(1)), np.float64)


def _logit(s):
    return np.log(s) - np.log1p(-s)


def test_timestep_densities_match_their_closed_forms():
    n = 200_000
    for mean, std, shift in ((0.0, 1.0, 1.0), (0.5, 0.8, 1.0), (-0.3, 1.2, 3.0)):
        z = _logit(_draw("logit_normal", logit_mean=mean, logit_std=std, shift=shift))
        assert abs(z.mean() - (mean + np.log(shift))) < 5 * std / np.sqrt(n), (mean, shift, z.mean())
        assert abs(z.std() - std) < 0.01 * std
    quantiles = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    for shift in (1.0, 3.0):
        got = np.quantile(_draw("uniform", shift=shift), quantiles)
        np.testing.assert_allclose(got, shift * quantiles / (1 + (shift - 1) * quantiles), atol=0.01)
    for scale in (0.0, 1.29, -0.5):
        s = _draw("mode", mode_scale=scale)
        u0 = quantiles
        f = 1 - u0 - scale * (np.cos(np.pi * u0 / 2) ** 2 - 1 + u0)
        np.testing.assert_allclose([np.mean(s <= v) for v in f], 1 - u0, atol=0.006)
    # The mode density with scale 1.29 piles up in the middle (SD3 fig. 11) unlike uniform.
    assert np.mean(np.abs(_draw("mode", mode_scale=1.29) - 0.5) < 0.25) > 0.6


def test_weightings_are_sd3s():
    sigma = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(flow.flow_weight("cosmap")(sigma), 2 / (np.pi * (1 - 2 * sigma + 2 * sigma ** 2)),
                               rtol=1e-6)
    np.testing.assert_allclose(flow.flow_weight("sigma_sqrt")(sigma), [1e6, 100, 4, 1 / 0.81, 1], rtol=1e-5)
    assert float(flow.flow_weight("cosmap")(jnp.array(0.5))) == pytest.approx(4 / np.pi)
    np.testing.assert_array_equal(flow.flow_weight("none")(sigma), 1.0)


@pytest.mark.parametrize("key, value, message", [
    ("diffusion.objective", "rectified", "diffusion.objective must be one of ddpm, flow"),
    ("diffusion.flow_timesteps", "logitnormal", "set --config.diffusion.flow_timesteps=logit_normal"),
    ("diffusion.logit_std", 0.0, "diffusion.logit_std must be a finite number > 0"),
    ("diffusion.mode_scale", 3.0, "diffusion.mode_scale must be in [-1, 1.7519]"),
    ("diffusion.shift", -1.0, "diffusion.shift must be a finite number > 0"),
    ("diffusion.flow_weighting", "sigma", "diffusion.flow_weighting must be one of cosmap, none, sigma_sqrt"),
    ("sample.sampler", "ddim", "cannot sample a flow-matching run"),
    ("model.kind", "vit", "model.kind must be one of dit, unet"),
    ("model.name", "DiT_Q_2", "model.name must be one of"),
])
def test_config_errors_are_one_line(key, value, message):
    cfg = _config()
    cfg.model.kind = "dit"
    cfg.model.name = "tiny"
    cfg.sample.sampler = "flow_euler"
    section, leaf = key.split(".")
    cfg[section][leaf] = value
    with pytest.raises(ConfigError) as e:
        config_lib.validate(cfg)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def _dit_flow_config():
    cfg = config_lib.get_config()
    cfg.model.kind, cfg.model.name = "dit", "tiny"
    cfg.model.dit = ml_collections.ConfigDict({"hidden_size": 32, "depth": 2, "num_heads": 2})
    cfg.diffusion.objective = "flow"
    cfg.diffusion.shift = 2.0
    cfg.sample.sampler = "flow_euler"
    cfg.data.image_size, cfg.data.batch_size = 16, 16
    cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every = 6, 1, 3
    cfg.optim.warmup_steps = 2
    return cfg


def test_flow_dit_run_resumes_bit_exact_and_samples_with_a_flow_sampler(tmp_path):
    cfg = _dit_flow_config()
    assert_resumes_bit_exact(cfg, tmp_path / "full", tmp_path / "split")
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["model"]["kind"] == "dit" and saved["diffusion"]["objective"] == "flow"

    import jaxdiff
    from jaxdiff.models.dit import DiT

    model = jaxdiff.load(str(tmp_path / "full"))
    assert isinstance(model.module, DiT) and model.plan().__class__.__name__ == "Sampler"
    assert model.default_sampler == "flow_euler"
    images = model.sample(4, num_steps=3, labels=[0, 1, 2, 3], guidance_scale=2.0, output_type="latent")
    assert images.shape == (4, 16, 16, 1) and np.isfinite(images).all()
    again = model.sample(4, num_steps=3, labels=[0, 1, 2, 3], guidance_scale=2.0, output_type="latent")
    np.testing.assert_array_equal(images, again)
    with pytest.raises(ValueError, match="flow"):
        model.sample(2, sampler="ddim", num_steps=2)


@pytest.mark.slow
def test_a_flow_dit_trains_on_autoencoder_latents_and_writes_a_decoded_grid(tmp_path):
    """experiments/digits_text.py's latents (a 2-step autoencoder fit), conditioned on the digit
    labels instead of the captions: a LatentClassTask, sampled with flow Euler and decoded."""
    from PIL import Image

    from jaxdiff.pipelines import write_run_samples
    from jaxdiff.train import loop, task

    cfg = config_lib.load(str(Path(__file__).parents[1] / "experiments" / "digits_text.py"))
    cfg.vae.block_out_channels, cfg.vae.steps, cfg.vae.batch_size = (8, 16), 2, 8
    cfg.text.hidden_size, cfg.text.intermediate_size, cfg.text.num_layers, cfg.text.num_heads = 16, 32, 1, 2
    flow_cfg = _dit_flow_config()
    cfg.model, cfg.diffusion, cfg.optim = flow_cfg.model, flow_cfg.diffusion, flow_cfg.optim
    cfg.model.class_conditional = True
    cfg.sample.sampler, cfg.sample.num, cfg.sample.steps, cfg.eval.num = "flow_euler", 20, 2, 0
    cfg.data.batch_size, cfg.train.steps, cfg.train.checkpoint_every = 8, 3, 3
    seen = []

    def write(run, params, name, final=True):
        seen.append(run.task.kind)
        return write_run_samples(run, params, name, final)

    state = loop.train(cfg, str(tmp_path), progress=False, write_samples=write)
    assert int(state.step) == 3 and seen == [task.LATENT_CLASS]
    saved = json.loads((tmp_path / "config.json").read_text())["data_signature"]
    assert saved == {"image_shape": [8, 8, 4], "num_classes": 10}
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.ndim == 2 and grid.std() > 0               # decoded one-channel digits, not latents


def test_flow_mode_samplers_are_accepted_for_flow_runs_and_flow_only_ones_refused_elsewhere():
    from jaxdiff import samplers

    assert all(samplers.samples_flow(n) for n in ("flow_euler", "flow_heun", "dpmpp_2m", "unipc"))
    assert not any(samplers.samples_flow(n) for n in ("ddim", "euler", "pndm", "lcm"))
    c = config_lib.load(str(Path(__file__).parents[1] / "experiments" / "digits_dit.py"))
    c.sample.sampler = "unipc"
    config_lib.validate(c)                               # a flow mode: accepted
