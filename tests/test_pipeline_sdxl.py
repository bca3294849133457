"""SDXL through the one StableDiffusion entry point, against diffusers' StableDiffusionXL(Img2Img,
Inpaint)Pipeline built from the same tiny random components and loaded from the folders
diffusers saves (base and refiner layouts, an fp16 variant)."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import randomise_unit_gain, tree_equal, write_clip_tokenizer
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxdiff.convert import folder as folder_convert  # noqa: E402
from jaxdiff.convert import single_file, tensors  # noqa: E402
from jaxdiff.errors import CheckpointError  # noqa: E402
from jaxdiff.pipelines import prompts as prompts_lib  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import StableDiffusion  # noqa: E402

N, SIZE, STEPS = 2, 16, 4          # images per call, pixels per side (latents 8x8), sampler steps
LATENT = (N, SIZE // 2, SIZE // 2, 4)
PROMPT = "a cat"
WIDTH_1, WIDTH_2, POOLED, TIME = 16, 32, 24, 8    # encoder widths, projection, sinusoid per time id


# ---------------------------------------------------------------------------------------------
# tiny diffusers components


def _tokenizer(folder, pad=None):
    """A CLIP tokenizer with the byte vocabulary and a few merges; `pad` replaces EOS padding
    (SDXL's second tokenizer pads with "!")."""
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>")]
    vocab_size = write_clip_tokenizer(folder, merges=merges)
    if pad is not None:
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            config = json.loads((folder / name).read_text())
            config["pad_token"] = pad if name == "tokenizer_config.json" else dict(config["pad_token"], content=pad)
            (folder / name).write_text(json.dumps(config))
    return transformers.CLIPTokenizer.from_pretrained(str(folder)), vocab_size


def _text(cls, vocab_size, width, seed, **extra):
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=vocab_size - 1,
        hidden_act="gelu", **extra)
    return randomise_unit_gain(cls(config), seed).eval()


def _unet(context, time_ids, seed, in_channels=4):
    return randomise_unit_gain(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=context, norm_num_groups=8,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME,
        projection_class_embeddings_input_dim=POOLED + time_ids * TIME), seed).eval()


def _vae():
    return randomise_unit_gain(diffusers.AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8, scaling_factor=0.13025, force_upcast=True), 1).eval()


def _scheduler():
    """SDXL's released scheduler: Euler, "leading" spacing, steps_offset 1."""
    return diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            steps_offset=1, timestep_spacing="leading")


