"""LCM: multistep latent consistency sampling (Luo et al. 2023, Algorithm 1).

A consistency model maps any point x_t of a trajectory straight to its clean end. With the
skip-connection parameterization of consistency models (Song et al. 2023, sec. 3) the network's
x0 estimate is blended with the input so that the map is the identity at t = 0:

    f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)
    c_skip(t) = sigma_data^2 / ((s t)^2 + sigma_data^2),  c_out(t) = s t / sqrt((s t)^2 + sigma_data^2)

with sigma_data = 0.5 and s = `timestep_scaling` (10: at the training timesteps c_skip is ~1e-5 or
less, so f is essentially x0_hat; a larger s shrinks the boundary term further). Multistep
sampling alternates the map and a fresh forward diffusion to the next planned level:

    paper (Alg. 1)            here
    tau_n, tau_{n-1}          t = timesteps[i], t' = timesteps[i + 1]
    z_tau_n                   x (on x_t, as DDIM)
    f_theta(z, w, c, tau_n)   denoised = c_skip x + c_out x0_hat       (x0_hat optionally clipped)
    alpha(t'), sigma(t')      sqrt(abar_t'), sqrt(1 - abar_t')       plan.next_signal, plan.next_noise
    eps ~ N(0, I)             z = normal(fold_in(key, i))

    x_{t'} = sqrt(abar_t') denoised + sqrt(1 - abar_t') z,   and the last step returns `denoised`
    (its plan entries are next_signal = 1, next_noise = 0: no noise, and one step is one map).

The timesteps follow the distillation schedule of the reference (diffusers' `LCMScheduler`):
the `original_inference_steps` levels k - 1, 2k - 1, ..., T - 1 (k = T // original_inference_steps)
the model was distilled on, of which `num_steps` are taken at evenly spaced indices from the
noisiest. The guidance scale of an LCM is an input of the distilled network (its `w`), not
classifier-free guidance: run it with guidance off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import schedules
from jaxdiff.samplers import base

SIGMA_DATA = 0.5


@struct.dataclass
class LCMPlan:
    """Per-call coefficients, each float32 [N] (N = num_steps).

    sqrt_alpha_bar, sqrt_one_minus_alpha_bar: sqrt(abar_t), sqrt(1 - abar_t) at the level of x.
    c_skip, c_out: the boundary-condition scalings at t.
    next_signal, next_noise: sqrt(abar_t'), sqrt(1 - abar_t') of the next planned level (1, 0 at
        the last call, which returns the denoised sample itself).
    """

    sqrt_alpha_bar: jax.Array
    sqrt_one_minus_alpha_bar: jax.Array
    c_skip: jax.Array
    c_out: jax.Array
    next_signal: jax.Array
    next_noise: jax.Array


def lcm_step(options: base.DenoiseOptions, state: base.SamplerState, x, model_output, key):
    """One step of multistep consistency sampling (module docstring).

    x: x_t [B, ...] float32 at the level plan.sqrt_alpha_bar[index]**2.
    model_output: the network's prediction at (x, t) [B, ...] float32.
    key: the run's key; the noise of the next level is drawn from fold_in(key, index).
    Returns (x_{t'} [B, ...], state with index + 1).
    """
    c = base.current(state.plan, state.index)
    x0, _ = base.denoise(model_output, x, c.sqrt_alpha_bar, c.sqrt_one_minus_alpha_bar, options)
    denoised = c.c_out * x0 + c.c_skip * x                                   # f(x_t, t)
    z = jax.random.normal(base.step_key(key, state), x.shape, jnp.float32)
    return c.next_signal * denoised + c.next_noise * z, state._replace(index=state.index + 1)


def boundary_scalings(timesteps, timestep_scaling: float):
    """(c_skip, c_out) at training timesteps `[N]` (host float64): the consistency-model
    parameterization with sigma_data = 0.5 on the scaled timestep s t."""
    st = np.asarray(timesteps, np.float64) * timestep_scaling
    return SIGMA_DATA ** 2 / (st ** 2 + SIGMA_DATA ** 2), st / np.sqrt(st ** 2 + SIGMA_DATA ** 2)


def lcm_timesteps(num_train_timesteps: int, num_steps: int, original_inference_steps: int) -> np.ndarray:
    """The decreasing timesteps `[num_steps]` (int64): `num_steps` of the distillation schedule's
    levels k - 1, 2k - 1, ..., T - 1 (k = T // original_inference_steps), taken from the noisiest
    at indices floor(j * original_inference_steps / num_steps)."""
    if int(original_inference_steps) != original_inference_steps or not (
            1 <= original_inference_steps <= num_train_timesteps):
        raise ValueError(f"original_inference_steps must be an integer in [1, {num_train_timesteps}] (the "
                         f"schedule's num_train_timesteps), got {original_inference_steps}")
    if int(num_steps) != num_steps or not 1 <= num_steps <= original_inference_steps:
        raise ValueError(f"num_steps must be an integer in [1, original_inference_steps={original_inference_steps}]"
                         f", got {num_steps}")
    k = num_train_timesteps // original_inference_steps
    origin = (np.arange(original_inference_steps, 0, -1, dtype=np.int64)) * k - 1     # noisiest first
    picks = np.floor(np.linspace(0, original_inference_steps, num_steps, endpoint=False)).astype(np.int64)
    return origin[picks]


def lcm(schedule: schedules.DiscreteSchedule, num_steps: int, *, original_inference_steps: int = 50,
        timestep_scaling: float = 10.0, prediction_type: str = "epsilon", clip_sample: bool = False,
        clip_sample_range: float = 1.0, thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0, start_step: int = 0) -> base.Sampler:
    """The LCM sampler over `num_steps` model calls (1 to 8 is what latent consistency models are
    distilled for). Options and defaults as diffusers' `LCMScheduler`; its `timestep_spacing`,
    `steps_offset` and `set_alpha_to_one` play no part in the LCM plan and are not options.

    start_step: skip the first planned steps and start there (img2img; see `sampling.sample`'s
    x0). diffusers' LCM img2img instead shortens the distillation schedule by its `strength`; the
    levels visited then differ.
    """
    if not isinstance(schedule, schedules.DiscreteSchedule):
        raise TypeError(f"LCM needs a schedules.DiscreteSchedule, got {type(schedule).__name__}")
    base.check_range("timestep_scaling", timestep_scaling, 0.0, float("inf"))
    options = base.denoise_options(prediction_type=prediction_type, clip_sample=clip_sample,
                                   clip_sample_range=clip_sample_range, thresholding=thresholding,
                                   dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                   sample_max_value=sample_max_value)
    ac = schedules.alphas_cumprod_float64(schedule)
    ts = lcm_timesteps(schedule.num_train_timesteps, num_steps, original_inference_steps)
    ab = ac[ts]                                                                  # [N]
    ab_next = np.append(ac[ts[1:]], 1.0)                                         # [N]; 1: no noise at the end
    c_skip, c_out = boundary_scalings(ts, float(timestep_scaling))
    plan = LCMPlan(sqrt_alpha_bar=base.f32(np.sqrt(ab)), sqrt_one_minus_alpha_bar=base.f32(np.sqrt(1.0 - ab)),
                   c_skip=base.f32(c_skip), c_out=base.f32(c_out), next_signal=base.f32(np.sqrt(ab_next)),
                   next_noise=base.f32(np.sqrt(1.0 - ab_next)))
    state = base.new_state(ts, plan, levels=base.vp_levels(np.sqrt(ab)),
                           start_call=base.check_start_step(start_step, num_steps))
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.constant_init),
                        step=jax.tree_util.Partial(lcm_step, options))
