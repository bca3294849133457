"""The sampler contract, and the math that several samplers share.

A sampler is a precomputed plan and a pair of pure functions (in the spirit of optax's
`GradientTransformation`):

    sampler.plan                                         # SamplerState at the first call (host-computed)
    state = sampler.init(noise)                          # = sampler.prepare(sampler.plan, noise [B, ...])
    x = state.init_sigma * noise                         # the driver scales the initial latent
    for i in range(num_model_calls(state)):              # one lax.scan in jaxdiff.sampling
        t, scale = next_call(state)                      # [] training-scale t, [] input scale
        out = model_fn(scale * x, full([B], t))          # the network's native prediction
        x, state = sampler.step(state, x, out, key)      # key: the run's key; step folds in i

The loop runs over *model calls*, not solver steps: a two-evaluation solver (Heun) plans two
calls per step and tells them apart from the index; a multistep solver (DPM-Solver++(2M),
UniPC) keeps fixed-size history buffers in `state.memory`, which `prepare` sizes like the noise.
Everything the driver needs is an array in the state, so the length of the plan is static
(`state.timesteps.shape[0]`) and one compiled loop serves every plan of the same length. The
driver calls the network while `index < num_calls`: a run may start late (`start_call`, img2img)
and a plan may be padded to a fixed length, `sampler._replace(plan=pad(sampler.plan, length))`
(what `samplers.get(..., max_steps=M)` does), so many step counts share one program.

Rules for samplers: no Python `if` on traced values (use `jnp.where` / `lax.select` /
`lax.switch`), never find a timestep by equality (index the plan with `state.index`), and
stochastic steps draw from `jax.random.fold_in(key, state.index)`.

Construction (`samplers.get`) happens on the host: the plan is computed in float64 from the
schedule and stored as float32 arrays, options that change the traced program (prediction type,
dynamic thresholding) are static fields, numeric options (eta, clip range) are arrays, and
`prepare` / `step` are `jax.tree_util.Partial`s of module-level functions. Two samplers built with
the same static options and plan length therefore have the same pytree structure, and a jitted
driver does not recompile for them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import parameterization

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class SamplerState(NamedTuple):
    """What a sampler carries between model calls. N = number of model calls of the run.

    index: int32 [], the number of model calls already made; the next call is number `index`.
    timesteps: float32 [N], the training-scale timestep handed to the network at each call.
    input_scales: float32 [N], the factor applied to x before each call (1 for DDPM / DDIM;
        1 / sqrt(sigma^2 + 1) for sigma-space samplers).
    init_sigma: float32 [], the std of the initial latent: x_T = init_sigma * noise.
    plan: sampler-specific pytree of per-call arrays, each with leading axis N.
    memory: sampler-specific pytree of fixed-shape arrays updated by `step` (history buffers);
        `()` for one-step samplers.
    num_calls: int32 [], the model calls of the plan; the driver stops calling once `index`
        reaches it. Equal to N unless the plan was padded (`pad`) to a longer fixed length.
    signal_scales, noise_scales: float32 [N], the forward process in the sampler's own latent
        coordinates: the latent x at call i's level is `signal_scales[i] x0 + noise_scales[i] eps`
        (sqrt(abar), sqrt(1 - abar) for samplers on x_t; 1, sigma on x_t / sqrt(abar)). The driver
        uses them to start from a noised image at `index` (img2img); None where a sampler cannot.
    """

    index: jax.Array
    timesteps: jax.Array
    input_scales: jax.Array
    init_sigma: jax.Array
    plan: Any
    memory: Any = ()
    num_calls: Any = None
    signal_scales: Any = None
    noise_scales: Any = None


class Sampler(NamedTuple):
    """A sampler: its precomputed plan and two pure functions.

    plan: the `SamplerState` a run starts from, computed on the host (timesteps, scales, the
        family's per-call arrays in `plan.plan`, `index` at the first call). History buffers are
        placeholders there (`memory` = zeros [K] for K slots) until `prepare` sizes them.
    prepare(plan, noise [B, ...]) -> SamplerState: the run's initial state (`constant_init`,
        `history_init`, or a family's own, e.g. EDM's churn applied to the plan).
    step(state, x [B, ...], model_output [B, ...], key) -> (x_next [B, ...], state).

    `sampler.init(noise)` is `prepare(plan, noise)`.
    """

    plan: SamplerState
    prepare: Callable[[SamplerState, jax.Array], SamplerState]
    step: Callable[[SamplerState, jax.Array, jax.Array, jax.Array], tuple[jax.Array, SamplerState]]

    def init(self, noise: jax.Array) -> SamplerState:
        """The initial state of a run from `noise` [B, ...]: `prepare(plan, noise)`."""
        return self.prepare(self.plan, noise)


def num_model_calls(state: SamplerState) -> int:
    """The (static) length of the plan: the number of iterations of the driver's scan. The calls
    actually made are `state.num_calls - state.index` (fewer for a padded or late-starting plan)."""
    return state.timesteps.shape[0]


def next_call(state: SamplerState) -> tuple[jax.Array, jax.Array]:
    """(t, input_scale) of the next model call, float32 scalars."""
    return state.timesteps[state.index], state.input_scales[state.index]


def current(plan, index: jax.Array):
    """The plan's entries for one call: every leaf `[N, ...]` indexed at `index`."""
    return jax.tree.map(lambda leaf: leaf[index], plan)