def _pipeline(cls, components, **config):
    pipe = cls(**components, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, diffusers SDXL text-to-image pipeline, its components)."""
    tmp = tmp_path_factory.mktemp("sdxl")
    tokenizer, vocab = _tokenizer(tmp / "tok")
    tokenizer_2, _ = _tokenizer(tmp / "tok2", pad="!")
    components = dict(
        unet=_unet(WIDTH_1 + WIDTH_2, 6, seed=3), vae=_vae(), scheduler=_scheduler(),
        text_encoder=_text(transformers.CLIPTextModel, vocab, WIDTH_1, seed=4), tokenizer=tokenizer,
        text_encoder_2=_text(transformers.CLIPTextModelWithProjection, vocab, WIDTH_2, seed=5, projection_dim=POOLED),
        tokenizer_2=tokenizer_2)
    ref = _pipeline(diffusers.StableDiffusionXLPipeline, components, add_watermarker=False)
    ref.save_pretrained(str(tmp / "model"), safe_serialization=True)
    return tmp / "model", ref, components


@pytest.fixture(scope="module")
def pipe(tiny):
    return StableDiffusion.from_pretrained(tiny[0])


def _noise(seed=0):
    return np.random.RandomState(seed).randn(*LATENT).astype(np.float32)


def _torch(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _picture(seed=3):
    return Image.fromarray((np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


@pytest.fixture
def deterministic_diffusers(monkeypatch):
    """diffusers' img2img / inpaint draw the VAE posterior sample and the start noise from a torch
    generator: encode with the posterior mean (jaxdiff's sample_posterior=False) and hand out the
    given noise instead. Returns a setter."""
    from diffusers.models.autoencoders import vae as dvae
    from diffusers.pipelines.stable_diffusion_xl import (
        pipeline_stable_diffusion_xl_img2img as i2i,
    )
    from diffusers.pipelines.stable_diffusion_xl import (
        pipeline_stable_diffusion_xl_inpaint as inp,
    )

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


def test_loads_as_sdxl(tiny, pipe):
    folder, _, _ = tiny
    assert pipe.xl and pipe.unet.context_dim == WIDTH_1 + WIDTH_2
    assert pipe.text_encoder_2.projection_dim == POOLED and pipe.default_sampler == "euler"
    assert pipe.prompts.force_zeros and not pipe.prompts.aesthetics
    assert pipe.vae.scaling_factor == pytest.approx(0.13025)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_text_to_image_matches_diffusers(tiny, pipe):
    _, ref, _ = tiny
    noise = _noise()
    cases = [dict(guidance_scale=5.0),                                     # zeros for the empty negative
             dict(guidance_scale=1.0),
             dict(guidance_scale=5.0, negative_prompt="a dog", prompt_2="a dog", negative_prompt_2="a cat"),
             dict(guidance_scale=5.0, original_size=(40, 24), crops_coords_top_left=(4, 2), target_size=(24, 16)),
             dict(guidance_scale=5.0, clip_skip=1),
             # one image: with more, diffusers' text-to-image tiles [negative; positive] time ids
             # over the batch, so that half the guided rows get the other row's (its own bug)
             dict(guidance_scale=5.0, negative_prompt="ugly", negative_original_size=(8, 8),
                  negative_crops_coords_top_left=(1, 3), negative_target_size=(12, 20), n=1)]
    outs = []
    for case in cases:
        case = dict(case)
        n = case.pop("n", N)
        ours = pipe(PROMPT, num_steps=STEPS, num_images=n, latents=noise[:n], output_type="np", **case)
        theirs = ref(PROMPT, num_inference_steps=STEPS, num_images_per_prompt=n, latents=_torch(noise[:n]),
                     output_type="np", **case).images
        assert ours.shape == (n, SIZE, SIZE, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=str(case))      # measured ~1e-5
        outs.append(ours[:1])
    # every setting (guidance, second prompt, micro-conditioning) really changes the pictures
    for i in range(len(outs)):
        for j in range(i):
            assert np.abs(outs[i] - outs[j]).max() > 0.05, (cases[i], cases[j])
    assert outs[0].std() > 0.1


def test_second_prompt_and_time_ids_reach_the_unet(pipe):
    """prompt_2 changes only encoder 2's half of the context and the pooled embedding; the
    micro-conditioning only time_ids; the empty negative is zeros."""
    run = dict(num_images=1, height=SIZE, width=SIZE)
    base, zero = pipe.encode_text(prompts_lib.Text(PROMPT), **run)
    other, _ = pipe.encode_text(prompts_lib.Text(PROMPT, prompt_2="a dog"), **run)
    np.testing.assert_array_equal(base["context"][..., :WIDTH_1], other["context"][..., :WIDTH_1])
    assert np.abs(base["context"][..., WIDTH_1:] - other["context"][..., WIDTH_1:]).max() > 0.1
    assert np.abs(base["text_embeds"] - other["text_embeds"]).max() > 0.1
    np.testing.assert_array_equal(base["time_ids"], [[SIZE, SIZE, 0, 0, SIZE, SIZE]])
    assert not np.any(zero["context"]) and not np.any(zero["text_embeds"])
    sized, _ = pipe.encode_text(prompts_lib.Text(PROMPT, original_size=(64, 48)), **run)
    np.testing.assert_array_equal(sized["time_ids"], [[64, 48, 0, 0, SIZE, SIZE]])
    np.testing.assert_array_equal(sized["context"], base["context"])


def test_new_prompts_sizes_and_scores_never_recompile(pipe):
    """Prompts, second prompts and the micro-conditioning are traced leaves: after a first guided
    call with a negative prompt, another with new values of all of them compiles nothing (counted
    with jax.monitoring, as test_compile_count does for SD)."""
    from test_compile_count import Count

    run = dict(num_steps=STEPS, num_images=N, latents=_noise(), guidance_scale=5.0, output_type="latent")
    first = pipe(PROMPT, negative_prompt="ugly", **run)
    with Count() as later:
        second = pipe("a dog", negative_prompt="a bird", prompt_2="a cat", negative_prompt_2="ugly",
                      original_size=(64, 48), crops_coords_top_left=(3, 1), target_size=(8, 24), **run)
    assert not later.compiles, later.compiles
    assert np.abs(first - second).max() > 0.05


def test_bf16_keeps_the_vae_in_float32_and_stays_close(tiny, pipe):
    """SDXL's VAE says force_upcast: it decodes in float32 even when asked not to."""
    import jax.numpy as jnp

    half = StableDiffusion.from_pretrained(tiny[0], dtype=jnp.bfloat16, vae_float32=False)
    assert half.vae_float32 and half.unet.dtype == jnp.bfloat16 and half.text_encoder_2.dtype == jnp.bfloat16
    run = dict(num_steps=STEPS, num_images=N, latents=_noise(), guidance_scale=1.0, output_type="np")
    a, b = pipe(PROMPT, **run), half(PROMPT, **run)
    assert np.isfinite(b).all()
    assert 1e-5 < np.abs(a - b).max() < 3e-2, np.abs(a - b).max()     # measured 1.5e-2 to 1.7e-2 over 3 noises


# ---------------------------------------------------------------------------------------------
# image to image, refiner, inpainting


def test_img2img_matches_diffusers(tiny, pipe, deterministic_diffusers):
    _, _, components = tiny
    i2i = _pipeline(diffusers.StableDiffusionXLImg2ImgPipeline, components)
    noise, picture = _noise(1), _picture()
    deterministic_diffusers(noise)
    outs = []
    for case in (dict(strength=0.5), dict(strength=0.75, negative_prompt="a dog", original_size=(32, 32))):
        ours = pipe.img2img(picture, PROMPT, num_steps=STEPS, num_images=N, latents=noise, guidance_scale=5.0,
                            output_type="np", sample_posterior=False, **case)
        theirs = i2i(PROMPT, image=picture, num_inference_steps=STEPS, num_images_per_prompt=N, guidance_scale=5.0,
                     output_type="np", **case).images
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=str(case))      # measured ~2e-5
        outs.append(ours)
    assert np.abs(outs[0] - outs[1]).max() > 0.05


