"""`jaxdiff` on the command line.

    jaxdiff train    [--config experiments/X.py] [--config.a.b=value ...] [--workdir DIR]
    jaxdiff sample   --checkpoint DIR [--num 64] [--sampler ddim] [--steps 50] [--seed 0]
                     [--labels 0,1,2 | --labels grid] [--guidance_scale 2.0] [--rules fsdp]
                     [--out grid.png] [--recipe PNG] [--no-recipe]
    jaxdiff generate --model SD_FOLDER --prompt "..." [--negative_prompt "..."] [--steps 30]
                     [--sampler dpmpp_2m] [--guidance_scale 7.5] [--seed 0] [--num 1]
                     [--height H --width W] [--dtype bfloat16] [--rules fsdp] [--out generated.png]
                     [--lora FILE[:SCALE] ...] [--recipe PNG] [--no-recipe] [--no-watermark]
    jaxdiff info     IMAGE.png     what made a picture jaxdiff wrote (its recipe)
    jaxdiff convert  --single_file model.safetensors --out SD_FOLDER [--tokenizer DIR]
                     [--prediction_type v_prediction]
    jaxdiff export   RUN_DIR --out SD_FOLDER [--step N] [--no-ema]
    jaxdiff export-lora LORA_RUN_DIR --out FILE_OR_DIR [--step N] [--no-ema]
    jaxdiff eval     --checkpoint DIR [--metric fid,kid,pr] [--num 1000] [--seeds 3] [--ref STATS.npz]
                     [--inception WEIGHTS.safetensors] [--sampler ddim] [--steps 50] [--out report.json]
    jaxdiff eval     --model FOLDER --prompts FILE --clip CLIP_FOLDER [--metric clip_score,fid] [--seeds 1]
    jaxdiff COMMAND --help     every flag of COMMAND (for train: every config key and its value)
    jaxdiff --version

Multi-host: start the same command on every host with `--coordinator_address host0:port
--num_processes N --process_id i` (on Cloud TPU VMs JAX finds these itself). For `train` the device
mesh and parameter layout come from `--config.mesh.{data,fsdp,tensor,rules}`; `sample` and
`generate` split the batch over every device of every process and lay the parameters out by
`--rules dp|fsdp|fsdp_tp`; only process 0 writes the picture.

Preemption: on SIGTERM `jaxdiff train` finishes the current step, checkpoints it, prints
"preempted at step N" and exits with status 0; running the same command again resumes.

Errors a user can fix (bad flag or config value, missing dataset, missing or corrupt checkpoint,
wrong image shape, diverged loss) print one line naming the problem and exit with status 2; a bad
flag or config value is refused before any data is loaded or anything compiles. Set
JAXDIFF_DEBUG=1 to see the full traceback instead.

`train`, `sample` and `generate` keep compiled programs in JAX's persistent cache
($XDG_CACHE_HOME/jaxdiff/xla or ~/.cache/jaxdiff/xla; JAXDIFF_COMPILATION_CACHE=DIR moves it,
JAXDIFF_COMPILATION_CACHE=off turns it off), so a second run with the same shapes skips compiling.

Provenance: every PNG `sample`, `generate` and `train` write carries its recipe in PNG text
chunks (model and weights fingerprint, prompt, seed, sampler, steps, guidance, size, versions;
`jaxdiff info IMAGE.png` prints it); `--recipe IMAGE.png` replays it (flags given as well
override it), `--no-recipe` (or JAXDIFF_RECIPE=off) writes none. `generate` embeds SDXL's
invisible watermark in pictures from SDXL folders, as diffusers does; `--no-watermark` leaves it
out. See `jaxdiff.provenance`.

Why this file is long: it is the whole command line, one parser and one short handler per
command, next to the flag types and the error handling they share; splitting it would scatter
what a reader of `jaxdiff --help` wants in one place.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys

# diffusers' flag names people try, answered with what jaxdiff takes instead.
_ANSWERS = {"--generator": "jaxdiff draws its noise from --seed N (a JAX PRNG seed), not from a torch.Generator; "
                           "pass --seed"}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`jaxdiff CMD: error: ...`, exit status 2) and no silent
    prefix matching (`--conf` must not stand for `--config`)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Answer(argparse.Action):
    """A flag jaxdiff does not take under that name: refused with the jaxdiff flag to use."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not a jaxdiff flag: {_ANSWERS[option_string]}")


