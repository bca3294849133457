"""The Stable Diffusion safety checker: flags and scores equal diffusers' StableDiffusionSafetyChecker
on the same tiny random weights and images (including flagged images and the special-care
adjustment), folder round trips, and the pipeline hook (report, never black out)."""

import json
import warnings
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomise_unit_gain

from jaxdiff.convert import safety as safety_convert
from jaxdiff.errors import CheckpointError, JaxdiffWarning
from jaxdiff.models import safety as safety_model
from jaxdiff.pipelines import safety as safety_pipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sc = pytest.importorskip("diffusers.pipelines.stable_diffusion.safety_checker")

VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4}
PROJ, B = 16, 4


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pixels(seed=0):
    return np.random.default_rng(seed).normal(size=(B, 32, 32, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _embeds(model, x):
    with torch.no_grad():
        return model.visual_projection(model.vision_model(_nchw(x))[1]).numpy()


@pytest.fixture(scope="module")
def reference():
    """A tiny random diffusers checker whose concepts are set so that, on `_pixels()`, image 1 is
    flagged by a concept outright, image 2 only through the special-care adjustment, and images 0
    and 3 not at all."""
    config = transformers.CLIPConfig(vision_config=VISION, projection_dim=PROJ,
                                     text_config={"vocab_size": 10, "max_position_embeddings": 8,
                                                  "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1})
    torch.manual_seed(0)
    model = sc.StableDiffusionSafetyChecker(config).eval()
    randomise_unit_gain(model.vision_model, 0)
    randomise_unit_gain(model.visual_projection, 1)
    e = _unit(_embeds(model, _pixels()))                                            # [B, E]
    rng = np.random.default_rng(1)
    concepts = _unit(rng.normal(size=(17, PROJ)))
    special = _unit(rng.normal(size=(3, PROJ)))
    concepts[3] = e[1]                                                               # image 1: cos 1
    concepts[5] = _unit(e[2] + 0.3 * _unit(rng.normal(size=PROJ)))                   # near image 2
    special[1] = e[2]                                                                # image 2 is special
    cos, cos_s = e @ concepts.T, e @ special.T                                       # [B, 17], [B, 3]
    thresholds = cos.max(0) + 0.05
    thresholds[3] = (1 + np.sort(cos[:, 3])[-2]) / 2      # random images embed alike: halfway
    assert 1 - thresholds[3] > 0.01
    thresholds[5] = cos[2, 5] + 0.005         # image 2's score -0.005, +0.01 with the adjustment
    assert np.sort(cos[:, 5])[-2] < cos[2, 5] - 0.02                                 # only image 2 is close
    special_t = cos_s.max(0) + 0.05
    special_t[1] = 0.95
    with torch.no_grad():
        model.concept_embeds.copy_(torch.from_numpy(concepts))
        model.special_care_embeds.copy_(torch.from_numpy(special))
        model.concept_embeds_weights.copy_(torch.from_numpy(thresholds))
        model.special_care_embeds_weights.copy_(torch.from_numpy(special_t))
    return model


def _diffusers_flags(model, x):
    _, flags = model(clip_input=_nchw(x), images=np.zeros((len(x), 4, 4, 3)))
    return list(flags)


def _ours(model):
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    module = safety_convert.module_from_config(model.config.to_dict())
    return module, safety_convert.params_from_torch(sd, module)


def test_flags_and_scores_match_diffusers(reference):
    module, params = _ours(reference)
    x = _pixels()
    result = safety_model.check(module, params, x)
    want = _diffusers_flags(reference, x)
    assert want == [False, True, True, False]
    assert list(result.flagged) == want
    assert list(result.special_care) == [False, False, True, False]
    # The scores: cosine - threshold (+ 0.01 for image 2), rounded to 3 decimals, from torch's cosines.
    e = _unit(_embeds(reference, x))
    cos = e @ _unit(reference.concept_embeds.numpy()).T
    hand = np.round(cos - reference.concept_embeds_weights.numpy() + 0.01 * np.array([0, 0, 1, 0])[:, None], 3)
    np.testing.assert_allclose(result.concept_scores, hand, atol=1.01e-3)
    assert result.concept_scores[2, 5] == pytest.approx(0.005, abs=1.01e-3)
    # The special-care adjustment matters: without image 2's special concept, image 2 passes (both).
    with torch.no_grad():
        reference.special_care_embeds_weights[1] += 0.5
    try:
        params["special_care_embeds_weights"] = reference.special_care_embeds_weights.numpy().copy()
        assert _diffusers_flags(reference, x) == [False, True, False, False]
        assert list(safety_model.check(module, params, x).flagged) == [False, True, False, False]
    finally:
        with torch.no_grad():
            reference.special_care_embeds_weights[1] -= 0.5


def test_folder_round_trip_loads_in_diffusers(reference, tmp_path):
    module, params = _ours(reference)
    safety_convert.save(tmp_path / "sc", module, params)
    back = sc.StableDiffusionSafetyChecker.from_pretrained(str(tmp_path / "sc")).eval()
    x = _pixels(seed=2)
    x[1] = _pixels()[1]                                                              # one flagged image
    assert _diffusers_flags(back, x) == _diffusers_flags(reference, x)
    module2, params2 = safety_convert.load(tmp_path / "sc")
    assert module2 == module
    assert list(safety_model.check(module2, params2, x).flagged) == _diffusers_flags(reference, x)
    # transformers 5 writes the tower unnested ("vision_model."): read as well.
    flat = {k.replace("vision_model.vision_model.", "vision_model."): v
            for k, v in safety_convert.params_to_torch(params, module).items()}
    np.testing.assert_array_equal(safety_convert.params_from_torch(flat, module)["vision"]["class_embedding"],
                                  params["vision"]["class_embedding"])
    del flat["concept_embeds"]
    with pytest.raises(CheckpointError, match="concept_embeds"):
        safety_convert.params_from_torch(flat, module)


def _pipeline_folder(reference, tmp_path, listed=True):
    """A folder with model_index.json, safety_checker/ and feature_extractor/ (what `attach` reads)."""
    module, params = _ours(reference)
    root = tmp_path / "sd"
    safety_convert.save(root / "safety_checker", module, params)
    (root / "feature_extractor").mkdir()
    (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_resize": True,
         "do_center_crop": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    entry = ["stable_diffusion", "StableDiffusionSafetyChecker"] if listed else [None, None]
    (root / "model_index.json").write_text(json.dumps({"safety_checker": entry}))
    return root


def test_pipeline_hook_reports_flagged_images_unchanged(reference, tmp_path):
    root = _pipeline_folder(reference, tmp_path)
    pipe = SimpleNamespace()
    safety_pipe.attach(pipe, root)
    assert pipe.safety_checker.transform.mean == (0.5, 0.5, 0.5)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 40, 48, 3)).astype(np.uint8)
    t = pipe.safety_checker.transform
    pixels = safety_pipe.preprocess(images, t.size, t.crop_size, t.mean, t.std)
    # Aim one concept at image 1 as the checker sees it, so exactly that image is flagged.
    module, params = pipe.safety_checker.module, dict(pipe.safety_checker.params)
    emb = module.vision.apply({"params": params["vision"]}, jnp.asarray(pixels)).image_embeds
    e = _unit(np.asarray(emb))
    params["concept_embeds"] = params["concept_embeds"].at[0].set(emb[1])
    params["concept_embeds_weights"] = jnp.full((17,), 1.5).at[0].set((1 + np.sort(e @ e[1])[-2]) / 2)
    params["special_care_embeds_weights"] = jnp.full((3,), 1.5)
    pipe.safety_checker = pipe.safety_checker._replace(params=params)
    want = [bool(f) for f in _diffusers_flags_for(reference, params, pixels)]
    assert want[1] and not want[0] and not want[2]
    for output_type, out in (("uint8", images), ("np", images / 255.0)):
        with pytest.warns(JaxdiffWarning, match=r"flagged image\(s\) 1 of 3"):
            back = safety_pipe.screen(pipe, out, output_type)
        assert back is out                                                           # never blacked out
        assert pipe.nsfw_content_detected == want
        assert pipe.safety_result.concept_scores.shape == (3, 17)
    assert safety_pipe.screen(pipe, images[:, :4, :4], "latent") is not None and pipe.nsfw_content_detected is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safety_pipe.screen(pipe, images[[0, 2]], "uint8")                           # nothing flagged: no warning
    assert pipe.nsfw_content_detected == [False, False]
    # Disabled, or not listed in model_index.json: no checker, no flags.
    safety_pipe.attach(pipe, root, enabled=False)
    assert pipe.safety_checker is None and safety_pipe.screen(pipe, images, "uint8") is images
    assert pipe.nsfw_content_detected is None
    safety_pipe.attach(pipe, _pipeline_folder(reference, tmp_path / "b", listed=False))
    assert pipe.safety_checker is None
    # Listed but missing: one line naming the way out.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model_index.json").write_text(json.dumps({"safety_checker": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="safety_checker=False"):
        safety_pipe.attach(pipe, tmp_path / "c")


def _diffusers_flags_for(reference, params, pixels):
    """diffusers' flags with `params`' concept tensors loaded into a copy of `reference`."""
    import copy

    model = copy.deepcopy(reference)
    with torch.no_grad():
        for k in safety_convert.CONCEPTS:
            getattr(model, k).copy_(torch.from_numpy(np.array(params[k])))
    return _diffusers_flags(model, pixels)


def test_stable_diffusion_pipeline_checks_its_outputs(reference, tmp_path):
    """End to end: a tiny diffusers SD folder with a safety checker; every image is flagged (a
    concept threshold below -1), reported and returned as sampled; safety_checker=False skips."""
    diffusers = pytest.importorskip("diffusers")
    from conftest import write_clip_tokenizer

    from jaxdiff.pipelines.stable_diffusion import StableDiffusion

    vocab = write_clip_tokenizer(tmp_path / "tok")
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=4, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 8], latent_channels=4, layers_per_block=1,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  norm_num_groups=4)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=vocab - 1))
    pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    extractor = pil.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    checker = _diffusers_copy(reference, thresholds=np.full(17, -1.5, np.float32))
    ref = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "tok")),
        scheduler=diffusers.DDIMScheduler(clip_sample=False), safety_checker=checker, feature_extractor=extractor,
        requires_safety_checker=False)
    ref.save_pretrained(str(tmp_path / "sd"), safe_serialization=True)
    pipe = StableDiffusion.from_pretrained(tmp_path / "sd", max_steps=2)
    with pytest.warns(JaxdiffWarning, match=r"flagged image\(s\) 0, 1 of 2"):
        images = pipe("a cat", num_steps=2, num_images=2, output_type="np")
    assert pipe.nsfw_content_detected == [True, True] and images.std() > 0                # not blacked out
    plain = StableDiffusion.from_pretrained(tmp_path / "sd", max_steps=2, safety_checker=False)
    assert plain.safety_checker is None and plain.nsfw_content_detected is None
    pipe.safety_checker = None                                                          # as safety_checker=False
    np.testing.assert_array_equal(pipe("a cat", num_steps=2, num_images=2, output_type="np"), images)
    assert pipe.nsfw_content_detected is None


def _diffusers_copy(reference, thresholds):
    import copy

    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.concept_embeds_weights.copy_(torch.from_numpy(thresholds))
    return model
