"""LoRA on the Stable Diffusion pipeline against diffusers' `load_lora_weights`: PEFT and kohya
files, per-call and per-adapter scales, two adapters, fuse / unfuse, saving, and the one-line
errors. Tiny random components (as tests/test_pipeline_sd.py builds them) with random LoRA
weights (lora_B non-zero), float32, given latents."""

import contextlib
import copy

import jax
import numpy as np
import pytest

from conftest import make_hostile_pickle, randomise_unit_gain, tree_equal, write_clip_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from jaxdiff.errors import CheckpointError  # noqa: E402
from jaxdiff.pipelines.stable_diffusion import StableDiffusion  # noqa: E402

N, SIZE, STEPS = 2, 16, 4
LATENT = (N, SIZE // 2, SIZE // 2, 4)
PROMPT = "a cat"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


@pytest.fixture(scope="module", autouse=True)
def peft_for_transformers():
    """transformers 5.25 asks for peft >= 0.22 before it attaches an adapter to a text encoder;
    the installed 0.21 does the same work. Only that version check is skipped."""
    import transformers.integrations.peft as integration

    with pytest.MonkeyPatch.context() as m:
        m.setattr(integration, "check_peft_version", lambda min_version=None: None)
        yield


def _components(tmp):
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>")]
    vocab_size = write_clip_tokenizer(tmp / "tok", merges=merges)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp / "tok"))
    unet = randomise_unit_gain(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4), 4).eval()
    vae = randomise_unit_gain(diffusers.AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8),
        1).eval()
    text = randomise_unit_gain(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=2, pad_token_id=vocab_size - 1)),
        2).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _lora_layers(model, targets, rank, alpha, seed):
    """The PEFT LoRA state dict of `targets` of a copy of `model`, every lora_A / lora_B random
    (unit gain, so the update is as large as the layer), and its LoraConfig as a dict."""
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(model)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
    return get_peft_model_state_dict(model), {"r": rank, "lora_alpha": alpha, "target_modules": targets}


def _kohya(state, alphas):
    """The kohya / A1111 names of a diffusers LoRA state dict (diffusers module names with "_"
    for "."; transformers 4's `text_model.` prefix on the text encoder), with alpha tensors."""
    out = {}
    for key, value in state.items():
        part, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}[part]
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alphas[part]))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders: the base model, LoRA "a" (U-Net rank 4 alpha 8, text encoder rank 2 alpha 3) as
    diffusers saves it and in kohya names, and LoRA "b" (U-Net only, rank 2, no alpha)."""
    tmp = tmp_path_factory.mktemp("lora")
    components = _components(tmp)
    ref = diffusers.StableDiffusionPipeline(**components)
    ref.save_pretrained(str(tmp / "model"), safe_serialization=True)
    unet_a, unet_meta = _lora_layers(components["unet"], UNET_TARGETS, 4, 8, seed=10)
    text_a, text_meta = _lora_layers(components["text_encoder"], TEXT_TARGETS, 2, 3, seed=11)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp / "a"), unet_lora_layers=unet_a, text_encoder_lora_layers=text_a,
        unet_lora_adapter_metadata=unet_meta, text_encoder_lora_adapter_metadata=text_meta)
    state = {f"unet.{k}": v for k, v in unet_a.items()} | {f"text_encoder.{k}": v for k, v in text_a.items()}
    save_file(_kohya(state, {"unet": 8, "text_encoder": 3}), str(tmp / "a_kohya.safetensors"))
    unet_b, _ = _lora_layers(components["unet"], ["to_k", "to_v", "conv2"], 2, 2, seed=12)
    diffusers.StableDiffusionPipeline.save_lora_weights(str(tmp / "b"), unet_lora_layers=unet_b)
    return tmp


def _reference(tiny, loras=(), weights=None, **kwargs):
    """diffusers' images with the LoRA folders `loras` loaded (as adapters "a0", "a1", ...)."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny / "model"), safety_checker=None,
                                                           requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    names = [f"a{i}" for i in range(len(loras))]
    for name, folder in zip(names, loras, strict=True):
        ref.load_lora_weights(str(folder), adapter_name=name)
    if weights is not None:
        ref.set_adapters(names, weights)
    noise = torch.from_numpy(_noise().transpose(0, 3, 1, 2).copy())
    return ref(PROMPT, num_inference_steps=STEPS, num_images_per_prompt=N, latents=noise, output_type="np",
               guidance_scale=7.5, **kwargs).images


def _noise():
    return np.random.RandomState(0).randn(*LATENT).astype(np.float32)


def _ours(pipe, **kwargs):
    return pipe(PROMPT, num_steps=STEPS, num_images=N, latents=_noise(), output_type="np", guidance_scale=7.5,
                sampler="ddim", **kwargs)


