"""Configs as code: the base config, loading `experiments/*.py`, and command-line overrides.

A config is an `ml_collections.ConfigDict` returned by a `get_config()` function. The base config
below trains the tiny U-Net on the embedded digits; experiment files start from it and change
what they need (never copy it). The config is unpacked by the trainer into constructors; it never
enters a module.

Overrides look like flax examples / big_vision: `--config.train.steps=2000` or
`--config.data.dataset tfds:mnist`. A key that does not exist is an error naming the nearest
valid keys, so a typo never silently trains the wrong thing.

`validate(cfg, workdir)` refuses a config that cannot train (a step count of 0, a NaN learning
rate, an unknown sampler, a work dir that cannot be written, ...) with one `ConfigError` line
naming the key and the fix, before any data is loaded or anything compiles; `jaxdiff train` and
`jaxdiff.train.loop.train` call it first.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import numbers
import os
import tempfile

import ml_collections

from jaxdiff.errors import ConfigError


def get_config() -> ml_collections.ConfigDict:
    """The default: the tiny U-Net on the embedded MNIST digits, sized to train in a few
    minutes on a 2-core CPU: digits at 16x16 (a 3x cheaper step than 28x28, where XLA's CPU
    convolution gradients dominate; `data.image_size=-1` shrinks only the embedded digits, any
    other dataset keeps its own size unless one is asked for), v-prediction with min-SNR-5 weighting (Hang et al. 2023:
    faster convergence), and 2,000 steps of batch 64."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "digits"          # "digits" | "tfds:NAME[:SPLIT]" | "folder:PATH"
    c.data.batch_size = 64             # global batch, split over every device of every process
    c.data.image_size = -1             # -1: by dataset (the embedded digits 16, others native);
                                       # 0: native size; N: resize to N x N
    c.data.channels = 0                # 0: keep the dataset's channels; else 1 or 3
    c.data.random_flip = False
    c.data.data_dir = ""               # TFDS data_dir ("" = TFDS default)

    c.model = ml_collections.ConfigDict()
    c.model.kind = "unet"              # "unet" | "dit" (models/dit.py): the family model.name is from
    c.model.name = "tiny"              # a key of jaxdiff.models.unet.CONFIGS (or dit.CONFIGS)
    c.model.dropout = 0.0
    c.model.class_conditional = True   # learn p(x | label) with a null class for guidance
    c.model.dtype = "float32"          # compute dtype (one of MODEL_DTYPES); params always float32

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"
    c.diffusion.num_train_timesteps = 1000
    c.diffusion.beta_start = 0.0001
    c.diffusion.beta_end = 0.02
    c.diffusion.rescale_betas_zero_snr = False
    c.diffusion.prediction_type = "v_prediction"   # "epsilon" | "sample" | "v_prediction"
    c.diffusion.min_snr_gamma = 5.0           # 0 disables min-SNR-gamma loss weighting
    c.diffusion.label_dropout = 0.1           # P(label -> null class) in training, for guidance
    # "ddpm" (the schedule above, prediction_type, min-SNR) or "flow" (flow matching, train/flow.py:
    # velocity target, network called at t = sigma * num_train_timesteps; only "flow" reads the rest).
    c.diffusion.objective = "ddpm"
    c.diffusion.flow_timesteps = "logit_normal"   # "uniform" | "logit_normal" | "mode" (SD3 sec. 3.1)
    c.diffusion.logit_mean = 0.0
    c.diffusion.logit_std = 1.0
    c.diffusion.mode_scale = 1.29
    c.diffusion.shift = 1.0                   # sigma -> shift sigma / (1 + (shift - 1) sigma), training and sampling
    c.diffusion.flow_weighting = "none"       # "none" | "sigma_sqrt" | "cosmap"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 200
    c.optim.decay_steps = 0            # 0: constant after warmup; else cosine decay to 0 over this many
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.998

    c.train = ml_collections.ConfigDict()
    c.train.steps = 2000
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.sample_every = 0           # 0: sample only at the end
    c.train.eval_every = 0             # 0: evaluate only at the end (see c.eval)
    c.train.remat = "none"             # U-Net levels recomputed in the backward pass: none | dots | full
    c.train.grad_accum_steps = 1       # k > 1: each update averages k micro-batches of batch_size / k

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                   # device mesh sizes (data x fsdp x tensor = device count);
    c.mesh.fsdp = 1                    # -1: the devices the other two leave
    c.mesh.tensor = 1
    c.mesh.rules = "dp"                # "dp" | "fsdp" (ZeRO-3) | "fsdp_tp" (+ tensor parallel)

    c.sample = ml_collections.ConfigDict()
    c.sample.num = 80                 # 8 rows x one column per class
    c.sample.sampler = "ddim"
    c.sample.steps = 50
    c.sample.guidance_scale = 2.0      # classifier-free guidance of the closing grid (<= 1: none); on the
                                       # demo, 2 gives 100% digits a classifier reads as asked, 1 about 92%

    c.eval = ml_collections.ConfigDict()
    c.eval.num = 500                   # images per evaluation, drawn like the sample grid (0: no evaluation);
                                       # FID-digits against the held-out digits for digit-sized pixel runs
    return c


