"""The flow-matching objective (rectified flow: Liu et al. 2022; Lipman et al. 2023; the choices of
timestep density and loss weighting of Esser et al. 2024, "SD3", sec. 3.1 and 5.1).

With x0 the data, eps ~ N(0, I) and a noise level sigma in (0, 1]:

    x_s = (1 - sigma) x0 + sigma eps          `parameterization.flow_interpolate`
    v   = eps - x0                            `parameterization.flow_velocity` (the target)
    loss = mean_b [ w(sigma_b) * mean_pixels (net(x_s, sigma_b T) - v_b)^2 ]

The network sees t = sigma * T (T = num_train_timesteps), as flow samplers call it.

Timestep densities (how sigma is drawn; u ~ U(0, 1), n ~ N(0, 1)):

    "uniform"        sigma = u
    "logit_normal"   sigma = sigmoid(logit_mean + logit_std * n)      (SD3 eq. 19, "lognorm(m, s)")
    "mode"           sigma = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u)   (SD3 eq. 20; monotone for
                     mode_scale in [-1, 2 / (pi - 2)]; 0 is uniform)

followed by the resolution shift (SD3 eq. 23) sigma -> shift sigma / (1 + (shift - 1) sigma), which
adds log(shift) to logit(sigma) (shift > 1: noisier levels). Loss weights w(sigma):

    "none"         1
    "sigma_sqrt"   sigma^-2  (the eps-prediction loss written in velocity space; sigma is floored
                   at SIGMA_FLOOR inside the weight so that a draw near 0 cannot blow it up)
    "cosmap"       2 / (pi (1 - 2 sigma + 2 sigma^2))   (SD3 eq. 21)

The options are resolved when the loss is built (`flow_sigma_sampler`, `flow_weight`), so the
traced step has no flag branching. A learned-sigma network's extra output channels (the last
half) get no loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import config as config_lib
from jaxdiff import parameterization
from jaxdiff.train.step import label_condition

TIMESTEP_DENSITIES = config_lib.FLOW_TIMESTEP_DENSITIES
WEIGHTINGS = config_lib.FLOW_WEIGHTINGS
MODE_SCALE_RANGE = config_lib.FLOW_MODE_SCALE_RANGE
SIGMA_FLOOR = 1e-3


def shift_sigma(sigma, shift: float):
    """SD3's resolution shift: shift sigma / (1 + (shift - 1) sigma) (identity for shift 1)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_sigma_sampler(density: str, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                       mode_scale: float = 1.29, shift: float = 1.0) -> Callable:
    """`draw(key, n) -> sigma [n]` float32 in [0, 1] by the named density, then shifted (module
    docstring). Raises ValueError for an unknown density."""
    if density == "uniform":
        def raw(key, n):
            return jax.random.uniform(key, (n,), jnp.float32)
    elif density == "logit_normal":
        def raw(key, n):
            return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (n,), jnp.float32))
    elif density == "mode":
        def raw(key, n):
            u = jax.random.uniform(key, (n,), jnp.float32)
            return 1.0 - u - mode_scale * (jnp.square(jnp.cos(0.5 * jnp.pi * u)) - 1.0 + u)
    else:
        raise ValueError(f"unknown flow timestep density {density!r}; choose one of {', '.join(TIMESTEP_DENSITIES)}")
    return lambda key, n: jnp.clip(shift_sigma(raw(key, n), shift), 0.0, 1.0)


def flow_weight(weighting: str) -> Callable[[jax.Array], jax.Array]:
    """Per-example loss weight as a function of sigma [B] (module docstring)."""
    if weighting == "none":
        return jnp.ones_like
    if weighting == "sigma_sqrt":
        return lambda sigma: jnp.maximum(sigma, SIGMA_FLOOR) ** -2.0
    if weighting == "cosmap":
        return lambda sigma: 2.0 / (jnp.pi * (1.0 - 2.0 * sigma + 2.0 * jnp.square(sigma)))
    raise ValueError(f"unknown flow loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def make_flow_loss_fn(apply_fn: Callable, num_train_timesteps: int, *, draw_sigma: Callable,
                      weight_fn: Callable = jnp.ones_like, condition: Callable | None = None) -> Callable:
    """Build `loss_fn(params, batch, key) -> scalar loss` for flow matching.

    apply_fn: `apply_fn({"params": p}, x_s, t, train=True, rngs={"dropout": k}, **cond)` -> the
    velocity [B, H, W, C] (or [B, H, W, 2C] with learned sigma: the first C are read).
    draw_sigma: `flow_sigma_sampler(...)`; weight_fn: `flow_weight(...)`.
    batch: {"image": [B, H, W, C] in [-1, 1], ...} plus what `condition` reads (default: no labels).
    """
    if condition is None:
        condition = label_condition(0.0, None)

    def loss_fn(params, batch, key):
        x0 = batch["image"]                                            # [B, H, W, C]
        k_s, k_eps, k_lab, k_drop = jax.random.split(key, 4)
        sigma = draw_sigma(k_s, x0.shape[0])                           # [B]
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        x_s = parameterization.flow_interpolate(x0, eps, sigma)       # [B, H, W, C]
        cond = condition(batch, k_lab)
        pred = apply_fn({"params": params}, x_s, sigma * num_train_timesteps,
                        train=True, rngs={"dropout": k_drop}, **cond)
        pred = pred[..., :x0.shape[-1]].astype(jnp.float32)            # [B, H, W, C]
        target = parameterization.flow_velocity(x0, eps)
        per_example = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x0.ndim)))  # [B]
        return jnp.mean(weight_fn(sigma) * per_example)

    return loss_fn


def loss_from_config(cfg, apply_fn: Callable, condition: Callable | None = None) -> Callable:
    """`make_flow_loss_fn` with the density, shift and weighting of `cfg.diffusion`."""
    d = cfg.diffusion
    draw = flow_sigma_sampler(d.flow_timesteps, logit_mean=d.logit_mean, logit_std=d.logit_std,
                              mode_scale=d.mode_scale, shift=d.shift)
    return make_flow_loss_fn(apply_fn, d.num_train_timesteps, draw_sigma=draw,
                             weight_fn=flow_weight(d.flow_weighting), condition=condition)