@pytest.fixture(scope="module")
def base(tiny):
    """(jaxdiff's images without LoRA, diffusers' with LoRA "a" at cross_attention_kwargs scale 0.7)."""
    pipe = StableDiffusion.from_pretrained(tiny / "model")
    return _ours(pipe), _reference(tiny, [tiny / "a"], cross_attention_kwargs={"scale": 0.7})


@pytest.fixture
def pipe(tiny):
    return StableDiffusion.from_pretrained(tiny / "model")


def test_peft_lora_matches_diffusers_at_a_scale(tiny, base, pipe):
    plain, theirs = base
    pipe.load_lora(tiny / "a", scale=0.7)
    ours = _ours(pipe)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)                       # measured ~5e-5
    # diffusers' per-call scale, and jaxdiff's: the adapter at 1 times the call's 0.7
    pipe.set_lora_scales({"default_0": 1.0})
    np.testing.assert_allclose(_ours(pipe, cross_attention_kwargs={"scale": 0.7}), theirs, atol=1e-3)
    np.testing.assert_allclose(_ours(pipe, lora_scale=0.7), theirs, atol=1e-3)
    # the LoRA changes the pictures, and so does its scale
    assert np.abs(ours - plain).max() > 0.1
    assert np.abs(_ours(pipe) - ours).max() > 0.05


def test_kohya_file_is_the_same_lora(tiny, base, pipe):
    """The same tensors under kohya names with their alphas: the same pictures as diffusers gives
    with the PEFT file (alpha / rank = 2 for the U-Net, 1.5 for the text encoder, which must be
    read from the alpha tensors). The reference is the PEFT file: diffusers 0.42's own kohya reader
    (with transformers 5) applies the U-Net part exactly (max difference 0) but keeps only the text
    encoder's fc1 LoRAs, silently dropping the q_proj / v_proj ones."""
    _, theirs = base
    pipe.load_lora(tiny / "a_kohya.safetensors", scale=0.7)
    np.testing.assert_allclose(_ours(pipe), theirs, atol=1e-3)


