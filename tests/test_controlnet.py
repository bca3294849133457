"""ControlNet: the Flax module (jaxdiff/models/controlnet.py) against diffusers' ControlNetModel,
the U-Net's residual inputs against UNet2DConditionModel's additional residuals, the converter
(jaxdiff/convert/controlnet.py) both ways, and the Stable Diffusion front end with one and two
ControlNets (jaxdiff/pipelines/controlnet.py) against StableDiffusionControlNetPipeline, all on
tiny random models built here (offline)."""

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomise_unit_gain, write_clip_tokenizer
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from jaxdiff.convert import controlnet as convert_cn  # noqa: E402
from jaxdiff.convert import unet as convert_unet  # noqa: E402
from jaxdiff.errors import CheckpointError  # noqa: E402
from jaxdiff.models.controlnet import ControlNet, guess_mode_scales  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import StableDiffusion  # noqa: E402
from jaxdiff.sharding import rules as sharding_rules  # noqa: E402

B, LATENT, SEQ, CTX, TEXT = 2, 8, 7, 32, 24
N, SIZE, STEPS, PROMPT = 2, 16, 4, "a cat"
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=CTX,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=4)
UP = ("CrossAttnUpBlock2D", "UpBlock2D")     # the U-Net's decoder mirroring UNET's encoder


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# the module


def _inputs(seed, sdxl=False, size=LATENT, factor=2):
    rng = np.random.RandomState(seed)
    out = dict(x=rng.randn(B, size, size, 4).astype(np.float32), t=np.array([10.0, 700.0], np.float32),
               context=rng.randn(B, SEQ, CTX).astype(np.float32),
               control=rng.rand(B, size * factor, size * factor, 3).astype(np.float32))
    if sdxl:
        out["text_embeds"] = rng.randn(B, TEXT).astype(np.float32)
        out["time_ids"] = np.array([[16, 16, 0, 0, 16, 16], [32, 24, 2, 3, 16, 16]], np.float32)
    return out


def _reference(ref, inputs, scale=1.0, guess_mode=False):
    kw = {}
    if "text_embeds" in inputs:
        kw["added_cond_kwargs"] = {k: torch.from_numpy(inputs[k]) for k in ("text_embeds", "time_ids")}
    with torch.no_grad():
        down, mid = ref(_nchw(inputs["x"]), torch.from_numpy(inputs["t"]), torch.from_numpy(inputs["context"]),
                        _nchw(inputs["control"]), conditioning_scale=scale, guess_mode=guess_mode,
                        return_dict=False, **kw)
    return [_nhwc(d) for d in down], _nhwc(mid)


@functools.cache
def _jitted(module):
    def apply(params, inputs, scale):
        rest = {k: v for k, v in inputs.items() if k not in ("x", "t", "control")}
        return module.apply({"params": params}, inputs["x"], inputs["t"], inputs["control"], scale=scale, **rest)
    return jax.jit(apply)


def _check(module, params, inputs, ref, scale, guess_mode=False):
    """Every residual within 1e-4 (relative) of diffusers'; returns the largest error."""
    r = module.num_residuals
    weights = np.full((B, r), scale, np.float32) * (guess_mode_scales(r) if guess_mode else 1.0)
    down, mid = _jitted(module)(params, inputs, weights)
    want_down, want_mid = _reference(ref, inputs, scale, guess_mode)
    assert len(down) == len(want_down) == r - 1
    errors = [_rel(a, b) for a, b in zip([*down, mid], [*want_down, want_mid])]
    assert max(errors) < 1e-4, errors
    assert min(float(np.abs(b).mean()) for b in [*want_down, want_mid]) > 1e-2   # zero convs are not zero
    return max(errors)


@pytest.fixture(scope="module")
def sd_controlnet():
    ref = randomise_unit_gain(diffusers.ControlNetModel(
        in_channels=4, conditioning_embedding_out_channels=(8, 16), **UNET), seed=5).eval()
    module = convert_cn.module_from_config(dict(ref.config))
    return ref, module, convert_cn.params_from_torch(_state(ref), module)


