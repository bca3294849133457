"""Samplers: a precomputed plan and two pure functions, `Sampler(plan, prepare, step)`, run by
`jaxdiff.sampling.sample`.

    sampler = samplers.get("ddim", schedule, num_steps=50, eta=0.0, timestep_spacing="leading")

The contract is in `samplers/base.py`; each family has its own file and registers its factory
below. A factory is `factory(schedule, num_steps, *, option=default, ...) -> Sampler`; its
keyword-only parameters are the options `get` accepts (names and defaults as the diffusers
scheduler of the same method). A family that does not call the network once per step also
registers `model_calls(num_steps, **options) -> int`, the length of its plan (the table below),
so that `get(..., max_steps=M)` knows the length to pad to without building an M-step plan.

    name                      file           latent integrated     model calls   memory
    ddpm, ddim, ddim_inverse  ddpm, ddim     x_t                   N             -
    euler, euler_ancestral    euler          x_t / sqrt(abar)      N             -
    heun, edm                 heun           x_t / sqrt(abar)      2N - 1        [2, B, ...]
    lms                       lms            x_t / sqrt(abar)      N             [order, B, ...]
    dpmpp_2m(_sde), dpmpp_3m_sde  dpm_solver x_t                   N             [order, B, ...]
    unipc                     unipc          x_t                   N             [order + 1, B, ...]
    pndm                      pndm           x_t                   N + 9 (N + 1) [5, B, ...]
    flow_euler                flow           x_sigma (flow)        N             -
    flow_heun                 flow           x_sigma (flow)        2N - 1        [2, B, ...]
    lcm                       lcm            x_t                   N             -

Samplers on x_t / sqrt(abar) (the "sigma-space" ones, `samplers/sigma.py`) set `init_sigma` to
the largest sigma of their plan (sqrt(sigma_max^2 + 1) with "leading" spacing, as the reference)
and `input_scales` to 1 / sqrt(sigma^2 + 1), so the network is handed x_t either way.

Flow-matching models (`schedules.flow(...)`, x_sigma = (1 - sigma) x0 + sigma eps, the network
called at t = sigma T and returning the velocity eps - x0) sample with flow_euler / flow_heun,
and with dpmpp_2m / unipc given a FlowSchedule (or use_flow_sigmas=True) and
prediction_type="flow_prediction"; all of them hand the network x unscaled, init_sigma 1:

    sampler = samplers.get("flow_euler", schedules.flow(1000, shift=3.0), 28)
"""

from __future__ import annotations

import inspect
from typing import Callable

from jaxdiff.samplers import base, ddim, ddpm, dpm_solver, euler, flow, heun, lcm, lms, pndm, sigma, unipc
from jaxdiff.samplers.base import Sampler, SamplerState

_REGISTRY: dict[str, Callable[..., Sampler]] = {
    "ddpm": ddpm.ddpm,
    "ddim": ddim.ddim,
    "ddim_inverse": ddim.ddim_inverse,
    "euler": euler.euler,
    "euler_ancestral": euler.euler_ancestral,
    "heun": heun.heun,
    "dpmpp_2m": dpm_solver.dpmpp_2m,
    "dpmpp_2m_sde": dpm_solver.dpmpp_2m_sde,
    "dpmpp_3m_sde": dpm_solver.dpmpp_3m_sde,
    "lms": lms.lms,
    "unipc": unipc.unipc,
    "pndm": pndm.pndm,
    "edm": heun.edm,
    "flow_euler": flow.flow_euler,
    "flow_heun": flow.flow_heun,
    "lcm": lcm.lcm,
}

# The plan length of families that do not call the network once per step.
_MODEL_CALLS: dict[str, Callable[..., int]] = {"heun": heun.model_calls, "edm": heun.model_calls,
                                                "pndm": pndm.model_calls, "flow_heun": flow.heun_model_calls}


# Samplers that sample a flow-matching model: the flow-only ones, and those with diffusers'
# flow mode (use_flow_sigmas), which a `schedules.FlowSchedule` turns on.
FLOW_ONLY = ("flow_euler", "flow_heun")
FLOW_MODE = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc")


def samples_flow(name: str) -> bool:
    """Whether sampler `name` can sample a flow-matching (velocity) model."""
    return name in FLOW_ONLY or name in FLOW_MODE


def register(name: str, factory: Callable[..., Sampler], model_calls: Callable[..., int] | None = None) -> None:
    """Make `get(name, ...)` build samplers with `factory(schedule, num_steps, **options)`.

    model_calls: `model_calls(num_steps, **options) -> int`, the number of model calls (the plan
        length) of a `num_steps`-step plan with those options; default one call per step.
    """
    _REGISTRY[name] = factory
    _MODEL_CALLS[name] = model_calls or base.one_call_per_step


def names() -> list[str]:
    return sorted(_REGISTRY)


def options(name: str) -> dict:
    """The options of sampler `name` and their defaults."""
    factory = _factory(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def get(name: str, schedule, num_steps: int, *, max_steps: int | None = None, **opts) -> Sampler:
    """The sampler `name` over `schedule` with `num_steps` steps.

    max_steps: pad the plan to the length of a `max_steps`-step plan, so that every step count up
        to it (and every `start_step`) gives arrays of the same shapes and `sampling.sample` runs
        them all through one compiled program. The padding costs no model calls.
    Raises ValueError naming the problem for an unknown sampler, an unknown option or a bad value.
    """
    valid = options(name)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for sampler {name!r}; "
                         f"valid options: {', '.join(sorted(valid))}")
    factory = _factory(name)
    sampler = factory(schedule, num_steps, **opts)
    if max_steps is None:
        return sampler
    if int(max_steps) != max_steps or max_steps < num_steps:
        raise ValueError(f"max_steps must be an integer >= num_steps={num_steps}, got {max_steps}")
    length = model_calls(name, int(max_steps), **opts)
    planned = base.num_model_calls(sampler.plan)
    if planned > length:
        raise ValueError(f"sampler {name!r} planned {planned} model calls for {num_steps} steps, more than the "
                         f"{length} its model_calls gives for max_steps={max_steps}; register it with a "
                         f"model_calls function that counts its calls")
    return sampler._replace(plan=base.pad(sampler.plan, length))


def model_calls(name: str, num_steps: int, **opts) -> int:
    """The number of model calls (the plan length) of sampler `name` over `num_steps` steps with
    options `opts`, computed without building the plan (e.g. heun: 2 num_steps - 1)."""
    _factory(name)
    return _MODEL_CALLS.get(name, base.one_call_per_step)(num_steps, **opts)


def _factory(name: str) -> Callable[..., Sampler]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(names())}")
    return _REGISTRY[name]


__all__ = ["FLOW_MODE", "FLOW_ONLY", "Sampler", "SamplerState", "base", "ddim", "ddpm", "dpm_solver", "euler", "flow",
           "get", "heun", "lms", "model_calls", "names", "options", "pndm", "register", "samples_flow", "sigma", "unipc"]
