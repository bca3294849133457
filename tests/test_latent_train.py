"""Latent text-to-image training: captioned digits, cached latents and caption states, text
dropout, the loss going down, and exact resume, on a tiny version of experiments/digits_text.py."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import config as config_lib
from jaxdiff import sharding
from jaxdiff import data as data_lib
from jaxdiff.models.vae import vae_latents
from jaxdiff.train import build, frozen, latent, loop
from jaxdiff.train.step import context_condition, make_loss_fn, make_train_step
from conftest import assert_resumes_bit_exact

EXPERIMENT = os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_text.py")


def _tiny_config():
    c = config_lib.load(EXPERIMENT)
    c.vae.block_out_channels = (8, 16)
    c.vae.steps = 2
    c.vae.batch_size = 8
    c.text.hidden_size = 16
    c.text.intermediate_size = 32
    c.text.num_layers = 1
    c.text.num_heads = 2
    c.model.unet.base_channels = 16
    c.model.unet.attention_levels = ()     # cross-attention in the middle block only
    c.model.unet.num_heads = 2
    c.data.batch_size = 8
    c.train.steps = 6
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.optim.warmup_steps = 2
    return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A work dir whose frozen parts and caches exist (fitted and encoded once per module)."""
    root = tmp_path_factory.mktemp("prepared")
    latent.build(_tiny_config(), str(root), batch_size=8, process_index=0, process_count=1)
    return root


@pytest.fixture
def tiny_config():
    """experiments/digits_text.py shrunk to seconds: a 2-step autoencoder fit, 16-wide text."""
    return _tiny_config()


def _workdir_from(prepared, path):
    """A fresh work dir holding copies of the prepared frozen parts and caches."""
    shutil.copytree(prepared, path)
    return str(path)


