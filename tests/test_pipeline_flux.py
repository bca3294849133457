"""The Flux front end (jaxdiff/pipelines/flux.py) against diffusers' FluxPipeline on tiny random
folders saved by diffusers (a guidance-distilled "dev"-like model with dynamic shifting, and a
"schnell"-like one without guidance embedding), from the same unpacked noise; offline."""

import json
import shutil

import numpy as np
import pytest
from conftest import randomise_unit_gain, write_clip_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxdiff.errors import CheckpointError
from jaxdiff.models import flux as flux_lib
from jaxdiff.pipelines import auto
from jaxdiff.pipelines.flux import Flux

N, H, W, C, STEPS, SEQ = 2, 16, 12, 4, 2, 8    # images, pixels (VAE factor 2: latents 8 x 6), channels
PROMPT = "a cat"
T5_WORDS = ["<pad>", "</s>", "<unk>", *("\u2581" + w for w in ("a", "cat", "dog", "photo", "of", "red", "blurry")),
            *"abcdefghijklmnopqrstuvwxyz", "\u2581"]


def _t5_tokenizer(folder):
    """A T5 tokenizer (Unigram, pad 0, EOS 1, unk 2) saved as T5TokenizerFast saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram([(w, 0.0 if i < 3 else -float(i)) for i, w in enumerate(T5_WORDS)], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                 extra_ids=0).save_pretrained(str(folder))
    return transformers.T5TokenizerFast.from_pretrained(str(folder))


def _components(tmp, guidance: bool):
    vocab = write_clip_tokenizer(tmp / "tok", merges=[("a", "t</w>"), ("c", "at</w>")])
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=vocab - 1))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(T5_WORDS), d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu"))
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4))
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=C, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    if guidance:   # FLUX.1-dev's scheduler
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15, base_image_seq_len=256,
                                                              max_image_seq_len=4096)
    else:          # FLUX.1-schnell's
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    nets = {"text_encoder": clip, "text_encoder_2": t5, "transformer": transformer, "vae": vae}
    for seed, net in enumerate(nets.values()):
        randomise_unit_gain(net, seed + 4 + 10 * guidance).eval()
    return dict(nets, scheduler=scheduler, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tmp / "tok")),
                tokenizer_2=_t5_tokenizer(tmp / "tok2"))


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def tiny(request, tmp_path_factory):
    """(folder, diffusers FluxPipeline, jaxdiff Flux, guidance_embeds)."""
    tmp = tmp_path_factory.mktemp("flux")
    ref = diffusers.FluxPipeline(**_components(tmp, request.param))
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(str(tmp / "model"), safe_serialization=True)
    return tmp / "model", ref, Flux.from_pretrained(tmp / "model"), request.param


def _noise(seed=0):
    return np.random.RandomState(seed).randn(N, H // 2, W // 2, C).astype(np.float32)   # NHWC, unpacked


def _reference(ref, noise, prompt=PROMPT, **kw):
    nchw = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))
    latents = diffusers.FluxPipeline._pack_latents(nchw, N, C, H // 2, W // 2)
    with torch.no_grad():
        return ref(prompt, num_inference_steps=STEPS, height=H, width=W, latents=latents, output_type="np",
                   max_sequence_length=SEQ, num_images_per_prompt=N, **kw).images


def _ours(pipe, noise, prompt=PROMPT, **kw):
    return pipe(prompt, num_steps=STEPS, height=H, width=W, latents=noise, output_type="np",
                max_sequence_length=SEQ, num_images=N, **kw)


def test_matches_flux_pipeline(tiny):
    _, ref, pipe, guidance = tiny
    noise = _noise()
    want = _reference(ref, noise, guidance_scale=3.5)
    got = _ours(pipe, noise, guidance_scale=3.5)
    assert got.shape == want.shape == (N, H, W, 3)
    assert np.abs(got - want).max() <= 1e-3, np.abs(got - want).max()
    assert 0.05 < got.std() and np.mean((got > 0) & (got < 1)) > 0.5      # not saturated, not flat
    assert np.abs(got[0] - got[1]).max() > 0.05                          # the two noises differ
    # the prompt changes the image; the guidance value does for a dev model and is ignored by schnell
    other = _ours(pipe, noise, prompt="a red dog", guidance_scale=3.5)
    assert np.abs(other - got).mean() > 1e-2
    stronger = _ours(pipe, noise, guidance_scale=1.5)
    if guidance:
        assert np.abs(stronger - got).mean() > 1e-2
        assert np.abs(stronger - _reference(ref, noise, guidance_scale=1.5)).max() <= 1e-3
    else:
        np.testing.assert_array_equal(stronger, got)


def test_true_cfg_matches_flux_pipeline(tiny):
    _, ref, pipe, _ = tiny
    noise = _noise(1)
    kw = {"negative_prompt": "blurry photo", "true_cfg_scale": 2.0, "guidance_scale": 3.5}
    want = _reference(ref, noise, **kw)
    got = _ours(pipe, noise, **kw)
    assert np.abs(got - want).max() <= 1e-3, np.abs(got - want).max()
    assert np.abs(got - _ours(pipe, noise, guidance_scale=3.5)).mean() > 1e-2


def test_plan_follows_flux_pipeline(tiny):
    _, ref, pipe, _ = tiny
    tokens = (H // 4) * (W // 4)
    mu = diffusers.pipelines.flux.pipeline_flux.calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert pipe.mu(H, W) == pytest.approx(mu, rel=1e-12)
    ref.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=mu)
    plan = pipe.plan(None, 3, H, W)
    np.testing.assert_allclose(np.asarray(plan.plan.timesteps)[:3], ref.scheduler.timesteps.numpy(), rtol=1e-6)


def test_sizes_and_folders_are_checked(tiny, tmp_path):
    folder, _, pipe, _ = tiny
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe(PROMPT, height=18, width=W, num_steps=1)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(CheckpointError, match="no text_encoder_2/"):
        Flux.from_pretrained(broken)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert auto.pipeline_class(folder) is Flux          # what jaxdiff.from_pretrained opens


def test_pack_round_trip_in_the_network_layout():
    x = _noise()
    np.testing.assert_array_equal(np.asarray(flux_lib.unpack(flux_lib.pack(x), H // 2, W // 2)), x)
