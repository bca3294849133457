"""Likelihood bounds of pixel diffusion models, in bits per dimension.

A diffusion model is a latent-variable model, so its negative log-likelihood has a variational
upper bound (the negative ELBO). Two forms are here, both evaluated for a `model_fn(x_t, t)` on
the house model-call convention (t a training timestep of a `DiscreteSchedule`, the output the
network's native prediction, converted by `parameterization`):

    b = ddpm_bound(model_fn, schedule, x0, key, num_steps=1000, variance="small", decoder="discretized")
    b = vdm_bound(model_fn, schedule, x0, key, num_steps=None, decoder="discretized")
    b.total                      # [B] bits/dim upper bounds on -log2 p(x0) / D
    b.prior, b.diffusion, b.decoder                       # the three terms, [B] bits/dim each

`x0`: [B, ...] data in model space; for pixel data the 256 levels of 8-bit images mapped onto
[-1, 1] (`decoder="discretized"`, the usual bits/dim of image models). With
`decoder="gaussian"` the data are continuous and the bound is on the density (bits/dim of the
data at model-space scale; add log2(127.5) per dimension to compare with 8-bit figures under
uniform dequantization).

DDPM bound (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 2 and their `calc_bpd_loop`), on
K timesteps t_0 = 0 < t_1 < ... < t_{K-1} = T-1 evenly spread over the T training steps (K = T
is the full chain; fewer is the respaced model of N&D sec. 4, betas recomputed from abar):

    L = KL(q(x_{K-1} | x0) || N(0, I))                                  prior     (L_T)
      + sum_{k=1}^{K-1} KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k))     diffusion (L_{t-1})
      - log p(x0 | x_{t_0})                                              decoder   (L_0)

    q(x_{k-1} | x_k, x0) = N(mu~_k, beta~_k): mu~_k = sqrt(abar_{k-1}) beta_k / (1 - abar_k) x0
        + sqrt(alpha_k) (1 - abar_{k-1}) / (1 - abar_k) x_k,   beta~_k = (1 - abar_{k-1}) / (1 - abar_k) beta_k
    p(x_{k-1} | x_k) = N(mu~_k(x_k, x0_hat), sigma_k^2),  sigma_k^2 = beta~_k ("small") or beta_k ("large")
    (Ho et al. eqs. 6-7, 11; x0_hat is the network's clean-image estimate at (x_k, t_k)).

Each KL term is taken at one draw x_k ~ q(x_k | x0), every k summed (no sampling of k). The
decoder is Ho et al.'s eq. 13 discretised Gaussian N(x0_hat(x_{t_0}), sigma_0^2) integrated over
each 8-bit bin (the edge bins extended to -inf / +inf), or a Gaussian density, with
sigma_0^2 = beta_{t_0} = 1 - abar_{t_0} in both variance modes (Ho et al.'s sigma_1^2 = beta_1;
Nichol & Dhariwal's beta~ of the next step is about half the true spread of x0 around x_{t_0}
on the full chain and costs ~0.2 bits/dim there).

The two fixed variances differ in how fast the bound tightens with K. With the exact denoiser
the true reverse kernel's variance is close to beta_k at every noise level, so "large" is
within ~0.1 bits/dim of the NLL already at K = 10; "small" (beta~_k, which VDM's discrete bound
also uses) is half the true variance on the first steps above t = 0 and converges as 1/K from
far above (hundreds of bits/dim at K = 10).

VDM bound (Kingma et al. 2021, eqs. 11-17), with gamma(u) = -log-SNR over u in [0, 1]: the
schedule's log-SNR interpolated linearly in t, t = u (T - 1) (so u = 0 is t = 0, u = 1 is
t = T - 1, and fractional timesteps are handed to the network), z_u = alpha_u x0 + sigma_u eps,
alpha_u^2 = sigmoid(-gamma(u)), sigma_u^2 = sigmoid(gamma(u)):

    prior      KL(q(z_1 | x0) || N(0, I))
    decoder    -log p(x0 | z_0), p(x0 | z_0) = N(z_0 / alpha_0, sigma_0^2 / alpha_0^2) (discretised or not)
    diffusion  continuous time (num_steps=None):  1/2 E_{u ~ U(0, 1)} [gamma'(u) |eps - eps_hat(z_u; u)|^2]  (eq. 17)
               T' steps:  1/2 sum_{i=1}^{T'} (exp(gamma(t_i) - gamma(s_i)) - 1) |eps - eps_hat(z_{t_i}; t_i)|^2
               with s_i = (i - 1) / T', t_i = i / T'                                                   (eq. 13)

The continuous-time expectation over u is estimated on `num_samples` stratified points (for each
example its own u in every stratum [j, j + 1) / num_samples, one eps per point). Every estimate is unbiased for its
bound; the noise shrinks as 1/sqrt(B) over a batch.

With the exact denoiser of Gaussian data (`jaxdiff.analytic`) the DDPM and discrete VDM bounds
fall toward the data's true negative log-likelihood as the number of steps grows, and the
continuous VDM bound sits on it (`tests/test_likelihood.py`,
`experiments/plot_bpd_convergence.py`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compiler, parameterization, schedules

Array = jax.Array
DECODERS = ("discretized", "gaussian")
VARIANCES = ("small", "large")
LEVELS = 256                 # 8-bit data on [-1, 1]: bin half-width 1 / (LEVELS - 1)


class Bound(NamedTuple):
    """A variational bound per example, in bits/dim: total = prior + diffusion + decoder. [B] each."""

    total: Array
    prior: Array
    diffusion: Array
    decoder: Array


# ------------------------------------------------------------------------------------------
# Gaussians


def _sum(x: Array) -> Array:
    """[B, ...] -> [B], summed over every non-batch axis."""
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def normal_kl(mean1, var1, mean2, var2) -> Array:
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, nats."""
    return 0.5 * (jnp.log(var2) - jnp.log(var1) + (var1 + jnp.square(mean1 - mean2)) / var2 - 1.0)