def _add_answers(parser: argparse.ArgumentParser) -> None:
    for flag in _ANSWERS:
        parser.add_argument(flag, action=_Answer, metavar="X", help="diffusers' flag, refused: use --seed")


def _int_at_least(lowest: int, what: str):
    """An argparse type: an integer >= `lowest`, else one line saying it must be `what`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lowest:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _sampler_name(text: str) -> str:
    from jaxdiff import samplers

    if text not in samplers.names():
        close = difflib.get_close_matches(text, samplers.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise argparse.ArgumentTypeError(f"unknown sampler {text!r}{hint}; valid: {', '.join(samplers.names())}")
    return text


def _sampler_names() -> str:
    from jaxdiff import samplers

    return ", ".join(samplers.names())


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------

_OVERRIDES_HELP = """\
config overrides:
  Every config key below can be set on the command line, after the config file is loaded:
      --config.train.steps=500   or   --config.train.steps 500
      --config.data.dataset=tfds:mnist --config.optim.learning_rate=1e-3 --config.data.random_flip=true
  The value is read as the key's type (int, float, true/false, string, a Python tuple); an
  unknown key is an error naming the nearest ones. Bad values (train.steps=0, a NaN learning
  rate, an unknown sampler, ...) are refused before any data is loaded.
"""


def _format_value(value) -> str:
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _config_keys_help(cfg, config_path: str | None) -> str:
    from jaxdiff import config as config_lib

    items = config_lib.flat_items(cfg)
    width = max(len(k) for k, _ in items) + 2
    source = config_path or "the base config, jaxdiff.config.get_config"
    lines = [f"config keys and their values (from {source}, with any overrides given):"]
    lines += [f"  {k.ljust(width)}{_format_value(v)}" for k, v in items]
    return "\n".join(lines)


def _train_parser(cfg, config_path: str | None) -> _Parser:
    parser = _Parser(
        prog="jaxdiff train",
        usage="jaxdiff train [--config FILE] [--config.KEY=VALUE ...] [--workdir DIR] [--no-progress]\n"
              "                     [--coordinator_address HOST:PORT --num_processes N --process_id I]",
        description="Train a diffusion model, or resume the run in --workdir. At the end the work dir holds\n"
                    "checkpoints/, metrics.jsonl, tb/ (TensorBoard), samples.png, loss.png, provenance.json (what\n"
                    "produced the run, appended at every start and resume) and MODEL_CARD.md.",
        epilog=_OVERRIDES_HELP + "\n" + _config_keys_help(cfg, config_path))
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="Python file with get_config() (default: the digits demo, jaxdiff.config.get_config); "
                             "with --help, the keys listed below are that file's")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where checkpoints, metrics and samples go; an existing run there is resumed "
                             "(default: runs/<config name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_distributed_args(parser)
    return parser


def _train(argv: list[str]) -> int:
    from jaxdiff import config as config_lib

    # `--config.a.b=v` cannot be declared up front: strip them before argparse sees the rest.
    config_path = _peek_config_path(argv)
    cfg = config_lib.load(config_path)
    rest = config_lib.apply_overrides(cfg, argv)
    args = _train_parser(cfg, config_path).parse_args(rest)
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "digits"
    workdir = args.workdir or os.path.join("runs", name)
    config_lib.validate(cfg, workdir)          # before anything is built (train() checks again)
    _maybe_init_distributed(args)

    from jaxdiff.pipelines import evaluate, write_run_samples
    from jaxdiff.train import loop

    state = loop.train(cfg, workdir, progress=not args.no_progress, write_samples=write_run_samples,
                       evaluate=evaluate.evaluate_run)
    if int(state.step) < cfg.train.steps:  # preempted: saved, message printed, resume later
        return 0
    written = [f"{what} in {path}" for what, path in (("samples", os.path.join(workdir, "samples.png")),
                                                      ("loss curve", os.path.join(workdir, "loss.png")))
               if os.path.isfile(path)]
    print(f"done: step {int(state.step)}, checkpoints in {os.path.join(workdir, 'checkpoints')}"
          + "".join(f", {w}" for w in written))
    return 0


def _peek_config_path(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _add_distributed_args(parser: argparse.ArgumentParser, *, rules: bool = False) -> None:
    """The multi-host flags (and, for the sampling commands, the parameter layout)."""
    parser.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                        help="host:port of process 0 (multi-host; automatic on Cloud TPU VMs)")
    parser.add_argument("--num_processes", type=_positive_int, default=None, metavar="N",
                        help="processes in the run (multi-host)")
    parser.add_argument("--process_id", type=_nonnegative_int, default=None, metavar="I",
                        help="this process, 0..num_processes-1")
    if rules:
        parser.add_argument("--rules", default="dp", choices=("dp", "fsdp", "fsdp_tp"),
                            help="parameter layout over the devices: dp replicates the weights, fsdp splits "
                                 "them (the batch is split over all devices either way; default: dp)")


def _maybe_init_distributed(args) -> None:
    from jaxdiff import sharding

    sharding.init_distributed(args.coordinator_address, args.num_processes, args.process_id)


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """Refuse an --out that cannot be written before any work is done."""
    from jaxdiff import config as config_lib
    from jaxdiff.errors import ConfigError

    try:
        config_lib.check_writable(os.path.dirname(os.path.abspath(out)), what="argument --out: folder",
                                  fix="choose an --out in a folder you can write to")
    except ConfigError as e:
        parser.error(str(e))


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------

def _sample_parser() -> _Parser:
    parser = _Parser(prog="jaxdiff sample",
                     description="Sample a trained pixel model (a `jaxdiff train` work dir) into a PNG grid.")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="work dir, its checkpoints/ or checkpoints/<step> (default: the latest step)")
    parser.add_argument("--num", "--num_images_per_prompt", dest="num", type=_positive_int, default=64, metavar="N",
                        help="number of images (default: 64)")
    parser.add_argument("--sampler", type=_sampler_name, default=None, metavar="NAME",
                        help=f"one of {_sampler_names()} (default: the model's: ddim, or flow_euler for a "
                             "flow-matching run)")
    parser.add_argument("--steps", "--num_inference_steps", dest="steps", type=_positive_int, default=50,
                        metavar="N", help="sampler steps (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise: the same seed gives the same "
                                                            "images on any number of devices (default: 0)")
    parser.add_argument("--eta", type=_finite_float, default=None, help="DDIM eta (0: deterministic)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated class ids (one id: all images of that class), or 'grid' for "
                             "0..K-1 repeated (one class per column); default: the null class")
    parser.add_argument("--guidance_scale", type=_finite_float, default=None, metavar="S",
                        help="classifier-free guidance scale, on when > 1 (default: off)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw rather than the EMA parameters")
    parser.add_argument("--warmup", action="store_true",
                        help="compile every program first, report how many and how long, then run them")
    _add_deep_cache(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default="samples.png", metavar="PNG", help="the grid to write (default: samples.png)")
    _add_recipe_args(parser)
    _add_answers(parser)
    _add_distributed_args(parser, rules=True)
    return parser


def _add_deep_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deep-cache", "--deep_cache", dest="deep_cache", type=_nonnegative_int, default=None, metavar="K",
                        help="DeepCache: the whole U-Net every K-th step, its outer level alone in between "
                             "(faster, slightly different; default: off)")


def _parse_labels(parser: argparse.ArgumentParser, text: str | None, num: int):
    if text is None or text == "grid":
        return None
    try:
        labels = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"argument --labels: must be comma-separated integers or 'grid', got {text!r}")
    if len(labels) == 1:
        import numpy as np
        return np.full((num,), labels[0], np.int32)
    if len(labels) != num:
        parser.error(f"argument --labels: {len(labels)} labels for --num {num}; give {num}, one, or 'grid'")
    return labels


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None, metavar="PNG",
                        help="make the picture a jaxdiff PNG was made from again: its recipe gives every "
                             "flag, flags given here override it")
    parser.add_argument("--no-recipe", action="store_true",
                        help="write no recipe into the PNG (JAXDIFF_RECIPE=off does it for every command)")


def _with_recipe(parser: argparse.ArgumentParser, argv: list[str], command: str, required: str):
    """Parse argv; with --recipe, parse the recipe's flags first and argv's over them. The flag
    `required` must come from one or the other."""
    args = parser.parse_args(argv)
    if args.recipe is not None:
        from jaxdiff import provenance

        args = parser.parse_args(provenance.command_args(provenance.read_recipe(args.recipe), command) + argv)
    if getattr(args, required) is None:
        parser.error(f"the following arguments are required: --{required} (or --recipe PNG)")
    return args


def _check_replay(recipe_path: str | None, weights: str) -> None:
    """Warn when the weights used differ from those the replayed recipe names."""
    if recipe_path is None:
        return
    import warnings

    from jaxdiff import provenance
    from jaxdiff.errors import JaxdiffWarning

    recorded = provenance.read_recipe(recipe_path).get("weights")
    if recorded and recorded != weights:
        warnings.warn(JaxdiffWarning(f"the weights differ from those {recipe_path} was made with ({weights} here, "
                                     f"{recorded} in the recipe): the picture will differ"), stacklevel=2)


def _model_name(path: str) -> str:
    """The model as a recipe names it: the path as typed when relative, else its last part (no
    absolute path of this machine goes into a picture)."""
    return os.path.basename(os.path.normpath(path)) if os.path.isabs(path) else os.path.normpath(path)


def _sample(argv: list[str]) -> int:
    parser = _sample_parser()
    args = _with_recipe(parser, argv, "sample", "checkpoint")
    labels = _parse_labels(parser, args.labels, args.num)
    _check_out(parser, args.out)
    _maybe_init_distributed(args)

    import jaxdiff

    model = jaxdiff.load(args.checkpoint, rules=args.rules)
    if args.labels == "grid":
        labels = model.grid_labels(args.num)
    options = {} if args.eta is None else {"eta": args.eta}
    call = dict(sampler=args.sampler, num_steps=args.steps, seed=args.seed, labels=labels,
                guidance_scale=args.guidance_scale, use_ema=not args.no_ema,
                progress=not args.no_progress and _is_main_process(), deep_cache=args.deep_cache, **options)
    if args.warmup:
        _warmup(parser, model.warmup, args.num, **call)
    imgs = model.sample(args.num, **call)
    if _is_main_process():
        from jaxdiff import provenance
        from jaxdiff.checkpoint import resolve

        directory, step = resolve(args.checkpoint)
        step = step if step is not None else max(int(d) for d in os.listdir(directory) if d.isdigit())
        weights = provenance.checkpoint_fingerprint(os.path.join(directory, str(step)))
        _check_replay(args.recipe, weights)
        recipe = None if not provenance.enabled(args.no_recipe) else provenance.make_recipe(
            "sample", model=_model_name(args.checkpoint), weights=weights, seed=args.seed, num_images=args.num,
            index=0 if args.num == 1 else None, sampler=args.sampler or model.default_sampler,
            sampler_options={"eta": args.eta}, steps=args.steps, guidance_scale=args.guidance_scale,
            height=int(imgs.shape[1]), width=int(imgs.shape[2]),
            options={"labels": args.labels, "use_ema": not args.no_ema, "step": step, "deep_cache": args.deep_cache})
        ncols = model.num_classes if args.labels == "grid" else None
        provenance.save_png(imgs, args.out, recipe, ncols=ncols)
        print(f"wrote {args.num} samples to {args.out}{_devices_note(model.mesh)}")
    return 0


def _warmup(parser, warmup, *args, **kwargs) -> None:
    """Compile a call's programs ahead of it (`jaxdiff.pipelines.warmup`); one line on stderr."""
    report = warmup(*args, **kwargs)
    if _is_main_process():
        print(f"{parser.prog}: {report}", file=sys.stderr, flush=True)


