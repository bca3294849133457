"""Noise schedules of variance-preserving diffusion, and conversions between their coordinates.

The forward process is x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with eps ~ N(0, I). A schedule
says how the signal level abar_t ("alpha bar", `alphas_cumprod`) falls as t goes from clean to noise.
Equivalent coordinates of one noise level, all used by some sampler:

    abar in (0, 1]                       signal fraction of the variance
    sigma = sqrt((1 - abar) / abar)      noise std of x / sqrt(abar) (the "variance exploding" view)
    log-SNR = log(abar / (1 - abar)) = -2 log sigma

Two kinds of schedule live here, both frozen pytrees of float32 arrays:

* `DiscreteSchedule`: T training timesteps t = 0..T-1 with `betas` [T] and `alphas_cumprod` [T]
  (Ho et al. 2020), built by `discrete(name, ...)` with the same definitions as the reference
  (diffusers) schedulers, so Stable-Diffusion-style checkpoints see the noise levels they were
  trained on.
* `CosineSchedule`: the continuous cosine schedule of Nichol & Dhariwal (2021), abar(t) for
  t in [0, 1].

Schedules are built on the host in float64 and stored as float32. Sampler plans that need
differences of nearby noise levels (1 - abar_t / abar_s for neighbouring t, s) recompute them in
float64 from the stored betas with `alphas_cumprod_float64`, which reproduces the stored float32
`alphas_cumprod` exactly after rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DISCRETE_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# --------------------------------------------------------------------------------------------
# Coordinate conversions (elementwise, any shape; float32 unless x64 is enabled).
# --------------------------------------------------------------------------------------------

def alpha_bar_to_sigma(alpha_bar):
    """sigma = sqrt((1 - abar) / abar). abar = 0 gives inf."""
    alpha_bar = jnp.asarray(alpha_bar, jnp.result_type(float))
    return jnp.sqrt((1.0 - alpha_bar) / alpha_bar)


def sigma_to_alpha_bar(sigma):
    """abar = 1 / (1 + sigma^2)."""
    sigma = jnp.asarray(sigma, jnp.result_type(float))
    return 1.0 / (1.0 + jnp.square(sigma))


def alpha_bar_to_log_snr(alpha_bar):
    """log-SNR = log(abar) - log(1 - abar); -inf at abar = 0, +inf at abar = 1."""
    alpha_bar = jnp.asarray(alpha_bar, jnp.result_type(float))
    return jnp.log(alpha_bar) - jnp.log1p(-alpha_bar)


def log_snr_to_alpha_bar(log_snr):
    """abar = sigmoid(log-SNR)."""
    return jax.nn.sigmoid(jnp.asarray(log_snr, jnp.result_type(float)))


def sigma_to_log_snr(sigma):
    """log-SNR = -2 log sigma."""
    return -2.0 * jnp.log(jnp.asarray(sigma, jnp.result_type(float)))


def log_snr_to_sigma(log_snr):
    """sigma = exp(-log-SNR / 2)."""
    return jnp.exp(-0.5 * jnp.asarray(log_snr, jnp.result_type(float)))


# --------------------------------------------------------------------------------------------
# Discrete schedules.
# --------------------------------------------------------------------------------------------

@struct.dataclass
class DiscreteSchedule:
    """A schedule over T training timesteps t = 0..T-1 (t = 0 is the least noisy).

    betas: [T] float32, beta_t = 1 - abar_t / abar_{t-1}.
    alphas_cumprod: [T] float32, abar_t = prod_{s <= t} (1 - beta_s).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def sigmas(self) -> jax.Array:
        """[T] sigma_t = sqrt((1 - abar_t) / abar_t), increasing with t."""
        return alpha_bar_to_sigma(self.alphas_cumprod)

    @property
    def log_snr(self) -> jax.Array:
        """[T] log-SNR of each training timestep, decreasing with t."""
        return alpha_bar_to_log_snr(self.alphas_cumprod)


def from_betas(betas) -> DiscreteSchedule:
    """A `DiscreteSchedule` from explicit betas `[T]` (host values, not traced).

    The betas are rounded to float32 first and abar is their float64 cumulative product rounded
    to float32, so `alphas_cumprod_float64` can recompute abar exactly from the stored betas.
    """
    betas32 = np.asarray(betas, dtype=np.float32)
    if betas32.ndim != 1 or betas32.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas32.shape}")
    if np.any(betas32 <= 0) or np.any(betas32 > 1):
        raise ValueError("betas must lie in (0, 1]")
    alphas_cumprod = np.cumprod(1.0 - betas32.astype(np.float64))
    return DiscreteSchedule(betas=jnp.asarray(betas32), alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def alphas_cumprod_float64(schedule: DiscreteSchedule) -> np.ndarray:
    """[T] float64 abar recomputed on the host from the schedule's (float32) betas.

    For plans that take differences of nearby noise levels: 1 - abar_t / abar_{t-1} from float32
    abar loses ~4 significant digits when beta_t ~ 1e-4, from these it loses none.
    """
    return np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))


