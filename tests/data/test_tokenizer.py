"""Byte-level BPE: exact round trip of any text, fixed special ids, save/load identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from lmforge.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, TokenizerConfig, train_tokenizer

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?\n" * 3,
    "中华人民共和国成立于1949年。我们在北京学习自然语言处理。\n" * 3,
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tpass  # tab-indented\n" * 3,
    "Emoji 👍🏽 and family 👨‍👩‍👧‍👦, ünïcödé, Ελληνικά, русский, العربية, 日本語のテキスト.\r\n"
    * 3,
]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return train_tokenizer(SAMPLE_TEXTS * 5, TokenizerConfig(vocab_size=1024, min_frequency=2))


def test_special_token_ids_are_fixed(tokenizer: TextTokenizer) -> None:
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.backend.token_to_id(token) == i
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.decode([tokenizer.bos_id, tokenizer.eos_id]) == "<|bos|><|eos|>"


def test_training_learns_merges_within_vocab_size(tokenizer: TextTokenizer) -> None:
    assert 256 + len(SPECIAL_TOKENS) < tokenizer.vocab_size <= 1024
    text = SAMPLE_TEXTS[0]
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2


@pytest.mark.parametrize(
    "text",
    [
        "",
        "中文分词测试：人工智能，机器学习。",
        "👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇯🇵",
        "def f(x):\n\tif x:\n\t\treturn   x  \n    \n\n",
        "line one\r\nline two\r\n\r\n",
        "  leading and trailing spaces  ",
        "\x00\x01\x7f\u200b\ufeff\U0010ffff",
        "never seen: ꙮ 𓀀 ᚠᛇᚻ",
        "a<|bos|>b<|im_start|>",
    ],
)
def test_round_trip_examples(tokenizer: TextTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_any_text(tokenizer: TextTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(alphabet=st.characters(codec="utf-8")), max_size=8))
def test_encode_batch_equals_encode(tokenizer: TextTokenizer, texts: list[str]) -> None:
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_chinese_characters_are_separate_pieces(tokenizer: TextTokenizer) -> None:
    pieces = tokenizer.backend.pre_tokenizer.pre_tokenize_str("中文abc 123")
    assert [p for p, _ in pieces][:2] == ["ä¸Ń", "æĸĩ"]  # byte-level forms of 中, 文
    assert sum(1 for p, _ in pieces if p in "123") == 3  # digits one by one


def test_save_load_keeps_ids_and_sha256(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = TextTokenizer.load(path)
    assert loaded.sha256 == tokenizer.sha256
    assert loaded.vocab_size == tokenizer.vocab_size
    text = SAMPLE_TEXTS[1] + SAMPLE_TEXTS[2]
    assert loaded.encode(text) == tokenizer.encode(text)
    assert Tokenizer.from_file(str(path)).encode(
        text, add_special_tokens=False
    ).ids == loaded.encode(text)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_load_missing_or_invalid_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.json: tokenizer file not found"):
        TextTokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="bad.json: not a valid lmforge tokenizer"):
        TextTokenizer.load(bad)


def test_max_train_bytes_limits_training_text() -> None:
    texts = iter(["abc " * 10, "xyz " * 10] + ["SHOULD NOT BE READ"] * 100)
    train_tokenizer(texts, TokenizerConfig(vocab_size=300, max_train_bytes=50))
    assert len(list(texts)) == 100


def test_loads_in_transformers(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = SAMPLE_TEXTS[1] + SAMPLE_TEXTS[3]
    assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert hf.decode(tokenizer.encode(text)) == text


def test_special_token_text_in_a_document_stays_text(tokenizer: TextTokenizer) -> None:
    text = "a doc that quotes <|eos|> and <|im_start|>user"
    ids = tokenizer.encode(text)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))  # no special id from raw text
    assert tokenizer.decode(ids) == text
