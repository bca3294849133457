"""Sigma-space helpers shared by the Karras-style samplers (Euler, Euler ancestral, Heun, EDM, LMS)
and the exponential-integrator ones (DPM-Solver++, UniPC).

The variance-preserving latent x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, divided by sqrt(abar),
is the "variance exploding" latent of Karras et al. 2022 (EDM):

    x = x_t / sqrt(abar) = x0 + sigma eps,     sigma = sqrt((1 - abar) / abar),

and the probability-flow ODE in it is (EDM eq. 3 with s(t) = 1)

    dx / dsigma = (x - D(x; sigma)) / sigma,                                           (*)

with D(x; sigma) the denoiser, E[x0 | x]. The network was trained on x_t, so it is handed
a(sigma) x with a(sigma) = 1 / sqrt(sigma^2 + 1) = sqrt(abar) (the sampler's `input_scales`), at
the training timestep whose noise level is sigma (fractional between training timesteps).

Everything here runs on the host in float64 unless it says otherwise (plans), or is a small
traced function of float32 arrays (steps).

Notation map:
    EDM paper        here
    sigma_i          sigmas[i]                      decreasing, sigmas[N] = 0 (or sigma_min)
    D(x; sigma)      x0_hat = `denoised(...)`
    d_i              `derivative(x, x0_hat, sigma)` = (x - D(x; sigma)) / sigma
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import parameterization, schedules
from jaxdiff.samplers import base

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
KARRAS_RHO = 7.0
# The reference schedulers replace a zero terminal abar (zero-terminal-SNR schedules) with 2^-24
# so that sigma_max stays finite (~4096); the same floor here keeps the plans identical.
MIN_ALPHA_BAR = 2.0 ** -24


# --------------------------------------------------------------------------------------------
# Host-side plans (float64 numpy).
# --------------------------------------------------------------------------------------------

def training_sigmas(schedule) -> np.ndarray:
    """sigma_t [T] float64 of every training timestep (increasing in t); abar floored at 2^-24."""
    if not isinstance(schedule, schedules.DiscreteSchedule):
        raise ValueError(f"sigma-space samplers need a schedules.DiscreteSchedule, got {type(schedule).__name__}")
    ac = np.maximum(schedules.alphas_cumprod_float64(schedule), MIN_ALPHA_BAR)
    return np.sqrt((1.0 - ac) / ac)


def spaced_timesteps(num_train_timesteps: int, num_steps: int, timestep_spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """The decreasing training timesteps [num_steps] float64 of the Karras-style samplers.

    As `base.plan_timesteps`, except that "linspace" is *not* rounded (the reference rounds the
    linspace to float32, not to integers), so the sampler may start between training timesteps.
    """
    if timestep_spacing == "linspace":
        base.check_num_steps(num_steps, num_train_timesteps)
        ts = np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1]
        return ts.astype(np.float64)
    return base.plan_timesteps(num_train_timesteps, num_steps, timestep_spacing, steps_offset).astype(np.float64)


def interp_sigmas(train_sigmas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """sigma at (fractional) timesteps by linear interpolation between training timesteps."""
    return np.interp(timesteps, np.arange(train_sigmas.shape[0]), train_sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. 2022 eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho, i = 0..N-1 (without the final sigma_N = 0). [N] float64."""
    ramp = np.linspace(0.0, 1.0, num_steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def timesteps_from_sigmas(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: linear interpolation of log-sigma between
    the neighbouring training timesteps, clamped to [0, T - 1] (the reference's convention).
    Host float64 counterpart of `schedules.timestep_from_sigma`."""
    log_train = np.log(train_sigmas)                                    # [T], increasing
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    lo = np.clip(np.searchsorted(log_train, log_sigma, side="right") - 1, 0, log_train.shape[0] - 2)
    w = np.clip((log_train[lo] - log_sigma) / (log_train[lo] - log_train[lo + 1]), 0.0, 1.0)
    return lo + w


def final_sigma(train_sigmas: np.ndarray, final_sigmas_type: str) -> float:
    """The level the run ends on: 0 (clean) or the smallest training sigma."""
    base.check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    return 0.0 if final_sigmas_type == "zero" else float(train_sigmas[0])


def init_sigma(sigmas: np.ndarray, timestep_spacing: str) -> float:
    """The std of the initial latent x_T = init_sigma * noise, as the reference computes it:
    sigma_max for "linspace" / "trailing", sqrt(sigma_max^2 + 1) for "leading" (a float32
    rounding of the plan's largest sigma is used, as there)."""
    sigma_max = float(np.max(np.asarray(sigmas, np.float32)))
    return sigma_max if timestep_spacing in ("linspace", "trailing") else (sigma_max ** 2 + 1.0) ** 0.5


def karras_plan(schedule, num_steps: int, *, timestep_spacing: str, steps_offset: int,
                use_karras_sigmas: bool, final_sigmas_type: str, sigma_min=None, sigma_max=None):
    """(timesteps [N], sigmas [N + 1]) float64 of a Karras-style sampler (Euler / Heun family).

    Without Karras sigmas the timesteps follow `timestep_spacing` and sigmas are interpolated at
    them. With `use_karras_sigmas`, sigmas follow eq. 5 between the plan's extreme levels (or
    `sigma_min` / `sigma_max`), and the timesteps are read back from them (fractional).
    sigmas[N] is 0 or the smallest training sigma (`final_sigmas_type`).
    """
    base.check_choice("use_karras_sigmas", use_karras_sigmas, (True, False))
    train = training_sigmas(schedule)
    ts = spaced_timesteps(schedule.num_train_timesteps, num_steps, timestep_spacing, steps_offset)
    sigmas = interp_sigmas(train, ts)
    if use_karras_sigmas:
        lo = sigmas[-1] if sigma_min is None else float(sigma_min)
        hi = sigmas[0] if sigma_max is None else float(sigma_max)
        sigmas = karras_sigmas(lo, hi, num_steps)
        ts = timesteps_from_sigmas(sigmas, train)
    sigmas = np.append(sigmas, final_sigma(train, final_sigmas_type))
    return ts, sigmas


def multistep_timesteps(num_train_timesteps: int, num_steps: int, timestep_spacing: str,
                        steps_offset: int = 0) -> np.ndarray:
    """The multistep solvers' integer timesteps [num_steps] (DPM-Solver++, UniPC): as
    `base.plan_timesteps`, except that "linspace" and "leading" space num_steps + 1 points and
    drop the clean end (the reference's rule for these schedulers)."""
    base.check_choice("timestep_spacing", timestep_spacing, base.TIMESTEP_SPACINGS)
    base.check_num_steps(num_steps, num_train_timesteps)
    T = num_train_timesteps
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif timestep_spacing == "leading":
        ts = (np.arange(num_steps + 1) * (T // (num_steps + 1)))[::-1][:-1].astype(np.int64) + int(steps_offset)
        if ts.max() >= T:
            raise ValueError(f"steps_offset={steps_offset} pushes the first timestep to {ts.max()}, "
                             f"past the schedule's last timestep {T - 1}")
    else:
        ts = base.plan_timesteps(T, num_steps, "trailing")
    return ts.copy()


def multistep_plan(schedule, num_steps: int, *, timestep_spacing: str, steps_offset: int,
                   use_karras_sigmas: bool, final_sigmas_type: str):
    """(timesteps [N], sigmas [N + 1]) float64 of the multistep solvers.

    Without Karras sigmas: `multistep_timesteps` and the training sigmas there. With them: EDM
    eq. 5 between the smallest and largest training sigma, and timesteps read back from the
    sigmas and *rounded* to integers (the sigmas themselves are kept; the reference skips the
    rounding for "squaredcos_cap_v2" schedules, which a schedule here does not record).
    """
    base.check_choice("use_karras_sigmas", use_karras_sigmas, (True, False))
    train = training_sigmas(schedule)
    ts = multistep_timesteps(schedule.num_train_timesteps, num_steps, timestep_spacing, steps_offset)
    if use_karras_sigmas:
        sigmas = karras_sigmas(train[0], train[-1], num_steps)
        ts = np.round(timesteps_from_sigmas(sigmas, train))
    else:
        sigmas = interp_sigmas(train, ts)
    return ts.astype(np.float64), np.append(sigmas, final_sigma(train, final_sigmas_type))


def vp_coordinates(sigmas):
    """(alpha, sigma_vp, lambda) float64 of VE sigmas: alpha = 1 / sqrt(sigma^2 + 1),
    sigma_vp = sigma alpha, lambda = log(alpha / sigma_vp) = -log(sigma) (+inf at sigma = 0)."""
    sigmas = np.asarray(sigmas, np.float64)
    alpha = input_scale(sigmas)
    s = sigmas * alpha
    with np.errstate(divide="ignore"):
        return alpha, s, np.log(alpha) - np.log(s)


def input_scale(sigma):
    """a(sigma) = 1 / sqrt(sigma^2 + 1) = sqrt(abar): model input = a x. Host or traced."""
    return 1.0 / (sigma ** 2 + 1.0) ** 0.5


@struct.dataclass
class Level:
    """A noise level in both coordinates, each float32 [N] in a plan (or [] once indexed).

    sigma: the VE sigma; a = sqrt(abar) = 1 / sqrt(sigma^2 + 1); s = sqrt(1 - abar) = sigma a.
    """

    sigma: jax.Array
    a: jax.Array
    s: jax.Array


def level(sigmas) -> Level:
    """`Level` of host float64 sigmas (stored float32)."""
    sigmas = np.asarray(sigmas, np.float64)
    a = input_scale(sigmas)
    return Level(sigma=base.f32(sigmas), a=base.f32(a), s=base.f32(sigmas * a))


# --------------------------------------------------------------------------------------------
# Traced math (float32).
# --------------------------------------------------------------------------------------------

@struct.dataclass
class DenoiserOptions:
    """How a network output becomes D(x; sigma). clip_range: float32 [] (inf = off)."""

    clip_range: jax.Array
    prediction_type: str = struct.field(pytree_node=False)


def denoiser_options(prediction_type: str, clip_sample: bool = False, clip_sample_range: float = 1.0):
    base.check_choice("prediction_type", prediction_type, parameterization.PREDICTION_TYPES)
    base.check_choice("clip_sample", clip_sample, (True, False))
    base.check_range("clip_sample_range", clip_sample_range, 0.0, float("inf"))
    return DenoiserOptions(clip_range=base.f32(clip_sample_range if clip_sample else jnp.inf),
                           prediction_type=prediction_type)


def denoised(model_output, x, lv: Level, options: DenoiserOptions):
    """D(x; sigma) [B, ...]: the network's x0 estimate, read from its native prediction at the
    model input x_t = a x (parameterization.py does the conversion), then clipped to
    [-clip_range, clip_range] (a no-op for inf). x: the VE latent [B, ...]."""
    x0, _ = parameterization.x0_eps_coefs(model_output, lv.a * x, lv.a, lv.s, options.prediction_type)
    return jnp.clip(x0, -options.clip_range, options.clip_range)


def derivative(x, x0, sigma):
    """d = (x - D(x; sigma)) / sigma: the probability-flow ODE's dx/dsigma, EDM eq. 3 (*)."""
    return (x - x0) / sigma


def euler_move(x, x0, sigma, sigma_to):
    """One Euler step of (*) from sigma to sigma_to with the slope d = (x - x0) / sigma (EDM
    Alg. 1 line 5, x + (sigma_to - sigma) d), written as x0 + (sigma_to / sigma) (x - x0): the same
    number without cancelling two terms of size |x| ~ sigma_max (~4096 on zero-terminal-SNR
    schedules) into one of size sigma_to."""
    return x0 + (sigma_to / sigma) * (x - x0)


def ancestral_split(sigma_from, sigma_to):
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to: deterministic
    descent to sigma_down, then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 =
    sigma_to^2 and sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 (the DDPM
    posterior variance in VE coordinates). Host or traced."""
    up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    down = (sigma_to ** 2 - up ** 2) ** 0.5
    return down, up
