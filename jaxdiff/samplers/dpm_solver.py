"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++", arXiv 2211.01095), ODE and SDE.

The latent is the variance-preserving x_t = alpha_t x0 + sigma_t eps (alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t)), the clock is the half log-SNR lambda_t = log(alpha_t / sigma_t), and
the network is read as a data predictor x_theta(x_t, t) (DPM-Solver++ integrates the data
prediction, which keeps guided sampling stable). From level s to level t, h = lambda_t - lambda_s, the
exact solutions with the data prediction are

    ODE:             x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^l x_theta(l) dl
    SDE:             x_t = (sigma_t / sigma_s) e^{-h} x_s + 2 alpha_t int_{lambda_s}^{lambda_t} e^{-2 (lambda_t - l)}
                           x_theta(l) dl + sigma_t sqrt(1 - e^{-2h}) z,        z ~ N(0, I)

(the SDE is the diffusion SDE in the same variables; its solver is SDE-DPM-Solver++). Put x_theta's
Taylor polynomial in lambda around lambda_s into either integral and integrate exactly:

    alpha_t [ w0 x_theta + H phi_2(-H) h x_theta' + 2 H phi_3(-H) (h^2 / 2) x_theta'' + ... ],
    H = h (ODE) or 2 h (SDE),   w0 = H phi_1(-H) = 1 - e^{-H},
    phi_1(z) = (e^z - 1) / z,   phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z      (exponential-integrator functions)

A multistep solver estimates the derivatives from the predictions of the previous steps.

    paper                                here
    alpha_t, sigma_t, lambda_t           alpha, sigma, lam (host float64, one entry per level)
    t_{i-1} -> t_i (one step)            level i -> i + 1
    h_i = lambda_{t_i} - lambda_{t_{i-1}}  h;  H = h (ODE) or 2 h (SDE)
    r_i = h_{i-1} / h_i (Alg. 2)         r0;  r1 = h_{i-2} / h_i (third order)
    x_theta(x~_{t_{i-1-j}}, t_{i-1-j})   m_j = state.memory[j], newest first (m0: this call's)
    D_i of Alg. 2                        D0 + D1 / 2 (see "midpoint" below)
    -(e^{-h_i} - 1) = 1 - e^{-h_i}       w0
    phi_k(-H) (scaled: H phi_k(-H))      `exponential_weights(H)`

Backward differences (`differences`), all linear in m0, m1, m2:

    D0 = m0
    D1 = (m0 - m1) / r0                                        ~ h x_theta'     (second order)
    D1_0 = (m0 - m1) / r0,  D1_1 = (m1 - m2) / r1              (third order)
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1)                   ~ h x_theta'     (extrapolated to lambda_s)
    D2 = (D1_0 - D1_1) / (r0 + r1)                             ~ h^2 x_theta'' / 2

The update (`step_coefficients`), with decay = sigma_t / sigma_s (ODE) or (sigma_t / sigma_s) e^{-h} (SDE):

    order 1:  x_t = decay x_s + alpha_t w0 D0 [+ sigma_t sqrt(1 - e^{-2h}) z]        (the ODE's is DDIM)
    order 2:  ... + alpha_t w1 D1,  w1 = w0 / 2 ("midpoint": Alg. 2, whose D_i = (1 + 1/(2 r_i)) m0
              - 1/(2 r_i) m1 = D0 + D1 / 2), or w1 = H phi_2(-H) ("heun": the Taylor weight)
    order 3:  ... + alpha_t H phi_2(-H) D1 + alpha_t w2 D2

w2 is the reference implementation's (diffusers' `DPMSolverMultistepScheduler`, which the parity
tests pin): H phi_3(-H) for the ODE, as in the DPM-Solver code it follows, and H phi_3(-H) - 1 for
the SDE. Neither is the Taylor weight 2 H phi_3(-H) above, so the third-order update integrates a
data prediction exactly only up to linear in lambda: the local error of its drift is O(h^3) for the
ODE (the second-order methods' order, with a smaller constant) and O(h^2) for the SDE.

Every update is linear in (x_s, m0, m1, m2, z), so the host computes per step, in float64, the
coefficients A, B [K], C of  x_t = A x_s + sum_j B_j m_j + C z  (the order used at each step, the
warm-up at the first steps and `lower_order_final` included); the traced step is one line, and
the history is a fixed-size buffer [K, B, ...] of x0 predictions in `state.memory`.

Plans follow diffusers' `DPMSolverMultistepScheduler` (its own timestep spacings, Karras sigmas
with rounded timesteps, `final_sigmas_type`, `lower_order_final`, `euler_at_final`). The model is
handed x_t unscaled (input scale 1, init_sigma 1).

Flow mode (a `schedules.FlowSchedule`, or `use_flow_sigmas=True`, as the reference's option): the
latent is the flow latent x = (1 - sigma) x0 + sigma eps, i.e. alpha = 1 - sigma and sigma = sigma in
everything above (lambda = log((1 - sigma) / sigma)); the solver is unchanged, only the plan
(`flow.multistep_plan`) and the reading of a velocity prediction (x0 = x - sigma v) differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.samplers import base, flow, sigma as sig

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


def exponential_weights(H):
    """(H phi_1(-H), H phi_2(-H), H phi_3(-H)) float64, relative to alpha_t: the weights of D0 and
    of D1 ~ h x_theta' in the exactly integrated Taylor polynomial, and half that of D2 ~ h^2
    x_theta'' / 2 (module docstring). Written from 1 - e^{-H} by the phi recurrence, so H = inf (a
    step onto sigma = 0) gives 1, 1, 1/2."""
    w0 = -np.expm1(-H)                          # H phi_1(-H) = 1 - e^{-H}
    h_phi_2 = 1.0 - w0 / H                      # H phi_2(-H) = H (phi_1(-H) - 1) / (-H)
    h_phi_3 = 0.5 - h_phi_2 / H                 # H phi_3(-H) = H (phi_2(-H) - 1/2) / (-H)
    return w0, h_phi_2, h_phi_3


def differences(lam, i: int, order: int, num_slots: int):
    """D0, D1, D2 of the step from level i to i + 1, each as weights [K] over the stored
    predictions m_0 .. m_{K-1} (newest first); zeros where `order` does not use them. lam: the
    levels' lambda, float64 [N + 1]."""
    m = np.eye(num_slots)                                                # m[j] picks m_j
    zero = np.zeros(num_slots)
    h = lam[i + 1] - lam[i]
    if order == 1:
        return m[0], zero, zero
    r0 = (lam[i] - lam[i - 1]) / h                                       # h_{i-1} / h_i
    d1_0 = (m[0] - m[1]) / r0
    if order == 2:
        return m[0], d1_0, zero
    r1 = (lam[i - 1] - lam[i - 2]) / h                                   # h_{i-2} / h_i
    d1_1 = (m[1] - m[2]) / r1
    return m[0], d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


def step_coefficients(lam, alpha, sigma, i: int, order: int, num_slots: int, *, stochastic: bool,
                      solver_type: str):
    """(A, B [K], C) float64 of the step from level i to level i + 1 at `order`:
    x_{i+1} = A x_i + sum_j B_j m_j + C z (module docstring). lam, alpha, sigma: float64 [N + 1]."""
    h = lam[i + 1] - lam[i]
    H = 2.0 * h if stochastic else h
    w0, h_phi_2, h_phi_3 = exponential_weights(H)
    if order == 1:
        w1, w2 = 0.0, 0.0
    elif order == 2:
        w1, w2 = (0.5 * w0 if solver_type == "midpoint" else h_phi_2), 0.0
    else:
        w1, w2 = h_phi_2, h_phi_3 - (1.0 if stochastic else 0.0)
    d0, d1, d2 = differences(lam, i, order, num_slots)
    if stochastic:
        A = sigma[i + 1] / sigma[i] * np.exp(-h)
        C = sigma[i + 1] * np.sqrt(-np.expm1(-2.0 * h))                      # sigma_t sqrt(1 - e^{-2h})
    else:
        A, C = sigma[i + 1] / sigma[i], 0.0
    return A, alpha[i + 1] * (w0 * d0 + w1 * d1 + w2 * d2), C


def dpm_solver(schedule, num_steps: int, *, stochastic: bool, solver_order: int,
               solver_type: str, lower_order_final: bool, euler_at_final: bool, use_karras_sigmas: bool,
               final_sigmas_type: str, timestep_spacing: str, steps_offset: int, prediction_type: str,
               thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float,
               use_flow_sigmas: bool | None = None, flow_shift: float | None = None, mu: float | None = None,
               start_step: int = 0) -> base.Sampler:
    """A DPM-Solver++ sampler (the registered names fix `stochastic` and default `solver_order`).
    start_step: skip the first steps (img2img); the multistep history warms up again from there,
    as the reference does after `set_begin_index`.

    Flow sigmas (on for a `schedules.FlowSchedule`, or `use_flow_sigmas=True` over a discrete one):
    the levels are flow levels x = (1 - sigma) x0 + sigma eps, planned as the reference with
    use_flow_sigmas=True (`flow.multistep_plan`, shift `flow_shift`, default the schedule's, or
    e^mu given `mu`), alpha = 1 - sigma, and the network, handed x at t = floor(sigma T), may return
    the velocity (prediction_type="flow_prediction")."""
    base.check_choice("solver_order", solver_order, (1, 2, 3))
    base.check_choice("solver_type", solver_type, SOLVER_TYPES)
    for name, value in [("lower_order_final", lower_order_final), ("euler_at_final", euler_at_final)]:
        base.check_choice(name, value, (True, False))
    on_flow = flow.flow_mode(schedule, use_flow_sigmas)
    if on_flow:
        ts, sigmas = flow.multistep_plan(schedule, num_steps, family="dpm", flow_shift=flow_shift, mu=mu,
                                         final_sigmas_type=final_sigmas_type, use_karras_sigmas=use_karras_sigmas)
        alpha, s_vp, lam = flow.coordinates(sigmas)
    else:
        ts, sigmas = sig.multistep_plan(schedule, num_steps, timestep_spacing=timestep_spacing,
                                        steps_offset=steps_offset, use_karras_sigmas=use_karras_sigmas,
                                        final_sigmas_type=final_sigmas_type)
        alpha, s_vp, lam = sig.vp_coordinates(sigmas)
    K = solver_order
    start = base.check_start_step(start_step, num_steps)
    orders = _orders(num_steps, K, lower_order_final, euler_at_final, final_sigmas_type == "zero", start)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        coefs = [step_coefficients(lam, alpha, s_vp, i, int(orders[i]), K, stochastic=stochastic,
                                   solver_type=solver_type) for i in range(num_steps)]
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
                                                      sample_max_value=sample_max_value, flow=on_flow),
                         stochastic=stochastic)
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.history_init),
                        step=jax.tree_util.Partial(dpm_solver_step, options))


def _factory(stochastic: bool, default_order: int):
    def factory(schedule, num_steps: int, *, solver_order: int = default_order,
                solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                use_karras_sigmas: bool = False, final_sigmas_type: str = "zero",
                timestep_spacing: str = "linspace", steps_offset: int = 0, prediction_type: str = "epsilon",
                thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                sample_max_value: float = 1.0, use_flow_sigmas: bool | None = None, flow_shift: float | None = None,
                mu: float | None = None, start_step: int = 0) -> base.Sampler:
        return dpm_solver(schedule, num_steps, stochastic=stochastic, solver_order=solver_order,
                          solver_type=solver_type, lower_order_final=lower_order_final,
                          euler_at_final=euler_at_final, use_karras_sigmas=use_karras_sigmas,
                          final_sigmas_type=final_sigmas_type, timestep_spacing=timestep_spacing,
                          steps_offset=steps_offset, prediction_type=prediction_type, thresholding=thresholding,
                          dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                          use_flow_sigmas=use_flow_sigmas, flow_shift=flow_shift, mu=mu, start_step=start_step)
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
