"""SDXL with a ControlNet through the one StableDiffusion entry point, against diffusers'
StableDiffusionXLControlNet(Img2Img)Pipeline: tiny random SDXL components (as
tests/test_pipeline_sdxl.py builds them) and an SDXL ControlNet (text_time micro-conditioning)
made from that U-Net and randomised so its zero convolutions are not zero; given latents."""

import numpy as np
import pytest
from conftest import randomise_unit_gain
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_pipeline_sdxl import LATENT, N, PROMPT, SIZE, STEPS, _noise, _torch  # noqa: E402
from test_pipeline_sdxl import tiny  # noqa: E402, F401  (the module fixture: folder, pipeline, components)

from jaxdiff.pipelines.stable_diffusion import StableDiffusion  # noqa: E402

SCALE = 0.8


@pytest.fixture(scope="module")
def controlnet(tiny, tmp_path_factory):  # noqa: F811
    """(ControlNet folder, diffusers ControlNetModel) for the tiny SDXL U-Net."""
    _, _, components = tiny
    net = diffusers.ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(8, 16))
    net = randomise_unit_gain(net, seed=20).eval()
    folder = tmp_path_factory.mktemp("sdxlcn") / "cn"
    net.save_pretrained(str(folder), safe_serialization=True)
    return folder, net


@pytest.fixture(scope="module")
def pipe(tiny, controlnet):  # noqa: F811
    return StableDiffusion.from_pretrained(tiny[0], controlnet=controlnet[0])


def _control(seed):
    return Image.fromarray((np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


def _reference(tiny, controlnet, cls=None):  # noqa: F811
    _, _, components = tiny
    ref = (cls or diffusers.StableDiffusionXLControlNetPipeline)(**components, controlnet=controlnet[1],
                                                                 add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_sdxl_controlnet_matches_diffusers(tiny, controlnet, pipe):  # noqa: F811
    assert pipe.xl and pipe.controlnets[0].addition_embed_dim == pipe.unet.addition_embed_dim
    ref = _reference(tiny, controlnet)
    noise, control = _noise(4), _control(1)
    cases = [dict(guidance_scale=5.0),
             dict(guidance_scale=1.0),
             dict(guidance_scale=5.0, guess_mode=True),
             dict(guidance_scale=5.0, control_guidance_start=0.25, control_guidance_end=0.75),
             dict(guidance_scale=5.0, original_size=(1024, 8), crops_coords_top_left=(300, 2), target_size=(8, 512))]
    outs = []
    for case in cases:
        ours = pipe(PROMPT, control_image=control, controlnet_conditioning_scale=SCALE, num_steps=STEPS,
                    num_images=N, latents=noise, output_type="np", **case)
        theirs = ref(PROMPT, image=control, controlnet_conditioning_scale=SCALE, num_inference_steps=STEPS,
                     num_images_per_prompt=N, latents=_torch(noise), output_type="np", **case).images
        assert ours.shape == (N, SIZE, SIZE, 3)
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=str(case))   # measured ~2e-6
        outs.append(ours)
    off = pipe(PROMPT, control_image=control, controlnet_conditioning_scale=0.0, num_steps=STEPS, num_images=N,
               latents=noise, output_type="np", guidance_scale=5.0)
    plain = StableDiffusion.from_pretrained(tiny[0])(PROMPT, num_steps=STEPS, num_images=N, latents=noise,
                                                     output_type="np", guidance_scale=5.0)
    np.testing.assert_allclose(off, plain, atol=1e-5)
    for case, out in zip(cases, outs):
        assert np.abs(out - off).max() > 0.05, case     # the control changes the image
    for i in (2, 3):                                      # guess mode and the window matter
        assert np.abs(outs[0] - outs[i]).max() > 0.05, cases[i]
    # so do the time ids, which reach the U-Net and the ControlNet: they move this tiny model's
    # picture by ~9e-3, thousands of times the parity error above
    assert np.abs(outs[0] - outs[4]).max() > 1e-3


def test_sdxl_controlnet_img2img_matches_diffusers(tiny, controlnet, pipe, monkeypatch):  # noqa: F811
    """StableDiffusionXLControlNetImg2ImgPipeline, encoding with the posterior mean and given
    noise (diffusers draws both from a torch generator)."""
    from diffusers.models.autoencoders import vae as dvae
    from diffusers.pipelines.controlnet import pipeline_controlnet_sd_xl_img2img as xl_i2i

    noise = _noise(5)
    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    monkeypatch.setattr(xl_i2i, "randn_tensor", lambda shape, generator=None, device=None, dtype=None: _torch(noise))
    ref = _reference(tiny, controlnet, diffusers.StableDiffusionXLControlNetImg2ImgPipeline)
    picture, control = _control(7), _control(8)
    case = dict(strength=0.75, controlnet_conditioning_scale=SCALE, control_guidance_end=0.7, guidance_scale=5.0)
    ours = pipe.img2img(picture, PROMPT, control_image=control, num_steps=STEPS, num_images=N, latents=noise,
                        output_type="np", sample_posterior=False, **case)
    theirs = ref(PROMPT, image=picture, control_image=control, num_inference_steps=STEPS, num_images_per_prompt=N,
                 output_type="np", **case).images
    np.testing.assert_allclose(ours, theirs, atol=1e-3)                        # measured ~2e-6
    off = pipe.img2img(picture, PROMPT, control_image=control, num_steps=STEPS, num_images=N, latents=noise,
                       output_type="np", sample_posterior=False, **dict(case, controlnet_conditioning_scale=0.0))
    assert np.abs(ours - off).max() > 0.05


def test_new_control_images_scales_prompts_and_time_ids_never_recompile(pipe):
    """After a first guided call, new control images, scales, windows, guess mode, prompts and
    micro-conditioning compile nothing (jax.monitoring events, as test_compile_count counts)."""
    from test_compile_count import Count

    run = dict(num_steps=STEPS, num_images=N, latents=_noise(6), guidance_scale=5.0, output_type="latent")
    first = pipe(PROMPT, negative_prompt="ugly", control_image=_control(2), controlnet_conditioning_scale=SCALE,
                 **run)
    with Count() as later:
        outs = [pipe("a dog", negative_prompt="a bird", prompt_2="a cat", control_image=_control(3),
                     controlnet_conditioning_scale=0.3, original_size=(64, 48), crops_coords_top_left=(3, 1),
                     target_size=(8, 24), **run),
                pipe(PROMPT, control_image=np.asarray(_control(2)), controlnet_conditioning_scale=SCALE,
                     control_guidance_end=0.5, guess_mode=True, **run)]
    assert not later.compiles and not later.traces, (later.compiles, later.traces)
    for out in outs:
        assert out.shape == LATENT and np.abs(out - first).max() > 0.05
    with Count() as other:                               # the counter sees a compile when there is one
        pipe(PROMPT, control_image=_control(2), num_steps=STEPS, num_images=1, output_type="latent")
    assert other.compiles