# The compute dtypes a config may name (`jaxdiff.train.build.DTYPES` maps them to jnp dtypes).
MODEL_DTYPES = ("bfloat16", "float16", "float32")
# Network families (`model.kind`), objectives (`diffusion.objective`), and flow matching's timestep
# densities, loss weightings and the mode density's valid scales (`train/flow.py`).
MODEL_KINDS = ("unet", "dit")
OBJECTIVES = ("ddpm", "flow")
FLOW_TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
FLOW_MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))   # where the mode map stays monotone


def load(path: str | None) -> ml_collections.ConfigDict:
    """The config from a Python file exposing `get_config()`, or the default when `path` is None."""
    if path is None:
        return get_config()
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("jaxdiff_user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report it as theirs
        raise ConfigError(f"could not execute config file {path}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config() function")
    return module.get_config()


def _parse_value(text: str, current):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    if isinstance(current, float):
        try:
            return float(text)  # also "nan" / "inf", which `validate` then refuses by name
        except ValueError:
            raise ConfigError(f"expected float, got {text!r}") from None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"expected {type(current).__name__}, got {text!r}")
    return value


def _all_keys(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from _all_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def flat_items(cfg: ml_collections.ConfigDict) -> list[tuple[str, object]]:
    """Every leaf of `cfg` as (dotted key, value), in the config's order: the keys
    `--config.KEY=VALUE` can set."""
    return [(key, _lookup(cfg, key)) for key in _all_keys(cfg)]


def override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Set `cfg.<dotted> = text`, parsed to the existing field's type. Unknown keys are errors."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            node = None
            break
        node = node[p]
    if node is None or leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
        close = difflib.get_close_matches(dotted, list(_all_keys(cfg)), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key '{dotted}'.{hint}")
    try:
        node[leaf] = _parse_value(text, node[leaf])
    except ConfigError as e:
        raise ConfigError(f"bad value for config key '{dotted}': {e}") from None


def apply_overrides(cfg: ml_collections.ConfigDict, args: list[str]) -> list[str]:
    """Consume `--config.a.b=v` / `--config.a.b v` from `args`; return the remaining args."""
    rest, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config."):
            key = a[len("--config."):]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"missing value for {a}")
            override(cfg, key, value)
        else:
            rest.append(a)
        i += 1
    return rest


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuild a saved config on top of the current defaults, so old runs load after new keys appear."""
    saved = json.loads(text)
    cfg = get_config()

    def merge(node, d):
        for k, v in d.items():
            if isinstance(v, dict) and k in node and isinstance(node[k], ml_collections.ConfigDict):
                merge(node[k], v)
            else:
                with node.ignore_type():
                    node[k] = v

    with cfg.unlocked():
        merge(cfg, saved)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation: every value the trainer would trip over later, refused up front in one line.
# --------------------------------------------------------------------------------------------

def _lookup(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            raise ConfigError(f"config key {key} is missing; start the config from "
                              f"jaxdiff.config.get_config() and change what you need")
        node = node[part]
    return node


def _fix(key: str) -> str:
    """The usual fix of a bad value: the override flag, with the base config's value as example."""
    try:
        example = _lookup(get_config(), key)
    except ConfigError:
        return f"set --config.{key}=VALUE"
    return f"set --config.{key}=VALUE (default {example!r})"


def _bad(key: str, value, must: str) -> ConfigError:
    return ConfigError(f"config key {key} must be {must}, got {value!r}; {_fix(key)}")


def _check_int(cfg, key: str, lo: int, must: str) -> None:
    v = _lookup(cfg, key)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise _bad(key, v, must)


def _check_float(cfg, key: str, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False, must: str = "a finite number") -> None:
    v = _lookup(cfg, key)
    ok = (not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)
          and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
    if not ok:
        raise _bad(key, v, must)


def _check_choice(cfg, key: str, choices) -> None:
    v = _lookup(cfg, key)
    choices = sorted(choices)
    if v not in choices:
        close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
        fix = f"set --config.{key}={close[0]}" if close else _fix(key)
        raise ConfigError(f"config key {key} must be one of {', '.join(map(str, choices))}, got {v!r}; {fix}")


# A LoRA run's `lora.targets` (diffusers' module names; `train/lora.py` maps them to kernels) and
# `lora.style` (what the adapter learns from the base's captioned images; "" = the images as they are).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "ff", "proj")
LORA_STYLES = ("", "bold")


def _check_base(cfg, section: str) -> None:
    """`SECTION.base` of a LoRA / ControlNet run: an existing folder (a Stable Diffusion folder)."""
    key = f"{section}.base"
    base = _lookup(cfg, key)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config key {key} must name a Stable Diffusion folder (what `jaxdiff export` "
                          f"writes), got {base!r}; set --config.{key}=FOLDER")
    if not os.path.isdir(base):
        raise ConfigError(f"config key {key}: {base} is not a folder; export a latent text run with "
                          f"`jaxdiff export RUN --out FOLDER` and pass --config.{key}=FOLDER")


def _check_lora(cfg) -> None:
    """The `lora` section: base folder, rank, alpha, targets, style, keep, text_encoder."""
    _check_base(cfg, "lora")
    _check_int(cfg, "lora.rank", 1, "a positive integer (the adapters' rank r)")
    _check_float(cfg, "lora.alpha", 0.0, lo_open=True, must="a finite number > 0 (updates are scaled by alpha / rank)")
    targets = _lookup(cfg, "lora.targets")
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
        raise _bad("lora.targets", targets, f"a non-empty list of layer names from {', '.join(LORA_TARGETS)}")
    for t in targets:
        if t not in LORA_TARGETS:
            close = difflib.get_close_matches(str(t), LORA_TARGETS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"config key lora.targets holds {t!r}{hint}; valid layer names: {', '.join(LORA_TARGETS)}")
    _check_choice(cfg, "lora.style", LORA_STYLES)
    if cfg.lora.style and cfg.data.dataset != "captioned_digits":
        raise ConfigError(f"config key lora.style={cfg.lora.style!r} restyles the embedded digits; it needs "
                          f"--config.data.dataset=captioned_digits, not {cfg.data.dataset!r}")
    _check_float(cfg, "lora.keep", 0.0, 1.0, must="a fraction in [0, 1] (of the original examples kept)")
    if _lookup(cfg, "lora.text_encoder"):
        raise ConfigError("config key lora.text_encoder=True: text-encoder adapters are not trained yet; "
                          "set --config.lora.text_encoder=False")
    _check_float(cfg, "text.dropout", 0.0, 1.0, must="a probability in [0, 1]")


# A ControlNet run's `controlnet.control` (what control image is derived from each training image,
# `train/controlnet.py`) and `controlnet.init` ("unet": the base U-Net's encoder, as diffusers'
# ControlNetModel.from_unet; "random": a fresh encoder; the zero convolutions start at zero either way).
CONTROLNET_CONTROLS = ("edges", "skeleton")
CONTROLNET_INITS = ("unet", "random")


def _check_controlnet(cfg) -> None:
    """The `controlnet` section: base folder, control, init, embedding channels, held-out count."""
    _check_base(cfg, "controlnet")
    _check_choice(cfg, "controlnet.control", CONTROLNET_CONTROLS)
    _check_choice(cfg, "controlnet.init", CONTROLNET_INITS)
    channels = _lookup(cfg, "controlnet.embedding_channels")
    if (not isinstance(channels, (list, tuple)) or not channels
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)):
        raise _bad("controlnet.embedding_channels", channels, "a non-empty list of positive integers (the control "
                   "embedding's widths; its length - 1 halvings take the image to the latent size)")
    _check_int(cfg, "controlnet.holdout", 0, "an integer >= 0 (examples kept out of training)")
    _check_float(cfg, "text.dropout", 0.0, 1.0, must="a probability in [0, 1]")