def gaussian_nll(x, mean, std) -> Array:
    """-log N(x; mean, std^2) elementwise, nats."""
    return 0.5 * jnp.log(2 * math.pi) + jnp.log(std) + 0.5 * jnp.square((x - mean) / std)


def discretized_gaussian_nll(x, mean, std, levels: int = LEVELS) -> Array:
    """-log P(bin of x) elementwise, nats, for x on the `levels`-level grid of [-1, 1] under
    N(mean, std^2), the first and last bins extended to -inf and +inf (Ho et al. eq. 13)."""
    half = 1.0 / (levels - 1)
    upper = (x + half - mean) / std
    lower = (x - half - mean) / std
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)                 # log P(X < x + h)
    log_sf_lower = jax.scipy.special.log_ndtr(-lower)                 # log P(X > x - h)
    mid = jnp.log(jnp.maximum(jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower), 1e-12))
    logp = jnp.where(x < -1 + half, log_cdf_upper, jnp.where(x > 1 - half, log_sf_lower, mid))
    return -logp


def _decoder_nll(decoder: str, x0, mean, std) -> Array:
    if decoder == "discretized":
        return discretized_gaussian_nll(x0, mean, std)
    return gaussian_nll(x0, mean, std)


def _check(decoder: str, x0) -> int:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if jnp.ndim(x0) < 2:
        raise ValueError(f"x0 must be a batch [B, ...], got shape {tuple(jnp.shape(x0))}")
    return int(np.prod(jnp.shape(x0)[1:]))


def _bits(nats: Array, dims: int) -> Array:
    return nats / (dims * math.log(2.0))


# ------------------------------------------------------------------------------------------
# DDPM


def ddpm_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """K = num_steps training timesteps evenly over [0, T - 1], both ends included, rounded
    (Nichol & Dhariwal's `space_timesteps` for one section)."""
    if not 2 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [2, {num_train_timesteps}], got {num_steps}")
    stride = (num_train_timesteps - 1) / (num_steps - 1)
    return np.array(sorted({round(i * stride) for i in range(num_steps)}), np.int64)


