"""CLIP image tower: parity with transformers' CLIPVisionModelWithProjection and CLIPModel, folder
round trips, the image preprocessing against CLIPImageProcessor, and the CLIP score against a
hand computation with transformers' CLIPModel."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomise_unit_gain, write_clip_tokenizer

from jaxdiff.convert import clip_vision as cv
from jaxdiff.errors import CheckpointError
from jaxdiff.metrics import clip_score as cs
from jaxdiff.models.clip_vision import CLIPVisionEncoder, preprocess

VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "layer_norm_eps": 1e-5}
PROJ = 16


def _vision_reference(hidden_act="quick_gelu", seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(**VISION, hidden_act=hidden_act, projection_dim=PROJ)
    torch.manual_seed(seed)
    return randomise_unit_gain(transformers.CLIPVisionModelWithProjection(config).eval(), seed), config


def _state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _pixels(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _torch_vision(model, x):
    import torch

    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_tower_matches_transformers(act):
    model, config = _vision_reference(act)
    module = cv.vision_from_config(dict(config.to_dict(), architectures=["CLIPVisionModelWithProjection"]))
    assert module.hidden_act == act and module.projection_dim == PROJ
    params = cv.vision_params_from_torch(_state_dict(model), module)
    x = _pixels()
    ours = module.apply({"params": params}, jnp.asarray(x))
    ref = _torch_vision(model, x)
    assert ours.last_hidden_state.shape == (3, 17, 32)
    assert _rel(ours.image_embeds, ref.image_embeds) < 1e-4
    assert _rel(ours.last_hidden_state, ref.last_hidden_state) < 1e-4
    # The activation matters: the other one moves the output by 10x the tolerance or more.
    other = module.clone(hidden_act="gelu" if act == "quick_gelu" else "quick_gelu")
    assert _rel(other.apply({"params": params}, jnp.asarray(x)).image_embeds, ref.image_embeds) > 1e-3
    # So does every patch: moving one patch changes that image only.
    x2 = x.copy()
    x2[1, :8, :8] += 1.0
    moved = module.apply({"params": params}, jnp.asarray(x2)).image_embeds
    assert _rel(moved[1], ours.image_embeds[1]) > 1e-2 and _rel(moved[0], ours.image_embeds[0]) < 1e-6


def test_vision_folder_round_trip_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, config = _vision_reference()
    module = cv.vision_from_config(dict(config.to_dict(), architectures=["CLIPVisionModelWithProjection"]))
    params = cv.vision_params_from_torch(_state_dict(model), module)
    cv.save_vision(tmp_path / "v", module, params)
    back = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "v").eval()
    x = _pixels(2, seed=1)
    assert _rel(_torch_vision(back, x).image_embeds, _torch_vision(model, x).image_embeds) < 1e-6
    module2, params2 = cv.load_vision(tmp_path / "v")
    assert module2 == module
    np.testing.assert_array_equal(params2["class_embedding"], params["class_embedding"])
    # A wrong-shaped tensor is one CheckpointError line naming it.
    sd = _state_dict(model)
    sd["vision_model.embeddings.class_embedding"] = np.zeros(31, np.float32)
    with pytest.raises(CheckpointError, match="class_embedding"):
        cv.vision_params_from_torch(sd, module)


def test_preprocess_matches_clip_image_processor():
    pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    yy, xx = np.mgrid[0:40, 0:56]
    img = np.stack([np.sin(yy / 5) + np.cos(xx / 7), np.cos(yy / 3), np.sin((xx + yy) / 9)], -1) * 0.4 + 0.5
    img = np.round(img * 255).astype(np.uint8)                                   # [40, 56, 3]
    proc = pil.CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 20})
    ref = proc(images=[img], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = preprocess(img[None], 24, 20)
    assert ours.shape == ref.shape == (1, 20, 20, 3)
    # PIL and jax.image resample with slightly different kernels: a few 8-bit levels at most.
    err = np.abs(ours - ref)
    assert err.mean() < 0.01 and err.max() < 0.15
    # A crop one pixel off, or no normalization, is far worse.
    shifted = preprocess(img[None], 24, 20, crop=False)[:, 1:21, 2:22]
    assert np.abs(shifted - ref).mean() > 3 * err.mean()


# ------------------------------------------------------------------------------------------
# CLIPModel folders and the CLIP score


def _clip_model(tmp_path):
    """A tiny random transformers CLIPModel saved to tmp_path/clip with a byte-level tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = write_clip_tokenizer(tmp_path / "clip", max_length=16)
    text = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 4, "max_position_embeddings": 16, "bos_token_id": vocab - 2,
                "eos_token_id": 2, "pad_token_id": vocab - 1}
    config = transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=PROJ)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    for i, part in enumerate((model.text_model, model.vision_model, model.text_projection, model.visual_projection)):
        randomise_unit_gain(part, i)
    model.save_pretrained(tmp_path / "clip")
    return model


def test_clip_model_folder_and_clip_score(tmp_path):
    import torch

    model = _clip_model(tmp_path)
    scorer = cs.ClipScore.from_pretrained(tmp_path / "clip", batch_size=2)
    scorer.transform = cv.ImageTransform(32, 32)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 32, 32, 3)).astype(np.uint8)
    prompts = ["a cat", "two dogs", "a red car", "x", "the sea at night"]
    ids = scorer.tokenizer(prompts, max_length=16)
    pixels = preprocess(images, 32, 32)

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    pixel_values=torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2))
    img, txt = out.image_embeds.numpy(), out.text_embeds.numpy()                # [5, 16] each, unit norm
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)
    assert _rel(unit(scorer.image_embeds(images)), img) < 1e-4
    assert _rel(unit(scorer.text_embeds(prompts)), txt) < 1e-4
    # By hand: 100 * max(cos, 0) per pair, averaged (torchmetrics' CLIPScore).
    cos = np.sum(img * txt, 1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    want = np.maximum(100 * cos, 0)
    assert (cos < 0).any() and (cos > 0).any(), cos                             # the clip is exercised
    np.testing.assert_allclose(scorer.update(images[:3], prompts[:3]), want[:3], rtol=1e-4, atol=1e-3)
    scorer.update(images[3:], prompts[3:])                                      # streamed
    assert scorer.compute() == pytest.approx(want.mean(), rel=1e-4, abs=1e-3)
    assert scorer.compute() != pytest.approx(100 * cos.mean(), rel=1e-3)
    # Mismatched pairs are refused.
    with pytest.raises(ValueError, match="captions"):
        scorer.scores(images[:2], prompts[:3])


def test_clip_model_folder_errors(tmp_path):
    _clip_model(tmp_path)
    parts = cv.load_clip(tmp_path / "clip")
    assert parts.logit_scale == pytest.approx(np.exp(2.6592), rel=1e-4)
    assert parts.vision.projection_dim == parts.text.projection_dim == PROJ
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "relu"
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        cv.load_vision(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="no config.json"):
        cv.load_vision(tmp_path)


def test_pair_scores_and_state():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(cs.pair_scores(a, b), [100.0, 0.0, 100 / np.sqrt(2)], rtol=1e-6)
    s = cs.merge(cs.update_state(cs.ClipScoreState(), [100.0, 0.0]), cs.update_state(cs.ClipScoreState(), [50.0]))
    assert cs.result(s) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="no image-caption pairs"):
        cs.result(cs.ClipScoreState())
    assert isinstance(CLIPVisionEncoder(32, 8, 32, 48, 1, 4), CLIPVisionEncoder)