def _devices_note(mesh) -> str:
    n = mesh.devices.size
    return f" (batch over {n} device{'s' if n > 1 else ''})"


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------

def _convert_parser() -> _Parser:
    parser = _Parser(
        prog="jaxdiff convert",
        description="Convert a Stable Diffusion 1.x/2.x/XL single-file .safetensors checkpoint into a "
                    "diffusers-format pipeline folder.")
    parser.add_argument("--single_file", required=True, metavar="FILE",
                        help="the .safetensors checkpoint (LDM layout)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the pipeline folder to write")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="CLIP tokenizer folder to copy in (single files hold none)")
    parser.add_argument("--prediction_type", default="epsilon", choices=("epsilon", "v_prediction"),
                        help="v_prediction for SD 2.x 768-v checkpoints (not readable from the weights; "
                             "default: epsilon)")
    parser.add_argument("--use_ema", action="store_true",
                        help="take the U-Net from the file's EMA copy (model_ema.*, in full-ema files)")
    return parser


def _convert(argv: list[str]) -> int:
    args = _convert_parser().parse_args(argv)

    import warnings

    from jaxdiff.convert.single_file import to_diffusers_folder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes are printed below
        notes = to_diffusers_folder(args.single_file, args.out, prediction_type=args.prediction_type,
                                    use_ema=args.use_ema, tokenizer_dir=args.tokenizer)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