@pytest.fixture(scope="module")
def refiner(tiny, tmp_path_factory):
    """(folder, diffusers refiner): encoder 2 alone, aesthetic-score time ids, no zeroed negative."""
    _, _, components = tiny
    tmp = tmp_path_factory.mktemp("refiner")
    parts = dict(components, text_encoder=None, tokenizer=None, unet=_unet(WIDTH_2, 5, seed=6))
    ref = _pipeline(diffusers.StableDiffusionXLImg2ImgPipeline, parts, requires_aesthetics_score=True,
                    force_zeros_for_empty_prompt=False, add_watermarker=False)
    ref.save_pretrained(str(tmp / "refiner"), safe_serialization=True)
    return tmp / "refiner", ref


def test_refiner_img2img_matches_diffusers(refiner, deterministic_diffusers):
    folder, ref = refiner
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    pipe = StableDiffusion.from_pretrained(folder)
    assert pipe.text_encoder is None and pipe.prompts.aesthetics and not pipe.prompts.force_zeros
    noise, picture = _noise(2), _picture(4)
    deterministic_diffusers(noise)
    outs = []
    for case in (dict(), dict(aesthetic_score=9.0, negative_aesthetic_score=1.0, negative_prompt="a dog")):
        ours = pipe.img2img(picture, PROMPT, strength=0.5, num_steps=STEPS, num_images=N, latents=noise,
                            guidance_scale=5.0, output_type="np", sample_posterior=False, **case)
        theirs = ref(PROMPT, image=picture, strength=0.5, num_inference_steps=STEPS, num_images_per_prompt=N,
                     guidance_scale=5.0, output_type="np", **case).images
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=str(case))      # measured ~9e-6
        outs.append(ours)
    assert np.abs(outs[0] - outs[1]).max() > 0.05
    cond, _ = pipe.encode_text(prompts_lib.Text(PROMPT, aesthetic_score=7.0), height=SIZE, width=SIZE)
    np.testing.assert_array_equal(cond["time_ids"], [[SIZE, SIZE, 0, 0, 7.0]])


