"""A LoRA and a ControlNet together on Stable Diffusion 1.x, against diffusers'
StableDiffusionControlNetPipeline with `load_lora_weights` and a cross_attention_kwargs scale:
the tiny random SD model and ControlNet of tests/test_controlnet.py, a PEFT LoRA on the U-Net and
the text encoder (tests/test_lora.py's builder), given latents."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_controlnet import PROMPT, STEPS, N, _control, _nchw, _noise, tiny  # noqa: F401  (tiny: a fixture)
from test_lora import TEXT_TARGETS, UNET_TARGETS, _lora_layers, peft_for_transformers  # noqa: F401  (a fixture)

from jaxdiff.pipelines.stable_diffusion import StableDiffusion

# the control's weight: that random ControlNet's residuals are so large that at 0.8 they drown the
# LoRA (it moves the picture by < 1e-2); at 0.03 the control still moves it by ~0.8
CONTROL = 0.03


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):  # noqa: F811
    """The folder of a PEFT LoRA for the tiny SD model (alpha / rank 1/4 on the U-Net, 3/2 on the
    text encoder: a well-conditioned update, see test_pipeline_sdxl's LoRA test)."""
    _, _, parts, _ = tiny
    unet, unet_meta = _lora_layers(parts["unet"], UNET_TARGETS, 4, 1, seed=40)
    text, text_meta = _lora_layers(parts["text_encoder"], TEXT_TARGETS, 2, 3, seed=41)
    folder = tmp_path_factory.mktemp("lora_cn") / "lora"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=unet, text_encoder_lora_layers=text, unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=text_meta)
    return folder


def test_lora_and_controlnet_together_match_diffusers(tiny, lora):  # noqa: F811
    sd, cn, _, _ = tiny
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        str(sd), controlnet=diffusers.ControlNetModel.from_pretrained(str(cn[0])), safety_checker=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(lora))
    pipe = StableDiffusion.from_pretrained(sd, controlnet=cn[0])
    noise, control = _noise(5), _control(11)
    run = dict(num_steps=STEPS, num_images=N, latents=noise, output_type="np", control_image=control,
               controlnet_conditioning_scale=CONTROL)
    plain = {g: pipe(PROMPT, guidance_scale=g, **run) for g in (7.5, 1.0)}
    pipe.load_lora(lora, scale=1.0)
    ours, moved = {}, {}
    for guidance in (7.5, 1.0):
        theirs = ref(PROMPT, image=control, controlnet_conditioning_scale=CONTROL, num_inference_steps=STEPS,
                     num_images_per_prompt=N, latents=_nchw(noise), output_type="np", guidance_scale=guidance,
                     cross_attention_kwargs={"scale": 0.7}).images
        ours[guidance] = pipe(PROMPT, guidance_scale=guidance, lora_scale=0.7, **run)
        np.testing.assert_allclose(ours[guidance], theirs, atol=1e-3, err_msg=f"guidance_scale={guidance}")  # ~2e-6
        moved[guidance] = np.abs(ours[guidance] - plain[guidance]).max()
    # the LoRA moves the picture: measured 0.17 guided, 0.03 (1e4 x the error) unguided
    assert moved[7.5] > 0.05 and moved[1.0] > 0.01, moved
    # and the control still counts with the LoRA on (scale 0 is diffusers' too)
    off = pipe(PROMPT, guidance_scale=7.5, lora_scale=0.7, **dict(run, controlnet_conditioning_scale=0.0))
    theirs_off = ref(PROMPT, image=control, controlnet_conditioning_scale=0.0, num_inference_steps=STEPS,
                     num_images_per_prompt=N, latents=_nchw(noise), output_type="np", guidance_scale=7.5,
                     cross_attention_kwargs={"scale": 0.7}).images
    np.testing.assert_allclose(off, theirs_off, atol=1e-3)
    assert np.abs(ours[7.5] - off).max() > 0.05                                  # measured 0.8
