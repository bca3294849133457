"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++"), ODE and SDE variants.

Work in the variance-preserving latent x_t with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
and the half log-SNR lambda_t = log(alpha_t / sigma_t). The network's data prediction
x0_theta(x_t, t) is integrated exactly in lambda except for a polynomial (in lambda) through
the last k predictions. For step i from level s = s_0 (earlier levels s_1, s_2) to level t:

    paper                                   here
    h_i = lambda_t - lambda_s0               h
    r_0 = h_{i-1} / h_i, r_1 = h_{i-2} / h_i  r0, r1 (ratios of earlier step sizes)
    x0_theta(x_s0), (..s1), (..s2)          m0, m1, m2 = memory[0], memory[1], memory[2]
    D0, D1, D2                              the backward differences below

    first order (DDIM written with the data prediction; DPM-Solver++ sec. 4):
        x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) m0
    second order multistep (DPM-Solver++(2M), Alg. 2), D1 = (m0 - m1) / r0:
        x_t += alpha_t (1 - e^{-h}) / 2 D1                             ("midpoint")
        x_t += alpha_t (1 - (1 - e^{-h}) / h) D1                         ("heun")
    third order multistep: D1, D2 from the divided differences of m0, m1, m2, and
        x_t += alpha_t (1 - (1 - e^{-h}) / h) D1 - alpha_t ((h - 1 + e^{-h}) / h^2 - 1/2) D2.

The SDE variant (SDE-DPM-Solver++, the same paper's solver for the diffusion SDE) has
    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) m0 + (order terms)
          + sigma_t sqrt(1 - e^{-2h}) z,   z ~ N(0, I) from fold_in(key, i),
with D1 weighted by alpha_t (1 - e^{-2h}) / 2 (midpoint) or alpha_t (1 - (1 - e^{-2h}) / (2h))
(heun), and D2 by alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2).

Every update is linear in (x_s, m0, m1, m2, z), so the host computes per step, in float64, the
coefficients A, B [K], C of  x_t = A x_s + sum_j B_j m_j + C z  (the order used at each step, the
warm-up at the first steps and `lower_order_final` included); the traced step is one line, and
the history is a fixed-size buffer [K, B, ...] of x0 predictions in `state.memory`.

