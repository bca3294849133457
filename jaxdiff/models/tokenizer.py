"""CLIP's byte-level BPE tokenizer, built from a checkpoint's own files (no downloads).

Public API
----------
    tok = CLIPTokenizer.from_dir(folder)       # e.g. "<pipeline>/tokenizer"
    ids = tok(texts: str | list[str], max_length: int | None = None)
        -> np.ndarray int32 [B, max_length]    # BOS, tokens, EOS, then padding
    tok.decode(ids: Sequence[int]) -> str
    tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length, tok.vocab_size

`from_dir` reads, from the folder only:
  * `tokenizer.json` (what current transformers versions save) when present, otherwise
    `vocab.json` + `merges.txt` (what the released Stable Diffusion 1.x / 2.x folders hold);
  * `special_tokens_map.json` and `tokenizer_config.json`, where present, for the bos / eos /
    pad / unk tokens and `model_max_length` (default 77, CLIP's context length).
Stable Diffusion 1.x pads with the EOS token `<|endoftext|>`; 2.x pads with `"!"` (id 0).

The BPE itself is the `tokenizers` library's, set up the way CLIP tokenizes (and as transformers'
`CLIPTokenizer` does): NFC normalisation, runs of whitespace collapsed to one space, lowercase;
pre-tokens from CLIP's pattern (`'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`,
each digit alone), mapped to bytes (GPT-2's byte-to-unicode table); the last symbol of every
word carries the `</w>` suffix. The special tokens are matched in the raw text first, exactly
as transformers does, so a literal `<|endoftext|>` in a prompt is the EOS id; with SD 2.x's pad
token this also means every `"!"` is encoded alone (id 0), as the diffusers pipelines see it.
OpenAI's original tokenizer additionally runs `ftfy.fix_text` and HTML unescaping; like
transformers without ftfy, this one does not.

Every row is `[bos] + tokens[:max_length - 2] + [eos]`, padded with the pad id to `max_length`
("max_length" padding with truncation, as the Stable Diffusion pipelines call the tokenizer).

Every file is read only when it resolves (symlinks followed) inside the folder, or in the
`blobs/` of the hub-cache repository whose snapshot holds the folder (`jaxdiff.files.inside`,
the rule every model folder follows). A malformed file is a one-line CheckpointError naming it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from jaxdiff import files
from jaxdiff.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CONFIG_FILE = "tokenizer_config.json"

DEFAULT_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's pre-tokenisation pattern (the special tokens first, kept whole).
SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _clip_bpe(vocab_path: str, merges_path: str, unk_token: str):
    """A `tokenizers.Tokenizer` with CLIP's normaliser, pre-tokeniser and BPE settings."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    try:
        model = BPE.from_file(vocab_path, merges_path, unk_token=unk_token,
                              continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD,
                              fuse_unk=False)
    except Exception as e:  # the Rust side raises plain Exceptions on malformed files
        raise CheckpointError(f"cannot read the BPE files {vocab_path} and {merges_path} "
                              f"({e})") from None
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_json(folder: str, name: str) -> dict:
    """The JSON object in `folder/name`, {} when there is no such file."""
    if not os.path.isfile(os.path.join(folder, name)):
        return {}
    return files.read_json(_inside(folder, name), what="an object")


def _inside(folder: str, name: str) -> str:
    return files.inside(folder, name, kind="tokenizer folder")


