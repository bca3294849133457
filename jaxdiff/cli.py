"""`jaxdiff` on the command line.

    jaxdiff train  [--config experiments/X.py] [--config.a.b=value ...] [--workdir DIR]
    jaxdiff sample --checkpoint DIR [--num 64] [--sampler ddim] [--steps 50] [--seed 0]
                   [--labels 0,1,2 | --labels grid] [--guidance_scale 2.0] [--rules fsdp]
                   [--out grid.png]
    jaxdiff generate --model SD_FOLDER --prompt "..." [--negative_prompt ...] [--steps 30]
                   [--sampler NAME] [--guidance_scale 7.5] [--seed 0] [--num 1] [--out out.png]
    jaxdiff convert --single_file model.safetensors --out SD_FOLDER [--tokenizer DIR]
                   [--prediction_type v_prediction]

Multi-host: start the same command on every host with `--coordinator_address host0:port
--num_processes N --process_id i` (on Cloud TPU VMs JAX finds these itself). For `train` the device
mesh and parameter layout come from `--config.mesh.{data,fsdp,tensor,rules}`; `sample` and
`generate` split the batch over every device of every process and lay the parameters out by
`--rules dp|fsdp|fsdp_tp`; only process 0 writes the picture.

Preemption: on SIGTERM `jaxdiff train` finishes the current step, checkpoints it, prints
"preempted at step N" and exits with status 0; running the same command again resumes.

Errors a user can fix (bad config key, missing dataset, missing or corrupt checkpoint, wrong image
shape, diverged loss) print one line naming the problem and exit with status 2; set
JAXDIFF_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys


def _train(argv: list[str]) -> int:
    from jaxdiff import config as config_lib

    parser = argparse.ArgumentParser(prog="jaxdiff train", description="Train a diffusion model.")
    parser.add_argument("--config", default=None, help="Python file with get_config() (default: the digits demo)")
    parser.add_argument("--workdir", default=None,
                        help="where checkpoints, metrics and samples go; an existing run there is resumed "
                             "(default: runs/<config name>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_distributed_args(parser)
    # `--config.a.b=v` cannot be declared up front: strip them before argparse sees the rest.
    config_path = _peek_config_path(argv)
    cfg = config_lib.load(config_path)
    rest = config_lib.apply_overrides(cfg, argv)
    args = parser.parse_args(rest)
    _maybe_init_distributed(args)

    from jaxdiff.pipelines import write_run_samples
    from jaxdiff.train import loop

    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "digits"
    workdir = args.workdir or os.path.join("runs", name)
    state = loop.train(cfg, workdir, progress=not args.no_progress, write_samples=write_run_samples)
    if int(state.step) < cfg.train.steps:  # preempted: saved, message printed, resume later
        return 0
    print(f"done: samples in {os.path.join(workdir, 'samples.png')}, "
          f"loss curve in {os.path.join(workdir, 'loss.png')}")
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
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0 (multi-host; automatic on Cloud TPU VMs)")
    parser.add_argument("--num_processes", type=int, default=None, help="processes in the run (multi-host)")
    parser.add_argument("--process_id", type=int, default=None, help="this process, 0..num_processes-1")
    if rules:
        parser.add_argument("--rules", default="dp", choices=("dp", "fsdp", "fsdp_tp"),
                            help="parameter layout over the devices: dp replicates the weights, fsdp splits "
                                 "them (the batch is split over all devices either way)")


def _maybe_init_distributed(args) -> None:
    from jaxdiff import sharding

    sharding.init_distributed(args.coordinator_address, args.num_processes, args.process_id)


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _sample(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxdiff sample", description="Sample a trained model into a PNG grid.")
    parser.add_argument("--checkpoint", required=True, help="work dir, its checkpoints/ or checkpoints/<step>")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated class ids, or 'grid' for 0..K-1 repeated (one class per column)")
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--no-ema", action="store_true", help="use the raw rather than the EMA parameters")
    parser.add_argument("--out", default="samples.png")
    _add_distributed_args(parser, rules=True)
    args = parser.parse_args(argv)
    _maybe_init_distributed(args)

    import jaxdiff
    from jaxdiff import images

    model = jaxdiff.load(args.checkpoint, rules=args.rules)
    labels = None
    if args.labels == "grid":
        labels = model.grid_labels(args.num)
    elif args.labels:
        try:
            labels = [int(v) for v in args.labels.split(",")]
        except ValueError:
            raise ValueError(f"--labels must be comma-separated integers or 'grid', got {args.labels!r}") from None
        if len(labels) == 1:
            labels = labels * args.num
    options = {} if args.eta is None else {"eta": args.eta}
    imgs = model.sample(args.num, sampler=args.sampler, num_steps=args.steps, seed=args.seed,
                        labels=labels, guidance_scale=args.guidance_scale,
                        use_ema=not args.no_ema, progress=_is_main_process(), **options)
    if _is_main_process():
        ncols = model.num_classes if args.labels == "grid" else None
        images.save_grid(imgs, args.out, ncols=ncols)
        print(f"wrote {args.num} samples to {args.out}{_devices_note(model.mesh)}")
    return 0


def _devices_note(mesh) -> str:
    n = mesh.devices.size
    return f" (batch over {n} device{'s' if n > 1 else ''})"


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxdiff convert",
        description="Convert a Stable Diffusion 1.x/2.x single-file .safetensors checkpoint into a "
                    "diffusers-format pipeline folder.")
    parser.add_argument("--single_file", required=True, help="the .safetensors checkpoint (LDM layout)")
    parser.add_argument("--out", required=True, help="the pipeline folder to write")
    parser.add_argument("--tokenizer", default=None,
                        help="CLIP tokenizer folder to copy in (single files hold none)")
    parser.add_argument("--prediction_type", default="epsilon", choices=("epsilon", "v_prediction"),
                        help="v_prediction for SD 2.x 768-v checkpoints (not readable from the weights)")
    parser.add_argument("--use_ema", action="store_true",
                        help="take the U-Net from the file's EMA copy (model_ema.*, in full-ema files)")
    args = parser.parse_args(argv)

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


COMMANDS = {"train": _train, "sample": _sample}
COMMANDS["convert"] = _convert


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxdiff generate",
                                     description="Text to image with a Stable Diffusion (diffusers-format) folder.")
    parser.add_argument("--model", required=True, help="local diffusers Stable Diffusion folder (model_index.json, "
                        "unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sampler", default=None, help="a jaxdiff sampler (default: the folder's scheduler)")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=1, help="number of images (several go into one grid)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0: deterministic)")
    parser.add_argument("--clip_skip", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the networks (bfloat16 on GPU/TPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default="generated.png")
    _add_distributed_args(parser, rules=True)
    args = parser.parse_args(argv)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    _maybe_init_distributed(args)

    import jax.numpy as jnp

    from jaxdiff import images
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    quiet = args.no_progress or not _is_main_process()
    pipe = StableDiffusion.from_pretrained(args.model, dtype=getattr(jnp, args.dtype), progress=not quiet,
                                           rules=args.rules)
    pixels = pipe(args.prompt, negative_prompt=args.negative_prompt, num_steps=args.steps, sampler=args.sampler,
                  guidance_scale=args.guidance_scale, seed=args.seed, num_images=args.num, height=args.height,
                  width=args.width, eta=args.eta, clip_skip=args.clip_skip, output_type="uint8", progress=not quiet)
    if not _is_main_process():
        return 0
    images.save_grid(pixels, args.out, upscale=1)
    print(f"wrote {args.num} image(s) to {args.out}{_devices_note(pipe.mesh)}")
    return 0


COMMANDS["generate"] = _generate
__doc__ += """
    jaxdiff generate --model SD_FOLDER --prompt "..." [--negative_prompt "..."] [--steps 30]
                   [--sampler dpmpp_2m] [--guidance_scale 7.5] [--seed 0] [--num 1]
                   [--height H --width W] [--dtype bfloat16] [--rules fsdp] [--out generated.png]
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__.strip(), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    from jaxdiff.errors import USER_ERRORS

    try:
        return COMMANDS[argv[0]](argv[1:])
    except USER_ERRORS as e:
        if os.environ.get("JAXDIFF_DEBUG"):
            raise
        print(f"jaxdiff {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxdiff {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
