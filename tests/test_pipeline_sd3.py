"""Stable Diffusion 3 through `StableDiffusion3.from_pretrained` (jaxdiff/pipelines/sd3.py) against
diffusers' StableDiffusion3Pipeline built from the same tiny random components and loaded from the
folder diffusers saves: with and without a T5 (text_encoder_3), with guidance and without."""

import json

import numpy as np
import pytest
from conftest import randomise_unit_gain

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# the tiny CLIP encoders and tokenizers of the SDXL tests, the tiny T5 tokenizer of the T5 tests
from test_pipeline_sdxl import _text, _tokenizer
from test_t5 import PIECES, _tokenizer_backend

import jaxdiff
from jaxdiff.errors import CheckpointError
from jaxdiff.pipelines.sd3 import StableDiffusion3

N, LATENT, CHANNELS, STEPS, T5_LENGTH = 2, 16, 16, 2, 12   # latents 16x16x16, images 32x32
WIDTH_1, WIDTH_2, PROJ_1, PROJ_2, T5_WIDTH = 16, 32, 8, 16, 64
PROMPT = "a cat"


def _transformer():
    return randomise_unit_gain(diffusers.SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=CHANNELS, out_channels=CHANNELS, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=PROJ_1 + PROJ_2, pos_embed_max_size=12), 7).eval()


def _vae():
    """A 16-channel autoencoder with a shift factor and no quant convs, like SD3's (factor 2 here)."""
    return randomise_unit_gain(diffusers.AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=CHANNELS, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False), 8).eval()


