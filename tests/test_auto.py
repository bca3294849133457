"""`jaxdiff.from_pretrained`: the family of a folder is read from its model_index.json, and a folder
that is none of them is refused in one line."""

import json

import pytest

import jaxdiff
from jaxdiff.errors import CheckpointError
from jaxdiff.pipelines import auto


@pytest.mark.parametrize("index, kind", [
    ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, "stable_diffusion"),
    ({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, "stable_diffusion"),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline"}, "stable_diffusion"),
    ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}, "sd3"),
    ({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}, "flux"),
    ({"_class_name": "MyPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, "stable_diffusion"),
    ({"_class_name": "MyPipeline", "transformer": ["x", "y"], "text_encoder_3": ["x", "y"]}, "sd3"),
    ({"_class_name": "MyPipeline", "transformer": ["x", "y"], "text_encoder_2": ["x", "y"]}, "flux"),
    ({"_class_name": "KandinskyPipeline"}, None),
])
def test_family_from_model_index(index, kind):
    assert auto.family(index) == kind


def _folder(tmp_path, content):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(content)
    return folder


@pytest.mark.parametrize("content, match", [
    (json.dumps({"_class_name": "KandinskyPipeline"}), "KandinskyPipeline.*does not read"),
    ("{\"_class_name\": \"StableDiff", "not readable JSON"),
    ("[1, 2]", "JSON list"),
])
def test_bad_model_index_is_one_line(tmp_path, content, match):
    with pytest.raises(CheckpointError, match=match) as info:
        jaxdiff.from_pretrained(_folder(tmp_path, content))
    assert "\n" not in str(info.value)


def test_missing_or_unknown_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        jaxdiff.from_pretrained(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="neither model_index.json"):
        jaxdiff.from_pretrained(tmp_path)