def _export_parser() -> _Parser:
    parser = _Parser(prog="jaxdiff export",
                     description="Write a latent text-to-image run (experiments/digits_text.py) as a diffusers "
                                 "Stable Diffusion folder, loadable by jaxdiff.StableDiffusion and diffusers.")
    parser.add_argument("run", metavar="RUN_DIR", help="the run's work dir (or its checkpoints/ or one step folder)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the pipeline folder to write")
    parser.add_argument("--step", type=_nonnegative_int, default=None, help="the step to export (default: latest)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA ones")
    return parser


def _export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)

    from jaxdiff.pipelines.export import export_run

    for note in export_run(args.run, args.out, args.step, ema=not args.no_ema):
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def _export_lora_parser() -> _Parser:
    parser = _Parser(prog="jaxdiff export-lora",
                     description="Write the adapters of a LoRA run (a config with a lora section, e.g. "
                                 "experiments/digits_lora.py) as diffusers' pytorch_lora_weights.safetensors, "
                                 "loadable by load_lora_weights and StableDiffusion.load_lora.")
    parser.add_argument("run", metavar="RUN_DIR", help="the LoRA run's work dir (or its checkpoints/ or one step folder)")
    parser.add_argument("--out", required=True, metavar="FILE_OR_DIR",
                        help="a .safetensors file, or a folder to hold pytorch_lora_weights.safetensors")
    parser.add_argument("--step", type=_nonnegative_int, default=None, help="the step to export (default: latest)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw adapters, not the EMA ones")
    return parser


