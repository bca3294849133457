"""Stable Diffusion pipelines against diffusers' StableDiffusion(Img2Img, Inpaint)Pipeline built
from the same tiny random components and loaded from the folder diffusers saves."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import randomise_unit_gain, run_cli, write_clip_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxdiff import images as images_lib  # noqa: E402
from jaxdiff.errors import CheckpointError  # noqa: E402
from jaxdiff.convert import scheduler as scheduler_convert  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import StableDiffusion  # noqa: E402

N, SIZE, STEPS = 2, 16, 4          # images per call, pixels per side (latents 8x8), sampler steps
LATENT = (N, SIZE // 2, SIZE // 2, 4)
PROMPT = "a cat"


# ---------------------------------------------------------------------------------------------
# tiny diffusers components


def _tokenizer(folder):
    """A CLIP tokenizer folder with the byte vocabulary, a few merges, BOS and EOS (EOS pads)."""
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>")]
    vocab_size = write_clip_tokenizer(folder, merges=merges)
    return transformers.CLIPTokenizer.from_pretrained(str(folder)), vocab_size


def _randomise(model, seed):
    return randomise_unit_gain(model, seed).eval()


def _components(tmp, in_channels, scheduler):
    tokenizer, vocab_size = _tokenizer(tmp / f"tok{in_channels}")
    unet = _randomise(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=4), seed=in_channels)
    vae = _randomise(diffusers.AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8), seed=1)
    text = _randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=vocab_size - 1)),
        seed=2)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _pipeline(cls, components):
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, diffusers text-to-image pipeline) with a 4-channel U-Net and SD 1.5's DDIM config."""
    tmp = tmp_path_factory.mktemp("sd")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref = _pipeline(diffusers.StableDiffusionPipeline, _components(tmp, 4, scheduler))
    ref.save_pretrained(str(tmp / "model"), safe_serialization=True)
    return tmp / "model", ref


@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory):
    """(folder, diffusers inpainting pipeline) with a 9-channel U-Net and a DPM-Solver++ scheduler."""
    tmp = tmp_path_factory.mktemp("sdinpaint")
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012)
    ref = _pipeline(diffusers.StableDiffusionInpaintPipeline, _components(tmp, 9, scheduler))
    ref.save_pretrained(str(tmp / "model"), safe_serialization=True)
    return tmp / "model", ref


@pytest.fixture(scope="module")
def pipe(tiny):
    return StableDiffusion.from_pretrained(tiny[0])


def test_from_pretrained_dispatches_a_stable_diffusion_folder(tiny):
    import jaxdiff
    assert type(jaxdiff.from_pretrained(tiny[0])) is StableDiffusion


def _noise(seed=0):
    return np.random.RandomState(seed).randn(*LATENT).astype(np.float32)