def step_key(key: jax.Array, state: SamplerState) -> jax.Array:
    """The key of this call's randomness: fold_in(key, index)."""
    return jax.random.fold_in(key, state.index)


def constant_init(state: SamplerState, noise: jax.Array) -> SamplerState:
    """`prepare` of samplers without history: the precomputed plan whatever the noise."""
    del noise
    return state


def history_init(state: SamplerState, noise: jax.Array) -> SamplerState:
    """`prepare` of samplers with history. The precomputed plan carries `memory` = zeros [K] as a
    placeholder (its static length K is the number of slots); it becomes a fixed-size buffer of
    zeros [K, B, ...] float32 shaped like the noise (slot 0: the newest entry)."""
    num_slots = state.memory.shape[0]
    return state._replace(memory=jnp.zeros((num_slots,) + noise.shape, jnp.float32))


def push_history(memory: jax.Array, entry: jax.Array) -> jax.Array:
    """The history buffer [K, B, ...] with `entry` [B, ...] in slot 0 and the oldest dropped."""
    return jnp.concatenate([entry[None], memory[:-1]])


def combine(coefs: jax.Array, history: jax.Array) -> jax.Array:
    """sum_j coefs[j] history[j]: coefs [K], history [K, B, ...] -> [B, ...] (the linear
    combination a multistep method takes of its stored values)."""
    return jnp.tensordot(coefs, history, axes=1)


def new_state(timesteps, plan, *, init_sigma=1.0, input_scales=None, memory=(), levels=None,
              start_call: int = 0) -> SamplerState:
    """A SamplerState at call `start_call` from host arrays (stored float32).

    levels: (signal_scales [N], noise_scales [N]) of each call's level (see SamplerState), or None.
    With start_call > 0 the run begins at that call, as an img2img run does, and `init_sigma`
    becomes the noise scale there.
    """
    timesteps = f32(timesteps)
    n = timesteps.shape[0]
    if not 0 <= start_call < n:
        raise ValueError(f"the start call {start_call} lies outside the plan's {n} model calls")
    if input_scales is None:
        input_scales = np.ones(n, np.float32)
    signal, noise = (None, None) if levels is None else (f32(levels[0]), f32(levels[1]))
    if start_call and noise is not None:
        init_sigma = np.asarray(levels[1], np.float32)[start_call]  # on the host, see `f32`
    return SamplerState(index=jnp.asarray(start_call, jnp.int32), timesteps=timesteps,
                        input_scales=f32(input_scales), init_sigma=f32(init_sigma), plan=plan, memory=memory,
                        num_calls=jnp.asarray(n, jnp.int32), signal_scales=signal, noise_scales=noise)


def vp_levels(sqrt_alpha_bar):
    """(signal, noise) scales of levels on x_t: sqrt(abar), sqrt(1 - abar). Host float64 in."""
    sqrt_alpha_bar = np.asarray(sqrt_alpha_bar, np.float64)
    return sqrt_alpha_bar, np.sqrt(np.maximum(1.0 - sqrt_alpha_bar ** 2, 0.0))


def ve_levels(sigmas):
    """(signal, noise) scales of levels on x_t / sqrt(abar): 1, sigma."""
    sigmas = np.asarray(sigmas, np.float64)
    return np.ones_like(sigmas), sigmas


def check_start_step(start_step: int, num_steps: int) -> int:
    """start_step must be an integer in [0, num_steps): the steps of the plan that are skipped,
    as diffusers' img2img pipelines skip the first `num_steps - int(num_steps * strength)`."""
    if int(start_step) != start_step or not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be an integer in [0, num_steps={num_steps}), got {start_step}")
    return int(start_step)


def one_call_per_step(num_steps: int, **options) -> int:
    """The model calls of a `num_steps`-step plan of a sampler that calls the network once per
    step (the default `model_calls` of a registered family; see `samplers.register`)."""
    del options
    return int(num_steps)


