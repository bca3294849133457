"""Provenance: the recipe in every PNG jaxdiff writes (read back, printed, replayed bit for bit,
hostile ones refused in one line), the run's provenance.json and model card, and the SDXL
invisible watermark (pixel-identical to `invisible-watermark`'s encoder where that imports)."""

import json
import pathlib

import numpy as np
import pytest
from conftest import run_cli
from test_cli_generate import folder  # noqa: F401  (the tiny Stable Diffusion folder fixture)

from jaxdiff import provenance
from jaxdiff.provenance import recipe as recipe_lib
from jaxdiff.provenance import watermark as wm


def _recipe(**changes):
    fields = {"model": "sd-tiny", "weights": "st-sample-sha256:0", "prompt": "a cat", "negative_prompt": "blurry",
              "seed": 3, "num_images": 1, "index": 0, "sampler": "ddim", "sampler_options": {"eta": 0.5}, "steps": 4,
              "guidance_scale": 7.5, "height": 16, "width": 16, "options": {"dtype": "float32", "watermark": False}}
    fields.update(changes)
    return provenance.make_recipe("generate", **fields)


def _png_with_chunk(path, text):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(provenance.RECIPE_KEY, text)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, pnginfo=info)
    return path


# --------------------------------------------------------------------------------------------
# The recipe in the PNG.


def test_recipe_round_trips_through_the_png(tmp_path):
    recipe = _recipe(prompt="ein Kätzchen, 猫", loras=[provenance.adapter("style", 0.7, None)])
    pixels = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    path = provenance.save_png(pixels, tmp_path / "a.png", recipe, upscale=1)
    assert provenance.read_recipe(path) == recipe
    from PIL import Image

    with Image.open(path) as img:
        assert np.array_equal(np.asarray(img), pixels[0])             # the chunks leave the pixels alone
        text = img.text[provenance.PARAMETERS_KEY]
    assert text.startswith("ein Kätzchen, 猫\nNegative prompt: blurry\nSteps: 4, Sampler: ddim, CFG scale: 7.5, Seed: 3")
    shown = provenance.format_recipe(recipe)
    assert "prompt:" in shown and "ein Kätzchen" in shown and "style at scale 0.7" in shown