def _check_model_and_objective(cfg) -> None:
    """model.kind / model.name, and the flow-matching options of diffusion.objective="flow"."""
    from jaxdiff import samplers
    from jaxdiff.models import dit, unet

    _check_choice(cfg, "model.kind", MODEL_KINDS)
    _check_choice(cfg, "model.name", unet.CONFIGS if cfg.model.kind == "unet" else dit.CONFIGS)
    if cfg.model.kind == "dit" and ("lora" in cfg or "controlnet" in cfg):
        raise ConfigError("model.kind=dit is class-conditional and trains on pixels or on a vae section's "
                          "latents; it takes no lora or controlnet section (delete it or use model.kind=unet)")
    _check_choice(cfg, "diffusion.objective", OBJECTIVES)
    if cfg.diffusion.objective != "flow":
        return
    _check_choice(cfg, "diffusion.flow_timesteps", FLOW_TIMESTEP_DENSITIES)
    _check_float(cfg, "diffusion.logit_mean")
    _check_float(cfg, "diffusion.logit_std", 0.0, lo_open=True, must="a finite number > 0")
    lo, hi = FLOW_MODE_SCALE_RANGE
    _check_float(cfg, "diffusion.mode_scale", lo, hi, must=f"in [{lo:g}, {hi:.4f}] (where the mode density is monotone)")
    _check_float(cfg, "diffusion.shift", 0.0, lo_open=True, must="a finite number > 0 (1: no shift)")
    _check_choice(cfg, "diffusion.flow_weighting", FLOW_WEIGHTINGS)
    if (sampler := cfg.sample.sampler) in samplers.names() and not samplers.samples_flow(sampler):
        raise ConfigError(f"config key sample.sampler={sampler!r} cannot sample a flow-matching run "
                          "(diffusion.objective=flow); set --config.sample.sampler=flow_euler (or flow_heun, "
                          "dpmpp_2m, unipc)")