def _export_lora(argv: list[str]) -> int:
    args = _export_lora_parser().parse_args(argv)

    from jaxdiff.train.lora_export import export_lora

    print(f"wrote {export_lora(args.run, args.out, args.step, ema=not args.no_ema)}")
    return 0


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------

def _generate_parser() -> _Parser:
    parser = _Parser(prog="jaxdiff generate",
                     description="Text to image with a diffusers-format folder: Stable Diffusion 1.x / 2.x / XL, "
                                 "Stable Diffusion 3 or Flux (the family is read from its model_index.json).")
    parser.add_argument("--model", default=None, metavar="FOLDER",
                        help="local diffusers pipeline folder (model_index.json and its parts)")
    parser.add_argument("--prompt", default=None, help="the text to draw (required unless --recipe gives it)")
    parser.add_argument("--negative_prompt", default=None,
                        help="the text guidance steers away from (default: the empty prompt)")
    parser.add_argument("--steps", "--num_inference_steps", dest="steps", type=_positive_int, default=30,
                        metavar="N", help="sampler steps (default: 30)")
    parser.add_argument("--sampler", type=_sampler_name, default=None, metavar="NAME",
                        help=f"one of {_sampler_names()} (default: the folder's scheduler)")
    parser.add_argument("--guidance_scale", type=_finite_float, default=None, metavar="S",
                        help="guidance scale, classifier-free guidance on when > 1 (default: the family's: "
                             "7.5 Stable Diffusion, 7 SD3, 3.5 Flux)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    parser.add_argument("--num", "--num_images_per_prompt", dest="num", type=_positive_int, default=1, metavar="N",
                        help="number of images (several go into one grid; default: 1)")
    parser.add_argument("--height", type=_positive_int, default=None, metavar="PIXELS",
                        help="image height (default: the U-Net's sample size x the VAE factor)")
    parser.add_argument("--width", type=_positive_int, default=None, metavar="PIXELS",
                        help="image width (default: as --height)")
    parser.add_argument("--eta", type=_finite_float, default=None, help="DDIM eta (0: deterministic)")
    parser.add_argument("--clip_skip", type=_nonnegative_int, default=None, metavar="N",
                        help="take the text states N layers before the last (default: 0, the last)")
    parser.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                        help="a LoRA (diffusers/PEFT or kohya .safetensors, or a folder holding one) at SCALE "
                             "(default 1); repeat the flag for several")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the networks (bfloat16 on GPU/TPU; default: float32)")
    parser.add_argument("--warmup", action="store_true",
                        help="compile every program first, report how many and how long, then run them")
    _add_deep_cache(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default="generated.png", metavar="PNG",
                        help="the picture (a grid for several) to write (default: generated.png)")
    _add_recipe_args(parser)
    parser.add_argument("--no-watermark", action="store_true",
                        help="no invisible watermark (embedded by default in pictures of SDXL folders at least "
                             "256 pixels wide, as diffusers does; see jaxdiff.provenance.watermark)")
    _add_answers(parser)
    _add_distributed_args(parser, rules=True)
    return parser


