"""The frozen parts of a latent text-to-image run, kept in the work dir as a loadable folder:

    WORKDIR/vae/            diffusers AutoencoderKL (config.json + safetensors), fitted here
    WORKDIR/text_encoder/   transformers CLIPTextModel (config.json + model.safetensors)
    WORKDIR/tokenizer/      CLIP BPE files (vocab.json, merges.txt, special_tokens_map.json,
                            tokenizer_config.json)

the same layout as a Stable Diffusion pipeline's subfolders, so the converters read them back.
`build_or_load(cfg, workdir, images, captions)` creates what is missing and always returns the
parts as loaded from disk, so a fresh run and a resumed one use bit-identical weights.

The tokenizer is a byte-level BPE in CLIP's format, learnt from the captions themselves with the
`tokenizers` library (CLIP's normaliser and pre-tokeniser; vocabulary ordered as OpenAI's: 256
bytes, the same 256 with `</w>`, the merges, then BOS and EOS). The text encoder is a tiny CLIP
text transformer left at its random initialisation: it is frozen, and distinct captions still
map to distinct hidden states, which is all cross-attention needs to tell them apart.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import files
from jaxdiff.convert import clip as clip_convert
from jaxdiff.convert import vae as vae_convert
from jaxdiff.models import tokenizer as tok_lib
from jaxdiff.models.text import CLIPTextEncoder
from jaxdiff.models.vae import AutoencoderKL
from jaxdiff.train import autoencoder

VAE_DIR, TEXT_ENCODER_DIR, TOKENIZER_DIR = "vae", "text_encoder", "tokenizer"


class FrozenParts(NamedTuple):
    """vae / vae_params: the autoencoder; text_encoder / text_params: the CLIP text tower;
    tokenizer: its `CLIPTokenizer` (rows of `tokenizer.model_max_length` ids)."""

    vae: AutoencoderKL
    vae_params: dict
    text_encoder: CLIPTextEncoder
    text_params: dict
    tokenizer: tok_lib.CLIPTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(extra))]
    return {b: chr(c) for b, c in zip(printable + extra, chars)}


def train_tokenizer(texts, folder: str, *, num_merges: int = 64, max_length: int = 16) -> None:
    """Learn at most `num_merges` BPE merges from `texts` and write a CLIP tokenizer folder
    (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json) that
    `CLIPTokenizer.from_dir` and transformers' `CLIPTokenizer` read."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(end_of_word_suffix=tok_lib.END_OF_WORD))
    tk.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok_lib.SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # The trainer's vocabulary is its alphabet (with and without </w>) plus the merges.
    trainer = trainers.BpeTrainer(vocab_size=2 * len(alphabet) + num_merges, min_frequency=1,
                                  end_of_word_suffix=tok_lib.END_OF_WORD,
                                  initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(sorted(set(texts)), trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tk.to_str())["model"]["merges"]][:num_merges]
    base = list(_bytes_to_unicode().values())
    tokens = (base + [c + tok_lib.END_OF_WORD for c in base] + ["".join(m) for m in merges]
              + [tok_lib.BOS, tok_lib.EOS])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}

    os.makedirs(folder, exist_ok=True)
    files.write_json(vocab, os.path.join(folder, tok_lib.VOCAB_FILE))
    files.write_text(os.path.join(folder, tok_lib.MERGES_FILE),
                     "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    files.write_json({"bos_token": tok_lib.BOS, "eos_token": tok_lib.EOS, "pad_token": tok_lib.EOS,
                      "unk_token": tok_lib.EOS}, os.path.join(folder, tok_lib.SPECIAL_TOKENS_FILE))
    files.write_json({"model_max_length": max_length, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"},
                     os.path.join(folder, tok_lib.CONFIG_FILE))


def build_vae(cfg: ml_collections.ConfigDict, channels: int) -> AutoencoderKL:
    """The (unfitted) autoencoder `cfg.vae` describes, for images with `channels` channels."""
    v = cfg.vae
    return AutoencoderKL(in_channels=channels, out_channels=channels,
                         latent_channels=v.latent_channels,
                         block_out_channels=tuple(v.block_out_channels),
                         layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups,
                         scaling_factor=1.0)


def build_text_encoder(cfg: ml_collections.ConfigDict, vocab_size: int) -> CLIPTextEncoder:
    t = cfg.text
    return CLIPTextEncoder(vocab_size=vocab_size, max_position_embeddings=t.max_length,
                           hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                           num_layers=t.num_layers, num_heads=t.num_heads)


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def build_or_load(cfg: ml_collections.ConfigDict, workdir: str, images: np.ndarray,
                  captions) -> FrozenParts:
    """Fit / create the parts missing from `workdir` (only process 0 writes), then load all
    three from their folders (the other processes wait for process 0).

    images: [N, H, W, C] in [-1, 1], what the autoencoder is fitted on. captions: the strings
    the tokenizer is learnt from (the empty caption needs no merges).
    """
    vae_dir = cfg.vae.path or os.path.join(workdir, VAE_DIR)
    text_dir = os.path.join(workdir, TEXT_ENCODER_DIR)
    tok_dir = os.path.join(workdir, TOKENIZER_DIR)
    if jax.process_index() == 0:
        _create_missing(cfg, vae_dir, text_dir, tok_dir, images, captions)
    if jax.process_count() > 1:  # the others read what process 0 wrote
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxdiff frozen parts written")
    tokenizer = tok_lib.CLIPTokenizer.from_dir(tok_dir)
    vae, vae_params = vae_convert.load(vae_dir)
    text_encoder, text_params = clip_convert.load(text_dir)
    return FrozenParts(vae, vae_params, text_encoder, text_params, tokenizer)


def _create_missing(cfg, vae_dir: str, text_dir: str, tok_dir: str, images, captions) -> None:
    if not os.path.isfile(os.path.join(vae_dir, vae_convert.CONFIG_NAME)):
        v = cfg.vae
        vae = build_vae(cfg, images.shape[-1])
        _log(f"fitting the autoencoder ({v.steps} steps) -> {vae_dir}")
        params, history = autoencoder.fit(
            vae, images, steps=v.steps, batch_size=v.batch_size, learning_rate=v.learning_rate,
            kl_weight=v.kl_weight, seed=cfg.seed, log=lambda s, m: _log(
                f"  vae step {s}: recon {m['recon']:.4f}  kl {m['kl']:.3f}"))
        vae = autoencoder.with_unit_scaling(vae, params, images)
        vae_convert.save(vae_dir, vae, params)
        files.write_json(history, os.path.join(vae_dir, "fit_history.json"))
    if not os.path.isfile(os.path.join(tok_dir, tok_lib.VOCAB_FILE)):
        train_tokenizer(captions, tok_dir, num_merges=cfg.text.num_merges,
                        max_length=cfg.text.max_length)
    if not os.path.isfile(os.path.join(text_dir, clip_convert.CONFIG_NAME)):
        vocab_size = tok_lib.CLIPTokenizer.from_dir(tok_dir).vocab_size
        encoder = build_text_encoder(cfg, vocab_size)
        ids = jnp.zeros((1, cfg.text.max_length), jnp.int32)
        params = encoder.init(jax.random.PRNGKey(cfg.seed + 1), ids)["params"]
        clip_convert.save(text_dir, encoder, params)


def embed_texts(parts: FrozenParts, texts) -> np.ndarray:
    """Text-encoder hidden states of `texts`: float32 [len(texts), max_length, hidden_size]."""
    ids = parts.tokenizer(list(texts))                                      # [N, L]
    out = parts.text_encoder.apply({"params": parts.text_params}, jnp.asarray(ids))
    return np.asarray(out.last_hidden_state, np.float32)
