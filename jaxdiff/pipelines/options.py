"""Keyword arguments every pipeline shares: checks, defaults and diffusers' names.

    options, renamed = take_aliases(kwargs)             # diffusers' names -> jaxdiff's
    check_steps(num_steps)                               # a positive integer

diffusers' pipelines name some arguments differently; jaxdiff accepts the plain renamings
(`ALIASES`) and answers the ones that have no counterpart with what to use instead (`ANSWERS`),
in one line, so code written for diffusers fails with a fix rather than a TypeError.
"""

from __future__ import annotations

# diffusers' keyword -> jaxdiff's.
ALIASES = {
    "num_inference_steps": "num_steps",
    "num_images_per_prompt": "num_images",
    "mask_image": "mask",
}

# diffusers' keywords without a jaxdiff counterpart -> what to do instead.
ANSWERS = {
    "generator": "jaxdiff draws its noise from seed=<int> (a JAX PRNG seed), not from a torch.Generator; "
                 "pass seed=",
    "callback": "pass progress=True for a per-step progress bar",
    "callback_on_step_end": "pass progress=True for a per-step progress bar",
    "callback_steps": "pass progress=True for a per-step progress bar",
    "return_dict": "jaxdiff returns the images themselves (a list of PIL images, or an array)",
}

def take_aliases(kwargs: dict) -> tuple[dict, dict]:
    """Split `kwargs` into (the rest, {jaxdiff name: value} for the diffusers aliases among
    them). Unsupported diffusers keywords raise a ValueError saying what to use instead."""
    rest, renamed = {}, {}
    for key, value in kwargs.items():
        if key in ANSWERS:
            raise ValueError(f"{key} is not a jaxdiff option: {ANSWERS[key]}")
        if key in ALIASES:
            renamed[ALIASES[key]] = value
        else:
            rest[key] = value
    return rest, renamed


def check_steps(num_steps) -> int:
    """num_steps as an int; a one-line ValueError unless it is a positive integer."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, float)) or int(num_steps) != num_steps \
            or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return int(num_steps)