def test_controlnet_matches_diffusers(sd_controlnet):
    ref, module, params = sd_controlnet
    assert isinstance(module, ControlNet) and module.num_residuals == 5 and module.control_factor == 2
    inputs = _inputs(0)
    _check(module, params, inputs, ref, 0.8)                        # measured ~3e-7
    _check(module, params, inputs, ref, 0.8, guess_mode=True)       # per-residual weights 0.1 .. 1
    # the control image matters
    other = dict(inputs, control=inputs["control"][::-1].copy())
    d0, _ = _jitted(module)(params, inputs, np.ones((B, 5), np.float32))
    d1, _ = _jitted(module)(params, other, np.ones((B, 5), np.float32))
    assert _rel(d1[0], np.asarray(d0[0])) > 0.1
    # every parameter shards by a named rule
    assert sharding_rules.unnamed_parameters(params) == []
    # bfloat16 compute stays close (parameters float32, residuals returned float32)
    ones = np.ones((B, 5), np.float32)
    _, m16 = _jitted(module.clone(dtype=jnp.bfloat16))(params, inputs, ones)
    _, m32 = _jitted(module)(params, inputs, ones)
    assert m16.dtype == jnp.float32 and _rel(m16, np.asarray(m32)) < 3e-2     # measured ~9e-3


def test_sdxl_style_controlnet_matches_diffusers():
    """An SDXL ControlNet: micro-conditioning (text_embeds, time_ids) added to the time embedding,
    linear projections, two transformer blocks at the attention level."""
    ref = randomise_unit_gain(diffusers.ControlNetModel(
        in_channels=4, conditioning_embedding_out_channels=(8, 16), **dict(
            UNET, use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=TEXT + 6 * 8)), seed=6).eval()
    module = convert_cn.module_from_config(dict(ref.config))
    assert module.addition_embed_dim == TEXT + 48 and module.per_level("transformer_depth") == (1, 2)
    params = convert_cn.params_from_torch(_state(ref), module)
    inputs = _inputs(1, sdxl=True)
    _check(module, params, inputs, ref, 0.5)                        # measured ~3e-7
    # the micro-conditioning reaches the residuals, ~40x the tolerance above (a network that
    # ignored it would fail the comparison)
    moved = dict(inputs, time_ids=inputs["time_ids"] + 4.0)
    _, m0 = _jitted(module)(params, inputs, np.ones((B, 5), np.float32))
    _, m1 = _jitted(module)(params, moved, np.ones((B, 5), np.float32))
    assert _rel(m1, np.asarray(m0)) > 4e-3


def test_pooling_controlnet_matches_diffusers():
    ref = randomise_unit_gain(diffusers.ControlNetModel(
        in_channels=4, conditioning_embedding_out_channels=(8, 16), global_pool_conditions=True, **UNET),
        seed=7).eval()
    module = convert_cn.module_from_config(dict(ref.config))
    params = convert_cn.params_from_torch(_state(ref), module)
    inputs = _inputs(2)
    down, mid = _jitted(module)(params, inputs, np.full((B, 5), 0.7, np.float32))
    want_down, want_mid = _reference(ref, inputs, 0.7)
    assert mid.shape == (B, 1, 1, 64)
    assert max(_rel(a, b) for a, b in zip([*down, mid], [*want_down, want_mid])) < 1e-4


def test_unet_residuals_match_diffusers_additional_residuals(sd_controlnet):
    ref_cn = sd_controlnet[0]
    ref = randomise_unit_gain(diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, up_block_types=UP, **UNET), seed=8).eval()
    unet = convert_unet.module_from_config(dict(ref.config))
    params = convert_unet.params_from_torch(_state(ref), unet)
    inputs = _inputs(3)
    down, mid = _reference(ref_cn, inputs, 0.9)
    with torch.no_grad():
        want = _nhwc(ref(_nchw(inputs["x"]), torch.from_numpy(inputs["t"]), torch.from_numpy(inputs["context"]),
                         down_block_additional_residuals=tuple(_nchw(d) for d in down),
                         mid_block_additional_residual=_nchw(mid)).sample)
        plain = _nhwc(ref(_nchw(inputs["x"]), torch.from_numpy(inputs["t"]),
                          torch.from_numpy(inputs["context"])).sample)
    apply = jax.jit(lambda p, x, t, c, d, m: unet.apply({"params": p}, x, t, context=c, down_residuals=d,
                                                        mid_residual=m))
    ours = np.asarray(apply(params, inputs["x"], inputs["t"], inputs["context"], down, mid))
    assert _rel(ours, want) < 1e-4                                   # measured ~3e-7
    assert _rel(plain, want) > 0.05                                  # the residuals change the output
    with pytest.raises(ValueError, match=r"down_residuals must be 4 arrays shaped like") as e:
        jax.eval_shape(lambda: unet.apply({"params": params}, inputs["x"], inputs["t"], context=inputs["context"],
                                          down_residuals=down[:3]))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# the converter