def _lora_spec(parser: argparse.ArgumentParser, spec: str) -> tuple[str, float]:
    """"FILE" or "FILE:SCALE" -> (FILE, SCALE) (scale 1 by default)."""
    path, _, scale = spec.rpartition(":")
    if path and not os.path.exists(spec):
        try:
            return path, _finite_float(scale)
        except argparse.ArgumentTypeError:
            pass
    return spec, 1.0


def _generate(argv: list[str]) -> int:
    parser = _generate_parser()
    args = _with_recipe(parser, argv, "generate", "model")
    if args.prompt is None:
        parser.error("the following arguments are required: --prompt (or --recipe PNG)")
    _check_out(parser, args.out)
    _maybe_init_distributed(args)

    import jax.numpy as jnp

    import jaxdiff
    from jaxdiff import provenance

    quiet = args.no_progress or not _is_main_process()
    pipe = jaxdiff.from_pretrained(args.model, dtype=getattr(jnp, args.dtype), progress=not quiet, rules=args.rules)
    if args.no_watermark and hasattr(pipe, "watermark"):
        pipe.watermark = False
    loras = [_lora_spec(parser, spec) for spec in args.lora or []]
    if loras and not hasattr(pipe, "load_lora"):
        parser.error(f"argument --lora: {type(pipe).__name__} pipelines take no LoRA here (Stable Diffusion ones do)")
    for path, scale in loras:
        pipe.load_lora(path, scale=scale)
    # Options only some families take are passed only when given (SD3 and Flux have no clip skip).
    given = (("eta", args.eta), ("clip_skip", args.clip_skip), ("guidance_scale", args.guidance_scale),
             ("deep_cache", args.deep_cache))
    extra = {k: v for k, v in given if v is not None}
    call = dict(negative_prompt=args.negative_prompt, num_steps=args.steps, sampler=args.sampler, seed=args.seed,
                num_images=args.num, height=args.height, width=args.width, output_type="uint8",
                progress=not quiet, **extra)
    if args.warmup:
        if not hasattr(pipe, "warmup"):
            parser.error(f"argument --warmup: {type(pipe).__name__} pipelines have no warm-up (Stable Diffusion ones do)")
        _warmup(parser, pipe.warmup, args.prompt, **call)
    pixels = pipe(args.prompt, **call)
    if not _is_main_process():
        return 0
    weights = provenance.weights_fingerprint(args.model)
    loras = [provenance.adapter(_model_name(path), scale, path) for path, scale in loras]
    _check_replay(args.recipe, weights)
    recipe = None if not provenance.enabled(args.no_recipe) else provenance.make_recipe(
        "generate", model=_model_name(args.model), weights=weights, prompt=args.prompt,
        negative_prompt=args.negative_prompt, seed=args.seed, num_images=args.num, index=0 if args.num == 1 else None,
        sampler=args.sampler or getattr(pipe, "default_sampler", None), sampler_options={"eta": args.eta}, steps=args.steps,
        guidance_scale=args.guidance_scale, height=int(pixels.shape[1]), width=int(pixels.shape[2]),
        loras=loras, options={"dtype": args.dtype, "clip_skip": args.clip_skip, "watermark": getattr(pipe, "watermark", False),
                              "deep_cache": args.deep_cache})
    provenance.save_png(pixels, args.out, recipe, upscale=1)
    print(f"wrote {args.num} image(s) to {args.out}{_devices_note(pipe.mesh)}")
    return 0


