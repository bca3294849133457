"""Euler and Euler-ancestral samplers in sigma space (Karras et al. 2022, "EDM").

The state x is the VE latent x = x_t / sqrt(abar) (see `samplers/sigma.py`); the network sees
a(sigma_i) x at the training timestep of sigma_i. For step i from sigma_i to sigma_{i+1}:

    paper (EDM Algorithm 1, 2)     here
    sigma_i, sigma_{i+1}           plan.now.sigma, the target level
    x_i                            x
    D_theta(x_i; sigma_i)          x0_hat = sigma.denoised(model_output, x, ...)
    d_i                            (x_i - x0_hat) / sigma_i            (Alg. 1 line 4, eq. 3)

Euler (Alg. 1 without the Heun correction, line 5):
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i.

Euler ancestral: the DDPM posterior step in VE coordinates, split into a deterministic Euler
move to sigma_down and fresh noise of std sigma_up (sigma_down^2 + sigma_up^2 = sigma_{i+1}^2,
`sigma.ancestral_split`):
    x_{i+1} = x_i + (sigma_down - sigma_i) d_i + sigma_up z,   z ~ N(0, I) from fold_in(key, i).

Plans follow the reference schedulers (diffusers' EulerDiscreteScheduler /
EulerAncestralDiscreteScheduler): `timestep_spacing`, `steps_offset`, `use_karras_sigmas` (EDM
eq. 5, rho = 7), `final_sigmas_type`, and the initial latent's std `init_sigma` (sigma_max, or
sqrt(sigma_max^2 + 1) with "leading" spacing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import schedules
from jaxdiff.samplers import base, sigma as sig


@struct.dataclass
class EulerPlan:
    """Per-call arrays, each float32 [N].

    now: the level sigma_i of x (with a = input scale, s = sigma a).
    sigma_down: where the deterministic Euler move lands (sigma_{i+1} for plain Euler).
    sigma_up: std of the noise added after it (0 for plain Euler).
    """

    now: sig.Level
    sigma_down: jax.Array
    sigma_up: jax.Array


@struct.dataclass
class EulerOptions:
    denoiser: sig.DenoiserOptions
    ancestral: bool = struct.field(pytree_node=False)


def euler_step(options: EulerOptions, state: base.SamplerState, x, model_output, key):
    """One Euler (EDM Alg. 1 line 5) or Euler-ancestral step; notation in the module docstring.

    x: the VE latent x_i [B, ...] float32. model_output: the network at (a_i x_i, t_i) [B, ...].
    Returns (x_{i+1} [B, ...], state with index + 1).
    """
    c = base.current(state.plan, state.index)
    x0 = sig.denoised(model_output, x, c.now, options.denoiser)
    x_next = sig.euler_move(x, x0, c.now.sigma, c.sigma_down)
    if options.ancestral:
        x_next = x_next + c.sigma_up * jax.random.normal(base.step_key(key, state), x.shape, jnp.float32)
    return x_next, state._replace(index=state.index + 1)


def _build(schedule, num_steps, *, ancestral, timestep_spacing, steps_offset, prediction_type,
           use_karras_sigmas, final_sigmas_type, sigma_min, sigma_max, start_step):
    ts, sigmas = sig.karras_plan(schedule, num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                                 use_karras_sigmas=use_karras_sigmas, final_sigmas_type=final_sigmas_type,
                                 sigma_min=sigma_min, sigma_max=sigma_max)
    now, nxt = sigmas[:-1], sigmas[1:]
    if ancestral:
        down, up = sig.ancestral_split(now, nxt)
    else:
        down, up = nxt, np.zeros_like(nxt)
    plan = EulerPlan(now=sig.level(now), sigma_down=base.f32(down), sigma_up=base.f32(up))
    state = base.new_state(ts, plan, init_sigma=sig.init_sigma(sigmas, timestep_spacing),
                           input_scales=sig.input_scale(now), levels=base.ve_levels(now),
                           start_call=base.check_start_step(start_step, num_steps))
    options = EulerOptions(denoiser=sig.denoiser_options(prediction_type), ancestral=ancestral)
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.constant_init),
                        step=jax.tree_util.Partial(euler_step, options))


def euler(schedule: schedules.DiscreteSchedule, num_steps: int, *, timestep_spacing: str = "linspace",
          steps_offset: int = 0, prediction_type: str = "epsilon", use_karras_sigmas: bool = False,
          final_sigmas_type: str = "zero", sigma_min: float | None = None,
          sigma_max: float | None = None, start_step: int = 0) -> base.Sampler:
    """The Euler sampler of the probability-flow ODE over `num_steps` model calls (deterministic,
    first order). Options and defaults as diffusers' `EulerDiscreteScheduler`; `sigma_min` /
    `sigma_max` bound the Karras sigmas (default: the plan's extreme levels)."""
    return _build(schedule, num_steps, ancestral=False, timestep_spacing=timestep_spacing,
                  steps_offset=steps_offset, prediction_type=prediction_type, use_karras_sigmas=use_karras_sigmas,
                  final_sigmas_type=final_sigmas_type, sigma_min=sigma_min, sigma_max=sigma_max,
                  start_step=start_step)


def euler_ancestral(schedule: schedules.DiscreteSchedule, num_steps: int, *, timestep_spacing: str = "linspace",
                    steps_offset: int = 0, prediction_type: str = "epsilon", use_karras_sigmas: bool = False,
                    final_sigmas_type: str = "zero", sigma_min: float | None = None,
                    sigma_max: float | None = None, start_step: int = 0) -> base.Sampler:
    """The Euler-ancestral sampler over `num_steps` model calls (stochastic; noise from
    fold_in(key, i)). Options and defaults as diffusers' `EulerAncestralDiscreteScheduler`, plus
    the Karras-sigma and final-sigma options of `euler` (same plan; the reference has neither)."""
    return _build(schedule, num_steps, ancestral=True, timestep_spacing=timestep_spacing,
                  steps_offset=steps_offset, prediction_type=prediction_type, use_karras_sigmas=use_karras_sigmas,
                  final_sigmas_type=final_sigmas_type, sigma_min=sigma_min, sigma_max=sigma_max,
                  start_step=start_step)