def test_recipe_off_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDIFF_RECIPE", "off")
    path = provenance.save_png(np.zeros((1, 8, 8, 3), np.uint8), tmp_path / "b.png", _recipe())
    with pytest.raises(provenance.RecipeError, match="holds no jaxdiff recipe"):
        provenance.read_recipe(path)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "(not valid JSON|longer|characters long)"),
    (json.dumps({"format": 1, "jaxdiff": "0.1.0", "kind": "generate", "prompt": "x" * 70000}), "characters long"),
    (json.dumps([1, 2]), "JSON object"),
    (json.dumps({"format": 1, "jaxdiff": "0.1.0", "kind": "generate", "__class__": "os.system"}), "'__class__'"),
    (json.dumps({"format": 1, "jaxdiff": "0.1.0", "kind": "generate", "options": {"exec": "rm -rf /"}}), "'exec'"),
    (json.dumps({"format": 1, "jaxdiff": "0.1.0", "kind": "generate", "sampler_options": {"evil": 1}}), "'evil'"),
    (json.dumps({"format": 1, "jaxdiff": "0.1.0", "kind": "generate", "steps": "30"}), "steps must be int"),
    (json.dumps({"format": 1, "jaxdiff": "0.1.0", "kind": "generate", "seed": True}), "boolean"),
    (json.dumps({"format": 2, "jaxdiff": "9", "kind": "generate"}), "format 2"),
    (json.dumps({"format": 1, "jaxdiff": "0.1.0", "kind": "shell"}), "kind 'shell'"),
])
def test_hostile_recipe_is_one_line(tmp_path, text, message):
    path = _png_with_chunk(tmp_path / "h.png", text)
    with pytest.raises(provenance.RecipeError, match=message) as e:
        provenance.read_recipe(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_not_an_image_is_one_line(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(provenance.RecipeError, match="not an image"):
        provenance.read_recipe(tmp_path / "x.png")


def test_replay_flags_parse_as_typed_flags():
    from jaxdiff import cli

    recipe = _recipe(prompt="--seed 9 ; rm -rf /", negative_prompt="-x", guidance_scale=0.1 + 0.2)
    args = cli._generate_parser().parse_args(recipe_lib.command_args(recipe, "generate"))
    assert (args.prompt, args.negative_prompt, args.seed, args.eta) == ("--seed 9 ; rm -rf /", "-x", 3, 0.5)
    assert args.guidance_scale == 0.1 + 0.2 and args.model == "sd-tiny" and args.no_watermark
    with pytest.raises(provenance.RecipeError, match="made by 'generate'"):
        recipe_lib.command_args(recipe, "sample")
    with_lora = recipe_lib.command_args(_recipe(loras=[provenance.adapter("s.safetensors", 0.7, None)]), "generate")
    assert "--lora=s.safetensors:0.7" in with_lora
    assert cli._lora_spec(None, "s.safetensors:0.7") == ("s.safetensors", 0.7)
    assert cli._lora_spec(None, "s.safetensors") == ("s.safetensors", 1.0)
    with pytest.raises(provenance.RecipeError, match="ControlNet"):
        recipe_lib.command_args(_recipe(controlnets=[provenance.adapter("c", 1.0, None)]), "generate")


def test_weights_fingerprint_sees_values_not_only_shapes(tmp_path):
    from safetensors.numpy import save_file

    a = np.arange(300_000, dtype=np.float32)
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    b = a.copy()
    b[-1] += 1                                             # the last value: inside the last window
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    fa, fb = (provenance.weights_fingerprint(tmp_path / f"{n}.safetensors") for n in "ab")
    assert fa != fb and fa == provenance.weights_fingerprint(tmp_path / "a.safetensors")
    assert fa.startswith("st-sample-sha256:")
    tree = {"x": np.ones(3, np.float32)}
    assert provenance.params_fingerprint(tree) != provenance.params_fingerprint({"x": np.zeros(3, np.float32)})


# --------------------------------------------------------------------------------------------
# The command line: generate, info, replay.


def _cli(monkeypatch, *argv):
    from jaxdiff import cli

    return cli.main(list(argv))


def _pixels(path):
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img)


def _write_lora(folder, path) -> str:  # noqa: F811
    """A rank-2 LoRA on the tiny U-Net's attention queries and output convolution (zero at
    initialisation, so a LoRA elsewhere would not show), with non-zero up weights so it matters."""
    import jax

    from jaxdiff import save_lora
    from jaxdiff.models import lora as lora_lib
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    pipe = StableDiffusion.from_pretrained(folder)
    targets = sorted({"/".join(e.flax) for name, e in pipe._lora_tables["unet"].items() if name.endswith(("to_q", "conv_out"))})
    assert targets
    adapters = lora_lib.init(pipe.params["unet"], targets, 2, jax.random.key(0))
    adapters = {k: w._replace(up=jax.random.normal(jax.random.key(i), w.up.shape)) for i, (k, w) in enumerate(adapters.items())}
    return save_lora(path, {"unet": adapters}, unet=pipe.unet)


def test_generate_info_and_bit_identical_replay(folder, tmp_path, monkeypatch, capsys):  # noqa: F811
    first, again, other = (str(tmp_path / n) for n in ("first.png", "again.png", "other.png"))
    lora = _write_lora(folder, tmp_path / "style.safetensors")
    monkeypatch.chdir(tmp_path)                                     # the LoRA is named as typed: a relative path
    flags = ["--steps", "2", "--num", "2", "--seed", "5", "--guidance_scale", "3", "--no-progress"]
    assert _cli(monkeypatch, "generate", "--model", str(folder), "--prompt", "-a cat", *flags, "--out", first,
                "--lora", "style.safetensors:0.5") == 0
    recipe = provenance.read_recipe(first)
    assert (recipe["prompt"], recipe["seed"], recipe["num_images"], recipe["index"]) == ("-a cat", 5, 2, None)
    assert recipe["loras"] == [{"name": "style.safetensors", "scale": 0.5, "hash": provenance.weights_fingerprint(lora)}]
    assert recipe["weights"] == provenance.weights_fingerprint(folder) and recipe["sampler"] == "ddim"
    assert str(tmp_path) not in json.dumps(recipe)                           # no absolute path of this machine

    capsys.readouterr()
    assert _cli(monkeypatch, "info", first) == 0
    shown = capsys.readouterr().out
    assert "prompt:" in shown and "-a cat" in shown and "seed:" in shown and "ddim" in shown and "scale 0.5" in shown

    assert _cli(monkeypatch, "generate", "--recipe", first, "--model", str(folder), "--no-progress",
                "--out", again) == 0
    assert np.array_equal(_pixels(first), _pixels(again))                    # bit for bit
    assert provenance.read_recipe(again) == recipe
    # A flag given with --recipe wins over the recipe's, and the picture changes with it.
    assert _cli(monkeypatch, "generate", "--recipe", first, "--model", str(folder), "--seed", "6", "--no-progress",
                "--no-recipe", "--out", other) == 0
    assert not np.array_equal(_pixels(first), _pixels(other))
    with pytest.raises(provenance.RecipeError, match="no jaxdiff recipe"):
        provenance.read_recipe(other)
    # and so does the LoRA scale: the adapter is part of what the recipe must name
    assert _cli(monkeypatch, "generate", "--model", str(folder), "--prompt", "-a cat", *flags, "--out", other,
                "--lora", "style.safetensors:0") == 0
    assert not np.array_equal(_pixels(first), _pixels(other))


def test_deep_cache_is_recorded_and_replayed(folder, tmp_path, monkeypatch):  # noqa: F811
    import jax

    from jaxdiff.convert.folder import save_pretrained
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion
    from test_cli_generate import SCHEDULER

    # The fixture's U-Net has its initial weights (zero output layers); perturb them so the deep
    # feature shapes the picture.
    pipe = StableDiffusion.from_pretrained(folder)
    leaves, tree = jax.tree.flatten(pipe.params["unet"])
    noisy = jax.tree.unflatten(tree, [np.asarray(p) + 0.05 * np.random.RandomState(i).randn(*np.shape(p)).astype(np.float32)
                                      for i, p in enumerate(leaves)])
    model = tmp_path / "model"
    save_pretrained(model, {"unet": (pipe.unet, noisy), "vae": (pipe.vae, pipe.params["vae"]),
                            "text_encoder": (pipe.text_encoder, pipe.params["text_encoder"]), "scheduler": SCHEDULER},
                    tokenizer_dir=pathlib.Path(folder) / "tokenizer")
    cached, again, plain = (str(tmp_path / n) for n in ("cached.png", "again.png", "plain.png"))
    flags = ["--model", str(model), "--prompt", "a cat", "--steps", "3", "--seed", "2", "--no-progress"]
    assert _cli(monkeypatch, "generate", *flags, "--deep-cache", "2", "--out", cached) == 0
    assert provenance.read_recipe(cached)["options"]["deep_cache"] == 2
    assert _cli(monkeypatch, "generate", "--recipe", cached, "--model", str(model), "--no-progress", "--out", again) == 0
    assert np.array_equal(_pixels(cached), _pixels(again))                   # replayed with the reuse
    assert _cli(monkeypatch, "generate", *flags, "--out", plain) == 0
    assert "deep_cache" not in provenance.read_recipe(plain)["options"]
    assert not np.array_equal(_pixels(cached), _pixels(plain))                # and the reuse mattered


def test_replaying_with_other_weights_warns(tmp_path):
    from jaxdiff import cli
    from jaxdiff.errors import JaxdiffWarning

    path = provenance.save_png(np.zeros((1, 8, 8, 3), np.uint8), tmp_path / "r.png", _recipe(weights="st-sample-sha256:1"))
    with pytest.warns(JaxdiffWarning, match="the picture will differ"):
        cli._check_replay(path, "st-sample-sha256:2")
    cli._check_replay(path, "st-sample-sha256:1")                         # the same weights: silent


def test_info_and_replay_refuse_in_one_line(tmp_path):
    (tmp_path / "text.png").write_text("not a picture")
    hostile = _png_with_chunk(tmp_path / "hostile.png", json.dumps(
        {"format": 1, "jaxdiff": "0.1.0", "kind": "generate", "options": {"preexec_fn": "os.system"}}))
    for argv in (["info", str(tmp_path / "text.png")], ["info", str(hostile)],
                 ["generate", "--recipe", str(hostile)], ["info", str(tmp_path / "missing.png")]):
        proc = run_cli(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (argv, proc.stderr[-2000:])
        assert lines[0].startswith(f"jaxdiff {argv[0]}: error: "), lines[0]


# --------------------------------------------------------------------------------------------
# Training: provenance.json, the model card, sample grids, and `jaxdiff sample --recipe`.


def test_record_run_appends_one_entry_per_start(tmp_path):
    import ml_collections

    from jaxdiff.provenance import run as run_lib

    class Task:
        summary = "digits: 3 images 8x8x1"
        images = np.arange(3 * 64, dtype=np.float32).reshape(3, 8, 8, 1)
        labels = np.array([0, 1, 2])

    cfg = ml_collections.ConfigDict({"seed": 0, "train": {"steps": 5}})
    run_lib.record_run(str(tmp_path), cfg, Task(), 0)
    cfg.train.steps = 9
    run_lib.record_run(str(tmp_path), cfg, Task(), 5)
    entries = json.loads((tmp_path / "provenance.json").read_text())
    assert [(e["event"], e["step"], e["config"]["train"]["steps"]) for e in entries] == [("start", 0, 5), ("resume", 5, 9)]
    assert entries[0]["versions"]["jax"] and entries[0]["versions"]["numpy"] == np.__version__
    assert entries[0]["devices"]["count"] >= 1 and entries[0]["devices"]["process_count"] == 1
    data = entries[0]["data"]
    assert data["num_examples"] == 3 and data == entries[1]["data"]
    Task.images = Task.images + np.eye(8, dtype=np.float32)[None, :, :, None]      # the data changed
    assert run_lib.data_fingerprint(Task())["first_last_sha256"] != data["first_last_sha256"]
    (tmp_path / "provenance.json").write_text("{truncated")
    run_lib.record_run(str(tmp_path), cfg, Task(), 9)                     # kept aside, not overwritten
    assert (tmp_path / "provenance.json.unreadable").read_text() == "{truncated"


def test_model_card_says_what_was_trained_on_what(tmp_path):
    from jaxdiff import config as config_lib
    from jaxdiff.provenance import run as run_lib

    class Task:
        kind = "pixel"
        summary = "digits (embedded): 5,000 images 16x16x1"
        images = np.zeros((2, 16, 16, 1), np.float32)

    cfg = config_lib.get_config()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n')
    (tmp_path / "samples.png").write_bytes(b"")
    card = pathlib.Path(run_lib.write_model_card(str(tmp_path), cfg, Task(), 2)).read_text()
    assert f"steps: 2 of {cfg.train.steps}" in card and "final training loss: 0.25000" in card
    assert "digits (embedded)" in card and "](samples.png)" in card and "## Intended use and limits" in card


# --------------------------------------------------------------------------------------------
# The SDXL watermark.

# sha256 of the uint8 pixels (RGB) that invisible-watermark 0.2.0's dwtDct encoder (opencv 5.1,
# pywavelets 1.9) gives for each image with SDXL's 48 bits, called as diffusers calls it (float32
# BGR in 0..255, then clipped and rounded): the reference's own output, so that the check runs
# where the package cannot be installed.
REFERENCE_SHA256 = {"noise": "d3117d73824cf1d7db139b46bdaef14fc72c3ad5124f788a69dbabfac080b936",
                    "china": "a667e5842da5bd3625e1fca3a175bb7358e5417b4e7acf8f377100b4dc04b14b"}


def _images() -> dict:
    """uint8 [256, 320, 3]: uniform noise, and a crop of the photo scikit-learn ships (china.jpg)."""
    from sklearn.datasets import load_sample_images

    return {"noise": np.random.RandomState(0).randint(0, 256, (256, 320, 3)).astype(np.uint8),
            "china": load_sample_images().images[0][171:171 + 256, 96:96 + 320]}


def _marked(img: np.ndarray) -> np.ndarray:
    return np.round(wm.embed_watermark(img / np.float32(255)) * 255).astype(np.uint8)


def test_watermark_pixels_are_the_reference_encoders():
    import hashlib

    for name, img in _images().items():
        assert hashlib.sha256(_marked(img).tobytes()).hexdigest() == REFERENCE_SHA256[name], name


def test_watermark_embeds_the_bits_where_the_method_puts_them():
    img = _images()["china"]
    marked = wm.embed_watermark(img / 255.0)
    assert marked.shape == img.shape and marked.dtype == np.float32
    # Only U changes (Y and V up to OpenCV's inexact YUV round trip; before clipping to 0..255).
    y0, u0, v0 = wm._yuv(img[..., ::-1].astype(np.float32), 0.5)
    y1, u1, v1 = wm._yuv(wm._embed_one(img.astype(np.float32), wm.WATERMARK_BITS)[..., ::-1], 0.5)
    assert np.abs(y1 - y0).max() < 0.05 and np.abs(v1 - v0).max() < 0.05 and np.abs(u1 - u0).max() > 5
    # The entry the embedder chose in each cA block (the largest magnitude after the first) now sits
    # a quarter into its cell of 36 (bit 0) or three quarters (bit 1), up to the round trip's error.
    before, _, _ = wm._blocks(wm._haar_approx(u0))
    after, _, _ = wm._blocks(wm._haar_approx(u1))
    rows = np.arange(len(before))
    value = np.abs(after[rows, wm._chosen(before)]) % wm.SCALE
    want = np.where(wm.WATERMARK_BITS[rows % 48], 27.0, 9.0)
    assert np.abs(value - want).max() < 0.5
    u8 = np.round(marked * 255).astype(np.uint8)
    assert wm.detect_watermark(u8) and not wm.detect_watermark(img)
    assert not wm.detect_watermark(np.zeros((64, 64, 3), np.uint8))               # too small to carry one
    small = (img[:128] / 255.0).astype(np.float32)
    assert np.array_equal(wm.embed_watermark(small), small)                        # left alone, as diffusers


def test_watermark_matches_invisible_watermark():
    imwatermark = pytest.importorskip("imwatermark")
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bits", [int(b) for b in wm.WATERMARK_BITS])
    decoder = imwatermark.WatermarkDecoder("bits", 48)
    for img in _images().values():
        x = img / np.float32(255)
        ref = encoder.encode((255 * x)[..., ::-1].astype(np.float32), "dwtDct")[..., ::-1]
        assert np.array_equal(wm._embed_one(255 * x, wm.WATERMARK_BITS), ref)      # float for float
        for image in (_marked(img), img):
            bits = np.array(decoder.decode(np.ascontiguousarray(image[..., ::-1]), "dwtDct"), bool)
            assert np.array_equal(wm.read_watermark_bits(image, reference=True), bits)


def test_pipeline_watermark_is_applied_to_the_decoded_images(folder, monkeypatch):  # noqa: F811
    """StableDiffusion marks what the sampling core returns (here a stand-in for it, so no
    256x256 U-Net runs), before converting it to the output type; off unless asked for SD 1.x."""
    from jaxdiff.pipelines import core
    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    decoded = np.clip(_images()["china"][:256, :256] / 255.0 + 0.01, 0, 1).astype(np.float32)[None]   # [1, 256, 256, 3]

    def run(job, mesh, *, output_type="np", progress=False, desc="sample"):
        assert output_type in ("np", "pil")                    # the pipeline asks for unit floats to mark
        return decoded if output_type == "np" else None

    monkeypatch.setattr(core, "run", run)
    pipe = StableDiffusion.from_pretrained(folder)
    assert not pipe.watermark                                               # SD 1.x folder: off by default
    kwargs = {"num_steps": 1, "guidance_scale": 1.0, "height": 256, "width": 256, "output_type": "np"}
    assert pipe("a cat", **kwargs) is decoded
    marked = StableDiffusion.from_pretrained(folder, add_watermarker=True)("a cat", **kwargs)
    assert np.array_equal(marked, wm.embed_watermark(decoded)) and not np.array_equal(marked, decoded)
    assert wm.detect_watermark(marked[0])
    # Two text encoders make it an SDXL pipeline: the watermark is on unless turned off, as in diffusers.
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
             "text_encoder_2": pipe.text_encoder, "tokenizer_2": pipe.tokenizer, "schedule": pipe.schedule,
             "scheduler_config": pipe.scheduler_config,
             "params": {**pipe.params, "text_encoder_2": pipe.params["text_encoder"]}}
    assert StableDiffusion(**parts).watermark and not StableDiffusion(**parts, add_watermarker=False).watermark