def test_converter_round_trips_both_ways(sd_controlnet, tmp_path):
    ref, module, params = sd_controlnet
    ref.save_pretrained(str(tmp_path / "theirs"), safe_serialization=True)
    loaded, loaded_params = convert_cn.load(tmp_path / "theirs")
    assert loaded == module
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded_params, params))
    # jaxdiff -> diffusers: what diffusers reads back is the same network, weight for weight
    convert_cn.save(tmp_path / "ours", module, params)
    back = diffusers.ControlNetModel.from_pretrained(str(tmp_path / "ours")).eval()
    state = _state(back)
    assert state.keys() == _state(ref).keys()
    assert all(np.array_equal(state[k], v) for k, v in _state(ref).items())
    plain = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))  # noqa: E731
    assert plain(back.config) == plain(ref.config)
    # a ControlNet made from a jaxdiff U-Net starts from its encoder weights
    fresh = ControlNet.from_unet(convert_unet.module_from_config(dict(UNET, in_channels=4, out_channels=4, up_block_types=UP)),
                                 embedding_channels=(8, 16))
    assert fresh == module
    with pytest.raises(CheckpointError, match="not a diffusers ControlNetModel"):
        convert_cn.module_from_config({"_class_name": "UNet2DConditionModel"})
    bad = dict(_state(ref))
    del bad["controlnet_mid_block.weight"]
    with pytest.raises(CheckpointError, match="missing 1 key.*controlnet_mid_block.weight"):
        convert_cn.params_from_torch(bad, module)


# ---------------------------------------------------------------------------------------------
# the pipeline


