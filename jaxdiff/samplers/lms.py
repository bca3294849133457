"""Linear multistep (LMS) sampler in sigma space: Adams-Bashforth on the probability-flow ODE.

As in Karras et al. 2022 (EDM) the ODE is dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma in
the VE latent x (`samplers/sigma.py`). A k-step Adams-Bashforth method in its variable-step form
(Hairer, Norsett & Wanner, "Solving Ordinary Differential Equations I", ch. III) integrates the
polynomial through the last k slopes over the step:

    x_{i+1} = x_i + sum_{j<k} c_{i,j} d_{i-j},
    c_{i,j} = int_{sigma_i}^{sigma_{i+1}} l_j(tau) dtau,   l_j(tau) = prod_{m != j, m<k}
              (tau - sigma_{i-m}) / (sigma_{i-j} - sigma_{i-m})    (Lagrange basis on the levels)

    paper                    here
    f(t_{n-j}, y_{n-j})      d_{i-j} = memory[j] (newest first)
    beta_j (variable steps)  c_{i,j} = plan.coefs[i, j]

k = min(i + 1, order) (the method warms up from Euler). The coefficients depend only on the
levels, so the host integrates the polynomials exactly (float64) and the traced step is one
linear combination. Plans (spacing, Karras sigmas, init_sigma) follow diffusers'
`LMSDiscreteScheduler`; `order` is its `step` argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from numpy.polynomial import polynomial as P

from jaxdiff import schedules
from jaxdiff.samplers import base, sigma as sig


@struct.dataclass
class LMSPlan:
    """now: the level sigma_i of x (float32 [N]); coefs: float32 [N, order], c_{i,j}."""

    now: sig.Level
    coefs: jax.Array


def lms_step(options: sig.DenoiserOptions, state: base.SamplerState, x, model_output, key):
    """One Adams-Bashforth step (notation in the module docstring). x: VE latent [B, ...];
    memory: the previous slopes [order, B, ...], newest first."""
    del key
    c = base.current(state.plan, state.index)
    d = sig.derivative(x, sig.denoised(model_output, x, c.now, options), c.now.sigma)
    history = base.push_history(state.memory, d)
    return x + base.combine(c.coefs, history), state._replace(index=state.index + 1, memory=history)


def adams_bashforth_coefficients(sigmas: np.ndarray, order: int, start: int = 0) -> np.ndarray:
    """c [N, order] float64 for levels sigmas [N + 1] (zeros beyond each step's k, and for the
    steps before `start`, where a run starting there warms up again)."""
    n = sigmas.shape[0] - 1
    coefs = np.zeros((n, order))
    for i in range(start, n):
        k = min(i - start + 1, order)
        nodes = sigmas[i - np.arange(k)]                            # sigma_i, sigma_{i-1}, ...
        for j in range(k):
            others = np.delete(nodes, j)
            basis = P.polyfromroots(others) / np.prod(nodes[j] - others)
            antiderivative = P.polyint(basis)
            coefs[i, j] = P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative)
    return coefs


def lms(schedule: schedules.DiscreteSchedule, num_steps: int, *, order: int = 4, timestep_spacing: str = "linspace",
        steps_offset: int = 0, prediction_type: str = "epsilon", use_karras_sigmas: bool = False,
        start_step: int = 0) -> base.Sampler:
    """The LMS sampler over `num_steps` model calls (deterministic, `order`-step Adams-Bashforth).
    Options and defaults as diffusers' `LMSDiscreteScheduler` (`order` as its step argument).

    start_step: skip the first steps (img2img); the method warms up again from there (step
    start_step + j uses min(j + 1, order) slopes). The reference keeps `order` fixed by the
    absolute step index and sums only the slopes it has, which is not a consistent method."""
    if int(order) != order or not 1 <= order <= 8:
        raise ValueError(f"order must be an integer in [1, 8], got {order}")
    ts, sigmas = sig.karras_plan(schedule, num_steps, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                                 use_karras_sigmas=use_karras_sigmas, final_sigmas_type="zero")
    start = base.check_start_step(start_step, num_steps)
    plan = LMSPlan(now=sig.level(sigmas[:-1]),
                   coefs=base.f32(adams_bashforth_coefficients(sigmas, int(order), start)))
    state = base.new_state(ts, plan, init_sigma=sig.init_sigma(sigmas, timestep_spacing),
                           input_scales=sig.input_scale(sigmas[:-1]), memory=jnp.zeros((int(order),), jnp.float32),
                           levels=base.ve_levels(sigmas[:-1]), start_call=start)
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.history_init),
                        step=jax.tree_util.Partial(lms_step, sig.denoiser_options(prediction_type)))
