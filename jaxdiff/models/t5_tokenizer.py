"""T5's SentencePiece (Unigram) tokenizer, read from a folder's own `tokenizer.json`.

SD3 keeps it in `tokenizer_3/`, Flux in `tokenizer_2/`. The pipelines call transformers'
`T5TokenizerFast` with `padding="max_length", max_length=L, truncation=True` and feed the ids
to the T5 encoder (models/t5.py); this class gives the same ids, and the attention mask:

    tok = T5Tokenizer.from_dir(folder)        # e.g. "<pipeline>/tokenizer_3"
    out = tok(texts: str | list[str], max_length: int | None = None)
    out.input_ids       int32 [B, L]   tokens[:L - 1], EOS (</s>, id 1), then the pad id (0)
    out.attention_mask  int32 [B, L]   1 on the tokens and the EOS, 0 on the padding
    tok.decode(ids) -> str;  tok.eos_token_id, tok.pad_token_id, tok.model_max_length, tok.vocab_size

The text goes through the file's own normaliser, pre-tokeniser and Unigram model (the
`tokenizers` library reads it), with no post-processing from the file: EOS is appended here,
after truncation to L - 1 tokens, as T5's tokenizer template "$A </s>" does. Special tokens in the
text (a literal "</s>", "<extra_id_0>") are matched as the file's added tokens, as transformers
does.

`from_dir` reads, from the folder only (files resolving inside it, see `jaxdiff.files.inside`):
`tokenizer.json`, and where present `special_tokens_map.json` / `tokenizer_config.json` for the
eos / pad tokens (default "</s>" and "<pad>") and `model_max_length` (default 512, T5's
training length; SD3 calls it with 256, Flux with 256 or 512). A folder holding only the
SentencePiece model `spiece.model` is refused with a message saying how to write the
`tokenizer.json` (jaxdiff does not depend on the sentencepiece library).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxdiff import files
from jaxdiff.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
SPIECE_FILE = "spiece.model"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CONFIG_FILE = "tokenizer_config.json"

EOS, PAD = "</s>", "<pad>"
DEFAULT_MAX_LENGTH = 512
# The pipeline parts that hold a T5 tokenizer (SD3, Flux), named in a missing-file message.
SUBFOLDERS = ("tokenizer_3", "tokenizer_2")


class T5Tokens(NamedTuple):
    """What `T5Tokenizer` returns: input_ids and attention_mask, both int32 [B, L]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def _inside(folder: str, name: str) -> str:
    return files.inside(folder, name, kind="tokenizer folder")


def _read_json(folder: str, name: str) -> dict:
    """The JSON object in `folder/name`, {} when there is no such file."""
    if not os.path.isfile(os.path.join(folder, name)):
        return {}
    return files.read_json(_inside(folder, name), what="an object")


def _token(value) -> str | None:
    """A special token as the config files write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _missing_file_error(folder: str) -> CheckpointError:
    held = sorted(os.listdir(folder))
    if SPIECE_FILE in held:
        return CheckpointError(
            f"{folder} holds {SPIECE_FILE} but no {TOKENIZER_FILE}; jaxdiff reads T5 tokenizers "
            f"from {TOKENIZER_FILE} only (it does not use the sentencepiece library): write it "
            "once with `transformers.T5TokenizerFast.from_pretrained(FOLDER).save_pretrained("
            "FOLDER)` where sentencepiece is installed")
    msg = f"{folder} has no {TOKENIZER_FILE} (found: {', '.join(held) or 'nothing'})"
    sub = next((s for s in SUBFOLDERS if os.path.isdir(os.path.join(folder, s))), None)
    if sub:
        msg += f"; it has a {sub}/ subfolder (a pipeline folder?), pass {os.path.join(folder, sub)}"
    return CheckpointError(msg)


class T5Tokenizer:
    """Text -> T5 token ids and attention mask, see the module docstring. Build it with `from_dir`.

    Args (of the constructor, for a ready `tokenizers.Tokenizer`):
      tokenizer: the backend; its own truncation, padding and post-processing are not used.
      eos_token / pad_token: special token strings (in the vocabulary).
      model_max_length: default row length of `__call__`.
    """

    def __init__(self, tokenizer, *, eos_token: str = EOS, pad_token: str = PAD,
                 model_max_length: int = DEFAULT_MAX_LENGTH):
        ids = {}
        for role, token in (("eos", eos_token), ("pad", pad_token)):
            ids[role] = tokenizer.token_to_id(token)
            if ids[role] is None:
                raise CheckpointError(f"the {role} token {token!r} is not in the tokenizer's vocabulary")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_token_id, self.pad_token_id = ids["eos"], ids["pad"]
        self.model_max_length = int(model_max_length)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> T5Tokenizer:
        """Build from a tokenizer folder holding `tokenizer.json` (e.g. SD3's tokenizer_3/)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            what = "is a file, not a folder" if os.path.exists(folder) else "not found"
            raise CheckpointError(
                f"tokenizer folder {what}: {folder}. jaxdiff reads local folders only (it never "
                "downloads); if this is a hub id, download the repository first and pass its "
                "tokenizer folder")
        if not os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
            raise _missing_file_error(folder)
        config = _read_json(folder, CONFIG_FILE)
        special = _read_json(folder, SPECIAL_TOKENS_FILE)

        def pick(name: str, default: str) -> str:
            return _token(special.get(name)) or _token(config.get(name)) or default

        from tokenizers import Tokenizer

        path = _inside(folder, TOKENIZER_FILE)
        try:
            backend = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001  (the Rust side raises plain Exceptions)
            raise CheckpointError(f"cannot read {path} ({str(e).splitlines()[0] if str(e) else e!r})") from None
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or not 0 < max_length <= 1_000_000:
            max_length = DEFAULT_MAX_LENGTH  # unset (transformers writes a huge sentinel)
        return cls(backend, eos_token=pick("eos_token", EOS), pad_token=pick("pad_token", PAD),
                   model_max_length=max_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> T5Tokens:
        """texts: one string or B strings -> T5Tokens(input_ids, attention_mask), int32 [B, L]
        with L = max_length (default model_max_length).

        Each row is the first L - 1 tokens, EOS, then the pad id; the mask is 1 up to the EOS.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("T5Tokenizer takes a string or a list of strings")
        length = self.model_max_length if max_length is None else int(max_length)
        if length < 1:
            raise ValueError(f"max_length must be at least 1 (the EOS), got {length}")
        ids = np.full((len(texts), length), self.pad_token_id, np.int32)  # [B, L]
        mask = np.zeros((len(texts), length), np.int32)  # [B, L]
        for row, enc in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
            tokens = [*enc.ids[:length - 1], self.eos_token_id]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return T5Tokens(ids, mask)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text, special tokens dropped (for inspection; not an exact inverse)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