def validate(cfg: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Refuse a config the trainer cannot run, before anything is loaded or compiled.

    Raises `ConfigError` with one line naming the key, the value and the fix for: step counts and
    intervals below 1 (`train.steps`, `log_every`, `checkpoint_every`, `keep_checkpoints`; a
    negative `sample_every`), a non-positive batch, a learning rate that is not a positive finite
    number, probabilities and decays outside their range (`optim.ema_decay`, `optim.b1/b2`,
    `diffusion.label_dropout`, `model.dropout`, `text.dropout`), NaN or infinite float knobs
    (`sample.guidance_scale`, betas, min-SNR gamma, ...), and names that are not known (model
    kind and name, dtype, schedule, prediction type, objective, remat policy, sharding rules,
    the sample sampler). With `diffusion.objective="flow"`, its timestep density, logit-normal
    std, mode scale, shift and weighting, and a sample sampler that is not a flow sampler. With
    `lora` section (a LoRA run), its base folder, rank, alpha, target and style names; with a
    `controlnet` section, its base folder, control and init names, embedding widths. With
    `workdir`, also a work dir that cannot be written (probed with a temporary file, in the
    work dir or, when it does not exist yet, in its nearest existing parent: nothing is left
    behind).
    """
    from jaxdiff import samplers, sharding
    from jaxdiff.models import unet
    from jaxdiff.parameterization import PREDICTION_TYPES
    from jaxdiff.schedules import DISCRETE_SCHEDULES

    _check_int(cfg, "seed", -2 ** 63, "an integer")

    _check_int(cfg, "data.batch_size", 1, "a positive integer (the global batch)")
    _check_int(cfg, "data.image_size", -1, "-1 (by dataset), 0 (native size) or a positive size")
    _check_choice(cfg, "data.channels", (0, 1, 3))

    _check_model_and_objective(cfg)
    _check_choice(cfg, "model.dtype", MODEL_DTYPES)
    _check_float(cfg, "model.dropout", 0.0, 1.0, hi_open=True, must="a probability in [0, 1)")

    _check_choice(cfg, "diffusion.schedule", DISCRETE_SCHEDULES)
    _check_int(cfg, "diffusion.num_train_timesteps", 2, "an integer >= 2")
    for key in ("diffusion.beta_start", "diffusion.beta_end"):
        _check_float(cfg, key, 0.0, 1.0, hi_open=True, must="a finite number in [0, 1)")
    _check_choice(cfg, "diffusion.prediction_type", PREDICTION_TYPES)
    _check_float(cfg, "diffusion.min_snr_gamma", 0.0, must="a finite number >= 0 (0 disables the weighting)")
    _check_float(cfg, "diffusion.label_dropout", 0.0, 1.0, must="a probability in [0, 1]")

    _check_float(cfg, "optim.learning_rate", 0.0, lo_open=True, must="a finite number > 0")
    _check_int(cfg, "optim.warmup_steps", 0, "an integer >= 0")
    _check_int(cfg, "optim.decay_steps", 0, "an integer >= 0 (0: constant after warmup)")
    _check_float(cfg, "optim.weight_decay", 0.0, must="a finite number >= 0")
    for key in ("optim.b1", "optim.b2"):
        _check_float(cfg, key, 0.0, 1.0, hi_open=True, must="a finite number in [0, 1)")
    _check_float(cfg, "optim.grad_clip", 0.0, must="a finite number >= 0 (0 disables clipping)")
    _check_float(cfg, "optim.ema_decay", 0.0, 1.0, must="a finite number in [0, 1]")

    _check_int(cfg, "train.steps", 1, "a positive integer (the number of training steps)")
    _check_int(cfg, "train.log_every", 1, "a positive integer (log every N steps)")
    _check_int(cfg, "train.checkpoint_every", 1, "a positive integer (save every N steps)")
    _check_int(cfg, "train.keep_checkpoints", 1, "a positive integer (checkpoints kept)")
    _check_int(cfg, "train.sample_every", 0, "an integer >= 0 (0: sample only at the end)")
    _check_int(cfg, "train.eval_every", 0, "an integer >= 0 (0: evaluate only at the end)")
    _check_int(cfg, "eval.num", 0, "an integer >= 0 (images per evaluation; 0: no evaluation)")
    _check_choice(cfg, "train.remat", unet.REMAT_POLICIES)
    if "grad_accum_steps" in cfg.train:
        _check_int(cfg, "train.grad_accum_steps", 1, "a positive integer (micro-batches per update)")
        if cfg.data.batch_size % cfg.train.grad_accum_steps:
            raise _bad("train.grad_accum_steps", cfg.train.grad_accum_steps,
                       f"a divisor of data.batch_size={cfg.data.batch_size} (micro-batches per update)")

    _check_choice(cfg, "mesh.rules", sharding.RULES)

    _check_int(cfg, "sample.num", 1, "a positive integer (images in the sample grid)")
    _check_choice(cfg, "sample.sampler", samplers.names())
    _check_int(cfg, "sample.steps", 1, "a positive integer (sampler steps)")
    _check_float(cfg, "sample.guidance_scale", must="a finite number (<= 1: no guidance)")
    if "eval_guidance_scales" in cfg.sample:
        for s in _lookup(cfg, "sample.eval_guidance_scales"):
            if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
                raise _bad("sample.eval_guidance_scales", s, "a list of finite numbers")

    if "vae" in cfg:
        _check_int(cfg, "vae.steps", 0, "an integer >= 0 (autoencoder fitting steps)")
        _check_int(cfg, "vae.batch_size", 1, "a positive integer")
        _check_float(cfg, "vae.learning_rate", 0.0, lo_open=True, must="a finite number > 0")
        _check_float(cfg, "vae.kl_weight", 0.0, must="a finite number >= 0")
    if "text" in cfg:
        _check_float(cfg, "text.dropout", 0.0, 1.0, must="a probability in [0, 1]")
    if "lora" in cfg:
        _check_lora(cfg)
    if "controlnet" in cfg:
        if "lora" in cfg:
            raise ConfigError("a config has a lora or a controlnet section, not both; delete one "
                              "(--config.lora or --config.controlnet)")
        _check_controlnet(cfg)

    if workdir is not None:
        check_writable(workdir)


def check_writable(folder: str, *, what: str = "work dir",
                   fix: str = "pass --workdir a folder you can write to") -> None:
    """Raise `ConfigError` unless files can be written in `folder` (or, when it does not exist
    yet, in the nearest existing folder above it, where it would be created). A temporary probe
    file is created and removed; nothing else is touched. `what` names the folder in the message,
    `fix` says what to do."""
    path = os.path.abspath(folder)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise ConfigError(f"{what} {folder} {where}; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".jaxdiff-write-probe-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"{what} {folder} cannot be written ({reason} in {existing}); {fix}") from None
