"""The Flux.1 transformer (jaxdiff/models/flux.py) against diffusers' FluxTransformer2DModel on
tiny random weights converted by jaxdiff/convert/flux.py (both ways), the packing helpers against
FluxPipeline's, and the sharding names of every parameter; offline."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomise_unit_gain

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.convert import flux as convert
from jaxdiff.errors import CheckpointError
from jaxdiff.models import flux
from jaxdiff.sharding import rules as sharding_rules

B, C, H, W, S, CTX, POOLED = 2, 4, 6, 10, 5, 24, 20   # non-square latents: 3 x 5 tokens
CONFIG = {"patch_size": 1, "in_channels": 4 * C, "num_layers": 1, "num_single_layers": 1,
          "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": CTX,
          "pooled_projection_dim": POOLED, "axes_dims_rope": (2, 2, 4)}


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@functools.cache
def _models(guidance: bool):
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**CONFIG, guidance_embeds=guidance).eval()
    randomise_unit_gain(ref, seed=1 + guidance)
    module = convert.module_from_config(dict(ref.config))
    params = convert.params_from_torch({k: v.numpy() for k, v in ref.state_dict().items()}, module)
    apply = jax.jit(lambda p, kw: module.apply({"params": p}, **kw))
    return ref, module, params, apply


def _inputs(seed=0, guidance=True):
    rng = np.random.RandomState(seed)
    latents = rng.randn(B, H, W, C).astype(np.float32)
    out = {"tokens": np.asarray(flux.pack(latents)), "t": np.array([0.25, 0.9], np.float32),
           "context": rng.randn(B, S, CTX).astype(np.float32),
           "pooled": rng.randn(B, POOLED).astype(np.float32),
           "img_ids": flux.image_ids(H // 2, W // 2),
           "txt_ids": rng.randint(0, 4, (S, 3)).astype(np.float32)}
    out["guidance"] = np.array([3.5, 1.5], np.float32) if guidance else None
    return out


def _reference(ref, kw):
    t = {k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in kw.items()}
    with torch.no_grad():
        return ref(t["tokens"], t["context"], t["pooled"], t["t"], t["img_ids"], t["txt_ids"],
                   t["guidance"], return_dict=False)[0].numpy()


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_transformer_matches_diffusers(guidance):
    ref, _, params, apply = _models(guidance)
    kw = _inputs(guidance=guidance)
    want = _reference(ref, kw)
    got = np.asarray(apply(params, kw))
    assert got.shape == want.shape == (B, (H // 2) * (W // 2), 4 * C)
    assert _rel(got, want) < 1e-4, _rel(got, want)
    # the second sample differs from the first in t, guidance, text and pooled vector
    assert _rel(got[0], got[1]) > 0.1


def test_guidance_pooled_and_positions_each_change_the_output():
    ref, _, params, apply = _models(True)
    kw = _inputs()
    base = np.asarray(apply(params, kw))
    changed = {
        "guidance": dict(kw, guidance=kw["guidance"] + 2.0),
        "pooled": dict(kw, pooled=-kw["pooled"]),
        "img_ids": dict(kw, img_ids=kw["img_ids"][:, [0, 2, 1]]),       # rows <-> columns
        "txt_ids": dict(kw, txt_ids=kw["txt_ids"][::-1].copy()),
    }
    for name, other in changed.items():
        got = np.asarray(apply(params, other))
        assert _rel(got, base) > 1e-2, name
        assert _rel(got, _reference(ref, other)) < 1e-4, name
    # rotary positions are relative: one offset added to every id changes nothing
    shifted = dict(kw, img_ids=kw["img_ids"] + 7.0, txt_ids=kw["txt_ids"] + 7.0)
    assert _rel(apply(params, shifted), base) < 1e-4


def test_guidance_argument_must_match_the_config():
    _, module, params, _ = _models(True)
    with pytest.raises(ValueError, match="guidance-distilled"):
        module.apply({"params": params}, **_inputs(guidance=False))
    _, module, params, _ = _models(False)
    with pytest.raises(ValueError, match="no guidance embedding"):
        module.apply({"params": params}, **_inputs(guidance=True))


def test_pack_unpack_and_ids_match_flux_pipeline():
    from diffusers import FluxPipeline

    rng = np.random.RandomState(3)
    latents = rng.randn(B, H, W, C).astype(np.float32)              # NHWC
    nchw = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    want = FluxPipeline._pack_latents(nchw, B, C, H, W).numpy()
    got = np.asarray(flux.pack(latents))
    np.testing.assert_array_equal(got, want)
    vae_scale = 8
    back = FluxPipeline._unpack_latents(torch.from_numpy(want), H * vae_scale, W * vae_scale, vae_scale)
    np.testing.assert_array_equal(np.asarray(flux.unpack(got, H, W)), back.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(flux.unpack(got, H, W)), latents)
    ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(flux.image_ids(H // 2, W // 2), ids)
    with pytest.raises(ValueError, match="even"):
        flux.pack(latents[:, :5])


def test_converter_round_trip_and_folder(tmp_path):
    ref, module, params, apply = _models(True)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    back = convert.params_to_torch(params, module)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert convert.module_from_config(convert.config_to_diffusers(module)) == module
    convert.save(tmp_path / "transformer", module, params)
    reread = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    kw = _inputs()
    assert _rel(_reference(reread, kw), _reference(ref, kw)) < 1e-6
    module2, params2 = convert.load(tmp_path / "transformer")
    assert module2 == module
    assert _rel(apply(params2, kw), apply(params, kw)) == 0.0
    state.pop("proj_out.bias")
    with pytest.raises(CheckpointError, match="missing 1 key"):
        convert.params_from_torch(state, module)
    with pytest.raises(CheckpointError, match="transformer/ subfolder"):
        convert.load(tmp_path)


def test_every_parameter_has_a_sharding_rule():
    _, _, params, _ = _models(True)
    assert sharding_rules.unnamed_parameters(params) == []


def test_bfloat16_stays_close():
    _, module, params, apply = _models(True)
    kw = _inputs()
    low = module.clone(dtype=jnp.bfloat16)
    got = np.asarray(jax.jit(lambda p: low.apply({"params": p}, **kw))(params))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert _rel(got, apply(params, kw)) < 5e-2
