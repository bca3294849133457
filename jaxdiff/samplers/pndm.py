"""PNDM: pseudo numerical methods for diffusion models (Liu, Ren, Lin & Zhao 2022).

Every update is the paper's "transfer part" phi (eq. 11), a DDIM step from level t to t' driven by
a noise estimate e, with abar = alpha-bar:

    phi(x_t, e, t, t') = sqrt(abar_t' / abar_t) x_t
                         - (abar_t' - abar_t) e / (abar_t sqrt(1 - abar_t') + sqrt(abar_t (1 - abar_t) abar_t'))

and the "gradient part" e combines network outputs like a classical solver:

    paper                              here
    e_t, e_{t-d/2}, e_{t-d}            network outputs o at the stage timesteps
    PRK (eq. 13), Runge-Kutta 4:       e' = (e_1 + 2 e_2 + 2 e_3 + e_4) / 6, four calls per step,
                                       the stages at t, t - d/2, t - d/2, t - d from the step start
    PLMS (eq. 12), Adams-Bashforth 4:  e' = (55 e_t - 59 e_{t-d} + 37 e_{t-2d} - 9 e_{t-3d}) / 24
                                       (orders 1-3 with 1, 3/2 -1/2, 23/12 -16/12 5/12 while the
                                       history fills; with `skip_prk_steps` the first step is
                                       a Heun-like average (e_t + e_{t-d}) / 2 instead of PRK)

The first three steps are PRK (12 calls) unless `skip_prk_steps`, then PLMS. Plans, the stage
timesteps and the reference's details (which sample and timestep each update starts from, and
that a v-prediction is turned into e at the step's start) follow diffusers' `PNDMScheduler`.

Every call is linear in (x, the stored outputs, the RK accumulator, the step's start sample), so
the host walks the reference's call sequence once and records per-call coefficients; the traced
step is a few linear combinations. `state.memory` = [3 past outputs (newest first), the RK
accumulator, the step's start sample], [5, B, ...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import schedules
from jaxdiff.samplers import base

PREDICTION_TYPES = ("epsilon", "v_prediction")
HISTORY = 3


@struct.dataclass
class PNDMPlan:
    """Per-call coefficients, float32 [N] unless noted (N = number of calls).

    src_x, src_start: the update's sample = src_x x + src_start start (the stored step start).
    out, acc: [N] weights of this call's output o and of the RK accumulator; hist: [N, 3] of the
        stored outputs (before this call's is pushed); their sum is the noise estimate e
        (or, for v-prediction, the v estimate, turned into e at a, s).
    a, s: sqrt(abar), sqrt(1 - abar) at the update's start timestep t.
    coef_x, coef_e: phi's coefficients, x_t' = coef_x sample - coef_e e.
    push: 1.0 where o joins the history; acc_keep, acc_add: acc' = acc_keep acc + acc_add o;
    set_start: 1.0 where the step's start becomes x.
    """

    src_x: jax.Array
    src_start: jax.Array
    out: jax.Array
    acc: jax.Array
    hist: jax.Array
    a: jax.Array
    s: jax.Array
    coef_x: jax.Array
    coef_e: jax.Array
    push: jax.Array
    acc_keep: jax.Array
    acc_add: jax.Array
    set_start: jax.Array


@struct.dataclass
class PNDMOptions:
    prediction_type: str = struct.field(pytree_node=False)


def pndm_step(options: PNDMOptions, state: base.SamplerState, x, model_output, key):
    """One PRK stage or PLMS step (notation in the module docstring). x, model_output: [B, ...];
    memory: [5, B, ...] (3 outputs, accumulator, step start)."""
    del key
    c = base.current(state.plan, state.index)
    history, acc, start = state.memory[:HISTORY], state.memory[HISTORY], state.memory[HISTORY + 1]
    sample = c.src_x * x + c.src_start * start
    e = c.out * model_output + c.acc * acc + base.combine(c.hist, history)
    if options.prediction_type == "v_prediction":
        e = c.a * e + c.s * sample                                   # eps = sqrt(abar) v + sqrt(1 - abar) x
    x_next = c.coef_x * sample - c.coef_e * e                        # phi, eq. 11
    history = jnp.where(c.push > 0, base.push_history(history, model_output), history)
    acc = c.acc_keep * acc + c.acc_add * model_output
    start = jnp.where(c.set_start > 0, x, start)
    memory = jnp.concatenate([history, acc[None], start[None]])
    return x_next, state._replace(index=state.index + 1, memory=memory)


def model_calls(num_steps: int, *, skip_prk_steps: bool = False, **options) -> int:
    """The model calls of a `num_steps`-step PNDM plan: num_steps + 9 (three Runge-Kutta steps of
    four calls replace three PLMS calls), or num_steps + 1 with `skip_prk_steps` (the first step
    is repeated for its Heun-like average)."""
    del options
    return int(num_steps) + (1 if skip_prk_steps else 9)


def _ascending_timesteps(T, n, timestep_spacing, steps_offset):
    """The reference's PNDM timesteps, ascending [n] (note: "linspace" is rounded here)."""
    if timestep_spacing == "linspace":
        base.check_num_steps(n, T)
        return np.linspace(0, T - 1, n).round().astype(np.int64)
    return base.plan_timesteps(T, n, timestep_spacing, steps_offset)[::-1].copy()


def _calls(T, n, ts, skip_prk_steps):
    """Walk the reference's call sequence. Returns a list of per-call dicts (host values)."""
    r = T // n
    calls = []
    if not skip_prk_steps:
        stages = (np.repeat(ts[-4:], 2) + np.tile([0, r // 2], 4))[:-1].repeat(2)[1:-1][::-1]     # 12 timesteps
        for c, t in enumerate(stages):
            phase = c % 4
            call = dict(t_model=t, t_from=stages[c // 4 * 4], t_to=t - (0 if c % 2 else r // 2),
                        src="x" if phase == 0 else "start", set_start=phase == 0, push=phase == 0)
            if phase < 3:                                            # RK stage: e = o; accumulate 1/6, 1/3, 1/3
                call.update(out=1.0, acc=0.0, hist=[], acc_keep=1.0, acc_add=(1 / 6, 1 / 3, 1 / 3)[phase])
            else:                                                    # last stage: e = acc + o / 6; reset
                call.update(out=1 / 6, acc=1.0, hist=[], acc_keep=0.0, acc_add=0.0)
            calls.append(call)
        plms = ts[:-3][::-1]
        stored = 3
    else:
        plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        stored = 0
    first = len(calls)
    for j, t in enumerate(plms):
        counter = first + j
        call = dict(t_model=t, t_from=t, t_to=t - r, src="x", set_start=False, push=True, acc=0.0,
                    acc_keep=0.0, acc_add=0.0)
        if skip_prk_steps and counter == 1:                          # Heun-like average of the first step
            call.update(t_from=t + r, t_to=t, src="start", push=False, out=0.5, hist=[0.5])
        else:
            stored = min(stored + 1, 4)
            weights = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                       4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}[stored]
            call.update(out=weights[0], hist=weights[1:], set_start=skip_prk_steps and counter == 0)
        calls.append(call)
    return calls


def pndm(schedule: schedules.DiscreteSchedule, num_steps: int, *, skip_prk_steps: bool = False,
         set_alpha_to_one: bool = False, prediction_type: str = "epsilon", timestep_spacing: str = "leading",
         steps_offset: int = 0) -> base.Sampler:
    """PNDM over `num_steps` steps: num_steps + 9 model calls (3 PRK steps of 4 calls, then PLMS),
    or num_steps + 1 with `skip_prk_steps`. Options and defaults as diffusers' `PNDMScheduler`.
    Its Runge-Kutta / pseudo-linear warm-up is tied to the first steps, so it has no `start_step`
    (use ddim or dpmpp_2m for img2img)."""
    if not isinstance(schedule, schedules.DiscreteSchedule):
        raise ValueError(f"PNDM needs a schedules.DiscreteSchedule, got {type(schedule).__name__}")
    base.check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    base.check_choice("skip_prk_steps", skip_prk_steps, (True, False))
    base.check_choice("set_alpha_to_one", set_alpha_to_one, (True, False))
    base.check_choice("timestep_spacing", timestep_spacing, base.TIMESTEP_SPACINGS)
    if not skip_prk_steps and num_steps < 4:
        raise ValueError(f"PNDM's Runge-Kutta warm-up needs num_steps >= 4, got {num_steps}; "
                         "use more steps or skip_prk_steps=True")
    T = schedule.num_train_timesteps
    ac = schedules.alphas_cumprod_float64(schedule)
    calls = _calls(T, num_steps, _ascending_timesteps(T, num_steps, timestep_spacing, steps_offset), skip_prk_steps)
    t_from = np.array([c["t_from"] for c in calls])
    ab = ac[t_from]
    ab_to = base.alpha_bar_at(ac, np.array([c["t_to"] for c in calls]), 1.0 if set_alpha_to_one else ac[0])
    denom = ab * np.sqrt(1 - ab_to) + np.sqrt(ab * (1 - ab) * ab_to)
    hist = np.zeros((len(calls), HISTORY))
    for i, c in enumerate(calls):
        hist[i, :len(c["hist"])] = c["hist"]
    column = lambda key: base.f32([float(c[key]) for c in calls])          # noqa: E731
    plan = PNDMPlan(src_x=base.f32([c["src"] == "x" for c in calls]),
                    src_start=base.f32([c["src"] == "start" for c in calls]),
                    out=column("out"), acc=column("acc"), hist=base.f32(hist),
                    a=base.f32(np.sqrt(ab)), s=base.f32(np.sqrt(1 - ab)),
                    coef_x=base.f32(np.sqrt(ab_to / ab)), coef_e=base.f32((ab_to - ab) / denom),
                    push=column("push"), acc_keep=column("acc_keep"), acc_add=column("acc_add"),
                    set_start=column("set_start"))
    state = base.new_state([c["t_model"] for c in calls], plan, memory=jnp.zeros((HISTORY + 2,), jnp.float32),
                           levels=base.vp_levels(np.sqrt(ab)))
    return base.Sampler(plan=state, prepare=jax.tree_util.Partial(base.history_init),
                        step=jax.tree_util.Partial(pndm_step, PNDMOptions(prediction_type=prediction_type)))
