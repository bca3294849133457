"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2021), and its inversion.

Notation. The paper writes alpha_t for the *cumulative* product; here that is abar_t
(`alpha_bar`). For a step from planned timestep t to the previous level t':

    paper                     here
    alpha_t, alpha_{t-1}      abar_t, abar_t'             plan.sqrt_alpha_bar**2, plan.sqrt_alpha_bar_prev**2
    eps_theta(x_t)            eps_hat                     from the network output (parameterization.py)
    "predicted x0"            x0_hat                      optionally clipped / thresholded
    sigma_t(eta)              sigma = eta * sqrt(beta_tilde_t)   (eq. 16; beta_tilde from DDPM eq. 7)
    eps_t                     z ~ N(0, I)

Eq. 12:  x_{t'} = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma^2) eps_hat + sigma z.

eta = 0 is the deterministic DDIM sampler (a first-order solver of the probability-flow ODE);
eta = 1 has DDPM's posterior variance.

The previous level follows the reference implementation: t' = t - T // num_steps for every
`timestep_spacing` (so with "trailing" / "linspace" and num_steps not dividing T it need not be the
next planned timestep); t' < 0 means the clean end, abar = 1 if `set_alpha_to_one` else abar_0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import parameterization, schedules
from jaxdiff.samplers import base


@struct.dataclass
class DDIMPlan:
    """Per-call coefficients, each float32 [N] (N = num_steps).

    sqrt_alpha_bar, sqrt_one_minus_alpha_bar: sqrt(abar_t), sqrt(1 - abar_t) at the level of x.
    sqrt_alpha_bar_prev, one_minus_alpha_bar_prev: sqrt(abar_t'), 1 - abar_t' at the target level.
    posterior_std: sqrt(beta_tilde_t), DDPM's posterior std between the two levels.
    """

    sqrt_alpha_bar: jax.Array
    sqrt_one_minus_alpha_bar: jax.Array
    sqrt_alpha_bar_prev: jax.Array
    one_minus_alpha_bar_prev: jax.Array
    posterior_std: jax.Array


@struct.dataclass
class DDIMOptions:
    """eta: float32 []; use_clipped_model_output: static (recompute eps_hat from the clipped x0)."""

    denoise: base.DenoiseOptions
    eta: jax.Array
    use_clipped_model_output: bool = struct.field(pytree_node=False)


def ddim_step(options: DDIMOptions, state: base.SamplerState, x, model_output, key):
    """One DDIM update, Song et al. 2021 eq. 12 (notation in the module docstring).

    x: x_t [B, ...] float32 at the level plan.sqrt_alpha_bar[index]**2.
    model_output: the network's prediction at (x, t) [B, ...] float32.
    key: the run's key; the noise (used only when eta > 0) is drawn from fold_in(key, index).
    Returns (x_{t'} [B, ...], state with index + 1).
    """
    c = base.current(state.plan, state.index)
    x0, eps = base.denoise(model_output, x, c.sqrt_alpha_bar, c.sqrt_one_minus_alpha_bar, options.denoise)
    if options.use_clipped_model_output:
        eps = parameterization.eps_from_x0_coefs(x, x0, c.sqrt_alpha_bar, c.sqrt_one_minus_alpha_bar)
    sigma = options.eta * c.posterior_std                                        # eq. 16
    direction = jnp.sqrt(jnp.maximum(c.one_minus_alpha_bar_prev - sigma ** 2, 0.0)) * eps
    z = jax.random.normal(base.step_key(key, state), x.shape, jnp.float32)
    x_prev = c.sqrt_alpha_bar_prev * x0 + direction + sigma * z
    return x_prev, state._replace(index=state.index + 1)


def _plan(alpha_bar, alpha_bar_prev) -> DDIMPlan:
    """Coefficients from float64 levels abar_t, abar_t' `[N]` (the clean end abar = 1 has no
    posterior variance; that entry is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = np.nan_to_num(base.posterior(alpha_bar, alpha_bar_prev)[2], nan=0.0, posinf=0.0)
    return DDIMPlan(sqrt_alpha_bar=base.f32(np.sqrt(alpha_bar)),
                    sqrt_one_minus_alpha_bar=base.f32(np.sqrt(1.0 - alpha_bar)),
                    sqrt_alpha_bar_prev=base.f32(np.sqrt(alpha_bar_prev)),
                    one_minus_alpha_bar_prev=base.f32(1.0 - alpha_bar_prev),
                    posterior_std=base.f32(np.sqrt(np.maximum(variance, 0.0))))


def _levels(schedule, num_steps, timestep_spacing, steps_offset, set_alpha_to_one):
    """(timesteps, prev timesteps, abar_t, abar_t') of a DDIM plan, float64 on the host."""
    if not isinstance(schedule, schedules.DiscreteSchedule):
        raise ValueError(f"DDIM needs a schedules.DiscreteSchedule, got {type(schedule).__name__}")
    base.check_choice("set_alpha_to_one", set_alpha_to_one, (True, False))
    num_train = schedule.num_train_timesteps
    ac = schedules.alphas_cumprod_float64(schedule)
    ts = base.plan_timesteps(num_train, num_steps, timestep_spacing, steps_offset)
    prev = ts - num_train // num_steps
    final = 1.0 if set_alpha_to_one else ac[0]
    return ts, prev, base.alpha_bar_at(ac, ts, final), base.alpha_bar_at(ac, prev, final)


def _options(eta, use_clipped_model_output, **denoise_kwargs) -> DDIMOptions:
    base.check_range("eta", eta, 0.0, 1.0)
    base.check_choice("use_clipped_model_output", use_clipped_model_output, (True, False))
    return DDIMOptions(denoise=base.denoise_options(**denoise_kwargs), eta=base.f32(eta),
                       use_clipped_model_output=bool(use_clipped_model_output))


def ddim(schedule: schedules.DiscreteSchedule, num_steps: int, *, eta: float = 0.0,
         timestep_spacing: str = "leading", steps_offset: int = 0, set_alpha_to_one: bool = True,
         prediction_type: str = "epsilon", clip_sample: bool = True, clip_sample_range: float = 1.0,
         thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
         sample_max_value: float = 1.0, use_clipped_model_output: bool = False,
         start_step: int = 0) -> base.Sampler:
    """The DDIM sampler over `num_steps` model calls. Options and defaults as diffusers'
    `DDIMScheduler` (eta and use_clipped_model_output are its `step` arguments).

    eta in [0, 1]: 0 deterministic (DDIM), 1 DDPM-like noise. Traced, so changing it never
    recompiles the sampling loop. start_step: skip the first steps and start there (img2img; see
    `sampling.sample`'s x0).
    """
    ts, _, ab, ab_prev = _levels(schedule, num_steps, timestep_spacing, steps_offset, set_alpha_to_one)
    options = _options(eta, use_clipped_model_output, prediction_type=prediction_type,
                       clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                       thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                       sample_max_value=sample_max_value)
    state = base.new_state(ts, _plan(ab, ab_prev), levels=base.vp_levels(np.sqrt(ab)),
                           start_call=base.check_start_step(start_step, num_steps))
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.constant_init),
                        step=jax.tree_util.Partial(ddim_step, options))


