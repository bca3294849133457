"""Flow-matching samplers: Euler and Heun on the straight path (rectified flow, Liu et al. 2022;
Esser et al. 2024, "SD3"), and the flow-sigma plans of the multistep solvers.

The latent is the flow latent itself, x_sigma = (1 - sigma) x0 + sigma eps with sigma in [0, 1]
(`parameterization.flow_interpolate`): the network is handed x unscaled (input scale 1, and the run
starts from x = noise, init_sigma 1) at the training-scale timestep t = sigma T, and returns the
velocity v(x, sigma) ~ dx / dsigma = eps - x0. The sampling ODE is

    dx / dsigma = v(x, sigma),   from sigma_0 (~ 1, noise) down to sigma_N = 0 (data).      (*)

    paper / reference           here
    sigma_i (decreasing)        plan.sigma, plan.sigma_next (flow_euler); sigma_from, sigma_to (flow_heun)
    v_theta(x_i, t_i)           model_output
    x0_hat = x - sigma v        `parameterization.flow_x0_eps`

flow_euler (diffusers' `FlowMatchEulerDiscreteScheduler`): one Euler step of (*),
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i,
or, with `stochastic_sampling`, a jump to the next level along fresh noise,
    x_{i+1} = (1 - sigma_{i+1}) (x_i - sigma_i v_i) + sigma_{i+1} z,   z ~ N(0, I) from fold_in(key, i).

flow_heun (diffusers' `FlowMatchHeunDiscreteScheduler`): Heun's trapezoidal rule (EDM Alg. 1 in
flow coordinates), two calls per step except the last (2N - 1 calls):
    x'_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i                       predictor call
    x_{i+1}  = x_i + (sigma_{i+1} - sigma_i) (v_i + v(x'_{i+1}, sigma_{i+1})) / 2   corrector call

Plans (`euler_plan`) follow the reference: N levels spaced linearly in t between the schedule's
extreme training levels, then shifted (`shift`, or `mu` with dynamic shifting), optionally stretched
to `shift_terminal`, optionally respaced (Karras, exponential or beta sigmas), computed in float64 on
the host and rounded to float32 as there. DPM-Solver++ and UniPC take their flow plans from
`multistep_plan` (each reference spaces them its own way) and their coordinates from
`coordinates`: alpha = 1 - sigma, sigma, lambda = log(alpha / sigma).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import parameterization, schedules
from jaxdiff.samplers import base
from jaxdiff.samplers import sigma as sig

# --------------------------------------------------------------------------------------------
# Host-side plans (float64 numpy, rounded to float32 where the reference rounds).
# --------------------------------------------------------------------------------------------

def _round32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32).astype(np.float64)


def _num_train_timesteps(schedule) -> int:
    if not isinstance(schedule, (schedules.FlowSchedule, schedules.DiscreteSchedule)):
        raise TypeError(f"flow samplers need a schedules.FlowSchedule (or a DiscreteSchedule for its "
                         f"num_train_timesteps), got {type(schedule).__name__}")
    return schedule.num_train_timesteps


def resolve_shift(schedule, shift, mu, use_dynamic_shifting=None):
    """(shift, mu, dynamic): the sampler's options, defaulting to the schedule's. Dynamic shifting
    needs `mu` (pipelines compute it with `schedules.flow_mu`)."""
    is_flow = isinstance(schedule, schedules.FlowSchedule)
    if shift is None:
        shift = schedule.shift if is_flow else 1.0
    if use_dynamic_shifting is None:
        use_dynamic_shifting = schedule.use_dynamic_shifting if is_flow else False
    base.check_choice("use_dynamic_shifting", use_dynamic_shifting, (True, False))
    if not float(shift) > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if use_dynamic_shifting and mu is None:
        raise ValueError("mu must be given when use_dynamic_shifting is on (schedules.flow_mu(schedule, "
                         "image_seq_len) computes it)")
    return float(shift), (None if mu is None else float(mu)), bool(use_dynamic_shifting)


def stretch_to_terminal(sigmas, shift_terminal: float):
    """Stretch 1 - sigma so that the last level is `shift_terminal` (LTX-Video's rule, as the
    reference's `stretch_shift_to_terminal`)."""
    one_minus = 1.0 - np.asarray(sigmas, np.float64)
    return 1.0 - one_minus / (one_minus[-1] / (1.0 - shift_terminal))


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """N levels evenly spaced in log-sigma from sigma_max to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """N levels at the quantiles 1 - i / (N - 1) of a Beta(alpha, beta) law mapped onto
    [sigma_min, sigma_max] (Lee et al. 2024, "Beta sampling is all you need")."""
    from scipy import stats
    return sigma_min + stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, num_steps), alpha, beta) * (sigma_max - sigma_min)


SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def respace(sigmas, spacing: dict) -> np.ndarray:
    """The levels respaced between their extremes by the one spacing option that is on (if any)."""
    chosen = [name for name in SPACINGS if spacing.get(name)]
    for name in SPACINGS:
        base.check_choice(name, spacing.get(name, False), (True, False))
    if len(chosen) > 1:
        raise ValueError(f"only one of {', '.join(SPACINGS)} may be on, got {', '.join(chosen)}")
    if not chosen:
        return sigmas
    lo, hi, n = float(sigmas[-1]), float(sigmas[0]), len(sigmas)
    if chosen[0] == "use_karras_sigmas":
        return sig.karras_sigmas(lo, hi, n)
    if chosen[0] == "use_exponential_sigmas":
        return exponential_sigmas(lo, hi, n)
    return beta_sigmas(lo, hi, n)


def euler_plan(schedule, num_steps: int, *, shift=None, use_dynamic_shifting=None, mu=None,
               shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
               invert_sigmas=False, sigmas=None):
    """(timesteps [N], sigmas [N + 1]) float64 of `flow_euler` / `flow_heun`, as the reference's
    `set_timesteps`: sigmas[N] = 0 (1 with `invert_sigmas`), timesteps = sigma T."""
    T = _num_train_timesteps(schedule)
    shift, mu, dynamic = resolve_shift(schedule, shift, mu, use_dynamic_shifting)
    base.check_choice("invert_sigmas", invert_sigmas, (True, False))
    if sigmas is None:
        base.check_num_steps(num_steps, T)
        unit = np.arange(1, T + 1, dtype=np.float64) / T
        train = _round32(unit if dynamic else schedules.shift_sigmas(unit, shift))     # [T] increasing
        levels = np.linspace(train[-1] * T, train[0] * T, num_steps) / T
    else:
        levels = _round32(np.asarray(sigmas, np.float64).reshape(-1))
        if levels.shape[0] != num_steps:
            raise ValueError(f"sigmas has {levels.shape[0]} entries but num_steps={num_steps}; they must match")
    if dynamic:
        time_shift_type = schedule.time_shift_type if isinstance(schedule, schedules.FlowSchedule) else "exponential"
        levels = schedules.time_shift(levels, mu, time_shift_type)
    else:
        levels = schedules.shift_sigmas(levels, shift)
    if shift_terminal:
        levels = stretch_to_terminal(levels, float(shift_terminal))
    levels = _round32(respace(levels, {"use_karras_sigmas": use_karras_sigmas,
                                           "use_exponential_sigmas": use_exponential_sigmas,
                                           "use_beta_sigmas": use_beta_sigmas}))
    if invert_sigmas:
        levels = _round32(1.0 - levels)
    timesteps = _round32(levels * T)
    return timesteps, np.append(levels, 1.0 if invert_sigmas else 0.0)


def flow_mode(schedule, use_flow_sigmas) -> bool:
    """Whether a multistep solver runs on flow sigmas: on for a FlowSchedule, else `use_flow_sigmas`."""
    is_flow = isinstance(schedule, schedules.FlowSchedule)
    if use_flow_sigmas is None:
        return is_flow
    base.check_choice("use_flow_sigmas", use_flow_sigmas, (True, False))
    if is_flow and not use_flow_sigmas:
        raise ValueError("use_flow_sigmas=False needs a DiscreteSchedule; a FlowSchedule always samples on flow sigmas")
    return bool(use_flow_sigmas)


def multistep_plan(schedule, num_steps: int, *, family: str, flow_shift=None, mu=None, shift_terminal=None,
                   sigmas=None, final_sigmas_type: str = "zero", use_karras_sigmas: bool = False):
    """(timesteps [N], sigmas [N + 1]) float64 of DPM-Solver++ (family "dpm") or UniPC ("unipc") with
    flow sigmas, as the references compute them:

    dpm:   sigma_i = shift(1 - alpha_i), alpha = linspace(1, 1 / T, N + 1), reversed, the 0 dropped;
    unipc: sigma_i = shift(linspace(1, 1 / T, N + 1)[:N]) (or `sigmas`), stretched to
           `shift_terminal`, the first level nudged to 1 - 1e-6 (so lambda stays finite);
    shift = flow_shift (default: the schedule's shift), or the time shift by `mu` when dynamic.
    The network's timesteps are the integer part of sigma T (the references cast them to int64);
    sigmas are rounded to float32, and sigmas[N] is 0 or, for UniPC's "sigma_min", sigmas[N - 1].
    """
    T = _num_train_timesteps(schedule)
    if use_karras_sigmas:
        raise ValueError("use_karras_sigmas cannot be combined with flow sigmas here (the reference then "
                         "respaces the DDPM schedule's sigmas); use a flow sampler's spacing options instead")
    base.check_choice("final_sigmas_type", final_sigmas_type, sig.FINAL_SIGMAS_TYPES)
    flow_shift, mu, dynamic = resolve_shift(schedule, flow_shift, mu)
    base.check_num_steps(num_steps, T)
    if family == "dpm":
        if final_sigmas_type != "zero":
            raise ValueError("DPM-Solver++ on flow sigmas supports final_sigmas_type='zero' only")
        if shift_terminal or sigmas is not None:
            raise ValueError("DPM-Solver++ on flow sigmas takes neither shift_terminal nor custom sigmas")
        levels = (1.0 - np.linspace(1.0, 1.0 / T, num_steps + 1))[::-1][:-1]
    elif sigmas is not None:
        levels = np.asarray(sigmas, np.float64).reshape(-1)
        if levels.shape[0] != num_steps:
            raise ValueError(f"sigmas has {levels.shape[0]} entries but num_steps={num_steps}; they must match")
    else:
        levels = np.linspace(1.0, 1.0 / T, num_steps + 1)[:-1]
    if mu is not None:
        time_shift_type = schedule.time_shift_type if isinstance(schedule, schedules.FlowSchedule) else "exponential"
        levels = schedules.time_shift(levels, mu, time_shift_type)
    else:
        levels = schedules.shift_sigmas(levels, flow_shift)
    if family == "unipc":
        if shift_terminal:
            levels = stretch_to_terminal(levels, float(shift_terminal))
        levels = levels.copy()
        if abs(levels[0] - 1.0) < 1e-6:
            levels[0] -= 1e-6
    del dynamic
    timesteps = np.floor(levels * T)
    last = 0.0 if final_sigmas_type == "zero" else levels[-1]
    return timesteps, _round32(np.append(levels, last))


def coordinates(sigmas):
    """(alpha, sigma, lambda) float64 of flow levels: alpha = 1 - sigma, lambda = log(alpha / sigma)
    (+inf at sigma = 0): the flow path is x = alpha x0 + sigma eps, so the exponential integrators
    apply unchanged."""
    sigmas = np.asarray(sigmas, np.float64)
    alpha = 1.0 - sigmas
    with np.errstate(divide="ignore"):
        return alpha, sigmas, np.log(alpha) - np.log(sigmas)


def flow_levels(sigmas):
    """(signal, noise) scales of flow levels: 1 - sigma, sigma (img2img through the driver)."""
    sigmas = np.asarray(sigmas, np.float64)
    return 1.0 - sigmas, sigmas


# --------------------------------------------------------------------------------------------
# Euler.
# --------------------------------------------------------------------------------------------

@struct.dataclass
class FlowEulerPlan:
    """Per-call arrays, float32 [N]: sigma_i (where x is) and sigma_{i+1} (where it goes)."""

    sigma: jax.Array
    sigma_next: jax.Array


@struct.dataclass
class FlowEulerOptions:
    stochastic: bool = struct.field(pytree_node=False)


def flow_euler_step(options: FlowEulerOptions, state: base.SamplerState, x, model_output, key):
    """One flow Euler step (module docstring). x: x_i [B, ...]; model_output: v at (x_i, t_i)."""
    c = base.current(state.plan, state.index)
    if options.stochastic:
        x0, _ = parameterization.flow_x0_eps(model_output, x, c.sigma)
        z = jax.random.normal(base.step_key(key, state), x.shape, jnp.float32)
        x_next = (1.0 - c.sigma_next) * x0 + c.sigma_next * z
    else:
        x_next = x + (c.sigma_next - c.sigma) * model_output
    return x_next, state._replace(index=state.index + 1)


def flow_euler(schedule: schedules.FlowSchedule, num_steps: int, *, shift: float | None = None,
               use_dynamic_shifting: bool | None = None, mu: float | None = None,
               shift_terminal: float | None = None, use_karras_sigmas: bool = False,
               use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, invert_sigmas: bool = False,
               stochastic_sampling: bool = False, sigmas=None, start_step: int = 0) -> base.Sampler:
    """Euler on the flow ODE over `num_steps` model calls: diffusers' `FlowMatchEulerDiscreteScheduler`.

    shift, use_dynamic_shifting: default to the schedule's; `mu` is required when dynamic (the
    time-shift type is the schedule's). sigmas: custom levels [num_steps] (before shifting, as the
    reference's `set_timesteps(sigmas=...)`). stochastic_sampling: re-noise at every step (noise from
    fold_in(key, i)). start_step: skip the first steps (img2img, the image noised to that level).
    """
    base.check_choice("stochastic_sampling", stochastic_sampling, (True, False))
    ts, levels = euler_plan(schedule, num_steps, shift=shift, use_dynamic_shifting=use_dynamic_shifting, mu=mu,
                            shift_terminal=shift_terminal, use_karras_sigmas=use_karras_sigmas,
                            use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
                            invert_sigmas=invert_sigmas, sigmas=sigmas)
    plan = FlowEulerPlan(sigma=base.f32(levels[:-1]), sigma_next=base.f32(levels[1:]))
    state = base.new_state(ts, plan, levels=flow_levels(levels[:-1]),
                           start_call=base.check_start_step(start_step, num_steps))
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.constant_init),
                        step=jax.tree_util.Partial(flow_euler_step, FlowEulerOptions(stochastic=bool(stochastic_sampling))))


# --------------------------------------------------------------------------------------------
# Heun.
# --------------------------------------------------------------------------------------------

@struct.dataclass
class FlowHeunPlan:
    """Per-call arrays, float32 [2N - 1]: the step's endpoints sigma_i, sigma_{i+1}, and 1.0 for a
    corrector call (0.0 for a predictor)."""

    sigma_from: jax.Array
    sigma_to: jax.Array
    correct: jax.Array


def flow_heun_step(state: base.SamplerState, x, model_output, key):
    """One flow Heun call (module docstring). Predictor: x = x_i, stores [x_i, v_i] in memory
    [2, B, ...] and returns x'_{i+1}. Corrector: x = x'_{i+1}, returns x_{i+1}."""
    del key
    c = base.current(state.plan, state.index)
    dt = c.sigma_to - c.sigma_from
    x_start, v_start = state.memory[0], state.memory[1]
    predicted = x + dt * model_output
    corrected = x_start + dt * (0.5 * v_start + 0.5 * model_output)
    is_corrector = c.correct > 0
    x_next = jnp.where(is_corrector, corrected, predicted)
    memory = jnp.where(is_corrector, state.memory, jnp.stack([x, model_output]))
    return x_next, state._replace(index=state.index + 1, memory=memory)


def heun_model_calls(num_steps: int, **options) -> int:
    """2 num_steps - 1: the last step is the Euler predictor alone."""
    del options
    return 2 * int(num_steps) - 1


def flow_heun(schedule: schedules.FlowSchedule, num_steps: int, *, shift: float | None = None,
              start_step: int = 0) -> base.Sampler:
    """Heun on the flow ODE over `num_steps` steps = 2 num_steps - 1 model calls: diffusers'
    `FlowMatchHeunDiscreteScheduler` (shift defaults to the schedule's). start_step: skip the first
    steps (img2img)."""
    ts, levels = euler_plan(schedule, num_steps, shift=shift, use_dynamic_shifting=False)
    n = int(num_steps)
    step = np.concatenate([[0], np.repeat(np.arange(1, n), 2) - np.tile([1, 0], n - 1)]).astype(np.int64)
    correct = np.concatenate([[0.0], np.tile([1.0, 0.0], n - 1)])
    at = np.where(correct > 0, step + 1, step)                       # the level each call is evaluated at
    plan = FlowHeunPlan(sigma_from=base.f32(levels[step]), sigma_to=base.f32(levels[step + 1]),
                        correct=base.f32(correct))
    state = base.new_state(ts[at], plan, memory=jnp.zeros((2,), jnp.float32), levels=flow_levels(levels[at]),
                           start_call=2 * base.check_start_step(start_step, num_steps))
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.history_init),
                        step=jax.tree_util.Partial(flow_heun_step))