def test_inpaint_matches_diffusers(tiny, pipe, deterministic_diffusers):
    _, _, components = tiny
    inpaint = _pipeline(diffusers.StableDiffusionXLInpaintPipeline, components)
    noise, picture = _noise(3), _picture(5)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:12, 2:10] = 255
    mask = Image.fromarray(mask)
    deterministic_diffusers(noise)
    for strength in (1.0, 0.75):
        ours = pipe.inpaint(picture, mask, PROMPT, strength=strength, num_steps=STEPS, num_images=N, latents=noise,
                            guidance_scale=5.0, output_type="np", sample_posterior=False)
        given = dict(latents=_torch(noise)) if strength == 1.0 else {}
        theirs = inpaint(PROMPT, image=picture, mask_image=mask, strength=strength, num_inference_steps=STEPS,
                         num_images_per_prompt=N, guidance_scale=5.0, output_type="np", height=SIZE, width=SIZE,
                         **given).images
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=f"strength={strength}")   # measured ~8e-6


# ---------------------------------------------------------------------------------------------
# variants and broken folders


def test_fp16_variant_loads_every_network(tiny, pipe, tmp_path):
    _, _, components = tiny
    half = {k: (v.to(torch.float16) if isinstance(v, torch.nn.Module) else v) for k, v in components.items()}
    _pipeline(diffusers.StableDiffusionXLPipeline, half, add_watermarker=False).save_pretrained(
        str(tmp_path / "fp16"), safe_serialization=True, variant="fp16")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert any(".fp16." in p.name for p in (tmp_path / "fp16" / part).iterdir()), part
    with pytest.raises(CheckpointError, match="another variant"):
        StableDiffusion.from_pretrained(tmp_path / "fp16")
    loaded = StableDiffusion.from_pretrained(tmp_path / "fp16", variant="fp16")
    full, halved = jax.tree.leaves(pipe.params), jax.tree.leaves(loaded.params)
    assert len(full) == len(halved) and all(h.dtype == np.float32 for h in halved)
    errors = [np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(a)).max() + 1e-12)
              for a, b in zip(full, halved)]
    assert 0 < max(errors) < 1e-3                                                # fp16 rounding, nothing more


def _copy(folder, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def test_broken_sdxl_folders_give_one_clear_message(tiny, tmp_path):
    folder, _, _ = tiny
    bad = _copy(folder, tmp_path, "no_te2")
    shutil.rmtree(bad / "text_encoder_2")
    with pytest.raises(CheckpointError, match=r"no text_encoder_2/ folder \(model_index.json lists text_encoder_2: "
                                              r"CLIPTextModelWithProjection\); a Stable Diffusion XL folder"):
        StableDiffusion.from_pretrained(bad)
    bad = _copy(folder, tmp_path, "wide")           # encoder 1 as wide as encoder 2: 32 + 32 != 48
    shutil.rmtree(bad / "text_encoder")
    shutil.copytree(bad / "text_encoder_2", bad / "text_encoder")
    with pytest.raises(CheckpointError, match=r"cross_attention_dim=48 does not match the text encoders' "
                                              r"hidden_size=32 \+ 32"):
        StableDiffusion.from_pretrained(bad)
    bad = _copy(folder, tmp_path, "no_head")        # a plain CLIPTextModel as encoder 2
    shutil.rmtree(bad / "text_encoder_2")
    shutil.copytree(bad / "text_encoder", bad / "text_encoder_2")
    with pytest.raises(CheckpointError, match="text_encoder_2 has no projection head"):
        StableDiffusion.from_pretrained(bad)
    bad = _copy(folder, tmp_path, "aesthetic")      # a base U-Net told to take 5 time ids
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps(dict(index, requires_aesthetics_score=True)))
    with pytest.raises(CheckpointError, match=r"projection_class_embeddings_input_dim=72 does not match "
                                              r"text_encoder_2's projection_dim=24 \+ 5 time ids x 8 = 64"):
        StableDiffusion.from_pretrained(bad)