# --------------------------------------------------------------------------------------------
# Fixed-length plans: many step counts, one compiled loop.
# --------------------------------------------------------------------------------------------

def pad(state: SamplerState, length: int) -> SamplerState:
    """The state with every per-call array (timesteps, scales, plan leaves) padded to `length`
    calls by repeating its last entry; `num_calls` keeps the real number, so the driver skips the
    padding. Plans of different lengths padded alike have the same shapes, hence one program."""
    n = num_model_calls(state)
    if length < n:
        raise ValueError(f"cannot pad a plan of {n} model calls to {length}; raise max_steps")

    def grow(leaf):  # on the host, see `f32`
        leaf = np.asarray(leaf)
        return jax.device_put(np.concatenate([leaf, np.repeat(leaf[-1:], length - n, axis=0)]))

    per_call = (state.timesteps, state.input_scales, state.plan, state.signal_scales, state.noise_scales)
    timesteps, input_scales, plan, signal, noise = jax.tree.map(grow, per_call)
    return state._replace(timesteps=timesteps, input_scales=input_scales, plan=plan, signal_scales=signal,
                          noise_scales=noise)


def f32(x) -> jax.Array:
    """`x` as a float32 jax array. Host values (numpy, Python numbers) are converted on the host
    and handed over with `device_put`: `jnp.asarray` of a host array, and any device op on it,
    compiles a small program per shape, i.e. per plan length, so every new step count would."""
    if isinstance(x, jax.Array):  # tracers included
        return jnp.asarray(x, jnp.float32)
    return jax.device_put(np.asarray(x, np.float32))


# --------------------------------------------------------------------------------------------
# Option checks (clear messages at construction, never inside a trace).
# --------------------------------------------------------------------------------------------

def check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_range(option: str, value, lo: float, hi: float) -> None:
    """Checks lo <= value <= hi when value is concrete (a traced value is left to the caller)."""
    if isinstance(value, jax.core.Tracer):
        return
    v = float(value)
    if not lo <= v <= hi:
        raise ValueError(f"{option} must lie in [{lo}, {hi}], got {v}")


def check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    if int(num_steps) != num_steps or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}] "
                         f"(the schedule's num_train_timesteps), got {num_steps}")


# --------------------------------------------------------------------------------------------
# Timestep plans (host side).
# --------------------------------------------------------------------------------------------

def plan_timesteps(num_train_timesteps: int, num_steps: int, timestep_spacing: str,
                   steps_offset: int = 0) -> np.ndarray:
    """The decreasing training timesteps `[num_steps]` (int64) a discrete sampler visits.

    leading:  0, r, 2r, ... (r = T // num_steps), reversed, plus `steps_offset`.
    trailing: T - 1, T - 1 - T / num_steps, ... rounded; always starts at the noisiest step
              (Lin et al. 2023, Table 2). `steps_offset` does not apply.
    linspace: round(linspace(0, T - 1, num_steps)), reversed. `steps_offset` does not apply.
    These follow diffusers' `timestep_spacing` exactly.
    """
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    check_num_steps(num_steps, num_train_timesteps)
    if timestep_spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = np.arange(num_steps, dtype=np.int64)[::-1] * ratio + int(steps_offset)
    elif timestep_spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64) - 1
    else:
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    if ts.max() >= num_train_timesteps:
        raise ValueError(f"steps_offset={steps_offset} pushes the first timestep to {ts.max()}, "
                         f"past the schedule's last timestep {num_train_timesteps - 1}")
    return ts.copy()


def alpha_bar_at(alphas_cumprod: np.ndarray, timesteps: np.ndarray, before_first: float) -> np.ndarray:
    """abar at integer `timesteps`, with `before_first` for timesteps < 0 (the clean end)."""
    timesteps = np.asarray(timesteps)
    return np.where(timesteps >= 0, alphas_cumprod[np.maximum(timesteps, 0)], before_first)


# --------------------------------------------------------------------------------------------
# Shared math.
# --------------------------------------------------------------------------------------------