def ddpm_bound(model_fn: Callable, schedule: schedules.DiscreteSchedule, x0, key, *, num_steps: int | None = None,
               variance: str = "small", decoder: str = "discretized", prediction_type: str = "epsilon",
               clip_x0: bool = False) -> Bound:
    """The DDPM variational bound of x0 [B, ...] in bits/dim (see the module docstring).

    num_steps: K timesteps evenly over the schedule (None: all T). variance: the reverse
      process's fixed variance, "small" (beta~, the posterior's) or "large" (beta).
    clip_x0: clip the network's x0 estimate to [-1, 1] (as sampling often does; still a bound).
    One network call per timestep on the whole batch, in one `lax.scan`.
    """
    dims = _check(decoder, x0)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    parameterization.check_prediction_type(prediction_type)
    ac = schedules.alphas_cumprod_float64(schedule)
    ts = ddpm_timesteps(len(ac), num_steps or len(ac))
    ab = ac[ts]                                                                      # [K]
    ab_prev = np.append(1.0, ab[:-1])                                                # [K]
    beta = 1.0 - ab / ab_prev
    true_var = (1.0 - ab_prev) / (1.0 - ab) * beta                                   # beta~_k (0 at k = 0)
    var = true_var if variance == "small" else beta.copy()
    var[0] = beta[0]                                    # the decoder's: beta_{t_0} (Ho et al.'s sigma_1^2)
    coef_x0 = np.sqrt(ab_prev) * beta / (1.0 - ab)
    coef_xt = np.sqrt(ab / ab_prev) * (1.0 - ab_prev) / (1.0 - ab)
    table = jnp.asarray(np.stack([ts, ab, var, coef_x0, coef_xt, true_var], axis=1), jnp.float32)  # [K, 6]
    return _ddpm(model_fn, table, jnp.asarray(x0, jnp.float32), key, decoder, prediction_type, clip_x0, dims)


@functools.partial(compiler.jit, static_argnums=(0, 4, 5, 6, 7))
def _ddpm(model_fn, table, x0, key, decoder, prediction_type, clip_x0, dims) -> Bound:
    """table: [K, 6] rows (t_k, abar_k, sigma_k^2, mu~ coefficient of x0, of x_k, beta~_k)."""
    B = x0.shape[0]

    def x0_hat(row, k):
        """(x_k ~ q(x_k | x0), the network's x0 estimate there), [B, ...] each."""
        t, ab = row[0], row[1]
        eps = jax.random.normal(jax.random.fold_in(key, k), x0.shape, jnp.float32)
        x_t = parameterization.diffuse(x0, eps, ab)                                  # [B, ...]
        pred = model_fn(x_t, jnp.full((B,), t, jnp.float32))
        est = parameterization.to_x0(pred.astype(jnp.float32), x_t, ab, prediction_type)
        return x_t, jnp.clip(est, -1.0, 1.0) if clip_x0 else est

    def step(total, inputs):
        row, k = inputs
        _, _, var, c0, ct, true_var = row
        x_t, est = x0_hat(row, k)
        # Ho et al. eq. 7 (the true posterior) against eq. 11's model mean: the same coefficients
        # on the true x0 and on the estimate.
        kl = normal_kl(c0 * x0 + ct * x_t, true_var, c0 * est + ct * x_t, var)
        return total + _sum(kl), None

    k_idx = jnp.arange(table.shape[0])
    diffusion, _ = jax.lax.scan(step, jnp.zeros((B,), jnp.float32), (table[1:], k_idx[1:]))
    _, est0 = x0_hat(table[0], 0)
    dec = _sum(_decoder_nll(decoder, x0, est0, jnp.sqrt(table[0, 2])))
    ab_last = table[-1, 1]
    prior = _sum(normal_kl(jnp.sqrt(ab_last) * x0, 1.0 - ab_last, 0.0, 1.0))
    parts = [_bits(v, dims) for v in (prior, diffusion, dec)]
    return Bound(parts[0] + parts[1] + parts[2], *parts)


# ------------------------------------------------------------------------------------------
# VDM


def log_snr_at(schedule: schedules.DiscreteSchedule, t) -> Array:
    """The schedule's log-SNR at fractional training timesteps t (linear between integers)."""
    table = jnp.asarray(np.log(schedules.alphas_cumprod_float64(schedule))
                        - np.log1p(-schedules.alphas_cumprod_float64(schedule)), jnp.float32)
    return jnp.interp(jnp.asarray(t, jnp.float32), jnp.arange(table.shape[0], dtype=jnp.float32), table)