def _token(value) -> str | None:
    """A special token as the config files write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _missing_files_error(folder: str, config: dict) -> CheckpointError:
    present = sorted(os.listdir(folder))
    msg = (f"{folder} holds no tokenizer vocabulary: expected {TOKENIZER_FILE}, or "
           f"{VOCAB_FILE} and {MERGES_FILE} (found: {', '.join(present) or 'nothing'})")
    if os.path.isdir(os.path.join(folder, "tokenizer")):
        msg += f"; it has a tokenizer/ subfolder, pass {os.path.join(folder, 'tokenizer')}"
    ref = config.get("name_or_path") or config.get("_name_or_path")
    if isinstance(ref, str) and ref and not os.path.isdir(ref):
        msg += (f". Its {CONFIG_FILE} only names {ref!r}; jaxdiff never downloads, so fetch "
                f"that repository's tokenizer files into the folder first")
    return CheckpointError(msg)


class CLIPTokenizer:
    """Text -> CLIP token ids, see the module docstring. Build it with `from_dir`.

    Args (of the constructor, for a ready `tokenizers.Tokenizer`):
      tokenizer: the backend; its own truncation, padding and post-processing are not used.
      bos_token / eos_token / pad_token / unk_token: special token strings (in the vocabulary).
      model_max_length: default row length of `__call__`.
    """

    def __init__(self, tokenizer, *, bos_token: str = BOS, eos_token: str = EOS,
                 pad_token: str = EOS, unk_token: str = EOS,
                 model_max_length: int = DEFAULT_MAX_LENGTH):
        from tokenizers import AddedToken

        specials = dict(bos=bos_token, eos=eos_token, pad=pad_token, unk=unk_token)
        ids = {}
        for role, token in specials.items():
            ids[role] = tokenizer.token_to_id(token)
            if ids[role] is None:
                raise CheckpointError(f"the {role} token {token!r} is not in the tokenizer's "
                                      "vocabulary")
        # Matched in the raw text before normalisation, as transformers registers them.
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t in dict.fromkeys(specials.values())])
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = specials.values()
        self.bos_token_id, self.eos_token_id = ids["bos"], ids["eos"]
        self.pad_token_id, self.unk_token_id = ids["pad"], ids["unk"]
        self.model_max_length = int(model_max_length)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> "CLIPTokenizer":
        """Build from a tokenizer folder (`tokenizer.json`, or `vocab.json` + `merges.txt`)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            what = "is a file, not a folder" if os.path.exists(folder) else "not found"
            raise CheckpointError(
                f"tokenizer folder {what}: {folder}. jaxdiff reads local folders only (it "
                "never downloads); if this is a hub id, download the repository first and pass "
                "its tokenizer/ folder")
        config = _read_json(folder, CONFIG_FILE)
        special = _read_json(folder, SPECIAL_TOKENS_FILE)

        def pick(name: str, default: str) -> str:
            return _token(special.get(name)) or _token(config.get(name)) or default

        eos = pick("eos_token", EOS)
        unk = pick("unk_token", EOS)
        tok_file = os.path.join(folder, TOKENIZER_FILE)
        vocab, merges = os.path.join(folder, VOCAB_FILE), os.path.join(folder, MERGES_FILE)
        if os.path.isfile(tok_file):
            from tokenizers import Tokenizer

            tok_file = _inside(folder, TOKENIZER_FILE)
            try:
                backend = Tokenizer.from_file(tok_file)
            except Exception as e:  # malformed JSON or an unknown component
                raise CheckpointError(f"cannot read {tok_file} ({e})") from None
        elif os.path.isfile(vocab) and os.path.isfile(merges):
            backend = _clip_bpe(_inside(folder, VOCAB_FILE), _inside(folder, MERGES_FILE), unk)
        else:
            raise _missing_files_error(folder, config)

        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or not 0 < max_length <= 1_000_000:
            max_length = DEFAULT_MAX_LENGTH  # unset (transformers writes a huge sentinel)
        return cls(backend, bos_token=pick("bos_token", BOS), eos_token=eos,
                   pad_token=pick("pad_token", eos), unk_token=unk, model_max_length=max_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """texts: one string or B strings -> int32 [B, max_length] (default model_max_length).

        Each row is BOS, the first `max_length - 2` tokens, EOS, then the pad id.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("CLIPTokenizer takes a string or a list of strings")
        length = self.model_max_length if max_length is None else int(max_length)
        if length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {length}")
        out = np.full((len(texts), length), self.pad_token_id, np.int32)  # [B, L]
        for row, enc in zip(out, self._tok.encode_batch(texts, add_special_tokens=False)):
            ids = [self.bos_token_id, *enc.ids[:length - 2], self.eos_token_id]
            row[:len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, special tokens dropped (for inspection; not an exact inverse)."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
        return text.replace(END_OF_WORD, " ").strip()
