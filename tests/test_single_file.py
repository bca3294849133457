"""Single-file (LDM/CompVis) Stable Diffusion checkpoints: jaxdiff params -> LDM file -> params
round trip, the file checked against diffusers' own single-file converters, key errors, and the
diffusers pipeline folder written from it.

Tiny random diffusers/transformers networks stand in for the real ones; every weight (norms and
biases too) is redrawn at std 0.5 so two swapped tensors never compare equal by accident.
"""

import json
import os

import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

from jaxdiff import cli  # noqa: E402
from jaxdiff.convert import clip as clip_convert  # noqa: E402
from jaxdiff.convert import names  # noqa: E402
from jaxdiff.convert import single_file  # noqa: E402
from jaxdiff.convert import unet as unet_convert  # noqa: E402
from jaxdiff.convert import vae as vae_convert  # noqa: E402
from jaxdiff.convert.folder import save_pretrained  # noqa: E402
from jaxdiff.errors import CheckpointError  # noqa: E402
from conftest import write_clip_tokenizer  # noqa: E402

VOCAB = 600

# name -> (U-Net width, linear projections, in_channels, text width, text layers, activation)
KINDS = {
    "sd1": dict(widths=(32, 64), linear=False, in_channels=4, text=64, layers=2,
                act="quick_gelu"),
    # SD 2.x: OpenCLIP text tower, 23 layers as diffusers ships ViT-H (the file gets 24)
    "sd2": dict(widths=(64, 128), linear=True, in_channels=4, text=64, layers=23, act="gelu"),
    "inpaint": dict(widths=(32, 64), linear=False, in_channels=9, text=64, layers=2,
                    act="quick_gelu"),
}


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _numpy(sd):
    return {k: v.detach().numpy() for k, v in sd.items() if not k.endswith("position_ids")}


def _text_state(text):
    """CLIPTextModel's state dict with the `text_model.` names single files and transformers 4
    use (transformers 5 drops the prefix)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in _numpy(text.state_dict()).items()}


def _torch_models(kind):
    k = KINDS[kind]
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=k["in_channels"], out_channels=4,
        block_out_channels=k["widths"], layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=k["text"],
        attention_head_dim=[w // 64 for w in k["widths"]] if k["linear"] else 8,
        use_linear_projection=k["linear"], norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=32, sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=k["text"], intermediate_size=k["text"] + 32,
        num_hidden_layers=k["layers"], num_attention_heads=k["text"] // 64,
        max_position_embeddings=77, hidden_act=k["act"], bos_token_id=0, pad_token_id=1,
        eos_token_id=2))
    return _randomize(unet, 1), _randomize(vae, 2), _randomize(text, 3)


def _jaxdiff(unet, vae, text):
    """(module, params) pairs from the torch networks, through the per-network converters."""
    um = unet_convert.module_from_config(dict(unet.config))
    vm = vae_convert.module_from_config(dict(vae.config))
    tm = clip_convert.module_from_config(text.config.to_dict())
    return ((um, unet_convert.params_from_torch(_numpy(unet.state_dict()), um)),
            (vm, vae_convert.params_from_torch(_numpy(vae.state_dict()), vm)),
            (tm, clip_convert.params_from_torch(_text_state(text), tm)))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """kind -> (kind, torch networks, jaxdiff (module, params) pairs, single-file path), each
    kind built once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            torch_models = _torch_models(kind)
            nets = _jaxdiff(*torch_models)
            path = tmp_path_factory.mktemp(kind) / "model.safetensors"
            single_file.save_single_file(path, *nets)
            cache[kind] = kind, torch_models, nets, str(path)
        return cache[kind]

    return get


@pytest.fixture(params=list(KINDS))
def case(request, build):
    return build(request.param)


@pytest.fixture
def sd1(build):
    return build("sd1")


def _flat(params):
    return traverse_util.flatten_dict(params)