def test_two_adapters_and_traced_scales_reuse_one_program(tiny, pipe):
    pipe.load_lora(tiny / "a", adapter_name="a", scale=0.7)
    pipe.load_lora(tiny / "b", adapter_name="b", scale=-0.5)
    first = _ours(pipe)
    np.testing.assert_allclose(first, _reference(tiny, [tiny / "a", tiny / "b"], [0.7, -0.5]), atol=1e-3)
    with _compiles() as compiles:
        pipe.set_lora_scales({"a": 0.2, "b": 1.3})
        second = _ours(pipe)
        third = _ours(pipe, lora_scale=0.5)
    assert compiles == [], compiles                         # new scales: the same compiled programs
    np.testing.assert_allclose(second, _reference(tiny, [tiny / "a", tiny / "b"], [0.2, 1.3]), atol=1e-3)
    np.testing.assert_allclose(third, _reference(tiny, [tiny / "a", tiny / "b"], [0.2, 1.3],
                                                 cross_attention_kwargs={"scale": 0.5}), atol=1e-3)
    assert np.abs(first - second).max() > 0.05 and np.abs(second - third).max() > 0.05
    assert pipe.lora_scales == {"a": 0.2, "b": 1.3}


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def _compiles():
    """The list of XLA compilations that happen inside the block."""
    events = []

    def listen(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_compile_counter_sees_a_compilation():
    """The counter above sees a new program (else its zero would pass vacuously)."""
    with _compiles() as compiles:
        jax.jit(lambda x: x * 3.0 + 1.0)(np.float32(2.0))
    assert len(compiles) == 1


def test_fuse_equals_unfused_and_unfuse_restores_the_weights(tiny, pipe):
    before = jax.device_get(pipe.params)
    pipe.load_lora(tiny / "a", scale=0.7, adapter_name="a")
    pipe.load_lora(tiny / "b", scale=0.4, adapter_name="b")
    unfused = _ours(pipe)
    pipe.fuse_lora()
    assert not tree_equal(jax.device_get(pipe.params), before)
    np.testing.assert_allclose(_ours(pipe), unfused, atol=1e-4)               # measured 0
    with pytest.raises(ValueError, match="fused"):
        pipe.set_lora_scales({"a": 1.0})
    pipe.unfuse_lora()
    assert tree_equal(jax.device_get(pipe.params), before)                    # bit for bit
    np.testing.assert_allclose(_ours(pipe), unfused, atol=1e-6)
    pipe.unload_lora()
    assert tree_equal(jax.device_get(pipe.params), before)


def test_saved_lora_loads_in_diffusers(tiny, base, pipe, tmp_path):
    """Read kohya, write diffusers/PEFT: diffusers' load_lora_weights gives the same pictures."""
    _, theirs = base
    pipe.load_lora(tiny / "a_kohya.safetensors")
    written = pipe.save_lora(tmp_path / "saved")
    assert written.endswith("pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(_reference(tiny, [tmp_path / "saved"], cross_attention_kwargs={"scale": 0.7}),
                               theirs, atol=1e-3)
    # and jaxdiff reads its own file back to the same adapter
    again = StableDiffusion.from_pretrained(tiny / "model")
    again.load_lora(tmp_path / "saved")
    assert tree_equal(jax.device_get(again._lora), jax.device_get(pipe._lora))


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, (w, message)


def _write(path, tensors):
    save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_errors_are_one_line(tiny, pipe, tmp_path):
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    k2 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    cases = [
        ({"lora_unet_down_blocks_7_nothing.lora_down.weight": np.zeros((4, 64)),
          "lora_unet_down_blocks_7_nothing.lora_up.weight": np.zeros((64, 4))}, ["down_blocks_7_nothing", "names no"]),
        ({f"{q}.hada_w1_a": np.zeros((4, 64))}, [f"{q}.hada_w1_a", "LoHa"]),
        ({f"{q}.lora_down.weight": np.zeros((4, 64)), f"{q}.lora_up.weight": np.zeros((64, 3))}, [q, "rank"]),
        ({f"{q}.lora_down.weight": np.zeros((4, 64))}, [q, "no up"]),
        # an SDXL-sized cross-attention key (2048 context features) into this 32-feature model
        ({f"{k2}.lora_down.weight": np.zeros((4, 2048)), f"{k2}.lora_up.weight": np.zeros((64, 4))},
         [k2, "[4, 2048]", "another model family"]),
        ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 32)),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros((32, 4))},
         ["text_encoder_2", "SDXL"]),
        ({"transformer.blocks.0.attn.lora_A.weight": np.zeros((4, 32))}, ["unknown LoRA key", "transformer.blocks"]),
    ]
    for i, (tensors, words) in enumerate(cases):
        with pytest.raises(CheckpointError) as e:
            pipe.load_lora(_write(tmp_path / f"bad{i}.safetensors", tensors))
        _one_line(e, *words)
    assert pipe.lora_scales == {}                                   # nothing half-loaded
    with pytest.raises(CheckpointError) as e:
        pipe.load_lora(tmp_path / "missing.safetensors")
    _one_line(e, "not found")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("x.safetensors", "y.safetensors"):
        (two / name).write_bytes((tiny / "b" / "pytorch_lora_weights.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as e:
        pipe.load_lora(two)
    _one_line(e, "x.safetensors, y.safetensors", "weight_name")
    assert pipe.load_lora(two, weight_name="y.safetensors", adapter_name="y") == "y"
    pipe.unload_lora("y")
    pipe.load_lora(tiny / "b", adapter_name="b")
    pipe.set_lora_scales(0.25)                                      # one number: every adapter
    assert pipe.lora_scales == {"b": 0.25}
    for call, words in [(lambda: pipe.load_lora(tiny / "b", adapter_name="b"), ["'b'", "already loaded"]),
                        (lambda: pipe.set_lora_scales({"c": 1.0}), ["'c'", "'b'"]),
                        (lambda: pipe.set_lora_scales({"b": float("nan")}), ["finite"]),
                        (lambda: _ours(pipe, lora_scale="x"), ["lora_scale"]),
                        (lambda: _ours(pipe, cross_attention_kwargs={"foo": 1}), ["cross_attention_kwargs"]),
                        (lambda: pipe.unfuse_lora(), ["fuse_lora() first"])]:
        with pytest.raises(ValueError) as e:
            call()
        _one_line(e, *words)
    pipe.load_lora(tiny / "a", adapter_name="a")
    with pytest.raises(ValueError) as e:
        pipe.save_lora(tmp_path / "out")
    _one_line(e, "'a'", "'b'")


def test_pickled_loras_are_refused_unopened(pipe, tmp_path):
    """Real pickles whose loading runs code (torch zip for .bin / .pt, the legacy format for
    .ckpt, a plain pickle in a folder): each refused in one line, and the code never runs."""
    cases = [("lora.bin", "torch"), ("lora.pt", "torch"), ("lora.ckpt", "torch_legacy"),
             ("folder/pytorch_lora_weights.bin", "pickle")]
    for i, (name, fmt) in enumerate(cases):
        marker = tmp_path / f"ran{i}"
        path = make_hostile_pickle(tmp_path / name, marker, fmt)
        with pytest.raises(CheckpointError) as e:
            pipe.load_lora(path if "folder" not in name else path.parent)
        _one_line(e, "pickle", path.name)
        assert not marker.exists(), name                            # nothing was unpickled
    assert pipe.lora_scales == {}