def _t5(tmp):
    config = transformers.T5Config(vocab_size=len(PIECES), d_model=T5_WIDTH, d_kv=8, d_ff=48, num_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = randomise_unit_gain(transformers.T5EncoderModel(config), 9).eval()
    tokenizer = transformers.T5TokenizerFast(tokenizer_object=_tokenizer_backend(True), eos_token="</s>",
                                             pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    tokenizer.save_pretrained(tmp / "tok3")
    return model, transformers.T5TokenizerFast.from_pretrained(tmp / "tok3")


def _reference(tmp, with_t5: bool):
    tokenizer, vocab = _tokenizer(tmp / "tok")
    tokenizer_2, _ = _tokenizer(tmp / "tok2", pad="!")
    t5, tokenizer_3 = _t5(tmp) if with_t5 else (None, None)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(),
        text_encoder=_text(transformers.CLIPTextModelWithProjection, vocab, WIDTH_1, 4, projection_dim=PROJ_1),
        tokenizer=tokenizer,
        text_encoder_2=_text(transformers.CLIPTextModelWithProjection, vocab, WIDTH_2, 5, projection_dim=PROJ_2),
        tokenizer_2=tokenizer_2, text_encoder_3=t5, tokenizer_3=tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(tmp / "model"), safe_serialization=True)
    return tmp / "model", pipe


@pytest.fixture(scope="module")
def with_t5(tmp_path_factory):
    folder, ref = _reference(tmp_path_factory.mktemp("sd3"), with_t5=True)
    return StableDiffusion3.from_pretrained(folder), ref


@pytest.fixture(scope="module")
def without_t5(tmp_path_factory):
    """Loaded through the one entry point, which dispatches on model_index.json."""
    folder, ref = _reference(tmp_path_factory.mktemp("sd3_no_t5"), with_t5=False)
    pipe = jaxdiff.from_pretrained(folder)
    assert type(pipe) is StableDiffusion3
    return pipe, ref


def _noise(seed=0, n=N):
    return np.random.RandomState(seed).randn(n, LATENT, LATENT, CHANNELS).astype(np.float32)


def _diffusers(ref, noise, **kwargs):
    latents = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return ref(latents=latents, num_inference_steps=STEPS, output_type="np", max_sequence_length=T5_LENGTH,
                   **kwargs).images


@pytest.mark.parametrize("scale", [5.0, 1.0], ids=["guided", "unguided"])
def test_matches_diffusers_with_t5(with_t5, scale):
    pipe, ref = with_t5
    assert pipe.t5 is not None and pipe.schedule.shift == 3.0
    noise = _noise()
    ours = pipe([PROMPT, "a dog"], "blurry", num_steps=STEPS, guidance_scale=scale, latents=noise,
                output_type="np", max_sequence_length=T5_LENGTH, num_images=1)
    theirs = _diffusers(ref, noise, prompt=[PROMPT, "a dog"], negative_prompt="blurry", guidance_scale=scale)
    assert ours.shape == theirs.shape == (N, 2 * LATENT, 2 * LATENT, 3)
    assert np.abs(ours - theirs).max() <= 1e-3


def test_matches_diffusers_without_t5_and_the_prompt_matters(without_t5):
    """No text_encoder_3: its states are zeros, as diffusers does; the CLIP prompt still steers."""
    pipe, ref = without_t5
    assert pipe.t5 is None
    noise = _noise(1)
    ours = pipe(PROMPT, num_steps=STEPS, guidance_scale=5.0, latents=noise, output_type="np", num_images=N,
                max_sequence_length=T5_LENGTH)
    theirs = _diffusers(ref, noise, prompt=PROMPT, guidance_scale=5.0, num_images_per_prompt=N)
    assert np.abs(ours - theirs).max() <= 1e-3
    other = pipe("a dog", num_steps=STEPS, guidance_scale=5.0, latents=noise, output_type="np", num_images=N,
                 max_sequence_length=T5_LENGTH)
    assert np.abs(other - ours).mean() > 1e-2


def test_prompt_embeddings_match_diffusers_encode_prompt(with_t5):
    pipe, ref = with_t5
    cond, uncond = pipe.encode_prompt([PROMPT, "a dog"], "blurry", num_images=2, max_sequence_length=T5_LENGTH)
    with torch.no_grad():
        c, u, pc, pu = ref.encode_prompt([PROMPT, "a dog"], None, None, negative_prompt="blurry",
                                         num_images_per_prompt=2, max_sequence_length=T5_LENGTH)
    assert cond["context"].shape == (4, 77 + T5_LENGTH, T5_WIDTH) and cond["pooled"].shape == (4, PROJ_1 + PROJ_2)
    for got, want in ((cond["context"], c), (uncond["context"], u), (cond["pooled"], pc), (uncond["pooled"], pu)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(cond["context"][:, 77:]).max() > 0.1                       # the T5 part is really there


def test_seeded_runs_and_errors(without_t5, tmp_path):
    pipe, _ = without_t5
    a = pipe(PROMPT, num_steps=STEPS, seed=3, guidance_scale=1.0, output_type="uint8", max_sequence_length=4)
    b = pipe(PROMPT, num_steps=STEPS, seed=3, guidance_scale=1.0, output_type="uint8", max_sequence_length=4)
    assert a.shape == (1, 2 * LATENT, 2 * LATENT, 3) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe(PROMPT, height=30, width=32, num_steps=STEPS)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe(PROMPT, sampler="nope", num_steps=STEPS)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": []}))
    with pytest.raises(CheckpointError, match="lists no transformer and no text_encoder_2"):
        StableDiffusion3.from_pretrained(tmp_path)


def test_jaxdiff_generate_opens_an_sd3_folder(tmp_path):
    """The command line reaches SD3 through jaxdiff.from_pretrained (with its loading bar and the
    family's default guidance) and draws what the pipeline draws."""
    from conftest import run_cli
    from PIL import Image

    folder, _ = _reference(tmp_path, with_t5=True)
    out = tmp_path / "sd3.png"
    proc = run_cli("generate", "--model", str(folder), "--prompt", PROMPT, "--steps", str(STEPS), "--seed", "3",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = StableDiffusion3.from_pretrained(folder)(PROMPT, num_steps=STEPS, seed=3, output_type="uint8")[0]
    got = np.asarray(Image.open(out))
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
