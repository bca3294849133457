"""The command line end to end, and one-line errors for every bad input a user can make."""

import os
import subprocess
import sys

import json

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

SMALL = ["--config.data.image_size=16", "--config.data.batch_size=16", "--config.train.steps=4",
         "--config.train.checkpoint_every=2", "--config.train.log_every=1", "--config.optim.warmup_steps=1",
         "--config.sample.num=20", "--config.sample.steps=3", "--no-progress"]


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.startswith("jaxdiff ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# `jaxdiff.cli.main(argv)` with each expensive step replaced by a tripwire that names it and exits
# with status 3: building the data (and the task), compiling the training step, loading a pixel
# checkpoint or a Stable Diffusion folder.
_TRIPWIRED = """
import sys
from jaxdiff import cli, data
from jaxdiff.pipelines import pixel, stable_diffusion
from jaxdiff.train import build, loop

def tripwire(what):
    def reached(*args, **kwargs):
        print("TRIPWIRE " + what, file=sys.stderr, flush=True)
        raise SystemExit(3)
    return reached

data.build = build.build_task = tripwire("data")
loop._compile_step = tripwire("compile")
pixel.load = tripwire("checkpoint")
stable_diffusion.StableDiffusion.from_pretrained = tripwire("model")
sys.exit(cli.main(sys.argv[1:]))
"""


def _refused_before_loading(args, *needles):
    """A bad input: exactly one stderr line `jaxdiff CMD: error: ...` naming `needles`, exit
    status 2, and no data, checkpoint or model loaded and nothing compiled on the way (each of
    those steps is a tripwire in the child process)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAXDIFF_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", _TRIPWIRED, *args], capture_output=True, text=True, check=False,
                          timeout=600, env=env)
    assert "TRIPWIRE" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    assert lines[0].startswith(f"jaxdiff {args[0]}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


_RUN = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    proc = run_cli("train", "--workdir", str(work), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _RUN["stdout"] = proc.stdout
    return work


def test_train_writes_checkpoints_logs_and_pictures(trained):
    assert sorted(p.name for p in (trained / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    # The closing evaluation: FID-digits of the EMA weights at the last step (eval.num images).
    assert [(r["step"], sorted(r)) for r in rows if "loss" not in r] == [(4, ["eval_fid_digits", "step"])]
    assert any((trained / "tb").iterdir())
    grid = np.asarray(Image.open(trained / "samples.png"))
    # 20 samples in 10 columns (one class per column) of 16x16 digits, 2px gaps, upscaled x4.
    assert grid.shape == ((2 * 18 + 2) * 4, (10 * 18 + 2) * 4)
    assert Image.open(trained / "loss.png").size[0] > 100
    done = _RUN["stdout"].strip().splitlines()[-1]
    assert done.startswith("done: step 4") and f"samples in {trained / 'samples.png'}" in done, done
    assert f"loss curve in {trained / 'loss.png'}" in done, done


def _tiles(path, n: int = 4, cols: int = 2) -> list:
    """The n 16x16 samples of a grid PNG (2 px gaps, enlarged x4), as uint8 arrays."""
    grid = np.asarray(Image.open(path))
    cell = 18 * 4
    return [grid[8 + r * cell:8 + r * cell + 64, 8 + c * cell:8 + c * cell + 64]
            for r, c in (divmod(i, cols) for i in range(n))]


def _differ(a, b) -> bool:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) > 0.5  # measured 1.8-3.8


def test_sample_command(trained, tmp_path):
    """--labels and --guidance_scale take effect (per image), and the same seed and flags give the
    same images, whether the flags are spelled jaxdiff's way or diffusers'."""
    def sample(name, *flags, progress=False):
        out = tmp_path / name
        proc = run_cli("sample", "--checkpoint", str(trained), "--steps", "3", "--seed", "1", "--out", str(out),
                       *flags, *([] if progress else ["--no-progress"]))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out, proc

    out, proc = sample("g.png", "--num", "4", "--labels", "3", "--guidance_scale", "2", progress=True)
    assert np.asarray(Image.open(out)).shape == ((2 * 18 + 2) * 4, (2 * 18 + 2) * 4)
    assert "sample: 100%" in proc.stderr and "3/3" in proc.stderr, proc.stderr[-2000:]   # the per-step bar
    # diffusers' flag names are the same flags; --no-progress silences the bar
    again, proc = sample("g2.png", "--num_images_per_prompt", "4", "--labels", "3", "--guidance_scale", "2")
    assert "step/s" not in proc.stderr and "%|" not in proc.stderr, proc.stderr[-2000:]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    base = _tiles(out)
    # Same noise, labels 3, 3, 5, 5: the first two samples are unchanged, the last two are not.
    mixed = _tiles(sample("labels.png", "--num", "4", "--labels", "3,3,5,5", "--guidance_scale", "2")[0])
    assert all(np.array_equal(a, b) for a, b in zip(base[:2], mixed[:2]))
    assert all(_differ(a, b) for a, b in zip(base[2:], mixed[2:]))
    # Guidance 1 (off: the conditional model alone) gives other samples than guidance 2.
    plain = _tiles(sample("g1.png", "--num", "4", "--labels", "3", "--guidance_scale", "1")[0])
    assert all(_differ(a, b) for a, b in zip(base, plain))


def test_run_provenance_and_sample_recipe_replay(trained, tmp_path):
    """The run records what produced it (provenance.json, MODEL_CARD.md, the grid's recipe), and
    `jaxdiff sample --recipe` makes a sample grid again bit for bit (the flags of
    test_sample_command: the same compiled program)."""
    import json

    from jaxdiff import provenance

    entries = json.loads((trained / "provenance.json").read_text())
    assert [(e["event"], e["step"]) for e in entries] == [("start", 0)]
    assert entries[0]["config"]["train"]["steps"] == 4 and entries[0]["data"]["num_examples"] > 0
    card = (trained / "MODEL_CARD.md").read_text()
    assert "steps: 4 of 4" in card and "final training loss: 0." in card and "](samples.png)" in card
    grid = provenance.read_recipe(trained / "samples.png")
    assert (grid["kind"], grid["options"]["step"], grid["num_images"]) == ("train_samples", 4, 20)
    out, again = tmp_path / "r.png", tmp_path / "r2.png"
    proc = run_cli("sample", "--checkpoint", str(trained), "--steps", "3", "--seed", "1", "--num", "4", "--labels", "3",
                   "--guidance_scale", "2", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe = provenance.read_recipe(out)
    assert recipe["weights"].startswith("ckpt-sha256:") and recipe["options"] == {"labels": "3", "use_ema": True, "step": 4}
    proc = run_cli("sample", "--recipe", str(out), "--checkpoint", str(trained), "--no-progress", "--out", str(again))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_sample_more_images_than_memory_holds(trained):
    """The sampling core refuses it before compiling: one line, not a MemoryError or an abort."""
    line = _one_line_error(run_cli("sample", "--checkpoint", str(trained), "--num", "100000000", "--steps", "2"),
                           "100000000 images", "memory")
    assert "fewer or smaller images" in line


def test_unknown_config_key():
    _one_line_error(run_cli("train", "--config.train.stepz=3"), "unknown config key 'train.stepz'", "train.steps")


def test_unknown_command_prints_usage():
    proc = run_cli("fly")
    assert proc.returncode == 2 and "jaxdiff train" in proc.stderr and "jaxdiff generate" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("jaxdiff: error: unknown command 'fly'")
    assert "did you mean 'train'" in run_cli("trian").stderr


def test_version_and_help_from_the_entry_point():
    import jaxdiff

    for flag in ("--version", "-V"):
        proc = run_cli(flag)
        assert proc.returncode == 0 and proc.stdout.strip() == f"jaxdiff {jaxdiff.__version__}", proc
    proc = run_cli("--help")
    assert proc.returncode == 0 and proc.stdout.count("jaxdiff generate --model") == 1, proc.stdout


# --------------------------------------------------------------------------------------------
# bad input is refused before anything is loaded or compiled (subprocesses: the real stderr)


@pytest.mark.parametrize("override,key", [
    ("--config.train.steps=0", "train.steps"),
    ("--config.sample.sampler=dimm", "sample.sampler"),
    ("--config.optim.learning_rate=nan", "optim.learning_rate"),
])
def test_train_refuses_bad_config_before_loading(tmp_path, override, key):
    work = tmp_path / "w"
    _refused_before_loading(["train", "--workdir", str(work), override], f"config key {key} ", f"--config.{key}=")
    assert not work.exists()


def test_train_refuses_a_work_dir_it_cannot_write(tmp_path):
    (tmp_path / "f").write_text("x")
    _refused_before_loading(["train", "--workdir", str(tmp_path / "f" / "run")], "work dir", "lies under the file", "--workdir")


def test_resume_with_another_seed_is_refused_before_loading_data(trained):
    before = sorted(str(p) for p in trained.rglob("*"))
    _refused_before_loading(["train", "--workdir", str(trained), *SMALL, "--config.seed=7"],
                  "used seed 0", "--config.seed=0")
    assert sorted(str(p) for p in trained.rglob("*")) == before            # nothing written there


@pytest.mark.parametrize("args,needle", [
    (["sample", "--guidance_scale", "nan"], "--guidance_scale: must be a finite number"),
    (["sample", "--num", "0"], "--num/--num_images_per_prompt: must be a positive integer"),
    (["generate", "--prompt", "x", "--height", "0"], "--height: must be a positive integer"),
])
def test_sampling_flags_refused_before_loading(tmp_path, args, needle):
    where = ["--checkpoint" if args[0] == "sample" else "--model", str(tmp_path / "missing")]
    _refused_before_loading([args[0], *where, *args[1:]], needle)


def test_missing_checkpoint(tmp_path):
    _one_line_error(run_cli("sample", "--checkpoint", str(tmp_path / "nothing")), "no checkpoint", "nothing")
    _one_line_error(run_cli("sample", "--checkpoint", str(tmp_path)), "no checkpoint")


def test_corrupt_checkpoint(trained, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    for f in (bad / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    _one_line_error(run_cli("sample", "--checkpoint", str(bad / "checkpoints" / "4"), "--steps", "2"),
                    "could not restore checkpoint", "corrupt")


def _write_images(folder, n, size, mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(folder / f"{i}.png")


def test_image_size_the_unet_cannot_halve(tmp_path):
    _write_images(tmp_path / "imgs", 16, 30)
    proc = run_cli("train", "--workdir", str(tmp_path / "w"), *SMALL,
                   f"--config.data.dataset=folder:{tmp_path / 'imgs'}", "--config.data.image_size=0",
                   "--config.model.class_conditional=false")
    _one_line_error(proc, "30")


def test_bad_channel_count(tmp_path):
    _one_line_error(run_cli("train", "--workdir", str(tmp_path / "w"), *SMALL, "--config.data.channels=2"),
                    "channels")


def test_unreadable_image_in_folder(tmp_path):
    _write_images(tmp_path / "imgs", 4, 16)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png at all")
    proc = run_cli("train", "--workdir", str(tmp_path / "w"), *SMALL,
                   f"--config.data.dataset=folder:{tmp_path / 'imgs'}")
    _one_line_error(proc, "broken.png")


# --------------------------------------------------------------------------------------------
# in-process: every refusal, the help texts, the end-of-training message


def _main_error(capsys, *argv):
    """Run `jaxdiff ARGV` in this process; return its one stderr line (exit status 2)."""
    from jaxdiff import cli

    try:
        rc = cli.main(list(argv))
    except SystemExit as e:           # argparse
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith(f"jaxdiff {argv[0]}: error: "), err
    return err[0]


@pytest.mark.parametrize("override,key", [
    ("train.steps=-1", "train.steps"), ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.checkpoint_every=0", "train.checkpoint_every"), ("train.log_every=0", "train.log_every"),
    ("train.sample_every=-5", "train.sample_every"), ("diffusion.prediction_type=eps", "diffusion.prediction_type"),
    ("sample.sampler=dpm++", "sample.sampler"), ("sample.steps=0", "sample.steps"),
    ("sample.guidance_scale=inf", "sample.guidance_scale"), ("optim.learning_rate=-inf", "optim.learning_rate"),
    ("optim.ema_decay=2", "optim.ema_decay"), ("diffusion.label_dropout=1.1", "diffusion.label_dropout"),
    ("data.batch_size=0", "data.batch_size"), ("model.dropout=1.0", "model.dropout"),
    ("model.name=big", "model.name"), ("model.dtype=half", "model.dtype"), ("mesh.rules=zero", "mesh.rules"),
    ("diffusion.schedule=cosine", "diffusion.schedule"),
])
def test_every_bad_config_value_is_one_line(capsys, tmp_path, override, key):
    line = _main_error(capsys, "train", "--workdir", str(tmp_path / "w"), f"--config.{override}")
    assert f"config key {key} " in line and f"--config.{key}=" in line, line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command,args,needle", [
    ("sample", ["--guidance_scale", "inf"], "--guidance_scale: must be a finite number"),
    ("sample", ["--guidance_scale=-nan"], "--guidance_scale: must be a finite number"),
    ("sample", ["--num", "-3"], "--num/--num_images_per_prompt: must be a positive integer"),
    ("sample", ["--steps", "0"], "--steps/--num_inference_steps: must be a positive integer"),
    ("sample", ["--num_inference_steps", "0"], "--steps/--num_inference_steps: must be a positive integer"),
    ("sample", ["--sampler", "dimm"], "unknown sampler 'dimm' (did you mean 'ddim'?)"),
    ("sample", ["--generator", "3"], "--generator is not a jaxdiff flag"),
    ("sample", ["--labels", "one"], "--labels"),
    ("sample", ["--labels", "1,2", "--num", "3"], "2 labels for --num 3"),
    ("generate", ["--guidance_scale", "nan"], "--guidance_scale: must be a finite number"),
    ("generate", ["--num_images_per_prompt", "0"], "must be a positive integer"),
    ("generate", ["--steps", "-2"], "must be a positive integer"),
    ("generate", ["--width", "-16"], "--width: must be a positive integer"),
    ("generate", ["--height", "0"], "--height: must be a positive integer"),
    ("generate", ["--sampler", "euler_a"], "unknown sampler 'euler_a'"),
    ("generate", ["--generator"], "pass --seed"),
    ("generate", ["--conf", "x"], "unrecognized arguments: --conf"),    # no prefix matching
])
def test_bad_sampling_flags_are_one_line(capsys, tmp_path, command, args, needle):
    where = ["--checkpoint" if command == "sample" else "--model", str(tmp_path / "missing")]
    if command == "generate":
        where += ["--prompt", "x"]
    assert needle in _main_error(capsys, command, *where, *args)


def test_out_in_a_folder_that_cannot_be_written(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    line = _main_error(capsys, "sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "f" / "g.png"))
    assert "--out" in line and "is a file" in line


def _parsers():
    from jaxdiff import cli
    from jaxdiff import config as config_lib

    return {"train": cli._train_parser(config_lib.get_config(), None), "sample": cli._sample_parser(),
            "generate": cli._generate_parser(), "convert": cli._convert_parser()}


def test_every_flag_has_help_text():
    for name, parser in _parsers().items():
        for action in parser._actions:
            assert action.help and action.help != "==SUPPRESS==", (name, action.option_strings)


def _help(capsys, *argv):
    from jaxdiff import cli

    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    assert info.value.code == 0
    return capsys.readouterr().out


def test_train_help_explains_overrides_and_lists_every_key(capsys):
    from jaxdiff import cli
    from jaxdiff import config as config_lib

    text = _help(capsys, "train", "--help")
    assert "--config.train.steps=500" in text and "--config.KEY=VALUE" in text
    lines = text.splitlines()
    for key, value in config_lib.flat_items(config_lib.get_config()):
        assert f"  {key} " in text and any(line.split() == [key, cli._format_value(value)] for line in lines), key
    # the keys of the file given with --config, and the overrides given
    import pathlib

    path = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "cifar10_ddpm.py")
    text = _help(capsys, "train", "--config", path, "--config.train.steps=7", "--help")
    assert f"from {path}" in text
    assert ["model.name", "ddpm_cifar10"] in [line.split() for line in text.splitlines()]
    assert ["train.steps", "7"] in [line.split() for line in text.splitlines()]


def test_sampling_help_lists_flags_and_samplers(capsys):
    from jaxdiff import samplers

    for command in ("sample", "generate"):
        text = _help(capsys, command, "--help")
        for flag in ("--num", "--num_images_per_prompt", "--steps", "--num_inference_steps", "--sampler",
                     "--guidance_scale", "--seed", "--no-progress", "--out", "--rules"):
            assert flag in text, (command, flag)
        assert all(name in text for name in samplers.names())


def test_usage_is_printed_once(capsys):
    """The generate usage used to be appended to the module docstring a second time."""
    from jaxdiff import cli

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.count("jaxdiff generate --model") == 1 and out.count("Multi-host:") == 1
    assert cli.main([]) == 2
    assert capsys.readouterr().err.count("jaxdiff generate --model") == 1


def test_done_message_names_only_files_that_exist(capsys, tmp_path, monkeypatch):
    """`jaxdiff train` ends by naming samples.png / loss.png only when they were written."""
    import types

    from jaxdiff import cli
    from jaxdiff.train import loop

    def fake_train(cfg, workdir, **kwargs):
        (tmp_path / "w").mkdir(exist_ok=True)
        if written:
            (tmp_path / "w" / written).write_bytes(b"png")
        return types.SimpleNamespace(step=cfg.train.steps)

    monkeypatch.setattr(loop, "train", fake_train)
    for written in (None, "loss.png"):
        assert cli.main(["train", "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "samples.png" not in out and ("loss.png" in out) == (written == "loss.png"), out


def test_out_of_host_memory_is_one_line(capsys, monkeypatch):
    """A numpy allocation too large for the host (e.g. generate --num 1e8 repeats the text states
    before the memory check) is one line naming what to lower, not a traceback."""
    from jaxdiff import cli

    def too_big(argv):
        raise MemoryError("Unable to allocate 918. GiB for an array with shape (100000000, 77, 32)")

    monkeypatch.setitem(cli.COMMANDS, "generate", too_big)
    line = _main_error(capsys, "generate", "--num", "100000000")
    assert "out of host memory" in line and "918. GiB" in line and "--num" in line
