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

from test_pipeline_sdxl import (
    LATENT,
    PROMPT,
    SIZE,
    STEPS,
    N,
    _noise,
    _torch,
    tiny,  # noqa: F401  (the module fixture: folder, pipeline, components)
)

from jaxdiff.pipelines.stable_diffusion import StableDiffusion

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
    # no height / width: the control image's size (24x24), which is also the default original_size
    big = Image.fromarray((np.random.RandomState(2).rand(24, 24, 3) * 255).astype(np.uint8))
    noise = np.random.RandomState(8).randn(N, 12, 12, 4).astype(np.float32)
    ours = pipe(PROMPT, control_image=big, controlnet_conditioning_scale=SCALE, num_steps=STEPS, num_images=N,
                latents=noise, output_type="np", guidance_scale=5.0)
    theirs = ref(PROMPT, image=big, controlnet_conditioning_scale=SCALE, num_inference_steps=STEPS,
                 num_images_per_prompt=N, latents=_torch(noise), output_type="np", guidance_scale=5.0).images
    assert ours.shape == (N, 24, 24, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    # the time ids, which reach the U-Net and the ControlNet: they move this tiny model's
    # picture by ~9e-3, thousands of times the parity error above
    assert np.abs(outs[0] - outs[4]).max() > 1e-3


def test_sdxl_controlnet_img2img_matches_diffusers(tiny, controlnet, pipe, monkeypatch):  # noqa: F811
    """StableDiffusionXLControlNetImg2ImgPipeline, encoding with the posterior mean and given
    noise (diffusers draws both from a torch generator)."""
    from diffusers.models.autoencoders import vae as dvae
    from diffusers.pipelines.controlnet import (
        pipeline_controlnet_sd_xl_img2img as xl_i2i,
    )

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
                pipe(PROMPT, negative_prompt="a dog", control_image=np.asarray(_control(2)),
                     controlnet_conditioning_scale=SCALE,
                     control_guidance_end=0.5, guess_mode=True, **run)]
    assert not later.compiles and not later.traces, (later.compiles, later.traces)
    for out in outs:
        assert out.shape == LATENT and np.abs(out - first).max() > 0.05
    with Count() as other:                               # the counter sees a compile when there is one
        pipe(PROMPT, control_image=_control(2), num_steps=STEPS, num_images=1, output_type="latent")
    assert other.compiles


# ---------------------------------------------------------------------------------------------
# a kohya SDXL LoRA with the ControlNet


def _ldm(module: str) -> str:
    """The LDM / sgm name kohya writes for a diffusers module of the tiny SDXL U-Net (two levels,
    one ResNet per down level, two per up level): down_blocks.1.attentions.0.proj_in ->
    input_blocks.3.1.proj_in, up_blocks.1.resnets.0.conv1 -> output_blocks.2.0.in_layers.2."""
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    parts = module.split(".")
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        block = f"middle_block.{1 if kind == 'attentions' else 2 * j}"
    else:
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        index = 1 + 2 * level + j if parts[0] == "down_blocks" else 2 * level + j
        block = f"{'input' if parts[0] == 'down_blocks' else 'output'}_blocks.{index}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets":
        rest = [resnet[rest[0]]]
    return ".".join([block, *rest])


def _kohya_xl(layers: dict) -> dict:
    """kohya's SDXL file of the PEFT state dicts `layers` ({part: (state, config)}): lora_unet_
    with LDM names, lora_te1_ / lora_te2_ with transformers names, "_" for ".", alpha tensors."""
    out = {}
    for part, (state, config) in layers.items():
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)
            if part == "unet":
                name = "lora_unet_" + _ldm(module).replace(".", "_")
            else:
                name = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part] + "text_model_" + \
                    module.removeprefix("text_model.").replace(".", "_")
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(config["lora_alpha"]))
    return out


def test_kohya_sdxl_lora_with_the_controlnet_matches_diffusers(tiny, controlnet, tmp_path, monkeypatch):  # noqa: F811
    """A kohya SDXL LoRA (U-Net in LDM names, both text encoders) built from a PEFT LoRA, on the
    SDXL ControlNet pipeline, against diffusers with the PEFT file (diffusers' own kohya reader
    drops text-encoder attention LoRAs under transformers 5: see tests/test_lora.py)."""
    import transformers.integrations.peft as integration
    from safetensors.torch import save_file
    from test_lora import TEXT_TARGETS, UNET_TARGETS, _lora_layers

    monkeypatch.setattr(integration, "check_peft_version", lambda min_version=None: None)   # as test_lora
    folder, _, components = tiny
    # alpha / rank 1/4 on the U-Net keeps the tiny network well-conditioned (test_pipeline_sdxl)
    layers = {"unet": _lora_layers(components["unet"], UNET_TARGETS, 4, 1, seed=30),
              "text_encoder": _lora_layers(components["text_encoder"], TEXT_TARGETS, 2, 3, seed=31),
              "text_encoder_2": _lora_layers(components["text_encoder_2"], TEXT_TARGETS, 2, 4, seed=32)}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path / "peft"), **{f"{k}_lora_layers": v[0] for k, v in layers.items()},
        **{f"{k}_lora_adapter_metadata": v[1] for k, v in layers.items()})
    kohya = _kohya_xl(layers)
    for prefix in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                   "lora_te2_text_model_encoder_layers_2_mlp_fc1",
                   "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k",
                   "lora_unet_middle_block_2_in_layers_2", "lora_unet_middle_block_1_proj_in",
                   "lora_unet_output_blocks_3_0_emb_layers_1"):
        assert f"{prefix}.alpha" in kohya, prefix
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_unet_")}, str(tmp_path / "unet.safetensors"))

    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(str(folder), controlnet=controlnet[1],
                                                                       add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(tmp_path / "peft"))
    noise, control = _noise(7), _control(9)
    run = dict(control_image=control, controlnet_conditioning_scale=SCALE, num_images=N, guidance_scale=5.0,
               output_type="np")
    theirs = ref(PROMPT, image=control, controlnet_conditioning_scale=SCALE, num_inference_steps=STEPS,
                 num_images_per_prompt=N, guidance_scale=5.0, output_type="np", latents=_torch(noise),
                 cross_attention_kwargs={"scale": 0.7}).images
    ours_pipe = StableDiffusion.from_pretrained(folder, controlnet=controlnet[0])
    plain = ours_pipe(PROMPT, num_steps=STEPS, latents=noise, **run)
    ours_pipe.load_lora(tmp_path / "kohya.safetensors", scale=0.7)
    ours = ours_pipe(PROMPT, num_steps=STEPS, latents=noise, **run)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)                        # measured ~2e-6
    assert np.abs(ours - plain).max() > 0.05
    # the text encoders' LoRAs count: the U-Net's alone give another picture
    ours_pipe.unload_lora()
    ours_pipe.load_lora(tmp_path / "unet.safetensors", scale=0.7)
    unet_only = ours_pipe(PROMPT, num_steps=STEPS, latents=noise, **run)
    assert np.abs(ours - unet_only).max() > 0.05                                # measured 6e-2
    assert np.abs(unet_only - plain).max() > 5e-3                               # measured 1.6e-2, 1e4 x the error