def _torch(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _picture(seed=3):
    return Image.fromarray((np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


def _mask():
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[4:12, 2:10] = 255
    return Image.fromarray(m)


@pytest.fixture
def deterministic_diffusers(monkeypatch):
    """diffusers' img2img / inpaint draw the VAE posterior sample and the start noise from a
    torch generator, which jaxdiff cannot reproduce: encode with the posterior mean (jaxdiff's
    sample_posterior=False) and hand out the given noise instead. Returns a setter."""
    from diffusers.models.autoencoders import vae as dvae
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as i2i
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inp

    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    given = {}

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(given["noise"].shape), shape
        return given["noise"].clone()

    for module in (i2i, inp):
        monkeypatch.setattr(module, "randn_tensor", randn)
    return lambda noise: given.update(noise=_torch(noise))


# ---------------------------------------------------------------------------------------------
# text to image


def _text_args(ref, case):
    """diffusers' arguments for `case`. Its own clip_skip path reaches for `text_model`, which
    transformers 5's CLIPTextModel no longer has; it is done here as diffusers defines it (the
    hidden state clip_skip layers before the last, through the final LayerNorm) and handed over
    as prompt_embeds (the negative prompt stays at full depth, as in diffusers)."""
    case = dict(case)
    skip = case.pop("clip_skip", None)
    if skip is None:
        return dict(prompt=PROMPT, **case)
    ids = ref.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
        embeds = ref.text_encoder.final_layer_norm(hidden)
    return dict(prompt_embeds=embeds, **case)


def test_text_to_image_matches_diffusers(tiny, pipe):
    _, ref = tiny
    noise = _noise()
    cases = [dict(guidance_scale=7.5), dict(guidance_scale=1.0), dict(guidance_scale=7.5, negative_prompt="a dog"),
             dict(guidance_scale=5.0, guidance_rescale=0.7, clip_skip=1)]
    outs = []
    for case in cases:
        ours = pipe(PROMPT, num_steps=STEPS, num_images=N, latents=noise, output_type="np", **case)
        theirs = ref(num_inference_steps=STEPS, num_images_per_prompt=N, latents=_torch(noise), output_type="np",
                     **_text_args(ref, case)).images
        assert ours.shape == (N, SIZE, SIZE, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=str(case))   # measured ~5e-6
        outs.append(ours)
    # every setting really changes the pictures, so the comparisons above can fail
    for i in range(len(outs)):
        for j in range(i):
            assert np.abs(outs[i] - outs[j]).max() > 0.05, (cases[i], cases[j])
    assert outs[0].std() > 0.1


def test_another_sampler_matches_diffusers_scheduler_from_the_folder_config(tiny, pipe):
    """sampler="euler" on SD 1.5's DDIM config ("leading" spacing, steps_offset 1) is diffusers'
    EulerDiscreteScheduler.from_config of the saved config; a sigma-space sampler, so the given
    latents are scaled by its initial sigma (~4.2 here), not 1. (Measured for heun, lms, unipc,
    dpmpp_2m and pndm alike: ~1e-6.)"""
    folder, ref = tiny
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    noise = _noise(4)
    ours = pipe(PROMPT, sampler="euler", num_steps=STEPS, num_images=N, guidance_scale=1.0, latents=noise,
                output_type="np")
    euler = _pipeline(diffusers.StableDiffusionPipeline,
                      dict(ref.components, scheduler=diffusers.EulerDiscreteScheduler.from_config(config)))
    theirs = euler(PROMPT, num_inference_steps=STEPS, num_images_per_prompt=N, guidance_scale=1.0,
                   latents=_torch(noise), output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-3)                        # measured ~1e-6
    # the carried-over spacing matters: Euler's own default ("linspace") gives other pictures
    linspace = pipe(PROMPT, sampler="euler", timestep_spacing="linspace", num_steps=STEPS, num_images=N,
                    guidance_scale=1.0, latents=noise, output_type="np")
    assert np.abs(ours - linspace).max() > 0.05


def test_pil_output_seed_and_defaults(pipe):
    pictures = pipe(PROMPT, num_steps=STEPS, num_images=N, seed=1)                 # default size: 8 * 2
    assert len(pictures) == N and pictures[0].size == (SIZE, SIZE) and pictures[0].mode == "RGB"
    again = pipe(PROMPT, num_steps=STEPS, num_images=N, seed=1, output_type="np")
    np.testing.assert_array_equal(np.asarray(pictures[1]), images_lib.to_uint8(again)[1])
    other = pipe(PROMPT, num_steps=STEPS, num_images=N, seed=2, output_type="np")
    assert np.abs(other - again).max() > 0.05
    assert pipe.default_sampler == "ddim"
    import jaxdiff
    assert jaxdiff.StableDiffusion is StableDiffusion


def test_prompts_are_encoded_once_per_call_in_prompt_major_order(pipe):
    cond, uncond = pipe.encode_prompt(["a cat", "a dog"], "ugly", num_images=2)
    cat, neg = pipe.encode_prompt("a cat", "ugly")
    dog, _ = pipe.encode_prompt("a dog", guidance=False)
    assert cond.shape == uncond.shape == (4, 77, 32) and neg.shape == (1, 77, 32)
    for row, want in zip(cond, [cat[0], cat[0], dog[0], dog[0]]):
        np.testing.assert_allclose(row, want, atol=1e-5)
    np.testing.assert_allclose(uncond, np.repeat(neg, 4, 0), atol=1e-5)
    assert np.abs(cat - dog).max() > 0.1
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        pipe.encode_prompt(["a cat", "a dog"], ["ugly"])


# ---------------------------------------------------------------------------------------------
# image to image, inpainting


def test_img2img_matches_diffusers(tiny, pipe, deterministic_diffusers):
    _, ref = tiny
    i2i = _pipeline(diffusers.StableDiffusionImg2ImgPipeline, ref.components)
    noise, picture = _noise(1), _picture()
    deterministic_diffusers(noise)
    for strength in (0.5, 0.8):     # start steps 2 and 1 of 4 (num_steps - int(num_steps * strength))
        ours = pipe.img2img(picture, PROMPT, strength=strength, num_steps=STEPS, num_images=N, latents=noise,
                            output_type="np", sample_posterior=False)
        theirs = i2i(PROMPT, image=picture, strength=strength, num_inference_steps=STEPS,
                     num_images_per_prompt=N, output_type="np").images
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=f"strength={strength}")   # measured ~7e-6
    # float arrays in [0, 1] are the same input as the PIL image
    arr = np.asarray(picture, np.float32)[None] / 255.0
    again = pipe.img2img(arr, PROMPT, strength=0.8, num_steps=STEPS, num_images=N, latents=noise,
                         output_type="np", sample_posterior=False)
    np.testing.assert_allclose(again, ours, atol=1e-6)
    # the default encodes with a posterior sample: another result, reproducible from the seed
    sampled = [pipe.img2img(picture, PROMPT, strength=0.8, num_steps=STEPS, num_images=N, seed=5,
                            output_type="np") for _ in range(2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])


def test_inpaint_9_channel_unet_matches_diffusers(tiny_inpainting, deterministic_diffusers):
    folder, ref = tiny_inpainting
    pipe = StableDiffusion.from_pretrained(folder)
    assert pipe.default_sampler == "dpmpp_2m" and pipe.unet.in_channels == 9
    noise, picture, mask = _noise(2), _picture(), _mask()
    deterministic_diffusers(noise)
    outs = []
    for strength in (1.0, 0.75):
        ours = pipe.inpaint(picture, mask, PROMPT, strength=strength, num_steps=STEPS, num_images=N,
                            latents=noise, output_type="np", sample_posterior=False)
        # diffusers starts from pure noise whenever `latents` is given; below strength 1 let it draw
        # (the patched randn_tensor hands it the same noise) so it adds that noise to the image.
        given = dict(latents=_torch(noise)) if strength == 1.0 else {}
        theirs = ref(PROMPT, image=picture, mask_image=mask, strength=strength, num_inference_steps=STEPS,
                     num_images_per_prompt=N, output_type="np", height=SIZE, width=SIZE, **given).images
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=f"strength={strength}")   # measured ~1e-5
        outs.append(ours)
    assert np.abs(outs[0] - outs[1]).max() > 0.05


def test_inpaint_4_channel_unet_matches_diffusers_and_keeps_the_known_region(tiny, pipe, deterministic_diffusers):
    _, ref = tiny
    inpaint = _pipeline(diffusers.StableDiffusionInpaintPipeline, ref.components)
    noise, picture, mask = _noise(3), _picture(), _mask()
    deterministic_diffusers(noise)
    for strength in (1.0, 0.75):
        ours = pipe.inpaint(picture, mask, PROMPT, strength=strength, num_steps=STEPS, num_images=N,
                            latents=noise, output_type="np", sample_posterior=False)
        given = dict(latents=_torch(noise)) if strength == 1.0 else {}
        theirs = inpaint(PROMPT, image=picture, mask_image=mask, strength=strength, num_inference_steps=STEPS,
                         num_images_per_prompt=N, output_type="np", height=SIZE, width=SIZE, **given).images
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=f"strength={strength}")   # measured ~7e-6

    # Property: the final latents equal the image's latents exactly outside the (latent-size) mask,
    # and differ from them inside it; with a posterior sample too.
    latents = pipe.inpaint(picture, mask, PROMPT, num_steps=STEPS, num_images=N, seed=4, output_type="latent",
                           sample_posterior=False)
    pixels = np.asarray(picture, np.float32)[None] / 127.5 - 1.0
    known = np.asarray(pipe.encode_images(np.repeat(pixels, N, 0)))
    keep = (np.asarray(mask)[::2, ::2] < 128)[None, :, :, None] & np.ones(LATENT, bool)
    np.testing.assert_array_equal(latents[keep], known[keep])
    assert np.abs(latents[~keep] - known[~keep]).max() > 0.1


