"""UniPC: unified predictor-corrector multistep sampler (Zhao et al. 2023), data-prediction form.

VP latent x_t, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t),
and m_i = x0_theta(x_i, t_i) the network's data prediction at level i. With h = lambda_t - lambda_s0
and hh = -h (the data-prediction sign):

    paper (UniPC, Alg. 1-2, eq. 8 / 9)     here
    h_i, r_k = (lambda_{s_k} - lambda_s0) / h   h, rk
    D_k = (m_{s_k} - m_s0) / r_k           differences of the stored predictions
    B(h): "bh1" B(h) = hh, "bh2" B(h) = e^{hh} - 1      solver_type
    a_p, a_c (the rho vectors)             solutions of R a = b, R_kj = r_j^(k-1),
                                           b_k = h phi_{k+1}(hh) k! / B(h)   (Theorem 3.1)

UniP (predictor, order p, from level s0 = i to t = i + 1):
    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{hh} - 1) m_s0 - alpha_t B(h) sum_k a_p,k D_k
UniC (corrector, order p, applied at the next call once m_t at the predicted x_t is known):
    x_t^c = (sigma_t / sigma_s0) x_s0^c - alpha_t (e^{hh} - 1) m_s0
            - alpha_t B(h) (sum_k a_c,k D_k + a_c,p (m_t - m_s0))
The corrector reuses the model evaluation of the next step (no extra call): each call i first
corrects x_i with m_i, then predicts x_{i+1} from the corrected x_i.

Both updates are linear in (x, x^c_{i-1}, m_i, m_{i-1}, ...), so the host computes their
coefficients per step (float64, with the warm-up, `lower_order_final` and `disable_corrector`
folded in), and the traced step is two linear combinations. `state.memory` is one fixed buffer
[K + 1, B, ...]: slots 0..K-1 the last K predictions (newest first), slot K the last corrected
sample. Plans follow diffusers' `UniPCMultistepScheduler` (with predict_x0=True).

Flow mode (a `schedules.FlowSchedule`, or `use_flow_sigmas=True`): the latent is the flow latent
x = (1 - sigma) x0 + sigma eps, so alpha_t = 1 - sigma and sigma_t = sigma above; only the plan
(`flow.multistep_plan`) and the reading of a velocity prediction (x0 = x - sigma v) change.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.samplers import base, flow, sigma as sig

SOLVER_TYPES = ("bh1", "bh2")


@struct.dataclass
class UniPCPlan:
    """Per-call coefficients (N = num_steps, K = solver_order), float32.

    a, s: [N] alpha, sigma of x's level (to read the prediction).
    corr_x, corr_last: [N] weights of x (1 where no correction) and of the last corrected sample;
    corr_hist: [N, K] weights of the stored predictions m_{i-1}, m_{i-2}, ...; corr_new: [N] of m_i.
    pred_x: [N] weight of the corrected x_i; pred_hist: [N, K] of m_i, m_{i-1}, ...
    """

    a: jax.Array
    s: jax.Array
    corr_x: jax.Array
    corr_last: jax.Array
    corr_hist: jax.Array
    corr_new: jax.Array
    pred_x: jax.Array
    pred_hist: jax.Array


def unipc_step(options: base.DenoiseOptions, state: base.SamplerState, x, model_output, key):
    """One UniC correction of x_i followed by one UniP prediction of x_{i+1} (module docstring).

    x: x_i [B, ...] float32 (the previous prediction); model_output: the network at (x_i, t_i).
    memory: [K + 1, B, ...] (predictions newest first, then the last corrected sample).
    """
    del key
    c = base.current(state.plan, state.index)
    K = state.memory.shape[0] - 1
    history, last = state.memory[:K], state.memory[K]
    m_new, _ = base.denoise(model_output, x, c.a, c.s, options)
    x_c = c.corr_x * x + c.corr_last * last + base.combine(c.corr_hist, history) + c.corr_new * m_new   # UniC
    history = base.push_history(history, m_new)
    x_next = c.pred_x * x_c + base.combine(c.pred_hist, history)                                        # UniP
    memory = jnp.concatenate([history, x_c[None]])
    return x_next, state._replace(index=state.index + 1, memory=memory)


def _rhos(lam, level, order, solver_type, corrector):
    """(h, hh, B(h), e^{hh} - 1, rks [order - 1], rho) of an update from `level` to `level + 1`
    using predictions at level, level - 1, ... (UniPC Theorem 3.1, float64)."""
    h = lam[level + 1] - lam[level]
    hh = -h
    h_phi_1 = np.expm1(hh)
    B_h = hh if solver_type == "bh1" else h_phi_1
    rks = np.array([(lam[level - k] - lam[level]) / h for k in range(1, order)] + [1.0])
    R, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1.0, 1
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, b = np.array(R), np.array(b)
    if corrector:
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    elif order == 1:
        rho = np.zeros(0)
    else:
        rho = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
    return B_h, h_phi_1, rks[:-1], rho


def _update(alpha, s_vp, lam, level, order, K, solver_type, corrector):
    """Coefficients (weight of x at `level`, weights [K] of m_level, m_level-1, ..., weight of the
    new prediction m_{level+1} (corrector only)) of the update from level to level + 1."""
    B_h, h_phi_1, rks, rho = _rhos(lam, level, order, solver_type, corrector)
    a_t = alpha[level + 1]
    w = np.zeros(K)
    w[0] = -a_t * h_phi_1                                                   # - alpha_t (e^{hh} - 1) m_s0
    for k, rk in enumerate(rks, start=1):                                   # - alpha_t B(h) rho_k D_k
        w[k] += -a_t * B_h * rho[k - 1] / rk
        w[0] += a_t * B_h * rho[k - 1] / rk
    new = 0.0
    if corrector:                                                           # - alpha_t B(h) rho_p (m_t - m_s0)
        new = -a_t * B_h * rho[-1]
        w[0] += a_t * B_h * rho[-1]
    return s_vp[level + 1] / s_vp[level], w, new


def unipc(schedule, num_steps: int, *, solver_order: int = 2, solver_type: str = "bh2",
          lower_order_final: bool = True, disable_corrector: tuple = (), use_karras_sigmas: bool = False,
          final_sigmas_type: str = "zero", timestep_spacing: str = "linspace", steps_offset: int = 0,
          prediction_type: str = "epsilon", thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
          sample_max_value: float = 1.0, use_flow_sigmas: bool | None = None, flow_shift: float | None = None,
          mu: float | None = None, shift_terminal: float | None = None, sigmas=None,
          start_step: int = 0) -> base.Sampler:
    """UniPC over `num_steps` model calls (deterministic; order `solver_order` predictor and
    corrector). Options and defaults as diffusers' `UniPCMultistepScheduler` (predict_x0=True);
    `disable_corrector`: step indices whose prediction is not corrected. `start_step`: skip the
    first steps (img2img); predictor and corrector warm up again from there, as the reference does
    after `set_begin_index`.

    Flow sigmas (on for a `schedules.FlowSchedule`, or `use_flow_sigmas=True` over a discrete one):
    levels planned as the reference with use_flow_sigmas=True (`flow.multistep_plan`: shift
    `flow_shift`, default the schedule's, or the time shift by `mu`; `shift_terminal`; custom
    `sigmas` [num_steps]), alpha = 1 - sigma, the network handed x at t = floor(sigma T) and
    possibly returning the velocity (prediction_type="flow_prediction")."""
    base.check_choice("solver_order", solver_order, (1, 2, 3))
    base.check_choice("solver_type", solver_type, SOLVER_TYPES)
    base.check_choice("lower_order_final", lower_order_final, (True, False))
    disabled = {int(i) for i in disable_corrector}
    on_flow = flow.flow_mode(schedule, use_flow_sigmas)
    if on_flow:
        ts, sigmas = flow.multistep_plan(schedule, num_steps, family="unipc", flow_shift=flow_shift, mu=mu,
                                         shift_terminal=shift_terminal, sigmas=sigmas,
                                         final_sigmas_type=final_sigmas_type, use_karras_sigmas=use_karras_sigmas)
        alpha, s_vp, lam = flow.coordinates(sigmas)
    else:
        if shift_terminal is not None or sigmas is not None:
            raise ValueError("shift_terminal and sigmas need flow sigmas (a FlowSchedule or use_flow_sigmas=True)")
        ts, sigmas = sig.multistep_plan(schedule, num_steps, timestep_spacing=timestep_spacing,
                                        steps_offset=steps_offset, use_karras_sigmas=use_karras_sigmas,
                                        final_sigmas_type=final_sigmas_type)
        alpha, s_vp, lam = sig.vp_coordinates(sigmas)
    K, n = solver_order, num_steps
    start = base.check_start_step(start_step, num_steps)
    # Predictor order of step i: warm-up (i - start + 1 predictions available), lowered near the end.
    orders = [max(1, min(K, n - i if lower_order_final else K, i - start + 1)) for i in range(n)]
    cols = {k: np.zeros(n) for k in ("corr_x", "corr_last", "corr_new", "pred_x")}
    corr_hist, pred_hist = np.zeros((n, K)), np.zeros((n, K))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(n):
            if i > start and (i - 1) not in disabled:
                # Correct x_i (level i) with the order the predictor of step i - 1 used.
                cols["corr_last"][i], corr_hist[i], cols["corr_new"][i] = _update(
                    alpha, s_vp, lam, i - 1, orders[i - 1], K, solver_type, corrector=True)
            else:
                cols["corr_x"][i] = 1.0
            cols["pred_x"][i], pred_hist[i], _ = _update(alpha, s_vp, lam, i, orders[i], K, solver_type,
                                                         corrector=False)
    arrays = [*cols.values(), corr_hist, pred_hist]
    if not all(np.all(np.isfinite(v)) for v in arrays):
        raise ValueError("the UniPC plan has non-finite coefficients (a step of unbounded length at a higher "
                         "order, e.g. lower_order_final=False with final_sigmas_type='zero')")
    plan = UniPCPlan(a=base.f32(alpha[:-1]), s=base.f32(s_vp[:-1]), corr_x=base.f32(cols["corr_x"]),
                     corr_last=base.f32(cols["corr_last"]), corr_hist=base.f32(corr_hist),
                     corr_new=base.f32(cols["corr_new"]), pred_x=base.f32(cols["pred_x"]),
                     pred_hist=base.f32(pred_hist))
    options = base.denoise_options(prediction_type=prediction_type, clip_sample=False, clip_sample_range=1.0,
                                   thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                                   sample_max_value=sample_max_value, flow=on_flow)
    state = base.new_state(ts, plan, memory=jnp.zeros((K + 1,), jnp.float32), levels=(alpha[:-1], s_vp[:-1]),
                           start_call=start)
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.history_init),
                        step=jax.tree_util.Partial(unipc_step, options))
