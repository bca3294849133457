"""CLIP tokenizer: ids identical to transformers' CLIPTokenizer(s) and to a plain-Python rendering
of OpenAI's algorithm, from vocab.json + merges.txt and from tokenizer.json."""

import json
import re
import shutil
import unicodedata

import numpy as np
import pytest

from jaxdiff.errors import CheckpointError
from jaxdiff.models.tokenizer import CLIPTokenizer
from conftest import BOS, EOS, bytes_to_unicode


CORPUS = [
    "a photo of a cat sitting on a mat", "an astronaut riding a horse on the moon, 4k, trending",
    "Hello World! It's the best painting they've ever seen!!", "oil on canvas by greg rutkowski",
    "highly detailed, digital art, concept art, sharp focus, octane render",
    "the quick brown fox jumps over the lazy dog 1234567890", "café crème brûlée, naïve",
    "東京 タワー", "we'll see what you'd like", "cats, dogs & birds... (masterpiece:1.2)",
]

TEXTS = [
    "a photo of a cat",
    "A PHOTO OF A Cat",
    "An astronaut riding a horse on the moon, 4K, trending on ArtStation!!!",
    "  extra   spaces\tand\ttabs\n\nand newlines  ",
    "non\u00a0breaking\u3000spaces",
    "numbers 1234567890 and 3.14159, 1e-5",
    "it's they're we've I'm you'll he'd don't IT'S",
    "punctuation!?... (masterpiece:1.2), [detailed]; {x} <tag> #hash @at $5 100%",
    "café crème brûlée naïve Ünïcödé",
    "cafe\u0301 (decomposed accent)",
    "東京タワー 日本語 한국어 Ελληνικά русский",
    "emoji 🐱🚀 and ✨ sparkles",
    "wow!! !",
    "a <|endoftext|> in the middle and <|startoftext|> too",
    "",
    "   ",
    "the cat sat on the mat " * 20,  # truncates at 77
]


def _train_merges():
    """BPE merges learnt on CORPUS with CLIP's normaliser and pre-tokeniser."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    from jaxdiff.models.tokenizer import SPLIT_PATTERN

    tk = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tk.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=1, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(CORPUS * 3, trainer)
    return [tuple(m) for m in json.loads(tk.to_str())["model"]["merges"]]


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """Two tokenizer folders laid out as the released SD 1.x and 2.x ones (vocab.json,
    merges.txt, special_tokens_map.json, tokenizer_config.json), same vocabulary, with the
    vocabulary ordered as OpenAI's: 256 bytes, 256 bytes + </w>, merges, then BOS and EOS."""
    merges = _train_merges()
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    root = tmp_path_factory.mktemp("tok")
    folders = {}
    for name, pad in (("sd1", EOS), ("sd2", "!")):
        d = root / name
        d.mkdir()
        (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (d / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        token = lambda s: {"content": s, "lstrip": False, "normalized": True,  # noqa: E731
                           "rstrip": False, "single_word": False}
        (d / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": token(BOS), "eos_token": token(EOS), "pad_token": pad,
             "unk_token": token(EOS)}))
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"model_max_length": 77, "do_lower_case": True, "errors": "replace",
             "tokenizer_class": "CLIPTokenizer", "pad_token": pad,
             "name_or_path": "openai/clip-vit-large-patch14"}))
        folders[name] = d
    return vocab, merges, folders


def _reference_ids(text, vocab, ranks, specials, max_length=77):
    """OpenAI's CLIP tokenizer in plain Python (without ftfy and HTML unescaping, like
    transformers), with the special tokens split out of the raw text first as transformers
    does. Returns the padded row as transformers' `padding="max_length", truncation=True`."""
    regex = pytest.importorskip("regex")  # for \p{L}; only this reference needs it
    byte_char = bytes_to_unicode()
    pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                            r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)

    def bpe(word):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    ids = []
    split = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    for piece in re.split(split, text):
        if piece in specials:
            ids.append(vocab[piece])
            continue
        piece = re.sub(r"\s+", " ", unicodedata.normalize("NFC", piece)).lower()
        for word in pattern.findall(piece):
            encoded = "".join(byte_char[b] for b in word.encode("utf-8"))
            ids.extend(vocab[t] for t in bpe(encoded))
    row = [vocab[BOS], *ids[:max_length - 2], vocab[EOS]]
    pad = vocab[specials[-1]]
    return row + [pad] * (max_length - len(row))