Plans follow diffusers' `DPMSolverMultistepScheduler` (its own timestep spacings, Karras sigmas
with rounded timesteps, `final_sigmas_type`, `lower_order_final`, `euler_at_final`). The model is
handed x_t unscaled (input scale 1, init_sigma 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import schedules
from jaxdiff.samplers import base, sigma as sig

SOLVER_TYPES = ("midpoint", "heun")


@struct.dataclass
class DPMPlan:
    """Per-call arrays (N = num_steps, K = solver_order).

    a, s: float32 [N], alpha_s, sigma_s of the level x is at (to read the prediction).
    coef_x: float32 [N], A; coef_hist: float32 [N, K], B; coef_noise: float32 [N], C.
    """

    a: jax.Array
    s: jax.Array
    coef_x: jax.Array
    coef_hist: jax.Array
    coef_noise: jax.Array


@struct.dataclass
class DPMOptions:
    denoise: base.DenoiseOptions
    stochastic: bool = struct.field(pytree_node=False)


def dpm_solver_step(options: DPMOptions, state: base.SamplerState, x, model_output, key):
    """One multistep DPM-Solver++ update x_s -> x_t (notation in the module docstring).

    x: x_s [B, ...] float32 (VP latent). model_output: the network at (x_s, s) [B, ...].
    memory: [K, B, ...] the previous x0 predictions (newest first); the new one is pushed in.
    Returns (x_t [B, ...], state with index + 1 and the updated history).
    """
    c = base.current(state.plan, state.index)
    x0, _ = base.denoise(model_output, x, c.a, c.s, options.denoise)                   # m0
    history = base.push_history(state.memory, x0)                                       # [K, B, ...]
    x_next = c.coef_x * x + base.combine(c.coef_hist, history)
    if options.stochastic:
        x_next = x_next + c.coef_noise * jax.random.normal(base.step_key(key, state), x.shape, jnp.float32)
    return x_next, state._replace(index=state.index + 1, memory=history)


# --------------------------------------------------------------------------------------------
# Host-side plan.
# --------------------------------------------------------------------------------------------

def _orders(num_steps, solver_order, lower_order_final, euler_at_final, final_zero, start=0):
    """The order used at each step: warm-up (step i of a run starting at step `start` uses at most
    i - start + 1 predictions), and the lower orders at the end (for stability with few steps, and
    always first order onto sigma = 0). Steps before `start` are not taken (order 1 placeholders)."""
    orders = np.clip(np.arange(num_steps) - start + 1, 1, solver_order)
    few = lower_order_final and num_steps < 15
    if euler_at_final or few or final_zero:
        orders[-1] = 1
    if few and num_steps >= 2:
        orders[-2] = min(orders[-2], 2)
    return orders


def _coefficients(lam, alpha, s_vp, i, order, K, stochastic, solver_type):
    """(A, B [K], C) of step i (from level i to i + 1) at the given order, float64."""
    h = lam[i + 1] - lam[i]
    a_t, s_t = alpha[i + 1], s_vp[i + 1]
    B = np.zeros(K)
    if stochastic:
        A = s_t / s_vp[i] * np.exp(-h)
        phi = -np.expm1(-2.0 * h)                                  # 1 - e^{-2h}
        C = s_t * np.sqrt(phi)
        w0 = a_t * phi
        w1 = 0.5 * w0 if solver_type == "midpoint" else a_t * (1.0 - phi / (2.0 * h))
        w1_3 = a_t * (1.0 - phi / (2.0 * h))
        w2 = a_t * ((phi - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    else:
        A = s_t / s_vp[i]
        phi = -np.expm1(-h)                                        # 1 - e^{-h}
        C = 0.0
        w0 = a_t * phi
        w1 = 0.5 * w0 if solver_type == "midpoint" else a_t * (1.0 - phi / h)
        w1_3 = a_t * (1.0 - phi / h)
        w2 = -a_t * ((h - phi) / h ** 2 - 0.5)
    B[0] = w0                                                      # D0 = m0
    if order >= 2:
        r0 = (lam[i] - lam[i - 1]) / h
        d1_0 = np.zeros(K)
        d1_0[:2] = [1.0 / r0, -1.0 / r0]                           # (m0 - m1) / r0
        if order == 2:
            B += w1 * d1_0
        else:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = np.zeros(K)
            d1_1[1:3] = [1.0 / r1, -1.0 / r1]                      # (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            B += w1_3 * d1 + w2 * d2
    return A, B, C


def dpm_solver(schedule: schedules.DiscreteSchedule, num_steps: int, *, stochastic: bool, solver_order: int,
               solver_type: str, lower_order_final: bool, euler_at_final: bool, use_karras_sigmas: bool,
               final_sigmas_type: str, timestep_spacing: str, steps_offset: int, prediction_type: str,
               thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float,
               start_step: int = 0) -> base.Sampler:
    """A DPM-Solver++ sampler (the registered names fix `stochastic` and default `solver_order`).
    start_step: skip the first steps (img2img); the multistep history warms up again from there,
    as the reference does after `set_begin_index`."""
    base.check_choice("solver_order", solver_order, (1, 2, 3))
    base.check_choice("solver_type", solver_type, SOLVER_TYPES)
    for name, value in [("lower_order_final", lower_order_final), ("euler_at_final", euler_at_final)]:
        base.check_choice(name, value, (True, False))
    ts, sigmas = sig.multistep_plan(schedule, num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                                    use_karras_sigmas=use_karras_sigmas, final_sigmas_type=final_sigmas_type)
    alpha, s_vp, lam = sig.vp_coordinates(sigmas)
    K = solver_order
    start = base.check_start_step(start_step, num_steps)
    orders = _orders(num_steps, K, lower_order_final, euler_at_final, final_sigmas_type == "zero", start)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        coefs = [_coefficients(lam, alpha, s_vp, i, int(orders[i]), K, stochastic, solver_type)
                 for i in range(num_steps)]
    A, B, C = (np.array(v, np.float64) for v in zip(*coefs))
    plan = DPMPlan(a=base.f32(alpha[:-1]), s=base.f32(s_vp[:-1]), coef_x=base.f32(A), coef_hist=base.f32(B),
                   coef_noise=base.f32(C))
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(B)) and np.all(np.isfinite(C))):
        raise ValueError("the DPM-Solver plan has non-finite coefficients (repeated noise levels?); "
                         "use fewer steps or another timestep_spacing")
    state = base.new_state(ts, plan, memory=jnp.zeros((K,), jnp.float32), levels=(alpha[:-1], s_vp[:-1]),
                           start_call=start)
    options = DPMOptions(denoise=base.denoise_options(prediction_type=prediction_type, clip_sample=False,
                                                      clip_sample_range=1.0, thresholding=thresholding,
                                                      dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                                      sample_max_value=sample_max_value),
                         stochastic=stochastic)
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.history_init),
                        step=jax.tree_util.Partial(dpm_solver_step, options))


def _factory(stochastic: bool, default_order: int):
    def factory(schedule: schedules.DiscreteSchedule, num_steps: int, *, solver_order: int = default_order,
                solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                use_karras_sigmas: bool = False, final_sigmas_type: str = "zero",
                timestep_spacing: str = "linspace", steps_offset: int = 0, prediction_type: str = "epsilon",
                thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                sample_max_value: float = 1.0, start_step: int = 0) -> base.Sampler:
        return dpm_solver(schedule, num_steps, stochastic=stochastic, solver_order=solver_order,
                          solver_type=solver_type, lower_order_final=lower_order_final,
                          euler_at_final=euler_at_final, use_karras_sigmas=use_karras_sigmas,
                          final_sigmas_type=final_sigmas_type, timestep_spacing=timestep_spacing,
                          steps_offset=steps_offset, prediction_type=prediction_type, thresholding=thresholding,
                          dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                          start_step=start_step)
    return factory


dpmpp_2m = _factory(stochastic=False, default_order=2)
dpmpp_2m.__name__ = dpmpp_2m.__qualname__ = "dpmpp_2m"
dpmpp_2m.__doc__ = """DPM-Solver++(2M) (deterministic; `solver_order` 1, 2 or 3). Options and defaults as
    diffusers' `DPMSolverMultistepScheduler` with algorithm_type="dpmsolver++"."""

dpmpp_2m_sde = _factory(stochastic=True, default_order=2)
dpmpp_2m_sde.__name__ = dpmpp_2m_sde.__qualname__ = "dpmpp_2m_sde"
dpmpp_2m_sde.__doc__ = """SDE-DPM-Solver++(2M) (stochastic; noise from fold_in(key, i)). Options and defaults
    as diffusers' `DPMSolverMultistepScheduler` with algorithm_type="sde-dpmsolver++"."""

dpmpp_3m_sde = _factory(stochastic=True, default_order=3)
dpmpp_3m_sde.__name__ = dpmpp_3m_sde.__qualname__ = "dpmpp_3m_sde"
dpmpp_3m_sde.__doc__ = """SDE-DPM-Solver++(3M): `dpmpp_2m_sde` with solver_order=3 by default."""
