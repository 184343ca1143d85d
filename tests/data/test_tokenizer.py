"""Byte-level BPE: exact round trip of any text, fixed special ids, save/load identity, CJK runs
and single digits in pre-tokenization, vocab padding and presets, balanced sampling of training
text across sources."""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, pre_tokenizers

from lmforge.data.tokenizer import (
    MAX_CJK_RUN,
    RESERVED_TOKEN,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    VOCAB_PRESETS,
    TextTokenizer,
    TokenizerConfig,
    sample_sources,
    train_tokenizer,
)

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
        "长" * 70 + "没有标点的中文" + "日本語のテキスト한국어" * 5,  # runs longer than the cap
    ],
)
def test_round_trip_examples(tokenizer: TextTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_any_text(tokenizer: TextTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="中国人们的我在是，。！ 12ab日本語のテキ한국\n"))
def test_round_trip_cjk_heavy_text(tokenizer: TextTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(alphabet=st.characters(codec="utf-8")), max_size=8))
def test_encode_batch_equals_encode(tokenizer: TextTokenizer, texts: list[str]) -> None:
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def _pieces(text: str) -> list[str]:
    """Pre-tokenizer pieces as plain text (before the byte-level mapping)."""
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    return [piece for piece, _ in split.pre_tokenize_str(text)]


def test_pre_tokenizer_keeps_cjk_runs_and_splits_digits() -> None:
    assert _pieces("我们的中文，日本語のテキスト。abc 2024年") == (
        ["我们的中文", "，", "日本語のテキスト", "。", "abc", " ", "2", "0", "2", "4", "年"]
    )
    assert _pieces("中" * (2 * MAX_CJK_RUN + 5)) == ["中" * MAX_CJK_RUN] * 2 + ["中" * 5]


def test_pre_tokenizer_pieces_match_the_tokenizer(tokenizer: TextTokenizer) -> None:
    text = "中文abc 123"
    byte_level = [p for p, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str(text)]
    assert byte_level[0] == "ä¸Ńæĸĩ"  # byte-level form of 中文: one piece
    assert len(byte_level) == len(_pieces(text)) == 6  # 中文, abc, " ", 1, 2, 3


def test_frequent_chinese_word_becomes_one_token() -> None:
    rng = random.Random(0)
    filler = "天地山水日月风云花草"

    def fill() -> str:
        return "".join(rng.choice(filler) for _ in range(rng.randint(0, 3)))

    texts = [f"{fill()}中国{fill()}。" for _ in range(300)]  # 中国 in varied contexts
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=320))
    ids = tok.encode("中国")
    assert len(ids) == 1  # one piece per character (the old pattern) would give 2
    assert tok.decode(ids) == "中国"


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
    # at most max_train_bytes: the last text is cut (at a character boundary)
    from lmforge.data.tokenizer import _limit_bytes

    assert list(_limit_bytes(["ab", "cdé", "fg"], 5)) == ["ab", "cd"]  # é is 2 bytes
    assert list(_limit_bytes(["ab", "cdé", "fg"], 6)) == ["ab", "cdé"]
    assert list(_limit_bytes(["x" * 2000], 1500)) == ["x" * 1500]

    def exactly_four_bytes() -> Iterator[str]:
        yield from ("ab", "cd")
        raise AssertionError("a text past max_train_bytes was read")

    assert list(_limit_bytes(exactly_four_bytes(), 4)) == ["ab", "cd"]


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


# --- vocabulary padding and presets ---------------------------------------------------------


@pytest.fixture(scope="module")
def padded() -> TextTokenizer:
    return train_tokenizer(SAMPLE_TEXTS * 5, TokenizerConfig(vocab_size=500, pad_to_multiple_of=64))


def _reserved_ids(tok: TextTokenizer) -> set[int]:
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    return {i for token, i in vocab.items() if token.startswith("<|reserved_")}


def test_pad_to_multiple_of_appends_reserved_tokens(padded: TextTokenizer) -> None:
    assert padded.vocab_size % 64 == 0
    trained = padded.backend.get_vocab_size(with_added_tokens=False)
    assert trained <= 500 < trained + 64  # the small corpus stops short of vocab_size
    reserved = _reserved_ids(padded)
    assert reserved == set(range(trained, padded.vocab_size))  # the tail, nothing else
    assert padded.backend.token_to_id(RESERVED_TOKEN.format(0)) == trained
    for i, token in enumerate(SPECIAL_TOKENS):
        assert padded.backend.token_to_id(token) == i


@pytest.mark.parametrize(
    "text", [*SAMPLE_TEXTS, "quoting <|reserved_0|> and <|reserved_3|> in a document", ""]
)
def test_reserved_tokens_never_come_from_text(padded: TextTokenizer, text: str) -> None:
    ids = padded.encode(text)
    assert not set(ids) & _reserved_ids(padded)
    assert padded.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_padded_round_trip_any_text(padded: TextTokenizer, text: str) -> None:
    ids = padded.encode(text)
    assert padded.decode(ids) == text
    assert max(ids, default=0) < padded.vocab_size - len(_reserved_ids(padded))


def test_padded_tokenizer_saves_and_loads(padded: TextTokenizer, tmp_path: Path) -> None:
    padded.save(tmp_path / "tokenizer.json")
    loaded = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.vocab_size == padded.vocab_size
    assert loaded.encode("<|reserved_0|>") == padded.encode("<|reserved_0|>")