def _transformers_classes():
    transformers = pytest.importorskip("transformers")
    classes = [transformers.CLIPTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None and fast is not transformers.CLIPTokenizer:
        classes.append(fast)  # transformers 4: a Python (slow) and a tokenizers (fast) class
    return classes


def _hf_ids(tok, texts, max_length=77):
    return np.array(tok(texts, padding="max_length", max_length=max_length,
                        truncation=True).input_ids)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_matches_transformers_and_reference_from_vocab_and_merges(bpe_files, variant):
    vocab, merges, folders = bpe_files
    tok = CLIPTokenizer.from_dir(folders[variant])
    ids = tok(TEXTS)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), 77)

    pad = EOS if variant == "sd1" else "!"
    assert tok.pad_token_id == vocab[pad] and tok.eos_token_id == vocab[EOS]
    assert tok.bos_token_id == vocab[BOS] and tok.model_max_length == 77
    ranks = {m: i for i, m in enumerate(merges)}
    for text, row in zip(TEXTS, ids):
        assert row.tolist() == _reference_ids(text, vocab, ranks, [BOS, EOS, pad]), text

    for cls in _transformers_classes():
        hf = cls.from_pretrained(str(folders[variant]))
        assert hf.pad_token_id == tok.pad_token_id
        np.testing.assert_array_equal(ids, _hf_ids(hf, TEXTS))
        np.testing.assert_array_equal(tok(TEXTS, max_length=10), _hf_ids(hf, TEXTS, 10))

    # the cases that matter are really exercised
    long_text = "the cat sat on the mat " * 20
    long_row = ids[TEXTS.index(long_text)]
    assert long_row[0] == vocab[BOS] and long_row[-1] == vocab[EOS]
    assert (long_row[1:-1] != vocab[EOS]).all()  # truncated: no padding, EOS kept last
    assert (tok(long_text, max_length=300)[0] != tok.pad_token_id).sum() > 77
    row = ids[TEXTS.index("a <|endoftext|> in the middle and <|startoftext|> too")].tolist()
    assert row.count(vocab[EOS]) >= 2 and row.count(vocab[BOS]) == 2
    assert ids[TEXTS.index("")][:3].tolist() == [vocab[BOS], vocab[EOS], vocab[pad]]
    assert (ids[TEXTS.index("A PHOTO OF A Cat")] == ids[TEXTS.index("a photo of a cat")]).all()


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_reads_the_tokenizer_json_transformers_saves(bpe_files, tmp_path, variant):
    _, _, folders = bpe_files
    transformers = pytest.importorskip("transformers")
    fast = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)
    fast.from_pretrained(str(folders[variant])).save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):  # make sure tokenizer.json is what gets read
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()

    tok = CLIPTokenizer.from_dir(tmp_path)
    expected = CLIPTokenizer.from_dir(folders[variant])(TEXTS)
    np.testing.assert_array_equal(tok(TEXTS), expected)
    for cls in _transformers_classes():
        hf = cls.from_pretrained(str(tmp_path))
        np.testing.assert_array_equal(tok(TEXTS), _hf_ids(hf, TEXTS))
    assert tok.pad_token_id == CLIPTokenizer.from_dir(folders[variant]).pad_token_id


def test_single_string_lengths_and_decode(bpe_files):
    vocab, _, folders = bpe_files
    tok = CLIPTokenizer.from_dir(folders["sd1"])
    one = tok("A photo of a Cat")
    assert one.shape == (1, 77)
    np.testing.assert_array_equal(one[0], tok(["a photo of a cat"])[0])
    assert tok.decode(one[0]) == "a photo of a cat"
    full = tok("the cat sat on the mat")[0]
    assert full[3] != vocab[EOS]
    assert tok("the cat sat on the mat", max_length=4).tolist() == [[*full[:3], vocab[EOS]]]
    assert tok([]).shape == (0, 77)
    assert tok.vocab_size == len(vocab)
    with pytest.raises(ValueError, match="at least 2"):
        tok("x", max_length=1)
    with pytest.raises(TypeError, match="list of strings"):
        tok([1, 2])


def test_folder_errors(bpe_files, tmp_path):
    _, _, folders = bpe_files
    with pytest.raises(CheckpointError, match="not found.*never downloads"):
        CLIPTokenizer.from_dir("openai/clip-vit-large-patch14")
    with pytest.raises(CheckpointError, match="is a file"):
        CLIPTokenizer.from_dir(folders["sd1"] / "vocab.json")

    # a folder holding only a config that names a hub repository
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(folders["sd1"] / "tokenizer_config.json", only_config)
    with pytest.raises(CheckpointError, match=r"no tokenizer vocabulary.*vocab\.json and "
                                              r"merges\.txt.*'openai/clip-vit-large-patch14'"):
        CLIPTokenizer.from_dir(only_config)

    # a pipeline root instead of its tokenizer/ folder
    pipe = tmp_path / "pipe"
    shutil.copytree(folders["sd1"], pipe / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer/ subfolder"):
        CLIPTokenizer.from_dir(pipe)
    assert CLIPTokenizer.from_dir(pipe / "tokenizer").pad_token_id is not None

    # merges without a vocabulary
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(folders["sd1"] / "merges.txt", half)
    with pytest.raises(CheckpointError, match="found: merges.txt"):
        CLIPTokenizer.from_dir(half)

    # a special token the vocabulary lacks
    bad = tmp_path / "bad"
    shutil.copytree(folders["sd1"], bad)
    (bad / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(CheckpointError, match="pad token '<pad>' is not in"):
        CLIPTokenizer.from_dir(bad)