def test_bad_sdxl_arguments_give_one_clear_message(pipe):
    with pytest.raises(ValueError, match="original_size must be a pair of numbers"):
        pipe(PROMPT, original_size=1024)
    with pytest.raises(ValueError, match="2 prompt_2s for 1 prompts"):
        pipe(PROMPT, prompt_2=["a", "b"])
    with pytest.raises(ValueError, match="aesthetic_score must be a finite number"):
        pipe(PROMPT, aesthetic_score=float("nan"))
    one = prompts_lib.PromptEncoder([(pipe.text_encoder, pipe.tokenizer)])        # an SD 1.x/2.x text side
    with pytest.raises(ValueError, match="prompt_2, original_size: SDXL options, and this is a Stable Diffusion "
                                         "1.x/2.x model"):
        one((pipe.params["text_encoder"],), prompts_lib.Text(PROMPT, prompt_2="a dog", original_size=(8, 8)))


# ---------------------------------------------------------------------------------------------
# single files (Stability's sgm layout)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny SDXL whose shapes a single file can describe (64-channel heads, 32 GroupNorm groups,
    CLIP-L's quick_gelu and bigG's gelu): (folder, components)."""
    tmp = tmp_path_factory.mktemp("sdxl64")
    tokenizer, vocab = _tokenizer(tmp / "tok")
    tokenizer_2, _ = _tokenizer(tmp / "tok2", pad="!")

    def text(cls, width, seed, act, **extra):
        config = transformers.CLIPTextConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=width // 64, max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=2,
            pad_token_id=vocab - 1, hidden_act=act, **extra)
        return randomise_unit_gain(cls(config), seed).eval()

    unet = randomise_unit_gain(diffusers.UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64 + 128, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME), 7).eval()
    vae = randomise_unit_gain(diffusers.AutoencoderKL(
        block_out_channels=[32, 64], latent_channels=4, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        scaling_factor=0.13025), 8).eval()
    components = dict(unet=unet, vae=vae, scheduler=_scheduler(), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                      text_encoder=text(transformers.CLIPTextModel, 64, 9, "quick_gelu"),
                      text_encoder_2=text(transformers.CLIPTextModelWithProjection, 128, 10, "gelu",
                                          projection_dim=POOLED))
    _pipeline(diffusers.StableDiffusionXLPipeline, components, add_watermarker=False).save_pretrained(
        str(tmp / "model"), safe_serialization=True)
    return tmp / "model", components


def test_sdxl_single_file_round_trip_and_diffusers_reads_it(tiny64, tmp_path):
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    folder, components = tiny64
    parts = folder_convert.load_pretrained(folder)
    path = tmp_path / "sdxl.safetensors"
    single_file.save_single_file(path, parts["unet"], parts["vae"], parts["text_encoder"],
                                 text_encoder_2=parts["text_encoder_2"])
    # diffusers' own single-file converters read back the very weights of the diffusers models
    raw = load_file(str(path))
    assert "conditioner.embedders.1.model.text_projection" in raw and "model.diffusion_model.label_emb.0.0.weight" in raw
    unet_sd = sfu.convert_ldm_unet_checkpoint(raw, dict(components["unet"].config))
    vae_sd = sfu.convert_ldm_vae_checkpoint(raw, dict(components["vae"].config))
    clip_sd = sfu.convert_ldm_clip_checkpoint(raw)
    bigg_sd = sfu.convert_open_clip_checkpoint(components["text_encoder_2"], raw, prefix="conditioner.embedders.1.model.")
    for model, got in [("unet", unet_sd), ("vae", vae_sd), ("text_encoder", clip_sd), ("text_encoder_2", bigg_sd)]:
        # (transformers 5 names CLIPTextModel's weights without the text_model. prefix)
        want = {k.removeprefix("text_model."): v for k, v in components[model].state_dict().items()
                if not k.endswith("position_ids")}
        got = {k.removeprefix("text_model."): v for k, v in got.items() if not k.endswith("position_ids")}
        assert set(got) == set(want), (model, sorted(set(got) ^ set(want))[:5])
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"{model}: {k}")

    loaded = single_file.load_single_file(path)
    assert loaded["options"] == {"xl": True, "force_zeros_for_empty_prompt": True,
                                 "requires_aesthetics_score": False, "force_upcast": True}
    assert loaded["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert tree_equal(loaded[part][1], parts[part][1]), part
    for part in ("text_encoder", "text_encoder_2", "vae"):
        assert loaded[part][0] == parts[part][0], part
    unet, want = loaded["unet"][0], parts["unet"][0]
    # sample_size is 128 for released files; transformer_depth 2 for (1, 2) differs at level 0 only,
    # which has no attention
    assert unet.clone(sample_size=want.sample_size, transformer_depth=want.transformer_depth) == want
    assert unet.attention_levels == (1,) and unet.per_level("transformer_depth")[1] == 2

    # the command line's conversion: a diffusers SDXL folder, read back by diffusers and by jaxdiff
    notes = single_file.to_diffusers_folder(path, tmp_path / "converted", tokenizer_dir=folder)
    assert notes == []
    back = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "converted"))
    assert back.tokenizer_2.pad_token == "!" and back.config.force_zeros_for_empty_prompt
    assert back.text_encoder_2.config.projection_dim == POOLED and back.unet.config.addition_time_embed_dim == TIME
    again = folder_convert.load_pretrained(tmp_path / "converted")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert tree_equal(again[part][1], parts[part][1]), part

    # a refiner file: OpenCLIP bigG alone as embedders.0, 5 time ids
    refiner = tmp_path / "refiner.safetensors"
    raw = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v.numpy() for k, v in raw.items()
           if not k.startswith("conditioner.embedders.0.")}
    label = "model.diffusion_model.label_emb.0.0.weight"
    raw[label] = raw[label][:, :POOLED + 5 * TIME]
    tensors.write_safetensors(raw, str(refiner), metadata={"format": "pt"})
    loaded = single_file.load_single_file(refiner)
    assert "text_encoder" not in loaded and loaded["options"]["requires_aesthetics_score"]
    assert loaded["unet"][0].addition_embed_dim == POOLED + 5 * TIME and loaded["unet"][0].addition_time_embed_dim == TIME
    assert tree_equal(loaded["text_encoder_2"][1], parts["text_encoder_2"][1])


# ---------------------------------------------------------------------------------------------
# LoRA on both text encoders and the U-Net


def test_sdxl_lora_matches_diffusers(tiny, pipe, tmp_path, monkeypatch):
    import transformers.integrations.peft as integration
    from test_lora import TEXT_TARGETS, UNET_TARGETS, _lora_layers

    # transformers 5.25 asks for peft >= 0.22 before it attaches an adapter; 0.21 does the same work
    monkeypatch.setattr(integration, "check_peft_version", lambda min_version=None: None)
    folder, _, components = tiny
    # alpha / rank = 1/4 on the U-Net: at 2 (unit-gain factors on all eight targets) this tiny U-Net is
    # so ill-conditioned that diffusers' own fused and unfused runs differ by 6e-2, and jaxdiff with
    # diffusers' fused weights (equal to jaxdiff's merge to 1e-5) by 5e-2.
    layers = {"unet": _lora_layers(components["unet"], UNET_TARGETS, 4, 1, seed=10),
              "text_encoder": _lora_layers(components["text_encoder"], TEXT_TARGETS, 2, 3, seed=11),
              "text_encoder_2": _lora_layers(components["text_encoder_2"], TEXT_TARGETS, 2, 4, seed=12)}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path / "lora"), **{f"{k}_lora_layers": v[0] for k, v in layers.items()},
        **{f"{k}_lora_adapter_metadata": v[1] for k, v in layers.items()})
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(tmp_path / "lora"))
    run = dict(num_images=N, guidance_scale=5.0, output_type="np")
    theirs = ref(PROMPT, num_inference_steps=STEPS, num_images_per_prompt=N, guidance_scale=5.0, output_type="np",
                 latents=_torch(_noise()), cross_attention_kwargs={"scale": 0.7}).images
    plain = pipe(PROMPT, num_steps=STEPS, latents=_noise(), **run)
    adapted = StableDiffusion.from_pretrained(folder)
    adapted.load_lora(tmp_path / "lora", scale=0.7)
    ours = adapted(PROMPT, num_steps=STEPS, latents=_noise(), **run)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert np.abs(ours - plain).max() > 0.05