def posterior(alpha_bar, alpha_bar_prev):
    """The forward-process posterior q(x_{t'} | x_t, x0) between two levels abar_t < abar_{t'}
    (Ho et al. 2020, eq. 6-7, with t' the previous *planned* step, so the per-step
    beta_t = 1 - abar_t / abar_{t'} and alpha_t = 1 - beta_t span the skipped steps):

        mean     = coef_x0 x0 + coef_xt x_t
        coef_x0  = sqrt(abar_{t'}) beta_t / (1 - abar_t)
        coef_xt  = sqrt(alpha_t) (1 - abar_{t'}) / (1 - abar_t)
        variance = beta_tilde_t = (1 - abar_{t'}) / (1 - abar_t) beta_t

    Elementwise on arrays of any shape; plain arithmetic, so numpy float64 in gives float64 out
    (the samplers compute their plans this way on the host). Returns
    (coef_x0, coef_xt, variance, beta).
    """
    alpha = alpha_bar / alpha_bar_prev
    beta = 1.0 - alpha
    coef_x0 = alpha_bar_prev ** 0.5 * beta / (1.0 - alpha_bar)
    coef_xt = alpha ** 0.5 * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta
    return coef_x0, coef_xt, variance, beta


@struct.dataclass
class DenoiseOptions:
    """How a raw network output becomes (x0_hat, eps_hat); shared by the discrete samplers.

    clip_range: float32 [], x0_hat is clipped to [-clip_range, clip_range]; inf when clipping is
        off, so switching `clip_sample` does not recompile.
    dynamic_thresholding_ratio, sample_max_value: float32 [] (used when `thresholding`).
    prediction_type, thresholding: static (they change the traced program).
    """

    clip_range: jax.Array
    dynamic_thresholding_ratio: jax.Array
    sample_max_value: jax.Array
    prediction_type: str = struct.field(pytree_node=False)
    thresholding: bool = struct.field(pytree_node=False)


def denoise_options(*, prediction_type: str, clip_sample: bool, clip_sample_range: float,
                    thresholding: bool, dynamic_thresholding_ratio: float,
                    sample_max_value: float, flow: bool = False) -> DenoiseOptions:
    """Validated `DenoiseOptions` (names and meanings as diffusers' scheduler options; like there,
    `thresholding` takes precedence over `clip_sample`). flow: the sampler runs on flow levels
    (a = 1 - sigma, s = sigma), where "flow_prediction" (the velocity eps - x0) is also read."""
    if prediction_type == parameterization.FLOW_PREDICTION and not flow:
        raise ValueError("prediction_type='flow_prediction' needs flow sigmas: pass a schedules.flow(...) "
                         "schedule (or use_flow_sigmas=True)")
    choices = parameterization.PREDICTION_TYPES + ((parameterization.FLOW_PREDICTION,) if flow else ())
    check_choice("prediction_type", prediction_type, choices)
    check_choice("clip_sample", clip_sample, (True, False))
    check_choice("thresholding", thresholding, (True, False))
    check_range("clip_sample_range", clip_sample_range, 0.0, float("inf"))
    check_range("dynamic_thresholding_ratio", dynamic_thresholding_ratio, 0.0, 1.0)
    check_range("sample_max_value", sample_max_value, 1.0, float("inf"))
    clip_range = f32(clip_sample_range) if clip_sample else f32(jnp.inf)
    return DenoiseOptions(clip_range=clip_range, dynamic_thresholding_ratio=f32(dynamic_thresholding_ratio),
                          sample_max_value=f32(sample_max_value), prediction_type=prediction_type,
                          thresholding=bool(thresholding))


def denoise(model_output, x, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, options: DenoiseOptions):
    """(x0_hat, eps_hat) `[B, ...]` float32 from the network output at x_t = x (for
    "flow_prediction" the level is a flow level, sqrt_alpha_bar = 1 - sigma, sqrt_one_minus = sigma).

    x0_hat is then dynamically thresholded (if `thresholding`) or clipped to
    [-clip_range, clip_range] (a no-op for clip_range = inf); eps_hat is the unclipped one.
    """
    if options.prediction_type == parameterization.FLOW_PREDICTION:   # flow levels: a = 1 - s
        x0, eps = parameterization.flow_x0_eps(model_output, x, sqrt_one_minus_alpha_bar)
    else:
        x0, eps = parameterization.x0_eps_coefs(model_output, x, sqrt_alpha_bar, sqrt_one_minus_alpha_bar,
                                                options.prediction_type)
    if options.thresholding:
        x0 = dynamic_threshold(x0, options.dynamic_thresholding_ratio, options.sample_max_value)
    else:
        x0 = jnp.clip(x0, -options.clip_range, options.clip_range)
    return x0, eps


def dynamic_threshold(x0, ratio, max_value):
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3): per example, s = the `ratio`
    quantile of |x0| clamped to [1, max_value]; x0 -> clip(x0, -s, s) / s. x0: [B, ...]."""
    flat = x0.reshape(x0.shape[0], -1)                                   # [B, D]
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)                       # [B]
    s = jnp.clip(s, 1.0, max_value)[:, None]                             # [B, 1]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)