def discrete(name: str, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
             beta_end: float = 0.02, rescale_betas_zero_snr: bool = False) -> DiscreteSchedule:
    """The discrete schedule `name` over `num_train_timesteps` steps.

    linear:            beta_t linear from beta_start to beta_end (Ho et al. 2020).
    scaled_linear:     sqrt(beta_t) linear from sqrt(beta_start) to sqrt(beta_end) (Stable Diffusion).
    squaredcos_cap_v2: abar follows the cosine schedule (Nichol & Dhariwal 2021, eq. 17), each
                       beta capped at 0.999; beta_start / beta_end are ignored.
    rescale_betas_zero_snr: shift and scale sqrt(abar) so the last step is pure noise
                       (Lin et al. 2023, Algorithm 1), see `rescale_zero_terminal_snr`.
    """
    if name not in DISCRETE_SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(DISCRETE_SCHEDULES)}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps,
                            dtype=np.float64) ** 2
    else:
        betas = betas_for_alpha_bar(lambda t: _cosine_f(t, 0.008, np), num_train_timesteps, max_beta=0.999)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return from_betas(betas)


def betas_for_alpha_bar(alpha_bar_fn: Callable, num_train_timesteps: int,
                        max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous abar(t), t in [0, 1], into T betas (float64, on the host).

    beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta), so the discrete abar_i equals
    abar((i + 1) / T) / abar(0) wherever the cap is not hit.
    """
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    f = np.asarray(alpha_bar_fn(t), dtype=np.float64)                    # [T + 1]
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def rescale_zero_terminal_snr(betas):
    """Rescale betas `[T]` so that abar_{T-1} = 0 (Lin et al. 2023, Algorithm 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged;
    betas are then read back from the new abar. Works on numpy arrays (in their precision, the
    host path used by `discrete`) and on jax arrays (traceable).
    """
    xp = jnp if isinstance(betas, jax.Array) else np
    betas = xp.asarray(betas)
    sqrt_ab = xp.sqrt(xp.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab ** 2
    alphas = xp.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


# --------------------------------------------------------------------------------------------
# Continuous schedules.
# --------------------------------------------------------------------------------------------

def _cosine_f(t, s, xp):
    """Nichol & Dhariwal's f(t) = cos(((t + s) / (1 + s)) * pi / 2)^2 (un-normalised)."""
    return xp.cos((t + s) / (1.0 + s) * (math.pi / 2)) ** 2


def cosine_alpha_bar(t, s: float = 0.008):
    """abar(t) = f(t) / f(0) of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), t in [0, 1].

    abar(0) = 1 and abar(1) = 0 (log-SNR -inf). Any shape; float32.
    """
    t = jnp.asarray(t, jnp.result_type(float))
    return _cosine_f(t, s, jnp) / _cosine_f(0.0, s, jnp)


@struct.dataclass
class CosineSchedule:
    """The continuous cosine schedule: abar(t) for t in [0, 1] (0 clean, 1 pure noise).

    s: [] float32, the small offset that keeps beta finite near t = 0 (0.008 in the paper).
    """

    s: jax.Array

    def alpha_bar(self, t):
        """abar(t), same shape as t."""
        t = jnp.asarray(t, jnp.result_type(float))
        return _cosine_f(t, self.s, jnp) / _cosine_f(0.0, self.s, jnp)

    def sigma(self, t):
        return alpha_bar_to_sigma(self.alpha_bar(t))

    def log_snr(self, t):
        return alpha_bar_to_log_snr(self.alpha_bar(t))


def cosine(s: float = 0.008) -> CosineSchedule:
    """The continuous cosine schedule of Nichol & Dhariwal (2021)."""
    return CosineSchedule(s=jnp.asarray(s, jnp.float32))


def timestep_from_sigma(schedule: DiscreteSchedule, sigma):
    """The (fractional) training timestep whose sigma is `sigma`, by linear interpolation of
    log-sigma between neighbouring timesteps (what sigma-space samplers hand the network).

    sigma: any shape. Returns float32 of the same shape, clipped to [0, T - 1].
    """
    log_sigmas = jnp.log(schedule.sigmas)                                  # [T], increasing
    log_sigma = jnp.log(jnp.asarray(sigma, jnp.float32))
    num = log_sigmas.shape[0]
    hi = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma, side="left"), 1, num - 1)
    lo = hi - 1
    w = (log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
    w = jnp.clip(w, 0.0, 1.0)
    return (lo + w).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Flow matching (rectified flow).
# --------------------------------------------------------------------------------------------
#
# The flow path is x_s = (1 - sigma) x0 + sigma eps with sigma in [0, 1] (parameterization.py).
# Training levels are sigma_i = (i + 1) / T, i = 0..T-1, bent towards noise by a shift
# (Esser et al. 2024, "SD3", eq. 23): sigma -> shift sigma / (1 + (shift - 1) sigma); with dynamic
# shifting the bend depends on the image size through mu, sigma -> e^mu / (e^mu + (1 / sigma - 1)),
# which is the same map with shift = e^mu. The network is called at t = sigma * T.

TIME_SHIFT_TYPES = ("exponential", "linear")


@struct.dataclass
class FlowSchedule:
    """The training levels of a flow-matching model (t = 0 is the least noisy, as `DiscreteSchedule`).

    sigmas: [T] float32, sigma_t = shift((t + 1) / T) (unshifted when `use_dynamic_shifting`, whose
        shift is chosen per image size at sampling time); the network sees t = sigma * T.
    shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len,
        time_shift_type: static; names and meanings as diffusers' `FlowMatchEulerDiscreteScheduler`
        (base/max shift and the sequence lengths only serve `flow_mu`, which pipelines call).
    """

    sigmas: jax.Array
    shift: float = struct.field(pytree_node=False, default=1.0)
    use_dynamic_shifting: bool = struct.field(pytree_node=False, default=False)
    base_shift: float = struct.field(pytree_node=False, default=0.5)
    max_shift: float = struct.field(pytree_node=False, default=1.15)
    base_image_seq_len: int = struct.field(pytree_node=False, default=256)
    max_image_seq_len: int = struct.field(pytree_node=False, default=4096)
    time_shift_type: str = struct.field(pytree_node=False, default="exponential")

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def timesteps(self) -> jax.Array:
        """[T] the training-scale timesteps sigma_t * T the network is called with."""
        return self.sigmas * self.num_train_timesteps

    @property
    def alphas_cumprod(self) -> jax.Array:
        """[T] the VP level of each flow level (`parameterization.flow_to_alpha_bar`): same log-SNR."""
        s = self.sigmas
        return jnp.square(1.0 - s) / (jnp.square(1.0 - s) + jnp.square(s))


def shift_sigmas(sigmas, shift: float):
    """shift sigma / (1 + (shift - 1) sigma) (SD3 eq. 23); shift 1 is the identity. Host float64 in,
    float64 out (any array; numpy)."""
    sigmas = np.asarray(sigmas, np.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def time_shift(sigmas, mu: float, time_shift_type: str = "exponential"):
    """Resolution-dependent shift: e^mu / (e^mu + (1 / sigma - 1)) ("exponential", = `shift_sigmas`
    with shift e^mu) or mu / (mu + (1 / sigma - 1)) ("linear"). Host float64; sigma = 0 maps to 0."""
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type={time_shift_type!r} is not valid; choose one of: "
                         f"{', '.join(TIME_SHIFT_TYPES)}")
    sigmas = np.asarray(sigmas, np.float64)
    m = math.exp(mu) if time_shift_type == "exponential" else float(mu)
    with np.errstate(divide="ignore"):
        return np.where(sigmas > 0, m / (m + (1.0 / np.maximum(sigmas, 1e-300) - 1.0)), 0.0)


def flow(num_train_timesteps: int = 1000, shift: float = 1.0, *, use_dynamic_shifting: bool = False,
         base_shift: float = 0.5, max_shift: float = 1.15, base_image_seq_len: int = 256,
         max_image_seq_len: int = 4096, time_shift_type: str = "exponential") -> FlowSchedule:
    """The flow-matching schedule of diffusers' `FlowMatchEulerDiscreteScheduler` with the same
    options: sigma_t = shift((t + 1) / T) for t = 0..T-1 (computed in float64, stored float32)."""
    if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type={time_shift_type!r} is not valid; choose one of: "
                         f"{', '.join(TIME_SHIFT_TYPES)}")
    sigmas = np.arange(1, num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps   # [T]
    if not use_dynamic_shifting:
        sigmas = shift_sigmas(sigmas, shift)
    return FlowSchedule(sigmas=jnp.asarray(sigmas, jnp.float32), shift=float(shift),
                        use_dynamic_shifting=bool(use_dynamic_shifting), base_shift=float(base_shift),
                        max_shift=float(max_shift), base_image_seq_len=int(base_image_seq_len),
                        max_image_seq_len=int(max_image_seq_len), time_shift_type=time_shift_type)


def flow_sigmas_float64(schedule: FlowSchedule) -> np.ndarray:
    """[T] float64 training sigmas recomputed on the host (the stored ones are float32)."""
    T = schedule.num_train_timesteps
    sigmas = np.arange(1, T + 1, dtype=np.float64) / T
    return sigmas if schedule.use_dynamic_shifting else shift_sigmas(sigmas, schedule.shift)


def flow_mu(schedule: FlowSchedule, image_seq_len: int) -> float:
    """mu for dynamic shifting at `image_seq_len` tokens: linear from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (as diffusers' Flux pipelines compute it)."""
    slope = (schedule.max_shift - schedule.base_shift) / (schedule.max_image_seq_len - schedule.base_image_seq_len)
    return float(image_seq_len * slope + schedule.base_shift - slope * schedule.base_image_seq_len)
