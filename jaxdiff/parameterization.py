"""What the network predicts, and the conversions between its possible targets.

With x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (eps ~ N(0, I)), a network may predict

    "epsilon"       eps                                       (Ho et al. 2020)
    "sample"        x0
    "v_prediction"  v = sqrt(abar) eps - sqrt(1 - abar) x0    (Salimans & Ho 2022, sec. 4)

and any one of them, together with x_t, determines the others. This module is the one place that
does these conversions: samplers use it to read a prediction, the training loss to build its
target. Names follow diffusers' `prediction_type`.

Flow matching (rectified flow: Liu et al. 2022; Esser et al. 2024, "SD3") uses a different path
between data and noise, a straight line with the noise level sigma in [0, 1]:

    x_s = (1 - sigma) x0 + sigma eps                          (`flow_interpolate`)
    "flow_prediction"  v = dx_s / dsigma = eps - x0           (`flow_velocity`)

so x0 = x_s - sigma v and eps = x_s + (1 - sigma) v (`flow_x0_eps`). The flow path is the VP path
rescaled: x_s = (1 - sigma) x_t / sqrt(abar) with sigma_vp = sigma / (1 - sigma), which is how
`flow_to_alpha_bar` relates a flow level to a VP one.

Shapes: `x_t`, `pred`, `x0`, `eps` are `[B, ...]` (any trailing dims). `alpha_bar` may be a
scalar, `[B]` (one level per example, broadcast over the trailing dims) or already broadcastable
to `x_t` (e.g. `[B, 1, 1, 1]`). The `*_coefs` variants take sqrt(abar) and sqrt(1 - abar)
directly, for callers that precomputed them in higher precision (the samplers' plans).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
FLOW_PREDICTION = "flow_prediction"


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def expand_to(a, x):
    """Broadcast a per-example quantity `a` (scalar, `[B]` or `[B, 1, ...]`) against `x` `[B, ...]`
    by appending trailing singleton axes."""
    a = jnp.asarray(a)
    x_ndim = jnp.ndim(x)
    if 0 < a.ndim < x_ndim:
        a = a.reshape(a.shape + (1,) * (x_ndim - a.ndim))
    return a


def coefs(alpha_bar, x=None):
    """(sqrt(abar), sqrt(1 - abar)) in float32, expanded against `x` if given."""
    alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    if x is not None:
        alpha_bar = expand_to(alpha_bar, x)
    return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


# --------------------------------------------------------------------------------------------
# Core conversions on (sqrt(abar), sqrt(1 - abar)) = (a, s); a^2 + s^2 = 1.
# --------------------------------------------------------------------------------------------

def x0_eps_coefs(pred, x_t, a, s, prediction_type: str):
    """(x0_hat, eps_hat) from a network prediction at x_t, with a = sqrt(abar), s = sqrt(1 - abar).

    epsilon:       x0 = (x_t - s eps) / a
    sample:        eps = (x_t - a x0) / s
    v_prediction:  x0 = a x_t - s v,  eps = a v + s x_t
    """
    if prediction_type == "epsilon":
        return (x_t - s * pred) / a, pred
    if prediction_type == "sample":
        return pred, (x_t - a * pred) / s
    if prediction_type == "v_prediction":
        return a * x_t - s * pred, a * pred + s * x_t
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


def eps_from_x0_coefs(x_t, x0, a, s):
    """eps = (x_t - a x0) / s: the noise consistent with x_t and an (e.g. clipped) x0."""
    return (x_t - a * x0) / s


def target_coefs(prediction_type: str, x0, eps, a, s):
    """The quantity a `prediction_type` network should output for (x0, eps)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")


# --------------------------------------------------------------------------------------------
# Public conversions on alpha_bar.
# --------------------------------------------------------------------------------------------

def diffuse(x0, eps, alpha_bar):
    """The forward process: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps. `[B, ...]`."""
    a, s = coefs(alpha_bar, x0)
    return a * x0 + s * eps


def to_x0(pred, x_t, alpha_bar, prediction_type: str):
    """x0_hat `[B, ...]` from a `prediction_type` prediction at x_t."""
    a, s = coefs(alpha_bar, x_t)
    return x0_eps_coefs(pred, x_t, a, s, prediction_type)[0]


def to_eps(pred, x_t, alpha_bar, prediction_type: str):
    """eps_hat `[B, ...]` from a `prediction_type` prediction at x_t."""
    a, s = coefs(alpha_bar, x_t)
    return x0_eps_coefs(pred, x_t, a, s, prediction_type)[1]


def to_v(pred, x_t, alpha_bar, prediction_type: str):
    """v_hat = sqrt(abar) eps_hat - sqrt(1 - abar) x0_hat `[B, ...]`."""
    a, s = coefs(alpha_bar, x_t)
    x0, eps = x0_eps_coefs(pred, x_t, a, s, prediction_type)
    return a * eps - s * x0


def to_score(pred, x_t, alpha_bar, prediction_type: str):
    """Score of the noisy marginal, grad log p_t(x_t) = -eps_hat / sqrt(1 - abar) `[B, ...]`."""
    a, s = coefs(alpha_bar, x_t)
    return -x0_eps_coefs(pred, x_t, a, s, prediction_type)[1] / s


def convert(pred, x_t, alpha_bar, from_type: str, to_type: str):
    """Re-express a `from_type` prediction at x_t as a `to_type` prediction."""
    a, s = coefs(alpha_bar, x_t)
    x0, eps = x0_eps_coefs(pred, x_t, a, s, from_type)
    return target_coefs(to_type, x0, eps, a, s)


def v_target(x0, eps, alpha_bar):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022) `[B, ...]`."""
    a, s = coefs(alpha_bar, x0)
    return a * eps - s * x0


def target(prediction_type: str, x0, eps, alpha_bar) -> jax.Array:
    """What a `prediction_type` network should predict for x_t = diffuse(x0, eps, abar): the
    regression target of the denoising loss. `[B, ...]`."""
    a, s = coefs(alpha_bar, x0)
    return target_coefs(prediction_type, x0, eps, a, s)


# --------------------------------------------------------------------------------------------
# Flow matching (rectified flow) on the straight path x_s = (1 - sigma) x0 + sigma eps.
# --------------------------------------------------------------------------------------------

def flow_interpolate(x0, eps, sigma):
    """x_s = (1 - sigma) x0 + sigma eps `[B, ...]`; sigma scalar, `[B]` or broadcastable, in [0, 1]."""
    sigma = expand_to(jnp.asarray(sigma, jnp.float32), x0)
    return (1.0 - sigma) * x0 + sigma * eps


def flow_velocity(x0, eps):
    """The flow-matching target v = eps - x0 `[B, ...]` (the velocity dx_s / dsigma)."""
    return eps - x0


def flow_x0_eps(v, x_s, sigma):
    """(x0_hat, eps_hat) from a velocity prediction v at x_s: x0 = x_s - sigma v,
    eps = x_s + (1 - sigma) v."""
    sigma = expand_to(jnp.asarray(sigma, jnp.float32), x_s)
    return x_s - sigma * v, x_s + (1.0 - sigma) * v


def flow_to_alpha_bar(sigma):
    """The VP level of the flow level sigma: x_s / (1 - sigma) = x_t / sqrt(abar) at
    abar = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return jnp.square(1.0 - sigma) / (jnp.square(1.0 - sigma) + jnp.square(sigma))