def test_bf16_is_finite_and_close_to_float32(tiny, pipe):
    folder, _ = tiny
    half = StableDiffusion.from_pretrained(folder, dtype=jnp.bfloat16)
    assert half.unet.dtype == jnp.bfloat16 and half.text_encoder.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(half.params))
    # The README's "within 1e-2 of float32": the largest difference of any pixel (on the [0, 1]
    # scale of output_type="np") without guidance; over six start noises it measured 5.9e-3 to
    # 9.5e-3 (mean differences 1.0e-3 to 1.4e-3). A guidance scale of 7.5 multiplies the networks'
    # rounding error by as much (measured there: max 5e-2 to 8e-2, mean ~1e-2, latents 4e-2 to 5e-2
    # relative).
    noise, run = _noise(), dict(num_steps=STEPS, num_images=N, guidance_scale=1.0)
    a = pipe(PROMPT, latents=noise, output_type="np", **run)
    b = half(PROMPT, latents=noise, output_type="np", **run)
    assert np.isfinite(b).all()
    assert 1e-5 < np.abs(a - b).max() < 1e-2, np.abs(a - b).max()            # measured 8.6e-3
    assert np.abs(a - b).mean() < 3e-3                                         # measured 1.3e-3
    la = pipe(PROMPT, latents=noise, output_type="latent", **run)
    lb = half(PROMPT, latents=noise, output_type="latent", **run)
    assert lb.dtype == np.float32
    assert np.linalg.norm(la - lb) / np.linalg.norm(la) < 1e-2                  # measured 6.2e-3 (5.0e-3 to 6.5e-3)