def alpha_bar_at(schedule: schedules.DiscreteSchedule, t) -> Array:
    """abar = sigmoid(log-SNR) at fractional training timesteps t (the VDM bound's noise levels)."""
    return jax.nn.sigmoid(log_snr_at(schedule, t))


def vdm_bound(model_fn: Callable, schedule: schedules.DiscreteSchedule, x0, key, *, num_steps: int | None = None,
              num_samples: int = 256, decoder: str = "discretized", prediction_type: str = "epsilon") -> Bound:
    """The VDM variational bound of x0 [B, ...] in bits/dim (see the module docstring).

    num_steps: None for the continuous-time bound (estimated on `num_samples` stratified u), or
      T' for the discrete-time bound on T' equal steps of u (every step summed).
    The network is called at fractional training timesteps t = u (T - 1), one call per point.
    """
    dims = _check(decoder, x0)
    parameterization.check_prediction_type(prediction_type)
    if num_steps is not None and num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (or None for continuous time), got {num_steps}")
    if num_steps is None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    T = schedule.num_train_timesteps
    gamma = -np.asarray(log_snr_at(schedule, np.arange(T)), np.float64)             # [T] at integer t
    n = num_steps or num_samples
    return _vdm(model_fn, jnp.asarray(gamma, jnp.float32), jnp.asarray(x0, jnp.float32), key, decoder,
                prediction_type, dims, n, num_steps is None)


@functools.partial(compiler.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _vdm(model_fn, gamma_table, x0, key, decoder, prediction_type, dims, n, continuous) -> Bound:
    B = x0.shape[0]
    T = gamma_table.shape[0]
    grid = jnp.arange(T, dtype=jnp.float32)

    def gamma(u):                                                    # u in [0, 1] -> -log-SNR
        return jnp.interp(u * (T - 1), grid, gamma_table)

    def gamma_prime(u):                                              # piecewise constant slope
        i = jnp.clip(jnp.floor(u * (T - 1)).astype(jnp.int32), 0, T - 2)
        return (T - 1) * (gamma_table[i + 1] - gamma_table[i])

    def eps_error(u, k):
        """|eps - eps_hat(z_u; u)|^2 summed over dims, [B], for u [B]."""
        eps = jax.random.normal(jax.random.fold_in(key, k), x0.shape, jnp.float32)
        ab = jax.nn.sigmoid(-gamma(u))                                                # [B]
        z = parameterization.diffuse(x0, eps, ab)
        pred = model_fn(z, u * (T - 1))
        return _sum(jnp.square(eps - parameterization.to_eps(pred.astype(jnp.float32), z, ab, prediction_type)))

    def step(total, k):
        if continuous:     # stratified: one u per example in [k, k + 1) / n
            u = (k + jax.random.uniform(jax.random.fold_in(key, n + k), (B,))) / n    # [B]
            w = 0.5 * gamma_prime(u) / n
        else:
            u = jnp.full((B,), (k + 1.0) / n)                                         # [B]
            w = 0.5 * jnp.expm1(gamma(u) - gamma(k / n))                              # SNR(s)/SNR(t) - 1
        return total + w * eps_error(u, k), None

    diffusion, _ = jax.lax.scan(step, jnp.zeros((B,), jnp.float32), jnp.arange(n))

    ab0, ab1 = jax.nn.sigmoid(-gamma(0.0)), jax.nn.sigmoid(-gamma(1.0))
    eps0 = jax.random.normal(jax.random.fold_in(key, 2 * n + 1), x0.shape, jnp.float32)
    z0 = parameterization.diffuse(x0, eps0, ab0)
    dec = _sum(_decoder_nll(decoder, x0, z0 / jnp.sqrt(ab0), jnp.sqrt((1.0 - ab0) / ab0)))
    prior = _sum(normal_kl(jnp.sqrt(ab1) * x0, 1.0 - ab1, 0.0, 1.0))
    parts = [_bits(v, dims) for v in (prior, diffusion, dec)]
    return Bound(parts[0] + parts[1] + parts[2], *parts)