def test_captioned_digits_are_deterministic_and_name_their_digit():
    a = data_lib.build("captioned_digits", batch_size=64, seed=3, image_size=16)
    b = data_lib.build("captioned_digits", batch_size=64, seed=3, image_size=16)
    it_a, it_b = a.iterator(), b.iterator()
    for _ in range(3):
        x, y = next(it_a), next(it_b)
        assert set(x) == {"image", "label", "caption"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # Every caption names its example's digit, in words or as a numeral.
    examples, captions = data_lib.load_examples("captioned_digits", image_size=16)
    assert len(captions) == 40 and len(set(captions)) == 40
    cap, lab = examples["caption"], examples["label"]
    np.testing.assert_array_equal(data_lib.caption_label(cap), lab)
    for i in range(0, 5000, 97):
        text = captions[cap[i]]
        word = data_lib.DIGIT_WORDS[lab[i]]
        assert text.endswith(" " + word) or text.endswith(" " + str(lab[i])), (text, lab[i])
    # All templates occur, and a given example keeps its caption (fixed per example, not per
    # epoch): the same example seen in a later epoch carries the same caption index.
    assert len(np.unique(cap % len(data_lib.CAPTION_TEMPLATES))) == len(data_lib.CAPTION_TEMPLATES)
    same_digits, _ = data_lib.load_examples("digits", image_size=16)
    np.testing.assert_array_equal(same_digits["image"], examples["image"])
    ds = data_lib.build("captioned_digits", batch_size=1000, seed=0, image_size=16)
    it = ds.iterator()
    seen = {}
    for _ in range(10):  # two epochs
        batch = next(it)
        for img, c in zip(batch["image"][:, 5:11, 5:11, 0].reshape(len(batch["image"]), -1),
                          batch["caption"]):
            seen.setdefault(img.tobytes(), set()).add(int(c))
    assert all(len(v) == 1 for v in seen.values())
    # Resumable like the pixel pipelines.
    it = ds.iterator()
    next(it)
    state = it.get_state()
    expected = next(it)
    resumed = ds.iterator(state)
    for k, v in next(resumed).items():
        np.testing.assert_array_equal(v, expected[k])


def test_text_dropout_replaces_whole_contexts_at_the_rate():
    B, S, D, p = 4000, 5, 3, 0.3
    context = jax.random.normal(jax.random.PRNGKey(0), (B, S, D)) + 5.0
    null = -jnp.arange(S * D, dtype=jnp.float32).reshape(S, D)
    out = context_condition(p, null)({"context": context}, jax.random.PRNGKey(1))["context"]
    is_null = np.all(np.asarray(out) == np.asarray(null)[None], axis=(1, 2))       # [B]
    kept = np.all(np.asarray(out) == np.asarray(context), axis=(1, 2))
    assert np.all(is_null ^ kept)                      # each row wholly dropped or untouched
    assert abs(is_null.mean() - p) < 4 * np.sqrt(p * (1 - p) / B), is_null.mean()
    for q, expect in ((0.0, 0.0), (1.0, 1.0)):
        out = context_condition(q, null)({"context": context}, jax.random.PRNGKey(2))["context"]
        assert np.all(np.asarray(out) == np.asarray(null)[None], axis=(1, 2)).mean() == expect


def test_latents_and_caption_states_are_computed_once(tiny_config, prepared, tmp_path,
                                                       monkeypatch):
    tmp_path = tmp_path / "run"
    _workdir_from(prepared, tmp_path)
    shutil.rmtree(tmp_path / "cache")                  # keep the frozen parts, drop the caches
    calls = {"encode": 0, "embed": 0}
    encode, embed = latent.encode_images, frozen.embed_texts

    def counting_encode(*a, **k):
        calls["encode"] += 1
        return encode(*a, **k)

    def counting_embed(*a, **k):
        calls["embed"] += 1
        return embed(*a, **k)

    monkeypatch.setattr(latent, "encode_images", counting_encode)
    monkeypatch.setattr(frozen, "embed_texts", counting_embed)
    kw = dict(batch_size=8, process_index=0, process_count=1)
    first = latent.build(tiny_config, str(tmp_path), **kw)
    assert calls == {"encode": 1, "embed": 2}          # the 40 captions, then ""
    second = latent.build(tiny_config, str(tmp_path), **kw)
    assert calls == {"encode": 1, "embed": 2}          # read back from WORKDIR/cache
    a, b = next(first.iterator()), next(second.iterator())
    for k in ("image", "label", "caption", "context"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["image"].shape == (8, 8, 8, 4) and a["context"].shape == (8, 8, 16)

    # The cache is the scaled posterior mean of each image, and each context the states of
    # that example's caption.
    parts = second.parts
    examples, captions = data_lib.load_examples("captioned_digits", image_size=16)
    idx = np.arange(0, 5000, 499)
    direct = vae_latents(parts.vae, parts.vae_params, jnp.asarray(examples["image"][idx]))
    with np.load(tmp_path / "cache" / "latents.npz") as f:
        np.testing.assert_allclose(f["latents"][idx], np.asarray(direct), rtol=1e-5, atol=1e-5)
    states = embed(parts, [captions[i] for i in a["caption"]])
    np.testing.assert_allclose(a["context"], states, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second.null_context, embed(parts, [""])[0], rtol=1e-5, atol=1e-5)
    # Distinct captions give clearly distinct states; the tokenizer round-trips every caption.
    flat = second.caption_states.reshape(len(captions), -1)
    dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1) + np.eye(len(flat)) * 1e9
    assert dist.min() > 0.05 * np.linalg.norm(flat, axis=-1).mean(), dist.min()
    ids = parts.tokenizer(list(captions))
    assert [parts.tokenizer.decode(r) for r in ids] == list(captions)
    # The frozen parts are diffusers / transformers folders.
    for sub, name in (("vae", "config.json"), ("text_encoder", "config.json"),
                      ("tokenizer", "vocab.json"), ("tokenizer", "merges.txt")):
        assert (tmp_path / sub / name).is_file()
    vae_cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    latents = np.load(tmp_path / "cache" / "latents.npz")["latents"]
    assert vae_cfg["_class_name"] == "AutoencoderKL"
    assert abs(float(np.std(latents)) - 1.0) < 1e-3     # scaling_factor = 1 / std of the means


def test_train_steps_lower_the_loss(tiny_config, prepared, tmp_path):
    cfg = tiny_config
    cfg.optim.learning_rate = 3e-3
    mesh = sharding.make_mesh()
    ds = build.build_task(cfg, mesh, workdir=_workdir_from(prepared, tmp_path / "run"))
    batch = jax.tree.map(jnp.asarray, next(ds.iterator()))
    model = build.build_model(cfg, ds.image_shape, ds.num_classes, ds.context_dim)
    assert model.context_dim == 16 and model.num_classes is None
    tx = build.build_optimizer(cfg)
    state = jax.jit(build.init_state_fn(model, tx, ds.image_shape, 0))()
    schedule = build.build_schedule(cfg)
    loss_fn = make_loss_fn(model.apply, schedule.alphas_cumprod,
                           prediction_type=cfg.diffusion.prediction_type,
                           condition=ds.condition(cfg, model))
    step = jax.jit(make_train_step(loss_fn, tx))
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    eval_loss = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, batch, k))(keys)))
    before = float(eval_loss(state.params))
    for _ in range(40):
        state, _ = step(state, batch)
    after = float(eval_loss(state.params))
    assert after < 0.75 * before, (before, after)