# ---------------------------------------------------------------------------------------------
# scheduler configs


def test_scheduler_configs_map_to_samplers_and_options():
    sd15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    assert scheduler_convert.default_sampler(sd15) == "pndm"
    assert scheduler_convert.sampler_options("pndm", sd15) == {"set_alpha_to_one": False, "skip_prk_steps": True,
                                                    "steps_offset": 1}
    # switching sampler keeps the shared keys, as diffusers' from_config does
    assert scheduler_convert.sampler_options("ddim", sd15) == {"set_alpha_to_one": False, "steps_offset": 1,
                                                    "clip_sample": False}
    schedule = scheduler_convert.schedule_from_config(sd15)
    expected = diffusers.PNDMScheduler.from_config(sd15).alphas_cumprod.numpy()
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), expected, rtol=1e-6)

    dpm = dict(diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3,
                                                     use_karras_sigmas=True).config)
    dpm["_class_name"] = "DPMSolverMultistepScheduler"
    assert scheduler_convert.default_sampler(dpm) == "dpmpp_3m_sde"
    opts = scheduler_convert.sampler_options("dpmpp_3m_sde", dpm)
    assert opts["use_karras_sigmas"] is True and "solver_order" not in opts
    assert "solver_type" not in scheduler_convert.sampler_options("unipc", dpm)       # midpoint is not a UniPC type
    for cls, name in [("EulerDiscreteScheduler", "euler"), ("DDIMScheduler", "ddim"),
                      ("UniPCMultistepScheduler", "unipc"), ("LMSDiscreteScheduler", "lms")]:
        assert scheduler_convert.default_sampler({"_class_name": cls}) == name
    v = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
         "timestep_spacing": "trailing", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    assert scheduler_convert.sampler_options("euler", v) == {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    zsnr = scheduler_convert.schedule_from_config(v)
    assert float(zsnr.alphas_cumprod[-1]) < 1e-6
    with pytest.raises(CheckpointError, match="beta_schedule='sigmoid'"):
        scheduler_convert.schedule_from_config({"beta_schedule": "sigmoid"})


# ---------------------------------------------------------------------------------------------
# errors


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_bad_folders_give_one_clear_message(tiny, tmp_path):
    folder, _ = tiny
    with pytest.raises(CheckpointError, match="not found"):
        StableDiffusion.from_pretrained(tmp_path / "nowhere")
    bad = _copy(folder, tmp_path)
    (bad / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        StableDiffusion.from_pretrained(bad)
    shutil.rmtree(bad)
    bad = _copy(folder, tmp_path)
    shutil.rmtree(bad / "vae")
    with pytest.raises(CheckpointError, match=r"no vae/ folder \(model_index.json lists vae: AutoencoderKL\)"):
        StableDiffusion.from_pretrained(bad)
    shutil.rmtree(bad)
    bad = _copy(folder, tmp_path)
    (bad / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match="no scheduler_config.json"):
        StableDiffusion.from_pretrained(bad)
    shutil.rmtree(bad)
    bad = _copy(folder, tmp_path)       # a pickle-only part is refused, never unpickled
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(bad / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        StableDiffusion.from_pretrained(bad)


def test_bad_arguments_give_one_clear_message(pipe):
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe(PROMPT, height=18, width=16)
    with pytest.raises(ValueError, match=r"latents must be standard-normal noise of shape \[2, 8, 8, 4\]"):
        pipe(PROMPT, num_images=2, latents=np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="leaves no step to run"):
        pipe.img2img(_picture(), PROMPT, strength=0.1, num_steps=4)
    with pytest.raises(ValueError, match="strength must lie in"):
        pipe.img2img(_picture(), PROMPT, strength=1.5)
    with pytest.raises(ValueError, match="image height and width must be multiples of 4"):
        pipe.img2img(np.zeros((18, 16, 3), np.float32), PROMPT)
    with pytest.raises(ValueError, match="mask is 8x8 but the image is 16x16"):
        pipe.inpaint(_picture(), np.zeros((8, 8)), PROMPT)
    with pytest.raises(ValueError, match="has no eta option"):
        pipe(PROMPT, sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="cannot start part-way"):
        pipe.img2img(_picture(), PROMPT, sampler="pndm")
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        pipe(PROMPT, sampler="nope")
    with pytest.raises(ValueError, match="3 images for 2 outputs"):
        pipe.img2img(np.zeros((3, SIZE, SIZE, 3), np.float32), PROMPT, num_images=2)


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_generate_writes_a_png_with_the_batch_split_over_two_devices(tiny, pipe, tmp_path):
    folder, _ = tiny
    out = tmp_path / "cat.png"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("JAXDIFF_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "generate", "--model", str(folder), "--prompt", PROMPT,
                           "--steps", "2", "--num", "2", "--seed", "1", "--guidance_scale", "1", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch over 2 devices" in proc.stdout, proc.stdout
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + SIZE + 2, 2 + 2 * (SIZE + 2), 3)                  # a 1 x 2 grid with 2px gaps
    # the same pictures as one device makes (up to a rounding step of uint8)
    ours = images_lib.to_uint8(pipe(PROMPT, num_steps=2, num_images=2, seed=1, guidance_scale=1.0, output_type="np"))
    for i in range(2):
        tile = grid[2:2 + SIZE, 2 + i * (SIZE + 2):2 + i * (SIZE + 2) + SIZE].astype(int)
        assert np.abs(tile - ours[i]).max() <= 1
    assert ours.std() > 5

    proc = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", PROMPT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("jaxdiff generate: error:")]
    assert len(lines) == 1 and "not found" in lines[0], proc.stderr[-2000:]