def _assert_same_params(got, want):
    got, want = _flat(got), _flat(want)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _assert_same_state(got, want):
    got = {k: np.asarray(v) for k, v in got.items()}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ------------------------------------------------------------------------------------------


def test_round_trip_gives_identical_params(case):
    kind, torch_models, nets, path = case
    loaded = single_file.load_single_file(path)
    for name, (module, params) in zip(("unet", "vae", "text_encoder"), nets):
        got_module, got_params = loaded[name]
        _assert_same_params(got_params, params)
    # the configs read from the tensor shapes are the ones the torch networks were built with
    unet, vae, text = torch_models
    got = unet_convert.config_to_diffusers(loaded["unet"][0])
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                "down_block_types", "up_block_types", "cross_attention_dim",
                "attention_head_dim", "use_linear_projection", "norm_num_groups"):
        assert got[key] == _plain(unet.config[key]), key
    got = vae_convert.config_to_diffusers(loaded["vae"][0])
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                "latent_channels", "norm_num_groups", "scaling_factor"):
        assert got[key] == _plain(vae.config[key]), key
    got = clip_convert.config_to_transformers(loaded["text_encoder"][0])
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "hidden_act", "eos_token_id"):
        assert got[key] == getattr(text.config, key), key
    sched = loaded["scheduler"]
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"],
            sched["num_train_timesteps"], sched["prediction_type"]) == (
        "scaled_linear", 0.00085, 0.012, 1000, "epsilon")


def test_file_is_in_the_ldm_layout_diffusers_reads(case):
    """diffusers' own single-file converters turn our file back into the original state dicts."""
    from safetensors.torch import load_file

    kind, (unet, vae, text), _, path = case
    ckpt = load_file(path)
    prefixes = {"sd1": "cond_stage_model.transformer.", "inpaint": "cond_stage_model.transformer.",
                "sd2": "cond_stage_model.model."}
    assert {k.split(".")[0] for k in ckpt} == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith(prefixes[kind]) for k in ckpt)
    _assert_same_state(sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)),
                       _numpy(unet.state_dict()))
    _assert_same_state(sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)),
                       _numpy(vae.state_dict()))
    if kind == "sd2":
        # diffusers drops resblock 23 of ViT-H's 24 (SD 2.x uses the penultimate layer)
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in ckpt
        text_sd = sfu.convert_open_clip_checkpoint(text, ckpt)
    else:
        text_sd = sfu.convert_ldm_clip_checkpoint(ckpt)
    _assert_same_state(text_sd, _text_state(text))