def test_resume_is_bit_exact(tiny_config, prepared, tmp_path):
    """train 6 == train 3, stop, resume, train 3 more: every array, bit for bit."""
    cfg = tiny_config
    _workdir_from(prepared, tmp_path / "full")
    _workdir_from(prepared, tmp_path / "split")
    assert_resumes_bit_exact(cfg, tmp_path / "full", tmp_path / "split")
    cfg.text.dropout = 0.5
    with pytest.raises(loop.TrainingError, match="text.dropout"):
        loop.train(cfg, str(tmp_path / "split"), progress=False, write_samples=False)


def test_frozen_folders_load_in_diffusers_and_transformers(prepared):
    """The work dir's vae/, text_encoder/ and tokenizer/ are what the reference libraries read:
    same token ids, same text states and same latents (float32, 1e-4)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    parts = frozen.build_or_load(_tiny_config(), str(prepared), None, None)
    captions = list(data_lib.digit_captions()[:8]) + [""]
    ours = parts.tokenizer(captions)
    ref_tok = transformers.CLIPTokenizer(str(prepared / "tokenizer" / "vocab.json"),
                                         str(prepared / "tokenizer" / "merges.txt"))
    ref_ids = ref_tok(captions, padding="max_length", max_length=ours.shape[1],
                      truncation=True)["input_ids"]
    np.testing.assert_array_equal(ours, np.asarray(ref_ids))
    text = transformers.CLIPTextModel.from_pretrained(str(prepared / "text_encoder")).eval()
    with torch.no_grad():
        ref_states = text(torch.as_tensor(ours, dtype=torch.long)).last_hidden_state.numpy()
    np.testing.assert_allclose(frozen.embed_texts(parts, captions), ref_states, rtol=1e-4,
                               atol=1e-4)
    vae = diffusers.AutoencoderKL.from_pretrained(str(prepared / "vae")).eval()
    images, _ = data_lib.load_examples("captioned_digits", image_size=16)
    x = images["image"][:4]                                                    # [4, 16, 16, 1]
    with torch.no_grad():
        ref = vae.encode(torch.as_tensor(x.transpose(0, 3, 1, 2))).latent_dist.mean.numpy()
    ref = ref.transpose(0, 2, 3, 1) * vae.config.scaling_factor                # NHWC, scaled
    with np.load(prepared / "cache" / "latents.npz") as f:
        np.testing.assert_allclose(f["latents"][:4], ref, rtol=1e-4, atol=1e-4)
