"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020).

Notation. For a step from planned timestep t to the next planned timestep t' (t' = -1 after the
last one, the clean end with abar = 1):

    paper                      here
    alpha_bar_t, alpha_bar_t'  abar_t, abar_t'
    beta_t, alpha_t            1 - abar_t / abar_t', abar_t / abar_t'   (span the skipped steps)
    mu_tilde_t(x_t, x0)        posterior mean, eq. 7    coef_x0 x0_hat + coef_xt x_t
    beta_tilde_t               posterior variance, eq. 7
    sigma_t^2                  beta_tilde_t ("fixed_small") or beta_t ("fixed_large"), sec. 3.2
    z                          z ~ N(0, I)

Step (eq. 6-7 with x0 replaced by the network's estimate x0_hat):

    x_t' = mu_tilde_t(x_t, x0_hat) + sigma_t z,   no noise at t = 0.

As in the reference implementation, noise is added whenever the current timestep t > 0 (with
`steps_offset=1` that includes the final step, from t = 1), and the fixed_small variance is
floored at 1e-20.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import schedules
from jaxdiff.samplers import base

VARIANCE_TYPES = ("fixed_small", "fixed_large")


@struct.dataclass
class DDPMPlan:
    """Per-call coefficients, each float32 [N] (N = num_steps).

    sqrt_alpha_bar, sqrt_one_minus_alpha_bar: sqrt(abar_t), sqrt(1 - abar_t) (to read the prediction).
    coef_x0, coef_xt: the posterior-mean coefficients of eq. 7.
    std: sigma_t of the chosen variance type, 0 where no noise is added.
    """

    sqrt_alpha_bar: jax.Array
    sqrt_one_minus_alpha_bar: jax.Array
    coef_x0: jax.Array
    coef_xt: jax.Array
    std: jax.Array


def ddpm_step(options: base.DenoiseOptions, state: base.SamplerState, x, model_output, key):
    """One ancestral step, Ho et al. 2020 eq. 6-7 (notation in the module docstring).

    x: x_t [B, ...] float32. model_output: the network's prediction at (x, t) [B, ...] float32.
    key: the run's key; the noise z is drawn from fold_in(key, index).
    Returns (x_t' [B, ...], state with index + 1).
    """
    c = base.current(state.plan, state.index)
    x0, _ = base.denoise(model_output, x, c.sqrt_alpha_bar, c.sqrt_one_minus_alpha_bar, options)
    mean = c.coef_x0 * x0 + c.coef_xt * x                                          # mu_tilde, eq. 7
    z = jax.random.normal(base.step_key(key, state), x.shape, jnp.float32)
    return mean + c.std * z, state._replace(index=state.index + 1)


def ddpm(schedule: schedules.DiscreteSchedule, num_steps: int | None = None, *,
         variance_type: str = "fixed_small", timestep_spacing: str = "leading", steps_offset: int = 0,
         prediction_type: str = "epsilon", clip_sample: bool = True, clip_sample_range: float = 1.0,
         thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
         sample_max_value: float = 1.0, start_step: int = 0) -> base.Sampler:
    """The DDPM ancestral sampler over `num_steps` model calls (default: every training timestep).
    Options and defaults as diffusers' `DDPMScheduler`.

    variance_type: "fixed_small" (sigma_t^2 = beta_tilde_t, right for deterministic data) or
    "fixed_large" (sigma_t^2 = beta_t, right for N(0, I) data), Ho et al. 2020 sec. 3.2.
    start_step: skip the first steps and start there (img2img; see `sampling.sample`'s x0).
    """
    if not isinstance(schedule, schedules.DiscreteSchedule):
        raise ValueError(f"DDPM needs a schedules.DiscreteSchedule, got {type(schedule).__name__}")
    base.check_choice("variance_type", variance_type, VARIANCE_TYPES)
    num_train = schedule.num_train_timesteps
    num_steps = num_train if num_steps is None else num_steps
    ac = schedules.alphas_cumprod_float64(schedule)
    ts = base.plan_timesteps(num_train, num_steps, timestep_spacing, steps_offset)
    prev = np.append(ts[1:], -1)                                # the next planned timestep
    ab = ac[ts]
    ab_prev = base.alpha_bar_at(ac, prev, 1.0)
    coef_x0, coef_xt, variance, beta = base.posterior(ab, ab_prev)
    variance = np.maximum(variance, 1e-20) if variance_type == "fixed_small" else beta
    std = np.where(ts > 0, np.sqrt(variance), 0.0)
    plan = DDPMPlan(sqrt_alpha_bar=base.f32(np.sqrt(ab)), sqrt_one_minus_alpha_bar=base.f32(np.sqrt(1.0 - ab)),
                    coef_x0=base.f32(coef_x0), coef_xt=base.f32(coef_xt), std=base.f32(std))
    options = base.denoise_options(prediction_type=prediction_type, clip_sample=clip_sample,
                                   clip_sample_range=clip_sample_range, thresholding=thresholding,
                                   dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                   sample_max_value=sample_max_value)
    state = base.new_state(ts, plan, levels=base.vp_levels(np.sqrt(ab)),
                           start_call=base.check_start_step(start_step, num_steps))
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.constant_init),
                        step=jax.tree_util.Partial(ddpm_step, options))
