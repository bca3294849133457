"""Keyword arguments every pipeline shares: checks, defaults and diffusers' names.

    options, renamed = take_aliases(kwargs)             # diffusers' names -> jaxdiff's
    check_count("num_images", n)                         # a positive integer, or one ValueError line

diffusers' pipelines name some arguments differently; jaxdiff accepts the plain renamings
(`ALIASES`) and answers the ones that have no counterpart with what to use instead (`ANSWERS`),
in one line, so code written for diffusers fails with a fix rather than a TypeError.
"""

from __future__ import annotations

import numpy as np

# diffusers' keyword -> jaxdiff's.
ALIASES = {
    "num_inference_steps": "num_steps",
    "num_images_per_prompt": "num_images",
}

# diffusers' keywords without a jaxdiff counterpart -> what to do instead.
ANSWERS = {
    "generator": "jaxdiff draws its noise from seed=<int> (a JAX PRNG seed), not from a torch.Generator; "
                 "pass seed=",
    "callback": "pass progress=True for a per-step progress bar",
    "callback_on_step_end": "pass progress=True for a per-step progress bar",
    "callback_steps": "pass progress=True for a per-step progress bar",
    "return_dict": "jaxdiff returns the images themselves (a list of PIL images, or an array)",
    "mask_image": "the mask is inpaint's second argument: pipe.inpaint(image, mask, prompt)",
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


def check_count(name: str, value, what: str = "a positive integer", *, floats: bool = False) -> int:
    """`value` as an int; a one-line ValueError naming `name` unless it is a positive integer (a
    bool never is; an integral float such as 30.0 is, with `floats=True`)."""
    types = (int, np.integer, float) if floats else (int, np.integer)
    if isinstance(value, bool) or not isinstance(value, types) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_steps(num_steps) -> int:
    """num_steps as an int; a one-line ValueError unless it is a positive integer."""
    return check_count("num_steps", num_steps, floats=True)