def _components(tmp):
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>")]
    vocab_size = write_clip_tokenizer(tmp / "tok", merges=merges)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp / "tok"))
    unet = randomise_unit_gain(diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, up_block_types=UP, **UNET), seed=4).eval()
    vae = randomise_unit_gain(diffusers.AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8), seed=1).eval()
    text = randomise_unit_gain(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CTX, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=vocab_size - 1)),
        seed=2).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(SD folder, [ControlNet folders], diffusers components, [diffusers ControlNets])."""
    tmp = tmp_path_factory.mktemp("sdcn")
    parts = _components(tmp)
    diffusers.StableDiffusionPipeline(**parts).save_pretrained(str(tmp / "sd"), safe_serialization=True)
    nets = []
    for i in range(2):
        net = diffusers.ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(8, 16))
        nets.append(randomise_unit_gain(net, seed=10 + i).eval())
        net.save_pretrained(str(tmp / f"cn{i}"), safe_serialization=True)
    return tmp / "sd", [tmp / "cn0", tmp / "cn1"], parts, nets


@pytest.fixture(scope="module")
def one(tiny):
    return StableDiffusion.from_pretrained(tiny[0], controlnet=tiny[1][0])


@pytest.fixture(scope="module")
def two(tiny):
    return StableDiffusion.from_pretrained(tiny[0], controlnet=[str(p) for p in tiny[1]])


def _reference_pipe(tiny, nets):
    _, _, parts, refs = tiny
    controlnet = refs[nets[0]] if len(nets) == 1 else diffusers.MultiControlNetModel([refs[i] for i in nets])
    pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(seed=0):
    return np.random.RandomState(seed).randn(N, SIZE // 2, SIZE // 2, 4).astype(np.float32)


def _control(seed):
    return Image.fromarray((np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


def _theirs(ref, noise, **kw):
    return ref(PROMPT, num_inference_steps=STEPS, num_images_per_prompt=N, latents=_nchw(noise),
               output_type="np", **kw).images


def test_one_controlnet_matches_diffusers(tiny, one):
    ref = _reference_pipe(tiny, [0])
    noise, control = _noise(), _control(1)
    cases = [dict(guidance_scale=7.5, controlnet_conditioning_scale=0.8),
             dict(guidance_scale=1.0, controlnet_conditioning_scale=0.8),
             dict(guidance_scale=5.0, controlnet_conditioning_scale=0.8, guess_mode=True),
             dict(guidance_scale=7.5, controlnet_conditioning_scale=0.8, control_guidance_start=0.25,
                  control_guidance_end=0.75)]
    outs = []
    for case in cases:
        ours = one(PROMPT, control_image=control, num_steps=STEPS, num_images=N, latents=noise,
                   output_type="np", **case)
        theirs = _theirs(ref, noise, image=control, **case)
        assert ours.shape == (N, SIZE, SIZE, 3)
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=str(case))   # measured ~1e-5
        outs.append(ours)
    # the control changes the image: scale 0 is the plain Stable Diffusion picture
    off = one(PROMPT, control_image=control, controlnet_conditioning_scale=0.0, num_steps=STEPS, num_images=N,
              latents=noise, output_type="np")
    plain = StableDiffusion.from_pretrained(tiny[0])(PROMPT, num_steps=STEPS, num_images=N, latents=noise,
                                                     output_type="np")
    np.testing.assert_allclose(off, plain, atol=1e-5)
    for i, out in enumerate(outs):
        assert np.abs(out - off).max() > 0.05, cases[i]
    assert np.abs(outs[0] - outs[3]).max() > 0.05          # the guidance window matters
    assert np.abs(outs[0] - outs[2]).max() > 0.05          # so does guess mode


def test_two_controlnets_match_diffusers(tiny, two):
    ref = _reference_pipe(tiny, [0, 1])
    noise, controls = _noise(1), [_control(2), np.asarray(_control(3), np.float32) / 255.0]
    cases = [dict(controlnet_conditioning_scale=[0.8, 0.5]),
             dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.5],
                  control_guidance_end=[0.5, 1.0])]
    outs = []
    for case in cases:
        ours = two(PROMPT, control_image=controls, num_steps=STEPS, num_images=N, latents=noise, guidance_scale=7.5,
                   output_type="np", **case)
        theirs = _theirs(ref, noise, image=[controls[0], controls[1][None]], guidance_scale=7.5, **case)
        np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=str(case))   # measured ~1e-5
        outs.append(ours)
    # each ControlNet counts: switching off the second changes the picture
    first_only = two(PROMPT, control_image=controls, controlnet_conditioning_scale=[0.8, 0.0], num_steps=STEPS,
                     num_images=N, latents=noise, guidance_scale=7.5, output_type="np")
    assert np.abs(first_only - outs[0]).max() > 0.05
    assert np.abs(outs[0] - outs[1]).max() > 0.05


@contextlib.contextmanager
def _compiles():
    """The compile events inside the block: every jit trace, backend compile and persistent-cache
    lookup reports one ("/jax/core/compile/jaxpr_trace_duration", ".../backend_compile_duration",
    "/jax/compilation_cache/...")."""
    events = []

    def listener(event, *args, **kwargs):
        if "compil" in event:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.monitoring.register_event_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.monitoring.unregister_event_listener(listener)


def test_new_scales_images_and_windows_reuse_the_compiled_program(one):
    noise = _noise(2)
    args = dict(num_steps=STEPS, num_images=N, latents=noise, output_type="np", guidance_scale=7.5)
    first = one(PROMPT, control_image=_control(4), controlnet_conditioning_scale=0.8, **args)
    with _compiles() as compiles:
        outs = [one(PROMPT, control_image=_control(5), controlnet_conditioning_scale=0.3, **args),
                one(PROMPT, control_image=_control(4), controlnet_conditioning_scale=0.8, control_guidance_end=0.5,
                    **args),
                one(PROMPT, control_image=_control(4), controlnet_conditioning_scale=0.8, guess_mode=True, **args)]
    assert compiles == []
    for out in outs:                                     # and every one of them is another picture
        assert np.abs(out - first).max() > 0.05
    with _compiles() as compiles:                        # the count sees a compile when there is one
        one(PROMPT, control_image=_control(4), num_steps=STEPS, num_images=1, output_type="latent")
    assert compiles


def test_img2img_with_a_controlnet_matches_diffusers(tiny, one, monkeypatch):
    """StableDiffusionControlNetImg2ImgPipeline, encoding with the posterior mean and given noise
    (diffusers draws both from a torch generator). The guidance window counts the run's steps:
    strength 0.75 runs 3 of 4, and end 0.7 controls the first two (counted over the plan's 4,
    only the first)."""
    from diffusers.models.autoencoders import vae as dvae
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as cn_i2i

    noise = _noise(4)
    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    monkeypatch.setattr(cn_i2i, "randn_tensor", lambda shape, generator=None, device=None, dtype=None: _nchw(noise))
    _, _, parts, refs = tiny
    ref = diffusers.StableDiffusionControlNetImg2ImgPipeline(**parts, controlnet=refs[0])
    ref.set_progress_bar_config(disable=True)
    picture, control = _control(7), _control(8)
    case = dict(strength=0.75, controlnet_conditioning_scale=0.8, control_guidance_end=0.7, guidance_scale=7.5)
    ours = one.img2img(picture, PROMPT, control_image=control, num_steps=STEPS, num_images=N, latents=noise,
                       output_type="np", sample_posterior=False, **case)
    theirs = ref(PROMPT, image=picture, control_image=control, num_inference_steps=STEPS, num_images_per_prompt=N,
                 output_type="np", **case).images
    np.testing.assert_allclose(ours, theirs, atol=1e-3)                        # measured ~1e-5
    off = one.img2img(picture, PROMPT, control_image=control, num_steps=STEPS, num_images=N, latents=noise,
                      output_type="np", sample_posterior=False, **dict(case, controlnet_conditioning_scale=0.0))
    assert np.abs(ours - off).max() > 0.05


def test_control_image_forms_and_default_size(one):
    """uint8 and float arrays are the PIL image; the size defaults to the control image's, and an
    array of another size is resized (nearest, as diffusers)."""
    noise, control = _noise(3), _control(6)
    args = dict(num_steps=STEPS, num_images=N, latents=noise, output_type="np", guidance_scale=1.0)
    pil = one(PROMPT, control_image=control, **args)
    as_uint8 = one(PROMPT, control_image=np.asarray(control), **args)
    as_float = one(PROMPT, control_image=np.asarray(control, np.float32)[None] / 255.0, **args)
    np.testing.assert_allclose(as_uint8, pil, atol=1e-6)
    np.testing.assert_allclose(as_float, pil, atol=1e-6)
    small = np.asarray(control)[::2, ::2]                                            # 8 x 8
    upscaled = one(PROMPT, control_image=small, height=SIZE, width=SIZE, **args)
    np.testing.assert_allclose(upscaled, one(PROMPT, control_image=np.repeat(np.repeat(small, 2, 0), 2, 1), **args),
                               atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(control_image=np.zeros((SIZE, SIZE, 4))), r"control_image must be a PIL image.*\[H, W, 3\]"),
    (dict(control_image=np.zeros((SIZE, SIZE))), r"control_image must be a PIL image.*got ndarray of shape \[16, 16\]"),
    (dict(control_image=np.zeros((3, SIZE, SIZE, 3))), "control_image has 3 images for 1 prompt"),
    (dict(control_image=np.full((SIZE, SIZE, 3), 2.0)), r"control_image values must lie in \[0, 1\]"),
    (dict(), "this pipeline has 1 ControlNet.*pass control_image="),
    (dict(control_image=np.zeros((SIZE, SIZE, 3)), controlnet_conditioning_scale=[0.5, 0.5]),
     "controlnet_conditioning_scale has 2 values for 1 ControlNet"),
    (dict(control_image=np.zeros((SIZE, SIZE, 3)), control_guidance_start=0.6, control_guidance_end=0.4),
     "must satisfy 0 <= start < end <= 1"),
])
def test_bad_control_inputs_are_one_line(one, kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        one(PROMPT, num_steps=STEPS, **kwargs)
    assert "\n" not in str(e.value)


def test_control_count_and_missing_controlnet_are_one_line(tiny, two, tmp_path):
    with pytest.raises(ValueError, match="control_image must be a list of 2 images .one per ControlNet., got 1"):
        two(PROMPT, num_steps=STEPS, control_image=np.zeros((SIZE, SIZE, 3)))
    plain = StableDiffusion.from_pretrained(tiny[0])
    with pytest.raises(ValueError, match="control_image need.* a ControlNet: load one with"):
        plain(PROMPT, num_steps=STEPS, control_image=np.zeros((SIZE, SIZE, 3)))
    with pytest.raises(CheckpointError, match="has no config.json"):
        StableDiffusion.from_pretrained(tiny[0], controlnet=tiny[0])
    other = tmp_path / "narrow"
    diffusers.ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(8, 16), **dict(
        UNET, block_out_channels=(16, 32))).save_pretrained(str(other), safe_serialization=True)
    with pytest.raises(CheckpointError, match="has base_channels=16 but the U-Net has 32; use a ControlNet made") as e:
        StableDiffusion.from_pretrained(tiny[0], controlnet=[tiny[1][0], other])
    assert "\n" not in str(e.value)
