"""diffusers scheduler configs <-> jaxdiff schedules and samplers.

A diffusers pipeline folder describes its sampler in `scheduler/scheduler_config.json`: the
noise schedule (beta_schedule, beta_start / beta_end, num_train_timesteps, trained_betas,
rescale_betas_zero_snr), the scheduler class (`_class_name`) and its options. Here

    schedule_from_config(config)      -> the jaxdiff noise schedule
    default_sampler(config)           -> the jaxdiff sampler doing what the class does
    sampler_options(name, config)     -> the options of sampler `name` the config sets
    warn_unsupported(config)          -> a warning per option jaxdiff does not implement

Every key of the config that the chosen sampler also takes (prediction_type, timestep_spacing,
steps_offset, set_alpha_to_one, clip_sample, use_karras_sigmas, ...) carries over, as diffusers'
`OtherScheduler.from_config(pipe.scheduler.config)` carries them (e.g. SD 1.5's "leading" spacing
and steps_offset=1 stay with `sampler="euler"`).
"""

from __future__ import annotations

import warnings

import numpy as np

from jaxdiff import samplers, schedules
from jaxdiff.errors import CheckpointError, JaxdiffWarning

# diffusers scheduler class -> the jaxdiff sampler of the same method.
SCHEDULER_SAMPLERS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "UniPCMultistepScheduler": "unipc",
    "DPMSolverMultistepScheduler": "dpmpp_2m",   # algorithm_type refines it, see _default_sampler
    "LCMScheduler": "lcm",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "FlowMatchHeunDiscreteScheduler": "flow_heun",
}
# Scheduler classes of flow-matching models: their config defines a `schedules.flow` schedule.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# Keys of a flow scheduler config that define the schedule (`schedules.flow`'s keywords).
_FLOW_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
              "max_image_seq_len", "time_shift_type")

# Keys of scheduler configs that define the noise schedule rather than a sampler option.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr")
# Scheduler options jaxdiff does not implement, with the value under which ignoring them is exact.
_UNSUPPORTED = {"use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                "interpolation_type": "linear", "timestep_type": "discrete",
                "lambda_min_clipped": -float("inf")}
_SOLVER_TYPES = {"unipc": ("bh1", "bh2"), "dpmpp_2m": ("midpoint", "heun"), "dpmpp_2m_sde": ("midpoint", "heun"),
                 "dpmpp_3m_sde": ("midpoint", "heun")}


# --------------------------------------------------------------------------------------------
# Scheduler config -> schedule, default sampler, sampler options.
# --------------------------------------------------------------------------------------------

def schedule_from_config(config: dict):
    """The noise schedule of a diffusers scheduler config: a `schedules.FlowSchedule` for the
    flow-matching schedulers (shift, dynamic shifting), else a `DiscreteSchedule` from its beta
    keys."""
    if config.get("_class_name") in FLOW_SCHEDULERS:
        given = {k: config[k] for k in _FLOW_KEYS if config.get(k) is not None}
        return schedules.flow(int(config.get("num_train_timesteps", 1000)), **given)
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float64)
        if config.get("rescale_betas_zero_snr"):
            betas = schedules.rescale_zero_terminal_snr(betas)
        return schedules.from_betas(betas)
    name = config.get("beta_schedule", "linear")
    if name not in schedules.DISCRETE_SCHEDULES:
        raise CheckpointError(f"scheduler beta_schedule={name!r} is not supported; jaxdiff has "
                              f"{', '.join(schedules.DISCRETE_SCHEDULES)}")
    return schedules.discrete(name, num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                              beta_start=float(config.get("beta_start", 0.0001)),
                              beta_end=float(config.get("beta_end", 0.02)),
                              rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)))


def default_sampler(config: dict) -> str:
    """The jaxdiff sampler that does what the config's scheduler class does."""
    cls = config.get("_class_name", "")
    if cls == "DPMSolverMultistepScheduler":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm == "sde-dpmsolver++":
            return "dpmpp_3m_sde" if config.get("solver_order", 2) == 3 else "dpmpp_2m_sde"
        if algorithm != "dpmsolver++":
            warnings.warn(JaxdiffWarning(f"DPMSolverMultistepScheduler algorithm_type={algorithm!r} is not implemented; "
                          "sampling with DPM-Solver++ (dpmpp_2m) instead"), stacklevel=3)
        return "dpmpp_2m"
    if cls not in SCHEDULER_SAMPLERS:
        warnings.warn(JaxdiffWarning(f"scheduler {cls!r} has no jaxdiff counterpart; the default sampler is ddim "
                      f"(known: {', '.join(sorted(SCHEDULER_SAMPLERS))})"), stacklevel=3)
        return "ddim"
    return SCHEDULER_SAMPLERS[cls]


def sampler_options(name: str, config: dict) -> dict:
    """The options of sampler `name` that the scheduler config sets: the keys it shares with the
    sampler carry over, the others keep the sampler's defaults. This is what diffusers'
    `OtherScheduler.from_config(config)` does with a config read from a folder (a scheduler built
    in memory also remembers which keys were left at their defaults and does not carry those)."""
    valid = samplers.options(name)
    out = {k: v for k, v in config.items()
           if k in valid and k != "start_step" and not k.startswith("_") and k not in _SCHEDULE_KEYS}
    if "solver_type" in out and out["solver_type"] not in _SOLVER_TYPES.get(name, (out["solver_type"],)):
        del out["solver_type"]              # e.g. a UniPC "bh2" config used with DPM-Solver
    if name == "dpmpp_3m_sde":
        out.pop("solver_order", None)       # the 3M sampler is order 3 by definition
    if "sigma_min" in out and out["sigma_min"] is None:
        del out["sigma_min"]
    if "sigma_max" in out and out["sigma_max"] is None:
        del out["sigma_max"]
    return out


def warn_unsupported(config: dict) -> None:
    """Warn about every option of `config` that jaxdiff does not implement (and ignores); options
    the config's own sampler takes (e.g. flow_euler's use_beta_sigmas) are implemented."""
    own = SCHEDULER_SAMPLERS.get(config.get("_class_name", ""))
    taken = set(samplers.options(own)) if own else set()
    for key, exact in _UNSUPPORTED.items():
        if key in taken:
            continue
        value = config.get(key, exact)
        if value is not None and value != exact:
            warnings.warn(JaxdiffWarning(f"scheduler option {key}={value!r} is not implemented in jaxdiff and is ignored "
                          f"(samples follow {key}={exact!r})"), stacklevel=3)
