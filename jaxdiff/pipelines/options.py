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


def check_size(height, width, *, multiple: int, default: int | None, why: str) -> tuple[int, int]:
    """(height, width) of a text-to-image call: None or 0 takes `default` (the network's sample size
    in pixels; None: the config has none), each a positive integer and a multiple of `multiple`,
    or a one-line ValueError saying `why` and the nearest sizes that work."""
    height, width = height or default, width or default
    if height is None or width is None:
        raise ValueError("this model's config has no sample_size; pass height and width")
    height = check_count("height", height, "a positive integer number of pixels")
    width = check_count("width", width, "a positive integer number of pixels")
    m = int(multiple)
    if height % m or width % m:
        raise ValueError(f"height and width must be positive multiples of {m} ({why}), got {height}x{width}; try "
                         f"{max(m, round(height / m) * m)}x{max(m, round(width / m) * m)}")
    return height, width


def check_steps(num_steps) -> int:
    """num_steps as an int; a one-line ValueError unless it is a positive integer."""
    return check_count("num_steps", num_steps, floats=True)