def test_the_extra_openclip_block_in_the_file_is_the_identity(build):
    """save_single_file writes an SD 2.x text tower with one OpenCLIP resblock more than the
    network has (as the released files do; loaders drop it). That block is all zeros, and read
    back through jaxdiff's own single-file table as a tower one layer deeper it leaves the
    output unchanged; a non-zero block in its place would not."""
    import jax.numpy as jnp

    _, (_, _, text), nets, path = build("sd2")
    (um, _), (vm, _), (tm, tp) = nets
    raw = _read(path)
    extra = single_file.openclip_last_block(single_file.ldm_table(um, vm, tm, text_layout="openclip"),
                                            tm.num_layers)
    assert extra and all(k in raw and not np.any(raw[k]) for k in extra)
    deeper = tm.clone(num_layers=tm.num_layers + 1)
    table = single_file.ldm_table(um, vm, deeper, text_layout="openclip")
    params = names.to_flax(raw, table, what="the file read as a deeper tower")["text_encoder"]
    ids = jnp.asarray([[0, 5, 17, 2, 1, 1, 1], [0, 9, 33, 48, 7, 2, 1]], jnp.int32)
    want = np.asarray(tm.apply({"params": tp}, ids).last_hidden_state)
    got = np.asarray(deeper.apply({"params": params}, ids).last_hidden_state)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the tower itself is the reference's
        ref = text(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state.numpy()
    assert np.linalg.norm(want - ref) / np.linalg.norm(ref) < 1e-4
    last = f"layer_{tm.num_layers}"
    nonzero = {**params, last: params["layer_0"]}
    moved = np.asarray(deeper.apply({"params": nonzero}, ids).last_hidden_state)
    assert np.linalg.norm(moved - want) / np.linalg.norm(want) > 1e-2


def _read(path):
    from jaxdiff.convert import tensors

    return tensors.read_safetensors(path)


def _rewrite(path, out, change):
    from jaxdiff.convert import tensors

    sd = tensors.read_safetensors(path)
    change(sd)
    tensors.write_safetensors(sd, out)
    return str(out)


def test_key_errors_name_the_key(sd1, tmp_path):
    _, _, _, path = sd1
    extra = _rewrite(path, tmp_path / "extra.safetensors",
                     lambda sd: sd.__setitem__("model.diffusion_model.extra.weight", np.ones(3)))
    with pytest.raises(CheckpointError, match=r"unexpected 1 key.*model\.diffusion_model\.extra"):
        single_file.load_single_file(extra)
    gone = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    missing = _rewrite(path, tmp_path / "missing.safetensors", lambda sd: sd.pop(gone))
    with pytest.raises(CheckpointError, match=r"missing 1 key.*" + gone.replace(".", r"\.")):
        single_file.load_single_file(missing)
    gone_vae = "first_stage_model.decoder.up.1.upsample.conv.bias"
    missing = _rewrite(path, tmp_path / "missing2.safetensors", lambda sd: sd.pop(gone_vae))
    with pytest.raises(CheckpointError, match=gone_vae.replace(".", r"\.")):
        single_file.load_single_file(missing)

    # EMA weights and schedule buffers are ignored, not errors
    def add_ignored(sd):
        sd["model_ema.decay"] = np.float32(0.999)
        sd["model_ema.diffusion_modelconv_in_weight"] = np.ones(3, np.float32)
        sd["alphas_cumprod"] = np.ones(1000, np.float32)
        sd["betas"] = single_file.sd_betas().astype(np.float16)  # SD's own schedule
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    loaded = single_file.load_single_file(_rewrite(path, tmp_path / "ema.safetensors",
                                                   add_ignored))
    assert loaded["scheduler"]["trained_betas"] is None

    # a file trained with another schedule keeps it, with a warning
    ddpm = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)
    other = _rewrite(path, tmp_path / "ddpm.safetensors", lambda sd: sd.__setitem__("betas", ddpm))
    with pytest.warns(UserWarning, match="trained_betas"):
        loaded = single_file.load_single_file(other)
    np.testing.assert_allclose(loaded["scheduler"]["trained_betas"], ddpm)

    no_vae = _rewrite(path, tmp_path / "no_vae.safetensors", lambda sd: [
        sd.pop(k) for k in list(sd) if k.startswith("first_stage_model.")])
    with pytest.raises(CheckpointError, match=r"missing key first_stage_model\.encoder\.conv_in"):
        single_file.load_single_file(no_vae)
    sdxl = _rewrite(path, tmp_path / "sdxl.safetensors", lambda sd: sd.__setitem__(
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias", np.ones(3)))
    with pytest.raises(CheckpointError, match="SDXL"):
        single_file.load_single_file(sdxl)

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="is a pickle.*safetensors"):
        single_file.load_single_file(ckpt)
    with pytest.raises(CheckpointError, match="prediction_type"):
        single_file.load_single_file(path, prediction_type="x0")


def test_reads_clip_names_without_text_model(sd1, tmp_path):
    """Files written with transformers before 4.22 name the SD 1.x text encoder
    `cond_stage_model.transformer.embeddings...` (no `text_model.`)."""
    _, _, nets, path = sd1
    old, new = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."

    def rename(sd):
        for k in [k for k in sd if k.startswith(old)]:
            sd[new + k[len(old):]] = sd.pop(k)
    loaded = single_file.load_single_file(_rewrite(path, tmp_path / "old.safetensors", rename))
    _assert_same_params(loaded["text_encoder"][1], nets[2][1])


def test_use_ema_takes_the_unet_from_the_ema_copy(sd1, tmp_path):
    _, _, nets, path = sd1

    def add_ema(sd):  # EMA weights differing from the raw ones, as LDM names them
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            sd["model_ema." + k[len("model."):].replace(".", "")] = 2 * sd[k]
        sd["model_ema.decay"], sd["model_ema.num_updates"] = np.float32(0.9999), np.int64(7)
    full = _rewrite(path, tmp_path / "full_ema.safetensors", add_ema)
    assert "model_ema.diffusion_modelinput_blocks00weight" in _read(full)
    _assert_same_params(single_file.load_single_file(full)["unet"][1], nets[0][1])
    ema = single_file.load_single_file(full, use_ema=True)
    doubled = {k: 2 * np.asarray(v) for k, v in _flat(nets[0][1]).items()}
    _assert_same_params(ema["unet"][1], traverse_util.unflatten_dict(doubled))
    _assert_same_params(ema["vae"][1], nets[1][1])  # only the U-Net has an EMA copy
    with pytest.raises(CheckpointError, match="no EMA copy.*model_ema.diffusion_model"):
        single_file.load_single_file(path, use_ema=True)


def test_half_precision_file(sd1, tmp_path):
    """A float16 file (as most are shared) loads into float32 params equal to the rounded ones."""
    _, _, nets, _ = sd1
    path = tmp_path / "half.safetensors"
    single_file.save_single_file(path, *nets, dtype=np.float16)
    from safetensors.numpy import load_file

    assert {v.dtype for v in load_file(path).values()} == {np.dtype(np.float16)}
    loaded = single_file.load_single_file(path)
    for name, (_, params) in zip(("unet", "vae", "text_encoder"), nets):
        got = _flat(loaded[name][1])
        for k, want in _flat(params).items():
            assert np.asarray(got[k]).dtype == np.float32
            np.testing.assert_array_equal(
                np.asarray(got[k]), np.asarray(want).astype(np.float16).astype(np.float32))


def _tokenizer_dir(root):
    """A minimal CLIP tokenizer folder: byte vocabulary, no merges, BOS and EOS."""
    write_clip_tokenizer(root / "tokenizer_src", max_length=77)
    return root / "tokenizer_src"


def test_pipeline_folder_loads_in_diffusers(case, tmp_path):
    kind, (unet, vae, text), _, path = case
    tok = _tokenizer_dir(tmp_path)
    out = tmp_path / "pipe"
    notes = single_file.to_diffusers_folder(path, out, tokenizer_dir=tok,
                                            prediction_type="v_prediction")
    assert notes == []
    index = json.loads((out / "model_index.json").read_text())
    cls = {"inpaint": "StableDiffusionInpaintPipeline"}.get(kind, "StableDiffusionPipeline")
    assert index["_class_name"] == cls
    pipe = getattr(diffusers, cls).from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.tokenizer("a cat").input_ids[0] == len(json.loads(
        (tok / "vocab.json").read_text())) - 2  # BOS
    _assert_same_state(_numpy(pipe.unet.state_dict()), _numpy(unet.state_dict()))
    _assert_same_state(_numpy(pipe.vae.state_dict()), _numpy(vae.state_dict()))
    _assert_same_state(_text_state(pipe.text_encoder), _text_state(text))
    assert pipe.unet.config.in_channels == KINDS[kind]["in_channels"]
    assert pipe.unet.config.use_linear_projection == KINDS[kind]["linear"]


def test_save_pretrained_without_tokenizer_says_so(sd1, tmp_path):
    _, _, nets, _ = sd1
    components = dict(zip(("unet", "vae", "text_encoder"), nets),
                      scheduler=single_file.SCHEDULER_CONFIG)
    with pytest.warns(UserWarning, match="no tokenizer"):
        notes = save_pretrained(tmp_path / "pipe", components)
    assert len(notes) == 1 and "tokenizer" in notes[0]
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["tokenizer"] == [None, None]
    assert sorted(os.listdir(tmp_path / "pipe")) == [
        "model_index.json", "scheduler", "text_encoder", "unet", "vae"]


def test_cli_convert(sd1, tmp_path, capsys):
    _, (unet, _, _), _, path = sd1
    out = tmp_path / "cli_pipe"
    assert cli.main(["convert", "--single_file", path, "--out", str(out),
                     "--prediction_type", "v_prediction"]) == 0
    printed = capsys.readouterr()
    assert "no tokenizer" in printed.out + printed.err
    cfg = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "v_prediction"
    ref = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    _assert_same_state(_numpy(ref.state_dict()), _numpy(unet.state_dict()))

    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    assert cli.main(["convert", "--single_file", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickle" in err[0] and err[0].startswith("jaxdiff convert: error:")
    # a wrong tokenizer folder is reported before any conversion work
    assert cli.main(["convert", "--single_file", path, "--out", str(tmp_path / "o2"),
                     "--tokenizer", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer folder not found" in err[0]
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------
# full-size layouts, shapes only (torch "meta" tensors hold no data)

_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
_VIT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu")
_VIT_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
              num_attention_heads=16, hidden_act="gelu")
# diffusers' model type -> (UNet2DConditionModel options beyond its SD-shaped defaults, text)
FULL_SIZE = {
    "v1": (dict(cross_attention_dim=768), _VIT_L),
    "inpainting": (dict(cross_attention_dim=768, in_channels=9), _VIT_L),
    "v2": (dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                use_linear_projection=True), _VIT_H),
}


@pytest.mark.parametrize("model_type", list(FULL_SIZE))
def test_full_size_layout_matches_diffusers(model_type):
    """Real SD 1.5 / 2.x / inpainting sizes: the LDM file our table describes (built from the
    jaxdiff modules alone) is recognised by diffusers as that model type, diffusers' converters
    map it onto the full-size diffusers networks (names and shapes), and the configs read back
    from its shapes are the real ones."""
    unet_opts, text_opts = FULL_SIZE[model_type]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_opts)
        vae = diffusers.AutoencoderKL(**_SD_VAE)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_opts))
    layout = "openclip" if text_opts["hidden_act"] == "gelu" else "clip"
    um = unet_convert.module_from_config(dict(unet.config))
    vm = vae_convert.module_from_config(dict(vae.config))
    tm = clip_convert.module_from_config(text.config.to_dict())
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    text_sd = {(k if k.startswith("text_model.") else "text_model." + k): v
               for k, v in text.state_dict().items() if not k.endswith("position_ids")}

    # the file our table describes, as shapes only (meta tensors)
    table = single_file.ldm_table(um, vm, tm, text_layout=layout)
    shapes = names.torch_shapes(table)
    if layout == "openclip":  # the unused 24th ViT-H block
        shapes.update(single_file.openclip_last_block(table, tm.num_layers))
    with torch.device("meta"):
        ckpt = {k: torch.empty(s) for k, s in shapes.items()}

    assert sfu.infer_diffusers_model_type(ckpt) == model_type

    def same_layout(got, want):
        assert sorted(got) == sorted(want)
        for k in want:
            assert tuple(got[k].shape) == tuple(want[k].shape), k

    same_layout(sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), unet_sd)
    same_layout(sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), vae_sd)
    same_layout(sfu.convert_open_clip_checkpoint(text, ckpt) if layout == "openclip"
                else sfu.convert_ldm_clip_checkpoint(ckpt), text_sd)

    got = single_file.unet_config(ckpt)
    for key in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types",
                "up_block_types", "cross_attention_dim", "attention_head_dim",
                "use_linear_projection"):
        assert _plain(got[key]) == _plain(unet.config[key]), key
    got = single_file.vae_config(ckpt)
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert _plain(got[key]) == _plain(vae.config[key]), key
    got_layout, got = single_file.text_encoder_config(ckpt)
    assert got_layout == layout
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "hidden_act"):
        assert got[key] == getattr(text.config, key), key