def test_pad_to_a_multiple_already_met_adds_nothing() -> None:
    plain = train_tokenizer(SAMPLE_TEXTS, TokenizerConfig(vocab_size=300))
    same = train_tokenizer(SAMPLE_TEXTS, TokenizerConfig(vocab_size=300, pad_to_multiple_of=1))
    assert same.vocab_size == plain.vocab_size
    assert not _reserved_ids(same)


def test_presets_supply_vocab_size() -> None:
    assert VOCAB_PRESETS == {"xmodel-lm": 32000, "xgen": 51200, "chuxin": 102400}
    for name, size in VOCAB_PRESETS.items():
        assert TokenizerConfig(preset=name).vocab_size == size
        assert TokenizerConfig(preset=name, vocab_size=size).vocab_size == size  # agrees: fine
        assert size % 128 == 0  # already GPU-friendly: padding to 128 adds nothing at full size


def test_preset_trains_and_pads_on_a_small_corpus() -> None:
    tok = train_tokenizer(SAMPLE_TEXTS, TokenizerConfig(preset="xmodel-lm", pad_to_multiple_of=128))
    assert tok.vocab_size % 128 == 0
    assert tok.vocab_size <= 32000  # too little text for 32,000 merges; still a multiple
    assert tok.decode(tok.encode(SAMPLE_TEXTS[1])) == SAMPLE_TEXTS[1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
        ({"pad_to_multiple_of": -64}, "pad_to_multiple_of"),
        ({"preset": "gpt5"}, "preset"),
        ({"preset": "xgen", "vocab_size": 32000}, "vocab_size"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"max_train_bytes": 0}, "max_train_bytes"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        TokenizerConfig(**kwargs)  # type: ignore[arg-type]


# --- sample_sources -------------------------------------------------------------------------


def _docs(char: str, seed: int, limit: int | None = None) -> Iterator[str]:
    """Documents of one repeated character (1-3 UTF-8 bytes) and random length, so bytes per
    source can be counted from the output alone."""
    rng = random.Random(seed)
    for _ in itertools.count() if limit is None else range(limit):
        yield char * rng.randint(1, 400)


def _bytes_by_char(docs: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for doc in docs:
        counts[doc[0]] = counts.get(doc[0], 0) + len(doc.encode("utf-8"))
    return counts


def test_sample_sources_follows_byte_shares() -> None:
    streams = {"en": _docs("a", 0), "zh": _docs("中", 1), "code": _docs("#", 2)}
    docs = list(sample_sources(streams, {"en": 5, "zh": 4, "code": 1}, max_bytes=300_000))
    counts = _bytes_by_char(docs)
    total = sum(counts.values())
    assert total == 300_000
    for char, share in (("a", 0.5), ("中", 0.4), ("#", 0.1)):
        assert counts[char] / total == pytest.approx(share, abs=0.01)


def test_sample_sources_drops_an_exhausted_source(caplog: pytest.LogCaptureFixture) -> None:
    short = list(_docs("b", 3, limit=5))
    streams = {"a": _docs("a", 0), "b": iter(short), "c": _docs("c", 2)}
    with caplog.at_level(logging.INFO, logger="lmforge.data.tokenizer"):
        docs = list(sample_sources(streams, {"a": 0.2, "b": 0.6, "c": 0.2}, max_bytes=100_000))
    assert [d for d in docs if d[0] == "b"] == short  # all of it, in order
    counts = _bytes_by_char(docs)
    assert sum(counts.values()) == 100_000  # the others filled the rest
    assert counts["a"] / counts["c"] == pytest.approx(1.0, abs=0.02)
    assert "'b' ran out" in caplog.text


def test_sample_sources_never_exceeds_max_bytes() -> None:
    for max_bytes in (0, 1, 700, 1001):
        streams = {"zh": _docs("中", 1), "emoji": _docs("👍", 4)}
        docs = list(sample_sources(streams, {"zh": 1, "emoji": 1}, max_bytes=max_bytes))
        total = sum(len(d.encode("utf-8")) for d in docs)
        assert max_bytes - 4 < total <= max_bytes  # a cut mid-character drops that character
        assert all(docs)  # no empty documents


def test_sample_sources_without_limit_reads_everything() -> None:
    a, b = list(_docs("a", 0, limit=30)), list(_docs("b", 1, limit=3))
    docs = list(sample_sources({"a": iter(a), "b": iter(b)}, {"a": 1, "b": 1}, max_bytes=None))
    assert sorted(docs) == sorted(a + b)


def test_sample_sources_is_deterministic() -> None:
    def run() -> list[str]:
        streams = {"x": _docs("x", 0), "y": _docs("y", 1), "z": _docs("z", 2, limit=7)}
        return list(sample_sources(streams, {"x": 0.3, "y": 0.3, "z": 0.4}, max_bytes=20_000))

    assert run() == run()


def test_sample_sources_rejects_bad_shares() -> None:
    with pytest.raises(ValueError, match="shares: sources"):
        list(sample_sources({"a": iter(["x"])}, {"b": 1.0}, max_bytes=None))
    with pytest.raises(ValueError, match="shares: 'a' has share 0"):
        list(sample_sources({"a": iter(["x"])}, {"a": 0}, max_bytes=None))