def ddim_inverse(schedule: schedules.DiscreteSchedule, num_steps: int, *,
                 timestep_spacing: str = "leading", steps_offset: int = 0, set_alpha_to_one: bool = True,
                 prediction_type: str = "epsilon", clip_sample: bool = True, clip_sample_range: float = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, use_clipped_model_output: bool = False) -> base.Sampler:
    """Deterministic DDIM run backwards, from data towards noise ("DDIM inversion").

    The mirror image of `ddim(...)` with the same options and eta = 0: it visits the same pairs
    of levels in reverse, stepping from abar_t' up to abar_t with eq. 12 (sigma = 0), the network
    evaluated at the level x is at (timestep t', or 0 at the clean end). Inverting the output of
    `ddim` recovers its noise up to the two solvers' O(1 / num_steps) error (and `ddim` maps an
    inverted latent back to the data likewise). The input is the data itself (init_sigma = 1):
    `sampling.invert(sampler, model_fn, x0)`.

    With set_alpha_to_one=True the first step starts at abar = 1, where a "sample"-predicting
    network carries no information about eps; use set_alpha_to_one=False there.
    """
    _, prev, ab, ab_prev = _levels(schedule, num_steps, timestep_spacing, steps_offset, set_alpha_to_one)
    options = _options(0.0, use_clipped_model_output, prediction_type=prediction_type,
                       clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                       thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                       sample_max_value=sample_max_value)
    call_t = np.maximum(prev, 0)[::-1]
    state = base.new_state(call_t, _plan(ab_prev[::-1], ab[::-1]), levels=base.vp_levels(np.sqrt(ab_prev[::-1])))
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.constant_init),
                        step=jax.tree_util.Partial(ddim_step, options))