def _eval_parser() -> _Parser:
    parser = _Parser(prog="jaxdiff eval",
                     description="Score a trained model: FID / KID / precision-recall over several seeds (the "
                                 "minimum and the spread, as EDM reports). Digit-sized runs use the shipped "
                                 "digit feature network against the held-out digits (FID-digits).")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="DIR",
                      help="a trained run: work dir, its checkpoints/ or checkpoints/<step> (default: the latest step)")
    what.add_argument("--model", metavar="FOLDER",
                      help="a text-to-image pipeline folder (SD 1/2/XL, SD3, Flux), scored on --prompts")
    parser.add_argument("--prompts", default=None, metavar="FILE", help="with --model: one prompt per line")
    parser.add_argument("--clip", default=None, metavar="FOLDER",
                        help="with --model: a local transformers CLIP model folder for clip_score")
    parser.add_argument("--metric", default=None, metavar="LIST",
                        help="comma-separated: fid, kid, pr, bpd for --checkpoint (default: fid); clip_score, "
                             "fid for --model (default: clip_score)")
    parser.add_argument("--bpd_steps", type=_positive_int, default=1000, metavar="K",
                        help="timesteps of the bits/dim bound (default: 1000, the full chain)")
    parser.add_argument("--num", type=_positive_int, default=1000, metavar="N",
                        help="images per seed (default: 1000; papers use 50000)")
    parser.add_argument("--seeds", type=_positive_int, default=3, metavar="K", help="seeds 0..K-1 (default: 3)")
    parser.add_argument("--ref", default=None, metavar="STATS.npz",
                        help="reference statistics (jaxdiff.metrics.reference); default for digit-sized "
                             "runs: the 1,000 held-out digits")
    parser.add_argument("--inception", default=None, metavar="WEIGHTS",
                        help="FID Inception-v3 weights (safetensors) for images that are not digit-sized")
    parser.add_argument("--sampler", type=_sampler_name, default=None, metavar="NAME",
                        help=f"one of {_sampler_names()} (default: the model's)")
    parser.add_argument("--steps", type=_positive_int, default=50, metavar="N", help="sampler steps (default: 50)")
    parser.add_argument("--guidance_scale", type=_finite_float, default=None, metavar="S",
                        help="classifier-free guidance scale, on when > 1 (default: off)")
    parser.add_argument("--batch_size", type=_positive_int, default=500, metavar="B",
                        help="images per compiled sampling call (default: 500)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, metavar="JSON", help="also write the report as JSON")
    _add_distributed_args(parser, rules=True)
    return parser


def _eval(argv: list[str]) -> int:
    parser = _eval_parser()
    args = parser.parse_args(argv)
    from jaxdiff.pipelines import evaluate

    if args.model is not None:
        return _eval_prompts(parser, args)
    try:
        metrics = evaluate.parse_metrics(args.metric or "fid")
    except ValueError as e:
        parser.error(str(e))
    if args.out is not None:
        _check_out(parser, args.out)
    _maybe_init_distributed(args)

    import jaxdiff

    model = jaxdiff.load(args.checkpoint, rules=args.rules)
    report = evaluate.evaluate(model, metrics=metrics, num=args.num, seeds=args.seeds, ref=args.ref,
                               inception=args.inception, sampler=args.sampler, num_steps=args.steps,
                               guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                               progress=not args.no_progress and _is_main_process(), bpd_steps=args.bpd_steps)
    _write_report(args, evaluate.format_report(report), report)
    return 0


def _eval_prompts(parser: argparse.ArgumentParser, args) -> int:
    """`jaxdiff eval --model FOLDER --prompts FILE`: CLIP score (and FID) of a pipeline on a prompt set."""
    from jaxdiff.pipelines import evaluate

    if args.prompts is None:
        parser.error("--model needs --prompts FILE (one prompt per line)")
    try:
        prompts = evaluate.read_prompts(args.prompts)
    except ValueError as e:
        parser.error(str(e))
    if args.out is not None:
        _check_out(parser, args.out)
    _maybe_init_distributed(args)

    import jaxdiff

    pipe = jaxdiff.from_pretrained(args.model, rules=args.rules)
    options = {"num_steps": args.steps}
    if args.guidance_scale is not None:
        options["guidance_scale"] = args.guidance_scale
    if args.sampler is not None:
        options["sampler"] = args.sampler
    report = evaluate.evaluate_prompts(pipe, prompts, metrics=args.metric or "clip_score", seeds=args.seeds,
                                       clip=args.clip, inception=args.inception, ref=args.ref,
                                       batch_size=min(args.batch_size, 8), **options)
    lines = [f"{len(prompts)} prompts x {len(report['seeds'])} seeds, {args.steps} steps"]
    lines += [f"{k:<10} min {r['min']:.3f}   mean {r['mean']:.3f} +- {r['std']:.3f}"
              for k, r in report.items() if isinstance(r, dict)]
    _write_report(args, "\n".join(lines), report)
    return 0


def _write_report(args, text: str, report: dict) -> None:
    import json

    from jaxdiff import files

    if _is_main_process():
        print(text)
        if args.out is not None:
            files.write_text(args.out, json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.out}")


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------

def _info(argv: list[str]) -> int:
    parser = _Parser(prog="jaxdiff info",
                     description="Print what made a picture jaxdiff wrote: the recipe in its PNG text chunks, and "
                                 "whether it carries the SDXL invisible watermark.")
    parser.add_argument("image", metavar="IMAGE.png", help="a PNG written by jaxdiff sample / generate / train")
    args = parser.parse_args(argv)

    from PIL import Image

    from jaxdiff import provenance

    recipe = provenance.read_recipe(args.image)       # one line for a non-image or an image without one
    with Image.open(args.image) as img:
        mark = provenance.detect_watermark(img) if min(img.size) >= 256 else None
    print(provenance.format_recipe(recipe))
    if mark is not None:
        print(f"watermark detected: {'yes (the SDXL invisible watermark)' if mark else 'no'}")
    return 0


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

COMMANDS = {"train": _train, "sample": _sample, "generate": _generate, "convert": _convert, "export": _export,
            "export-lora": _export_lora, "eval": _eval, "info": _info}
# What to lower when a command runs out of host memory.
_LOWER = {"train": "lower --config.data.batch_size or the image size",
          "sample": "ask for fewer images (--num)",
          "generate": "ask for fewer (--num) or smaller (--height / --width) images",
          "convert": "convert on a machine with more memory",
          "export": "export on a machine with more memory",
          "export-lora": "export on a machine with more memory",
          "eval": "lower --batch_size",
          "info": "read the picture on a machine with more memory"}


def _synopsis() -> str:
    """The command lines of the module docstring (its first block)."""
    return __doc__.strip().split("\n\n")[1]


def _warnings_as_lines(command: str) -> None:
    """Print jaxdiff's own warnings as one `jaxdiff CMD: warning: ...` line each (others as usual)."""
    import warnings

    from jaxdiff.errors import JaxdiffWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, JaxdiffWarning):
            print(f"jaxdiff {command}: warning: {message}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


# Commands that compile networks: they share compiled programs across runs through JAX's
# persistent cache (see compile_cache.py; JAXDIFF_COMPILATION_CACHE=off turns it off), and, run
# as their own process, keep freed host memory for the next call (host_memory.py;
# JAXDIFF_HOST_MEMORY=default turns it off).
CACHED_COMMANDS = ("train", "sample", "generate", "eval")


def main(argv: list[str] | None = None) -> int:
    """The `jaxdiff` command. Called without argv (the console script, `python -m jaxdiff.cli`)
    it owns the process and tunes its allocator; called with argv from a program, it does not."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        asked = bool(argv)
        print(__doc__.strip(), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if argv[0] in ("-V", "--version"):
        from jaxdiff import __version__
        print(f"jaxdiff {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"usage:\n{_synopsis()}", file=sys.stderr)
        print(f"jaxdiff: error: unknown command '{argv[0]}'{hint} (commands: {', '.join(COMMANDS)}; "
              f"see jaxdiff --help)", file=sys.stderr)
        return 2
    from jaxdiff.errors import USER_ERRORS

    _warnings_as_lines(argv[0])
    if argv[0] in CACHED_COMMANDS and not {"-h", "--help"} & set(argv[1:]):
        from jaxdiff import compile_cache, host_memory

        if own_process:
            host_memory.configure(prog=f"jaxdiff {argv[0]}")  # before XLA starts its threads
        compile_cache.configure(prog=f"jaxdiff {argv[0]}")  # before the first compile
    try:
        return COMMANDS[argv[0]](argv[1:])
    except USER_ERRORS as e:
        if os.environ.get("JAXDIFF_DEBUG"):
            raise
        print(f"jaxdiff {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # numpy refuses an allocation (nothing half-done): say what to lower
        if os.environ.get("JAXDIFF_DEBUG"):
            raise
        what = (str(e).splitlines() or [""])[0] or "MemoryError"
        print(f"jaxdiff {argv[0]}: error: out of host memory ({what}); {_LOWER[argv[0]]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxdiff {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
