"""Heun's second-order sampler in sigma space (Karras et al. 2022, "EDM", Algorithm 1).

Two model calls per step. For step i from sigma_i to sigma_{i+1} (x: the VE latent, see
`samplers/sigma.py`):

    paper (EDM Algorithm 1)           here
    d_i = (x_i - D(x_i; sigma_i)) / sigma_i          first call  (lines 4-5): Euler predictor
    x_{i+1}' = x_i + (sigma_{i+1} - sigma_i) d_i       -> handed to the next call
    d_i' = (x_{i+1}' - D(x_{i+1}'; sigma_{i+1})) / sigma_{i+1}   second call (lines 7-8):
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i / 2 + d_i' / 2)  trapezoidal corrector

The last step (to sigma_N = 0) is the Euler step alone (line 6), so N steps take 2N - 1 calls.
The calls alternate predictor / corrector; which one a call is comes from the plan (`correct`),
selected with `jnp.where`, and `state.memory` = [x_i, d_i] carries the predictor's start and slope
to the corrector. Plans (spacing, Karras sigmas, init_sigma) follow diffusers'
`HeunDiscreteScheduler`.

`edm` is the stochastic version, EDM Algorithm 2: before step i the sample is pushed up from
sigma_i to sigma_hat_i = (1 + gamma_i) sigma_i with fresh noise (lines 4-6),

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0,
    x_hat_i = x_i + sqrt(sigma_hat_i^2 - sigma_i^2) S_noise eps_i,   eps_i ~ N(0, I),

and the Heun step runs from sigma_hat_i (the network sees x_hat_i at the timestep of
sigma_hat_i). The knobs S_churn, S_tmin, S_tmax, S_noise are traced, so `init` computes the
sigma_hat plan (levels, timesteps, input scales) inside the compiled loop; the churn of step
i + 1 is added at the end of the call that finishes step i, and the first one is folded into
the initial latent (x_hat_0 = sigma_hat_0 noise, the same law as sigma_0 noise plus churn).
With S_churn = 0 `edm` is `heun` on Karras sigmas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import schedules
from jaxdiff.samplers import base, sigma as sig


@struct.dataclass
class HeunPlan:
    """Per-call arrays, each float32 [2N - 1].

    now: the level the model is evaluated at (sigma_i for a predictor, sigma_{i+1} for a corrector).
    sigma_from, sigma_to: the step's endpoints sigma_i (sigma_hat_i with churn), sigma_{i+1}.
    correct: 1.0 for a corrector call, 0.0 for a predictor call.
    churn_std: std of the noise added after the call (`edm`: the next step's churn; else 0).
    """

    now: sig.Level
    sigma_from: jax.Array
    sigma_to: jax.Array
    correct: jax.Array
    churn_std: jax.Array


@struct.dataclass
class HeunOptions:
    denoiser: sig.DenoiserOptions
    stochastic: bool = struct.field(pytree_node=False)


def heun_step(options: HeunOptions, state: base.SamplerState, x, model_output, key):
    """One Heun call (EDM Alg. 1, or Alg. 2 for `edm`; notation in the module docstring).

    Predictor (correct = 0): x = x_i; returns x_{i+1}' and stores [x_i, d_i] in memory.
    Corrector (correct = 1): x = x_{i+1}'; returns x_{i+1} from the stored x_i, d_i.
    x, model_output: [B, ...] float32; memory: [2, B, ...]. With `stochastic`, churn noise of std
    plan.churn_std from fold_in(key, index) is added to the result.
    """
    c = base.current(state.plan, state.index)
    x0 = sig.denoised(model_output, x, c.now, options.denoiser)
    d = sig.derivative(x, x0, c.now.sigma)
    x_start, d_start = state.memory[0], state.memory[1]
    predicted = sig.euler_move(x, x0, c.sigma_from, c.sigma_to)                           # line 5
    corrected = x_start + (c.sigma_to - c.sigma_from) * (0.5 * d_start + 0.5 * d)         # line 8
    is_corrector = c.correct > 0
    x_next = jnp.where(is_corrector, corrected, predicted)
    memory = jnp.where(is_corrector, state.memory, jnp.stack([x, d]))
    if options.stochastic:                                                                # Alg. 2 lines 4-6
        x_next = x_next + c.churn_std * jax.random.normal(base.step_key(key, state), x.shape, jnp.float32)
    return x_next, state._replace(index=state.index + 1, memory=memory)


def model_calls(num_steps: int, **options) -> int:
    """The model calls of a `num_steps`-step Heun or EDM plan: 2 num_steps - 1 (the last step
    is the Euler predictor alone)."""
    del options
    return 2 * int(num_steps) - 1


def _calls(num_steps):
    """Per call (2 num_steps - 1): the step it belongs to and whether it is the corrector.
    Order: predictor of step 0, then (corrector of step i - 1, predictor of step i) for i >= 1."""
    step = np.concatenate([[0], np.repeat(np.arange(1, num_steps), 2) - np.tile([1, 0], num_steps - 1)])
    correct = np.concatenate([[0.0], np.tile([1.0, 0.0], num_steps - 1)])
    return step, correct


def _host_state(ts, sigmas, num_steps, init_sigma, start_step):
    """The plan of all calls; a run that skips `start_step` steps begins at the predictor call of
    step start_step, call 2 start_step."""
    step, correct = _calls(num_steps)
    level = np.where(correct > 0, step + 1, step)                     # index into sigmas / timesteps
    plan = HeunPlan(now=sig.level(sigmas[level]), sigma_from=base.f32(sigmas[step]),
                    sigma_to=base.f32(sigmas[step + 1]), correct=base.f32(correct),
                    churn_std=base.f32(np.zeros(step.shape)))
    return base.new_state(ts[level], plan, init_sigma=init_sigma, input_scales=sig.input_scale(sigmas[level]),
                          memory=jnp.zeros((2,), jnp.float32), levels=base.ve_levels(sigmas[level]),
                          start_call=2 * base.check_start_step(start_step, num_steps))


def heun(schedule: schedules.DiscreteSchedule, num_steps: int, *, timestep_spacing: str = "linspace",
         steps_offset: int = 0, prediction_type: str = "epsilon", use_karras_sigmas: bool = False,
         clip_sample: bool = False, clip_sample_range: float = 1.0, start_step: int = 0) -> base.Sampler:
    """Heun's method over `num_steps` steps = 2 num_steps - 1 model calls (deterministic, second
    order). Options and defaults as diffusers' `HeunDiscreteScheduler`; `start_step` skips the
    first steps (img2img)."""
    ts, sigmas = sig.karras_plan(schedule, num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                                 use_karras_sigmas=use_karras_sigmas, final_sigmas_type="zero")
    state = _host_state(ts, sigmas, num_steps, sig.init_sigma(sigmas, timestep_spacing), start_step)
    options = HeunOptions(denoiser=sig.denoiser_options(prediction_type, clip_sample, clip_sample_range),
                          stochastic=False)
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.history_init),
                        step=jax.tree_util.Partial(heun_step, options))


# --------------------------------------------------------------------------------------------
# EDM Algorithm 2 (stochastic Heun).
# --------------------------------------------------------------------------------------------

@struct.dataclass
class Churn:
    """The traced knobs of EDM Alg. 2 (float32 []), and what `init` needs to re-plan with them.

    schedule: the training schedule (the timesteps of the raised levels sigma_hat).
    num_steps: float32 [], N.
    """

    s_churn: jax.Array
    s_tmin: jax.Array
    s_tmax: jax.Array
    s_noise: jax.Array
    schedule: schedules.DiscreteSchedule
    num_steps: jax.Array


def churn_gamma(churn: Churn, sigma):
    """gamma(sigma) = min(S_churn / N, sqrt(2) - 1) on [S_tmin, S_tmax], else 0 (EDM Alg. 2 line 4)."""
    inside = (churn.s_tmin <= sigma) & (sigma <= churn.s_tmax)
    return jnp.where(inside, jnp.minimum(churn.s_churn / churn.num_steps, np.sqrt(2.0) - 1.0), 0.0)


def edm_init(churn: Churn, state: base.SamplerState, noise):
    """The host plan raised to sigma_hat by the (traced) churn: predictor levels, their
    timesteps and input scales, the churn noise after each finished step, and init_sigma."""
    p = state.plan
    is_corrector = p.correct > 0
    sigma_hat = p.sigma_from * (1.0 + churn_gamma(churn, p.sigma_from))                      # line 5
    evaluated = jnp.where(is_corrector, p.sigma_to, sigma_hat)
    raised = ~is_corrector & (sigma_hat > p.sigma_from)
    timesteps = jnp.where(raised, schedules.timestep_from_sigma(churn.schedule, evaluated), state.timesteps)
    # A corrector finishes step i; the next step's churn, sqrt(sigma_hat^2 - sigma^2) S_noise, follows it.
    gamma_next = churn_gamma(churn, p.sigma_to)
    churn_std = jnp.where(is_corrector, p.sigma_to * jnp.sqrt(gamma_next * (2.0 + gamma_next)), 0.0) * churn.s_noise
    now = sig.Level(sigma=evaluated, a=sig.input_scale(evaluated), s=evaluated * sig.input_scale(evaluated))
    now = jax.tree.map(lambda new, old: jnp.where(raised, new, old), now, p.now)             # host values if unraised
    # Both calls of step i (predictor and corrector) integrate from sigma_hat_i.
    plan = p.replace(now=now, sigma_from=sigma_hat, churn_std=churn_std)
    state = state._replace(timesteps=timesteps, input_scales=now.a, init_sigma=sigma_hat[state.index], plan=plan,
                           noise_scales=evaluated)
    return base.history_init(state, noise)


def edm(schedule: schedules.DiscreteSchedule, num_steps: int, *, s_churn: float = 0.0, s_tmin: float = 0.0,
        s_tmax: float = float("inf"), s_noise: float = 1.0, use_karras_sigmas: bool = True,
        sigma_min: float | None = None, sigma_max: float | None = None, timestep_spacing: str = "linspace",
        steps_offset: int = 0, prediction_type: str = "epsilon", clip_sample: bool = False,
        clip_sample_range: float = 1.0, start_step: int = 0) -> base.Sampler:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) over `num_steps` steps =
    2 num_steps - 1 model calls, on Karras sigmas (eq. 5, rho = 7) between the schedule's levels
    (or `sigma_min` / `sigma_max`). s_churn, s_tmin, s_tmax, s_noise: the paper's S_churn, S_tmin,
    S_tmax, S_noise (names as diffusers' `step` arguments); traced, so changing them never
    recompiles. s_churn = 0 is the deterministic `heun`. `start_step` skips the first steps (img2img:
    the image is noised to that step's raised level sigma_hat)."""
    for name, value, lo in [("s_churn", s_churn, 0.0), ("s_tmin", s_tmin, 0.0), ("s_tmax", s_tmax, 0.0),
                            ("s_noise", s_noise, 0.0)]:
        base.check_range(name, value, lo, float("inf"))
    ts, sigmas = sig.karras_plan(schedule, num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                                 use_karras_sigmas=use_karras_sigmas, final_sigmas_type="zero",
                                 sigma_min=sigma_min, sigma_max=sigma_max)
    state = _host_state(ts, sigmas, num_steps, float(sigmas[0]), start_step)
    churn = Churn(s_churn=base.f32(s_churn), s_tmin=base.f32(s_tmin), s_tmax=base.f32(s_tmax),
                  s_noise=base.f32(s_noise), schedule=schedule, num_steps=base.f32(num_steps))
    options = HeunOptions(denoiser=sig.denoiser_options(prediction_type, clip_sample, clip_sample_range),
                          stochastic=True)
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(edm_init, churn),
                        step=jax.tree_util.Partial(heun_step, options))
