"""Cleaning: normalization keeps meaning, each filter fires on its junk and spares normal text."""

from __future__ import annotations

import gzip
import itertools
import json
import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest

from lmforge.data.clean import DROP_REASONS, CleanConfig, clean, language_of, normalize

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpus"

ENGLISH = (
    "The river rose slowly through the night, and by morning the lower fields were under water.\n"
    "Farmers moved their animals to the hills, while the children watched from the old bridge.\n"
    "Nobody in the village remembered a flood like this one, although the oldest stories told of\n"
    "a summer when the whole valley became a lake for three weeks. The mayor promised help, but\n"
    "the roads were closed, so the people worked together to carry food and dry blankets."
)
CHINESE = (
    "春天来了，公园里的花都开了。孩子们在草地上放风筝，老人们坐在长椅上聊天。\n"
    "我们使用 PyTorch 训练了一个小型语言模型，并在中文和英文数据上评估了它的效果。\n"
    "下午下了一场小雨，空气变得格外清新，街道两旁的树叶也更绿了。"
)
PYTHON = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


if __name__ == "__main__":
    print(fibonacci(10))
'''
GOPHER = CleanConfig(
    max_symbol_ratio=0.1,
    max_duplicate_line_fraction=0.3,
    max_top_ngram_fraction=0.2,
    min_mean_word_length=3,
    max_mean_word_length=10,
    min_alpha_word_fraction=0.8,
)


def test_nfc_composes_decomposed_accents() -> None:
    decomposed = "cafe\u0301 re\u0301sume\u0301"
    text, reason = clean(decomposed, CleanConfig())
    assert text == "caf\u00e9 r\u00e9sum\u00e9" and reason is None
    assert unicodedata.is_normalized("NFC", text)
    assert clean(decomposed, CleanConfig(nfc=False))[0] == decomposed


def test_strip_control_removes_junk_but_keeps_whitespace_joiners_and_emoji() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # ZWJ sequence
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"  # tags
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # ZWNJ inside a word
    keep = f"a\tb\r\nc {family} {england} {persian} \u2764\ufe0f \u200fx"
    text = normalize(
        "\ufeff\x00\x1b[1;31m" + keep + "\x07\x7f\x85\u200b\u00ad\u2060\ud800\x1b[0m",
        CleanConfig(),
    )
    assert text == keep
    assert text.encode("utf-8")  # lone surrogates are gone, so it encodes
    assert normalize("a\x00b", CleanConfig(strip_control=False)) == "a\x00b"


def test_removing_a_junk_char_between_letter_and_accent_still_composes() -> None:
    assert normalize("e\u200b\u0301", CleanConfig()) == "\u00e9"


BAD_DOCS = {
    "too_short": (CleanConfig(min_chars=20), "   hi   "),
    "too_long": (CleanConfig(max_chars=2000), ENGLISH * 5),
    "language": (CleanConfig(languages=("zh",)), ENGLISH),
    "symbol_ratio": (CleanConfig(max_symbol_ratio=0.1), "#ai #ml #deep #tech news today... more…"),
    "word_length": (CleanConfig(min_mean_word_length=3), "a b c d e f g h i j k l m n o p"),
    "alpha_words": (CleanConfig(min_alpha_word_fraction=0.8), "12 + 30 = 42 ; 7 * 6 = 42 ok"),
    "duplicate_lines": (
        CleanConfig(max_duplicate_line_fraction=0.3),
        "Click here to subscribe\nGreat deals today\n" * 5 + "Contact us",
    ),
    "repetition": (CleanConfig(max_top_ngram_fraction=0.2), "buy now and save " * 40),
}


def test_every_drop_reason_has_a_crafted_doc() -> None:
    assert set(BAD_DOCS) == set(DROP_REASONS)


@pytest.mark.parametrize("reason", DROP_REASONS)
def test_crafted_doc_is_dropped_for_its_reason_and_normal_doc_is_kept(reason: str) -> None:
    cfg, bad = BAD_DOCS[reason]
    assert clean(bad, cfg)[1] == reason
    good = CHINESE if reason == "language" else ENGLISH
    assert clean(good, cfg)[1] is None


def test_long_words_fail_max_mean_word_length() -> None:
    cfg = CleanConfig(max_mean_word_length=10)
    assert clean("aaaaaaaaaaaaaaaaaaaa " * 20, cfg)[1] == "word_length"


def test_first_failing_rule_in_drop_reasons_order_wins() -> None:
    doc = "# # # #\n# # # #\n# # # #"  # fails symbol_ratio, word_length, alpha_words, duplicates
    assert clean(doc, GOPHER)[1] == "symbol_ratio"
    assert clean(doc, replace(GOPHER, max_symbol_ratio=None))[1] == "word_length"


def test_defaults_keep_english_chinese_and_code_and_gopher_keeps_prose() -> None:
    for doc in (ENGLISH, CHINESE, PYTHON):
        assert clean(doc, CleanConfig()) == (doc, None)
    assert clean(ENGLISH, GOPHER)[1] is None


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        (CHINESE, "zh"),
        ("我们使用 PyTorch 训练了一个小型语言模型，并在中文和英文数据上评估了它的效果。", "zh"),
        (ENGLISH, "en"),
        (PYTHON, "en"),
        ("Ça coûte très cher, n'est-ce pas ?", "en"),
        ("これは日本語の文章です。漢字も使います。", "ja"),
        ("이것은 한국어 문장입니다.", "ko"),
        ("Это русский текст.", "other"),
        ("12345 67.8 -- 2024/01/01", "unknown"),
        ("", "unknown"),
    ],
)
def test_language_of(text: str, tag: str) -> None:
    assert language_of(text) == tag


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_chars": -1}, "clean.min_chars"),
        ({"max_chars": 0}, "clean.max_chars"),
        ({"min_chars": 10, "max_chars": 5}, "clean.max_chars"),
        ({"max_symbol_ratio": 2}, "clean.max_symbol_ratio"),
        ({"max_duplicate_line_fraction": 0}, "clean.max_duplicate_line_fraction"),
        ({"max_top_ngram_fraction": 1.5}, "clean.max_top_ngram_fraction"),
        ({"min_alpha_word_fraction": -0.1}, "clean.min_alpha_word_fraction"),
        ({"min_mean_word_length": 0}, "clean.min_mean_word_length"),
        ({"min_mean_word_length": 5, "max_mean_word_length": 3}, "clean.max_mean_word_length"),
        ({"languages": ("english",)}, "clean.languages"),
        ({"languages": "en"}, "clean.languages"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + ":"):
        CleanConfig(**kwargs)  # type: ignore[arg-type]


def test_megabyte_document_goes_through_every_rule() -> None:
    lines = [f"Line {i} of the report says the value {i * 7} was recorded." for i in range(20000)]
    doc = "\n".join(lines)
    assert len(doc) > 1_000_000
    cfg = replace(GOPHER, languages=("en",), max_chars=10_000_000)
    assert clean(doc, cfg)[1] is None


def _real_texts(relpath: str, limit: int) -> list[str]:
    path = CORPUS / relpath
    if not path.exists():
        pytest.skip(f"{path} not found (shared corpus folder missing)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, limit)]


def test_real_corpora_pass_defaults_and_are_tagged_by_script() -> None:
    corpora = {
        "en": _real_texts("fortunes_en/fortunes_en.jsonl.gz", 2000),
        "zh": _real_texts("fortunes_zh/fortunes_zh.jsonl.gz", 2000),
        "code": _real_texts("python311_stdlib_code/python311_stdlib.jsonl.gz", 200),
    }
    for name, texts in corpora.items():
        nonblank = [t for t in texts if t.strip()]
        assert all(clean(t, CleanConfig())[1] is None for t in nonblank), name
        tags = [language_of(t) for t in nonblank]
        expected = "zh" if name == "zh" else "en"
        assert tags.count(expected) >= 0.95 * len(tags), name
    kept = [t for t in corpora["en"] if clean(t, GOPHER)[1] is None]
    assert len(kept) >= 0.9 * len(corpora["en"])
