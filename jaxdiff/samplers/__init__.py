"""Samplers: pairs of pure functions `Sampler(init, step)` run by `jaxdiff.sampling.sample`.

    sampler = samplers.get("ddim", schedule, num_steps=50, eta=0.0, timestep_spacing="leading")

The contract is in `samplers/base.py`; each family has its own file and registers its factory
below. A factory is `factory(schedule, num_steps, *, option=default, ...) -> Sampler`; its
keyword-only parameters are the options `get` accepts.
"""

from __future__ import annotations

import inspect
from typing import Callable

from jaxdiff.samplers import base, ddim, ddpm
from jaxdiff.samplers.base import Sampler, SamplerState

_REGISTRY: dict[str, Callable[..., Sampler]] = {
    "ddpm": ddpm.ddpm,
    "ddim": ddim.ddim,
    "ddim_inverse": ddim.ddim_inverse,
}


def register(name: str, factory: Callable[..., Sampler]) -> None:
    """Make `get(name, ...)` build samplers with `factory(schedule, num_steps, **options)`."""
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def options(name: str) -> dict:
    """The options of sampler `name` and their defaults."""
    factory = _factory(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def get(name: str, schedule, num_steps: int, **opts) -> Sampler:
    """The sampler `name` over `schedule` with `num_steps` steps.

    Raises ValueError naming the problem for an unknown sampler, an unknown option or a bad value.
    """
    valid = options(name)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for sampler {name!r}; "
                         f"valid options: {', '.join(sorted(valid))}")
    return _factory(name)(schedule, num_steps, **opts)


def _factory(name: str) -> Callable[..., Sampler]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(names())}")
    return _REGISTRY[name]


__all__ = ["Sampler", "SamplerState", "base", "ddim", "ddpm", "get", "names", "options", "register"]
